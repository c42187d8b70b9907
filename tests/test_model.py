"""Internal agreement of the model: cache vs full forward, MLA paths, MoE dispatch, padding, sizes, config checks."""

from __future__ import annotations

import pytest
import torch

from r1kit.model.config import PRESETS, ConfigError, ModelConfig, preset
from r1kit.model.moe import Experts, MoE
from r1kit.model.transformer import ContextLengthError, Transformer

PRESET_NAMES = ["tiny-moe", "tiny-dense"]
ATOL = 1e-4


def _ids(shape, seed=0, vocab=512):
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name, impl", [("tiny-dense", None), ("tiny-moe", "auto"), ("tiny-moe", "naive"),
                                        ("tiny-moe", "absorb")])
@torch.no_grad()
def test_incremental_forward_equals_full(make_model, name, impl):
    """Prefill, single tokens, and multi-token chunks after a prefix (short: absorb with a mask; long: naive)."""
    model = make_model(name)
    if impl is not None:
        model.set_mla_impl(impl)
    ids = _ids((2, 26))
    full = model(ids)
    cache = model.new_cache(2, 40)
    pieces, start = [], 0
    for size in (8, 1, 1, 6, 1, 3, 1, 5):  # 6 and 5: naive under "auto"; 3: absorb under "auto", with a mask
        pieces.append(model(ids[:, start:start + size], cache=cache))
        start += size
        assert cache.pos == start
    assert start == 26
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", PRESET_NAMES)
@torch.no_grad()
def test_last_only_and_return_hidden(make_model, name):
    model = make_model(name)
    ids = _ids((2, 10))
    full, hidden = model(ids, return_hidden=True)
    last = model(ids, last_only=True)
    assert hidden.shape == (2, 10, model.config.hidden_size)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.lm_head(model.norm(hidden)), full, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- MLA


