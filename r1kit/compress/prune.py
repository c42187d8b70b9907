"""Magnitude pruning: unstructured (global or per tensor) and 2:4 semi-structured, as masks on the weights.

The pruned tensors are the matrices of the blocks (attention and MLP linears, the stacked MoE experts, the MTP
block); embeddings, the output head, norms and the router are kept. ``prune_masks`` returns one boolean mask per
pruned tensor (True = kept) and zeroes the weights; ``keep_masked`` makes a later fine-tune keep them zero
(the masked gradients are zero, so AdamW's update and decoupled weight decay leave a zero weight at zero).
"""

from __future__ import annotations

import torch
from torch import nn

from r1kit.model.moe import Experts


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> weight of every matrix pruning applies to (the blocks' linears and stacked experts)."""
    out: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if not name.startswith(("layers.", "mtp.")):
            continue
        if isinstance(m, nn.Linear):
            out[f"{name}.weight"] = m.weight
        elif isinstance(m, Experts):
            out[f"{name}.gate_up_proj"], out[f"{name}.down_proj"] = m.gate_up_proj, m.down_proj
    return out


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def _global_threshold(weights: dict[str, nn.Parameter], sparsity: float) -> float:
    """The |w| below which a `sparsity` fraction of all the weights lie (one cut across every tensor)."""
    mags = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
    k = int(sparsity * mags.numel())
    return float(mags.kthvalue(k).values) if k > 0 else -1.0


def magnitude_masks(weights: dict[str, nn.Parameter], sparsity: float, scope: str = "global"
                    ) -> dict[str, torch.Tensor]:
    """Keep the largest |w|: over all tensors at once (scope "global") or within each tensor ("layer")."""
    check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    cut = _global_threshold(weights, sparsity) if scope == "global" else None
    masks = {}
    for name, w in weights.items():
        mag = w.detach().abs().float()
        if cut is None:
            k = int(sparsity * mag.numel())
            t = float(mag.flatten().kthvalue(k).values) if k > 0 else -1.0
        else:
            t = cut
        masks[name] = mag > t
    return masks


def two_four_masks(weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """2:4 sparsity: in every run of 4 consecutive inputs, keep the 2 largest |w| (the pattern of sparse tensor
    cores). Tensors whose input size is not a multiple of 4 are refused by name."""
    masks = {}
    for name, w in weights.items():
        k = w.shape[-1]
        if k % 4:
            raise ValueError(f"prune-2:4: {name} has {k} inputs, not a multiple of 4")
        groups = w.detach().abs().float().reshape(*w.shape[:-1], k // 4, 4)  # (..., K/4, 4)
        top = groups.topk(2, dim=-1).indices
        masks[name] = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(w.shape)
    return masks


def is_two_four(w: torch.Tensor) -> bool:
    """Whether every run of 4 consecutive inputs of w (..., K) holds at most 2 non-zeros."""
    return bool(((w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1) <= 2).all())


@torch.no_grad()
def apply_masks(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].dtype))


def keep_masked(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of every pruned weight, so that fine-tuning keeps it at zero."""
    for name, mask in masks.items():
        weights[name].register_hook(lambda g, m=mask: g * m.to(g.dtype))


def sparsity_of(weights: dict[str, nn.Parameter]) -> float:
    """Fraction of exact zeros over the tensors."""
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / max(1, sum(w.numel() for w in weights.values()))
