"""Decode attention over the engine's paged KV pools in C (`paged_attention.c`).

The engine's decodes attend all at once: each query over its own context, whose keys and values sit in
scattered slots of the per-layer pools. In torch that means gathering every context into a padded (B, S)
batch, making it contiguous per head and casting it, on every layer of every step; with contexts of mixed
lengths those copies cost more than the attention itself. `decode_attention` reads each sequence's slots
straight from the pools, in their dtype (fp32 or bf16; fp32 arithmetic), with no padding, gather or cast.

Unlike `cpu_gemv.c` it needs no particular instruction set: plain C that gcc vectorises, compiled on first
use like the other kernels (`r1kit.kernels.compile_library`). Without a compiler, on a GPU, for other dtypes,
or with ``R1KIT_KERNELS=0``, `decode_attention` returns None and the caller runs the torch path (the
reference; tests/test_engine_decode_fast.py checks that both agree).

    y = decode_attention(q, k_pool, v_pool, slots, lens, scale)   # (B, H, Dv), or None
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

from r1kit import kernels

log = logging.getLogger("r1kit")
SOURCE = Path(__file__).with_name("paged_attention.c")
_state: dict[str, ctypes.CDLL | str | None] = {}  # "lib": the library or None, "reason": why not; set once


def load() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None (and the reason in `why_not()`) when it cannot run."""
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, ""
    if os.environ.get("R1KIT_KERNELS", "1") == "0":
        reason = "disabled by R1KIT_KERNELS=0"
    else:
        try:
            lib = kernels.compile_library(SOURCE)
        except (OSError, RuntimeError) as e:
            reason = f"could not build {SOURCE.name}: {e}"
        else:
            p, i32 = ctypes.c_void_p, ctypes.c_int
            lib.paged_decode_attention.argtypes = [p, p, p, p, p, p, i32, i32, i32, i32, i32, i32, ctypes.c_float,
                                                   i32, i32, ctypes.c_int64]
            lib.paged_decode_attention.restype = ctypes.c_int
    if lib is None:
        log.info("r1kit paged decode attention kernel off: %s; using the torch path", reason)
    _state.update(lib=lib, reason=reason)
    return lib


def why_not() -> str:
    """Why the kernel is not in use ("" when it is)."""
    load()
    return _state["reason"]


def _applies(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
             lens: torch.Tensor) -> bool:
    """CPU, fp32 or bf16 throughout, contiguous pools, no autograd, shapes that agree."""
    return (q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k_pool.dtype == v_pool.dtype
            and q.is_cpu and k_pool.is_cpu and v_pool.is_cpu and q.dim() == 3 and k_pool.dim() == 3
            and v_pool.dim() == 3 and k_pool.shape[:2] == v_pool.shape[:2] and q.shape[2] == k_pool.shape[2]
            and q.shape[1] % k_pool.shape[1] == 0 and k_pool.is_contiguous() and v_pool.is_contiguous()
            and slots.dtype == lens.dtype == torch.long and slots.dim() == 2 and lens.shape == (q.shape[0],)
            and slots.shape[0] == q.shape[0] and slots.is_cpu and lens.is_cpu
            and not (torch.is_grad_enabled() and (q.requires_grad or k_pool.requires_grad)))


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Single-query attention of each sequence over its paged context; None when the kernel does not apply.

    q (B, H, D); k_pool (num_slots, Hkv, D), v_pool (num_slots, Hkv, Dv), H a multiple of Hkv (query head h
    reads KV head h // (H / Hkv)); slots (B, S) long: sequence b's keys are at slots[b, :lens[b]]; lens (B,)
    long, each in 1..S (checked). Returns (B, H, Dv) in q's dtype: softmax(q k^T * scale) v, in fp32 inside.
    """
    if not _applies(q, k_pool, v_pool, slots, lens) or load() is None:
        return None
    B, H, D = q.shape
    S, num_slots = slots.shape[1], k_pool.shape[0]
    q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()  # bound: the C call reads their memory
    out = q.new_empty(B, H, v_pool.shape[2])  # (B, H, Dv)
    if B == 0:
        return out
    failed = _state["lib"].paged_decode_attention(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), slots.data_ptr(), lens.data_ptr(), out.data_ptr(),
        B, S, H, k_pool.shape[1], D, v_pool.shape[2], scale, int(q.dtype is torch.bfloat16), torch.get_num_threads(),
        num_slots)
    if failed == 1:
        raise MemoryError(f"decode_attention: no memory for the scratch of a {S}-slot context")
    if failed == 2:
        raise ValueError(f"decode_attention: context lengths {lens.tolist()} outside 1..{S} "
                         f"(slots {tuple(slots.shape)})")
    if failed == 3:
        raise IndexError(f"decode_attention: slots outside the pool of {num_slots} slots")
    return out


__all__ = ["decode_attention", "load", "why_not"]
