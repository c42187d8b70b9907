"""FP8 mixed-precision training for linear layers, after DeepSeek-V3's FP8 recipe (arXiv:2412.19437, sec. 3.3).

What is in FP8 (per swapped ``nn.Linear``, i.e. per GEMM):

* forward (Fprop): the input activation, e4m3, one scale per 1x128 tile along the last (feature) dim, and the
  weight, e4m3, one scale per 128x128 block. The products accumulate in the compute dtype (fp32 or bf16, as
  the input comes), the output is in that dtype.
* backward (Dgrad, Wgrad): the incoming output gradient, e5m2, one scale per 1x128 tile; grad_input =
  g_q @ W_q and grad_weight = g_q^T @ x_q reuse the FP8 input and weight saved by the forward (they are saved
  as real float8 tensors plus fp32 scales, so the activation memory kept for backward is FP8 as in DeepSeek-V3).
  The bias gradient is a reduction, not a GEMM: it is summed from the unquantized gradient.

What stays in high precision (the weights and optimizer states themselves are never stored in FP8: the
``nn.Parameter``s keep their dtype, fp32 master weights included):

* the embedding, the output head ``lm_head``, linears with in_features or out_features < 16 (see
  ``default_skip``), the MoE router (``r1kit.model.moe.Router``, not an ``nn.Linear``, computed in fp32), the
  RMSNorms, the attention core (softmax(QK^T)V) and RoPE, which DeepSeek-V3 also keeps in bf16/fp32;
* the routed MoE experts: ``r1kit.model.moe.Experts`` holds stacked 3-D parameters used with
  ``torch._grouped_mm``, not ``nn.Linear``s, so ``convert_to_fp8`` leaves them in the model's dtype (bf16 or
  fp32). DeepSeek-V3 runs the expert GEMMs in FP8 too; this module does not (the shared experts and dense MLPs
  are ordinary ``nn.Linear``s and are converted);
* the MLA "absorb" decode path reads ``kv_b_proj.weight`` directly and so uses the high-precision weight.

Numerical emulation: on CPU (and on GPUs without FP8 tensor cores) every quantization is a real round trip
through ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` storage (scale, cast, cast back, unscale), so training
sees exactly the rounding, saturation and underflow of FP8 storage with fine-grained scales; the matmuls then
run in fp32/bf16 on the dequantized values. It reproduces FP8's numerics (up to the accumulation precision:
DeepSeek-V3 promotes partial sums to fp32 every 128 elements, the emulation accumulates as the fp32/bf16 GEMM
does), not its speed: the emulation is slower than a plain ``nn.Linear``.

CUDA: when the input is on a GPU of compute capability >= 8.9 (Ada, Hopper) and ``torch._scaled_mm`` exists,
the forward GEMM runs as a real FP8 matmul with *per-tensor* scales (``_scaled_mm`` in this PyTorch takes
per-tensor or row-wise scales, not 1x128 / 128x128 blocks); the backward stays emulated with those per-tensor
FP8 tensors. Any failure of that path warns once and falls back to the emulation. UNTESTED: r1kit's test
machine has no GPU; only the emulation is covered by ``tests/test_fp8.py``.

Scales are fp32, ``amax / finfo(fp8).max`` per tile/block (DeepSeek-V3's online quantization); an all-zero
tile gets scale 1 so that zeros stay zeros and nothing divides by zero. The quantization itself is r1kit.fp8's,
shared with checkpoint I/O and ``r1kit quantize``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.fp8 import E4M3, E5M2, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles

TILE = 128  # 1xTILE activation/gradient tiles, TILExTILE weight blocks
WEIGHT_BLOCK = (TILE, TILE)


def quantize_dequantize(x: torch.Tensor, dtype: torch.dtype, tile: int | None = None) -> torch.Tensor:
    """Round x through fp8 storage: scale (absmax -> finfo(dtype).max), cast to `dtype`, cast back, unscale.

    tile=None: one scale per tensor; tile=k: one scale per 1xk tile along the last dim (DeepSeek-V3 uses 1x128
    for activations and gradients). The result has x's dtype and shape (in bf16 the unscaled value is rounded
    once more to bf16).
    """
    q, scale = quantize_tiles(x, dtype, tile)
    return dequantize_tiles(q, scale, tile, x.dtype)


# ---------------------------------------------------------------------------------------------- CUDA path
_SCALED_MM_BROKEN = False  # set after the first failure of the real FP8 path: warn once, then always emulate


def _scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where the real FP8 GEMM can run: CUDA, capability >= 8.9, _scaled_mm, dims multiple of 16."""
    if _SCALED_MM_BROKEN or not x.is_cuda or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _scaled_mm_forward(x2: torch.Tensor, weight: torch.Tensor):
    """Real FP8 forward with per-tensor scales (UNTESTED here: no GPU). x2 (M, K), weight (N, K) -> (M, N)."""
    xq, xs = quantize_tiles(x2, E4M3)
    wq, ws = quantize_tiles(weight, E4M3)
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=x2.dtype)  # wq.t(): column-major
    if isinstance(out, tuple):  # PyTorch < 2.5 returned (out, amax)
        out = out[0]
    return out, (xq, xs), (wq, ws)


