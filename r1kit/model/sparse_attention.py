"""Sparse attention: a local-global dual path with a dynamic sliding window, and top-k block selection.

ModelConfig.sparse_attention picks the option for the layers in ``sparse_layers`` (None: every layer). Both
keep the projections (and parameter names) of the layer's GQA or MLA attention and its ``forward`` signature
(see r1kit/model/attention.py); only which keys each query reads changes. Positions below are token indices
in the sequence (the cache slot), B = sparse_block_size, d = t - s the distance from query t back to key s.

local_global
  Key s is visible to query t (s <= t) when
    * it is in t's block (s // B == t // B): block-local causal attention, or
    * d <= w_base (sparse_window_base): a sliding window across block edges, or
    * w_base < d <= w_max (sparse_window_max), with the logit bias  log sigmoid((w - d) / tau),
          w = w_base + (w_max - w_base) * a,   tau = max(1, (w_max - w_base) / 8),
      where a in (0, 1) is an importance score, sigmoid of a learned linear map of the hidden state (one
      score per kv head). Rule "key" (sparse_importance): a = a(s), an important token stays visible
      further ahead; rule "query": a = a(t), an important query looks further back; rule "none": no
      scorer and a hard window of w_base. The soft edge keeps the scorer trainable; beyond w_max nothing
      is visible, so a decode cache needs only the last max(w_max, B - 1) keys (a ring buffer).
  Plus G global tokens per layer (sparse_global_tokens): learned hidden states that the layer's own
  projections turn into a query per head and a key and value per kv head. They have no position: wherever
  a global token meets a token it is rotated to that token's position (relative distance 0), so its
  matching is by content only. Every query attends to their G keys, in the same softmax as its local keys.
  A global token "attends to everything" causally: for a query at t (head h) its value is its own head-h
  attention over its own key and all keys s <= t,
      value_g(t) = (e^{q_g.k_g} v_g + sum_{s<=t} e^{q_g.k_s} v_s) / (e^{q_g.k_g} + sum_{s<=t} e^{q_g.k_s})
  (scores scaled like the layer's), so it carries information from any distance in one hop. The decode
  cache keeps it as an online-softmax state (max, sum, weighted value sum): O(H * G * D) per layer,
  whatever the context length. (fp32, each position's weights relative to the running maximum up to it:
  exact at any score range.)

topk  (in the spirit of DeepSeek's NSA / DSA)
  Query t reads its own block causally plus the sparse_topk_blocks complete earlier blocks whose mean key
  scores highest against it (q . mean(k_block), summed over the query heads that share a kv head). The
  selection is not differentiable (as in NSA's selected branch); the attention over the picked keys is. The
  decode cache keeps every key, plus per-block key sums so that scoring costs S / B dot products, and
  reads only (k + 1) * B keys per query. With k >= the number of blocks this is dense causal attention.

Both run training (full sequence), chunked prefill and cached decode through one code path, and are
tested against a plain masked reference (tests/test_sparse_attention.py). A caller's mask (left padding)
is ANDed with the pattern; the block grid is on cache slots, so a left-padded row sees it shifted by its
padding (unpadded rows and training are exact). MLA layers expand their latent per new token and cache the
expanded keys and values (the ring is small; top-k keeps them all, which forgoes MLA's compression).

The engine's paged path (forward_paged, the contract of GQAttention.forward_paged) runs the same functions
over per-layer pools of flat slots holding one entry per token: its key and value (MLA: expanded), and for
local_global its importance and its key's scores against the global tokens (fp32). Each entry depends on its
own token only, so shared prefix blocks and blocks recomputed after preemption hold the same values. A prefill
chunk reads the ring of keys before it; the decodes of a step go together, each with its own window
(`local_global_decode`). The global tokens' values need no per-sequence state: their state over every earlier
key is rebuilt from the stored scores and values (`global_state`), O(context) per query like dense attention
(per-block states would make it O(B), but need the engine's block size when the pools are allocated). top-k
takes its block means from the gathered context keys. Nothing is freed as the window moves on: the global
tokens (and top-k) read every earlier key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.attention import GQAttention, MLAttention, PagedBatch, apply_rope
from r1kit.model.config import ModelConfig

_NEG = -1e30  # masked logit: finite, so that a fully masked (padding) row cannot produce NaN
_TOPK_CHUNK_ELEMENTS = 1 << 23  # top-k: query rows per chunk are chosen so gathered keys stay under this


@dataclass(frozen=True)
class SparsePattern:
    """The sparsity rule of one layer, read from ModelConfig (see the module docstring)."""

    kind: str  # "local_global" | "topk"
    block: int
    window_base: int
    window_max: int
    importance: str  # "key" | "query" | "none"
    global_tokens: int
    topk_blocks: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SparsePattern:
        if cfg.sparse_attention not in ("local_global", "topk"):
            raise ValueError(f"ModelConfig.sparse_attention = {cfg.sparse_attention!r}: no sparse pattern")
        return cls(cfg.sparse_attention, cfg.sparse_block_size, cfg.sparse_window_base, cfg.sparse_window_max,
                   cfg.sparse_importance, cfg.sparse_global_tokens, cfg.sparse_topk_blocks)

    @property
    def reach(self) -> int:
        """The furthest distance a window reaches (local_global)."""
        return self.window_base if self.importance == "none" else self.window_max

    @property
    def tau(self) -> float:
        return max(1.0, (self.window_max - self.window_base) / 8)

    @property
    def ring(self) -> int:
        """Past keys a local_global decode step can need: max(reach, B - 1)."""
        return max(self.reach, self.block - 1, 1)


def local_global_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, importance: torch.Tensor | None,
                      p: SparsePattern) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local_global rule for broadcastable query / key positions (..., Tq, 1) and (..., 1, Tk).

    importance: a in (0, 1) broadcastable to (..., Tq, Tk) (the key's or the query's score), None for rule
    "none". Returns (allowed bool, soft float logit bias or None); positions outside allowed get no weight.
    """
    d = q_pos - k_pos
    near = (torch.div(q_pos, p.block, rounding_mode="floor") == torch.div(k_pos, p.block, rounding_mode="floor"))
    near = near | (d <= p.window_base)
    allowed = (d >= 0) & (near | (d <= p.reach))
    if importance is None:
        return allowed, None
    width = p.window_base + (p.window_max - p.window_base) * importance.float()
    soft = torch.where(near, 0.0, F.logsigmoid((width - d) / p.tau))
    return allowed, soft


