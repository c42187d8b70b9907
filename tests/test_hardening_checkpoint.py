"""Hardening of checkpoint I/O: no import cycle and no training import under checkpoint I/O, one atomic writer whose
files get normal permissions, a meaningful report after quantization, config.json errors that name the file and the
field, and DeepSeek's published parameter counts. (That the FP8 users agree with one reference: test_checkpoint.)"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import r1kit
from r1kit import hardware, kernels
from r1kit.checkpoint import load_model, read_config, save_model
from r1kit.fileio import CheckpointError, atomic_folder, atomic_write
from r1kit.model.config import ConfigError, preset
from r1kit.model.transformer import Transformer
from r1kit.quant import QuantizedExperts, QuantizedLinear

PACKAGE = Path(r1kit.__file__).parent


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1kit", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_clean_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """tiny-dense and tiny-moe checkpoints (bf16, as r1kit/nano is stored) to copy and change."""
    out = {}
    for name in ("tiny-dense", "tiny-moe"):
        out[name] = tmp_path_factory.mktemp(name)
        save_model(Transformer(preset(name)).init_weights(0), out[name], dtype=torch.bfloat16)
    return out


def copy_of(saved: dict[str, Path], name: str, tmp_path: Path, **config_changes) -> Path:
    path = tmp_path / name
    shutil.copytree(saved[name], path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, **config_changes}))
    return path


# ---------------------------------------------------------------------------------------------------- imports


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """r1kit module -> the r1kit modules it imports, at any level (function-level imports included). Importing a
    submodule runs its packages' __init__ too, except the root's (r1kit/__init__.py imports the public API) and
    the module's own packages' (a package's __init__ importing its submodules is no cycle)."""
    modules = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 2)}
        graph[name] = {m for m in with_parents if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_checkpoint_io_imports_no_training_and_no_module_imports_itself_back():
    graph = import_graph()
    below = reachable(graph, "r1kit.checkpoint")
    assert {"r1kit.quant.checkpoint", "r1kit.fp8", "r1kit.fileio"} <= below
    assert not [m for m in below if m.startswith("r1kit.train")]
    cycles = sorted(m for m in below | {"r1kit.checkpoint"} if m in reachable(graph, m))
    assert cycles == [], f"import cycles through {cycles}"


def run_isolated(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run body in a fresh interpreter (the real package, its __init__ included)."""
    return subprocess.run([sys.executable, "-c", "import sys\n" + body], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_checkpoint_io_loads_no_training_module_when_it_runs(tmp_path):
    """Import r1kit.checkpoint in a fresh process and save/load an FP8 and a quantized checkpoint: sys.modules then
    holds no r1kit.train module. Importing r1kit.quant.checkpoint first works too (no cycle)."""
    body = """
import r1kit.quant.checkpoint
from r1kit.checkpoint import load_model, save_model
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer
from r1kit.quant import quantize_model
model = Transformer(preset("tiny-dense")).init_weights(0)
save_model(model, "fp8", fp8=True)
load_model("fp8")
quantize_model(model, "int8")
save_model(model, "int8")
load_model("int8")
print(sorted(m for m in sys.modules if m.startswith("r1kit.train")))
"""
    done = run_isolated(body, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------- cpu flags


def test_kernels_take_the_cpu_flags_from_hardware(monkeypatch, tmp_path):
    """With hardware.cpu_flags() saying avx512_bf16, the kernels try to build (and here fail: no such compiler)."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", kernels._reason)
    monkeypatch.setenv("R1KIT_KERNELS", "1")
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert kernels.load() is None
    assert kernels.why_not().startswith("could not build cpu_gemv.c"), kernels.why_not()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f"}))
    monkeypatch.setattr(kernels, "_tried", False)
    assert kernels.load() is None and "no AVX-512 bf16" in kernels.why_not()


# ---------------------------------------------------------------------------------------------------- atomic writes


def normal_mode(folder: Path) -> int:
    (folder / "normal").write_text("x")
    mode = (folder / "normal").stat().st_mode & 0o777
    (folder / "normal").unlink()
    return mode


def test_atomic_write_gives_normal_permissions_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "w.safetensors"
    atomic_write(target, lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))  # safetensors creates 0600 files
    assert target.stat().st_mode & 0o777 == normal_mode(tmp_path)
    assert torch.equal(load_file(target)["a"], torch.zeros(2))

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    with pytest.raises(OSError, match="disk full"), atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "a").write_text("half")
        raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    assert torch.equal(load_file(target)["a"], torch.zeros(2))
    with atomic_folder(tmp_path / "w.safetensors.d") as tmp:
        (tmp / "a").write_text("whole")
    with atomic_folder(tmp_path / "w.safetensors.d") as tmp:  # replaces the earlier folder
        (tmp / "b").write_text("whole")
    assert [p.name for p in (tmp_path / "w.safetensors.d").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.safetensors.d"]


@pytest.fixture(scope="module")
def quantize_run(saved, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("quantized") / "int8"
    return out, run_cli("quantize", str(saved["tiny-moe"]), str(out), "--to", "int8")


def test_quantize_writes_files_with_normal_permissions(quantize_run):
    out, done = quantize_run
    assert done.returncode == 0, done.stderr
    files = sorted(out.iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == dict.fromkeys(modes, oct(normal_mode(out)))
    probe = out.parent / "probe"
    probe.mkdir()
    assert out.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporaries left


# ---------------------------------------------------------------------------------------------------- quantize report


def test_quantize_reports_modules_bytes_and_unchanged_parameters(quantize_run, saved):
    out, done = quantize_run
    assert done.returncode == 0, done.stderr
    original = load_model(saved["tiny-moe"])
    model = load_model(out)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    before = sum(p.numel() * 2 for n, m in original.named_modules() if n in quantized
                 for p in ([m.weight] if isinstance(m, nn.Linear) else [m.gate_up_proj, m.down_proj]))  # bf16
    after = sum(m.weight_bytes() for m in quantized.values())
    params = preset("tiny-moe").num_params(include_mtp=True)
    assert f"{len(quantized)} modules quantized to int8" in done.stdout
    assert f"{before / 2**20:.2f} MiB (bfloat16) -> {after / 2**20:.2f} MiB" in done.stdout
    assert f"{params:,} parameters, unchanged" in done.stdout, done.stdout


def test_loading_a_quantized_checkpoint_logs_the_parameters_it_represents(quantize_run, saved, caplog):
    out, _ = quantize_run
    caplog.set_level("INFO", logger="r1kit")
    load_model(saved["tiny-moe"])
    model = load_model(out)
    params = f"{preset('tiny-moe').num_params(include_mtp=True):,} parameters"
    first, second = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    assert params in first and params in second, (first, second)
    n = sum(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in model.modules())
    assert f"{n} modules int8" in second


# ---------------------------------------------------------------------------------------------------- config errors


def test_config_field_of_the_wrong_type_names_file_field_and_type(saved, tmp_path):
    path = copy_of(saved, "tiny-dense", tmp_path, rope_theta="abc")
    done = run_cli("info", str(path))
    assert_clean_error(done, f"{path / 'config.json'}: rope_theta = 'abc': expected a number, not str")


@pytest.mark.parametrize("field, value, expected", [
    ("num_hidden_layers", "2", "num_hidden_layers = '2': expected an integer, not str"),
    ("num_key_value_heads", 1.5, "num_key_value_heads = 1.5: expected an integer, not float"),
    ("tie_word_embeddings", "false", "tie_word_embeddings = 'false': expected true or false, not str"),
    ("rms_norm_eps", None, "rms_norm_eps = None: expected a number, not NoneType"),
    ("rope_scaling", "yarn", "rope_scaling = 'yarn': expected an object or null"),
    ("eos_token_id", [1, "2"], "eos_token_id = [1, '2']: expected an integer or a list of integers or null"),
])
def test_config_type_errors_name_the_field(saved, tmp_path, field, value, expected):
    path = copy_of(saved, "tiny-dense", tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=re.escape(f"{path / 'config.json'}: {expected}")) as info:
        read_config(path)
    assert info.value.field == field


@pytest.mark.parametrize("name, layers, message", [
    ("tiny-dense", 3, "num_hidden_layers = 3, but the weight files hold 2 decoder layer(s) (indices 0-1)"),
    ("tiny-dense", 1, "num_hidden_layers = 1, but the weight files hold 2 decoder layer(s) (indices 0-1)"),
    ("tiny-moe", 2, "num_hidden_layers = 2, but the weight files hold 3 decoder layer(s) (indices 0-2) and 1 MTP"),
    ("tiny-moe", 4, "num_hidden_layers = 4, but the weight files hold 3 decoder layer(s) (indices 0-2) and 1 MTP"),
])
def test_layer_count_disagreeing_with_the_weights_is_named(saved, tmp_path, name, layers, message):
    path = copy_of(saved, name, tmp_path, num_hidden_layers=layers)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'config.json'}: {message}")):
        load_model(path)


def test_generate_names_the_layer_count_mismatch(saved, tmp_path):
    path = copy_of(saved, "tiny-moe", tmp_path, num_hidden_layers=2)
    shutil.copy(PACKAGE / "nano" / "tokenizer.json", path / "tokenizer.json")
    done = run_cli("generate", str(path), "--prompt", "hi", "--device", "cpu")
    assert_clean_error(done, "num_hidden_layers = 2, but the weight files hold 3 decoder layer(s)")


# ---------------------------------------------------------------------------------------------------- param counts


def test_info_prints_deepseeks_published_counts():
    """DeepSeek: 671B main model + 14B MTP module, 37B active, all as whole billions. r1kit counts 671.03B, 13.46B
    (the MTP layer as the checkpoint stores it, with its copies of the embedding and head; DeepSeek's 14B is 685B
    on the hub, itself 684.5B rounded, less 671B) and 37.55B (the embedding table included)."""
    done = run_cli("info", "deepseek-r1", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert abs(info["params_total"] - 671e9) < 0.5e9
    assert abs(info["params_mtp"] - 14e9) < 1e9
    assert abs(info["params_active"] - 37e9) < 1e9
    text = run_cli("info", "deepseek-r1").stdout
    assert re.search(r"params_total\s+671B \+ 13\.5B MTP\n", text), text


def test_main_and_mtp_counts_match_what_a_checkpoint_stores(saved):
    """num_params() is what the main model's tensors hold, num_mtp_params() what the MTP layer's tensors hold."""
    cfg = preset("tiny-moe")
    sizes = {n: t.numel() for n, t in load_file(saved["tiny-moe"] / "model.safetensors").items()
             if not n.endswith("e_score_correction_bias")}  # the routing bias: a buffer, not a parameter
    mtp = sum(v for n, v in sizes.items() if n.startswith(f"model.layers.{cfg.num_layers}."))
    assert mtp == cfg.num_mtp_params() > 0
    assert sum(sizes.values()) - mtp == cfg.num_params()
    assert cfg.num_params(include_mtp=True) == cfg.num_params() + cfg.num_mtp_params() - 2 * 512 * 64
