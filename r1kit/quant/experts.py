"""QuantizedExperts: a drop-in replacement for ``r1kit.model.moe.Experts`` with quantized stacked weights.

Same forward signature ``(x (N, C), weights (N, k), idx (N, k)) -> (N, C)``, same attributes ``n_experts`` and
``hidden``, and a ``forward_reference`` (so ``MoE.reference`` keeps working).

state_dict (buffers, named after Experts' parameters; E experts, C hidden size, I expert intermediate size):

    method  gate_up_proj (E, 2I, C) / down_proj (E, C, I)      + per-row scales              + zeros
    int8    int8, same shapes                                   *_scale fp32 (E, 2I) / (E, C)
    fp8     float8_e4m3fn, same shapes                          *_scale fp32 (E, 2I) / (E, C)
    int4    uint8 (E, 2I, C/2) / (E, C, I/2), two nibbles/byte  *_scale bf16 (E, 2I, C/G) / (E, C, I/G)  *_zero
            (same formulas as the linear layers, see r1kit.quant.formats)

forward: only the experts that received a token in this call (``idx.unique()``) are touched: their weights
are gathered and converted to the activation dtype (int8, fp8: a conversion, exact, with the per-row scale
applied to the grouped matmul's output rows instead of the weight; int4: full dequantization), then the same
sorted grouped dispatch as Experts runs over those U experts with ``torch._grouped_mm``.
Decode on CPU (<= 8 tokens, bf16, fewer (token, expert) pairs than experts): int8 experts instead run one by one
through r1kit's C int8 GEMV (``r1kit.kernels.linear_int8``), reading the int8 weights as stored; int4 experts
through torch's CPU int4 kernel, in its layout, built per expert on first use and kept (a second, packed copy
of each int4 expert that has decoded: at most the experts' int4 bytes again).
forward_reference: dequantize every expert (fp32, cast to x's dtype) and run Experts' per-token loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1kit import kernels
from r1kit.model.moe import dispatch_active, experts_loop
from r1kit.quant.formats import (
    FP8_DTYPE,
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
from r1kit.quant.linear import HAS_INT4_MM

EXPERT_METHODS = ("int8", "int4", "fp8")


class QuantizedExperts(nn.Module):
    """n routed SwiGLU experts with quantized stacked weights gate_up (E, 2I, C) and down (E, C, I)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, method: str = "int8", group_size: int = 64,
                 device: torch.device | None = None, scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if method not in EXPERT_METHODS:
            raise ValueError(f"unknown quantization method {method!r} for experts; expected one of {EXPERT_METHODS}")
        self.n_experts, self.dim, self.hidden, self.method = n_experts, dim, hidden, method
        self.group_size = group_size if method == "int4" else None
        self.reference = False
        self._int4_cache: dict = {}  # expert id -> torch's CPU int4 kernel layouts (decode path), see _int4_kernel
        for name, (rows, cols) in (("gate_up_proj", (2 * hidden, dim)), ("down_proj", (dim, hidden))):
            if method == "int4":
                check_int4_group(cols, group_size)
                g = cols // group_size
                self.register_buffer(name, torch.zeros(n_experts, rows, cols // 2, dtype=torch.uint8, device=device))
                self.register_buffer(f"{name}_scale", torch.ones(n_experts, rows, g, dtype=scale_dtype, device=device))
                self.register_buffer(f"{name}_zero", torch.zeros(n_experts, rows, g, dtype=scale_dtype, device=device))
            else:
                dtype = torch.int8 if method == "int8" else FP8_DTYPE
                self.register_buffer(name, torch.zeros(n_experts, rows, cols, dtype=dtype, device=device))
                self.register_buffer(f"{name}_scale", torch.ones(n_experts, rows, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, method: str = "int8", group_size: int = 64,
                     scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedExperts:
        """Quantize an ``r1kit.model.moe.Experts`` (each expert's rows quantized independently)."""
        gu, dn = experts.gate_up_proj, experts.down_proj
        m = cls(experts.n_experts, gu.shape[2], experts.hidden, method, group_size, gu.device, scale_dtype)
        for name, w in (("gate_up_proj", gu), ("down_proj", dn)):
            if method == "int8":
                parts = quantize_int8(w)
            elif method == "fp8":
                parts = quantize_fp8(w)
            else:
                parts = quantize_int4(w, group_size, scale_dtype)
            for suffix, t in zip(("", "_scale", "_zero"), parts, strict=False):
                setattr(m, name + suffix, t)
        return m

    @property
    def _buffer_names(self) -> tuple[str, ...]:
        parts = ("", "_scale", "_zero") if self.method == "int4" else ("", "_scale")
        return tuple(n + p for n in ("gate_up_proj", "down_proj") for p in parts)

    def weight_bytes(self) -> int:
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self._buffer_names)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - keep quantized dtypes through .to()/.float()
        kept = {n: self._buffers[n] for n in self._buffer_names}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            if self._buffers[n].dtype != old.dtype:
                self._buffers[n] = old.to(device=self._buffers[n].device)
        return self

    def _dequantize_one(self, name: str, dtype: torch.dtype, sel: torch.Tensor | None) -> torch.Tensor:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if sel is None else t[sel]

        q, s = pick(self._buffers[name]), pick(self._buffers[name + "_scale"])
        if self.method == "int8":
            return dequantize_int8(q, s, dtype)
        if self.method == "fp8":
            return dequantize_fp8(q, s, None, dtype)
        return dequantize_int4(q, s, pick(self._buffers[name + "_zero"]), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, experts: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E', 2I, C), down (E', C, I)) of all experts, or of the expert ids in `experts`."""
        return self._dequantize_one("gate_up_proj", dtype, experts), self._dequantize_one("down_proj", dtype, experts)

    def _expert_weights(self, sel: torch.Tensor | None, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """gate_up (U, 2I, C), down (U, C, I) in `dtype` for the experts `sel` (None: all), and the per-row
        scales (U, 2I), (U, C) still to apply to the matmul outputs (None for int4: fully dequantized)."""
        if self.method == "int4":
            return *self.dequantize(dtype, sel), None, None
        gu, dn = self.gate_up_proj, self.down_proj
        gu_s, dn_s = self.gate_up_proj_scale, self.down_proj_scale
        if sel is not None:
            gu, dn, gu_s, dn_s = gu[sel], dn[sel], gu_s[sel], dn_s[sel]
        return gu.to(dtype), dn.to(dtype), gu_s, dn_s  # int8 and e4m3 values are exact in bf16/fp32

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch over the experts used by this call. x (N, C), weights/idx (N, k) -> (N, C)."""
        if self.reference:
            return self.forward_reference(x, weights, idx)
        N, k = idx.shape
        if N == 0:
            return torch.zeros_like(x)
        dt = x.dtype
        decode = (N <= kernels.MAX_ROWS and N * k < self.n_experts and dt == torch.bfloat16
                  and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad))
        if self.method == "int8" and decode and kernels.load() is not None:
            return self._dispatch_decode(x, weights, idx, self._int8_expert)
        if (self.method == "int4" and decode and HAS_INT4_MM and self.group_size in INT4_GROUP_SIZES
                and self.dim % 16 == 0 and self.hidden % 8 == 0):
            return self._dispatch_decode(x, weights, idx, self._int4_expert)
        used = idx.unique()  # sorted expert ids that received at least one token
        U = used.numel()
        sel = None if U == self.n_experts else used
        if U == self.n_experts:
            local = idx
        else:
            remap = torch.zeros(self.n_experts, dtype=idx.dtype, device=idx.device)
            remap[used] = torch.arange(U, dtype=idx.dtype, device=idx.device)
            local = remap[idx]  # (N, k) position of each chosen expert within `used`
        flat = local.flatten()
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // k
        expert = flat[order]  # (N*k,) local expert of each sorted pair
        ends = torch.bincount(flat, minlength=U).cumsum(0).to(torch.int32)
        xs = x[token]
        gu, dn, gu_s, dn_s = self._expert_weights(sel, dt)
        h = torch._grouped_mm(xs, gu.transpose(1, 2), offs=ends)  # (N*k, 2I)
        if gu_s is not None:
            h = h * gu_s.to(dt)[expert]
        gate, up = h.split(self.hidden, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, dn.transpose(1, 2), offs=ends)  # (N*k, C)
        if dn_s is not None:
            ys = ys * dn_s.to(dt)[expert]
        ys = ys * weights.flatten()[order, None].to(dt)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _dispatch_decode(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                         run_expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Decode-sized batches on CPU: each expert that received tokens runs on its rows with run_expert(e, xs)
        (`moe.dispatch_active`), reading only its own quantized weights. x (N, C), weights/idx (N, k) -> (N, C)."""
        return dispatch_active(x, weights, idx, self.n_experts, run_expert)

    def _int8_expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        """Expert e on xs (R, C) through r1kit's int8 GEMV, the int8 weights read as stored."""
        h = kernels.linear_int8(xs, self.gate_up_proj[e], self.gate_up_proj_scale[e])
        gate, up = h.split(self.hidden, dim=-1)
        return kernels.linear_int8(F.silu(gate) * up, self.down_proj[e], self.down_proj_scale[e])

    def _int4_kernel(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's weights in torch's CPU int4 kernel layout: (gate_up packed, its scales/zeros, down packed,
        its scales/zeros), built on the expert's first decode and kept (rebuilt when the buffers change)."""
        key = tuple((t.data_ptr(), t._version) for t in self._buffers.values())
        if self._int4_cache.get("key") != key:
            self._int4_cache = {"key": key}
        if e not in self._int4_cache:
            out = []
            for name in ("gate_up_proj", "down_proj"):
                q, sc, z = (self._buffers[name][e], self._buffers[name + "_scale"][e],
                            self._buffers[name + "_zero"][e])
                out += [torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32), 1),
                        torch.stack((sc.t(), z.t()), dim=-1).to(torch.bfloat16).contiguous()]  # (K/G, N, 2)
            self._int4_cache[e] = tuple(out)
        return self._int4_cache[e]

    def _int4_expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        """Expert e on xs (R, C) through torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``)."""
        gu, gu_sz, dn, dn_sz = self._int4_kernel(e)
        gate, up = torch._weight_int4pack_mm_for_cpu(xs, gu, self.group_size, gu_sz).split(self.hidden, dim=-1)
        return torch._weight_int4pack_mm_for_cpu(F.silu(gate) * up, dn, self.group_size, dn_sz)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Dequantize every expert, then the plain loop over tokens and their k experts."""
        gu, dn = self.dequantize(x.dtype)
        return experts_loop(x, weights, idx, gu, dn, self.hidden)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        return f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, method={self.method!r}{extra}"
