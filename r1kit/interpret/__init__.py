"""Interpretability for every model r1kit loads (MLA, DeepSeekMoE, GQA): hook points, attribution paths, expert
routes, ablation, counterfactuals, and PNG/HTML reports.

- hook points and run_with_cache / run_with_hooks: r1kit.model.hooks (methods of Transformer)
- attribution.py: attention rollout, attention flow, gradient x attention, integrated gradients, top paths,
  expert routes
- ablation.py: head and routed-expert ablation, ranked by the change in the target's log-probability
- counterfactual.py: activation patching (clean vs corrupted), single-token substitutions
- explain.py: all of them on one prompt -> one JSON-ready dict (`r1kit explain`)
- report.py: the PNGs and the self-contained report.html
"""

from r1kit.interpret.ablation import ablate_experts, ablate_heads
from r1kit.interpret.attribution import (
    QuadraticLimitError,
    attention_flow,
    attention_patterns,
    attention_rollout,
    expert_routes,
    grad_x_attention,
    integrated_gradients,
    top_paths,
)
from r1kit.interpret.counterfactual import activation_patching, token_substitutions
from r1kit.interpret.explain import ExplainConfig, TargetError, explain, to_json

__all__ = ["ExplainConfig", "QuadraticLimitError", "TargetError", "ablate_experts", "ablate_heads",
           "activation_patching", "attention_flow", "attention_patterns", "attention_rollout", "explain",
           "expert_routes", "grad_x_attention", "integrated_gradients", "to_json", "token_substitutions",
           "top_paths"]
