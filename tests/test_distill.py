"""Distillation (r1kit.train.distill, r1kit.train.traces): the divergences against explicit sums, the config's
checks, the tokenizer check, verified traces, on-policy rows, and a tiny end-to-end run that resumes exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from r1kit.api import BUNDLED_DIR
from r1kit.checkpoint import save_model
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer, train_bpe_tokenizer
from r1kit.train import traces as tr
from r1kit.train.config import TrainConfigError
from r1kit.train.data import Problem, chat_example, is_heldout
from r1kit.train.distill import (
    DistillConfig,
    DistillError,
    check_same_tokenizer,
    distill,
    forward_kl,
    generalized_jsd,
    load_tokenizer,
    reverse_kl,
    student_samples,
)

NANO = BUNDLED_DIR / "nano"
needs_nano = pytest.mark.skipif(not (NANO / "tokenizer.json").is_file(), reason="r1kit/nano is not bundled")


def _logits(seed: int, shape=(2, 3, 7)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])[:shape[0], :shape[1]]
    return s, t, mask


def _naive(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, beta: float, temp: float) -> float:
    """beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta T + (1 - beta) S, by explicit sums in float64."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            p_s = torch.softmax(s[b, i].double() / temp, -1).tolist()
            p_t = torch.softmax(t[b, i].double() / temp, -1).tolist()
            m = [beta * pt + (1 - beta) * ps for ps, pt in zip(p_s, p_t, strict=True)]
            kl_t = sum(pt * math.log(pt / mv) for pt, mv in zip(p_t, m, strict=True))
            kl_s = sum(ps * math.log(ps / mv) for ps, mv in zip(p_s, m, strict=True))
            total, n = total + beta * kl_t + (1 - beta) * kl_s, n + 1
    return total / n


def test_forward_and_reverse_kl_match_torch_distributions():
    s, t, mask = _logits(0)
    for temp in (1.0, 0.7):
        ps, pt = Categorical(logits=s / temp), Categorical(logits=t / temp)
        fwd = (kl_divergence(pt, ps) * mask).sum() / mask.sum()
        rev = (kl_divergence(ps, pt) * mask).sum() / mask.sum()
        assert forward_kl(s, t, mask, temp).item() == pytest.approx(fwd.item(), rel=1e-5)
        assert reverse_kl(s, t, mask, temp).item() == pytest.approx(rev.item(), rel=1e-5)
    assert forward_kl(s, s, mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"student logits \(2, 3, 7\).* mask \(3, 2\)"):
        forward_kl(s, t, mask.T)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_explicit_sums(beta):
    s, t, mask = _logits(1)
    assert generalized_jsd(s, t, mask, beta, 0.9).item() == pytest.approx(_naive(s, t, mask, beta, 0.9), rel=1e-4)


def test_jsd_end_points_are_forward_and_reverse_kl_and_its_limits_tend_to_them():
    s, t, mask = _logits(2)
    fwd, rev = forward_kl(s, t, mask, 0.9).item(), reverse_kl(s, t, mask, 0.9).item()
    assert generalized_jsd(s, t, mask, 0.0, 0.9).item() == fwd  # TRL's end points
    assert generalized_jsd(s, t, mask, 1.0, 0.9).item() == rev
    eps = 1e-3  # the mixture formula / beta -> forward KL, / (1 - beta) -> reverse KL
    assert generalized_jsd(s, t, mask, eps, 0.9).item() / eps == pytest.approx(fwd, rel=2e-2)
    assert generalized_jsd(s, t, mask, 1 - eps, 0.9).item() / eps == pytest.approx(rev, rel=2e-2)


def test_jsd_gradient_matches_finite_difference():
    s, t, mask = _logits(3, (1, 3, 5))
    s = s.double().requires_grad_(True)
    generalized_jsd(s, t.double(), mask, 0.5, 1.0).backward()
    h = 1e-6
    bumped = s.detach().clone()
    bumped[0, 0, 2] += h
    numeric = (_naive(bumped, t, mask, 0.5, 1.0) - _naive(s.detach(), t, mask, 0.5, 1.0)) / h
    assert s.grad[0, 0, 2].item() == pytest.approx(numeric, rel=1e-3, abs=1e-7)


# ---------------------------------------------------------------------------------------------------- config


