"""The C decode kernels (r1kit/kernels) against their reference, F.linear."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r1kit import hardware, kernels

# CI sets R1KIT_REQUIRE_KERNELS=1: on a CPU with AVX-512 bf16 a kernel build failure is then an error, not a skip
if (kernels.load() is None and os.environ.get("R1KIT_REQUIRE_KERNELS") == "1"
        and "avx512_bf16" in hardware.cpu_flags()):
    raise RuntimeError(f"R1KIT_REQUIRE_KERNELS=1 but the CPU kernels are unavailable: {kernels.why_not()}")
pytestmark = pytest.mark.skipif(kernels.load() is None, reason=f"CPU kernels unavailable: {kernels.why_not()}")

# (rows, K, N): K not a multiple of 32 or 16 exercises the scalar tails
SHAPES = [(1, 64, 48), (1, 96, 200), (1, 40, 13), (3, 100, 33), (4, 64, 7), (8, 256, 64), (2, 7, 5)]


@pytest.mark.parametrize("rows,K,N", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_kernel_matches_f_linear(rows, K, N, bias):
    g = torch.Generator().manual_seed(rows * K + N)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    with torch.inference_mode():
        got = kernels.linear(x, w, b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())  # exact fp32 products and sums
    assert got.dtype == torch.bfloat16 and got.shape == (rows, N)
    # both round one fp32 sum to bf16: at most one bf16 ulp apart (plus fp32 summation order)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("rows,K,N", SHAPES)
def test_int8_kernel_matches_dequantized_reference(rows, K, N):
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scale = torch.rand(N, generator=g) / 50 + 1e-3
    b = torch.randn(N, generator=g).bfloat16()
    with torch.inference_mode():
        got = kernels.linear_int8(x, w, scale, b)
    want = F.linear(x.float(), w.float()) * scale + b.float()  # exact products of the bf16 activations
    # int16 activations round each value by at most half a step of max|x| / 32767: far below bf16's output
    # rounding (one part in 256), which is all that may separate the kernel from the exact result
    bound = 0.5 * x.float().abs().amax(-1, keepdim=True) / 32767 * (w.float().abs().sum(-1) * scale)
    assert ((got.float() - want).abs() <= bound + want.abs() * 2 ** -8 + 1e-6).all()
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-3)


def test_int8_kernel_does_not_overflow_int32():
    """Largest magnitudes over a long row: the int32 partial sums are flushed to fp32 before they overflow."""
    K = 16384
    x = torch.full((1, K), 3.0).bfloat16()
    w = torch.full((2, K), 127, dtype=torch.int8)
    w[1] = -128
    with torch.inference_mode():
        got = kernels.linear_int8(x, w, torch.ones(2))
    torch.testing.assert_close(got.float(), torch.tensor([[3.0 * 127 * K, -3.0 * 128 * K]]), rtol=2 ** -8, atol=0)


def test_batch_dims_and_fallbacks():
    x = torch.randn(2, 1, 64).bfloat16()  # (B, T, C) decode input
    w = torch.randn(32, 64).bfloat16()
    with torch.inference_mode():
        assert kernels.linear(x, w).shape == (2, 1, 32)
        many = torch.randn(20, 64).bfloat16()  # more rows than the kernel takes: F.linear
        torch.testing.assert_close(kernels.linear(many, w), F.linear(many, w))
        assert kernels.linear_int8(many, w.to(torch.int8), torch.ones(32)) is None
    xf = torch.randn(1, 64, requires_grad=True)  # fp32 and autograd go to F.linear, gradients flow
    kernels.linear(xf, w.float()).sum().backward()
    assert xf.grad is not None


def test_accelerate_swaps_linears_and_keeps_outputs(make_model):
    model = make_model("tiny-dense").to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        before = model(ids)[:, -1]
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache)
        step_before = model(ids[:, 3:], cache)[:, -1]
    keys = set(model.state_dict())
    n = kernels.accelerate(model)
    assert n == sum(isinstance(m, nn.Linear) for m in model.modules()) and n > 0
    assert set(model.state_dict()) == keys  # same parameters, same names
    with torch.inference_mode():
        torch.testing.assert_close(model(ids)[:, -1], before)  # 4-row prefill: kernel for <= 8 rows
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache)
        torch.testing.assert_close(model(ids[:, 3:], cache)[:, -1], step_before, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 100), (2, 7)])
def test_rms_norm_kernel_matches_the_torch_ops(shape):
    from r1kit.model.attention import RMSNorm

    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(shape[-1], generator=g).bfloat16()
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    with torch.inference_mode():
        got = kernels.rms_norm(x, norm.weight, norm.eps)
        x32 = x.float()  # RMSNorm's own ops (the reference path)
        want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
        assert torch.equal(norm(x), got)  # the module takes the kernel
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)  # one bf16 rounding apart at most
    assert kernels.rms_norm(x.float(), norm.weight, norm.eps) is None  # fp32: the module's torch ops
