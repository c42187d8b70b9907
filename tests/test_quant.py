"""Weight-only quantization (r1kit.quant): fast paths against their references, error bounds against the
unquantized layers, storage, state_dicts, quantized MoE experts and whole quantized tiny models.

Error bounds were calibrated on Gaussian weights (K = 256): output relative error int8 ~0.7%, fp8 ~2.6%,
int4 ~8.4% (group 32), ~9.2% (64), ~10.1% (128); the tests leave a little headroom above those.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1kit.model.config import preset
from r1kit.model.moe import Experts
from r1kit.model.transformer import Transformer
from r1kit.quant import (
    Float8WeightLinear,
    Int4Linear,
    Int8Linear,
    QuantizedExperts,
    QuantizedLinear,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    set_reference,
    unpack_int4,
)
from r1kit.quant import linear as qlinear

LINEARS = {
    "int8": (Int8Linear, {}),
    "int4-g32": (Int4Linear, {"group_size": 32}),
    "int4-g64": (Int4Linear, {"group_size": 64}),
    "int4-g128": (Int4Linear, {"group_size": 128}),
    "fp8": (Float8WeightLinear, {}),
    "fp8-block": (Float8WeightLinear, {"block_size": (128, 128)}),
}
# Relative output error against the unquantized layer (Gaussian weights): bound (measured ~ see docstring).
CLOSE = {"int8": 0.01, "int4-g32": 0.10, "int4-g64": 0.10, "int4-g128": 0.12, "fp8": 0.04, "fp8-block": 0.04}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gaussian_linear(k: int = 256, n: int = 128, bias: bool = True, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin


def make(kind: str, lin: nn.Linear) -> QuantizedLinear:
    cls, opts = LINEARS[kind]
    return cls.from_linear(lin, **opts)


# ---------------------------------------------------------------------------------------------------- linears


@pytest.mark.parametrize("kind", list(LINEARS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 80])  # decode (fast kernels), small batch, prefill (fallbacks)
@torch.no_grad()
def test_linear_fast_path_matches_reference(kind, dtype, rows):
    m = make(kind, gaussian_linear())
    x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)  # M = rows
    fast, ref = m(x), m.reference_forward(x)
    assert fast.shape == (1, rows, 128) and fast.dtype == dtype
    # fp32: the same sums in another order. bf16: each result is rounded to bf16 once more (2^-8 relative).
    assert rel(fast, ref) < (2e-6 if dtype == torch.float32 else 1.5e-2)
    m.reference = True
    assert torch.equal(m(x), ref)


@pytest.mark.parametrize("kind, op, dtype", [("int8", "_weight_int8pack_mm", torch.bfloat16),
                                             ("int4-g64", "_weight_int4pack_mm_for_cpu", torch.bfloat16)])
@torch.no_grad()
def test_cpu_kernels_are_used_for_decode(kind, op, dtype, monkeypatch):
    if not (qlinear.HAS_INT8_MM if kind == "int8" else qlinear.HAS_INT4_MM):
        pytest.skip(f"torch.{op} is not available")
    calls = []
    real = getattr(torch, op)
    monkeypatch.setattr(torch, op, lambda *a: calls.append(a[0].shape) or real(*a))
    m = make(kind, gaussian_linear())
    x = torch.randn(1, 256).to(dtype)
    assert rel(m(x), m.reference_forward(x)) < 1.5e-2
    assert calls == [(1, 256)]
    m(torch.randn(100, 256).to(dtype))  # prefill-sized: the fallback
    m(torch.randn(1, 256))  # fp32 activations: the fallback
    assert len(calls) == 1


@pytest.mark.parametrize("kind", list(LINEARS))
@torch.no_grad()
def test_linear_close_to_unquantized(kind):
    lin = gaussian_linear()
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    assert rel(make(kind, lin)(x), lin(x)) < CLOSE[kind]


def test_linear_gradient_flows_to_the_input():
    m = make("int8", gaussian_linear())
    x = torch.randn(3, 256, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, m.dequantize().sum(0).expand(3, -1))


# ---------------------------------------------------------------------------------------------------- formats


def test_int8_round_trip_within_half_a_step():
    w = torch.randn(64, 256) * 0.05
    w[3] = 0.0  # an all-zero row: scale 1, stays zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert s[3] == 1 and (q[3] == 0).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group):
    w = torch.randn(64, 256) * 0.05 + 0.01
    w[5, :group] = 0.02  # a constant group
    packed, s, z = quantize_int4(w, group)
    assert packed.shape == (64, 128) and packed.dtype == torch.uint8 and s.shape == z.shape == (64, 256 // group)
    err = (dequantize_int4(packed, s, z) - w).abs().view(64, -1, group)
    # half a step, plus the bf16 rounding of the zero point where the clamp bites (2^-8 relative)
    bound = s.float() / 2 + z.float().abs() * 2.0**-8 + 1e-7
    assert (err <= bound[..., None]).all()
    assert err[5, 0].max() <= 0.02 * 2.0**-8


def test_int4_packing_layout():
    q = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    p = pack_int4(q)
    assert torch.equal(p[:, 0], q[:, 0] | (q[:, 1] << 4))  # column 2j in the low nibble, 2j + 1 in the high
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("block", [None, (128, 128), (16, 32)])
def test_fp8_round_trip_relative_error(block):
    w = torch.randn(200, 136) * 0.05  # not a multiple of the block: partial edge blocks
    q, s = quantize_fp8(w, block)
    assert q.dtype == torch.float8_e4m3fn
    assert s.shape == ((200,) if block is None else (-(-200 // block[0]), -(-136 // block[1])))
    d = dequantize_fp8(q, s, block)
    full = s[:, None] if block is None else s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:200, :136]
    # 3 mantissa bits: half an ulp is <= 2^-4 relative; below the normal range the step is 2^-9 * scale
    assert ((d - w).abs() <= torch.maximum(w.abs() * 2.0**-4, full * 2.0**-10) * (1 + 1e-5)).all()


def test_weight_bytes():
    lin = gaussian_linear(256, 128, bias=False)
    fp32 = 256 * 128 * 4
    assert make("int8", lin).weight_bytes() == 256 * 128 + 128 * 4  # ~25% of fp32 plus one fp32 scale per row
    assert abs(make("int8", lin).weight_bytes() / fp32 - 0.25) < 0.01
    assert make("int4-g64", lin).weight_bytes() == 256 * 128 // 2 + 2 * 128 * 4 * 2  # nibbles + bf16 scale/zero
    assert make("fp8", lin).weight_bytes() == 256 * 128 + 128 * 4
    assert make("fp8-block", lin).weight_bytes() == 256 * 128 + 1 * 2 * 4


# ---------------------------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("kind", list(LINEARS))
@torch.no_grad()
def test_state_dict_layout_and_reload(kind, tmp_path):
    cls, opts = LINEARS[kind]
    m = make(kind, gaussian_linear())
    sd = m.state_dict()
    expected = {"weight", "weight_scale", "bias"} | ({"weight_zero"} if cls is Int4Linear else set())
    assert set(sd) == expected
    wdtype = {Int8Linear: torch.int8, Int4Linear: torch.uint8, Float8WeightLinear: torch.float8_e4m3fn}[cls]
    assert sd["weight"].dtype == wdtype
    save_file(sd, tmp_path / "q.safetensors")  # every dtype involved is storable as safetensors
    fresh = cls(256, 128, bias=True, **opts)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(4, 256)
    assert torch.equal(fresh(x), m(x))
    # moving / casting the module keeps the quantized tensors as they are (only the bias follows)
    fresh.to(torch.bfloat16)
    assert fresh.weight.dtype == wdtype and fresh.weight_scale.dtype == sd["weight_scale"].dtype
    assert fresh.bias.dtype == torch.bfloat16


@torch.no_grad()
def test_int4_kernel_cache_follows_reloaded_weights():
    m = make("int4-g64", gaussian_linear(seed=0))
    other = make("int4-g64", gaussian_linear(seed=1))
    x = torch.randn(1, 256).to(torch.bfloat16)
    m(x)  # builds the kernel layout from the first weights
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), other(x))


# ---------------------------------------------------------------------------------------------------- experts


def make_experts(n: int = 8, dim: int = 64, hidden: int = 64, seed: int = 0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    ex = Experts(n, dim, hidden)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * 0.1)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * 0.1)
    return ex


def routing(n_tokens: int, k: int, experts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts)
    idx = torch.stack([pool[torch.randperm(len(experts), generator=gen)[:k]] for _ in range(n_tokens)])
    return torch.rand(n_tokens, k, generator=gen), idx


# An expert is two quantized matmuls in series with the SwiGLU product between them, so its error is larger
# than one layer's: measured int8 ~1.1%, fp8 ~4-4.7%, int4 (group 32) ~13-16% over three seeds.
EXPERT_CLOSE = {"int8": 0.02, "fp8": 0.07, "int4": 0.22}


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_quantized_experts_match_reference_and_unquantized(method, dtype):
    ex = make_experts()
    qe = QuantizedExperts.from_experts(ex, method, group_size=32)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    weights, idx = routing(10, 2, list(range(8)))
    fast = qe(x.to(dtype), weights, idx)
    ref = qe.forward_reference(x.to(dtype), weights, idx)
    assert fast.dtype == dtype
    assert rel(fast, ref) < (2e-6 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert rel(fast, ex(x, weights, idx)) < EXPERT_CLOSE[method]


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@torch.no_grad()
def test_quantized_experts_touch_only_the_routed_experts(method, monkeypatch):
    qe = QuantizedExperts.from_experts(make_experts(), method, group_size=32)
    seen = []
    real = qe._expert_weights

    def spy(sel, dtype):
        out = real(sel, dtype)
        seen.append((None if sel is None else sel.tolist(), out[0].shape[0], out[1].shape[0]))
        return out

    monkeypatch.setattr(qe, "_expert_weights", spy)
    x = torch.randn(6, 64)
    weights, idx = routing(6, 2, [1, 4, 6])
    torch.testing.assert_close(qe(x, weights, idx), qe.forward_reference(x, weights, idx), rtol=1e-5, atol=1e-6)
    assert seen == [([1, 4, 6], 3, 3)]  # only 3 of the 8 experts were converted
    seen.clear()
    x = torch.randn(40, 64)
    weights, idx = routing(40, 2, list(range(8)), seed=1)
    torch.testing.assert_close(qe(x, weights, idx), qe.forward_reference(x, weights, idx), rtol=1e-5, atol=1e-6)
    assert seen == [(None, 8, 8)]  # every expert routed: no gather, all converted
    assert torch.equal(qe(x[:0], weights[:0], idx[:0]), x[:0])


def test_quantized_experts_state_dict_and_bad_method():
    qe = QuantizedExperts.from_experts(make_experts(hidden=32), "int4", group_size=32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qe.state_dict().items()} == {
        "gate_up_proj": ((8, 64, 32), torch.uint8), "gate_up_proj_scale": ((8, 64, 2), torch.bfloat16),
        "gate_up_proj_zero": ((8, 64, 2), torch.bfloat16), "down_proj": ((8, 64, 16), torch.uint8),
        "down_proj_scale": ((8, 64, 1), torch.bfloat16), "down_proj_zero": ((8, 64, 1), torch.bfloat16)}
    assert qe.weight_bytes() == 8 * (64 * 32 + 64 * 16) + 8 * 64 * 3 * 2 * 2
    with pytest.raises(ValueError, match="'nf4'"):
        QuantizedExperts(8, 64, 32, method="nf4")


# ---------------------------------------------------------------------------------------------------- models

# Logits of quantized tiny models (init_weights(0), 2 x 16 tokens) against the unquantized ones: relative error
# bound, the least share of equal greedy tokens, and the least share of positions whose unquantized argmax is
# in the quantized model's top 5. Measured (moe / dense): int8 0.9% / 0.9%, all 32 greedy tokens equal; fp8
# 3.7% / 3.9%, 30 and 32 of 32 equal; int4 14.7% / 14.9%, 24 and 28 of 32 equal (random-init logits have
# small margins, so int4 flips some argmaxes), top 5 holding the unquantized argmax 31 and 32 of 32 times.
MODEL_BOUNDS = {"int8": (0.03, 0.95, 1.0), "fp8": (0.08, 0.85, 1.0), "int4": (0.25, 0.65, 0.9)}


def tiny(name: str) -> Transformer:
    return Transformer(preset(name)).init_weights(0).eval()


IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@torch.no_grad()
def test_quantized_model_close_to_unquantized(name, method):
    base = tiny(name)
    ref = base(IDS)
    model = copy.deepcopy(base)
    stats = quantize_model(model, method)
    out = model(IDS)
    max_rel, min_agree, min_top5 = MODEL_BOUNDS[method]
    assert rel(out, ref) < max_rel
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= min_agree
    assert (ref.argmax(-1, keepdim=True) == out.topk(5, -1).indices).any(-1).float().mean() >= min_top5
    # fast paths against the reference paths, through the whole model
    set_reference(model, True)
    assert rel(out, model(IDS)) < 2e-6
    # what was swapped
    assert isinstance(model.lm_head, QuantizedLinear)
    assert stats["swapped"] == len(stats["modules"]) > 0
    assert not any(isinstance(m, (nn.Linear, Experts)) for n, m in model.named_modules() if n not in stats["skipped"])
    if name == "tiny-moe":
        assert isinstance(model.layers[1].mlp.experts, QuantizedExperts)
        assert type(model.layers[1].mlp.gate.weight) is nn.Parameter and model.layers[1].mlp.gate.weight.dtype == (
            torch.float32)
        assert all(isinstance(layer.self_attn.kv_b_proj, nn.Linear) for layer in model.layers)
        assert set(stats["skipped"]) == {f"layers.{i}.self_attn.kv_b_proj" for i in range(3)} | {
            "mtp.0.block.self_attn.kv_b_proj"}
    ratio = stats["weight_bytes_after"] / stats["weight_bytes_before"]
    assert {"int8": 0.25 < ratio < 0.28, "fp8": 0.25 < ratio < 0.28, "int4": 0.125 < ratio < 0.16}[method]
    assert stats["model_bytes_after"] < stats["model_bytes_before"]


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_quantized_model_cached_decode_matches_full_forward(name, method, dtype):
    model = tiny(name).cast(dtype)
    quantize_model(model, method)
    full = model(IDS)
    cache = model.new_cache(2, 20)
    steps = [model(IDS[:, :6], cache)]  # prefill, then one token at a time (the bf16 CPU kernels)
    steps += [model(IDS[:, t:t + 1], cache) for t in range(6, 16)]
    assert rel(torch.cat(steps, 1), full) < (1e-5 if dtype == torch.float32 else 2e-2)


@torch.no_grad()
def test_skip_patterns_and_tied_head():
    model = tiny("tiny-dense")
    stats = quantize_model(model, "int8", skip=["lm_head", r"layers\.0\.mlp"])
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(model.layers[1].mlp.up_proj, Int8Linear)
    assert stats["skipped"]["lm_head"] == "matches skip"
    tied = Transformer(preset("tiny-dense", tie_word_embeddings=True)).init_weights(0)
    stats = quantize_model(tied, "int8")
    assert stats["skipped"] == {"lm_head": "tied to the embedding"}
    assert tied.lm_head.weight is tied.embed_tokens.weight


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@torch.no_grad()
def test_quantized_model_checkpoint_round_trip(method, tmp_path):
    model = tiny("tiny-moe")
    stats = quantize_model(model, method)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with torch.device("meta"):  # as checkpoint loading does: structure first, then the tensors
        fresh = Transformer(preset("tiny-moe"))
    quantize_model(fresh, **stats["config"], structure_only=True)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    fresh.rotary.inv_freq = model.rotary.inv_freq  # a plain attribute (not in the state_dict), on meta here
    assert torch.equal(fresh.eval()(IDS), model(IDS))


@torch.no_grad()
def test_fp8_block_model_and_group_fallback():
    model = tiny("tiny-moe")
    stats = quantize_model(model, "fp8", fp8_block=(128, 128))
    assert model.lm_head.block_size == (128, 128) and stats["config"]["fp8_block"] == [128, 128]
    model = tiny("tiny-moe")
    quantize_model(model, "int4", group_size=128)  # in_features 64 / 32 layers fall back to smaller groups
    assert model.lm_head.group_size == 64 and model.layers[0].self_attn.q_b_proj.group_size == 32
    assert model.layers[1].mlp.experts.group_size == 32


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="'int3'.*'int8', 'int4', 'fp8'"):
        quantize_model(tiny("tiny-dense"), "int3")
