"""Structured pruning: remove whole attention heads, MLP channels and MoE experts -> a genuinely smaller model.

The result is an ordinary checkpoint with smaller shapes in config.json (num_attention_heads, intermediate_size,
moe_intermediate_size, n_routed_experts): no masks, no special modules. Every block (decoder layers and the MTP
block) keeps the same counts, since the config has one value per shape, but each layer chooses its own survivors:

* heads: by the Frobenius norm of the head's columns of o_proj (what the head can write to the residual).
  MLA: rows of q_b_proj (q_proj) and kv_b_proj, columns of o_proj. GQA: whole key/value groups (a KV head and
  its query heads), so `heads` must be a multiple of num_heads / num_key_value_heads.
* MLP channels: by ||up row|| * ||down column|| per channel, per MLP and per routed expert (each expert keeps its
  own channels); the dense MLPs keep `mlp_keep` of intermediate_size, the experts (and the shared expert, whose
  width is moe_intermediate_size * n_shared_experts) `mlp_keep` of moe_intermediate_size, rounded up to a
  multiple of 32 (so that int4 can still quantize them).
* experts: by routing frequency ("frequency": tokens routed to the expert on calibration text) or by output-norm
  importance ("norm": the sum over its tokens of routing weight * ||expert output||). The router keeps the
  survivors' rows and balancing biases; group-limited routing (n_group > 1) becomes plain top-k over the
  survivors (n_group = topk_group = 1), recorded in the compression record. With expert_reduce="merge" the
  others are merged into the most similar survivors instead (r1kit.compress.merge), the router re-mapped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from r1kit.compress.merge import merge_experts
from r1kit.model.attention import GQAttention, MLAttention
from r1kit.model.moe import MLP, MoE
from r1kit.model.transformer import Block, Transformer

CHANNEL_MULTIPLE = 32


def _blocks(model: Transformer) -> dict[str, Block]:
    """state_dict prefix -> block, for the decoder layers and the MTP blocks."""
    out = {f"layers.{i}.": b for i, b in enumerate(model.layers)}
    out.update({f"mtp.{i}.block.": m.block for i, m in enumerate(model.mtp)})
    return out


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in increasing index order (the survivors keep their order)."""
    return scores.topk(keep).indices.sort().values


def _block_rows(n_blocks: int, width: int, keep: torch.Tensor) -> torch.Tensor:
    """Row indices of the kept blocks of `width` rows (heads, groups) out of n_blocks."""
    return (keep[:, None] * width + torch.arange(width)).flatten()