def _recipe(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    return file


@pytest.mark.parametrize("text, words", [
    ("teacher: r1kit/nano\nloss: {betta: 0.5}\n", ["betta", "beta"]),
    ("teacher: r1kit/nano\nteachr: x\n", ["teachr"]),
    ("teacher: r1kit/nano\nloss: {beta: 1.5}\n", ["loss.beta", "1.5"]),
    ("teacher: r1kit/nano\nloss: {lmbda: -0.1}\n", ["loss.lmbda"]),
    ("teacher: null\ntokenizer: r1kit/nano\n", ["teacher is null", "kd_weight"]),
    ("teacher: null\nloss: {kd_weight: 0, lmbda: 0, ce_weight: 1}\n", ["tokenizer"]),
    ("teacher: r1kit/nano\nstudent: {data: {mixture: {stdlib: 1.0}}}\n", ["student.data.mixture"]),
    ("teacher: r1kit/nano\nstudent: {lr: 0.1}\n", ["lr", "learning_rate"]),
    ("teacher: r1kit/nano\ntraces: {samples: 0}\n", ["traces.samples"]),
])
def test_config_refuses_unknown_keys_and_bad_values_by_name(tmp_path, text, words):
    with pytest.raises(TrainConfigError) as e:
        DistillConfig.from_yaml(_recipe(tmp_path, text))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_names_the_bad_key_in_one_line(tmp_path, capsys):
    from r1kit.__main__ import main

    assert main(["distill", "--config", str(_recipe(tmp_path, "teacher: r1kit/nano\nloss: {lambda: 0.5}\n"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lambda" in err and "lmbda" in err and "\n" not in err


def test_shipped_recipes_load():
    root = Path(__file__).resolve().parent.parent / "configs"
    distilled = DistillConfig.from_yaml(root / "distill-nano.yaml")
    baseline = DistillConfig.from_yaml(root / "distill-nano-baseline.yaml", out_dir="elsewhere")
    assert distilled.student.model.preset == baseline.student.model.preset == "nano-distill-qwen2"
    assert distilled.student.max_steps == baseline.student.max_steps  # equal steps
    assert distilled.traces.prompts == baseline.traces.prompts and baseline.teacher is None
    assert baseline.student.out_dir == "elsewhere"
    assert DistillConfig.from_yaml(root / "distill-nano.yaml", max_steps=3).student.total_steps == 3
    with pytest.raises(TrainConfigError, match="max_steps"):
        DistillConfig.from_yaml(root / "distill-nano.yaml", max_steps=0)


# ---------------------------------------------------------------------------------------------------- tokenizers


@needs_nano
def test_tokenizer_mismatch_is_a_clear_error(tmp_path):
    nano = Tokenizer.from_dir(NANO)
    check_same_tokenizer(nano, Tokenizer.from_dir(NANO), "teacher", "student")  # identical: fine
    other = train_bpe_tokenizer(["What is 12+34? " * 50, "def f(x): return x\n" * 50], 300, split_digits=True)
    other.save(tmp_path / "other")
    cfg = DistillConfig.from_yaml(_recipe(tmp_path, f"teacher: r1kit/nano\ntokenizer: {tmp_path / 'other'}\n"))
    with pytest.raises(DistillError, match=r"tokenizers of r1kit/nano and .*other differ .*vocabularies of 4096 and "
                                           r".*teacher's tokenizer"):
        load_tokenizer(cfg)


# ---------------------------------------------------------------------------------------------------- traces


def test_training_prompts_are_distinct_and_never_held_out():
    prompts = tr.training_prompts({"add2": 1.0, "sub3": 2.0}, 300, seed=0)
    assert len({p.prompt for p in prompts}) == 300
    for p in prompts:
        a, op, b = tr._parse_question(p.prompt)
        assert not is_heldout(Problem(a, op, b))
        assert str(Problem(a, op, b).answer) == p.answer
    assert prompts == tr.training_prompts({"add2": 1.0, "sub3": 2.0}, 300, seed=0)  # deterministic
    held = tr.heldout_prompts(["add3"], 20, seed=1)
    assert all(is_heldout(Problem(*tr._parse_question(p.prompt))) for p in held)


def test_verified_needs_the_format_and_the_right_answer():
    assert tr.verified("4+5=9, write 9, so far 9.\nSo 4+5=9.\n</think>\n\n9", "9")
    assert not tr.verified("4+5=9, write 9.\n</think>\n\n8", "9")  # wrong answer
    assert not tr.verified("So 4+5=9. 9", "9")  # no </think>
    assert not tr.verified("a</think>9</think>9", "9")  # two think ends


@needs_nano
def test_reference_trace_records_encode_as_the_pretraining_examples(tmp_path):
    from r1kit.train.chat_data import read_chat_jsonl

    tok = Tokenizer.from_dir(NANO)
    prompts = tr.training_prompts({"add2": 1.0, "sub2": 1.0, "mul2x1": 1.0}, 12, seed=3)
    tr.write_traces(tr.reference_traces(prompts), tmp_path / "t.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [line["answer"] for line in lines] == [p.answer for p in prompts]
    examples = read_chat_jsonl(tmp_path / "t.jsonl", tok, 512).examples
    for p, ex in zip(prompts, examples, strict=True):
        ids, mask = chat_example(Problem(*tr._parse_question(p.prompt)), tok)
        assert tok.decode(ex.ids) == tok.decode(ids)  # same conversation text (token split may differ at </think>)
        target = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask, strict=True) if m])
        assert target == tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_student_samples_mask_exactly_the_generated_tokens():
    from r1kit.generate import SamplingParams, generate_tokens

    model = Transformer(preset("tiny-dense")).init_weights(0).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    torch.manual_seed(0)
    x, y, mask, doc = student_samples(model, prompts, 1.0, 6, [1], 0)
    torch.manual_seed(0)
    outs = [[], []]
    for step in generate_tokens(model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0), [1]):
        for row, token in enumerate(step):
            if token is not None:
                outs[row].append(token)
    assert doc is None
    for b, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        row = p + o
        assert x[b, :len(row) - 1].tolist() == row[:-1] and y[b, :len(row) - 1].tolist() == row[1:]
        assert mask[b].tolist() == [0.0] * (len(p) - 1) + [1.0] * len(o) + [0.0] * (x.shape[1] - len(row) + 1)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_teacher(tmp_path) -> Path:
    """A random DeepSeek-V3-shaped MoE with nano's tokenizer: a teacher of another architecture than the student."""
    folder = tmp_path / "teacher"
    model = Transformer(preset("tiny-moe", vocab_size=4096, num_layers=2)).init_weights(0)
    save_model(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(NANO / name, folder / name)
    return folder


def _tiny_recipe(tmp_path: Path, teacher: Path, out: str, **loss) -> DistillConfig:
    text = f"""
teacher: {teacher}
traces: {{prompts: 12, max_new_tokens: 6}}
loss: {{beta: 0.5, temperature: 0.9, lmbda: {loss.get('lmbda', 0.5)}, kd_weight: 1.0, ce_weight: 1.0}}
student:
  model: {{preset: nano-distill-qwen2, overrides: {{hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1,
                                                   intermediate_size: 64}}}}
  data: {{mixture: {{arithmetic: 1.0}}, arithmetic_kinds: {{add2: 1.0, sub2: 1.0}}}}
  seq_len: 96
  batch_size: 3
  max_steps: 4
  warmup_steps: 1
  precision: fp32
  eval_interval: 2
  eval_batches: 1
  checkpoint_interval: 2
  log_interval: 1
  threads: 1
  out_dir: {tmp_path / out}
"""
    return DistillConfig.from_yaml(_recipe(tmp_path, text))


@needs_nano
def test_teacher_with_no_verified_trace_is_an_error(tmp_path, tiny_teacher):
    with pytest.raises(DistillError, match="got none of the 12 training problems right"):
        distill(_tiny_recipe(tmp_path, tiny_teacher, "none"), progress=False)


@needs_nano
def test_distill_runs_and_a_killed_run_resumes_the_same_curve(tmp_path, tiny_teacher, monkeypatch):
    # the random teacher solves nothing: stand its traces in with the reference ones (the KD still uses its logits)
    monkeypatch.setattr(tr, "teacher_traces",
                        lambda teacher, prompts, cfg, progress: (tr.reference_traces(prompts), {"kept": len(prompts)}))
    whole = distill(_tiny_recipe(tmp_path, tiny_teacher, "whole"), progress=False)
    assert whole["steps"] == 4 and Path(whole["final"], "model.safetensors").is_file()
    distill(_tiny_recipe(tmp_path, tiny_teacher, "killed"), progress=False, stop_after=2)
    with pytest.raises(DistillError, match="differs from the checkpointed run in \\['loss'\\]"):
        distill(_tiny_recipe(tmp_path, tiny_teacher, "killed", lmbda=0.0), resume=True, progress=False)
    distill(_tiny_recipe(tmp_path, tiny_teacher, "killed"), resume=True, progress=False)

    def curve(name: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s")} for r in rows]

    assert curve("killed") == curve("whole")
    steps = [r for r in curve("whole") if "kd_loss" in r]
    assert all(r["kd_loss"] > 0 for r in steps) and {r["on_policy"] for r in steps} == {0.0, 1.0}
    config = json.loads((tmp_path / "whole/final/config.json").read_text())
    assert config["model_type"] == "qwen2"  # the student: another architecture than its MoE teacher
    assert json.loads((tmp_path / "whole/final/tokenizer_config.json").read_text())["auto_map"]
