"""Weight-only quantization (r1kit.quant): fast paths against their references, error bounds against the
unquantized layers, storage, state_dicts, quantized MoE experts, whole quantized tiny models, and quantized
checkpoints (quantize -> save -> load is bit-identical to quantizing in memory; damaged files name the tensor).

Error bounds were calibrated on Gaussian weights (K = 256): output relative error int8 ~0.7%, fp8 ~2.6%,
int4 ~8.4% (group 32), ~9.2% (64), ~10.1% (128); the tests leave a little headroom above those.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1kit import kernels
from r1kit.checkpoint import CheckpointError, load_model, save_model
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
    monkeypatch.setattr(qlinear, "INT8_STREAM_MIN_BYTES", 10**9)  # int8: torch's kernel, as without r1kit's C one
    m = make(kind, gaussian_linear())
    x = torch.randn(1, 256).to(dtype)
    assert rel(m(x), m.reference_forward(x)) < 1.5e-2
    assert calls == [(1, 256)]
    m(torch.randn(100, 256).to(dtype))  # prefill-sized: the fallback
    m(torch.randn(1, 256))  # fp32 activations: the fallback
    assert len(calls) == 1


@torch.no_grad()
def test_large_int8_weights_take_the_c_kernel_and_agree(monkeypatch):
    if kernels.load() is None:
        pytest.skip(f"r1kit.kernels unavailable: {kernels.why_not()}")
    calls = []
    real = kernels.linear_int8
    monkeypatch.setattr(kernels, "linear_int8", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(qlinear, "INT8_STREAM_MIN_BYTES", 0)  # every size takes the C kernel (the default)
    m = make("int8", gaussian_linear())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = m(x)
    assert calls == [(3, 256)]
    kernel = torch._weight_int8pack_mm(x, m.weight, m.weight_scale.to(torch.bfloat16)) + m.bias.bfloat16()
    assert rel(out, kernel) < 4e-3  # both accumulate in fp32: a bf16 rounding or two apart
    assert rel(out, m.reference_forward(x)) < 1.5e-2
    monkeypatch.setattr(kernels, "linear_int8", lambda *a: None)  # kernel not built: _weight_int8pack_mm
    assert torch.equal(m(x), kernel)
    monkeypatch.setattr(qlinear, "INT8_STREAM_MIN_BYTES", 10**9)  # small weights never ask for it
    monkeypatch.setattr(kernels, "linear_int8", lambda *a: pytest.fail("small weights use _weight_int8pack_mm"))
    assert torch.equal(m(x), kernel)


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


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """tiny-moe (MLA + MoE + MTP) and a tied tiny-dense (qwen2, q/k/v biases), written in bf16 like r1kit/nano."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for name, overrides in (("tiny-moe", {}), ("tiny-dense", {"tie_word_embeddings": True})):
        save_model(Transformer(preset(name, **overrides)).init_weights(0), root / name, dtype=torch.bfloat16)
        out[name] = root / name
    return out


def quantized_copy(src: Path, dst: Path, method: str, **options) -> dict:
    model = load_model(src, dtype=torch.float32)
    stats = quantize_model(model, method, **options)
    save_model(model, dst, dtype=torch.bfloat16)
    return stats


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_quantized_checkpoint_round_trip_is_bit_identical(saved_models, name, method, dtype, tmp_path):
    stats = quantized_copy(saved_models[name], tmp_path / "q", method)
    loaded = load_model(tmp_path / "q", dtype=dtype)
    in_memory = load_model(saved_models[name], dtype=dtype)
    quantize_model(in_memory, method)
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in in_memory.named_modules()}
    assert torch.equal(loaded(IDS), in_memory(IDS))
    cache = loaded.new_cache(2, 20)  # decode runs the CPU kernels (int8, int4: bf16 rows <= 8)
    torch.testing.assert_close(loaded(IDS[:, :1], cache), in_memory(IDS[:, :1]), rtol=0, atol=0)
    # the stored config describes what was done
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "r1kit" and qc["method"] == method and qc["format_version"] == 1
    assert qc["not_quantized"] == stats["skipped"] and qc["group_size"] == 64
    assert loaded.quantization["config"] == stats["config"]