class GlobalTokens(nn.Module):
    """The G global tokens of one layer: learned hidden states, RMS-normalised where used (so their scale is
    free), that the layer's own projections turn into a query per head and a key and value per kv head. They
    have no position of their own: they meet every token at its position. Projecting learned states, rather
    than learning queries and keys directly, lets them learn as fast as the token queries do."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(n, hidden))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw the tokens from N(0, 1), the scale of a normalised hidden state (Transformer.init_weights)."""
        self.embed.copy_(torch.randn(self.embed.shape, generator=generator))

    def hidden(self) -> torch.Tensor:
        """(G, hidden) RMS-normalised states, the input of the layer's projections."""
        e = self.embed.float()
        return (e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)).to(self.embed.dtype)


def global_scores(q_g: torch.Tensor, k: torch.Tensor, scale: float, q_at: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Each global token's scaled score against T keys, fp32 (B, H, G, T). q_g (H, G, Dk): the tokens'
    queries; k (B, Hkv, T, Dk); q_at (B|1, H, G, T, Dk): the queries as each key meets them (rotated to its
    position), None: q_g as is."""
    H = q_g.shape[0]
    Bsz, n_kv = k.shape[:2]
    qg = q_g.float().unflatten(0, (n_kv, H // n_kv))  # (Hkv, rep, G, Dk)
    if q_at is None:
        s = torch.einsum("hrgd,bhtd->bhrgt", qg, k.float())
    else:
        s = torch.einsum("bhrgtd,bhtd->bhrgt",
                         q_at.float().unflatten(1, (n_kv, H // n_kv)).expand(Bsz, -1, -1, -1, -1, -1), k.float())
    return s.float().flatten(1, 2) * scale


def global_state(s: torch.Tensor, v: torch.Tensor, key_ok: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state `global_summaries` carries, (max, sum, weighted value sum), over a run of keys at once: their
    scores s (B, H, G, S) and values v (B, Hkv, S, Dv); key_ok (B, S) False for keys left out. With no key
    left in, the empty state (-inf, 0, 0)."""
    n_kv = v.shape[1]
    if key_ok is not None:
        s = s.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    m = s.amax(-1)  # (B, H, G)
    w = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0)[..., None])
    acc = torch.einsum("bhrgs,bhsd->bhrgd", w.unflatten(1, (n_kv, -1)), v.float()).flatten(1, 2)
    return m, w.sum(-1), acc


