"""Training corpora that need no network, deterministic from a seed, and the batches cut from them.

Two sources:

- Python source code: the ``*.py`` files of the running interpreter's standard library, split into train and
  validation by file. The corpus depends on the interpreter's version; it is read when a run starts and never
  stored in the repository.
- Arithmetic problems ("What is 47+38?") answered in DeepSeek-R1's format: step-by-step reasoning, then
  ``</think>`` and the number. A stable ~10% of all problems is held out for validation.

Each source becomes a :class:`TokenStream` (token ids and a loss mask); a :class:`Mixture` cuts fixed-length
windows from the streams, picking each row's stream by weight, and can save and restore its position exactly.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sysconfig
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1kit.fileio import atomic_folder
from r1kit.tokenizer import THINK_CLOSE, Tokenizer

HELDOUT_FRACTION = 0.1
"""About this fraction of all arithmetic problems is held out of training (see :func:`is_heldout`)."""

# kind -> (operator, range of a, range of b). "2-digit" add/sub operands are 0..99 (so one-digit numbers
# appear too) and "3-digit" ones 0..999; multiplication's 2-digit factors are 10..99 and 1-digit ones 0..9.
_KIND_OPERANDS: dict[str, tuple[str, range, range]] = {
    "add2": ("+", range(100), range(100)),
    "sub2": ("-", range(100), range(100)),
    "add3": ("+", range(1000), range(1000)),
    "sub3": ("-", range(1000), range(1000)),
    "mul2x1": ("*", range(10, 100), range(10)),
    "mul2x2": ("*", range(10, 100), range(10, 100)),
    "mul3x2": ("*", range(100, 1000), range(10, 100)),
    "mul3x3": ("*", range(100, 1000), range(100, 1000)),
}
LONG_KINDS: tuple[str, ...] = ("mul3x2", "mul3x3")
"""Multiplications nano is taught to do with the calculator tool only (r1kit.train.tool_data)."""
KINDS: tuple[str, ...] = tuple(k for k in _KIND_OPERANDS if k not in LONG_KINDS)
"""The kinds of nano's arithmetic data and model card."""
ALL_KINDS: tuple[str, ...] = tuple(_KIND_OPERANDS)
"""Problem kinds accepted by :func:`sample_problem`: :data:`KINDS` and :data:`LONG_KINDS`."""

OPERATORS = ("+", "-", "*")
SPLITS = ("train", "val")

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
_ENCODE_CHUNK = 256  # texts per encode_batch call, which bounds the memory of the intermediate Encodings
_INTEGER = re.compile(r"(?<!\d)-?\d+")  # a minus sign right after a digit is subtraction, not a sign


