"""Multi-token prediction (DeepSeek-V3 §2.2): extra depth-d modules that predict token t + 1 + d.

Module d combines the previous depth's hidden state at position t with the embedding of token t + d:

    h_d(t) = Block(eh_proj([enorm(embed(x[t + d])); hnorm(h_{d-1}(t))]))
    logits_d(t) = lm_head(shared_head_norm(h_d(t)))        # predicts x[t + 1 + d]

The embedding and the output head are shared with the main model. Trained with an extra loss; at
inference the prediction is a draft for speculative decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from r1kit.model.attention import PagedBatch, RMSNorm


class MTPLayer(nn.Module):
    """One MTP depth around a transformer block built by the caller."""

    def __init__(self, dim: int, eps: float, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(dim, eps)
        self.hnorm = RMSNorm(dim, eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.shared_head_norm = RMSNorm(dim, eps)

    def forward(self, hidden: torch.Tensor, next_embed: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: tuple[torch.Tensor, ...] | None = None, pos: int = 0
                ) -> torch.Tensor:
        """hidden (B, T, C) from the previous depth, next_embed (B, T, C) embeddings of the shifted tokens.

        cache / pos: this depth's own KV buffers (from ``block.self_attn.new_cache``) and the number of
        positions already in them, for drafting one position at a time (`r1kit.engine.speculative`).
        """
        return self.block(self._combine(hidden, next_embed), rope, mask, cache, pos)

    def forward_paged(self, hidden: torch.Tensor, next_embed: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      batch: PagedBatch, kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The same on a flat packed batch (1, N, C) of several sequences with this depth's paged KV pool (the
        engine's speculative decoding, `r1kit.engine.spec_decode`)."""
        return self.block.forward_paged(self._combine(hidden, next_embed), rope, batch, kv)

    def _combine(self, hidden: torch.Tensor, next_embed: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(next_embed), self.hnorm(hidden)), dim=-1))
