"""Tests for r1kit.train.data (and the split_digits option of the tokenizer): no network, a few seconds."""

from __future__ import annotations

import io
import math
import random
import re
from pathlib import Path

import pytest
import torch

from r1kit.tokenizer import DEEPSEEK_EOS, THINK_CLOSE, Tokenizer, train_bpe_tokenizer
from r1kit.train.data import (
    HELDOUT_FRACTION,
    KINDS,
    Mixture,
    Problem,
    TokenStream,
    arithmetic_stream,
    build_nano_corpus,
    chat_example,
    is_heldout,
    parse_answer,
    read_texts,
    reasoning,
    sample_problem,
    split_files,
    stdlib_files,
    stdlib_root,
    text_stream,
)

CORPUS = [
    "What is 47+38? 7+8=15, write 5 carry 1, so far 5.\n4+3+1=8, write 8, so far 85.\nSo 47+38=85.",
    "12345 + 678 = 13023; 99 * 99 = 9801; 1000 - 1 = 999; 2024, 2025, 2026 and 12345 again.",
    "def add(x, y):\n    return x + y\n\nprint(add(12, 345))\n",
    "The quick brown fox jumps over the lazy dog. Think step by step, then check the answer.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_tokenizer(CORPUS * 3, 300, split_digits=True)


# ---------------------------------------------------------------------------------------------------------
# tokenizer: split_digits


def test_split_digits_makes_every_digit_a_token(tok: Tokenizer, tmp_path: Path) -> None:
    text = "12345+678"
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids] == list(text)
    assert tok.decode(ids) == text
    mixed = "x = 2024 * 99  # année 12345\n"
    assert tok.decode(tok.encode(mixed)) == mixed
    assert all(len(piece) == 1 for piece in (tok.decode([i]) for i in tok.encode(mixed)) if piece.isdigit())
    tok.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.encode(text) == ids and reloaded.encode(mixed) == tok.encode(mixed)
    # Without the option the same corpus merges digits, so the test above is not vacuous.
    plain = train_bpe_tokenizer(CORPUS * 3, 300)
    assert any(len(plain.decode([i])) > 1 for i in plain.encode(text))


# ---------------------------------------------------------------------------------------------------------
# arithmetic traces

_EQUATION = re.compile(r"[\d+\-*]+(?:=[\d+\-*]+)+")
_COLUMN = re.compile(
    r"^(\d)([+-])(\d)([+-]1)?(?:=\d+| is negative, so borrow: 1\d[+-]\d(?:[+-]1)?=\d+), "
    r"write (\d)( carry 1| borrow 1)?, so far (\d+)\.$"
)
_SO_LINE = re.compile(r"^So (\d+)([+\-*])(\d+)=(-?\d+)\.$")


def _evaluate(expression: str) -> int:
    """Value of digits joined by + - * (with * binding tighter), possibly with a leading minus."""
    total = 0
    for sign, term in re.findall(r"([+-]?)([\d*]+)", expression):
        value = math.prod(int(factor) for factor in term.split("*"))
        total += -value if sign == "-" else value
    return total


def _check_trace(problem: Problem, trace: str) -> None:
    lines = trace.split("\n")
    assert lines[-1] == f"So {problem.expression}={problem.answer}."
    assert THINK_CLOSE not in trace and "<think>" not in trace
    # Every equation chain (47*8=40*8+7*8=320+56=376, 17-8=9, 47-58=-11, ...) is arithmetically right.
    equations = _EQUATION.findall(trace)
    assert equations
    for chain in equations:
        values = {_evaluate(part) for part in chain.split("=")}
        assert len(values) == 1, (chain, trace)
    # Column steps: carries/borrows flow from line to line, "so far" grows by the written digit, and the
    # "So A op B=V." line closing a block uses exactly the digits the columns read.
    block: list[tuple[str, str]] = []
    carry = 0
    written = ""
    for line in lines:
        column = _COLUMN.match(line)
        if column:
            x, op, y, carry_in, digit, carry_out, so_far = column.groups()
            assert bool(carry_in) == bool(carry), (line, trace)
            value = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
            assert int(digit) == value % 10, line
            carry = int(value >= 10 if op == "+" else value < 0)
            assert bool(carry_out) == bool(carry), line
            assert so_far == digit + written, (line, trace)
            written = so_far
            block.append((x, y))
            continue
        if block:
            closing = _SO_LINE.match(line)
            assert closing and carry == 0, (line, trace)
            a, _, b, value = closing.groups()
            assert int(value) == int(written)
            assert "".join(x for x, _ in reversed(block)) == a.zfill(len(block))
            assert "".join(y for _, y in reversed(block)) == b.zfill(len(block))
        block, carry, written = [], 0, ""
    assert not block


