"""Weight-only quantized replacements for ``nn.Linear``: Int8Linear, Int4Linear, Float8WeightLinear.

Each module keeps ``in_features``/``out_features``, takes activations of any float dtype and shape (..., K)
and returns the activation dtype. ``reference_forward(x)`` is the definition: dequantize the weight (in
fp32, then cast to x's dtype) and ``F.linear``. ``forward`` picks the fastest path that computes the same
thing; setting ``module.reference = True`` routes ``forward`` through the reference (tests, debugging).
The reference is also used whenever autograd needs a gradient through x (the fast kernels have none).

state_dict (buffers; the quantized tensor keeps the name ``weight``, and ``bias`` is the original bias):

    Int8Linear          weight int8 (N, K); weight_scale fp32 (N,)                        w = weight * scale[:, None]
    Int4Linear          weight uint8 (N, K/2), two nibbles per byte (column 2j low, 2j+1 high);
                        weight_scale, weight_zero bf16 (N, K/G)       w = (nibble - 8) * scale + zero, per group
    Float8WeightLinear  weight float8_e4m3fn (N, K); weight_scale fp32 (N,) per row, or (ceil(N/bo), ceil(K/bi))
                        per (bo x bi) block                                               w = weight * scale

The group size G (Int4Linear) and block size (Float8WeightLinear) are module options, not in the state_dict
(they can be read off the shapes: G = K / weight_scale.shape[1]). To load a quantized state_dict, build the
modules first (constructor, or ``quantize_model(..., structure_only=True)``), then ``load_state_dict``.

Moving or casting a module (``.to()``, ``.float()``, ``.bfloat16()``) never changes the dtype of the quantized
weight or its scales (a cast would turn float8 weights into bf16 ones and round fp32 scales); the bias follows
the cast as in nn.Linear.

Fast paths (CPU; measured on a shared 2-core AVX-512 machine, one thread, (M, 2048) x (2048, 2048); the
numbers are noisy, ``python benchmarks/bench_quant_linear.py`` repeats them):

* Int8Linear, bf16 activations with M <= 8 rows: ``torch._weight_int8pack_mm`` (x bf16 2-D, last dim
  contiguous; int8 (N, K) weight; scales (N,) in x's dtype): ~0.23-0.25 ms at M = 1 against ~0.36-0.41 ms for
  ``F.linear`` on an already dequantized bf16 weight (1.5-1.75x faster). The kernel is ~8x slower than
  ``F.linear`` for fp32/fp16 activations and loses to the fallback from M ~ 16 on, so everything else runs
  ``F.linear(x, weight.to(x.dtype)) * scale``: int8 values are exact in bf16/fp32 and a per-row scale commutes
  with the matmul, so the weight is only converted, never rescaled (fp32, M = 1: ~1.1 ms, against ~2.6 ms
  for dequantize + F.linear).
* Int8Linear, bf16 activations with M <= 8, when r1kit's C kernels are built: ``r1kit.kernels.linear_int8``
  (activations rounded to int16 per row, AVX-512 VNNI int16 x int8 dot products). Alone on a small weight that
  stays in cache it is no faster than ``_weight_int8pack_mm`` (bench_int8_gemv.py), but in a decode step,
  where every weight streams from memory, it is: qwen2-150m-shaped int8 decode, one thread, 88.7 against 56.6
  tokens/s. ``INT8_STREAM_MIN_BYTES`` (0) sets the smallest weight that takes it.
* Int4Linear, bf16 activations with M <= 64, out_features % 16 == 0: ``torch._weight_int4pack_mm_for_cpu``
  (~0.24 ms at M = 1, 1.5x faster than F.linear on a dequantized bf16 weight, ~20x faster than dequantizing
  per call). The kernel needs its own, CPU-specific weight layout (``_convert_weight_to_int4pack_for_cpu``):
  it is built from ``weight`` on the first fast call and cached (not in the state_dict), so a layer that used
  the fast path holds its int4 weight twice (K/2 bytes per row each: the pair is still half of int8). fp32
  activations and larger M dequantize on the fly (~3-5 ms for 2048 x 2048; the kernel in fp32 is slower).
* Float8WeightLinear with per-row scales: ``F.linear(x, weight.to(x.dtype)) * scale`` (e4m3 values are exact
  in bf16/fp32). Block scales: dequantize per call. CPU has no fp8 matmul and torch's float8 -> bf16/fp32
  conversion is slow (~4 ns per element: ~15-18 ms for 2048 x 2048), so on CPU this is storage compression
  only, ~40x slower than a bf16 F.linear at M = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit import kernels
from r1kit.quant.formats import (
    INT4_GROUP_SIZES,
    check_int4_group,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT4_MM = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
               and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))
# Largest number of activation rows for which the fast kernels beat the fallback, per activation dtype.
INT8_MM_MAX_ROWS = {torch.bfloat16: 8}
# int8 weights at least this large take r1kit's C GEMV (r1kit.kernels.linear_int8) for <= 8 rows. In a decode
# step every weight streams from memory and the C kernel is the faster one whatever the size (see the docstring).
INT8_STREAM_MIN_BYTES = 0
INT4_MM_MAX_ROWS = {torch.bfloat16: 64}


class _DequantizedLinear(torch.autograd.Function):
    """y = F.linear(x, module.dequantize(), bias) for a frozen quantized weight: the backward (the gradient of x
    only) dequantizes the weight again instead of autograd keeping the full-precision copy alive from forward to
    backward, so training adapters on a quantized base (QLoRA) holds quantized weights only, not every layer's
    dequantized one at once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:  # noqa: ANN001
        ctx.module, ctx.x_dtype = module, x.dtype
        return F.linear(x, module.dequantize(x.dtype), module._bias(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        w = ctx.module.dequantize(grad.dtype)  # (N, K)
        return (grad @ w).to(ctx.x_dtype), None


class QuantizedLinear(nn.Module):
    """Common part: shapes, bias, the reference switch, dtype-preserving moves, byte counts."""

    method = ""
    _quant_buffers: tuple[str, ...] = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | None,
                 bias_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.reference = False
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight this module represents."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: quantized values plus scales (and zeros); the bias is not counted."""
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self._quant_buffers)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: keep no dequantized weight for the backward
            return _DequantizedLinear.apply(x, self)
        return F.linear(x, self.dequantize(x.dtype), self._bias(x.dtype))

    def _use_reference(self, x: torch.Tensor) -> bool:
        return self.reference or (x.requires_grad and torch.is_grad_enabled())

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        kept = {n: self._buffers[n] for n in self._quant_buffers}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:  # a cast: move the original instead
                self._buffers[n] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        return x2 if x2.stride(-1) == 1 else x2.contiguous()


class Int8Linear(QuantizedLinear):
    """int8 weight, symmetric, one fp32 scale per output row (amax / 127)."""

    method = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | None = None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, device, bias_dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, False, w.device)
        m.weight, m.weight_scale = quantize_int8(w)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reference and self.weight.numel() >= INT8_STREAM_MIN_BYTES:  # decode: straight to the kernel
            y = kernels.linear_int8(x, self.weight, self.weight_scale, self.bias)  # None unless bf16, <= 8 rows,
            if y is not None:  # CPU, no autograd, kernels built
                return y
        if self._use_reference(x):
            return self.reference_forward(x)
        x2, dt = self._rows(x), x.dtype
        y = None
        if HAS_INT8_MM and x.device.type == "cpu" and x2.shape[0] <= INT8_MM_MAX_ROWS.get(dt, -1):
            y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(dt))
        if y is None:
            y = F.linear(x2, self.weight.to(dt)) * self.weight_scale.to(dt)
        return self._finish(y, x)


