"""Rewards and prompt sources (r1kit.train.rewards) against hand-worked cases."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest

from r1kit.train.data import Problem, is_heldout
from r1kit.train.rewards import (
    PromptSource,
    RewardError,
    Scored,
    accuracy_reward,
    extract_answer,
    format_reward,
    length_reward,
    load_jsonl_prompts,
    normalize_answer,
    resolve_reward,
    score,
)

GOOD = "5+8=13, write 3 carry 1, so far 3.\nSo 5+8=13.\n</think>\n\n13"


@pytest.mark.parametrize("text, want", [
    ("-0366", "-366"), (" 2.50 ", "2.5"), ("1,234", "1234"), ("\\boxed{85}", "85"), ("$42$.", "42"), ("-0", "0"),
    ("Hello  World.", "hello world"), ("x, y", "x, y")])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_extract_and_accuracy():
    assert extract_answer(GOOD) == "13"
    assert extract_answer("no close tag 13") is None
    assert extract_answer("r</think>  \n") is None
    assert extract_answer("a</think>1</think> 7") == "7"  # the last </think>
    assert accuracy_reward(GOOD, 13) == 1.0
    assert accuracy_reward(GOOD, "13.0") == 1.0
    assert accuracy_reward(GOOD, "14") == 0.0
    assert accuracy_reward("So 5+8=13.", 13) == 0.0  # no answer without </think>
    assert accuracy_reward("r</think>\n\n-366", -366) == 1.0


@pytest.mark.parametrize("completion, want", [
    (GOOD, 1.0), ("<think>\nsteps\n</think>\n7", 1.0), ("</think>7", 0.0), ("steps</think>  ", 0.0),
    ("steps\n</think>7</think>7", 0.0), ("steps <think> more </think> 7", 0.0), ("steps only", 0.0)])
def test_format_reward(completion, want):
    assert format_reward(completion) == want


def test_length_reward_by_hand():
    # max 256 -> buffer 64, punishment starts after 192 tokens: (192 - n) / 64
    assert length_reward(num_tokens=100, max_completion_length=256) == 0.0
    assert length_reward(num_tokens=192, max_completion_length=256) == 0.0
    assert length_reward(num_tokens=224, max_completion_length=256) == -0.5
    assert length_reward(num_tokens=256, max_completion_length=256) == -1.0
    assert length_reward(num_tokens=400, max_completion_length=256) == -1.0


def test_custom_reward_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def short(completion, num_tokens):
            return 1.0 / num_tokens
        def boom(completion):
            raise KeyError("nope")
        def needs_other(completion, teacher):
            return 0.0
        def nan(**kwargs):
            return float("nan")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sample = Scored("What is 5+8?", GOOD, "13", 4)
    assert score(resolve_reward("my_rewards:short"), "my_rewards:short", sample, 256) == 0.25
    with pytest.raises(RewardError, match=r"'my_rewards:boom' raised KeyError.*\n  on completion: '5\+8=13"):
        score(resolve_reward("my_rewards:boom"), "my_rewards:boom", sample, 256)
    with pytest.raises(RewardError, match=r"'my_rewards:nan' returned nan"):
        score(resolve_reward("my_rewards:nan"), "my_rewards:nan", sample, 256)
    with pytest.raises(RewardError, match=r"parameter\(s\) \['teacher'\]"):
        resolve_reward("my_rewards:needs_other")
    with pytest.raises(RewardError, match="has no function 'missing'"):
        resolve_reward("my_rewards:missing")
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod_xyz'"):
        resolve_reward("no_such_mod_xyz:f")
    with pytest.raises(RewardError, match="unknown; built in"):
        resolve_reward("acuracy")
    sys.modules.pop("my_rewards", None)


def test_jsonl_prompts_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "2+2?", "answer": 4}\n\n{"prompt": "Capital of France?", "answer": "Paris"}\n')
    prompts = load_jsonl_prompts(good)
    assert [(p.prompt, p.answer) for p in prompts] == [("2+2?", "4"), ("Capital of France?", "Paris")]
    cases = {'{"prompt": "a", "answer": 1}\n{"answer": 2}\n': r"bad.jsonl:2: missing 'prompt'",
             '{"prompt": "a", "answer": 1}\n\n{"prompt": "b"\n': r"bad.jsonl:3: not valid JSON",
             '[1, 2]\n': r"bad.jsonl:1: expected an object",
             '{"prompt": "", "answer": 1}\n': r"bad.jsonl:1: 'prompt' must be a non-empty string"}
    for text, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(RewardError, match=message):
            load_jsonl_prompts(tmp_path / "bad.jsonl")


def test_prompt_sources_are_deterministic_and_never_heldout():
    src = PromptSource.arithmetic({"sub3": 3.0, "add2": 1.0}, seed=5)
    batch = src.take(7, 64)
    assert batch == PromptSource.arithmetic({"sub3": 3.0, "add2": 1.0}, seed=5).take(7, 64)
    assert batch != src.take(8, 64)
    assert {p.kind for p in batch} == {"sub3", "add2"}
    for p in src.take(0, 300):
        a, op, b = re.fullmatch(r"What is (\d+)([-+])(\d+)\?", p.prompt).groups()
        problem = Problem(int(a), op, int(b))
        assert not is_heldout(problem) and str(problem.answer) == p.answer
    with pytest.raises(RewardError, match="arithmetic kinds"):
        PromptSource.arithmetic({"sub4": 1.0})
    fixed = PromptSource([*load_prompts_inline()], seed=1)
    first_pass = fixed.take(0, 3)
    assert sorted(p.prompt for p in first_pass) == ["a", "b", "c"]  # each prompt once per pass


def load_prompts_inline():
    from r1kit.train.rewards import Prompt

    return [Prompt("a", "1"), Prompt("b", "2"), Prompt("c", "3")]