@pytest.mark.parametrize("method, ratio", [("int8", (0.25, 0.28)), ("fp8", (0.25, 0.28)), ("int4", (0.125, 0.16))])
def test_quantized_checkpoint_names_and_size_on_disk(saved_models, method, ratio, tmp_path):
    stats = quantized_copy(saved_models["tiny-moe"], tmp_path / "q", method)
    sd = load_file(tmp_path / "q" / "model.safetensors")
    wdtype = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[method]
    p = "model.layers.0.self_attn.q_a_proj.weight"
    assert sd[p].dtype == wdtype and sd[p + "_scale"].dtype == (torch.bfloat16 if method == "int4" else torch.float32)
    assert (p + "_zero" in sd) == (method == "int4")
    assert sd["model.layers.1.mlp.experts.3.gate_proj.weight"].dtype == wdtype  # experts split as in DeepSeek's
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale" in sd
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    if method == "int4":  # the portable layout: two nibbles per byte, never the CPU kernel's int32 layout
        assert sd[p].shape == (sd[p].shape[0], 64 // 2) and not any(t.dtype == torch.int32 for t in sd.values())
    bases = [n.removesuffix("_scale") for n in sd if n.endswith("_scale")]
    q_bytes = sum(sd[b + s].nbytes for b in bases for s in ("", "_scale", "_zero") if b + s in sd)
    assert q_bytes == stats["weight_bytes_after"]  # exactly the quantized tensors, nothing else
    assert ratio[0] < q_bytes / stats["weight_bytes_before"] < ratio[1]  # int8: 25% of fp32 + the scales
    full = sum(t.numel() * 4 for t in load_file(saved_models["tiny-moe"] / "model.safetensors").values())
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.4 * full


def test_quantized_checkpoint_loads_without_full_precision_weights(saved_models, tmp_path, monkeypatch):
    quantized_copy(saved_models["tiny-moe"], tmp_path / "q", "int8")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a quantized checkpoint must not quantize or dequantize")

    for cls in (Int8Linear, Int4Linear, Float8WeightLinear):
        monkeypatch.setattr(cls, "from_linear", refuse)
        monkeypatch.setattr(cls, "dequantize", refuse)
    monkeypatch.setattr(QuantizedExperts, "from_experts", refuse)
    monkeypatch.setattr(QuantizedExperts, "dequantize", refuse)
    model = load_model(tmp_path / "q", dtype=torch.bfloat16)
    floats = {n: t.shape for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() >= 2
              and not n.endswith(("_scale", "_zero")) and t.dtype != torch.float8_e4m3fn}
    assert set(floats) == {"embed_tokens.weight", "layers.1.mlp.gate.weight", "layers.2.mlp.gate.weight",
                           "mtp.0.block.mlp.gate.weight"} | {n for n in floats if "kv_b_proj" in n}


def test_quantize_command_and_from_pretrained(saved_models, tmp_path, capsys):
    from r1kit.__main__ import main
    from r1kit.api import R1Model

    out = tmp_path / "int4"
    assert main(["quantize", str(saved_models["tiny-moe"]), str(out), "--to", "int4", "--group-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]  # no temporary folder left behind
    loaded = R1Model.from_pretrained(out, device="cpu", dtype="bf16")
    direct = R1Model.from_pretrained(saved_models["tiny-moe"], device="cpu", dtype="bf16")
    quantize_model(direct.model, "int4", group_size=32)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS), direct.model(IDS))
    assert isinstance(loaded.model.lm_head, Int4Linear) and loaded.model.lm_head.group_size == 32
    assert isinstance(R1Model.from_pretrained(out, device="cpu", quantization="int4").model.lm_head, Int4Linear)
    with pytest.raises(ValueError, match="quantization='int8'.*quantized to 'int4'"):
        R1Model.from_pretrained(out, device="cpu", quantization="int8")
    # bad requests name what is wrong
    assert main(["quantize", str(saved_models["tiny-moe"]), str(tmp_path / "x"), "--to", "int3"]) == 2
    assert "'int3'" in capsys.readouterr().err
    assert main(["quantize", str(saved_models["tiny-moe"]), str(out), "--to", "int8"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(out), str(tmp_path / "y"), "--to", "int8"]) == 2
    assert "already quantized (int4)" in capsys.readouterr().err
    assert main(["quantize", str(saved_models["tiny-moe"]), str(tmp_path / "z"), "--to", "int4",
                 "--group-size", "48"]) == 2
    assert "group_size must be one of" in capsys.readouterr().err


def _rewrite(folder: Path, change) -> None:  # noqa: ANN001 - change(state_dict) edits it in place
    sd = load_file(folder / "model.safetensors")
    change(sd)
    save_file(sd, folder / "model.safetensors")


SCALE = "model.layers.0.self_attn.q_a_proj.weight_scale"


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop(SCALE), f"tensor '{SCALE}' not found"),
    (lambda sd: sd.__setitem__(SCALE, sd[SCALE][:-1].clone()), f"'{SCALE}' has shape"),
    (lambda sd: sd.__setitem__(SCALE, sd[SCALE].to(torch.bfloat16)), f"'{SCALE}' has dtype torch.bfloat16"),
    (lambda sd: sd[SCALE].__setitem__(3, float("nan")), f"'{SCALE}' has non-finite or non-positive"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_a_proj.weight",
                               sd["model.layers.0.self_attn.q_a_proj.weight"].float()), "has dtype torch.float32"),
])
def test_damaged_quantized_checkpoint_names_the_tensor(saved_models, tmp_path, change, message):
    quantized_copy(saved_models["tiny-moe"], tmp_path / "q", "int8")
    _rewrite(tmp_path / "q", change)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(tmp_path / "q")