def global_summaries(q_g: torch.Tensor, k_g: torch.Tensor, v_g: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_ok: torch.Tensor | None, scale: float,
                     state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                     q_at: torch.Tensor | None = None, chunk: int = 64
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each global token's value after each of T new keys (its attention over its own key and every key so
    far), and the state after the last.

    q_g (H, G, Dk), k_g (Hkv, G, Dk), v_g (Hkv, G, Dv): the tokens' projections; k (B, Hkv, T, Dk),
    v (B, Hkv, T, Dv) the new keys; key_ok (B, T) False for padding keys; state = (max, sum, weighted value
    sum) over earlier keys, (B, H, G) x2 and (B, H, G, Dv) fp32, or None before the first key; q_at
    (B|1, H, G, T, Dk): the queries as each new key meets them (rotated to its position), None: q_g as is.
    Returns values (B, H, G, T, Dv) fp32 and the new state.
    """
    s = global_scores(q_g, k, scale, q_at)  # (B, H, G, T)
    if key_ok is not None:
        s = s.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    return global_summaries_from_scores(s, q_g, k_g, v_g, v, scale, state, chunk)


def global_summaries_from_scores(s: torch.Tensor, q_g: torch.Tensor, k_g: torch.Tensor, v_g: torch.Tensor,
                                 v: torch.Tensor, scale: float,
                                 state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, chunk: int = 64
                                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`global_summaries` from the new keys' scores s (B, H, G, T) (`global_scores`, -inf for padding).

    Exact at any score range: each position's weights are taken relative to the running maximum up to it,
    chunk by chunk (a (chunk x chunk) causal matrix inside a chunk, the carried state across chunks).
    """
    H, G, _ = q_g.shape
    Bsz, n_kv, T, Dv = v.shape
    rep, dev = H // n_kv, s.device
    qg = q_g.float().unflatten(0, (n_kv, rep))  # (Hkv, rep, G, Dk)
    s0 = (qg * k_g.float()[:, None]).sum(-1).flatten(0, 1)[..., None] * scale  # (H, G, 1): the own key
    own_v = v_g.float().repeat_interleave(rep, 0)[:, :, None]  # (H, G, 1, Dv)
    if state is None:
        m = torch.full((Bsz, H, G), float("-inf"), device=dev)
        lsum = torch.zeros(Bsz, H, G, device=dev)
        acc = torch.zeros(Bsz, H, G, Dv, device=dev)
    else:
        m, lsum, acc = state
    outs = []
    for c in range(0, T, chunk):
        sc = s[..., c:c + chunk]  # (B, H, G, C)
        C = sc.shape[-1]
        run = torch.maximum(sc.cummax(-1).values, torch.maximum(m[..., None], s0))  # reference per position
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        w = torch.exp(torch.where(causal, sc[..., None, :] - run[..., None], float("-inf")))  # (B, H, G, C, C)
        keys = torch.einsum("bhrgts,bhsd->bhrgtd", w.unflatten(1, (n_kv, rep)), v[:, :, c:c + C].float())
        keys = keys.float().flatten(1, 2)  # (B, H, G, C, Dv): the new keys' weighted values
        carry, own = torch.exp(m[..., None] - run), torch.exp(s0 - run)  # (B, H, G, C)
        num = keys + acc[..., None, :] * carry[..., None] + own[..., None] * own_v
        den = w.sum(-1) + lsum[..., None] * carry + own
        outs.append(num / den[..., None])
        lsum = lsum * carry[..., -1] + w[..., -1, :].sum(-1)
        acc = acc * carry[..., -1, None] + keys[..., -1, :]
        m = run[..., -1]
    return torch.cat(outs, 3), (m, lsum, acc)


# ---------------------------------------------------------------------------------------------------- local_global


def local_global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, ctx_start: int,
                           p: SparsePattern, scale: float, imp_k: torch.Tensor | None = None,
                           imp_q: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                           global_keys: torch.Tensor | None = None, global_values: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """local_global attention. Long query runs go block-wise: each block of B queries reads the B + reach keys
    up to its end. A few queries (decode) read all L context keys directly, whichever is less work.

    q (B, H, T, Dk): queries at positions pos .. pos + T - 1; k (B, Hkv, L, Dk), v (B, Hkv, L, Dv): keys at
    positions ctx_start .. pos + T - 1 (they must include every key the queries can see). imp_k (B, Hkv, L)
    or imp_q (B, Hkv, T): importance for rule "key" / "query". mask: the caller's (B, 1, T, pos + T) or None.
    global_keys (B|1, Hkv, G, T, Dk) as each query meets them, global_values (B, H, G, T, Dv), or None.
    Returns (B, H, T, Dv).
    """
    Bsz, H, T, Dk = q.shape
    n_kv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, blk = H // n_kv, p.block
    j0, j1 = pos // blk, (pos + T - 1) // blk
    # the layout: nq groups of qn query slots (first one at position q0), each against `width` keys, group i's
    # starting at position key0 + i * qn
    if T * L <= (j1 - j0 + 1) * blk * (blk + p.reach):
        nq, qn, width, q0, key0 = 1, T, L, pos, ctx_start
    else:
        nq, qn, width, q0, key0 = j1 - j0 + 1, blk, blk + p.reach, j0 * blk, j0 * blk - p.reach
    front = pos - q0  # padded query slots before the first query
    back = nq * qn - T - front
    lead = ctx_start - key0  # > 0: pad the keys in front; < 0: drop keys no query can see
    tail = (nq - 1) * qn + width - (L + lead)

    def keys_layout(t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, L, ...) -> (B, Hkv, nq, width, ...)
        extra = (0, 0) * (t.dim() - 3)
        t = F.pad(t, (*extra, max(lead, 0), tail))[:, :, max(-lead, 0):]
        t = t.unfold(2, width, qn)  # (B, Hkv, nq, ..., width)
        return t.movedim(-1, 3)

    def queries_layout(t: torch.Tensor, dim: int) -> torch.Tensor:  # pad T -> nq * qn at `dim`, split it
        pads = [0, 0] * (t.dim() - 1 - dim) + [front, back]
        return F.pad(t, pads).unflatten(dim, (nq, qn))

    dev = q.device
    q_pos = (q0 + torch.arange(nq * qn, device=dev)).view(nq, qn, 1)
    k_pos = key0 + qn * torch.arange(nq, device=dev).view(nq, 1, 1) + torch.arange(width, device=dev)
    if p.importance == "key":
        importance = keys_layout(imp_k)[:, :, :, None, :]  # (B, Hkv, nq, 1, width)
    elif p.importance == "query":
        importance = queries_layout(imp_q, 2)[..., None]  # (B, Hkv, nq, qn, 1)
    else:
        importance = None
    allowed, soft = local_global_bias(q_pos, k_pos, importance, p)  # (B|1, Hkv|1, nq, qn, width) at most
    allowed = allowed & (k_pos >= ctx_start) & (k_pos < pos + T)
    if mask is not None:
        qi = (q_pos - pos).clamp(0, T - 1)  # (nq, qn, 1)
        ki = k_pos.clamp(0, pos + T - 1)  # (nq, 1, width)
        allowed = allowed & mask[:, 0][:, qi, ki][:, None]  # (B, 1, nq, qn, width)
    gk = gv = None
    if global_keys is not None:
        gk = queries_layout(global_keys, 3).expand(Bsz, -1, -1, -1, -1, -1)  # (B, Hkv, G, nq, qn, Dk)
        gv = queries_layout(global_values, 3).unflatten(1, (n_kv, rep))  # (B, Hkv, rep, G, nq, qn, Dv)
    y = _local_global_softmax(queries_layout(q, 2).unflatten(1, (n_kv, rep)), keys_layout(k), keys_layout(v),
                              allowed, soft, gk, gv, scale)
    return y.reshape(Bsz, H, nq * qn, Dv)[:, :, front:front + T]