@pytest.mark.parametrize("kind", KINDS)
def test_traces_are_correct_for_random_problems(kind: str) -> None:
    rng = random.Random(f"traces-{kind}")
    for _ in range(300):
        problem = sample_problem(rng, kind, split=None)
        _check_trace(problem, reasoning(problem))


@pytest.mark.parametrize(
    "problem",
    [Problem(99, "+", 99), Problem(0, "+", 0), Problem(100, "-", 1), Problem(47, "-", 58), Problem(5, "-", 5),
     Problem(0, "-", 999), Problem(40, "*", 30), Problem(99, "*", 99), Problem(10, "*", 0), Problem(7, "*", 8),
     Problem(123, "*", 45)],
)  # fmt: skip
def test_traces_edge_cases(problem: Problem) -> None:
    _check_trace(problem, reasoning(problem))


def test_trace_format_example() -> None:
    assert reasoning(Problem(47, "+", 38)) == (
        "7+8=15, write 5 carry 1, so far 5.\n4+3+1=8, write 8, so far 85.\nSo 47+38=85."
    )
    negative = reasoning(Problem(47, "-", 58)).split("\n")
    assert negative[0] == "47 is less than 58, so compute 58-47 and negate."
    assert negative[-2:] == ["So 58-47=11.", "So 47-58=-11."]


def test_problem_properties_and_validation() -> None:
    problem = Problem(47, "+", 38)
    assert (problem.question, problem.answer) == ("What is 47+38?", 85)
    assert Problem(3, "-", 10).answer == -7 and Problem(12, "*", 11).answer == 132
    with pytest.raises(ValueError, match="op"):
        Problem(1, "/", 2)
    with pytest.raises(ValueError, match="non-negative"):
        Problem(-1, "+", 2)


def test_sample_problem_operand_ranges_and_errors() -> None:
    rng = random.Random(0)
    limits = {"add2": (99, 99), "sub2": (99, 99), "add3": (999, 999), "sub3": (999, 999), "mul2x1": (99, 9)}
    for kind, (max_a, max_b) in limits.items():
        problems = [sample_problem(rng, kind, split=None) for _ in range(500)]
        assert max(p.a for p in problems) <= max_a and max(p.b for p in problems) <= max_b
    assert min(p.a for p in (sample_problem(rng, "add2", None) for _ in range(500))) < 10  # small ones appear
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in (sample_problem(rng, "mul2x2") for _ in range(200)))
    with pytest.raises(ValueError, match="kind"):
        sample_problem(rng, "div2")
    with pytest.raises(ValueError, match="split"):
        sample_problem(rng, "add2", split="test")


def test_heldout_split_is_disjoint_and_about_ten_percent() -> None:
    every_add2 = [Problem(a, "+", b) for a in range(100) for b in range(100)]
    fraction = sum(map(is_heldout, every_add2)) / len(every_add2)
    assert abs(fraction - HELDOUT_FRACTION) < 0.02
    every_sub3_sample = [Problem(a, "-", b) for a in range(0, 1000, 7) for b in range(0, 1000, 7)]
    assert abs(sum(map(is_heldout, every_sub3_sample)) / len(every_sub3_sample) - HELDOUT_FRACTION) < 0.02
    # Commutative operations hold out both orders together.
    assert all(is_heldout(Problem(p.b, "+", p.a)) == is_heldout(p) for p in every_add2)
    rng = random.Random(1)
    for kind in KINDS:
        train = {sample_problem(rng, kind, "train") for _ in range(300)}
        val = {sample_problem(rng, kind, "val") for _ in range(100)}
        assert not any(map(is_heldout, train)) and all(map(is_heldout, val))
        assert not train & val


def test_generation_is_deterministic_by_seed(tok: Tokenizer) -> None:
    def problems(seed: int) -> list[Problem]:
        rng = random.Random(seed)
        return [sample_problem(rng, kind) for kind in KINDS * 5]

    assert problems(3) == problems(3) and problems(3) != problems(4)
    first, second = arithmetic_stream(tok, 8, seed=5), arithmetic_stream(tok, 8, seed=5)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.mask, second.mask)
    assert not torch.equal(first.tokens[:200], arithmetic_stream(tok, 8, seed=6).tokens[:200])


# ---------------------------------------------------------------------------------------------------------
# chat examples and answers


