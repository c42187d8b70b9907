"""Tests for r1kit.tokenizer: a tiny BPE tokenizer trained on inline text, no network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from r1kit.tokenizer import (
    ASSISTANT_TAG,
    DEEPSEEK_BOS,
    DEEPSEEK_EOS,
    DEEPSEEK_PAD,
    DEEPSEEK_SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    USER_TAG,
    ReasoningStreamParser,
    Tokenizer,
    TokenizerError,
    split_reasoning,
    train_bpe_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones "
    "before it, and a tokenizer turns text into those tokens.",
    "To solve a problem, first think about it step by step. Then check the answer, and only then write it "
    "down. What is two plus two? Two plus two is four.",
    "def add(x, y):\n    return x + y\n\nprint(add(2, 3))\n",
    "你好，世界！今天天气很好。我们一起学习语言模型。",
    "Party time 🎉🎉 with cake 🎂 and more 🎉.",
]
VOCAB_SIZE = 400

# Multi-byte characters absent from CORPUS are split into one token per UTF-8 byte.
RARE_TEXT = "crab 🦀 clef 𝄞 fish 鱻 and 🎉 again"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_tokenizer(CORPUS * 3, VOCAB_SIZE)


@pytest.fixture(scope="module")
def saved_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save(path)
    return path


def test_trained_tokenizer_has_deepseek_special_tokens(tok: Tokenizer) -> None:
    assert 300 < tok.vocab_size <= VOCAB_SIZE
    for expected_id, token in enumerate(DEEPSEEK_SPECIAL_TOKENS):
        assert tok.token_to_id(token) == expected_id
        assert tok.encode(token) == [expected_id]
    assert (tok.bos_token, tok.eos_token) == (DEEPSEEK_BOS, DEEPSEEK_EOS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, DEEPSEEK_SPECIAL_TOKENS.index(DEEPSEEK_PAD))
    assert tok.stop_ids == [tok.eos_id]
    assert tok.token_to_id("not a token") is None


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading and trailing spaces, tabs\tand\nnewlines  ",
        "你好，世界！",
        RARE_TEXT,
        "mixed 中文 text with emoji 🎉 and digits 12345",
    ],
)
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_id, *ids]


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    text = f"{DEEPSEEK_BOS}{USER_TAG}hi{ASSISTANT_TAG}{THINK_OPEN}\nhmm{THINK_CLOSE}ok{DEEPSEEK_EOS}"
    ids = tok.encode(text)
    for token in (DEEPSEEK_BOS, USER_TAG, ASSISTANT_TAG, THINK_OPEN, THINK_CLOSE, DEEPSEEK_EOS):
        assert ids.count(tok.token_to_id(token)) == 1
    assert tok.decode(ids) == text
    # <think> tags are not special tokens, so skipping specials keeps them.
    assert tok.decode(ids, skip_special_tokens=True) == f"hi{THINK_OPEN}\nhmm{THINK_CLOSE}ok"


def test_save_from_dir_round_trip(tok: Tokenizer, saved_dir: Path) -> None:
    loaded = Tokenizer.from_dir(saved_dir)
    for text in ["The quick brown fox.", RARE_TEXT, f"{USER_TAG}你好{THINK_OPEN}x{THINK_CLOSE}"]:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.stop_ids == tok.stop_ids
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == DEEPSEEK_BOS
    assert "chat_template" in config


def test_from_dir_reads_hf_config_fields(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    config = {
        "bos_token": {"__type": "AddedToken", "content": DEEPSEEK_BOS, "special": True},
        "eos_token": DEEPSEEK_EOS,
        "pad_token": None,
        "add_bos_token": True,
        "model_max_length": 4096,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_id) == (DEEPSEEK_BOS, DEEPSEEK_EOS, None)
    assert loaded.add_bos_token is True
    out = tmp_path / "saved"
    loaded.save(out)
    assert json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["model_max_length"] == 4096


def test_from_dir_without_config(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    loaded = Tokenizer.from_dir(tmp_path)
    assert (loaded.bos_token, loaded.eos_id, loaded.pad_id) == (None, None, None)
    # The end-of-sentence token still stops generation when the vocabulary has it.
    assert loaded.stop_ids == [loaded.token_to_id(DEEPSEEK_EOS)]
    with pytest.raises(TokenizerError, match="no bos_token"):
        loaded.encode("hi", add_bos=True)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(TokenizerError, match="needs tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    assert "tokenizer.model" in str(info.value)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("config_text", "match"),
    [
        ("{not json", "tokenizer_config.json: not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"bos_token": "<nope>"}', "tokenizer_config.json: bos_token '<nope>' is not in the tokenizer"),
        ('{"eos_token": 3}', "tokenizer_config.json: field 'eos_token' must be"),
        ('{"add_bos_token": "yes"}', "field 'add_bos_token' must be true or false"),
    ],
)
def test_bad_tokenizer_config(saved_dir: Path, tmp_path: Path, config_text: str, match: str) -> None:
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(tmp_path)


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_stream_decoder_multibyte(tok: Tokenizer) -> None:
    ids = tok.encode(RARE_TEXT)
    # The test is only meaningful if some characters span several tokens.
    assert any(tok.decode([token_id]).endswith("\ufffd") for token_id in ids)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == RARE_TEXT
    assert "" in pieces[:-1]  # held back while a character was incomplete
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": RARE_TEXT}]) + tok.encode(f"ok 🦀{THINK_CLOSE}done")
    ids.append(tok.eos_id)
    for skip in (False, True):
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_invalid_utf8(tok: Tokenizer) -> None:
    crab = tok.encode("🦀")
    assert len(crab) >= 2
    broken = crab[:-1]
    ids = broken + tok.encode("a") + broken  # a broken character mid-stream and one at the end
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_chat_template_exact_string(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    prefix = (
        "<｜begin▁of▁sentence｜>You are helpful."
        "<｜User｜>What is 2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?"
    )
    assert tok.apply_chat_template(messages) == prefix + "<｜Assistant｜><think>\n"
    # no-think as DeepSeek does it: an empty, closed think block
    assert tok.apply_chat_template(messages, thinking=False) == prefix + "<｜Assistant｜><think>\n\n</think>\n\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == prefix


def test_chat_template_joins_system_prompts(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "A."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "B."},
    ]
    expected = f"{DEEPSEEK_BOS}A.\n\nB.{USER_TAG}hi{ASSISTANT_TAG}{THINK_OPEN}\n"
    assert tok.apply_chat_template(messages) == expected


def test_encode_chat(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "你好 🦀"}]
    ids = tok.encode_chat(messages)
    assert ids == tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[-3:-1] == [tok.token_to_id(ASSISTANT_TAG), tok.token_to_id(THINK_OPEN)]
    assert tok.decode(ids[-1:]) == "\n"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\]\['role'\].*got None"),
        ([{"role": "tool", "content": "a"}], r"messages\[0\]\['role'\] must be one of system, user, assis"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\]\['content'\] must be a str, got list"),
    ],
)
def test_bad_messages(tok: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nabc\n</think>\n\nxyz", ("abc", "xyz")),
        ("abc</think>xyz", ("abc", "xyz")),
        ("  plain answer \n", ("", "plain answer")),
        ("<think>\ntruncated reasoning", ("truncated reasoning", "")),
        ("<think>\n</think>\n\nonly answer", ("", "only answer")),
        ("a</think>b</think>c", ("a", "bc")),  # a stray </think> in the answer is dropped
        ("\n <think>x</think>", ("x", "")),
        ("say <think> later", ("later", "say")),  # text after a <think> is reasoning wherever the tag is
        ("<think>a<think>b</think>c", ("ab", "c")),  # a repeated <think> is dropped
        ("x</think>y<think>z</think>w", ("xz", "yw")),  # a second think block is reasoning too
        ("</think>", ("", "")),
        ("<think>", ("", "")),
        ("", ("", "")),
    ],
)
def test_split_reasoning(text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(text) == expected
    reasoning, answer = split_reasoning(text)
    assert THINK_OPEN not in answer and THINK_CLOSE not in answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc", ("abc", "")),  # truncated reasoning
        ("abc</think>\n\nxyz", ("abc", "xyz")),
        ("<think>abc</think>xyz", ("abc", "xyz")),
        ("a</think>b<think>c", ("ac", "b")),
    ],
)
def test_split_reasoning_starts_in_reasoning(text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(text, starts_in_reasoning=True) == expected


STREAM_TEXTS = [
    "<think>\nabc\n</think>\n\nxyz",
    "abc</think>xyz",
    "  step one \n\n step two \n</think>\n answer  with  inner  space \n",
    "no tags at all, just an answer",
    "<think>\ntruncated reasoning ",
    "<think>\n</think>\n\nonly answer",
    "a</think>b</think>c",
    "x </thin y</think> z <think> w",
    "</</think>>",
    "<<think>>",
    "<thin",
    " <think> <think>twice</think>",
    "思考 🤔 中</think>答案 🎉",
    "   ",
    "",
    "</think>",
    "<think>",
    "<think></think>",
    "</think>answer",
    "reasoning</think>",
    "x</think>y<think>z</think>w",
    "a</think>b</think>c</think>",
    "</think></think><think><think>",
    "answer <think",
    "answer </think",
    "\n\n</think>\n\n  spaced  answer  \n\n",
]


def _parse(pieces: list[str], starts_in_reasoning: bool) -> tuple[str, str]:
    parser = ReasoningStreamParser(starts_in_reasoning=starts_in_reasoning)
    deltas = [parser.push(piece) for piece in pieces] + [parser.flush()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas)


def _expected(text: str, starts_in_reasoning: bool) -> tuple[str, str]:
    """The documented relation between ReasoningStreamParser and split_reasoning."""
    return split_reasoning(text, starts_in_reasoning=starts_in_reasoning)


def _random_split(text: str, rng: random.Random) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(8, len(text) - 1))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("starts_in_reasoning", [True, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_reasoning_stream_parser_matches_split_reasoning(text: str, starts_in_reasoning: bool) -> None:
    expected = _expected(text, starts_in_reasoning)
    assert not any(tag in part for tag in (THINK_OPEN, THINK_CLOSE) for part in expected)
    assert _parse([text], starts_in_reasoning) == expected
    assert _parse(list(text), starts_in_reasoning) == expected
    for i in range(len(text) + 1):
        assert _parse([text[:i], text[i:]], starts_in_reasoning) == expected, f"split at {i}"
    rng = random.Random(0)
    for _ in range(20):
        pieces = _random_split(text, rng)
        assert _parse(pieces, starts_in_reasoning) == expected, pieces


def test_reasoning_stream_parser_holds_back_partial_tags() -> None:
    parser = ReasoningStreamParser()
    assert parser.push("abc</thi") == ("abc", "")
    assert parser.push("nk>") == ("", "")
    assert parser.push("\n\nxyz \n") == ("", "xyz")
    assert parser.push("more") == ("", " \nmore")
    assert parser.flush() == ("", "")


def test_reasoning_stream_parser_tagless_text() -> None:
    # With R1's template the prompt opened <think>, so untagged output is (possibly truncated) reasoning.
    assert _parse(["abc"], starts_in_reasoning=True) == ("abc", "")
    # Without it (no-think), untagged output is the answer, but text before a late </think> is reasoning.
    assert _parse(["abc"], starts_in_reasoning=False) == ("", "abc")
    assert _parse(["abc</think>xyz"], starts_in_reasoning=False) == ("abc", "xyz")
    assert _parse(["<think>a</think>b"], starts_in_reasoning=False) == ("a", "b")


def test_reasoning_stream_parser_no_think_holds_until_decided() -> None:
    """No-think: nothing is released as content while a </think> may still turn it into reasoning."""
    parser = ReasoningStreamParser(starts_in_reasoning=False)
    assert parser.push("7+8=15, so") == ("", "")
    assert parser.push(" 85.\n</th") == ("", "")
    assert parser.push("ink>\n\n85") == ("7+8=15, so 85.", "85")
    assert parser.push(" done") == ("", " done")
    assert parser.flush() == ("", "")
    parser = ReasoningStreamParser(starts_in_reasoning=False)
    assert parser.push("plain answer") == ("", "")
    assert parser.flush() == ("", "plain answer")


def test_train_bpe_tokenizer_custom_special_tokens() -> None:
    custom = train_bpe_tokenizer(CORPUS, 300, special_tokens=["<|endoftext|>"])
    assert custom.encode("<|endoftext|>") == [0]
    assert (custom.bos_token, custom.eos_token, custom.pad_token) == (None, None, None)
    assert custom.stop_ids == [0]
    assert custom.decode(custom.encode(RARE_TEXT)) == RARE_TEXT


@pytest.mark.parametrize(
    ("vocab_size", "special_tokens", "match"),
    [
        (100, None, "vocab_size must be at least 263"),
        (300, ["<a>", "<a>"], "special_tokens has duplicates"),
    ],
)
def test_train_bpe_tokenizer_bad_arguments(
    vocab_size: int, special_tokens: list[str] | None, match: str
) -> None:
    with pytest.raises(TokenizerError, match=match):
        train_bpe_tokenizer(CORPUS, vocab_size, special_tokens)


def test_parity_with_transformers(tok: Tokenizer, saved_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved_dir / "tokenizer.json"))
    texts = [
        "The quick brown fox.",
        RARE_TEXT,
        "  spaces\tand\nnewlines ",
        f"{DEEPSEEK_BOS}{USER_TAG}你好{ASSISTANT_TAG}{THINK_OPEN}\nx{THINK_CLOSE}y{DEEPSEEK_EOS}",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast.decode(ids) == tok.decode(ids)

    # The Jinja chat_template written by train_bpe_tokenizer renders what apply_chat_template does.
    auto = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello"},
        {"role": "user", "content": "2+2?"},
    ]
    for thinking in (True, False):
        rendered = auto.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, thinking=thinking
        )
        assert rendered == tok.apply_chat_template(messages, thinking=thinking)


def test_text_stream_stop_strings_hold_back_and_stop_ids():
    """TextStream (shared by R1Model and the serving engine): a stop string spanning tokens is cut out, text that
    may start one is held back, a stop id ends the text without its own, last=True releases everything."""
    from r1kit.tokenizer import TextStream

    s = TextStream(None, stop=["<3><4>"], stop_ids={9})  # no tokenizer: token t reads "<t>"
    out = [s.push(t) for t in (1, 2, 3)]
    assert "".join(t for t, _ in out) + s.pending == "<1><2><3>" and not any(e for _, e in out)
    assert len(s.pending) == len("<3><4>") - 1  # held back: "<3><4" may still come
    text, ended = s.push(4)
    assert ended and "".join(t for t, _ in out) + text == "<1><2>"  # the stop string is cut out
    s = TextStream(None, stop_ids={9})
    assert s.push(5) == ("<5>", False) and s.push(9) == ("", True)  # the stop id's own text is not output
    s = TextStream(None, stop=["zz"])
    assert s.push(7, last=True) == ("<7>", False) and s.flush() == ""  # the budget ends: nothing held back
