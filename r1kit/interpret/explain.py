"""`explain`: every analysis of r1kit.interpret on one prompt (and its generated or given target), as one dict.

    report = explain(R1Model.from_pretrained("r1kit/nano", dtype="fp32"), "What is 14+23?", chat=True)

The dict (written as JSON by `r1kit explain --json`; schema in the README, "Interpretability"):
    prompt, prompt_tokens [P strings], generated_tokens [G strings], target_given (bool),
    attributions {method: (G, P) scores; method_chained: the same through the generated tokens},
    paths [G lists of paths], expert_routes [(P + G) lists of {layer, experts, weights}],
    ablation {metric, how, heads [...], experts [...]}, patching (or None), counterfactuals [...], config {...}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from r1kit.interpret import ablation, attribution, counterfactual
from r1kit.interpret.attribution import check_length

METHODS = ("rollout", "flow", "grad_x_attention", "integrated_gradients")


class TargetError(ValueError):
    """A target text the tokenizer cannot produce as a continuation of the prompt."""


@dataclass
class ExplainConfig:
    """Settings of `explain`; unknown keys are refused by name (`ExplainConfig.from_dict`)."""

    max_new_tokens: int = 16  # generated target length when no target is given
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ig_steps: int = 32  # integrated gradients: Riemann points on the path from the zero baseline
    top_paths: int = 3  # paths kept per generated token
    ablation: str = "zero"  # heads: "zero" or "mean" (experts: zero)
    substitution_candidates: int = 6  # nearest tokens tried per prompt position
    max_quadratic_tokens: int = 256  # prompt + target longer than this: quadratic methods refused

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "explain config") -> ExplainConfig:
        """Build from a mapping, unknown keys and wrong types refused by name."""
        from r1kit.train.config import build_dataclass

        cfg = build_dataclass(cls, d, where)
        unknown = [m for m in cfg.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"{where}: unknown method(s) {unknown}; known: {list(METHODS)}")
        if cfg.ablation not in ablation.ABLATIONS:
            raise ValueError(f"{where}: ablation {cfg.ablation!r}; expected one of {list(ablation.ABLATIONS)}")
        return cfg


def prompt_ids(model, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: the chat template around it with chat, else as generate() encodes text."""
    tok = model._tok(chat)
    return tok.encode_chat([{"role": "user", "content": prompt}]) if chat else model._encode(prompt)


def target_ids(model, target: str, prompt: str | None = None) -> list[int]:
    """Token ids of a given target; TargetError when the tokenizer cannot produce exactly that text, or (given
    the plain prompt text) when it would not split prompt + target at the boundary: "import o" + "s" is
    tokenized "import", " os", so the model never continues "import o" with "s"."""
    tok = model._tok()
    if not target:
        raise TargetError("--target is empty: give the continuation to explain, or omit it to explain the "
                          "model's own greedy continuation")
    ids = tok.encode(target)
    back = tok.decode(ids)
    if back != target:
        at = next((i for i, (a, b) in enumerate(zip(back, target, strict=False)) if a != b), min(len(back),
                                                                                                   len(target)))
        raise TargetError(f"target {target!r} is not a continuation this tokenizer can produce: it decodes back "
                          f"as {back!r} (differs at character {at}: {target[at:at + 10]!r})")
    if prompt is not None and model._encode(prompt + target) != model._encode(prompt) + ids:
        whole = [tok.decode([i]) for i in model._encode(prompt + target)]
        raise TargetError(f"target {target!r} is not a continuation this tokenizer can produce after {prompt!r}: "
                          f"the whole text is tokenized {whole[-6:]} (last tokens), across the boundary; move the "
                          f"boundary to a token edge")
    return ids


