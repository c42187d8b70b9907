"""r1kit compress --method distill and qat-* --kd: a compressed student learns from the original through
r1kit.train.distill's loss inside r1kit.train.loop. Checked: the loop's objective is KL(teacher || student)
computed by torch.distributions; distillation lowers that KL on held-out tokens; pruned zeros and the 2:4
pattern survive; a structurally pruned student keeps its smaller shapes; config.json records the chain; QAT +
KD is one call ending in real int4 modules; and the bad inputs are clear errors."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from r1kit.checkpoint import load_model
from r1kit.compress import CompressError, compress, prune
from r1kit.tokenizer import Tokenizer
from r1kit.train.data import chat_example, sample_problem
from r1kit.train.distill import DistillError, LogitDistillation, LossSection

FIT = {"batch_size": 4, "seq_len": 32, "learning_rate": 3e-3}


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The fine-tune's final loss and expert-load PNGs (tested in test_train) are most of a tiny run's time."""
    monkeypatch.setattr("r1kit.train.loop.plot_metrics", lambda *a, **k: None)
    monkeypatch.setattr("r1kit.train.loop.plot_expert_load", lambda *a, **k: [])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    file = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    file.write_text("model: {preset: tiny-moe}\ndata: {mixture: {arithmetic: 1.0}, arithmetic_examples: 64}\n"
                    "eval_batches: 1\nmoe_balance_rate: 0.0\n")
    return str(file)


@pytest.fixture(scope="module")
def heldout(tiny_src):
    """(4, 31) token ids of held-out arithmetic conversations (the val split: never in the training data)."""
    tok, rng = Tokenizer.from_dir(tiny_src), random.Random(5)
    rows = [chat_example(sample_problem(rng, "add3", split="val"), tok)[0][:31] for _ in range(4)]
    return torch.tensor([r + [0] * (31 - len(r)) for r in rows])


def kl_to(teacher: torch.nn.Module, folder, ids: torch.Tensor) -> float:
    """Mean over positions of KL(teacher || student), by torch.distributions."""
    with torch.no_grad():
        t, s = teacher(ids), load_model(folder, "cpu", torch.float32)(ids)
    return float(kl_divergence(Categorical(logits=t), Categorical(logits=s)).mean())


def test_objective_is_the_kl_to_the_teacher(make_model):
    teacher, student = make_model("tiny-moe", seed=0), make_model("tiny-moe", seed=1)
    x = torch.randint(0, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9)
    with torch.no_grad():
        logits, t = student(x), teacher(x)
    objective = LogitDistillation(teacher, LossSection(beta=0.0, temperature=1.0, lmbda=0.0))
    got = objective(logits, x, x, mask, None)
    torch.testing.assert_close(got, kl_divergence(Categorical(logits=t), Categorical(logits=logits)).mean())


def test_distill_recovers_a_two_four_pruned_model_and_keeps_its_pattern(tiny_src, recipe, heldout, tmp_path):
    pruned, out = tmp_path / "p24", tmp_path / "p24-kd"
    compress(tiny_src, pruned, "prune-2:4")
    record = compress(pruned, out, "distill", {**FIT, "max_steps": 8, "data": recipe, "work_dir": str(tmp_path / "r")})
    teacher = load_model(tiny_src, "cpu", torch.float32).eval()
    before, after = kl_to(teacher, pruned, heldout), kl_to(teacher, out, heldout)
    assert after < 0.9 * before, (before, after)
    model, start = load_model(out, "cpu", torch.float32), load_model(pruned, "cpu", torch.float32)
    weights, masks = prune.prunable(model), prune.prunable(start)
    assert all(prune.is_two_four(w) for w in weights.values())
    for name, w in weights.items():
        assert torch.equal(w == 0, masks[name] == 0), name  # the zeros stay zero, the kept weights stay kept
    assert any(not torch.equal(w, masks[n]) for n, w in weights.items())  # and the kept ones trained
    hf = json.loads((out / "config.json").read_text())["compression"]
    assert hf["method"] == "distill" and hf["previous"]["method"] == "prune-2:4"
    assert record["stats"]["chain"] == ["prune-2:4", "distill"] and record["stats"]["two_four"]
    assert record["stats"]["finetune"]["teacher"] == str(tiny_src)  # the original, found through the chain


def test_distill_keeps_the_structurally_pruned_shapes_then_quantizes(tiny_src, recipe, tmp_path):
    small, out = tmp_path / "s", tmp_path / "s-kd"
    compress(tiny_src, small, "prune-structured", {"heads": 3, "mlp_keep": 0.5})
    compress(small, out, "distill", {**FIT, "max_steps": 2, "data": recipe, "work_dir": str(tmp_path / "r")})
    shapes = {n: t.shape for n, t in load_model(small).state_dict().items()}
    assert {n: t.shape for n, t in load_model(out).state_dict().items()} == shapes
    compress(out, tmp_path / "s-kd-int4", "int4", {"group_size": 32})  # prune-structured -> distill -> int4
    chain = json.loads((tmp_path / "s-kd-int4" / "config.json").read_text())["compression"]
    assert [chain["method"], chain["previous"]["method"], chain["previous"]["previous"]["method"]] == [
        "int4", "distill", "prune-structured"]


def test_qat_int4_with_kd_is_one_call(tiny_src, recipe, tmp_path):
    from r1kit.quant.linear import Int4Linear

    record = compress(tiny_src, tmp_path / "q", "qat-int4", {**FIT, "max_steps": 2, "kd": True, "group_size": 32,
                                                             "data": recipe, "work_dir": str(tmp_path / "r")})
    assert record["stats"]["finetune"]["teacher"] == str(tiny_src) and record["stats"]["finetune"]["steps"] == 2
    assert any(isinstance(m, Int4Linear) for m in load_model(tmp_path / "q").modules())


def test_distill_refuses_what_it_cannot_do(tiny_src, recipe, tmp_path):
    with pytest.raises(CompressError, match="not compressed"):
        compress(tiny_src, tmp_path / "a", "distill", {"data": recipe})
    compress(tiny_src, tmp_path / "q", "int8")
    with pytest.raises(CompressError, match="qat-int4 --kd"):
        compress(tmp_path / "q", tmp_path / "b", "distill", {"data": recipe})
    with pytest.raises(CompressError, match="only used with kd"):
        compress(tiny_src, tmp_path / "c", "qat-int8", {"teacher": str(tiny_src)})
    other = tmp_path / "other"  # the same weights with another tokenizer
    shutil.copytree(tiny_src, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["eos_token"] = config["pad_token"]
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    compress(tiny_src, tmp_path / "p", "prune-2:4")
    with pytest.raises(DistillError, match="tokenizers of teacher"):
        compress(tmp_path / "p", tmp_path / "d", "distill", {**FIT, "max_steps": 1, "teacher": str(other),
                                                             "data": recipe, "work_dir": str(tmp_path / "r")})