def test_chat_example_mask_covers_exactly_the_completion(tok: Tokenizer) -> None:
    problem = Problem(47, "-", 58)
    ids, mask = chat_example(problem, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    start = mask.index(1)
    assert mask == [0] * start + [1] * (len(ids) - start)  # one prompt, then one completion
    prompt = tok.apply_chat_template([{"role": "user", "content": problem.question}])
    assert prompt.endswith("<think>\n")
    assert tok.decode(ids[:start]) == prompt
    assert tok.decode(ids[start:]) == f"{reasoning(problem)}\n{THINK_CLOSE}\n\n-11{DEEPSEEK_EOS}"
    assert ids[-1] == tok.eos_id and ids.count(tok.eos_id) == 1
    assert parse_answer(tok.decode(ids[start:], skip_special_tokens=True)) == -11


def test_arithmetic_stream_is_chat_examples_back_to_back(tok: Tokenizer) -> None:
    seed, weights = 11, [1, 0, 0, 0, 2, 1]
    stream = arithmetic_stream(tok, 6, seed, KINDS, weights, split="val")
    rng = random.Random(seed)
    kinds = rng.choices(KINDS, weights=weights, k=6)
    ids: list[int] = []
    mask: list[int] = []
    for kind in kinds:
        problem = sample_problem(rng, kind, "val")
        assert problem.op != "-"
        example_ids, example_mask = chat_example(problem, tok)
        ids += example_ids
        mask += example_mask
    assert stream.tokens.tolist() == ids
    assert stream.mask.tolist() == [bool(m) for m in mask]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7+8=15...\nSo 47+38=85.\n</think>\n\n85", 85),
        ("So 47-58=-11.\n</think>\n\n-11", -11),
        ("</think>\n\nThe answer is 1786.", 1786),
        ("</think> 12 and then 13", 12),
        ("thinking about 3 and 4</think>\n\nno idea", None),
        ("no tag, so the last number: 47-58", 58),
        ("So 47-58=-11.", -11),
        ("nothing here", None),
        ("", None),
    ],
)
def test_parse_answer(text: str, expected: int | None) -> None:
    assert parse_answer(text) == expected


# ---------------------------------------------------------------------------------------------------------
# token streams and mixtures


def _mixture(seed: int = 0, batch_size: int = 4, seq_len: int = 8) -> Mixture:
    ramp = TokenStream("ramp", torch.arange(100), mask=torch.arange(100) % 3 == 0)
    high = TokenStream("high", torch.arange(1000, 1050))
    return Mixture([ramp, high], {"ramp": 3.0, "high": 1.0}, seq_len, batch_size, seed)


def test_token_stream_validation_and_wrapping() -> None:
    stream = TokenStream("s", [5, 6, 7])
    assert stream.mask.tolist() == [True] * 3 and len(stream) == 3
    tokens, mask = stream.window(2, 5)
    assert tokens.tolist() == [7, 5, 6, 7, 5] and mask.all()
    with pytest.raises(ValueError, match="empty"):
        TokenStream("s", [])
    with pytest.raises(ValueError, match="mask"):
        TokenStream("s", [1, 2], [1])


def test_mixture_batches_are_shifted_windows_of_one_source() -> None:
    mixture = _mixture()
    starts = {"ramp": [], "high": []}
    for _ in range(10):
        x, y, mask = mixture.next_batch()
        assert x.shape == y.shape == mask.shape == (4, 8)
        assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.float32
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y, row_mask in zip(x, y, mask, strict=True):
            window = torch.cat([row_x[:1], row_y]).tolist()
            name, base, length = ("high", 1000, 50) if window[0] >= 1000 else ("ramp", 0, 100)
            assert window == [base + (window[0] - base + i) % length for i in range(9)]
            starts[name].append(window[0] - base)
            expected_mask = [(t % 3 == 0) if name == "ramp" else True for t in row_y.tolist()]
            assert row_mask.tolist() == [float(m) for m in expected_mask]
    # Each source's cursor moves by seq_len per row (consecutive windows share one token) and wraps around.
    for name, length in (("ramp", 100), ("high", 50)):
        assert starts[name] == [8 * i % length for i in range(len(starts[name]))]
    assert mixture.rows_drawn == {name: len(rows) for name, rows in starts.items()}
    assert mixture.epochs["ramp"] == pytest.approx(8 * len(starts["ramp"]) / 100)