def local_global_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                        k_pos: torch.Tensor, key_ok: torch.Tensor, p: SparsePattern, scale: float,
                        imp_k: torch.Tensor | None = None, imp_q: torch.Tensor | None = None,
                        global_keys: torch.Tensor | None = None, global_values: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """local_global for B single queries at different positions (the paged engine's decodes), each against its
    own W keys. q (B, H, 1, Dk) at positions q_pos (B,); k (B, Hkv, W, Dk), v (B, Hkv, W, Dv) at positions
    k_pos (B, W), key_ok (B, W) False for padding; imp_k (B, Hkv, W) or imp_q (B, Hkv, 1) for rule "key" /
    "query"; global_keys (B, Hkv, G, 1, Dk) at the query's position, global_values (B, H, G, 1, Dv), or None.
    Returns (B, H, 1, Dv)."""
    Bsz, H = q.shape[:2]
    n_kv, Dv = k.shape[1], v.shape[-1]
    if p.importance == "key":
        importance = imp_k[:, :, None, None, :]  # (B, Hkv, 1, 1, W)
    elif p.importance == "query":
        importance = imp_q[:, :, None, :, None]  # (B, Hkv, 1, 1, 1)
    else:
        importance = None
    k_pos = k_pos[:, None, None, None, :]  # (B, 1, nq = 1, qn = 1, W)
    allowed, soft = local_global_bias(q_pos.view(Bsz, 1, 1, 1, 1), k_pos, importance, p)
    allowed = allowed & key_ok[:, None, None, None, :]
    gk = gv = None
    if global_keys is not None:
        gk = global_keys[:, :, :, None]  # (B, Hkv, G, 1, 1, Dk)
        gv = global_values.unflatten(1, (n_kv, H // n_kv))[:, :, :, :, None]  # (B, Hkv, rep, G, 1, 1, Dv)
    y = _local_global_softmax(q.unflatten(1, (n_kv, H // n_kv))[:, :, :, None], k[:, :, None], v[:, :, None],
                              allowed, soft, gk, gv, scale)
    return y.reshape(Bsz, H, 1, Dv)


def _local_global_softmax(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, allowed: torch.Tensor,
                          soft: torch.Tensor | None, gk: torch.Tensor | None, gv: torch.Tensor | None, scale: float
                          ) -> torch.Tensor:
    """One softmax over each query's local keys and the global tokens, on a layout of nq groups of qn queries,
    each group against its own `width` keys: qb (B, Hkv, rep, nq, qn, Dk), kb and vb (B, Hkv, nq, width, D);
    allowed and soft (None: no bias) broadcastable to (B, Hkv, nq, qn, width); gk (B, Hkv, G, nq, qn, Dk),
    gv (B, Hkv, rep, G, nq, qn, Dv), or None. Returns (B, Hkv, rep, nq, qn, Dv)."""
    scores = torch.einsum("bgrnqd,bgnwd->bgrnqw", qb, kb).float() * scale  # (B, Hkv, rep, nq, qn, width)
    if soft is not None:
        scores = scores + soft.unsqueeze(-4)
    scores = scores.masked_fill(~allowed.unsqueeze(-4), _NEG)
    if gk is None:
        return torch.einsum("bgrnqw,bgnwd->bgrnqd", scores.softmax(-1).to(vb.dtype), vb)
    g_scores = torch.einsum("bgrnqd,bgknqd->bgrnqk", qb, gk.to(qb.dtype)).float() * scale
    probs = torch.cat((scores, g_scores), -1).softmax(-1)
    p_loc, p_glob = probs.split([kb.shape[3], gk.shape[2]], -1)
    return (torch.einsum("bgrnqw,bgnwd->bgrnqd", p_loc.to(vb.dtype), vb).float()
            + torch.einsum("bgrnqk,bgrknqd->bgrnqd", p_glob, gv.to(p_glob.dtype))).to(vb.dtype)


# ---------------------------------------------------------------------------------------------------- topk


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_means: torch.Tensor,
                   pos: int | torch.Tensor, p: SparsePattern, scale: float, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Top-k block selection attention. q (B, H, T, Dk) at positions pos .. pos + T - 1; k (B, Hkv, S, Dk),
    v (B, Hkv, S, Dv) hold the keys of positions 0 .. pos + T - 1 (S >= pos + T: a cache buffer is read in
    place); block_means (B, Hkv, nb, Dk) the mean key of blocks 0 .. nb - 1 (at least every block before the
    last query's). pos may be a tensor (B,) of per-row positions (the paged engine's decodes, each row with its
    own context). Returns (B, H, T, Dv)."""
    Bsz, H, T, Dk = q.shape
    n_kv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    rep, blk, dev = H // n_kv, p.block, q.device
    nb = block_means.shape[2]
    n_sel = min(p.topk_blocks, nb)
    n_keys = (n_sel + 1) * blk
    rows = max(1, _TOPK_CHUNK_ELEMENTS // (n_keys * n_kv * Bsz * max(Dk, Dv)))
    k_flat, v_flat = k.reshape(-1, Dk), v.reshape(-1, Dv)
    row_base = (torch.arange(Bsz * n_kv, device=dev) * S).view(Bsz, n_kv, 1, 1)
    q = q.unflatten(1, (n_kv, rep))  # (B, Hkv, rep, T, Dk)
    start = torch.as_tensor(pos, device=dev).view(-1, 1)  # (1|B, 1): the first query's position per row
    last = (start + T - 1).view(-1, 1, 1, 1)  # the last key any query of the row may read
    ys = []
    for c in range(0, T, rows):
        qc = q[:, :, :, c:c + rows]  # (B, Hkv, rep, Tc, Dk)
        Tc = qc.shape[3]
        t_pos = start + c + torch.arange(Tc, device=dev)  # (1|B, Tc)
        own = torch.div(t_pos, blk, rounding_mode="floor")  # the query's block
        local = own[..., None] * blk + torch.arange(blk, device=dev)  # (1|B, Tc, blk)
        k_pos = local[:, None].expand(Bsz, n_kv, Tc, blk)
        ok = (local <= t_pos[..., None])[:, None].expand(Bsz, n_kv, Tc, blk)
        if n_sel:
            with torch.no_grad():
                sel = torch.einsum("bgrtd,bgnd->bgtn", qc.float(), block_means.float())  # (B, Hkv, Tc, nb)
                sel = sel.masked_fill(torch.arange(nb, device=dev) >= own[:, None, :, None], float("-inf"))
                top = sel.topk(n_sel, -1)  # blocks before the query's own block only
            picked = (top.indices[..., None] * blk + torch.arange(blk, device=dev)).flatten(-2)  # (.., n_sel*blk)
            picked_ok = (top.values > float("-inf"))[..., None].expand(-1, -1, -1, -1, blk).flatten(-2)
            k_pos, ok = torch.cat((picked, k_pos), -1), torch.cat((picked_ok, ok), -1)  # (B, Hkv, Tc, n_keys)
        k_pos = torch.minimum(k_pos, last)
        if mask is not None:
            rows_mask = mask[:, 0, c:c + Tc][:, None].expand(Bsz, n_kv, Tc, -1)
            ok = ok & rows_mask.gather(-1, k_pos)
        flat = (row_base + k_pos).flatten()
        kg = k_flat.index_select(0, flat).view(Bsz, n_kv, Tc, -1, Dk)
        vg = v_flat.index_select(0, flat).view(Bsz, n_kv, Tc, -1, Dv)
        scores = torch.einsum("bgrtd,bgtkd->bgrtk", qc, kg).float() * scale
        probs = scores.masked_fill(~ok[:, :, None], _NEG).softmax(-1)
        ys.append(torch.einsum("bgrtk,bgtkd->bgrtd", probs.to(v.dtype), vg))
    return torch.cat(ys, 3).view(Bsz, H, T, Dv)


def block_means(k: torch.Tensor, block: int) -> torch.Tensor:
    """Mean key of each complete block: k (B, Hkv, S, D) -> (B, Hkv, S // block, D)."""
    nb = k.shape[2] // block
    return k[:, :, :nb * block].unflatten(2, (nb, block)).float().mean(3)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a paged pool (num_slots, N, ...) at slots (B, S): (B, N, S, ...)."""
    return pool.index_select(0, slots.flatten()).view(*slots.shape, *pool.shape[1:]).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- modules


class _SparseAttention(nn.Module):
    """The sparse forward shared by the GQA and MLA variants. A subclass provides ``_heads(x, rope)`` ->
    q (B, H, T, Dk), k (B, Hkv, T, Dk), v (B, Hkv, T, Dv), and the attributes n_heads, n_kv, rope_dim,
    interleave, dk, dv, scale, o_proj."""

    n_heads: int
    n_kv: int
    rope_dim: int
    interleave: bool
    dk: int
    dv: int
    scale: float
    o_proj: nn.Linear

    def _init_sparse(self, cfg: ModelConfig) -> None:
        self.pattern = SparsePattern.from_config(cfg)
        p = self.pattern
        use_scorer = p.kind == "local_global" and p.importance != "none"
        self.importance = nn.Linear(cfg.hidden_size, self.n_kv) if use_scorer else None
        use_globals = p.kind == "local_global" and p.global_tokens > 0
        self.global_tokens = GlobalTokens(p.global_tokens, cfg.hidden_size) if use_globals else None

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def global_projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global tokens through this layer's projections, unrotated: q (H, G, Dk), k (Hkv, G, Dk),
        v (Hkv, G, Dv)."""
        x = self.global_tokens.hidden()[None].to(dtype)  # (1, G, C)
        shape = (1, x.shape[1], self.rope_dim // 2)
        identity = (torch.ones(shape, dtype=dtype, device=x.device), torch.zeros(shape, dtype=dtype, device=x.device))
        q, k, v = self._heads(x, identity)
        return q[0], k[0], v[0]

    def _importance(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each token's importance a in (0, 1) per kv head, (B, Hkv, T) fp32; None without a scorer."""
        return torch.sigmoid(self.importance(x).float()).transpose(1, 2) if self.importance is not None else None

    def _rotate_to(self, t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Unrotated global-token vectors t (N, G, Dk) placed at each position of `rope` (B|1, T, r/2):
        (B|1, N, G, T, Dk); only the last rope_dim channels rotate (all of them for GQA)."""
        N, G, Dk = t.shape
        x = t.reshape(1, 1, N * G, Dk).expand(rope[0].shape[0], rope[0].shape[1], -1, -1)
        if self.rope_dim == Dk:
            x = apply_rope(x, *rope, self.interleave)
        else:
            x = torch.cat((x[..., :Dk - self.rope_dim], apply_rope(x[..., Dk - self.rope_dim:], *rope,
                                                                   self.interleave)), -1)
        return x.unflatten(2, (N, G)).permute(0, 2, 3, 1, 4)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
                  ) -> tuple[torch.Tensor, ...]:
        """local_global: a ring of the last max(reach, B - 1) keys, values and key importances, and the global
        tokens' state (fp32); topk: every key and value, and per-block key sums (fp32)."""
        p = self.pattern
        if p.kind == "topk":
            n_blocks = -(-max_len // p.block)
            return (torch.zeros(batch, self.n_kv, max_len, self.dk, dtype=dtype, device=device),
                    torch.zeros(batch, self.n_kv, max_len, self.dv, dtype=dtype, device=device),
                    torch.zeros(batch, self.n_kv, n_blocks, self.dk, device=device))
        ring = min(max_len, p.ring)
        g = p.global_tokens
        return (torch.zeros(batch, self.n_kv, ring, self.dk, dtype=dtype, device=device),
                torch.zeros(batch, self.n_kv, ring, self.dv, dtype=dtype, device=device),
                torch.zeros(batch, self.n_kv, ring, device=device),
                torch.full((batch, self.n_heads, g), float("-inf"), device=device),
                torch.zeros(batch, self.n_heads, g, device=device),
                torch.zeros(batch, self.n_heads, g, self.dv, device=device))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: tuple[torch.Tensor, ...] | None = None, pos: int = 0) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); the signature of GQAttention.forward (see r1kit/model/attention.py)."""
        B, T, _ = x.shape
        q, k, v = self._heads(x, rope)
        if self.pattern.kind == "topk":
            y = self._topk(q, k, v, mask, cache, pos)
        else:
            y = self._local_global(x, rope, q, k, v, mask, cache, pos)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _topk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              cache: tuple[torch.Tensor, ...] | None, pos: int) -> torch.Tensor:
        blk, T = self.pattern.block, q.shape[2]
        if cache is None:
            means = block_means(k, blk)
        else:
            k_cache, v_cache, sums = cache
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            block_of = torch.arange(pos, pos + T, device=k.device) // blk
            sums.index_add_(2, block_of, k.float())
            k, v = k_cache, v_cache  # read in place: only the selected blocks are touched
            means = sums[:, :, :(pos + T) // blk] / blk  # complete blocks only
        return topk_attention(q, k, v, means, pos, self.pattern, self.scale, mask)

    def _local_global(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      cache: tuple[torch.Tensor, ...] | None, pos: int) -> torch.Tensor:
        p, T = self.pattern, q.shape[2]
        imp = self._importance(x)
        imp_k = imp if p.importance == "key" else None  # (B, Hkv, T)
        imp_q = imp if p.importance == "query" else None
        key_ok = mask[:, 0, -1, pos:pos + T] if mask is not None else None  # padding keys: False
        g_state = cache[3:] if cache is not None else None
        g_keys = g_values = None
        if self.global_tokens is not None:  # at distance 0 from every token: rotated to the token it meets
            q_g, k_g, v_g = self.global_projections(x.dtype)
            g_values, g_state = global_summaries(q_g, k_g, v_g, k, v, key_ok, self.scale, g_state,
                                                 self._rotate_to(q_g, rope))
            g_keys = self._rotate_to(k_g, rope)
        ctx_start = pos
        if cache is not None:
            k_ring, v_ring, i_ring = cache[:3]
            ring = k_ring.shape[2]
            old = torch.arange(max(0, pos - ring), pos, device=k.device)  # positions held by the ring
            ctx_start = pos - old.numel()
            slots = old % ring
            k_ctx = torch.cat((k_ring.index_select(2, slots), k), 2)
            v_ctx = torch.cat((v_ring.index_select(2, slots), v), 2)
            if imp_k is not None:
                imp_k = torch.cat((i_ring.index_select(2, slots), imp_k), 2)
            keep = torch.arange(max(pos, pos + T - ring), pos + T, device=k.device)
            k_ring.index_copy_(2, keep % ring, k[:, :, keep - pos])
            v_ring.index_copy_(2, keep % ring, v[:, :, keep - pos])
            if imp is not None:
                i_ring.index_copy_(2, keep % ring, imp[:, :, keep - pos])
            if self.global_tokens is not None:
                for buf, new in zip(cache[3:], g_state, strict=True):
                    buf.copy_(new)
            k, v = k_ctx, v_ctx
        return local_global_attention(q, k, v, pos, ctx_start, p, self.scale, imp_k, imp_q, mask, g_keys, g_values)

    # ------------------------------------------------------------------------------------------ paged (the engine)
    def new_paged_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device
                        ) -> tuple[torch.Tensor, ...]:
        """The engine's per-layer pools of num_slots flat slots: keys (num_slots, Hkv, Dk) and values
        (num_slots, Hkv, Dv) (MLA: expanded, as in new_cache); local_global adds each token's importance
        (num_slots, Hkv) (width 0 without a scorer) and its key's scores against the global tokens
        (num_slots, H, G), both fp32. Every entry is a function of its own token: shared prefix blocks and
        recomputed (preempted) ones hold the same values."""
        p = self.pattern
        kv = (torch.zeros(num_slots, self.n_kv, self.dk, dtype=dtype, device=device),
              torch.zeros(num_slots, self.n_kv, self.dv, dtype=dtype, device=device))
        if p.kind == "topk":
            return kv
        scorer = self.importance is not None
        return (*kv, torch.zeros(num_slots, self.n_kv if scorer else 0, device=device),
                torch.zeros(num_slots, self.n_heads, p.global_tokens, device=device))

    def forward_paged(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: PagedBatch,
                      kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x (1, N, C) flat packed tokens -> (1, N, C), as GQAttention.forward_paged: writes the new tokens'
        entries into the pools kv (`new_paged_cache`) at batch.slot_mapping, then attends each prefill chunk
        over its context slots, and all decodes together."""
        N = x.shape[1]
        q, k, v = self._heads(x, rope)  # (1, H, N, Dk), (1, Hkv, N, Dk), (1, Hkv, N, Dv)
        g = self.global_projections(x.dtype) if self.global_tokens is not None else None
        self._paged_write(x, rope, k, v, batch.slot_mapping, kv, g)
        topk = self.pattern.kind == "topk"
        y = v.new_empty(1, self.n_heads, N, self.dv)
        for s in batch.seqs:  # prefill chunks, one by one
            rows = slice(s.q_start, s.q_start + s.q_len)
            pos = s.ctx_len - s.q_len
            y[:, :, rows] = (self._paged_topk(q[:, :, rows], s.slots[None], pos, kv) if topk else
                             self._paged_chunk(q[:, :, rows], (rope[0][:, rows], rope[1][:, rows]), s.slots, pos,
                                               kv, g))
        if (d := batch.decode) is not None:  # all decodes at once, one query each
            qd = q[0].index_select(1, d.rows).transpose(0, 1)[:, :, None]  # (Bd, H, 1, Dk)
            t = batch.positions.index_select(0, d.rows)  # (Bd,)
            if topk:
                yd = self._paged_topk(qd, d.slots, t, kv)
            else:
                rope_d = (rope[0][0, d.rows][:, None], rope[1][0, d.rows][:, None])  # (Bd, 1, r/2)
                yd = self._paged_decode(qd, rope_d, d.slots, t, kv, g)
            y[0].index_copy_(1, d.rows, yd[:, :, 0].transpose(0, 1))
        return self.o_proj(y.transpose(1, 2).reshape(1, N, -1))

    def _paged_write(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor,
                     v: torch.Tensor, slots: torch.Tensor, kv: tuple[torch.Tensor, ...],
                     g: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """Write the new tokens' keys and values (and local_global's importances and global-token scores, each
        scored as its token meets the global queries) at their slots."""
        kv[0].index_copy_(0, slots, k[0].transpose(0, 1))
        kv[1].index_copy_(0, slots, v[0].transpose(0, 1))
        if self.importance is not None:
            kv[2].index_copy_(0, slots, self._importance(x)[0].transpose(0, 1))
        if g is not None:
            scores = global_scores(g[0], k, self.scale, self._rotate_to(g[0], rope))  # (1, H, G, N)
            kv[3].index_copy_(0, slots, scores[0].permute(2, 0, 1))

    def _paged_topk(self, q: torch.Tensor, slots: torch.Tensor, pos: int | torch.Tensor,
                    kv: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """top-k over context slots (B, S): a prefill chunk q (1, H, T, Dk) from position pos, or the decodes
        q (Bd, H, 1, Dk) at positions pos (Bd,). The block means come from the gathered keys (blocks past a
        query's own are never selected, so the padding of shorter contexts is never read)."""
        k, v = _gather(kv[0], slots), _gather(kv[1], slots)  # (B, Hkv, S, D)
        return topk_attention(q, k, v, block_means(k, self.pattern.block), pos, self.pattern, self.scale)

    def _paged_chunk(self, q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                     pos: int, kv: tuple[torch.Tensor, ...],
                     g: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """local_global for one prefill chunk: q (1, H, T, Dk) at positions pos .. pos + T - 1 (rope: theirs),
        its context's slots (pos + T,). Reads the last ring keys before the chunk; the global tokens' values
        are their state over positions < pos (from the stored scores) carried through the chunk."""
        p = self.pattern
        ctx_start = max(0, pos - p.ring)
        window = slots[ctx_start:][None]  # (1, L)
        imp = _gather(kv[2], window) if self.importance is not None else None  # (1, Hkv, L)
        g_keys = g_values = None
        if g is not None:
            scores = _gather(kv[3], slots[None]).transpose(2, 3)  # (1, H, G, pos + T)
            values = _gather(kv[1], slots[None])  # (1, Hkv, pos + T, Dv)
            state = global_state(scores[..., :pos], values[:, :, :pos], None) if pos else None
            g_values, _ = global_summaries_from_scores(scores[..., pos:], *g, values[:, :, pos:], self.scale, state)
            g_keys = self._rotate_to(g[1], rope)
        return local_global_attention(q, _gather(kv[0], window), _gather(kv[1], window), pos, ctx_start, p,
                                      self.scale, imp if p.importance == "key" else None,
                                      imp[..., pos - ctx_start:] if p.importance == "query" else None, None,
                                      g_keys, g_values)

    def _paged_decode(self, q: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                      t: torch.Tensor, kv: tuple[torch.Tensor, ...],
                      g: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """local_global for the decodes: q (Bd, H, 1, Dk) at positions t (Bd,) (rope (Bd, 1, r/2): theirs), the
        context slots (Bd, S) padded past each context. Each reads the ring + 1 keys up to itself; the global
        tokens' values are their state over all its earlier keys (from the stored scores) plus its own key."""
        p = self.pattern
        S = slots.shape[1]
        W = min(p.ring + 1, S)
        k_pos = t[:, None] - (W - 1) + torch.arange(W, device=t.device)  # (Bd, W): the last key is the query's
        key_ok = k_pos >= 0
        window = slots.gather(1, k_pos.clamp(min=0))
        imp = _gather(kv[2], window) if self.importance is not None else None  # (Bd, Hkv, W)
        g_keys = g_values = None
        if g is not None:
            scores = _gather(kv[3], slots).transpose(2, 3)  # (Bd, H, G, S)
            earlier = torch.arange(S, device=t.device) < t[:, None]  # (Bd, S)
            state = global_state(scores, _gather(kv[1], slots), earlier)
            own = window[:, -1:]  # the query's own slot
            g_values, _ = global_summaries_from_scores(_gather(kv[3], own).transpose(2, 3), *g, _gather(kv[1], own),
                                                       self.scale, state)
            g_keys = self._rotate_to(g[1], rope)  # (Bd, Hkv, G, 1, Dk)
        return local_global_decode(q, _gather(kv[0], window), _gather(kv[1], window), t, k_pos, key_ok, p,
                                   self.scale, imp if p.importance == "key" else None,
                                   imp[..., -1:] if p.importance == "query" else None, g_keys, g_values)


class SparseGQAttention(_SparseAttention, GQAttention):
    """GQAttention's projections with a sparse pattern (local_global or topk)."""

    def __init__(self, cfg: ModelConfig):
        GQAttention.__init__(self, cfg)
        self.dk = self.dv = self.rope_dim = self.head_dim
        self._init_sparse(cfg)

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._qkv(x, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class SparseMLAttention(_SparseAttention, MLAttention):
    """MLAttention's projections with a sparse pattern; keys and values are expanded from the latent per new
    token (every head is its own kv head)."""

    def __init__(self, cfg: ModelConfig):
        MLAttention.__init__(self, cfg)
        self.n_kv, self.dk, self.dv, self.rope_dim = self.n_heads, self.nope + self.rope, self.v_dim, self.rope
        self._init_sparse(cfg)

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q_nope, q_pe, entry = self._project(x, rope)
        latent, k_pe = entry.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def make_attention(cfg: ModelConfig, sparse: bool) -> nn.Module:
    """The attention module of one layer: GQA or MLA, dense or with cfg's sparse pattern."""
    if sparse and cfg.sparse_attention is not None:
        return SparseMLAttention(cfg) if cfg.attention == "mla" else SparseGQAttention(cfg)
    return MLAttention(cfg) if cfg.attention == "mla" else GQAttention(cfg)