# ---------------------------------------------------------------------------------------------- autograd
class FP8LinearFunction(torch.autograd.Function):
    """y = x_q @ W_q^T + b with x_q, W_q e4m3 (1x128 tiles / 128x128 blocks); backward with e5m2 gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        global _SCALED_MM_BROKEN
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        out2 = None
        if _scaled_mm_ok(x2, weight):
            try:
                out2, (xq, xs), (wq, ws) = _scaled_mm_forward(x2, weight)
                x_blk = w_blk = None  # per-tensor scales
            except Exception as e:  # any failure of the untested fast path falls back to the emulation
                _SCALED_MM_BROKEN = True
                warnings.warn(f"FP8 torch._scaled_mm path failed ({e!r}); using the FP8 emulation", stacklevel=2)
                out2 = None
        if out2 is None:
            xq, xs = quantize_tiles(x2, E4M3, TILE)
            wq, ws = quantize_blocks(weight, WEIGHT_BLOCK, E4M3)
            x_blk, w_blk = TILE, WEIGHT_BLOCK
            out2 = F.linear(dequantize_tiles(xq, xs, TILE, dtype), dequantize_blocks(wq, ws, WEIGHT_BLOCK, dtype))
        if bias is not None:
            out2 = out2 + bias.to(dtype)
        ctx.save_for_backward(xq, xs, wq, ws)  # FP8 tensors + fp32 scales, as DeepSeek-V3 caches activations
        ctx.blocks, ctx.dtype, ctx.x_shape = (x_blk, w_blk), dtype, x.shape
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return out2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        x_blk, w_blk = ctx.blocks
        dtype = ctx.dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gq = quantize_dequantize(g2, E5M2, TILE).to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize_blocks(wq, ws, w_blk, dtype) if w_blk is not None else dequantize_tiles(wq, ws, None, dtype)
            grad_x = (gq @ w).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (gq.t() @ dequantize_tiles(xq, xs, x_blk, dtype)).to(ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.b_dtype)  # a reduction, not a GEMM: from the unquantized gradient
        return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------- module
class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmuls run in (emulated) FP8; built around an existing layer's Parameters.

    ``weight`` and ``bias`` are the very Parameter objects of the wrapped layer, so optimizers that already
    hold them, tied weights, ``state_dict`` keys and checkpoints are unaffected. It subclasses ``nn.Linear`` so
    that code testing ``isinstance(m, nn.Linear)`` (e.g. ``Transformer.init_weights``) keeps working; no new
    parameters are allocated.
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias  # a Parameter or None (registered as None, like nn.Linear(bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 fwd (1x{TILE} act, {TILE}x{TILE} weight) / e5m2 grad"


def default_skip(name: str, linear: nn.Linear) -> bool:
    """Keep in high precision: the output head (``lm_head``) and tiny layers (in or out features < 16)."""
    return name.split(".")[-1] == "lm_head" or min(linear.in_features, linear.out_features) < 16


def convert_to_fp8(model: nn.Module, skip: Callable[[str, nn.Linear], bool] | None = None) -> int:
    """Swap every ``nn.Linear`` of `model` for an ``FP8Linear`` in place; returns how many were swapped.

    ``skip(name, linear)`` (qualified module name, layer) returning True keeps a layer as it is; the default,
    `default_skip`, keeps ``lm_head`` and layers narrower than 16. Layers already FP8 are left alone, so a
    second call swaps nothing. The routed MoE experts (``r1kit.model.moe.Experts``: stacked 3-D Parameters, not
    ``nn.Linear``) and the router are not touched and stay in the model's dtype. Parameters, their names and the
    state_dict are unchanged.
    """
    skip = default_skip if skip is None else skip
    swaps = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is not nn.Linear:  # exact type: not FP8Linear, not other Linear subclasses
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not skip(name, child):
                swaps.append((parent, child_name, child))
    done: dict[int, FP8Linear] = {}  # a Linear registered under two names is swapped once and shared
    for parent, child_name, child in swaps:
        if id(child) not in done:
            done[id(child)] = FP8Linear(child)
        setattr(parent, child_name, done[id(child)])
    return len(done)
