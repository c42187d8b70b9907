"""The r1kit transformer, top to bottom: embedding -> blocks (attention + MLP or MoE) -> norm -> head.

One model class serves every family. What differs is data in ModelConfig: GQA or MLA attention, dense
or DeepSeekMoE feed-forward per layer, RoPE flavour, tied embeddings, MTP depth. Parameter names follow
the Hugging Face checkpoints (without the leading "model."), so the checkpoint map stays small.

Shapes: B batch, T new tokens, S = cached + new tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from r1kit.model.attention import (
    KVCache,
    MLAttention,
    PagedBatch,
    RMSNorm,
    RotaryEmbedding,
    attention_mask,
    document_mask,
    document_positions,
)
from r1kit.model.config import ModelConfig
from r1kit.model.hooks import HookFn, HookPoint, hook_points, run_with_cache, run_with_hooks
from r1kit.model.moe import MLP, CrossExpertAttention, Experts, MoE, Router
from r1kit.model.mtp import MTPLayer
from r1kit.model.sparse_attention import GlobalTokens, make_attention

# Kept in fp32 whatever the model dtype: routing decisions are sensitive (the references do the same).
FP32_TENSORS = re.compile(r"mlp\.gate\.(weight|e_score_correction_bias)$")


class ContextLengthError(ValueError):
    """A sequence does not fit in the context (the model's or the cache's)."""


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool, sparse: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = make_attention(cfg, sparse)  # GQA or MLA; sparse: cfg.sparse_attention's pattern
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        # identities until r1kit.model.hooks attaches a function (blocks.{L}.hook_*)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, ...] | None = None, pos: int = 0) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.self_attn(self.input_layernorm(x), rope, mask, cache, pos)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))

    def forward_paged(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: PagedBatch,
                      kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The same block on a flat packed batch x (1, N, C) with this layer's paged KV pool."""
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.self_attn.forward_paged(self.input_layernorm(x), rope,
                                                                                     batch, kv)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(ids, cache)`` -> logits; the cache, when given, advances by T."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i), cfg.is_sparse_layer(i))
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        moe_mtp = cfg.n_routed_experts > 0
        self.mtp = nn.ModuleList(MTPLayer(cfg.hidden_size, cfg.rms_norm_eps, Block(cfg, moe_mtp))
                                 for _ in range(cfg.num_mtp_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.hook_embed = HookPoint()  # the token embeddings (B, T, C); the rest: blocks.{L}.* (r1kit.model.hooks)
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing activations

    # ------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> Transformer:
        """Random initialisation: normal(0, initializer_range) matrices, unit norms, zero biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Experts):
                for p in (module.gate_up_proj, module.down_proj):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif isinstance(module, Router):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, CrossExpertAttention):
                module.reset_parameters(std, gen)
            elif isinstance(module, GlobalTokens):
                module.reset_parameters(gen)
        return self

    def num_params(self) -> int:
        """Distinct parameters held (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """Preallocated KV buffers for `batch` rows of up to `max_len` slots (left padding + prompt + new)."""
        p = self.embed_tokens.weight
        layers = [layer.self_attn.new_cache(batch, max_len, p.dtype, p.device) for layer in self.layers]
        return KVCache(layers=layers, max_len=max_len, pad=pad, min_pad=int(pad.min()) if pad is not None else 0)

    def new_paged_cache(self, num_slots: int, device: torch.device | str | None = None
                        ) -> list[tuple[torch.Tensor, ...]]:
        """Per-layer paged KV pools of num_slots flat slots (num_blocks * block_size), in the model's dtype.

        GQA: (k, v), each (num_slots, num_kv_heads, head_dim); MLA: (latent + rotary key,) of
        (num_slots, kv_lora_rank + qk_rope_head_dim). ``device="meta"`` sizes them without allocating.
        """
        p = self.embed_tokens.weight
        device = p.device if device is None else torch.device(device)
        return [layer.self_attn.new_paged_cache(num_slots, p.dtype, device) for layer in self.layers]

    def cast(self, dtype: torch.dtype) -> Transformer:
        """Cast the weights to dtype, keeping the routing weights and balancing bias in fp32 (as loading does)."""
        for name, t in [*self.named_parameters(), *self.named_buffers()]:
            quantized = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name.endswith(("_scale", "_zero"))
            if t.is_floating_point() and not quantized:  # quantized weights keep their storage format
                t.data = t.data.float() if FP32_TENSORS.search(name) else t.data.to(dtype)
        return self

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                return_hidden: bool = False, doc_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only.

        With a cache the T tokens are placed after the cache.pos tokens already there, and cache.pos
        advances by T. With return_hidden, also returns the final hidden states before the norm (B, T, C),
        which the MTP modules consume. doc_ids (B, T), for packed training rows without a cache: each token
        attends only within its own document and positions restart at each document (see document_mask).
        inputs_embeds (B, T, C), when given, replaces embed_tokens(ids): the token embeddings with media
        embeddings merged in at their placeholders (r1kit.multimodal); ids then only give the shape.
        """
        if doc_ids is not None:
            if cache is not None or last_only:
                raise ValueError("doc_ids (packed training rows) takes neither a KV cache nor last_only")
            return self._forward_packed(ids, doc_ids, return_hidden)
        B, T = ids.shape
        pos = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        if cache is not None and pos + T > cache.max_len:
            raise ContextLengthError(f"{pos + T} tokens do not fit in a KV cache of {cache.max_len}")
        longest = pos + T - (cache.min_pad if cache is not None else 0)
        if longest > self.config.max_position_embeddings:
            raise ContextLengthError(f"{longest} tokens exceed the model's context "
                                     f"(max_position_embeddings = {self.config.max_position_embeddings})")
        positions = torch.arange(pos, pos + T, device=ids.device)[None]  # (1, T)
        if pad is not None:
            positions = (positions - pad[:, None]).clamp(min=0)  # (B, T): left padding shifts each row
        x = self.hook_embed(self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds)  # (B, T, C)
        rope = self.rotary(positions, x.dtype)
        mask = attention_mask(B, T, pos, pad, ids.device)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache.layers[i] if cache is not None else None, pos)
        if cache is not None:
            cache.pos += T
        hidden = x
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        return (logits, hidden) if return_hidden else logits

    def _forward_packed(self, ids: torch.Tensor, doc_ids: torch.Tensor, return_hidden: bool
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """forward() of packed rows: ids, doc_ids (B, T) -> logits (B, T, V) as if each document ran alone."""
        if doc_ids.shape != ids.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of ids {tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ContextLengthError(f"{ids.shape[1]} tokens exceed the model's context "
                                     f"(max_position_embeddings = {self.config.max_position_embeddings})")
        x = self.embed_tokens(ids)  # (B, T, C)
        rope = self.rotary(document_positions(doc_ids), x.dtype)
        mask = document_mask(doc_ids)  # (B, 1, T, T)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, None, 0)
        logits = self.lm_head(self.norm(x))
        return (logits, x) if return_hidden else logits

    def forward_paged(self, ids: torch.Tensor, batch: PagedBatch, kv_pool: list[tuple[torch.Tensor, ...]],
                      return_hidden: bool = False, inputs_embeds: torch.Tensor | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (N,) flat packed tokens of several sequences -> logits (M, V) of the rows batch.logits_rows
        (all N rows when None). Writes the tokens' KV into kv_pool (from new_paged_cache) at
        batch.slot_mapping; RoPE per token position. No MTP, no cache object: the engine owns the slots.
        With return_hidden, also the final hidden states of all N rows before the norm (N, C), for the MTP.
        inputs_embeds (N, C), when given, replaces embed_tokens(ids) (media merged at placeholders)."""
        if batch.max_ctx_len > self.config.max_position_embeddings:
            raise ContextLengthError(f"{batch.max_ctx_len} tokens exceed the model's context "
                                     f"(max_position_embeddings = {self.config.max_position_embeddings})")
        x = self.hook_embed((self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds)[None])  # (1, N, C)
        rope = self.rotary(batch.positions[None], x.dtype)  # (1, N, D/2) each
        for layer, kv in zip(self.layers, kv_pool, strict=True):
            x = layer.forward_paged(x, rope, batch, kv)
        hidden = x[0]
        x = hidden if batch.logits_rows is None else hidden.index_select(0, batch.logits_rows)
        logits = self.lm_head(self.norm(x))
        return (logits, hidden) if return_hidden else logits

    def mtp_logits(self, hidden: torch.Tensor, ids: torch.Tensor, doc_ids: torch.Tensor | None = None
                   ) -> list[torch.Tensor]:
        """MTP predictions without a cache. hidden (B, T, C) from forward(return_hidden=True), ids (B, T).

        Returns one logits tensor per depth d (B, T - 1 - d, V): position t predicts token t + 2 + d. With
        doc_ids (B, T) of packed rows, attention and positions stay within each document (the caller masks
        the predictions whose target lies in the next document).
        """
        B, T = ids.shape
        logits = []
        h = hidden
        for d, layer in enumerate(self.mtp):
            n = T - 1 - d  # positions that still have a next token to embed
            if n <= 0:
                break
            positions = torch.arange(n, device=ids.device)[None]
            mask = None
            if doc_ids is not None:
                positions, mask = document_positions(doc_ids[:, :n]), document_mask(doc_ids[:, :n])
            rope = self.rotary(positions, h.dtype)
            h = layer(h[:, :n], self.embed_tokens(ids[:, 1 + d:1 + d + n]), rope, mask)
            logits.append(self.lm_head(layer.shared_head_norm(h)))
        return logits

    def loss(self, ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of logits(ids) against targets (B, T)."""
        logits = self(ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    # ------------------------------------------------------------------------------------------ hooks
    def hook_points(self) -> dict[str, HookPoint]:
        """Every named hook point ("blocks.0.attn.hook_pattern", ...); see r1kit.model.hooks."""
        return hook_points(self)

    def run_with_hooks(self, ids: torch.Tensor, hooks: list[tuple[str, HookFn]], **kwargs) -> torch.Tensor:
        """forward(ids, **kwargs) with hooks = [(name, fn(tensor, hook) -> tensor | None)] attached for this call."""
        return run_with_hooks(self, ids, hooks, **kwargs)

    def run_with_cache(self, ids: torch.Tensor, names=None, detach: bool = True, **kwargs
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {name: activation}) of forward(ids, **kwargs); names: None (all), a list or a filter."""
        return run_with_cache(self, ids, names, detach, **kwargs)

    def set_mla_impl(self, impl: str) -> None:
        """Choose the MLA path: "naive", "absorb" or "auto" (absorb when decoding)."""
        if impl not in ("naive", "absorb", "auto"):
            raise ValueError(f"MLA impl must be 'naive', 'absorb' or 'auto', not {impl!r}")
        for m in self.modules():
            if isinstance(m, MLAttention):
                m.impl = impl
