"""`r1kit finetune` / `r1kit merge` (r1kit.train.finetune): the recipes, LoRA and QLoRA through the training loop
on a chat JSONL (only adapters train, adapter-only checkpoints resume), merge, and the CLI's errors and info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error

from r1kit.api import random_checkpoint
from r1kit.checkpoint import load_model
from r1kit.lora import load_adapter
from r1kit.tokenizer import Tokenizer
from r1kit.train.config import TrainConfigError
from r1kit.train.finetune import FINETUNE_DEFAULTS, finetune, finetune_config, merge

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_steps=4, batch_size=2, gradient_accumulation=1, seq_len=64, warmup_steps=1, learning_rate=1e-2,
             validation_fraction=0.25)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random MLA + MoE checkpoint with the bundled model's tokenizer."""
    tokenizer = Tokenizer.from_dir(ROOT / "r1kit" / "nano")
    return random_checkpoint(tmp_path_factory.mktemp("base"), "tiny-moe", seed=0, tokenizer=tokenizer,
                             num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    lines = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                           {"role": "assistant", "content": f"{a + b}"}]} for a in range(4) for b in range(3)]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _config(base, chat_file, out, **flags):
    cfg = dict(SMALL, **flags)
    return finetune_config(str(base), str(chat_file), str(out), **cfg)


