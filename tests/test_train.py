"""Training: config validation, schedule, losses, balancing, gradient checkpointing, resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r1kit.model.moe import MoE
from r1kit.train.config import TrainConfig, TrainConfigError
from r1kit.train.loop import (
    TrainingError,
    balance_experts,
    latest_usable_checkpoint,
    load_training_checkpoint,
    lr_at,
    masked_ce,
    step_losses,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _load_recipe(path: Path):
    """Each shipped YAML through the loader of its kind (the commands that read it); a plain TrainConfig otherwise."""
    from r1kit.safety.config import SafetyConfig
    from r1kit.train.distill import DistillConfig
    from r1kit.train.finetune import finetune_config
    from r1kit.train.rl_config import GRPOConfig

    name = path.name
    if name.startswith("distill-"):
        return DistillConfig.from_yaml(path).student
    if name.startswith(("grpo-", "rs-nano.yaml")):
        return GRPOConfig.from_yaml(path)
    if name == "safety.yaml":
        return SafetyConfig.from_yaml(path)
    if name in ("finetune-default.yaml", "lora-nano.yaml"):
        return finetune_config("r1kit/nano", "train.jsonl", "runs/unused", str(path))
    if name.startswith("nano-vl"):
        from r1kit.multimodal.train import VLRecipe

        return VLRecipe.from_yaml(path)
    return TrainConfig.from_yaml(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = _load_recipe(path)
    if isinstance(cfg, TrainConfig):
        assert cfg.total_steps >= 1 and cfg.model_config().num_layers >= 1


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny-moe}\nlerning_rate: 0.1\n")
    with pytest.raises(TrainConfigError, match=r"bad\.yaml.*lerning_rate"):
        TrainConfig.from_yaml(bad)
    for d, field in [({"data": {"mixtur": {}}}, "mixtur"), ({"batch_size": "8"}, "batch_size"),
                     ({"precision": "fp16"}, "precision"), ({"model": {"preset": "nope"}}, "model.preset"),
                     ({"model": {"preset": "tiny-moe", "overrides": {"num_layerz": 2}}}, "num_layerz"),
                     ({"data": {"arithmetic_kinds": {"div": 1.0}}}, "arithmetic_kinds"),
                     ({"max_steps": None}, "max_steps")]:
        with pytest.raises(TrainConfigError, match=field):
            TrainConfig.from_dict(d)


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half-way
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(learning_rate=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="linear")
    assert lr_at(25, lin) == pytest.approx(0.75)


def test_masked_ce_and_mtp_alignment(make_model):
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5)
    mask[0, 1] = mask[1, 3] = 1
    ref = (torch.nn.functional.cross_entropy(logits[0, 1], targets[0, 1])
           + torch.nn.functional.cross_entropy(logits[1, 3], targets[1, 3])) / 2
    assert torch.allclose(masked_ce(logits, targets, mask), ref)
    # MTP: the depth-0 head at position t predicts x[t + 2] = y[t + 1]
    model = make_model("tiny-moe")
    x = torch.randint(0, 512, (2, 10))
    y = torch.roll(x, -1, 1)
    _, mtp = step_losses(model, x, y, torch.ones(2, 10))
    logits, hidden = model(x, return_hidden=True)
    want = masked_ce(model.mtp_logits(hidden, x)[0], y[:, 1:], torch.ones(2, 9))
    assert torch.allclose(mtp, want)


def test_bias_balancing_moves_towards_underloaded_experts(make_model):
    moe = next(m for m in make_model("tiny-moe").modules() if isinstance(m, MoE))
    bias_before = moe.gate.e_score_correction_bias.clone()
    load = torch.tensor([10, 0, 0, 0, 0, 0, 0, 6])
    (maxvio,) = balance_experts([moe], [load], rate=0.01)
    assert maxvio == pytest.approx(10 / 2 - 1)
    delta = moe.gate.e_score_correction_bias - bias_before
    assert delta[0] == pytest.approx(-0.01) and delta[7] == pytest.approx(-0.01)
    assert torch.allclose(delta[1:7], torch.full((6,), 0.01))


def test_gradient_checkpointing_same_gradients(make_model):
    grads = []
    x = torch.randint(0, 512, (2, 12))
    for ckpt in (False, True):
        model = make_model("tiny-moe").train()
        model.gradient_checkpointing = ckpt
        model.loss(x, torch.roll(x, -1, 1)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


# ---------------------------------------------------------------------------------------------------- resume


def _train_cmd(out: Path, *extra: str) -> list[str]:
    # the tiny recipe in fp32: resuming is what is tested, and bf16 autocast is ~10x slower on CPUs without
    # native bf16 (AVX2 only), where CI runs
    recipe = out.parent / "tiny-fp32.yaml"
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    recipe.write_text(text.replace("precision: bf16", "precision: fp32"))
    return [sys.executable, "-m", "r1kit", "train", "--config", str(recipe), "--out-dir", str(out),
            "--max-steps", "16", *extra]


def _losses(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("mtp_loss")) for r in rows]


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), check=True, capture_output=True, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while not list((killed / "checkpoints").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = latest_usable_checkpoint(killed)["step"]
    assert resumed_from < 16, "the run finished before it could be killed"
    subprocess.run(_train_cmd(killed, "--resume"), check=True, capture_output=True, env=env)
    assert _losses(killed) == _losses(full)  # every logged loss, before and after the kill, identical
    assert (killed / "final" / "model.safetensors").is_file()


def test_damaged_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    from r1kit.train.loop import train

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "tiny.yaml", out_dir=str(tmp_path / "run"), max_steps=8)
    train(cfg, progress=False)
    files = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert [f.name for f in files] == ["step_00000004.pt", "step_00000008.pt"]
    files[-1].write_bytes(files[-1].read_bytes()[:1000])  # a partial write
    with pytest.raises(TrainingError, match="step_00000008.pt"):
        load_training_checkpoint(files[-1])
    assert latest_usable_checkpoint(tmp_path / "run")["step"] == 4
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(cfg, progress=False)
    summary = train(cfg, resume=True, progress=False)
    assert summary["steps"] == 8 and math.isfinite(summary["tok_s"])


def test_second_stage_starts_from_the_first(tmp_path):
    from r1kit.checkpoint import load_model
    from r1kit.train.loop import train

    first = TrainConfig.from_yaml(ROOT / "configs" / "tiny.yaml", out_dir=str(tmp_path / "a"), max_steps=8)
    train(first, progress=False)
    second = TrainConfig.from_yaml(ROOT / "configs" / "tiny.yaml", out_dir=str(tmp_path / "b"), max_steps=1,
                                   init_from=str(tmp_path / "a" / "final"), learning_rate=1e-12, warmup_steps=0)
    train(second, progress=False)
    a, b = load_model(tmp_path / "a" / "final"), load_model(tmp_path / "b" / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if not name.endswith("e_score_correction_bias"):  # balancing moves the bias even at lr ~ 0
            assert torch.allclose(x, y, atol=1e-2), name  # one step at lr 1e-12: still stage 1's weights
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text() == \
        (tmp_path / "a" / "final" / "tokenizer.json").read_text()
    bad = TrainConfig.from_yaml(ROOT / "configs" / "tiny.yaml", out_dir=str(tmp_path / "c"), max_steps=1,
                                init_from=str(tmp_path / "a" / "final"), model={"preset": "tiny-dense"})
    with pytest.raises(TrainingError, match="init_from"):
        train(bad, progress=False)