@pytest.mark.parametrize("field, value, message", [
    ("method", "int3", "quantization_config.method is 'int3'"),
    ("format_version", 2, "quantization_config.format_version is 2"),
    ("group_size", "64", "quantization_config.group_size must be an integer"),
    ("fp8_block", [128], "quantization_config.fp8_block must be null or"),
])
def test_bad_quantization_config_names_the_field(saved_models, tmp_path, field, value, message):
    quantized_copy(saved_models["tiny-moe"], tmp_path / "q", "int8")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(tmp_path / "q")


def test_quantized_model_cannot_be_saved_as_deepseek_fp8(tmp_path):
    model = tiny("tiny-dense")
    quantize_model(model, "int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        save_model(model, tmp_path, fp8=True)


@torch.no_grad()
def test_int8_experts_decode_through_the_c_kernel(monkeypatch):
    """Decode-sized bf16 batches run each routed int8 expert through kernels.linear_int8 (two calls per expert),
    agreeing with the dequantized reference loop."""
    if kernels.load() is None:
        pytest.skip(f"r1kit.kernels unavailable: {kernels.why_not()}")
    qe = QuantizedExperts.from_experts(make_experts(), "int8")
    calls = []
    real = kernels.linear_int8
    monkeypatch.setattr(kernels, "linear_int8", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    weights, idx = routing(3, 2, [0, 2, 5], seed=2)  # 6 pairs over 3 of the 8 experts
    fast = qe(x, weights, idx)
    assert sorted(calls) == sorted(2 * [int((idx == e).sum()) for e in idx.unique().tolist()])
    assert rel(fast, qe.forward_reference(x, weights, idx)) < 2e-2


@torch.no_grad()
def test_int4_experts_decode_through_torchs_int4_kernel(monkeypatch):
    """Decode-sized bf16 batches run each routed int4 expert through _weight_int4pack_mm_for_cpu (two calls per
    expert, its layout built once per expert), agreeing with the dequantized reference loop."""
    if not qlinear.HAS_INT4_MM:
        pytest.skip("torch._weight_int4pack_mm_for_cpu is not available")
    qe = QuantizedExperts.from_experts(make_experts(), "int4", group_size=32)
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    weights, idx = routing(3, 2, [0, 2, 5], seed=2)
    fast = qe(x, weights, idx)
    assert sorted(calls) == sorted(2 * [int((idx == e).sum()) for e in idx.unique().tolist()])
    assert rel(fast, qe.forward_reference(x, weights, idx)) < 2e-2
    assert sorted(k for k in qe._int4_cache if k != "key") == [0, 2, 5]  # only the routed experts were packed
