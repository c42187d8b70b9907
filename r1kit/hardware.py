"""Device and dtype selection.

Pick the device and dtype once, at the entry point (CLI, API constructor, benchmark), with
:func:`choose`, and pass the resulting :class:`DeviceChoice` down. The reason for the choice is
logged on the ``r1kit`` logger so a user can see why a run is on (say) CPU in fp32.

Rules:

* ``device="auto"`` prefers CUDA (NVIDIA), then ROCm (AMD, which PyTorch also calls ``cuda``),
  then Ascend NPU (``torch_npu``), then Apple MPS, then CPU.
* ``dtype="auto"`` picks bf16 where the hardware runs it natively, else fp16 on accelerators and
  fp32 on CPU.
* fp16 is never used on CPU: PyTorch's CPU fp16 matmul has no fast kernel and is orders of
  magnitude slower than fp32/bf16, so an explicit request for it is an error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("r1kit")

BACKENDS = ("cuda", "rocm", "npu", "mps", "cpu")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_AUTO_NAMES = ("auto",)
ACCEPTED_DTYPE_NAMES = tuple(_DTYPE_NAMES) + _AUTO_NAMES

_SHORT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


class HardwareError(ValueError):
    """The requested device or dtype cannot be used on this machine."""


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype
    reason: str  # human-readable: why this device and dtype
    backend: str  # "cuda" | "rocm" | "npu" | "mps" | "cpu"

    def __str__(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)} ({self.backend}): {self.reason}"


def dtype_name(dtype: torch.dtype) -> str:
    """Short name for a dtype: bf16, fp32, fp16 (else torch's own name)."""
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------- backend probes


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install should mean "no CUDA", not a crash
        return False


def _is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
        npu = getattr(torch, "npu", None)
        return bool(npu is not None and npu.is_available())
    except Exception:
        return False


def _mps_available() -> bool:
    try:
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    except Exception:
        return False


def detect_backend() -> str:
    """The best backend present: cuda, rocm, npu, mps, else cpu."""
    if _cuda_available():
        return "rocm" if _is_hip() else "cuda"
    if _npu_available():
        return "npu"
    if _mps_available():
        return "mps"
    return "cpu"


def available_backends() -> list[str]:
    """Every usable backend, best first; always ends with "cpu"."""
    out = []
    if _cuda_available():
        out.append("rocm" if _is_hip() else "cuda")
    if _npu_available():
        out.append("npu")
    if _mps_available():
        out.append("mps")
    out.append("cpu")
    return out


# --------------------------------------------------------------------------- CPU bf16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo ("flags" on x86, "Features" on arm64); empty if unknown. The one
    reader of them: r1kit.kernels asks it too."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return _parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


def _parse_cpu_flags(text: str) -> frozenset[str]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "unknown"


def cpu_supports_bf16() -> bool:
    """True only when the CPU has native bf16 instructions that PyTorch uses.

    Conservative: x86 needs AVX512-BF16 or AMX-BF16 *and* PyTorch dispatching to its AVX512
    kernels; arm64 needs the ``bf16`` feature (Linux). Anything unknown (macOS CPU, no
    /proc/cpuinfo, a capability capped by ATEN_CPU_CAPABILITY) answers False, i.e. fp32.
    """
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if not ({"avx512_bf16", "amx_bf16"} & flags):
            return False
        cap = _cpu_capability().upper()
        return cap.startswith("AVX512") or cap.startswith("AMX")
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return False


# --------------------------------------------------------------------------- accelerator bf16


def _cuda_bf16_supported(device: torch.device | None = None) -> bool:
    """Native bf16 on this CUDA/ROCm device (Ampere+ on NVIDIA; ROCm: as torch reports)."""
    try:
        if _is_hip():
            return bool(torch.cuda.is_bf16_supported())
        index = device.index if device is not None and device.index is not None else None
        if index is None:
            index = torch.cuda.current_device()
        major, _minor = torch.cuda.get_device_capability(index)
        return major >= 8
    except Exception:
        return False


def _npu_bf16_supported() -> bool:
    try:
        fn = getattr(getattr(torch, "npu", None), "is_bf16_supported", None)
        return bool(fn()) if fn is not None else False
    except Exception:
        return False


def _mps_bf16_supported() -> bool:
    """bf16 on MPS needs macOS 14 (Sonoma) or newer."""
    try:
        fn = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return bool(fn(14, 0)) if fn is not None else False
    except Exception:
        return False


# --------------------------------------------------------------------------- dtype


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None means "auto"."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _SHORT:
            raise HardwareError(f"unsupported dtype {dtype}; use one of: {', '.join(ACCEPTED_DTYPE_NAMES)}")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _AUTO_NAMES or name == "":
            return None
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise HardwareError(f"unknown dtype {dtype!r}; accepted: {', '.join(ACCEPTED_DTYPE_NAMES)}")


def resolve_dtype(
    dtype: str | torch.dtype | None, backend: str, device: torch.device | None = None
) -> tuple[torch.dtype, str]:
    """The dtype to compute in on ``backend``, and why.

    ``dtype`` is a torch dtype, a name (bf16/bfloat16, fp32/float32, fp16/float16/half), or
    "auto"/None for the backend's default. ``device`` (optional) narrows the CUDA bf16 check to a
    particular GPU.
    """
    if backend not in BACKENDS:
        raise HardwareError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    want = _parse_dtype(dtype)

    if want is not None:
        if want == torch.float16 and backend == "cpu":
            raise HardwareError(
                "fp16 (float16) is not supported on CPU: PyTorch has no fast fp16 matmul kernel on "
                "CPU, so it runs roughly 1000x slower than fp32/bf16. Use dtype='bf16' (if the CPU "
                "has AVX512-BF16/AMX or arm64 BF16) or dtype='fp32'."
            )
        reason = f"{dtype_name(want)} as requested"
        if want == torch.bfloat16:
            native = {
                "cpu": cpu_supports_bf16,
                "cuda": lambda: _cuda_bf16_supported(device),
                "rocm": lambda: _cuda_bf16_supported(device),
                "npu": _npu_bf16_supported,
                "mps": _mps_bf16_supported,
            }[backend]()
            if not native:
                reason += f" (warning: no native bf16 detected on {backend}; this may be slow or fail)"
        return want, reason

    if backend in ("cuda", "rocm"):
        if _cuda_bf16_supported(device):
            return torch.bfloat16, f"bf16: default on {backend}, GPU supports bf16 natively"
        return torch.float16, f"fp16: default on {backend}, GPU has no native bf16"
    if backend == "npu":
        if _npu_bf16_supported():
            return torch.bfloat16, "bf16: default on npu, device supports bf16"
        return torch.float16, "fp16: default on npu (no bf16 support reported)"
    if backend == "mps":
        if _mps_bf16_supported():
            return torch.bfloat16, "bf16: default on mps (macOS 14+ supports bf16)"
        return torch.float16, "fp16: default on mps (bf16 needs macOS 14+)"
    # cpu
    if cpu_supports_bf16():
        return torch.bfloat16, f"bf16: CPU has native bf16 (torch CPU capability {_cpu_capability()})"
    return torch.float32, "fp32: CPU has no native bf16 (fp16 is never used on CPU)"


# --------------------------------------------------------------------------- device


def _backend_available(backend: str) -> bool:
    if backend == "cpu":
        return True
    if backend in ("cuda", "rocm"):
        return _cuda_available() and (_is_hip() == (backend == "rocm"))
    if backend == "npu":
        return _npu_available()
    if backend == "mps":
        return _mps_available()
    return False


def _device_for(backend: str, index: int | None) -> torch.device:
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "mps":
        return torch.device("mps")
    dev_type = "cuda" if backend in ("cuda", "rocm") else "npu"
    if index is None:
        try:
            mod = torch.cuda if dev_type == "cuda" else torch.npu  # type: ignore[attr-defined]
            index = int(mod.current_device())
        except Exception:
            index = 0
    return torch.device(dev_type, index)


def _device_count(backend: str) -> int:
    try:
        if backend in ("cuda", "rocm"):
            return int(torch.cuda.device_count())
        if backend == "npu":
            return int(torch.npu.device_count())  # type: ignore[attr-defined]
    except Exception:
        return 0
    return 1


def _parse_device(device: str | torch.device) -> tuple[str, int | None]:
    """(backend, index) for an explicit device request."""
    if isinstance(device, torch.device):
        dev_type, index = device.type, device.index
    else:
        text = device.strip().lower()
        dev_type, _, idx = text.partition(":")
        if idx:
            try:
                index = int(idx)
            except ValueError:
                raise HardwareError(f"bad device {device!r}: index must be an integer") from None
        else:
            index = None
    if dev_type == "cuda":
        return ("rocm" if _is_hip() else "cuda"), index
    if dev_type in ("rocm", "hip"):
        return "rocm", index
    if dev_type in ("npu", "mps", "cpu"):
        return dev_type, index
    raise HardwareError(
        f"unsupported device {str(device)!r}; use 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'npu'"
    )


def choose(
    device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None
) -> DeviceChoice:
    """Pick device and dtype once, at the entry point; logs the reason on the ``r1kit`` logger.

    ``device``: "auto"/None (best available), "cpu", "cuda", "cuda:N", "mps", "npu", "npu:N", or a
    ``torch.device``. An explicit device that is not available raises :class:`HardwareError`.
    ``dtype``: see :func:`resolve_dtype`.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        backend = detect_backend()
        dev = _device_for(backend, None)
        others = [b for b in available_backends() if b != backend]
        dev_reason = f"auto-detected {backend}" + (
            f" ({backend} preferred over {', '.join(others)})" if others else " (no accelerator found)"
        )
    else:
        backend, index = _parse_device(device)
        if not _backend_available(backend):
            raise HardwareError(
                f"requested device {str(device)!r} ({backend}) is not available on this machine; "
                f"available: {', '.join(available_backends())}"
            )
        if index is not None and backend != "cpu":
            count = _device_count(backend)
            if index >= count or index < 0:
                raise HardwareError(
                    f"requested device {str(device)!r} does not exist: {count} {backend} device(s) "
                    f"visible (indices 0..{count - 1})"
                )
        dev = _device_for(backend, index)
        dev_reason = f"{backend} as requested"

    torch_dtype, dtype_reason = resolve_dtype(dtype, backend, dev)
    choice = DeviceChoice(
        device=dev, dtype=torch_dtype, reason=f"{dev_reason}; {dtype_reason}", backend=backend
    )
    logger.info("device %s, dtype %s: %s", dev, dtype_name(torch_dtype), choice.reason)
    return choice


# --------------------------------------------------------------------------- info


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("model name", "hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict[str, Any]:
    """A JSON-serialisable summary of the hardware, for ``r1kit info``. Never raises."""
    backend = detect_backend()
    info: dict[str, Any] = {
        "backend": backend,
        "available_backends": available_backends(),
        "torch_version": torch.__version__,
        "cuda_version": getattr(torch.version, "cuda", None),
        "hip_version": getattr(torch.version, "hip", None),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_name": _cpu_model_name(),
        "cpu_capability": _cpu_capability(),
        "cpu_bf16": cpu_supports_bf16(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    device_name = info["cpu_name"]
    try:
        if backend in ("cuda", "rocm"):
            device_name = torch.cuda.get_device_name()
            info["device_count"] = torch.cuda.device_count()
            info["accelerator_bf16"] = _cuda_bf16_supported()
        elif backend == "npu":
            device_name = str(torch.npu.get_device_name())  # type: ignore[attr-defined]
            info["device_count"] = _device_count("npu")
            info["accelerator_bf16"] = _npu_bf16_supported()
        elif backend == "mps":
            device_name = "Apple MPS"
            info["accelerator_bf16"] = _mps_bf16_supported()
    except Exception as exc:  # describe() is diagnostic: report, don't fail
        device_name = f"unknown ({exc})"
    info["device_name"] = device_name
    try:
        dt, why = resolve_dtype(None, backend)
        info["default_dtype"] = dtype_name(dt)
        info["default_dtype_reason"] = why
    except Exception as exc:
        info["default_dtype"] = f"unknown ({exc})"
    return info
