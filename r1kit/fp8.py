"""FP8 scaling, the one implementation: a tensor to float8 codes with fp32 scales, and back.

    q, scale = quantize_blocks(w)                 # 2-D weight, one scale per 128x128 block (DeepSeek-V3's format)
    w_hat = dequantize_blocks(q, scale)           # q * scale, fp32
    q, scale = quantize_tiles(x, E4M3, 128)       # one scale per 1x128 tile of the last dim; tile=None: per tensor

The granularities are DeepSeek-V3's (arXiv:2412.19437, sec. 3.3): per (bo x bi) block of a 2-D weight for
DeepSeek's released checkpoints (e4m3, 128 x 128; their checkpoints call the scale ``weight_scale_inv``) and for
FP8 training's weights; per 1 x k tile along the last dim for FP8 training's activations and gradients (k = K is
one scale per row). Edge blocks and tiles are partial. Every user calls these functions: ``r1kit.checkpoint``
(loading DeepSeek's FP8 weights, ``r1kit convert --dtype fp8``), ``r1kit.quant.formats`` (``r1kit quantize --to
fp8``) and ``r1kit.train.fp8`` (FP8 training).

scale = amax / finfo(dtype).max in fp32 per block or tile, q = clamp(x / scale, -max, max) cast to dtype (the
clamp guards against x / scale landing a hair above max, which e5m2 would turn into inf), x ~ q * scale. A block
or tile that is all zeros gets scale 1, so zeros stay zeros and nothing divides by zero. Relative error per
element <= 2^-4 (e4m3) / 2^-3 (e5m2) above the subnormal range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn  # more mantissa (3 bits), max 448: weights and activations
E5M2 = torch.float8_e5m2  # more range (5 exponent bits), max 57344: gradients
FP8_DTYPES = (E4M3, E5M2)
BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype; ValueError for any other dtype."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, not {dtype}")
    return torch.finfo(dtype).max


def _scale_of(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """fp32 scale mapping amax to the fp8 max; 1 where amax is 0 (zeros stay zeros, no 0/0)."""
    return torch.where(amax > 0, amax / fmax, torch.ones_like(amax))


def _cast(x32: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    return (x32 / scale).clamp(-fmax, fmax).to(dtype)


# ---------------------------------------------------------------------------------------------------- blocks


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = BLOCK, dtype: torch.dtype = E4M3
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D w (N, K) -> q (N, K) in `dtype`, fp32 scale (ceil(N / bo), ceil(K / bi)), one per (bo x bi) block."""
    fmax = fp8_max(dtype)
    if w.ndim != 2:
        raise ValueError(f"fp8 block scales need a 2-D weight, got shape {tuple(w.shape)}")
    (n, k), (bo, bi) = w.shape, block
    if bo < 1 or bi < 1:
        raise ValueError(f"fp8 block must be two positive ints, not {block}")
    nb, kb = -(-n // bo), -(-k // bi)
    padded = F.pad(w.detach().float(), (0, kb * bi - k, 0, nb * bo - n))  # zero padding keeps each block's amax
    blocks = padded.view(nb, bo, kb, bi)
    scale = _scale_of(blocks.abs().amax(dim=(1, 3)), fmax)  # (nb, kb)
    q = _cast(blocks, scale[:, None, :, None], dtype, fmax).view(nb * bo, kb * bi)[:n, :k]
    return q, scale


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Block scales (nb, kb) -> one per element (N, K)."""
    bo, bi = block
    return scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:shape[0], :shape[1]]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) * its block scales (ceil(N / bo), ceil(K / bi)) -> (N, K) in `dtype` (computed in fp32).

    ValueError naming both shapes when the scales do not tile the weight.
    """
    (n, k), (bo, bi) = q.shape, block
    if tuple(scale.shape) != (-(-n // bo), -(-k // bi)):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not match a {n}x{k} weight in {bo}x{bi} blocks")
    return (q.float() * expand_blocks(scale.float(), block, (n, k))).to(dtype)


# ---------------------------------------------------------------------------------------------------- tiles


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with its last dim zero-padded to `size` (zeros keep every tile's amax); x itself when it fits."""
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def quantize_tiles(x: torch.Tensor, dtype: torch.dtype = E4M3, tile: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> q of x's shape in `dtype`, fp32 scale: per tensor (tile=None, scale shape ()) or one per 1 x
    `tile` slice of the last dim (scale shape (..., ceil(K / tile), 1))."""
    fmax = fp8_max(dtype)
    x32 = x.detach().float()
    if tile is None:
        scale = _scale_of(x32.abs().amax() if x32.numel() else x32.new_zeros(()), fmax)
        return _cast(x32, scale, dtype, fmax), scale
    if tile < 1:
        raise ValueError(f"fp8 tile must be a positive int or None, not {tile}")
    k = x32.shape[-1]
    n = -(-k // tile)
    tiles = _pad_last(x32, n * tile).unflatten(-1, (n, tile))  # (..., n, tile)
    scale = _scale_of(tiles.abs().amax(-1, keepdim=True), fmax)  # (..., n, 1)
    return _cast(tiles, scale, dtype, fmax).flatten(-2)[..., :k], scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_tiles` (given the same `tile`): q * scale in `dtype`, computed in fp32."""
    q32 = q.float()
    if tile is None:
        return (q32 * scale).to(dtype)
    k, n = q32.shape[-1], scale.shape[-2]
    return (_pad_last(q32, n * tile).unflatten(-1, (n, tile)) * scale).flatten(-2)[..., :k].to(dtype)
