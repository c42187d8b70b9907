"""FP8 training emulation (r1kit.train.fp8): quantization numerics (r1kit.fp8), FP8Linear forward/backward, model
conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r1kit.fp8 import E4M3, E5M2, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles
from r1kit.model.config import preset
from r1kit.model.moe import Experts
from r1kit.model.transformer import Transformer
from r1kit.train.fp8 import FP8Linear, convert_to_fp8, quantize_dequantize

DTYPES = [E4M3, E5M2]
REL_BOUND = {E4M3: 2.0**-4, E5M2: 2.0**-3}  # half an ulp of a 3- / 2-bit mantissa, normal range


# ------------------------------------------------------------------------------ independent references
def ref_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))


def ref_tile_scales(x: torch.Tensor, dtype: torch.dtype, k: int | None) -> torch.Tensor:
    """Per-element scale (x's shape, fp32): per tensor (k None) or per 1xk tile along the last dim, by loops."""
    x32 = x.float()
    if k is None:
        return ref_scale(x32.abs().max(), dtype).expand_as(x32).clone()
    out = torch.empty_like(x32)
    for j in range(0, x32.shape[-1], k):
        t = x32[..., j:j + k]
        out[..., j:j + k] = ref_scale(t.abs().amax(-1, keepdim=True), dtype).expand_as(t)
    return out


def ref_block_scales(w: torch.Tensor, dtype: torch.dtype, k: int) -> torch.Tensor:
    w32 = w.float()
    out = torch.empty_like(w32)
    for i in range(0, w32.shape[0], k):
        for j in range(0, w32.shape[1], k):
            out[i:i + k, j:j + k] = ref_scale(w32[i:i + k, j:j + k].abs().max(), dtype)
    return out


def ref_qdq(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    return ((x.float() / scale).to(dtype).float() * scale).to(x.dtype)


def quantize_dequantize_weight(w: torch.Tensor, dtype: torch.dtype = E4M3, block: int = 128) -> torch.Tensor:
    q, scale = quantize_blocks(w, (block, block), dtype)
    return dequantize_blocks(q, scale, (block, block), w.dtype)


def spread(shape: tuple[int, ...], seed: int = 0, decades: float = 4.0) -> torch.Tensor:
    """Random values whose magnitude varies over `decades` decades along the last dim (tiles of different ranges)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * torch.logspace(2 - decades, 2, shape[-1])


# ------------------------------------------------------------------------------ quantize_dequantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 128, 16])
def test_qdq_matches_reference_and_is_representable(dtype, block):
    x = spread((6, 300))  # 300: two full 128-tiles and a partial one
    scale = ref_tile_scales(x, dtype, block)
    y = quantize_dequantize(x, dtype, block)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y, ref_qdq(x, dtype, scale))
    # y / scale lies on the fp8 grid: re-quantizing with the same scale gives back the same fp8 codes, and the
    # fp8 round trip of y / scale moves it by at most the fp32 rounding of the division (1 ulp)
    r = y / scale
    codes = r.to(dtype)
    q, s = quantize_tiles(x, dtype, block)
    assert q.dtype == dtype and torch.equal(codes.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(codes.float(), r, rtol=2.0**-22, atol=0)
    assert torch.equal(dequantize_tiles(q, s, block), y)
    # the absmax of every tile maps onto the fp8 max
    assert r.abs().max().item() == pytest.approx(torch.finfo(dtype).max, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 128])
def test_qdq_relative_error_bounds(dtype, block):
    x = spread((8, 256), seed=1)
    y = quantize_dequantize(x, dtype, block)
    scale = ref_tile_scales(x, dtype, block)
    normal = (x / scale).abs() >= torch.finfo(dtype).smallest_normal
    rel = ((y - x).abs() / x.abs())[normal]
    bound = REL_BOUND[dtype]
    assert normal.float().mean() > 0.3
    assert rel.max() <= bound * (1 + 1e-5)
    assert rel.max() > bound / 2  # the rounding is really that coarse: the bound is tight
    assert rel.mean() < bound / 2
    # below the normal range (a tensor over 24 decades has some): the absolute error is at most half the
    # subnormal spacing (times the scale), values under half the smallest subnormal flush to zero
    x = spread((8, 256), seed=1, decades=24)
    y = quantize_dequantize(x, dtype, block)
    scale = ref_tile_scales(x, dtype, block)
    sub = (x / scale).abs() < torch.finfo(dtype).smallest_normal
    step = torch.finfo(dtype).smallest_normal * 2.0 ** -{E4M3: 3, E5M2: 2}[dtype]  # subnormal spacing
    assert sub.sum() > 10 and (y[sub] == 0).any()
    assert ((y - x).abs() / scale)[sub].max() <= step / 2 * (1 + 1e-5)


def test_tile_scales_are_independent():
    x = spread((4, 256), seed=2)
    spiked = x.clone()
    spiked[0, 3] = 1e6
    for dtype in DTYPES:
        tiled, clean = quantize_dequantize(spiked, dtype, 128), quantize_dequantize(x, dtype, 128)
        untouched = torch.ones_like(x, dtype=torch.bool)
        untouched[0, :128] = False  # only the spike's own 1x128 tile changes scale
        assert torch.equal(tiled[untouched], clean[untouched])
        assert not torch.equal(tiled[0, :128], clean[0, :128])
    # per-tensor e4m3: the spike crushes small values everywhere to zero (this is what tiles prevent)
    per_tensor = quantize_dequantize(spiked, E4M3)
    assert (per_tensor[1:] == 0).float().mean() > 0.5
    assert (quantize_dequantize(spiked, E4M3, 128)[1:] == 0).float().mean() < 0.05


def test_weight_blocks_are_independent():
    w = spread((200, 300), seed=3)  # partial blocks in both dims
    for dtype in DTYPES:
        y = quantize_dequantize_weight(w, dtype, 128)
        assert torch.equal(y, ref_qdq(w, dtype, ref_block_scales(w, dtype, 128)))
        q, s = quantize_blocks(w, (128, 128), dtype)
        assert q.dtype == dtype and s.shape == (2, 3)
    spiked = w.clone()
    spiked[0, 0] = 1e6
    a, b = quantize_dequantize_weight(spiked, E4M3), quantize_dequantize_weight(w, E4M3)
    untouched = torch.ones_like(w, dtype=torch.bool)
    untouched[:128, :128] = False
    assert torch.equal(a[untouched], b[untouched])
    assert (a[1:128, 1:128] == 0).float().mean() > 0.5  # same block as the spike: crushed


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_stay_zero_without_nan(dtype):
    for shape in [(3, 130), (0, 128), (1,)]:
        z = torch.zeros(shape)
        for y in (quantize_dequantize(z, dtype), quantize_dequantize(z, dtype, 128)):
            assert torch.equal(y, z)
    assert torch.equal(quantize_dequantize_weight(torch.zeros(130, 7), dtype), torch.zeros(130, 7))
    x = torch.zeros(2, 256)
    x[1, 200] = 3.0  # one non-zero tile among zero tiles
    y = quantize_dequantize(x, dtype, 128)
    assert not y.isnan().any() and torch.equal(y, x)  # the tile max is exactly representable
    xb = spread((4, 256)).bfloat16()
    yb = quantize_dequantize(xb, dtype, 128)
    assert yb.dtype == torch.bfloat16 and yb.isfinite().all()
    with pytest.raises(ValueError):
        quantize_dequantize(x, torch.float16)


# ------------------------------------------------------------------------------ FP8Linear
def ref_linear_grads(x, w, b, g):
    """By hand: e4m3 tiles/blocks in forward, e5m2 1x128 tiles on grad_out, bias grad from the raw gradient."""
    xq = ref_qdq(x, E4M3, ref_tile_scales(x, E4M3, 128))
    wq = ref_qdq(w, E4M3, ref_block_scales(w, E4M3, 128))
    g2 = g.reshape(-1, g.shape[-1])
    gq = ref_qdq(g2, E5M2, ref_tile_scales(g2, E5M2, 128))
    out = F.linear(xq, wq, b)
    grad_x = (gq @ wq).view(x.shape)
    grad_w = gq.t() @ xq.reshape(-1, x.shape[-1])
    return out, grad_x, grad_w, g2.sum(0)


def test_fp8_linear_forward_backward_match_reference():
    torch.manual_seed(0)
    lin = nn.Linear(200, 300)
    with torch.no_grad():
        lin.bias.normal_()
    weight, bias = lin.weight, lin.bias
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)  # built before the swap: must still see the gradients
    fp8 = FP8Linear(lin)
    assert fp8.weight is weight and fp8.bias is bias and list(fp8.state_dict()) == ["weight", "bias"]

    x = spread((2, 5, 200), seed=4).requires_grad_()
    g = spread((2, 5, 300), seed=5) * 1e-3
    out = fp8(x)
    ref_out, ref_gx, ref_gw, ref_gb = ref_linear_grads(x.detach(), weight.detach(), bias.detach(), g)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, lin.__class__.forward(lin, x), rtol=1e-3, atol=0)  # FP8 differs from fp32

    out.backward(g)
    torch.testing.assert_close(x.grad, ref_gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bias.grad, ref_gb)
    # e5m2 on the gradient matters: the reference with an unquantized gradient is measurably different
    xq = ref_qdq(x.detach(), E4M3, ref_tile_scales(x.detach(), E4M3, 128)).reshape(-1, 200)
    assert not torch.allclose(weight.grad, g.reshape(-1, 300).t() @ xq, rtol=1e-3, atol=0)

    before = weight.detach().clone()
    opt.step()
    assert not torch.equal(weight.detach(), before)


def test_fp8_linear_bf16_and_no_bias():
    torch.manual_seed(1)
    lin = nn.Linear(64, 48, bias=False).bfloat16()
    fp8 = FP8Linear(lin)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and fp8.bias is None
    w = lin.weight.detach()
    xq = ref_qdq(x.detach(), E4M3, ref_tile_scales(x.detach(), E4M3, 128))
    wq = ref_qdq(w, E4M3, ref_block_scales(w, E4M3, 128))
    torch.testing.assert_close(out, F.linear(xq, wq))
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.bfloat16
    assert x.grad.isfinite().all() and lin.weight.grad.isfinite().all()


# ------------------------------------------------------------------------------ convert_to_fp8
def tiny_dense(seed: int = 0) -> Transformer:
    return Transformer(preset("tiny-dense")).init_weights(seed)


def test_convert_swaps_all_but_head_and_keeps_state_dict():
    ref = tiny_dense()
    m = tiny_dense()
    params = dict(m.named_parameters())
    n_linear = sum(type(mod) is nn.Linear for mod in m.modules())
    n = convert_to_fp8(m)
    assert n == n_linear - 1 == 2 * 7  # per layer q, k, v, o, gate, up, down
    assert type(m.lm_head) is nn.Linear
    assert all(isinstance(mod, FP8Linear) for name, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and name != "lm_head")
    assert dict(m.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in m.named_parameters())  # the same Parameter objects
    sd, sd_ref = m.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref) and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    assert convert_to_fp8(m) == 0  # idempotent
    m.init_weights(0)  # FP8Linear is an nn.Linear: r1kit's init still reaches it

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids), m(ids)
    assert (a - b).norm() / a.norm() < 0.1 and not torch.equal(a, b)


def test_convert_custom_skip_and_moe_experts_untouched():
    m = Transformer(preset("tiny-moe")).init_weights(0)
    n_linear = sum(type(mod) is nn.Linear for mod in m.modules())
    assert convert_to_fp8(m, skip=lambda name, lin: "mlp" in name) > 0
    assert all(type(mod) is nn.Linear for name, mod in m.named_modules() if ".mlp." in name
               and isinstance(mod, nn.Linear))
    assert isinstance(m.lm_head, FP8Linear)  # a custom skip replaces the default one entirely
    m2 = Transformer(preset("tiny-moe")).init_weights(0)
    assert convert_to_fp8(m2) == n_linear - 1  # MLA projections, shared experts, dense MLP, MTP eh_proj
    assert any(isinstance(mod, Experts) for mod in m2.modules())  # routed experts: stacked params, untouched
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = m2.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for n, p in m2.named_parameters() if "mtp" not in n and "proj" in n)


def test_fp8_training_tracks_fp32():
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(2, 512, (2, 33), generator=gen)
    ids, targets = seq[:, :-1], seq[:, 1:]
    curves = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        m = tiny_dense(0).train()
        if fp8:
            convert_to_fp8(m)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            loss = m.loss(ids, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    ref, fp8 = curves
    assert fp8[-1] < 0.8 * fp8[0]  # it learns the repeated batch
    assert ref[-1] < 0.8 * ref[0]
    rel = ((fp8 - ref).abs() / ref).max()
    assert rel < 0.05, f"FP8 loss drifts {rel:.3f} from fp32: {fp8.tolist()} vs {ref.tolist()}"
