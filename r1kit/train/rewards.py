"""Verifiable rewards and the prompts they verify: what GRPO, rejection sampling and distillation score.

    accuracy_reward(completion, "85")        # 1.0 when the answer after </think> equals 85 after normalisation
    format_reward(completion)                # 1.0 for "reasoning </think> answer", both non-empty, no other tags
    length_reward(num_tokens=200, max_completion_length=256)   # DAPO's soft overlong penalty, in [-1, 0]
    fn = resolve_reward("mypkg.rewards:exact")                 # a custom reward, `module:function`
    source = PromptSource.arithmetic({"sub3": 2, "add3": 1}, seed=0)   # training problems, never held-out ones
    source = PromptSource(load_jsonl_prompts("tasks.jsonl"))         # {"prompt": ..., "answer": ...} per line
    source.take(step, 8)                                             # the prompts of one step

A completion is the text the model generated after the prompt. R1's chat template ends the prompt with
``<think>\\n``, so a completion is ``reasoning </think> answer`` (a leading ``<think>`` is accepted too, for a
prompt that does not open the block). The answer is the text after the last ``</think>``.

Every reward, built in or custom, is called with keyword arguments chosen from ``prompt``, ``completion``,
``answer`` (the reference), ``num_tokens`` (completion tokens) and ``max_completion_length``: the ones its
signature names (all of them with ``**kwargs``). It returns a float. One that raises is reported by
:func:`score` as a RewardError naming the function and showing the completion.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from r1kit.tokenizer import THINK_CLOSE, THINK_OPEN

RewardFn = Callable[..., float]
REWARD_ARGS = ("prompt", "completion", "answer", "num_tokens", "max_completion_length")


class RewardError(ValueError):
    """A reward cannot be resolved, or raised on a completion; a prompt file is malformed. The message says which."""


# ---------------------------------------------------------------------------------------------------- answers


def extract_answer(completion: str) -> str | None:
    """The answer of a completion: the text after its last ``</think>``, stripped; None without a ``</think>``
    (the reasoning never ended) or with nothing after it."""
    if THINK_CLOSE not in completion:
        return None
    answer = completion.rsplit(THINK_CLOSE, 1)[1].strip()
    return answer or None


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.S)


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for exact comparison: outer whitespace, ``$``, a trailing period and a
    ``\\boxed{}`` dropped, runs of whitespace made one space, lower case; thousands separators (``1,234``) removed
    and numbers written canonically (``-0366`` -> ``-366``, ``2.50`` -> ``2.5``)."""
    text = text.strip().replace("$", "").strip()
    boxed = _BOXED.match(text)
    text = (boxed.group(1) if boxed else text).strip().rstrip(".").strip()
    text = re.sub(r"\s+", " ", text).lower()
    plain = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    if _NUMBER.fullmatch(plain):
        try:
            number = Decimal(plain).normalize()
        except InvalidOperation:
            return text
        if number == number.to_integral():
            number = number.quantize(Decimal(1)) if number else Decimal(0)
        return format(number, "f")
    return text


def accuracy_reward(completion: str, answer: str | int) -> float:
    """1.0 when the completion's answer (see :func:`extract_answer`) equals ``answer`` after
    :func:`normalize_answer`, else 0.0 (also without an answer)."""
    got = extract_answer(completion)
    return float(got is not None and normalize_answer(got) == normalize_answer(str(answer)))


def format_reward(completion: str) -> float:
    """1.0 for R1's format: (an optional leading ``<think>``,) non-empty reasoning, one ``</think>``, then a
    non-empty answer, with no other think tag anywhere; else 0.0."""
    text = completion.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
        return 0.0
    reasoning, answer = text.split(THINK_CLOSE)
    return float(bool(reasoning.strip()) and bool(answer.strip()))


def length_reward(num_tokens: int, max_completion_length: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_completion_length - buffer`` tokens, then falling linearly
    to -1 at ``max_completion_length`` (and -1 beyond), with buffer = max_completion_length // 4."""
    buffer = max(1, max_completion_length // 4)
    start = max_completion_length - buffer
    if num_tokens <= start:
        return 0.0
    return max(-1.0, (start - num_tokens) / buffer)


BUILTIN_REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward,
                                        "length": length_reward}


# ---------------------------------------------------------------------------------------------- resolving, calling


def resolve_reward(name: str) -> RewardFn:
    """A reward by name: ``accuracy``, ``format``, ``length``, or ``module:function`` (imported)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise RewardError(f"reward {name!r}: unknown; built in: {sorted(BUILTIN_REWARDS)}, or give module:function")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    reward_kwargs(fn, name)
    return fn


def reward_kwargs(fn: RewardFn, name: str) -> tuple[str, ...]:
    """The keyword arguments (from REWARD_ARGS) `fn` takes; RewardError when it needs one we cannot give."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return REWARD_ARGS
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,)]
    unknown = [n for n in required if n not in REWARD_ARGS]
    if unknown:
        raise RewardError(f"reward {name!r}: its parameter(s) {unknown} are not among {list(REWARD_ARGS)}")
    return tuple(n for n in REWARD_ARGS if n in params)


