"""`r1kit finetune` / `r1kit merge` (r1kit.train.finetune): the recipes, LoRA and QLoRA through the training loop
on a chat JSONL (only adapters train, adapter-only checkpoints resume), merge, and the CLI's errors and info."""

from __future__ import annotations

import json
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
