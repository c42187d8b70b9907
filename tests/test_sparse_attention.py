"""Sparse attention (r1kit/model/sparse_attention.py) against plain references: the local_global rule vs a
per-(query, key) loop, both paths vs a dense masked softmax built by that loop, the dense limits, cached
decode vs the full forward, padding, gradients, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from r1kit.generate import SamplingParams, generate_tokens
from r1kit.model.attention import GQAttention, RotaryEmbedding, apply_rope
from r1kit.model.config import ConfigError, preset
from r1kit.model.sparse_attention import (
    SparseGQAttention,
    SparseMLAttention,
    SparsePattern,
    local_global_bias,
)
from r1kit.model.transformer import Transformer

SMALL = dict(sparse_block_size=8, sparse_window_base=4, sparse_window_max=12, sparse_global_tokens=3,
             sparse_topk_blocks=2)
PRESETS = {"gqa": "tiny-dense", "mla": "tiny-moe"}


def build(make_model, attn: str, kind: str | None, **overrides) -> Transformer:
    sparse = {} if kind is None else dict(SMALL, sparse_attention=kind)
    return make_model(PRESETS[attn], **{**sparse, **overrides, "num_mtp_layers": 0})


def layer_inputs(model: Transformer, B: int = 2, T: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, model.config.hidden_size, generator=gen)
    return x, model.rotary(torch.arange(T)[None], x.dtype)


# ---------------------------------------------------------------------------------------------------- the rule


def naive_rule(t: int, s: int, a: float, p: SparsePattern) -> float:
    """The documented local_global rule for one (query t, key s): logit bias, -inf where not visible."""
    d = t - s
    if d < 0:
        return -math.inf
    if s // p.block == t // p.block or d <= p.window_base:
        return 0.0
    if p.importance == "none" or d > p.window_max:
        return -math.inf
    width = p.window_base + (p.window_max - p.window_base) * a
    return math.log(1 / (1 + math.exp(-(width - d) / p.tau)))


@pytest.mark.parametrize("importance", ["key", "query", "none"])
def test_local_global_rule_matches_a_per_query_loop(importance):
    cfg = preset("tiny-dense", sparse_attention="local_global", sparse_importance=importance, **SMALL)
    p = SparsePattern.from_config(cfg)
    T = 45
    a = torch.rand(T, generator=torch.Generator().manual_seed(0))
    q_pos, k_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    imp = None if importance == "none" else a[None, :] if importance == "key" else a[:, None]
    allowed, soft = local_global_bias(q_pos, k_pos, imp, p)
    got = torch.where(allowed, soft if soft is not None else 0.0, -math.inf)
    want = torch.tensor([[naive_rule(t, s, float(a[s] if importance == "key" else a[t]), p) for s in range(T)]
                         for t in range(T)])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[allowed], want[allowed].float(), atol=1e-6)
    assert (allowed.sum(1) < torch.arange(1, T + 1)).any()  # the pattern really is sparse at this length


# ---------------------------------------------------------------------------------------------------- references


def rotate(attn, rotary: RotaryEmbedding, t, position: int):
    """Vectors t (N, Dk) as a token at `position` sees them: the rotary channels (the last rope_dim) rotated."""
    cos, sin = rotary(torch.tensor([[position]]), t.dtype)
    r = attn.rope_dim
    return torch.cat((t[:, :t.shape[1] - r], apply_rope(t[None, None, :, t.shape[1] - r:], cos, sin,
                                                        attn.interleave)[0, 0]), -1)


def reference_local_global(attn, x, rope, rotary):
    """Dense softmax per query over [visible keys by naive_rule, global tokens], global values by a loop; a
    global token meets each token at that token's position."""
    p = attn.pattern
    q, k, v = attn._heads(x, rope)  # (B, H, T, D), (B, Hkv, T, D)
    B, H, T, _ = q.shape
    rep = H // attn.n_kv
    imp = None if attn.importance is None else torch.sigmoid(attn.importance(x)).transpose(1, 2)  # (B, Hkv, T)
    g = attn.global_projections(x.dtype) if attn.global_tokens is not None else None  # q (H, G, D), k, v (Hkv, ..)
    y = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        for h in range(H):
            kv = h // rep
            bias = torch.tensor([[naive_rule(t, s, 0.0 if imp is None else float(imp[b, kv, s if p.importance == "key"
                                                                                      else t]), p)
                                  for s in range(T)] for t in range(T)])
            logits = q[b, h] @ k[b, kv].T * attn.scale + bias  # (T, T)
            if g is None:
                y[b, h] = logits.softmax(-1) @ v[b, kv]
                continue
            q_g, k_g, v_g = g[0][h], g[1][kv], g[2][kv]
            met = torch.stack([(rotate(attn, rotary, q_g, s) * k[b, kv, s]).sum(-1) for s in range(T)], 1)  # (G, T)
            for t in range(T):  # each global token's value at t: its softmax over its own key and keys 0..t
                own = (q_g * k_g).sum(-1, keepdim=True) * attn.scale  # (G, 1)
                w = torch.cat((own, met[:, :t + 1] * attn.scale), 1).softmax(-1)  # (G, 1 + t + 1)
                g_val = w[:, :1] * v_g + w[:, 1:] @ v[b, kv, :t + 1]  # (G, Dv)
                probs = torch.cat((logits[t], rotate(attn, rotary, k_g, t) @ q[b, h, t] * attn.scale)).softmax(-1)
                y[b, h, t] = probs[:T] @ v[b, kv] + probs[T:] @ g_val
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def reference_topk(attn, x, rope):
    """Per query: mean key of each complete earlier block, the top-k by summed score over the kv group, plus
    the query's own block; a dense softmax over exactly those keys."""
    p = attn.pattern
    q, k, v = attn._heads(x, rope)
    B, H, T, _ = q.shape
    rep = H // attn.n_kv
    y = torch.zeros(B, H, T, v.shape[-1])
    for b in range(B):
        for kv in range(attn.n_kv):
            heads = range(kv * rep, (kv + 1) * rep)
            for t in range(T):
                own = t // p.block
                means = [k[b, kv, j * p.block:(j + 1) * p.block].mean(0) for j in range(own)]
                score = [float(sum(q[b, h, t] @ m for h in heads)) for m in means]
                chosen = sorted(range(own), key=lambda j: -score[j])[:p.topk_blocks]
                keys = [s for j in chosen for s in range(j * p.block, (j + 1) * p.block)]
                keys += list(range(own * p.block, t + 1))
                for h in heads:
                    probs = (q[b, h, t] @ k[b, kv, keys].T * attn.scale).softmax(-1)
                    y[b, h, t] = probs @ v[b, kv, keys]
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("importance", ["key", "query", "none"])
@torch.no_grad()
def test_local_global_matches_the_reference(make_model, attn, importance):
    model = build(make_model, attn, "local_global", sparse_importance=importance,
                  **({"sparse_global_tokens": 0} if importance == "none" else {}))
    layer = model.layers[0].self_attn
    assert isinstance(layer, SparseGQAttention if attn == "gqa" else SparseMLAttention)
    x, rope = layer_inputs(model, T=37)
    got = layer(x, rope, None)
    want = reference_local_global(layer, x, rope, model.rotary)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@torch.no_grad()