class Int4Linear(QuantizedLinear):
    """int4 weight, asymmetric per group of `group_size` inputs, two nibbles per byte; bf16 scale and zero."""

    method = "int4"
    _quant_buffers = ("weight", "weight_scale", "weight_zero")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | None = None,
                 bias_dtype: torch.dtype = torch.float32, group_size: int = 64,
                 scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features, bias, device, bias_dtype)
        check_int4_group(in_features, group_size)
        self.group_size, self.scale_dtype = group_size, scale_dtype
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self._cache: dict = {}  # the kernel's weight layout and scale/zero tensor, rebuilt when `weight` changes

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16
                    ) -> Int4Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, False, w.device, group_size=group_size,
                scale_dtype=scale_dtype)
        m.weight, m.weight_scale, m.weight_zero = quantize_int4(w, group_size, scale_dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, dtype)

    def _fast_ok(self, x2: torch.Tensor) -> bool:
        return (HAS_INT4_MM and x2.device.type == "cpu" and self.out_features % 16 == 0
                and self.group_size in INT4_GROUP_SIZES and x2.shape[0] <= INT4_MM_MAX_ROWS.get(x2.dtype, -1))

    def _kernel_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w, s, z = self.weight, self.weight_scale, self.weight_zero
        key = (w.data_ptr(), w._version, w.device)
        if self._cache.get("key") != key:  # new or reloaded weights: rebuild (about 12 ms for 2048 x 2048)
            packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(w).to(torch.int32), 1)
            self._cache = {"key": key, "packed": packed}
        skey = ("sz", dtype, s.data_ptr(), s._version, z.data_ptr(), z._version)
        if skey not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if not (isinstance(k, tuple) and k[0] == "sz")}
            self._cache[skey] = torch.stack((s.t(), z.t()), dim=-1).to(dtype).contiguous()  # (K/G, N, 2)
        return self._cache["packed"], self._cache[skey]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_reference(x):
            return self.reference_forward(x)
        x2 = self._rows(x)
        if not self._fast_ok(x2):
            return self.reference_forward(x)
        packed, sz = self._kernel_tensors(x.dtype)
        return self._finish(torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz), x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Float8WeightLinear(QuantizedLinear):
    """float8_e4m3fn weight with fp32 scales per output row (default) or per (bo x bi) block."""

    method = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | None = None,
                 bias_dtype: torch.dtype = torch.float32, block_size: tuple[int, int] | None = None):
        super().__init__(in_features, out_features, bias, device, bias_dtype)
        self.block_size = None if block_size is None else (int(block_size[0]), int(block_size[1]))
        if self.block_size is None:
            scale_shape: tuple[int, ...] = (out_features,)
        else:
            bo, bi = self.block_size
            scale_shape = (-(-out_features // bo), -(-in_features // bi))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block_size: tuple[int, int] | None = None) -> Float8WeightLinear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, False, w.device, block_size=block_size)
        m.weight, m.weight_scale = quantize_fp8(w, m.block_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_reference(x) or self.block_size is not None:
            return self.reference_forward(x)
        x2, dt = self._rows(x), x.dtype
        return self._finish(F.linear(x2, self.weight.to(dt)) * self.weight_scale.to(dt), x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"