@torch.no_grad()
def test_mla_naive_and_absorbed_agree(make_model):
    model = make_model("tiny-moe")
    ids = _ids((3, 17))
    out = {}
    for impl in ("naive", "absorb"):
        model.set_mla_impl(impl)
        full = model(ids)
        cache = model.new_cache(3, 24)
        chunks = [model(ids[:, :9], cache=cache), *(model(ids[:, t:t + 1], cache=cache) for t in range(9, 17))]
        out[impl] = full
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=0)
    assert out["naive"].std() > 0.3
    torch.testing.assert_close(out["absorb"], out["naive"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_mla_naive_and_absorbed_agree_with_left_padding(make_model):
    model = make_model("tiny-moe")
    ids = _ids((3, 12))
    pad = torch.tensor([5, 0, 2])
    ids[0, :5] = 0
    ids[2, :2] = 0
    steps = _ids((3, 4), seed=1)
    out = {}
    for impl in ("naive", "absorb"):
        model.set_mla_impl(impl)
        cache = model.new_cache(3, 16, pad=pad)
        logits = [model(ids, cache=cache)[:, -1:]]
        logits += [model(steps[:, t:t + 1], cache=cache) for t in range(4)]
        out[impl] = torch.cat(logits, dim=1)
    torch.testing.assert_close(out["absorb"], out["naive"], atol=ATOL, rtol=0)


def test_set_mla_impl_rejects_unknown(make_model):
    with pytest.raises(ValueError, match="fast"):
        make_model("tiny-moe").set_mla_impl("fast")


# ---------------------------------------------------------------------------------------------------- MoE dispatch


def _experts(n_experts=8, dim=32, hidden=16, seed=0, dtype=torch.float32) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    ex = Experts(n_experts, dim, hidden)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * 0.2)
    return ex.to(dtype)


def _routing(n_tokens, k, allowed, seed=0):
    """Random distinct top-k choices drawn only from `allowed` experts, and random positive weights."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(allowed)
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, k, generator=gen) + 0.1
    return weights, idx


@pytest.mark.parametrize("allowed", [
    list(range(8)),  # every expert may be used
    [1, 2, 4, 6],  # experts 0 (first), 3, 5 and 7 (last) receive no token
    [7, 3],  # only two experts busy, k = 2: every token hits both
], ids=["all", "gaps", "two"])
@torch.no_grad()
def test_grouped_dispatch_matches_reference_fp32(allowed):
    ex = _experts()
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(1))
    weights, idx = _routing(37, 2, allowed)
    fast, ref = ex(x, weights, idx), ex.forward_reference(x, weights, idx)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("allowed", [list(range(8)), [0, 2, 5]], ids=["all", "gaps"])
@torch.no_grad()
def test_grouped_dispatch_matches_reference_bf16(allowed):
    ex = _experts(dtype=torch.bfloat16)
    x = torch.randn(29, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    weights, idx = _routing(29, 3, allowed, seed=3)
    fast, ref = ex(x, weights, idx), ex.forward_reference(x, weights, idx)
    assert fast.dtype == torch.bfloat16
    err = (fast.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-2
    # and both are close to the fp32 computation of the same (bf16-rounded) weights
    ex32 = _experts().to(torch.float32)
    ex32.load_state_dict({k: v.float() for k, v in ex.state_dict().items()})
    ref32 = ex32.forward_reference(x.float(), weights, idx)
    assert (fast.float() - ref32).norm() / ref32.norm() < 2e-2


@torch.no_grad()
def test_grouped_dispatch_single_token_and_single_expert():
    ex = _experts()
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    weights, idx = torch.tensor([[0.7]]), torch.tensor([[5]])
    torch.testing.assert_close(ex(x, weights, idx), ex.forward_reference(x, weights, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 2, 3])  # fewer (token, expert) pairs than experts: the decode path
@torch.no_grad()
def test_decode_sized_dispatch_matches_reference(n_tokens):
    ex = _experts()
    x = torch.randn(n_tokens, 32, generator=torch.Generator().manual_seed(5))
    weights, idx = _routing(n_tokens, 2, [1, 2, 4, 6], seed=n_tokens)
    assert n_tokens * 2 < ex.n_experts
    torch.testing.assert_close(ex(x, weights, idx), ex.forward_reference(x, weights, idx), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_moe_layer_fast_path_matches_reference_in_the_model(make_model):
    model = make_model("tiny-moe")
    ids = _ids((2, 15))
    fast = model(ids)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes
    for m in moes:
        m.reference = True
    torch.testing.assert_close(model(ids), fast, atol=ATOL, rtol=0)


@torch.no_grad()
def test_router_group_limit_and_bias(make_model):
    """noaux_tc: experts come only from the topk_group best groups (scored by their top-2 biased scores);
    the weights are the raw (unbiased) sigmoid scores, renormalised and scaled."""
    model = make_model("tiny-moe")
    gate = model.layers[1].mlp.gate
    cfg = model.config
    x = torch.randn(50, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    weights, idx = gate(x)
    scores = (x @ gate.weight.T).sigmoid()
    biased = scores + gate.e_score_correction_bias
    per_group = cfg.n_routed_experts // cfg.n_group
    group_score = biased.view(50, cfg.n_group, per_group).topk(2, -1).values.sum(-1)
    best_groups = group_score.topk(cfg.topk_group, -1).indices
    for n in range(50):
        assert set((idx[n] // per_group).tolist()) <= set(best_groups[n].tolist())
        allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in best_groups[n].tolist()]
        expected = sorted(allowed, key=lambda e: -biased[n, e].item())[:cfg.num_experts_per_tok]
        assert sorted(idx[n].tolist()) == sorted(expected)
        raw = scores[n, idx[n]]
        torch.testing.assert_close(weights[n], raw / raw.sum() * cfg.routed_scaling_factor)
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 3, "routing should vary across tokens"


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", PRESET_NAMES)
@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(make_model, name):
    model = make_model(name)
    lengths = [5, 12, 9]
    width = max(lengths)
    prompts = [_ids((1, n), seed=10 + i) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0 on the left
    for i, p in enumerate(prompts):
        batch[i, width - p.shape[1]:] = p[0]
    pad = torch.tensor([width - n for n in lengths])
    cache = model.new_cache(len(lengths), width + 4, pad=pad)
    got = [model(batch, cache=cache, last_only=True)]
    steps = _ids((len(lengths), 4), seed=20)
    got += [model(steps[:, t:t + 1], cache=cache) for t in range(4)]
    got = torch.cat(got, dim=1)  # (B, 5, V): last prompt position, then 4 decode steps
    for i, p in enumerate(prompts):
        alone_cache = model.new_cache(1, p.shape[1] + 4)
        alone = [model(p, cache=alone_cache, last_only=True)]
        alone += [model(steps[i:i + 1, t:t + 1], cache=alone_cache) for t in range(4)]
        torch.testing.assert_close(got[i:i + 1], torch.cat(alone, dim=1), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- MTP


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_mtp_logits_shapes(make_model, depth):
    model = make_model("tiny-moe", num_mtp_layers=depth)
    assert len(model.mtp) == depth
    ids = _ids((2, 11))
    logits, hidden = model(ids, return_hidden=True)
    mtp = model.mtp_logits(hidden, ids)
    assert [tuple(t.shape) for t in mtp] == [(2, 10 - d, 512) for d in range(depth)]
    assert all(torch.isfinite(t).all() for t in mtp)
    assert model.mtp_logits(hidden[:, :1], ids[:, :1]) == []  # nothing left to predict


@torch.no_grad()
def test_mtp_is_causal(make_model):
    """The prediction at position t depends only on tokens up to t + 1 (the embedded next token)."""
    model = make_model("tiny-moe")
    ids = _ids((1, 12))
    other = ids.clone()
    other[0, 8:] = _ids((1, 4), seed=9)[0]
    a = model.mtp_logits(model(ids, return_hidden=True)[1], ids)[0]
    b = model.mtp_logits(model(other, return_hidden=True)[1], other)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=ATOL, rtol=0)  # positions 0..6 see tokens 0..7
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- context


@torch.no_grad()
def test_context_length_errors(make_model):
    model = make_model("tiny-dense", max_position_embeddings=16)
    big = model.new_cache(1, 20)  # a cache may be larger (left padding takes slots, not positions) ...
    model(_ids((1, 16)), cache=big)
    with pytest.raises(ContextLengthError, match="16"):  # ... but positions stop at the context
        model(_ids((1, 1)), cache=big)
    with pytest.raises(ContextLengthError):
        model(_ids((1, 17)))
    model(_ids((1, 16)))  # exactly the context is fine
    cache = model.new_cache(1, 8)
    model(_ids((1, 6)), cache=cache)
    with pytest.raises(ContextLengthError):
        model(_ids((1, 3)), cache=cache)
    model(_ids((1, 2)), cache=cache)  # filling the cache exactly is fine
    with pytest.raises(ContextLengthError):
        model(_ids((1, 1)), cache=cache)


# ---------------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("name", PRESET_NAMES)
@torch.no_grad()
def test_bf16_forward_close_to_fp32(make_model, name):
    model = make_model(name)
    ids = _ids((2, 16))
    ref = model(ids)
    model.cast(torch.bfloat16)
    out = model(ids)
    assert out.dtype == torch.bfloat16
    for n, t in [*model.named_parameters(), *model.named_buffers()]:  # routing stays fp32, the rest is bf16
        assert t.dtype == (torch.float32 if ".mlp.gate." in n else torch.bfloat16), n
    assert model.rotary.inv_freq.dtype == torch.float32
    out = out.float()
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    cache = model.new_cache(2, 20)  # the cache follows the model's dtype
    inc = torch.cat([model(ids[:, :10], cache=cache), model(ids[:, 10:11], cache=cache)], dim=1).float()
    assert (inc - out[:, :11]).norm() / out[:, :11].norm() < 0.05


# ---------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p["published_total"] is not None])
def test_preset_size_matches_published(name):
    published = PRESETS[name]["published_total"]
    total = preset(name).num_params()
    assert abs(total - published) / published < 0.01, f"{name}: {total / 1e9:.2f}B vs {published / 1e9:.2f}B"


def test_deepseek_v3_active_params():
    for name in ("deepseek-v3", "deepseek-r1"):
        cfg = preset(name)
        active = cfg.num_params(active=True)
        assert abs(active - 37e9) / 37e9 < 0.03, active
        assert abs(active - PRESETS[name]["published_active"]) / 37e9 < 0.03
        assert cfg.num_params() > 10 * active


@pytest.mark.parametrize("name, overrides", [
    ("tiny-moe", {}), ("tiny-moe", dict(num_mtp_layers=2, q_lora_rank=None)), ("tiny-dense", {}),
    ("tiny-dense", dict(tie_word_embeddings=True, attention_bias=True, head_dim=32)),
    ("tiny-moe", dict(n_shared_experts=0, moe_layer_freq=2, num_layers=4)),
])
def test_num_params_formula_counts_the_built_model(name, overrides):
    with torch.device("meta"):
        model = Transformer(preset(name, **overrides))
    assert model.num_params() == model.config.num_params(include_mtp=True)
    if not model.config.num_mtp_layers:
        assert model.num_params() == model.config.num_params()


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name, overrides, field", [
    ("tiny-dense", dict(num_kv_heads=3), "num_kv_heads"),
    ("tiny-moe", dict(topk_group=5), "topk_group"),
    ("tiny-moe", dict(n_group=3), "n_group"),
    ("tiny-moe", dict(num_experts_per_tok=9), "num_experts_per_tok"),
    ("tiny-moe", dict(scoring_func="relu"), "scoring_func"),
    ("tiny-moe", dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    ("tiny-dense", dict(hidden_size=0), "hidden_size"),
    ("tiny-dense", dict(arch="gpt2"), "arch"),
    ("tiny-dense", dict(rope_scaling={"rope_type": "yarn", "factor": 0.5}), "rope_scaling"),
    ("tiny-dense", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
])
def test_config_validation_names_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        preset(name, **overrides)


def test_config_unknown_field_and_preset_are_named():
    with pytest.raises(ConfigError, match="num_head_groups"):
        ModelConfig.from_dict({**PRESETS["tiny-dense"]["config"], "num_head_groups": 2})
    with pytest.raises(ConfigError, match="tiny-gigantic"):
        preset("tiny-gigantic")


def test_config_dict_round_trip():
    cfg = preset("tiny-moe")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(num_layers=5).num_layers == 5 and cfg.num_layers == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [5, 400])  # below and above SMALL_DECODE_CONTEXT (fp32 vs native-dtype matmuls)
def test_decode_attention_matches_sdpa(dtype, S):
    """The single-query path (_decode_sdpa) against torch's scaled_dot_product_attention, GQA and padding."""
    from r1kit.model.attention import _decode_sdpa

    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(3, h, t, 16, generator=g).to(dtype) for h, t in ((8, 1), (2, S), (2, S)))
    mask = torch.ones(3, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :S // 2] = False  # a left-padded row
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), attn_mask=mask, scale=0.3)
    for m, ref in ((mask, want), (None, None)):
        got = _decode_sdpa(q, k, v, m, 0.3)
        if ref is None:
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), scale=0.3)
        assert got.dtype == dtype and got.shape == (3, 8, 1, 16)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