def test_mixture_is_deterministic_and_resumes_exactly() -> None:
    reference = _mixture(seed=7)
    expected = [reference.next_batch() for _ in range(8)]
    again = _mixture(seed=7)
    for batch, other in zip(expected, (again.next_batch() for _ in range(8)), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch, other, strict=True))
    assert not torch.equal(_mixture(seed=8).next_batch()[0], expected[0][0])

    interrupted = _mixture(seed=7)
    for _ in range(3):
        interrupted.next_batch()
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = _mixture(seed=123)  # the seed is overridden by the saved generator state
    resumed.load_state_dict(state)
    for batch, other in zip(expected[3:], (resumed.next_batch() for _ in range(5)), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch, other, strict=True))
    # The saved state is a snapshot: the interrupted Mixture goes on identically.
    assert torch.equal(interrupted.next_batch()[0], expected[3][0])
    with pytest.raises(ValueError, match="seq_len"):
        _mixture(seq_len=16).load_state_dict(state)


def test_mixture_respects_weights() -> None:
    mixture = _mixture(seed=1, batch_size=100, seq_len=2)
    for _ in range(40):
        mixture.next_batch()
    rows = mixture.rows_drawn
    assert sum(rows.values()) == 4000
    assert abs(rows["ramp"] / 4000 - 0.75) < 0.03


def test_mixture_argument_errors() -> None:
    stream = TokenStream("a", [1, 2, 3])
    with pytest.raises(ValueError, match="weights must have"):
        Mixture([stream], {"b": 1.0}, 2, 1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        Mixture([stream], {"a": 0.0}, 2, 1, 0)
    with pytest.raises(ValueError, match="distinct"):
        Mixture([stream, stream], {"a": 1.0}, 2, 1, 0)


def test_text_stream_ends_every_document_with_eos(tok: Tokenizer) -> None:
    stream = text_stream(["def f():\n    pass\n", "x = 12"], tok, "code")
    assert stream.name == "code" and bool(stream.mask.all())
    ids = stream.tokens.tolist()
    assert ids == tok.encode("def f():\n    pass\n") + [tok.eos_id] + tok.encode("x = 12") + [tok.eos_id]


# ---------------------------------------------------------------------------------------------------------
# standard-library corpus


def test_stdlib_files_and_split() -> None:
    files = stdlib_files()
    root = stdlib_root()
    assert len(files) > 100 and files == sorted(files)
    assert root / "os.py" in files
    assert all(p.suffix == ".py" and p.is_relative_to(root) for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.relative_to(root).parts) for p in files)

    train, val = split_files(files)
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.02 < len(val) / len(files) < 0.09
    assert split_files(list(reversed(files))) == (train, val)  # independent of input order
    subset = set(files[::3])
    assert split_files(files[::3]) == ([p for p in train if p in subset], [p for p in val if p in subset])
    assert split_files(files, val_fraction=0.0) == (files, [])


def test_read_texts_caps_characters() -> None:
    files = stdlib_files()[:40]
    texts = read_texts(files, max_chars=10_000)
    assert texts and sum(map(len, texts[:-1])) < 10_000 <= sum(map(len, texts))
    assert texts[0] == files[0].read_text(encoding="utf-8")


def test_build_nano_corpus_small(tok: Tokenizer) -> None:
    def build() -> tuple[Mixture, Mixture]:
        return build_nano_corpus(
            tok, seed=2, seq_len=32, batch_size=4, arithmetic_examples=20, weights={"stdlib": 1, "arithmetic": 1},
            kinds=("add2", "mul2x1"), max_files=6, max_chars=20_000,
        )  # fmt: skip

    train, val = build()
    for mixture in (train, val):
        assert {s.name for s in mixture.streams} == {"stdlib", "arithmetic"}
        x, y, mask = mixture.next_batch()
        assert x.shape == (4, 32) and int(x.max()) < tok.vocab_size and torch.equal(x[:, 1:], y[:, :-1])
    assert len(val.streams[1]) < len(train.streams[1])  # a tenth of the examples by default
    train_again, _ = build()
    x, _, mask = train.next_batch()
    train_again.next_batch()
    x2, _, mask2 = train_again.next_batch()
    assert torch.equal(x, x2) and torch.equal(mask, mask2)
    only_arithmetic, _ = build_nano_corpus(tok, 0, 16, 2, arithmetic_examples=5, weights={"arithmetic": 1})
    assert [s.name for s in only_arithmetic.streams] == ["arithmetic"]
    with pytest.raises(ValueError, match="unknown corpus"):
        build_nano_corpus(tok, weights={"wiki": 1.0})
