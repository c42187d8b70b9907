"""Into the language model's space: the LLaVA-1.5 projector and the modality gate.

Shapes: B batch, N embeddings, D encoder width, C the language model's hidden size, M modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.multimodal.config import MODALITIES, GateConfig


class Projector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear(D, C) -> GELU -> Linear(C, C), applied to every embedding."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (..., D) -> (..., C)


class ModalityGate(nn.Module):
    """Per-sample weights over the modalities present (text, image, audio), summing to one.

    Each modality's pooled embedding (B, M, C) gets a score (LayerNorm -> Linear(C, 1) plus a per-modality bias);
    the weights are a softmax over the present ones (B, M). ``fixed`` mode: equal weights over the present
    modalities. ``ablate``: those modalities get weight 0 and the others are renormalised. The model scales
    each modality's embeddings by weight x (number present), so equal weights leave them unchanged.

    ``per_token`` mode: every position gets its own weights over the present modalities (B, T, M), from its
    embedding (LayerNorm -> Linear(C, M) plus the per-modality bias), and is scaled by its own modality's weight
    x (number present); the per-sample weights reported are their mean over the positions."""

    def __init__(self, dim: int, cfg: GateConfig):
        super().__init__()
        self.config = cfg
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        self.bias = nn.Parameter(torch.zeros(len(MODALITIES)))
        nn.init.zeros_(self.score.weight)  # starts as the fixed gate
        nn.init.zeros_(self.score.bias)
        if cfg.mode == "per_token":  # only then: per-sample gates' saved weights stay loadable as they are
            self.token_score = nn.Linear(dim, len(MODALITIES))
            nn.init.zeros_(self.token_score.weight)  # starts as the fixed gate too
            nn.init.zeros_(self.token_score.bias)

    def kept(self, present: torch.Tensor) -> torch.Tensor:
        """present (..., M) without the ablated modalities."""
        keep = present.clone()
        for name in self.config.ablate:
            keep[..., MODALITIES.index(name)] = False
        return keep

    def forward(self, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """pooled (B, M, C), present (B, M) bool -> weights (B, M): 0 where absent, rows sum to one."""
        if self.config.mode in ("fixed", "per_token"):  # per_token's per-sample weights: see token_weights
            scores = torch.zeros(present.shape, device=pooled.device)
        else:
            scores = self.score(self.norm(pooled)).squeeze(-1).float() + self.bias  # (B, M)
        return masked_softmax(scores, self.kept(present))

    def token_weights(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """per_token mode: embeddings x (B, T, C), present (B, M) -> weights (B, T, M), each position's summing to
        one over the present (and not ablated) modalities."""
        scores = self.token_score(self.norm(x)).float() + self.bias  # (B, T, M)
        return masked_softmax(scores, self.kept(present)[:, None, :].expand_as(scores))

    def scales(self, weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The factor applied to each modality's embeddings (B, M): weight x number of modalities present."""
        return weights * present.sum(-1, keepdim=True).to(weights.dtype)


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension where keep is set; 0 elsewhere, and all zeros where nothing is kept."""
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0)