def _flat_copy(values: Sequence[int] | array | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU copy of ``values`` (a tensor, an ``array.array`` or a sequence of ints) as ``dtype``."""
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.reshape(-1).to(dtype, copy=True)


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: SHA-256 based, so unlike ``hash()`` the same in every process."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------------------
# Python standard library corpus


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files, recursively and sorted, without any site-/dist-packages."""
    files: list[Path] = []
    for directory, subdirs, names in os.walk(stdlib_root()):
        subdirs[:] = [name for name in subdirs if name not in _EXCLUDED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files)


def split_files(
    files: Iterable[Path], val_fraction: float = 0.05, root: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into sorted ``(train, val)`` lists, whole files to one side.

    A file goes to validation when a stable hash of its path relative to ``root`` (default: the standard
    library's root) falls below ``val_fraction``, so the split does not depend on which other files are given
    or where the interpreter is installed.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    root = stdlib_root() if root is None else root
    train: list[Path] = []
    val: list[Path] = []
    for path in sorted(files):
        key = Path(path).relative_to(root).as_posix()
        (val if _stable_fraction(key) < val_fraction else train).append(path)
    return train, val


def read_texts(files: Iterable[Path], max_chars: int | None = None) -> list[str]:
    """The text of ``files`` in order, skipping files that are not UTF-8 (a few test fixtures in the stdlib).

    With ``max_chars``, reading stops after the file that brings the total to ``max_chars`` or more.
    """
    texts: list[str] = []
    total = 0
    for path in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(text)
        total += len(text)
    return texts


# ---------------------------------------------------------------------------------------------------------
# Arithmetic problems with step-by-step reasoning


@dataclass(frozen=True)
class Problem:
    """``a op b`` for non-negative integers ``a`` and ``b`` and ``op`` one of ``+``, ``-``, ``*``."""

    a: int
    op: str
    b: int

    def __post_init__(self) -> None:
        """Reject unknown operators and negative operands (the traces assume non-negative numbers)."""
        if self.op not in OPERATORS:
            raise ValueError(f"op must be one of {', '.join(OPERATORS)}, got {self.op!r}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"operands must be non-negative, got {self.a} and {self.b}")

    @property
    def expression(self) -> str:
        """``"47+38"``."""
        return f"{self.a}{self.op}{self.b}"

    @property
    def question(self) -> str:
        """``"What is 47+38?"``."""
        return f"What is {self.expression}?"

    @property
    def answer(self) -> int:
        """The exact result (negative for a subtraction with ``a < b``)."""
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b


def _digit(n: int, position: int) -> int:
    """Digit of ``n`` at ``position`` counted from the right (0 = ones); 0 beyond its length."""
    return n // 10**position % 10


def _addition_steps(a: int, b: int) -> list[str]:
    """Column addition from the right, one line per column.

    ``x+y=s, write d, so far R.`` or, with a carry coming in and/or going out, ``x+y+1=s, write d carry 1,
    so far R.``, where ``R`` is every digit written so far. A final carry gets a column of its own
    (``0+0+1=1, write 1, so far 198.``), so each line depends only on its two digits, the previous line's
    carry and the previous ``R``.
    """
    steps: list[str] = []
    width = max(len(str(a)), len(str(b)))
    carry, written, position = 0, "", 0
    while position < width or carry:
        x, y = _digit(a, position), _digit(b, position)
        total = x + y + carry
        expression = f"{x}+{y}" + ("+1" if carry else "")
        carry = total // 10
        written = str(total % 10) + written
        write = f"write {total % 10}" + (" carry 1" if carry else "")
        steps.append(f"{expression}={total}, {write}, so far {written}.")
        position += 1
    return steps


def _subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction ``a-b`` for ``a >= b`` from the right, one line per digit of ``a``.

    ``x-y=d, write d, so far R.``, ``x-y-1=d, ...`` after a borrow, and when the column is negative
    ``x-y is negative, so borrow: 1x-y=d, write d borrow 1, so far R.`` (``1x`` is ten plus ``x``). ``R`` may
    start with zeros (``so far 09``); the caller's final line gives the number without them.
    """
    steps: list[str] = []
    borrow, written = 0, ""
    for position in range(len(str(a))):
        x, y = _digit(a, position), _digit(b, position)
        expression = f"{x}-{y}" + ("-1" if borrow else "")
        value = x - y - borrow
        if value >= 0:
            borrow = 0
            written = str(value) + written
            steps.append(f"{expression}={value}, write {value}, so far {written}.")
        else:
            borrow = 1
            written = str(value + 10) + written
            steps.append(
                f"{expression} is negative, so borrow: 1{expression}={value + 10}, write {value + 10} borrow 1, "
                f"so far {written}."
            )
    return steps


def _multiplication_steps(a: int, b: int) -> list[str]:
    """One partial product per digit of ``b`` (from the right), then the column addition of the shifted ones.

    A partial product splits ``a`` by place value: ``47*8=40*8+7*8=320+56=376.``; the partial of the tens digit
    is shifted with ``141*10=1410``. Two or more partials are then added pairwise, each sum written as
    ``Add 376+1410:``, its column steps and ``So 376+1410=1786.``.
    """
    steps: list[str] = []
    places = [_digit(a, position) * 10**position for position in reversed(range(len(str(a))))]
    shifted: list[int] = []
    for position in range(len(str(b))):
        y = _digit(b, position)
        partial = a * y
        line = f"{a}*{y}={partial}"
        if len(places) > 1:
            terms = "+".join(f"{place}*{y}" for place in places)
            products = "+".join(str(place * y) for place in places)
            line = f"{a}*{y}={terms}={products}={partial}"
        if position:
            line += f", and {partial}*{10**position}={partial * 10**position}"
        steps.append(line + ".")
        shifted.append(partial * 10**position)
    total = shifted[0]
    for addend in shifted[1:]:
        steps.append(f"Add {total}+{addend}:")
        steps.extend(_addition_steps(total, addend))
        steps.append(f"So {total}+{addend}={total + addend}.")
        total += addend
    return steps


def reasoning(problem: Problem) -> str:
    """A step-by-step trace of ``problem`` a small model can learn, one step per line, ending ``So 47+38=85.``.

    Every step is local and checkable: a column of an addition or subtraction (see :func:`_addition_steps`,
    :func:`_subtraction_steps`), a partial product split by place value, or a copy of an earlier result. A
    subtraction with a negative result is done as ``b-a`` and negated, which the first line says. No line
    contains ``</think>``.
    """
    a, b = problem.a, problem.b
    if problem.op == "+":
        steps = _addition_steps(a, b)
    elif problem.op == "-" and a >= b:
        steps = _subtraction_steps(a, b)
    elif problem.op == "-":
        steps = [f"{a} is less than {b}, so compute {b}-{a} and negate.", *_subtraction_steps(b, a)]
        steps.append(f"So {b}-{a}={b - a}.")
    else:
        steps = _multiplication_steps(a, b)
    steps.append(f"So {problem.expression}={problem.answer}.")
    return "\n".join(steps)


def is_heldout(problem: Problem) -> bool:
    """Whether ``problem`` belongs to the validation problems (a stable ~10% of each kind).

    The hash key puts the operands of ``+`` and ``*`` in order, so ``38+47`` is held out with ``47+38``.
    """
    a, b = problem.a, problem.b
    if problem.op in ("+", "*"):
        a, b = min(a, b), max(a, b)
    return _stable_fraction(f"{a}{problem.op}{b}") < HELDOUT_FRACTION


def sample_problem(rng: random.Random, kind: str, split: str | None = "train") -> Problem:
    """A random problem of ``kind`` (one of :data:`KINDS`) drawn uniformly from its operand ranges.

    ``split="train"`` resamples until the problem is not held out, ``"val"`` until it is; ``None`` takes any.
    """
    if kind not in _KIND_OPERANDS:
        raise ValueError(f"kind must be one of {', '.join(ALL_KINDS)}, got {kind!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or None, got {split!r}")
    op, a_range, b_range = _KIND_OPERANDS[kind]
    while True:
        problem = Problem(rng.choice(a_range), op, rng.choice(b_range))
        if split is None or is_heldout(problem) == (split == "val"):
            return problem


def _chat_texts(problem: Problem, tokenizer: Tokenizer) -> tuple[str, str]:
    """The R1 prompt (ending ``<think>\\n``) and completion (without EOS) of ``problem``."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}], add_generation_prompt=True, thinking=True
    )
    completion = f"{reasoning(problem)}\n{THINK_CLOSE}\n\n{problem.answer}"
    return prompt, completion


def _require_eos(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_token, which ends every document and completion")
    return tokenizer.eos_id


def _encode_all(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``[tokenizer.encode(text) for text in texts]``, computed on all cores by the backend's encode_batch."""
    backend = tokenizer._backend  # Tokenizer has no batch API; its encode is backend.encode without specials
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = list(texts[start : start + _ENCODE_CHUNK])
        ids.extend(encoding.ids for encoding in backend.encode_batch(chunk, add_special_tokens=False))
    return ids


def chat_example(problem: Problem, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation for ``problem`` and its loss mask (1 = predict this token).

    The prompt is R1's chat template with the generation prompt (``...<｜Assistant｜><think>\\n``), mask 0;
    the completion is :func:`reasoning`, ``\\n</think>\\n\\n``, the answer and the EOS token, mask 1. Prompt
    and completion are encoded separately and concatenated, so no token spans the boundary: the ids are
    exactly the prompt a generation starts from followed by what it should generate.
    """
    eos_id = _require_eos(tokenizer)
    prompt, completion = _chat_texts(problem, tokenizer)
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion) + [eos_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def parse_answer(text: str) -> int | None:
    """The integer a completion answers: the first one after ``</think>``, or the last one if there is no tag.

    None when there is none (in particular after a ``</think>`` followed by no number). A ``-`` counts as a
    sign unless it follows a digit (``47-58`` has no ``-58``).
    """
    if THINK_CLOSE in text:
        match = _INTEGER.search(text.split(THINK_CLOSE, 1)[1])
        return int(match.group()) if match else None
    matches = _INTEGER.findall(text)
    return int(matches[-1]) if matches else None


# ---------------------------------------------------------------------------------------------------------
# Token streams and their mixture


class TokenStream:
    """One source of training tokens: 1-D ``tokens`` (int32) and a same-length loss ``mask`` (bool).

    ``mask[i]`` says whether token ``i`` counts as a prediction target. The stream is read cyclically: a
    window that runs past the end continues at the start.
    """

    def __init__(
        self,
        name: str,
        tokens: Sequence[int] | array | torch.Tensor,
        mask: Sequence[int] | array | torch.Tensor | None = None,
    ) -> None:
        """Copy ``tokens`` and ``mask`` (default: all tokens are targets)."""
        self.name = name
        self.tokens = _flat_copy(tokens, torch.int32)
        if len(self.tokens) == 0:
            raise ValueError(f"token stream {name!r} is empty")
        if mask is None:
            self.mask = torch.ones(len(self.tokens), dtype=torch.bool)
        else:
            self.mask = _flat_copy(mask, torch.bool)
            if len(self.mask) != len(self.tokens):
                raise ValueError(
                    f"token stream {name!r}: mask has {len(self.mask)} entries for {len(self.tokens)} tokens"
                )

    def __len__(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    def window(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask at positions ``start .. start + length - 1``, modulo the stream length."""
        positions = torch.arange(start, start + length) % len(self)
        return self.tokens[positions], self.mask[positions]


def text_stream(texts: Iterable[str], tokenizer: Tokenizer, name: str = "text") -> TokenStream:
    """Every text encoded and followed by the EOS token, all tokens targets."""
    eos_id = _require_eos(tokenizer)
    tokens = array("i")
    for ids in _encode_all(tokenizer, list(texts)):
        tokens.extend(ids)
        tokens.append(eos_id)
    return TokenStream(name, tokens)


def arithmetic_stream(
    tokenizer: Tokenizer,
    n_examples: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
    weights: Sequence[float] | None = None,
    split: str = "train",
    name: str = "arithmetic",
) -> TokenStream:
    """``n_examples`` :func:`chat_example` conversations back to back, mask 1 on the completions only.

    Each example's kind is drawn from ``kinds`` with ``weights`` (default: uniform), then a problem of the
    ``split`` with :func:`sample_problem`, all from ``random.Random(seed)``.
    """
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}")
    eos_id = _require_eos(tokenizer)
    rng = random.Random(seed)
    kind_list = list(kinds)
    chosen = rng.choices(kind_list, weights=weights, k=n_examples)
    texts = [_chat_texts(sample_problem(rng, kind, split), tokenizer) for kind in chosen]
    prompts = _encode_all(tokenizer, [prompt for prompt, _ in texts])
    completions = _encode_all(tokenizer, [completion for _, completion in texts])
    tokens, mask = array("i"), array("b")
    for prompt_ids, completion_ids in zip(prompts, completions, strict=True):
        tokens.extend(prompt_ids)
        tokens.extend(completion_ids)
        tokens.append(eos_id)
        mask.extend([0] * len(prompt_ids) + [1] * (len(completion_ids) + 1))
    return TokenStream(name, tokens, mask)


class Mixture:
    """Batches of ``seq_len``-token rows, each cut from a stream picked at random by weight.

    Each stream has a cursor, starting at 0. A row of stream ``s`` is the window of ``seq_len + 1`` tokens at
    the cursor, which then moves on by ``seq_len``: consecutive windows share one token, so every
    (token, next token) pair of the stream is a target exactly once per pass. At the end of a stream the
    window simply wraps around to its start (same document order every pass); an example cut by a window edge
    keeps its loss mask even though its beginning is in another row.

    Row sources come from a ``torch.Generator`` seeded with ``seed``; :meth:`state_dict` and
    :meth:`load_state_dict` save and restore it with the cursors, so a restored Mixture continues with exactly
    the batches the original would have produced. For a fixed validation set, save the state once and load it
    before every evaluation.
    """

    def __init__(
        self,
        streams: Sequence[TokenStream],
        weights: Mapping[str, float],
        seq_len: int,
        batch_size: int,
        seed: int,
    ) -> None:
        """``weights`` maps every stream's name to a non-negative weight (normalised; their sum must be > 0)."""
        names = [stream.name for stream in streams]
        if not streams or len(set(names)) != len(names):
            raise ValueError(f"streams must be non-empty with distinct names, got {names}")
        if set(weights) != set(names):
            raise ValueError(f"weights must have exactly the stream names {sorted(names)}, got {sorted(weights)}")
        if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {dict(weights)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        self.streams = list(streams)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._probabilities = torch.tensor([float(weights[name]) for name in names], dtype=torch.float64)
        self._generator = torch.Generator().manual_seed(seed)
        self._cursors = [0] * len(self.streams)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, mask)``: int64 inputs and targets (``y`` is ``x`` shifted by one), and float32 loss weights.

        All three are ``(batch_size, seq_len)``; ``mask[b, t]`` is 1.0 when target ``y[b, t]`` counts.
        """
        sources = torch.multinomial(self._probabilities, self.batch_size, replacement=True, generator=self._generator)
        windows, masks = [], []
        for index in sources.tolist():
            tokens, mask = self.streams[index].window(self._cursors[index], self.seq_len + 1)
            self._cursors[index] += self.seq_len
            windows.append(tokens)
            masks.append(mask)
        batch = torch.stack(windows).long()
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        return x, y, torch.stack(masks)[:, 1:].float()

    @property
    def rows_drawn(self) -> dict[str, int]:
        """Rows taken from each stream so far."""
        return {stream.name: cursor // self.seq_len for stream, cursor in zip(self.streams, self._cursors, strict=True)}

    @property
    def epochs(self) -> dict[str, float]:
        """Passes made over each stream so far (tokens consumed / stream length)."""
        return {stream.name: cursor / len(stream) for stream, cursor in zip(self.streams, self._cursors, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """The generator state and cursors, as plain ints and a uint8 tensor (``torch.load(weights_only=True)``)."""
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "generator": self._generator.get_state(),
            "cursors": {stream.name: cursor for stream, cursor in zip(self.streams, self._cursors, strict=True)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from a Mixture with the same streams, seq_len and batch_size)."""
        names = [stream.name for stream in self.streams]
        if (state["seq_len"], state["batch_size"]) != (self.seq_len, self.batch_size):
            raise ValueError(
                f"state is for seq_len={state['seq_len']}, batch_size={state['batch_size']}; this Mixture has "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}"
            )
        if sorted(state["cursors"]) != sorted(names):
            raise ValueError(f"state is for streams {sorted(state['cursors'])}, this Mixture has {sorted(names)}")
        self._generator.set_state(state["generator"].clone())
        self._cursors = [int(state["cursors"][name]) for name in names]


def build_nano_corpus(
    tokenizer: Tokenizer,
    seed: int = 0,
    seq_len: int = 256,
    batch_size: int = 32,
    arithmetic_examples: int = 50_000,
    weights: Mapping[str, float] | None = None,
    kinds: Sequence[str] = KINDS,
    kind_weights: Sequence[float] | None = None,
    val_arithmetic_examples: int | None = None,
    max_files: int | None = None,
    max_chars: int | None = None,
    tool_kinds: Mapping[str, float] | None = None,
    tool_examples: int = 20_000,
) -> tuple[Mixture, Mixture]:
    """Train and validation Mixtures of standard-library code ("stdlib") and arithmetic ("arithmetic").

    ``weights`` (default ``{"stdlib": 0.5, "arithmetic": 0.5}``) may name either source or both; a source
    with weight 0 is not built. Validation uses the held-out files of :func:`split_files` and held-out problems
    (``val_arithmetic_examples``, default a tenth of ``arithmetic_examples``). Each side's files are shuffled
    with ``seed``; on each side at most the first ``max_files`` are read, stopping once about ``max_chars``
    characters are in (see :func:`read_texts`). The train Mixture is seeded with ``seed``, the validation one
    with ``seed + 1``. A "tools" weight adds calculator-tool conversations (``tool_examples`` of ``tool_kinds``,
    r1kit.train.tool_data.tool_stream), validated on held-out problems the same way.
    """
    weights = {"stdlib": 0.5, "arithmetic": 0.5} if weights is None else dict(weights)
    unknown = set(weights) - {"stdlib", "arithmetic", "tools"}
    if unknown:
        raise ValueError(f"unknown corpus sources {sorted(unknown)}: expected 'stdlib', 'arithmetic' or 'tools'")
    weights = {name: weight for name, weight in weights.items() if weight > 0}
    if val_arithmetic_examples is None:
        val_arithmetic_examples = max(1, arithmetic_examples // 10)

    train_streams: list[TokenStream] = []
    val_streams: list[TokenStream] = []
    if "stdlib" in weights:
        rng = random.Random(seed)
        for files, streams in zip(split_files(stdlib_files()), (train_streams, val_streams), strict=True):
            rng.shuffle(files)
            streams.append(text_stream(read_texts(files[:max_files], max_chars), tokenizer, "stdlib"))
    if "arithmetic" in weights:
        train_streams.append(
            arithmetic_stream(tokenizer, arithmetic_examples, seed, kinds, kind_weights, "train", "arithmetic")
        )
        val_streams.append(
            arithmetic_stream(tokenizer, val_arithmetic_examples, seed + 1, kinds, kind_weights, "val", "arithmetic")
        )
    if "tools" in weights:
        from r1kit.train.tool_data import tool_stream

        train_streams.append(tool_stream(tokenizer, tool_examples, seed, tool_kinds or {}, "train"))
        val_streams.append(tool_stream(tokenizer, max(1, tool_examples // 10), seed + 1, tool_kinds or {}, "val"))
    train = Mixture(train_streams, weights, seq_len, batch_size, seed)
    val = Mixture(val_streams, weights, seq_len, batch_size, seed + 1)
    return train, val


# ---------------------------------------------------------------------------------------------------- recipes


def prepare_tokenizer(cfg: Any, folder: Path) -> Tokenizer:
    """The recipe's tokenizer: loaded from `folder` if a run already trained it, else trained and saved there.

    Byte-level BPE with every digit its own token, trained on the training side only: standard-library
    files (up to data.tokenizer_chars characters) and the text of 2,000 training arithmetic conversations.
    """
    import json

    from r1kit.tokenizer import train_bpe_tokenizer

    d = cfg.data
    recipe = {"vocab": d.tokenizer_vocab, "chars": d.tokenizer_chars, "seed": cfg.seed, "max_files": d.max_files,
              "kinds": sorted(d.arithmetic_kinds), "python": sysconfig.get_python_version()}
    stamp = folder / "recipe.json"
    if cfg.init_from:  # a later stage keeps the tokenizer of the model it starts from
        recipe = {"init_from": str(cfg.init_from)}
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return Tokenizer.from_dir(folder)
    if cfg.init_from:
        tokenizer = Tokenizer.from_dir(cfg.init_from)
        _save_tokenizer(tokenizer, folder, recipe)
        return tokenizer
    train_files, _ = split_files(stdlib_files())
    random.Random(cfg.seed).shuffle(train_files)
    texts = read_texts(train_files[:cfg.data.max_files], cfg.data.tokenizer_chars)
    rng = random.Random(cfg.seed)
    kinds = list(cfg.data.arithmetic_kinds)
    for _ in range(2000):
        problem = sample_problem(rng, rng.choice(kinds), split="train")
        texts.append(f"{problem.question} {reasoning(problem)} {problem.answer}")
    tokenizer = train_bpe_tokenizer(texts, cfg.data.tokenizer_vocab, split_digits=True)
    _save_tokenizer(tokenizer, folder, recipe)
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, folder: Path, recipe: dict[str, Any]) -> None:
    """Write the tokenizer and its recipe stamp as a complete folder or not at all (written, then renamed)."""
    import json

    with atomic_folder(folder) as tmp:
        tokenizer.save(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe))


def build_corpus(cfg: Any, tokenizer: Tokenizer) -> tuple[Any, Any]:
    """Train and validation batches for a TrainConfig: Mixtures (see build_nano_corpus), or with data.chat_jsonl
    the user's chat data packed by r1kit.train.chat_data.build_chat_batches."""
    if cfg.data.chat_jsonl:
        from r1kit.train.chat_data import build_chat_batches

        return build_chat_batches(cfg, tokenizer)
    d = cfg.data
    return build_nano_corpus(tokenizer, seed=cfg.seed, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                             arithmetic_examples=d.arithmetic_examples, weights=d.mixture,
                             kinds=list(d.arithmetic_kinds), kind_weights=list(d.arithmetic_kinds.values()),
                             max_files=d.max_files, max_chars=d.max_chars, tool_kinds=d.tool_kinds,
                             tool_examples=d.tool_examples)