def _prune_heads(sd: dict[str, torch.Tensor], p: str, attn: nn.Module, heads: int) -> None:
    o = sd[p + "o_proj.weight"]  # (C, H * v)
    if isinstance(attn, MLAttention):
        h, v, qk = attn.n_heads, attn.v_dim, attn.nope + attn.rope
        keep = _top(o.float().view(o.shape[0], h, v).norm(dim=(0, 2)), heads)
        q = p + ("q_b_proj.weight" if attn.q_lora_rank else "q_proj.weight")
        sd[q] = sd[q][_block_rows(h, qk, keep)]
        sd[p + "kv_b_proj.weight"] = sd[p + "kv_b_proj.weight"][_block_rows(h, attn.nope + v, keep)]
        sd[p + "o_proj.weight"] = o[:, _block_rows(h, v, keep)]
        return
    h, kv, d = attn.n_heads, attn.n_kv, attn.head_dim
    per = h // kv  # query heads per KV group
    if heads % per:
        raise ValueError(f"prune-structured: heads={heads} must be a multiple of {per} (query heads per key/value "
                         f"head, {h} / {kv}): GQA heads are removed a whole key/value group at a time")
    keep = _top(o.float().view(o.shape[0], kv, per * d).norm(dim=(0, 2)), heads // per)  # kept KV groups
    for name in ("q_proj", "k_proj", "v_proj"):
        width = per * d if name == "q_proj" else d
        for suffix in ("weight", "bias"):
            if p + f"{name}.{suffix}" in sd:
                sd[p + f"{name}.{suffix}"] = sd[p + f"{name}.{suffix}"][_block_rows(kv, width, keep)]
    sd[p + "o_proj.weight"] = o[:, _block_rows(kv, per * d, keep)]


def _channel_scores(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up (I, C), down (C, I) -> (I,) ||up row|| * ||down column||."""
    return up.float().norm(dim=1) * down.float().norm(dim=0)


def _prune_mlp(sd: dict[str, torch.Tensor], p: str, keep_n: int) -> None:
    up, down = sd[p + "up_proj.weight"], sd[p + "down_proj.weight"]
    keep = _top(_channel_scores(up, down), keep_n)
    for name in ("gate_proj", "up_proj"):
        sd[p + f"{name}.weight"] = sd[p + f"{name}.weight"][keep]
    sd[p + "down_proj.weight"] = down[:, keep]


def _prune_expert_channels(sd: dict[str, torch.Tensor], p: str, hidden: int, keep_n: int) -> None:
    gu, dn = sd[p + "gate_up_proj"], sd[p + "down_proj"]  # (E, 2I, C), (E, C, I)
    new_gu, new_dn = [], []
    for e in range(gu.shape[0]):
        keep = _top(_channel_scores(gu[e, hidden:], dn[e]), keep_n)
        new_gu.append(torch.cat((gu[e, keep], gu[e, hidden + keep])))
        new_dn.append(dn[e][:, keep])
    sd[p + "gate_up_proj"], sd[p + "down_proj"] = torch.stack(new_gu), torch.stack(new_dn)


@torch.no_grad()
def expert_importance(model: Transformer, ids: torch.Tensor, score: str,
                      inputs: dict[str, torch.Tensor] | None = None, max_rows: int = 1024) -> dict[str, torch.Tensor]:
    """MoE prefix -> (E,) importance of each expert on calibration tokens ids (B, T): "frequency" (tokens routed
    to it) or "norm" (sum of routing weight * ||expert output|| over its tokens). With `inputs`, also fills it
    with MoE prefix -> up to max_rows (N, C) of the layer's inputs, spread over the calibration tokens."""
    if score not in ("frequency", "norm"):
        raise ValueError(f"expert_score must be 'frequency' or 'norm', got {score!r}")
    found: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, MoE)}

    def hook(moe: MoE, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        flat = args[0].reshape(-1, args[0].shape[-1])  # (N, C)
        weights, idx = moe.gate.route(moe.gate.score(flat))  # (N, k) each
        imp = torch.zeros(moe.experts.n_experts)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if score == "frequency":
                imp[e] = tok.numel()
            else:
                y = moe.experts(flat[tok], torch.ones(tok.numel(), 1), torch.full((tok.numel(), 1), e))  # (R, C)
                imp[e] = (weights[tok, slot].float() * y.float().norm(dim=-1)).sum()
        prefix = names[moe] + "."
        found[prefix] = found.get(prefix, torch.zeros_like(imp)) + imp
        if inputs is not None:
            inputs[prefix] = flat[:: max(1, flat.shape[0] // max_rows)][:max_rows].detach().clone()

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        _, hidden = model(ids, return_hidden=True)
        if len(model.mtp):  # the MTP block's MoE sees the last hidden states and the next tokens
            model.mtp_logits(hidden, ids)
    finally:
        for h in handles:
            h.remove()
    return found


def _prune_experts(sd: dict[str, torch.Tensor], p: str, importance: torch.Tensor, keep_n: int) -> None:
    keep = _top(importance, keep_n)
    for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight", "gate.e_score_correction_bias"):
        if p + name in sd:
            sd[p + name] = sd[p + name][keep]


def _new_sizes(cfg: Any, heads: int | None, mlp_keep: float | None, experts: int | None) -> dict[str, Any]:
    """The config fields that change, checked against the model's."""
    def channels(n: int) -> int:
        k = max(1, round(mlp_keep * n))
        return min(n, -(-k // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE) if n >= CHANNEL_MULTIPLE else k

    new: dict[str, Any] = {}
    if heads is not None:
        if not 1 <= heads <= cfg.num_heads:
            raise ValueError(f"prune-structured: heads={heads} must be in [1, {cfg.num_heads}] (num_attention_heads)")
        new["num_heads"] = heads
        if cfg.attention == "gqa":
            new.update(num_kv_heads=heads // (cfg.num_heads // cfg.num_kv_heads), head_dim=cfg.gqa_head_dim)
    if mlp_keep is not None:
        if not 0.0 < mlp_keep <= 1.0:
            raise ValueError(f"prune-structured: mlp_keep={mlp_keep} must be in (0, 1]")
        new["intermediate_size"] = channels(cfg.intermediate_size)
        if cfg.n_routed_experts:
            new["moe_intermediate_size"] = channels(cfg.moe_intermediate_size)
    if experts is not None:
        if not cfg.n_routed_experts:
            raise ValueError("prune-structured: experts= given, but the model has no routed experts")
        if not max(1, cfg.num_experts_per_tok) <= experts <= cfg.n_routed_experts:
            raise ValueError(f"prune-structured: experts={experts} must be in [{cfg.num_experts_per_tok} "
                             f"(num_experts_per_tok), {cfg.n_routed_experts}]")
        new["n_routed_experts"] = experts
        if experts != cfg.n_routed_experts and cfg.n_group > 1:
            new.update(n_group=1, topk_group=1)
    return new


@torch.no_grad()
def prune_structured(model: Transformer, heads: int | None = None, mlp_keep: float | None = None,
                     experts: int | None = None, expert_score: str = "frequency",
                     calibration: torch.Tensor | None = None, expert_reduce: str = "drop"
                     ) -> tuple[Transformer, dict[str, Any]]:
    """A new, smaller Transformer: `heads` attention heads per layer, `mlp_keep` of the MLP channels, `experts`
    routed experts per MoE layer (ranked on `calibration` token ids (B, T); the others dropped, or with
    expert_reduce="merge" merged into the kept ones: r1kit.compress.merge). Returns (model, what changed)."""
    cfg = model.config
    if cfg.sparse_attention is not None:
        raise ValueError("prune-structured: sparse-attention models are not supported")
    new = _new_sizes(cfg, heads, mlp_keep, experts)
    if experts is not None and calibration is None:
        raise ValueError("prune-structured: pruning experts needs calibration token ids")
    if expert_reduce not in ("drop", "merge"):
        raise ValueError(f"prune-structured: expert_reduce must be 'drop' or 'merge', got {expert_reduce!r}")
    inputs: dict[str, torch.Tensor] | None = {} if expert_reduce == "merge" else None
    importance = expert_importance(model, calibration, expert_score, inputs) if experts is not None else {}
    merged: dict[str, Any] = {}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p, block in _blocks(model).items():
        if heads is not None:
            _prune_heads(sd, p + "self_attn.", block.self_attn, heads)
        mlp = block.mlp
        if isinstance(mlp, MLP) and mlp_keep is not None:
            _prune_mlp(sd, p + "mlp.", new["intermediate_size"])
        if isinstance(mlp, MoE):
            if experts is not None and inputs is not None:
                merged[p + "mlp."] = merge_experts(sd, p + "mlp.", importance[p + "mlp."], experts, inputs[p + "mlp."])
            elif experts is not None:
                _prune_experts(sd, p + "mlp.", importance[p + "mlp."], experts)
            if mlp_keep is not None:
                _prune_expert_channels(sd, p + "mlp.experts.", mlp.experts.hidden, new["moe_intermediate_size"])
                if mlp.shared_experts is not None:
                    _prune_mlp(sd, p + "mlp.shared_experts.", new["moe_intermediate_size"] * cfg.n_shared_experts)
    if not isinstance(model.layers[0].self_attn, (MLAttention, GQAttention)):
        raise ValueError("prune-structured: unsupported attention module")
    new_cfg = cfg.replace(**new)
    pruned = Transformer(new_cfg)
    pruned.load_state_dict(sd)
    if cfg.tie_word_embeddings:
        pruned.lm_head.weight = pruned.embed_tokens.weight
    report = {"config": {k: v for k, v in new.items()},
              "params_before": model.num_params(), "params_after": pruned.num_params()}
    if merged:
        report["merged_experts"] = merged  # MoE prefix -> {kept expert: [experts merged into it]}
    if importance:
        report["expert_importance"] = {p: [round(float(x), 4) for x in v] for p, v in importance.items()}
    return pruned.cast(model.embed_tokens.weight.dtype).eval(), report
