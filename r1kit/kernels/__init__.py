"""CPU decode kernels in C (`cpu_gemv.c`): batch-1..8 bf16 and int8 matrix-vector products, and RMSNorm.

Batch-1 decode reads every weight once per token, so its speed is how fast the weights stream from memory.
PyTorch's CPU bf16 matmul is built for large batches and reaches only a fraction of the memory bandwidth at
one row; `cpu_gemv.c` streams each weight row once through AVX-512 (vdpbf16ps for bf16; for int8 weights with
per-row scales, vpdpwssd against the activations rounded to int16 per row), threads splitting the output rows.

The kernels are compiled on first use with the system's C compiler (`gcc -O3 -march=native -fopenmp`, about a
second) into ``$R1KIT_CACHE`` (default ``~/.cache/r1kit``), keyed by the source and the CPU; without a
compiler, or on a CPU without AVX-512 bf16, or with ``R1KIT_KERNELS=0``, everything falls back to
``F.linear`` (the reference path; tests/test_kernels.py checks that both agree where the kernels can run, and
CI sets ``R1KIT_REQUIRE_KERNELS=1`` so that they must).

    from r1kit import kernels
    kernels.accelerate(model)          # its nn.Linear modules take the kernel for <= 8 rows (bf16, CPU, no grad)
    y = kernels.linear(x, w, bias)     # the same dispatch for a bare weight

`r1kit.kernels.paged_attention` (`paged_attention.c`, any CPU) is the engine's decode attention over the paged
KV pools; `compile_library` builds and caches both sources.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from r1kit import hardware
from r1kit.fileio import atomic_write

log = logging.getLogger("r1kit")
SOURCE = Path(__file__).with_name("cpu_gemv.c")
MAX_ROWS = 8  # MAX_M in cpu_gemv.c: the kernels take up to this many rows; more rows go to F.linear
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def _build(out: Path, source: Path = SOURCE) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or $CC) found")
    out.parent.mkdir(parents=True, exist_ok=True)

    def compile_to(so: Path) -> None:
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(so)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")

    atomic_write(out, compile_to, mode=0o777)  # a concurrent process sees the old file or the whole new one


def compile_library(source: Path) -> ctypes.CDLL:
    """The shared library of a C source beside this module, compiled on first use into ``$R1KIT_CACHE``
    (keyed by the source and the CPU's flags); raises OSError or RuntimeError when it cannot be built."""
    key = hashlib.sha256(source.read_bytes() + " ".join(sorted(hardware.cpu_flags())).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("R1KIT_CACHE", Path.home() / ".cache" / "r1kit"))
    so = cache / "kernels" / f"{source.stem}-{key}.so"
    if not so.is_file():
        _build(so, source)
    return ctypes.CDLL(str(so))


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None (and the reason in `why_not()`) when they
    cannot run here."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    _tried = True
    flags = hardware.cpu_flags()
    if os.environ.get("R1KIT_KERNELS", "1") == "0":
        _reason = "disabled by R1KIT_KERNELS=0"
    elif "avx512_bf16" not in flags:
        _reason = "this CPU has no AVX-512 bf16 (avx512_bf16)"
    else:
        try:
            lib = compile_library(SOURCE)
        except (OSError, RuntimeError) as e:
            _reason = f"could not build {SOURCE.name}: {e}"
        else:
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.gemv_bf16.argtypes = [p, p, p, p, i32, i64, i64, i32]
            lib.gemv_int8.argtypes = [p, p, p, p, p, i32, i64, i64, i32]
            lib.rmsnorm_bf16.argtypes = [p, p, p, i64, i64, ctypes.c_float]
            lib.gemv_bf16.restype, lib.gemv_int8.restype, lib.rmsnorm_bf16.restype = None, ctypes.c_int, None
            _lib = lib
    if _lib is None:
        log.info("r1kit CPU decode kernels off: %s; using F.linear", _reason)
    return _lib


_threads = torch.get_num_threads  # the OpenMP threads the kernels use: PyTorch's own setting


def why_not() -> str:
    """Why the kernels are not in use ("" when they are)."""
    load()
    return _reason


def _rows_ok(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernels take this product: CPU, bf16 activations of 1..MAX_ROWS rows, no autograd, and
    shapes that agree (otherwise F.linear runs, and raises its own error for a mismatch). Cheapest tests
    first: this runs for every linear layer of every decode step."""
    return (x.dtype is torch.bfloat16 and x.is_cpu and w.is_cpu and w.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == w.shape[1] and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
            and (bias is None or bias.shape == (w.shape[0],))
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), through the bf16 kernel when x has <= MAX_ROWS rows (x (..., K), w (N, K))."""
    if not (_rows_ok(x, w, bias) and w.dtype is torch.bfloat16 and (_lib is not None or load() is not None)):
        return F.linear(x, w, bias)
    K, N = x.shape[-1], w.shape[0]
    x, w = _contiguous(x), _contiguous(w)  # bound: the C call reads their memory
    b = None if bias is None else _contiguous(bias.to(torch.bfloat16))
    y = x.new_empty(*x.shape[:-1], N)  # (..., N); the kernel sees x as (M, K) rows
    _lib.gemv_bf16(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                   x.numel() // K, N, K, _threads())
    return y


def linear_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """(x @ w.T) * scale + bias for int8 weights w (N, K) with per-row fp32 scales (N,) and bf16 x with <=
    MAX_ROWS rows (rounded to int16 per row inside the kernel); None when the kernel does not apply (the
    caller takes its own path)."""
    if not (_rows_ok(x, w, bias) and w.dtype is torch.int8 and scale.dtype is torch.float32
            and scale.shape == (w.shape[0],) and (_lib is not None or load() is not None)):
        return None
    K, N = x.shape[-1], w.shape[0]
    x, w, scale = _contiguous(x), _contiguous(w), _contiguous(scale)  # bound: the C call reads their memory
    b = None if bias is None else _contiguous(bias.to(torch.bfloat16))
    y = x.new_empty(*x.shape[:-1], N)  # (..., N); the kernel sees x as (M, K) rows
    M = x.numel() // K
    if _lib.gemv_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), None if b is None else b.data_ptr(),
                      y.data_ptr(), M, N, K, _threads()):
        raise MemoryError(f"int8 kernel: no memory for {M} x {K} int16 activations")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of bf16 x (..., K) with a bf16 weight (K,) in one C call (`rmsnorm_bf16`); None when the kernel
    does not apply (another dtype or device, autograd, kernels unavailable): the caller runs its own ops."""
    if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and weight.shape == x.shape[-1:] and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and load() is not None):
        return None
    x2 = x.contiguous()
    w = weight.contiguous()
    y = torch.empty_like(x2)
    _lib.rmsnorm_bf16(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.numel() // x2.shape[-1], x2.shape[-1], eps)
    return y


class FastLinear(nn.Linear):
    """nn.Linear whose few-row bf16 products take the decode kernel (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def accelerate(model: nn.Module) -> int:
    """Turn the model's plain nn.Linear modules into FastLinear in place (a class swap: no copy, same
    weights); returns how many. Nothing changes when the kernels are unavailable (see why_not())."""
    if load() is None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            n += 1
    return n


__all__ = ["MAX_ROWS", "FastLinear", "accelerate", "linear", "linear_int8", "load", "rms_norm", "why_not"]