def test_recipes_load_and_default_is_the_design(base, chat_file, tmp_path):
    """configs/finetune-default.yaml equals the built-in defaults (batch 32, lr 3e-5, warmup 500, accumulation 8);
    configs/lora-nano.yaml loads; flags win over the file; a recipe without a rank or with an unknown key fails."""
    default_yaml = yaml.safe_load((ROOT / "configs" / "finetune-default.yaml").read_text())
    assert default_yaml == FINETUNE_DEFAULTS
    cfg = finetune_config(str(base), str(chat_file), str(tmp_path), str(ROOT / "configs" / "finetune-default.yaml"))
    assert (cfg.batch_size, cfg.learning_rate, cfg.warmup_steps, cfg.gradient_accumulation) == (32, 3e-5, 500, 8)
    nano = finetune_config("r1kit/nano", str(chat_file), str(tmp_path), str(ROOT / "configs" / "lora-nano.yaml"),
                           lora_r=4, target_modules=["q_a_proj"])
    assert (nano.lora.r, nano.lora.alpha, nano.lora.target_modules, nano.data.chat_jsonl) == (4, 16.0, ["q_a_proj"],
                                                                                           str(chat_file))
    with pytest.raises(TrainConfigError, match="lora.r must be >= 1"):
        finetune_config(str(base), str(chat_file), str(tmp_path), lora_r=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: {r: 4, rank: 8}\n")
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['rank'\]"):
        finetune_config(str(base), str(chat_file), str(tmp_path), str(bad))


def test_finetune_trains_only_adapters_resumes_and_merges(base, chat_file, tmp_path):
    """LoRA through the training loop: the adapter lands at the top of --out in PEFT's layout, the checkpoints
    hold only adapter tensors and resume, the base is untouched, and merge writes a model with the adapter's
    logits."""
    out = tmp_path / "run"
    summary = finetune(str(base), str(chat_file), str(out), progress=False, **dict(SMALL, max_steps=2))
    assert summary["steps"] == 2 and (out / "adapter_model.safetensors").is_file()
    saved = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    assert saved["model"] and all(".lora_" in k for k in saved["model"])
    summary = finetune(str(base), str(chat_file), str(out), resume=True, progress=False, **dict(SMALL, max_steps=3))
    assert summary["steps"] == 3 and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    ids = torch.randint(2, 4000, (1, 10), generator=torch.Generator().manual_seed(0))
    model = load_model(base)
    with torch.no_grad():
        before = model(ids)
        load_adapter(model, out)
        adapted = model(ids)
    assert (adapted - before).abs().max() > 1e-4  # training moved the adapter away from B = 0
    merged = merge(str(base), str(out), str(tmp_path / "merged"), dtype="fp32")
    assert merged["modules"] > 0 and (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged")(ids), adapted, atol=1e-4, rtol=0)


def test_qlora_nf4_finetune(base, chat_file, tmp_path):
    """QLoRA (NF4 base, int4 experts) runs through the same loop and writes an adapter that loads on the
    full-precision base."""
    out = tmp_path / "qlora"
    finetune(str(base), str(chat_file), str(out), progress=False, qlora="nf4", **dict(SMALL, max_steps=2))
    assert load_adapter(load_model(base), out)


def test_cli_errors_and_info(base, chat_file, tmp_path, capsys):
    """A target that matches nothing is one error line naming what could match; `r1kit info --lora-r` counts
    r * (in + out) per adapted linear layer."""
    proc = subprocess.run([sys.executable, "-m", "r1kit", "finetune", str(base), "--data", str(chat_file), "--out",
                           str(tmp_path / "x"), "--target-modules", "q_proj,v_proj", "--max-steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "'q_proj', 'v_proj' matches no module", "q_a_proj", "mlp.experts")
    from r1kit.__main__ import main
    from r1kit.model.config import preset

    assert main(["info", "tiny-dense", "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = preset("tiny-dense")
    q_out, kv_out = cfg.num_heads * cfg.gqa_head_dim, cfg.num_kv_heads * cfg.gqa_head_dim
    expected = cfg.num_layers * 4 * ((cfg.hidden_size + q_out) + (cfg.hidden_size + kv_out))
    assert info["lora_params"] == expected and info["lora_fraction"] == pytest.approx(expected / info["params_total"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"r1kit serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"r1kit serve not healthy after {timeout} s: {log.read_text()[-2000:]}")


def test_one_command_finetune_then_serve_the_adapter(tmp_path):
    """The issue's user flow on the bundled model: `r1kit finetune r1kit/nano --data CHATS --out DIR` (one command),
    then `r1kit serve r1kit/nano --adapter DIR` as a real server process. Its greedy chat answer over HTTP is
    R1Model.from_pretrained("r1kit/nano", adapter=DIR)'s (reasoning and answer), and not the base model's."""
    from r1kit.__main__ import main
    from r1kit.api import R1Model

    question = "Find the sum of {} and {}."  # a wording nano was never trained on
    rows = [{"messages": [{"role": "user", "content": question.format(a, b)},
                          {"role": "assistant", "reasoning_content": f"{a}+{b}={a + b}.", "content": str(a + b)}]}
            for a, b in [(12, 30), (41, 7), (25, 25), (63, 18), (9, 70), (33, 44), (58, 21), (16, 16)]]
    data, out = tmp_path / "chats.jsonl", tmp_path / "adapter"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["finetune", "r1kit/nano", "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--gradient-accumulation", "1", "--seq-len", "64", "--warmup-steps", "1",
                 "--learning-rate", "2e-2", "--validation-fraction", "0.25", "--precision", "fp32"]) in (0, None)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()

    port, log = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "r1kit", "serve", "r1kit/nano", "--adapter", str(out),
                                 "--port", str(port), "--device", "cpu"], stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    try:
        messages = [{"role": "user", "content": question.format(27, 31)}]  # not a training problem
        adapted = R1Model.from_pretrained("r1kit/nano", device="cpu", adapter=out)  # while the server loads
        expected = adapted.chat(messages, temperature=0, max_new_tokens=24)
        adapted.set_adapter(None)
        base = adapted.chat(messages, temperature=0, max_new_tokens=24)
        assert (base.reasoning, base.content) != (expected.reasoning, expected.content)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        reply = _post_json(url + "/v1/chat/completions", {"model": "r1kit/nano", "messages": messages,
                                                          "temperature": 0, "max_tokens": 24})
        message = reply["choices"][0]["message"]
        assert (message.get("reasoning_content"), message["content"]) == (expected.reasoning,
                                                                          expected.content)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
