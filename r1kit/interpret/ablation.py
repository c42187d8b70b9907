"""Importance by ablation: remove one attention head or one routed expert, measure the target's log-probability.

A head is ablated at its output z (blocks.{L}.attn.hook_z, before o_proj): "zero" sets it to 0, "mean" to its
mean over the sequence's positions. A routed expert is ablated by zeroing its router weight wherever it was
chosen (blocks.{L}.moe.hook_expert_weights): the token keeps its other experts, the shared expert and the
residual (only "zero" exists for experts). All heads of a layer run as one batch, as do all experts of a layer.
The metric is the summed log-probability of the target tokens (teacher-forced); delta = ablated - clean, so the
most negative delta is the most important component.
"""

from __future__ import annotations

import torch

from r1kit.interpret.attribution import token_logprobs
from r1kit.model.transformer import Transformer

ABLATIONS = ("zero", "mean")


def target_logprob(logits: torch.Tensor, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """logits (B, N, V), ids (1, N) -> summed log-prob (B,) of tokens n_prompt.. at their predicting positions."""
    return token_logprobs(logits, ids, n_prompt).sum(-1)


@torch.no_grad()
def ablate_heads(model: Transformer, ids: torch.Tensor, n_prompt: int, how: str = "zero") -> list[dict]:
    """ids (1, N) -> [{"layer", "head", "delta"}] for every head, most harmful ablation first."""
    if how not in ABLATIONS:
        raise ValueError(f"ablation {how!r}: expected one of {list(ABLATIONS)}")
    clean = float(target_logprob(model(ids), ids, n_prompt)[0])
    rows = []
    for layer in range(model.config.num_layers):
        H = model.config.num_heads

        def ablate(z: torch.Tensor, hook, H=H) -> torch.Tensor:  # z (H copies, N, H, dv): copy h loses head h
            z = z.clone()
            heads = torch.arange(H)
            z[heads, :, heads] = 0 if how == "zero" else z[heads, :, heads].mean(1, keepdim=True)
            return z

        logits = model.run_with_hooks(ids.expand(H, -1), hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
        deltas = target_logprob(logits, ids, n_prompt) - clean  # (H,)
        rows += [{"layer": layer, "head": h, "delta": float(deltas[h])} for h in range(H)]
    return sorted(rows, key=lambda r: r["delta"])


@torch.no_grad()
def ablate_experts(model: Transformer, ids: torch.Tensor, n_prompt: int) -> list[dict]:
    """ids (1, N) -> [{"layer", "expert", "delta", "tokens"}] for every routed expert of every MoE layer (tokens:
    how many of the N tokens chose it), most harmful first; [] for a dense model."""
    clean = float(target_logprob(model(ids), ids, n_prompt)[0])
    E, N = model.config.n_routed_experts, ids.shape[1]
    rows = []
    for layer in [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]:
        chosen = {}

        def remember(idx: torch.Tensor, hook, chosen=chosen) -> None:  # idx (E copies * N, k)
            chosen["idx"] = idx

        def ablate(w: torch.Tensor, hook, chosen=chosen) -> torch.Tensor:  # copy e drops expert e
            copy = torch.arange(w.shape[0], device=w.device) // N  # (E * N,)
            return w.masked_fill(chosen["idx"] == copy[:, None], 0.0)

        logits = model.run_with_hooks(ids.expand(E, -1), hooks=[(f"blocks.{layer}.moe.hook_topk_experts", remember),
                                                                (f"blocks.{layer}.moe.hook_expert_weights", ablate)])
        deltas = target_logprob(logits, ids, n_prompt) - clean  # (E,)
        used = torch.bincount(chosen["idx"][:N].flatten(), minlength=E)
        rows += [{"layer": layer, "expert": e, "delta": float(deltas[e]), "tokens": int(used[e])} for e in range(E)]
    return sorted(rows, key=lambda r: r["delta"])
