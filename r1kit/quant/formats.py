"""The three weight formats as plain functions on tensors: quantize (..., K) weights, dequantize them back.

Every function works on the last dimension (the input features K of a linear layer, or of a stacked expert
weight (E, N, K)), so the same code serves ``nn.Linear`` weights and the MoE experts' stacked weights.
Quantization is computed in fp32 whatever the weight's dtype; dequantization is computed in fp32 and then
cast to the requested dtype (so a dequantized weight is the same whichever path asked for it).

int8  symmetric per output row: scale = amax(|w|) / 127 (fp32), q = round(w / scale) in [-127, 127];
      w ~ q * scale, error <= scale / 2 per element.
int4  asymmetric per group of G consecutive inputs (G in 32, 64, 128, 256): scale = (max - min) / 15,
      zero = (max + min) / 2 (the group's midpoint), q = clamp(round((w - zero) / scale) + 8, 0, 15);
      w ~ (q - 8) * scale + zero. This is the dequantization formula of PyTorch's CPU int4 kernel
      (``torch._weight_int4pack_mm_for_cpu``), so the same scale/zero feed both paths. The scale and zero
      are stored in bf16 by default (as torchao does; 4 bytes per group); q is computed from the stored
      (rounded) scale and zero, so the error stays <= scale / 2 except where the clamp bites (the group's
      extremes), where the rounding of the zero (<= 2^-8 |zero| in bf16) adds to it. Two nibbles per byte: byte j
      of a row holds column 2j in its low nibble and column 2j + 1 in its high nibble.
fp8   float8_e4m3fn with an fp32 scale per output row (scale = amax / 448) or, for 2-D weights, per
      (bo x bi) block (DeepSeek-V3 uses 128 x 128; its checkpoints call this tensor ``weight_scale_inv``);
      w ~ q * scale. Relative error <= 2^-4 per element (3 mantissa bits) above the subnormal range. The
      scaling itself is r1kit.fp8's, shared with checkpoint loading and FP8 training.

A row (int8, fp8), group (int4) or block (fp8) that is all zeros gets scale 1, so zeros stay zeros and
nothing divides by zero.
"""

from __future__ import annotations

import math

import torch

from r1kit import fp8

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
FP8_DTYPE = fp8.E4M3


# ---------------------------------------------------------------------------------------------------- int8


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> q int8 (..., K), scale fp32 (...,): symmetric, one scale per row."""
    w = w.detach().float()
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


# ---------------------------------------------------------------------------------------------------- int4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., K) integers in [0, 15] -> uint8 (..., K/2): column 2j low nibble, 2j + 1 high nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/2) -> uint8 (..., K) in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def check_int4_group(k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, not {group_size}")
    if k % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the {k} input features")


def quantize_int4(w: torch.Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (..., K) -> packed uint8 (..., K/2), scale (..., K/G), zero (..., K/G), both in scale_dtype."""
    *lead, k = w.shape
    check_int4_group(k, group_size)
    g = w.detach().float().reshape(*lead, k // group_size, group_size)
    scale, zero = int4_params(g, scale_dtype)
    return pack_int4(int4_codes(g, scale[..., None], zero[..., None]).reshape(*lead, k)), scale, zero


def int4_params(g: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups g (..., G) fp32 -> the int4 scale and zero (...,) in scale_dtype that quantize_int4 stores for them."""
    lo, hi = g.amin(-1), g.amax(-1)
    scale32 = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    scale = scale32.to(scale_dtype)  # rounded *up*, so that the 16 levels still span [min, max]
    scale = torch.where(scale.float() < scale32, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    return scale, ((hi + lo) / 2).to(scale_dtype)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The int4 codes in [0, 15] (fp32) of fp32 weights w under scale and zero (broadcast against w)."""
    return (torch.round((w - zero.float()) / scale.float()) + 8).clamp_(0, 15)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - 8) * scale + zero per group, computed as q * scale + (zero - 8 * scale) on the low and the high
    nibbles separately, written interleaved (about 9x faster on CPU than unpacking first)."""
    *lead, half = packed.shape
    k, groups = 2 * half, scale.shape[-1]
    s = scale.float()[..., None]
    z = zero.float()[..., None] - 8 * s
    p = packed.reshape(*lead, groups, k // groups // 2)
    w = torch.empty(*p.shape, 2, dtype=torch.float32, device=packed.device)
    torch.addcmul(z, (p & 15).float(), s, out=w[..., 0])
    torch.addcmul(z, (p >> 4).float(), s, out=w[..., 1])
    return w.view(*lead, k).to(dtype)


# ---------------------------------------------------------------------------------------------------- fp8


def quantize_fp8(w: torch.Tensor, block_size: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., K) -> q float8_e4m3fn (..., K), fp32 scale (...,) per row; or with block_size (bo, bi) and a
    2-D w (N, K): scale (ceil(N / bo), ceil(K / bi)) per block (edge blocks are partial). See r1kit.fp8."""
    if block_size is not None:
        return fp8.quantize_blocks(w, block_size, FP8_DTYPE)
    q, scale = fp8.quantize_tiles(w, FP8_DTYPE, w.shape[-1])  # a row is one 1 x K tile
    return q, scale[..., 0, 0]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if block_size is not None:
        return fp8.dequantize_blocks(q, scale, block_size, dtype)
    return fp8.dequantize_tiles(q, scale[..., None, None], q.shape[-1], dtype)