def greedy_ids(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy continuation of ids, up to max_new_tokens, without the stop token."""
    from r1kit.generate import SamplingParams, generate_tokens

    stop = model.stop_ids()
    out = []
    for step in generate_tokens(model.model, [ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                                stop):
        t = step[0]
        if t is None or t in stop:
            break
        out.append(t)
    if not out:
        raise TargetError("the model's greedy continuation is empty (it stops at once): give a --target")
    return out


def explain(model, prompt: str, target: str | None = None, chat: bool = False, corrupt: str | None = None,
            config: ExplainConfig | None = None) -> dict[str, Any]:
    """All analyses of `prompt` -> its target (given, or the greedy continuation), as a JSON-ready dict.

    model: an R1Model (tokenizer needed). corrupt: a corrupted prompt of the same token length for activation
    patching (None: no patching).
    """
    cfg = config or ExplainConfig()
    tok, net = model._tok(chat), model.model
    p_ids = prompt_ids(model, prompt, chat)
    g_ids = (target_ids(model, target, None if chat else prompt) if target is not None
             else greedy_ids(model, p_ids, cfg.max_new_tokens))
    ids = torch.tensor([p_ids + g_ids], device=model.device)  # (1, N)
    P, N = len(p_ids), ids.shape[1]
    check_length(N, cfg.max_quadratic_tokens, "explain (rollout, flow, paths, patching, substitution)")
    names = [tok.decode([i]) for i in ids[0].tolist()]
    was_training = net.training
    net.eval()
    try:
        patterns = attribution.attention_patterns(net, ids)  # (L, H, N, N)
        result = {"prompt": prompt, "prompt_tokens": names[:P], "generated_tokens": names[P:],
                  "target_given": target is not None, "chat": chat,
                  "attributions": attributions(net, ids, P, patterns, cfg),
                  "paths": attribution.top_paths(patterns, P, cfg.top_paths),
                  "expert_routes": attribution.expert_routes(net, ids),
                  "ablation": {"metric": "summed target log-prob, ablated - clean", "how": cfg.ablation,
                               "heads": ablation.ablate_heads(net, ids, P, cfg.ablation),
                               "experts": ablation.ablate_experts(net, ids, P)},
                  "patching": _patching(model, net, p_ids, corrupt, chat, names),
                  "counterfactuals": _substitutions(net, ids[:, :P], tok, cfg),
                  "config": asdict(cfg)}
    finally:
        net.train(was_training)
    result["patterns"] = patterns  # tensor for the PNGs; `to_json` drops it
    return result


def attributions(net, ids: torch.Tensor, P: int, patterns: torch.Tensor, cfg: ExplainConfig) -> dict[str, list]:
    """{method: (G, P) nested lists, method + "_chained": the same passed through the generated tokens} for the
    configured methods (see attribution.chain_through_generation)."""
    run = {"rollout": lambda: attribution.attention_rollout(patterns, P, full=True),
           "flow": lambda: attribution.attention_flow(patterns, P, full=True),
           "grad_x_attention": lambda: attribution.grad_x_attention(net, ids, P, full=True),
           "integrated_gradients": lambda: attribution.integrated_gradients(net, ids, P, cfg.ig_steps, full=True)}
    out = {}
    for m in cfg.methods:
        full = run[m]()  # (G, N)
        for name, matrix in ((m, full[:, :P]), (f"{m}_chained", attribution.chain_through_generation(full, P))):
            out[name] = [[round(float(v), 6) for v in row] for row in matrix]
    return out


def _patching(model, net, p_ids: list[int], corrupt: str | None, chat: bool, names: list[str]) -> dict | None:
    if corrupt is None:
        return None
    c_ids = prompt_ids(model, corrupt, chat)
    out = counterfactual.activation_patching(net, torch.tensor([p_ids], device=model.device),
                                             torch.tensor([c_ids], device=model.device))
    tok = model._tok()
    return {"corrupted_prompt": corrupt, "corrupted_tokens": [tok.decode([i]) for i in c_ids],
            "clean_token": tok.decode([out["clean_token"]]), "corrupted_token": tok.decode([out["corrupted_token"]]),
            "logit_diff_clean": out["logit_diff_clean"], "logit_diff_corrupted": out["logit_diff_corrupted"],
            "effect": out["effect"], "rows": "layer (resid_pre)", "columns": "prompt position"}


def _substitutions(net, prompt: torch.Tensor, tok, cfg: ExplainConfig) -> list[dict]:
    """Single-token edits of the prompt's non-special tokens that change the next token, as strings."""
    positions = [p for p, t in enumerate(prompt[0].tolist()) if tok.decode([t], skip_special_tokens=True).strip()]
    edits = counterfactual.token_substitutions(net, prompt, positions, cfg.substitution_candidates)
    for e in edits:
        for key in ("from", "to", "new_token"):
            e[key] = tok.decode([e[key]])
    return edits[:20]


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its tensors (the attention patterns), ready for json.dumps."""
    return {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
