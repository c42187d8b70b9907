import importlib.util
import json
import logging

import pytest
import torch

from r1kit import hardware
from r1kit.hardware import DeviceChoice, HardwareError, choose, resolve_dtype


@pytest.fixture
def no_accelerators(monkeypatch):
    """Pretend this is a CPU-only machine, whatever it really is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_npu_available", lambda: False)


# ---------------------------------------------------------------------------- choose on CPU


def test_choose_cpu_dtype_follows_bf16_support():
    choice = choose("cpu")
    assert isinstance(choice, DeviceChoice)
    assert choice.device == torch.device("cpu")
    assert choice.backend == "cpu"
    expected = torch.bfloat16 if hardware.cpu_supports_bf16() else torch.float32
    assert choice.dtype == expected
    assert choice.reason


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_auto_dtype(monkeypatch, bf16, expected):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: bf16)
    choice = choose("cpu", "auto")
    assert choice.dtype == expected
    assert hardware.dtype_name(expected) in choice.reason


def test_auto_device_on_cpu_only_machine(no_accelerators):
    choice = choose("auto")
    assert choice.backend == "cpu"
    assert choice.device.type == "cpu"
    assert "auto-detected cpu" in choice.reason
    assert choose(None).backend == "cpu"


@pytest.mark.parametrize("fp16", ["fp16", "float16", "half", "FP16", torch.float16])
def test_fp16_on_cpu_is_refused(fp16):
    with pytest.raises(HardwareError, match="fp16") as exc:
        choose("cpu", fp16)
    msg = str(exc.value)
    assert "bf16" in msg and "fp32" in msg  # suggests alternatives
    with pytest.raises(HardwareError, match="fp16"):
        resolve_dtype(fp16, "cpu")


def test_hardware_error_is_value_error():
    assert issubclass(HardwareError, ValueError)


def test_explicit_fp32_on_cpu():
    choice = choose("cpu", torch.float32)
    assert choice.dtype == torch.float32
    assert "requested" in choice.reason


def test_explicit_bf16_on_cpu_without_native_support_warns_in_reason(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    dtype, reason = resolve_dtype("bf16", "cpu")
    assert dtype == torch.bfloat16
    assert "warning" in reason
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert "warning" not in resolve_dtype("bf16", "cpu")[1]


# ---------------------------------------------------------------------------- dtype parsing


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        (" Float32 ", torch.float32),
        (torch.float32, torch.float32),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_names(name, expected):
    dtype, reason = resolve_dtype(name, "mps")  # fp16 is legal off-CPU
    assert dtype == expected
    assert "requested" in reason


@pytest.mark.parametrize("bad", ["int8", "fp8", "bf32", "float64", torch.float64, torch.int8, 16])
def test_unknown_dtype_lists_accepted_names(bad):
    with pytest.raises(HardwareError) as exc:
        resolve_dtype(bad, "cpu")
    msg = str(exc.value)
    for accepted in ("bf16", "fp32", "float16", "auto"):
        assert accepted in msg


def test_unknown_backend():
    with pytest.raises(HardwareError, match="backend"):
        resolve_dtype("fp32", "tpu")


@pytest.mark.parametrize("auto", [None, "auto", "AUTO"])
def test_auto_dtype_names(monkeypatch, auto):
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype(auto, "cpu")[0] == torch.float32


def test_accelerator_defaults(monkeypatch):
    monkeypatch.setattr(hardware, "_cuda_bf16_supported", lambda device=None: True)
    assert resolve_dtype(None, "cuda")[0] == torch.bfloat16
    assert resolve_dtype(None, "rocm")[0] == torch.bfloat16
    monkeypatch.setattr(hardware, "_cuda_bf16_supported", lambda device=None: False)
    assert resolve_dtype(None, "cuda")[0] == torch.float16
    monkeypatch.setattr(hardware, "_mps_bf16_supported", lambda: True)
    assert resolve_dtype(None, "mps")[0] == torch.bfloat16
    monkeypatch.setattr(hardware, "_mps_bf16_supported", lambda: False)
    assert resolve_dtype(None, "mps")[0] == torch.float16
    monkeypatch.setattr(hardware, "_npu_bf16_supported", lambda: False)
    assert resolve_dtype(None, "npu")[0] == torch.float16


# ---------------------------------------------------------------------------- unavailable devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("dev", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_unavailable_cuda_raises(dev):
    with pytest.raises(HardwareError, match="cuda") as exc:
        choose(dev)
    assert "available: " in str(exc.value)
    assert "cpu" in str(exc.value)


def test_unavailable_mps_and_npu_raise(no_accelerators):
    for dev in ("mps", "npu"):
        with pytest.raises(HardwareError, match=dev):
            choose(dev)


@pytest.mark.parametrize("dev", ["tpu", "xpu", "cuda:x", "gpu"])
def test_bad_device_strings(dev):
    with pytest.raises(HardwareError):
        choose(dev)


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(HardwareError, match="cuda:5"):
        choose("cuda:5", "fp16")


# ---------------------------------------------------------------------------- backend detection


def test_detect_cuda_vs_rocm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert hardware.detect_backend() == "cuda"
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert hardware.detect_backend() == "rocm"
    # a "cuda" request on a ROCm build is the rocm backend on a cuda-type device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(hardware, "_cuda_bf16_supported", lambda device=None: True)
    choice = choose("cuda")
    assert choice.backend == "rocm"
    assert choice.device == torch.device("cuda", 0)
    assert choice.dtype == torch.bfloat16


def test_detect_cpu_when_nothing(no_accelerators):
    assert hardware.detect_backend() == "cpu"
    assert hardware.available_backends() == ["cpu"]


def test_detect_mps_and_npu_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(hardware, "_npu_available", lambda: False)
    assert hardware.detect_backend() == "mps"
    monkeypatch.setattr(hardware, "_npu_available", lambda: True)
    assert hardware.detect_backend() == "npu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert hardware.detect_backend() == "cuda"


def test_npu_absent_without_torch_npu():
    if importlib.util.find_spec("torch_npu") is None:
        assert hardware._npu_available() is False


def test_broken_cuda_probe_means_no_cuda(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_npu_available", lambda: False)
    assert hardware.detect_backend() == "cpu"


# ---------------------------------------------------------------------------- CPU bf16 detection

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\nbogomips\t: 1\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize(
    "machine, text, capability, expected",
    [
        ("x86_64", X86_BF16, "AVX512", True),
        ("x86_64", X86_BF16, "AVX2", False),  # torch capped below AVX512: stay conservative
        ("x86_64", X86_PLAIN, "AVX512", False),
        ("x86_64", "", "AVX512", False),
        ("aarch64", ARM_BF16, "SVE256", True),
        ("aarch64", ARM_PLAIN, "DEFAULT", False),
        ("riscv64", ARM_BF16, "DEFAULT", False),
    ],
)
def test_cpu_supports_bf16(monkeypatch, machine, text, capability, expected):
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: hardware._parse_cpu_flags(text))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert hardware.cpu_supports_bf16() is expected


def test_parse_cpu_flags():
    assert "avx512_bf16" in hardware._parse_cpu_flags(X86_BF16)
    assert "bf16" in hardware._parse_cpu_flags(ARM_BF16)
    assert hardware._parse_cpu_flags("model name: x\n") == frozenset()


# ---------------------------------------------------------------------------- logging and info


def test_reason_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="r1kit"):
        choice = choose("cpu")
    records = [r for r in caplog.records if r.name == "r1kit" and r.levelno == logging.INFO]
    assert len(records) == 1
    assert choice.reason in records[0].getMessage()
    assert hardware.dtype_name(choice.dtype) in records[0].getMessage()


def test_describe_is_json_serialisable():
    info = hardware.describe()
    for key in ("backend", "device_name", "torch_version", "cpu_capability", "cpu_bf16", "threads"):
        assert key in info
    assert info["torch_version"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert info["cpu_bf16"] == hardware.cpu_supports_bf16()
    json.dumps(info)


def test_choice_is_frozen():
    choice = choose("cpu", "fp32")
    with pytest.raises(AttributeError):
        choice.dtype = torch.float16  # type: ignore[misc]
