"""Low-rank factorisation (truncated SVD) of linear layers, and weight clustering (palettisation).

low-rank: W (N, K) = U S V^T; keeping the r largest singular values gives W_r = B A with B = U_r S_r^1/2 (N, r),
    A = S_r^1/2 V_r^T (r, K), and the error ||W - W_r||_F^2 = sum_{i > r} s_i^2 exactly (Eckart-Young), which
    ``factorize`` returns as its prediction. The rank is given (`rank`), or the smallest that keeps a fraction
    `energy` of sum s_i^2, or the largest whose factors take at most `target` of the matrix's numbers. A layer
    is only factorised when r (N + K) < N K (fewer numbers and multiply-adds); the others stay dense.
cluster: per output row (and per group of `group` inputs), 1-D k-means with k <= 16 centroids initialised at
    the quantiles and refined by Lloyd iterations; each weight becomes a 4-bit index into its row's codebook.

Both apply to the nn.Linear layers of the blocks and the output head (not the stacked MoE experts, not MLA's
kv_b_proj, whose weight the absorbed decode path reads as a matrix, not a head tied to the embedding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r1kit.model.attention import MLAttention
from r1kit.quant.compressed import CLUSTER_LEVELS, ClusteredLinear, LowRankLinear, set_module


def factorable(model: nn.Module) -> dict[str, nn.Linear]:
    """name -> linear layer that low-rank and clustering apply to."""
    tied = getattr(getattr(model, "embed_tokens", None), "weight", None)
    out = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or child.weight is tied:
                continue
            if isinstance(parent, MLAttention) and child_name == "kv_b_proj":
                continue
            out[name] = child
    return out


def choose_rank(s: torch.Tensor, n: int, k: int, rank: int | None, energy: float | None, target: float | None,
                name: str) -> int:
    """The rank for singular values s of an (n, k) matrix (see the module docstring)."""
    full = min(n, k)
    if rank is not None:
        if not 1 <= rank < full:
            raise ValueError(f"low-rank: rank={rank} must be in [1, {full}) for {name} ({n} x {k}): a rank of "
                             f"{full} or more is the matrix itself")
        return rank
    if energy is not None:
        if not 0.0 < energy < 1.0:
            raise ValueError(f"low-rank: energy={energy} must be in (0, 1)")
        kept = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum().clamp_min(1e-300)
        return min(full, int((kept < energy).sum()) + 1)
    if target is None or not 0.0 < target < 1.0:
        raise ValueError(f"low-rank: target={target} must be in (0, 1) (fraction of the layer's numbers)")
    return max(1, math.floor(target * n * k / (n + k)))


@torch.no_grad()
def factorize(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """w (N, K) -> B (N, r), A (r, K), predicted ||w - B A||_F^2 (the sum of the dropped s_i^2)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    return b.float(), a.float(), float((s[r:] ** 2).sum())


@torch.no_grad()
def low_rank(model: nn.Module, rank: int | None = None, energy: float | None = None,
             target: float | None = None) -> dict[str, dict]:
    """Factorise the model's linear layers in place; returns name -> {rank, predicted_error, relative_error}
    for the factorised ones (relative_error = ||W - W_r||_F / ||W||_F)."""
    if sum(x is not None for x in (rank, energy, target)) != 1:
        raise ValueError("low-rank: give exactly one of rank, energy, target")
    done = {}
    for name, lin in factorable(model).items():
        w = lin.weight.detach().float()
        n, k = w.shape
        r = choose_rank(torch.linalg.svdvals(w.double()), n, k, rank, energy, target, name)
        if r * (n + k) >= n * k:
            continue
        b, a, err = factorize(w, r)
        new = LowRankLinear(k, n, r, lin.bias is not None, w.device, lin.weight.dtype)
        new.weight_a.copy_(a)
        new.weight_b.copy_(b)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
        set_module(model, name, new)
        done[name] = {"rank": r, "predicted_error": err,
                      "relative_error": math.sqrt(err) / max(float(w.norm()), 1e-30)}
    return done


@torch.no_grad()
def kmeans_rows(w: torch.Tensor, k: int, iters: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means per row: w (R, M) -> indices (R, M) int64 in [0, k), centroids (R, k) fp32."""
    w = w.float()
    q = torch.linspace(0.5 / k, 1 - 0.5 / k, k)
    cent = torch.quantile(w, q, dim=1).T.contiguous()  # (R, k)
    for _ in range(iters):
        idx = (w[:, :, None] - cent[:, None, :]).abs().argmin(-1)  # (R, M)
        sums = torch.zeros_like(cent).scatter_add_(1, idx, w)
        counts = torch.zeros_like(cent).scatter_add_(1, idx, torch.ones_like(w))
        cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
    idx = (w[:, :, None] - cent[:, None, :]).abs().argmin(-1)
    return idx, cent


@torch.no_grad()
def cluster(model: nn.Module, clusters: int = 16, group: int | None = None, iters: int = 15) -> dict[str, dict]:
    """Palettise the model's linear layers in place (ClusteredLinear); returns name -> {group, relative_error}."""
    if not 2 <= clusters <= CLUSTER_LEVELS:
        raise ValueError(f"cluster: clusters={clusters} must be in [2, {CLUSTER_LEVELS}] (4-bit indices)")
    done = {}
    for name, lin in factorable(model).items():
        w = lin.weight.detach().float()
        n, k = w.shape
        g = group or k
        if k % 2 or k % g:
            continue
        idx, cent = kmeans_rows(w.reshape(n * (k // g), g), clusters, iters)  # one codebook per (row, group)
        book = torch.zeros(n * (k // g), CLUSTER_LEVELS)
        book[:, :clusters] = cent
        new = ClusteredLinear.from_parts(idx.reshape(n, k), book.view(n, k // g, CLUSTER_LEVELS), lin.bias)
        set_module(model, name, new)
        done[name] = {"group": g, "relative_error": float((new.dequantize() - w).norm() / w.norm().clamp_min(1e-30))}
    return done
