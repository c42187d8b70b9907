"""CLIP's contrastive alignment: symmetric InfoNCE with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between paired rows of a (B, C) and b (B, C): row i of a matches row i of b.

    logits = exp(logit_scale) * normalize(a) @ normalize(b).T, with logit_scale learnable, initialised to
    log(1 / init_temperature) and clamped at log(max_scale) (CLIP: 1/0.07 and 100). The loss is the mean of the
    cross-entropies over rows (a -> b) and over columns (b -> a)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The current multiplier exp(logit_scale), at most max_scale."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, B) scaled cosine similarities, rows: a, columns: b."""
        return self.scale * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"contrastive pairs must be two (B, C) tensors of one shape, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}")
        logits = self.logits(a, b)
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