@dataclass
class Scored:
    """One completion to score: the prompt text, the generated text, the reference answer, the completion's
    token count."""

    prompt: str
    completion: str
    answer: str
    num_tokens: int


def score(fn: RewardFn, name: str, sample: Scored, max_completion_length: int) -> float:
    """`fn`'s reward for `sample`; RewardError naming the function and showing the completion when it raises or
    returns something that is not a finite number."""
    values = {"prompt": sample.prompt, "completion": sample.completion, "answer": sample.answer,
              "num_tokens": sample.num_tokens, "max_completion_length": max_completion_length}
    shown = sample.completion if len(sample.completion) <= 400 else sample.completion[:400] + "..."
    try:
        value = fn(**{k: values[k] for k in reward_kwargs(fn, name)})
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its input
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}\n  on completion: {shown!r}") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise RewardError(f"reward {name!r} returned {value!r} (needs a finite number)\n  on completion: {shown!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A user message with a verifiable reference answer; `kind` groups prompts for per-kind metrics."""

    prompt: str
    answer: str
    kind: str = "jsonl"


class PromptSource:
    """The prompts of each training step, a pure function of (seed, step), so a resumed run sees the same ones.

    ``PromptSource.arithmetic({"sub3": 2, "add3": 1})``: training arithmetic problems (never the held-out ones),
    each kind drawn with its weight. ``PromptSource(load_jsonl_prompts(path))``: a fixed list, every prompt once
    per pass, reshuffled each pass.
    """

    def __init__(self, prompts: Sequence[Prompt] | None = None, kinds: Mapping[str, float] | None = None,
                 seed: int = 0):
        self.prompts, self.kinds, self.seed = list(prompts or []), dict(kinds or {}), seed
        if not self.prompts and not self.kinds:
            raise RewardError("a prompt source needs prompts or arithmetic kinds")

    @classmethod
    def arithmetic(cls, kinds: Mapping[str, float], seed: int = 0) -> PromptSource:
        from r1kit.train.data import KINDS

        bad = [k for k in kinds if k not in KINDS]
        weights = list(kinds.values())
        if bad or not kinds or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise RewardError(f"arithmetic kinds {dict(kinds)}: need kinds from {list(KINDS)} with weights >= 0 "
                              "and a sum > 0")
        return cls(kinds=kinds, seed=seed)

    def take(self, step: int, n: int) -> list[Prompt]:
        """The `n` prompts of step `step`."""
        if self.kinds:
            from r1kit.train.data import sample_problem

            rng = random.Random(self.seed * 1_000_003 + step)
            names, weights = list(self.kinds), list(self.kinds.values())
            out = []
            for kind in rng.choices(names, weights, k=n):
                problem = sample_problem(rng, kind, split="train")
                out.append(Prompt(problem.question, str(problem.answer), kind))
            return out
        size = len(self.prompts)
        return [self._nth(i, size) for i in range(step * n, step * n + n)]

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint stores: the source is a function of (seed, step), so only the seed."""
        return {"seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])

    def _nth(self, index: int, size: int) -> Prompt:
        epoch, offset = divmod(index, size)
        order = list(range(size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return self.prompts[order[offset]]


def load_jsonl_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file, one ``{"prompt": str, "answer": str|number}`` object per line (blank lines
    skipped; an optional ``"kind"``); RewardError naming the file and line number for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"{path}: no such prompt file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RewardError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise RewardError(f"{where}: expected an object with 'prompt' and 'answer', got {type(row).__name__}")
        for key in ("prompt", "answer"):
            if key not in row:
                raise RewardError(f"{where}: missing {key!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise RewardError(f"{where}: 'prompt' must be a non-empty string")
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
            raise RewardError(f"{where}: 'answer' must be a string or a number")
        prompts.append(Prompt(row["prompt"], str(row["answer"]), str(row.get("kind", "jsonl"))))
    if not prompts:
        raise RewardError(f"{path}: no prompts in the file")
    return prompts


def reward_names(names: Sequence[str]) -> dict[str, Any]:
    """{name: function} for the configured rewards, resolved once (RewardError for an unknown one)."""
    return {name: resolve_reward(name) for name in names}