def test_topk_matches_the_reference(make_model, attn):
    model = build(make_model, attn, "topk")
    layer = model.layers[0].self_attn
    x, rope = layer_inputs(model, T=43)
    got = layer(x, rope, None)
    want = reference_topk(layer, x, rope)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def test_global_summaries_are_exact_across_chunks_and_at_large_scores():
    """The prefix softmax of the global tokens vs a float64 loop, with scores spread over hundreds (where one
    shared maximum would underflow to 0/0), in one call, in chunks of 7, and resumed from a state: carried, or
    taken over the first keys at once from their scores (global_state, as the paged engine does)."""
    from r1kit.model.sparse_attention import global_scores, global_state, global_summaries

    gen = torch.Generator().manual_seed(5)
    H, n_kv, G, D, T = 4, 2, 3, 8, 30
    q_g, k_g, v_g = torch.randn(H, G, D, generator=gen), torch.randn(n_kv, G, D, generator=gen), torch.randn(
        n_kv, G, D, generator=gen)
    k, v = torch.randn(2, n_kv, T, D, generator=gen) * 40, torch.randn(2, n_kv, T, D, generator=gen)
    want = torch.zeros(2, H, G, T, D, dtype=torch.float64)
    for b in range(2):
        for h in range(H):
            kv = h // (H // n_kv)
            for t in range(T):
                logits = torch.cat(((q_g[h] * k_g[kv]).sum(-1, keepdim=True), q_g[h] @ k[b, kv, :t + 1].T), 1)
                w = logits.double().softmax(-1)
                want[b, h, :, t] = w[:, :1] * v_g[kv].double() + w[:, 1:] @ v[b, kv, :t + 1].double()
    whole, _ = global_summaries(q_g, k_g, v_g, k, v, None, 1.0, None)
    chunked, _ = global_summaries(q_g, k_g, v_g, k, v, None, 1.0, None, chunk=7)
    first, state = global_summaries(q_g, k_g, v_g, k[:, :, :12], v[:, :, :12], None, 1.0, None)
    rest, _ = global_summaries(q_g, k_g, v_g, k[:, :, 12:], v[:, :, 12:], None, 1.0, state, chunk=5)
    at_once = global_state(global_scores(q_g, k[:, :, :12], 1.0), v[:, :, :12], None)
    resumed, _ = global_summaries(q_g, k_g, v_g, k[:, :, 12:], v[:, :, 12:], None, 1.0, at_once)
    assert torch.allclose(resumed.double(), want[..., 12:, :], atol=1e-4)
    for got in (whole, chunked, torch.cat((first, rest), 3)):
        assert torch.isfinite(got).all() and torch.allclose(got.double(), want, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- dense limits


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("kind", ["local_global", "topk"])
@torch.no_grad()
def test_a_pattern_covering_the_sequence_equals_dense_attention(make_model, attn, kind):
    """local_global with a window over the whole sequence and no global tokens, and topk with k >= the number
    of blocks, give the dense model's logits (same weights)."""
    T = 50
    cover = dict(sparse_window_base=T, sparse_window_max=T, sparse_global_tokens=0, sparse_topk_blocks=T // 8)
    sparse = build(make_model, attn, kind, **cover)
    dense = build(make_model, attn, None)
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all("importance" in n for n in unexpected)
    ids = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sparse(ids), dense(ids), atol=1e-5)
    narrow = build(make_model, attn, kind)  # the default small pattern is not dense
    narrow.load_state_dict(sparse.state_dict(), strict=False)
    assert not torch.allclose(narrow(ids), dense(ids), atol=1e-3)


# ---------------------------------------------------------------------------------------------------- decode


CASES = {
    "gqa-local_global-key": ("gqa", "local_global", {}),
    "gqa-local_global-query": ("gqa", "local_global", {"sparse_importance": "query"}),
    "gqa-local_global-none-yarn": ("gqa", "local_global", {
        "sparse_importance": "none", "max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
    "mla-local_global-key": ("mla", "local_global", {}),
    "gqa-topk": ("gqa", "topk", {}),
    "mla-topk": ("mla", "topk", {}),
}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_cached_decode_equals_the_full_forward(make_model, case):
    """Prefill 13 tokens, a 9-token chunk, then one token at a time: the logits of the full forward. The yarn
    case runs past original_max_position_embeddings (context extension)."""
    attn, kind, extra = CASES[case]
    model = build(make_model, attn, kind, **extra)
    T = 60
    ids = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.new_cache(2, T)
    parts = [model(ids[:, :13], cache), model(ids[:, 13:22], cache)]
    parts += [model(ids[:, t:t + 1], cache) for t in range(22, T)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=2e-5)


def test_local_global_cache_does_not_grow_with_the_context(make_model):
    model = build(make_model, "gqa", "local_global")
    short, long = model.new_cache(1, 64), model.new_cache(1, 4096)
    ring = max(SMALL["sparse_window_max"], SMALL["sparse_block_size"] - 1)
    for a, b in zip(short.layers[0], long.layers[0], strict=True):
        assert a.shape == b.shape
    assert short.layers[0][0].shape[2] == ring


@torch.no_grad()
def test_left_padded_batch_keeps_the_longest_row_and_has_no_nan(make_model):
    model = build(make_model, "gqa", "local_global")
    gen = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 512, (30,), generator=gen).tolist(), torch.randint(3, 512, (9,), generator=gen)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batch = list(generate_tokens(model, [long, short.tolist()], params))
    alone = list(generate_tokens(model, [long], params))
    assert [step[0] for step in batch] == [step[0] for step in alone]
    cache = model.new_cache(2, 40, pad=torch.tensor([0, 21]))
    ids = torch.zeros(2, 30, dtype=torch.long)
    ids[0], ids[1, 21:] = torch.tensor(long), short
    assert torch.isfinite(model(ids, cache)).all()


# ---------------------------------------------------------------------------------------------------- training, config


@pytest.mark.parametrize("kind", ["local_global", "topk"])
def test_gradients_reach_the_sparse_parameters(make_model, kind):
    model = build(make_model, "gqa", kind).train()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    attn = model.layers[0].self_attn
    grads = [attn.q_proj.weight.grad, attn.k_proj.weight.grad]
    if kind == "local_global":
        grads += [attn.importance.weight.grad, attn.global_tokens.embed.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_sparse_layers_choose_the_layers_and_params_are_counted(make_model):
    model = build(make_model, "gqa", "local_global", sparse_layers=[1])
    assert type(model.layers[0].self_attn) is GQAttention
    assert isinstance(model.layers[1].self_attn, SparseGQAttention)
    assert model.num_params() == model.config.num_params()
    mla = build(make_model, "mla", "local_global")
    assert mla.num_params() == mla.config.num_params()


@pytest.mark.parametrize("overrides, field", [
    (dict(sparse_attention="sliding"), "sparse_attention"),
    (dict(sparse_attention="topk", sparse_block_size=0), "sparse_block_size"),
    (dict(sparse_attention="local_global", sparse_window_base=32, sparse_window_max=16), "sparse_window_max"),
    (dict(sparse_attention="local_global", sparse_importance="value"), "sparse_importance"),
    (dict(sparse_attention="local_global", sparse_layers=[5]), "sparse_layers"),
    (dict(sparse_attention="topk", sparse_topk_blocks=0), "sparse_topk_blocks"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny-dense", **overrides)


@pytest.mark.parametrize("attn,kind", [("gqa", "local_global"), ("mla", "topk")])
def test_sparse_model_checkpoint_round_trip(make_model, tmp_path, attn, kind):
    """config.json carries the sparse_* fields, so a saved sparse model loads back with the same logits."""
    from r1kit.checkpoint import load_model, save_model

    model = build(make_model, attn, kind)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", "cpu", torch.float32)
    assert loaded.config.sparse_attention == kind and loaded.config.sparse_block_size == model.config.sparse_block_size
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_sparse_models_generate_on_the_engine_and_refuse_speculation(make_model):
    """R1Model runs sparse models on the paged engine (the tokens of the KV-cache loop; tests/test_engine_sparse.py
    has the engine cases), and speculative decoding refuses them: their caches cannot be rolled back past
    rejected drafts."""
    from r1kit.api import R1Model
    from r1kit.engine.speculative import speculative_generate
    from r1kit.generate import GenerationError

    model = build(make_model, "gqa", "local_global", num_mtp_layers=1)
    r1 = R1Model(model, None)
    assert r1.use_engine
    prompt = [3, 9, 4, 1, 7, 2]
    got = r1.generate(input_ids=prompt, max_new_tokens=6, temperature=0)
    want = [t[0] for t in generate_tokens(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0))]
    assert got == "".join(f"<{t}>" for t in want)
    with pytest.raises(GenerationError, match="cannot be rolled back"):
        next(speculative_generate(model, prompt, SamplingParams(max_new_tokens=4, temperature=0)))
