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
    each modality's embeddings by weight x (number present), so equal weights leave them unchanged."""

    def __init__(self, dim: int, cfg: GateConfig):
        super().__init__()
        self.config = cfg
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        self.bias = nn.Parameter(torch.zeros(len(MODALITIES)))
        nn.init.zeros_(self.score.weight)  # starts as the fixed gate
        nn.init.zeros_(self.score.bias)

    def forward(self, pooled: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """pooled (B, M, C), present (B, M) bool -> weights (B, M): 0 where absent, rows sum to one."""
        keep = present.clone()
        for name in self.config.ablate:
            keep[:, MODALITIES.index(name)] = False
        if self.config.mode == "fixed":
            scores = torch.zeros(present.shape, device=pooled.device)
        else:
            scores = self.score(self.norm(pooled)).squeeze(-1).float() + self.bias  # (B, M)
        scores = scores.masked_fill(~keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.nan_to_num(weights, nan=0.0)  # a row with nothing kept: all zeros

    def scales(self, weights: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The factor applied to each modality's embeddings (B, M): weight x number of modalities present."""
        return weights * present.sum(-1, keepdim=True).to(weights.dtype)
