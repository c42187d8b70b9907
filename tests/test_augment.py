"""Data augmentation: EDA's four operations at their rates (seeded), what they must never touch, the user side only,
WordNet read offline (skipped without Debian's wordnet-base unless R1KIT_REQUIRE_WORDNET=1), back-translation
with scripted translators (a function, an OpenAI-compatible HTTP server), `r1kit augment`, and the augment:
section applied to the training side of a chat recipe."""

from __future__ import annotations

import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from r1kit.train.augment import (
    EDA_OPS,
    WORDNET_DIR,
    Augmenter,
    AugmentError,
    BackTranslator,
    Synonyms,
    eda,
    load_wordnet,
    model_completer,
    protected_spans,
    split_pieces,
    wei_zou_n_aug,
)
from r1kit.train.config import AugmentSection, TrainConfig, TrainConfigError

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"
TEXT = ("Please compute the total of 47 and 3.5 using `sum(xs)` then explain briefly why the <｜User｜> marker "
        "and <think> stay, also x+1 and the 21st value:\n```python\nprint(big house)\n```\nthanks a lot friend")


def fake_synonyms(word: str) -> list[str]:
    """A stand-in for WordNet: every word has two synonyms."""
    return [f"{word.lower()}ish", f"very {word.lower()}"]


@pytest.fixture(scope="module")
def wordnet_synonyms() -> Synonyms:
    if not (WORDNET_DIR / "data.noun").is_file():
        why = f"needs WordNet in {WORDNET_DIR} (scripts/install_wordnet.sh installs Debian's wordnet-base)"
        if os.environ.get("R1KIT_REQUIRE_WORDNET") == "1":  # CI installs it: a skip would hide a gap
            pytest.fail(why)
        pytest.skip(why)
    return Synonyms()


def free_words(text: str) -> list[str]:
    return [p.text for p in split_pieces(text) if p.word]


def test_pieces_cover_the_text_and_protect_numbers_code_and_special_tokens():
    pieces = split_pieces(TEXT)
    assert "".join(p.text for p in pieces) == TEXT
    words = free_words(TEXT)
    for kept in ("47", "3.5", "`sum(xs)`", "<｜User｜>", "<think>", "print(big house)", "x", "st", "big", "house"):
        assert kept not in words
    assert {"Please", "compute", "total", "briefly", "marker", "friend"} <= set(words)
    assert protected_spans(TEXT) == {"47": 1, "3.5": 1, "`sum(xs)`": 1, "<｜User｜>": 1, "<think>": 1, "1": 1,
                                     "21": 1, "```python\nprint(big house)\n```": 1}


@pytest.mark.parametrize("op", EDA_OPS)
def test_operations_never_touch_protected_spans_and_are_seeded(op):
    outputs = set()
    for seed in range(30):
        out = eda(TEXT, op, random.Random(seed), 0.3, fake_synonyms)
        assert protected_spans(out) == protected_spans(TEXT), out
        assert "x+1" in out and "21st" in out  # words glued to an expression stay where they are
        assert out == eda(TEXT, op, random.Random(seed), 0.3, fake_synonyms)
        outputs.add(out)
    assert len(outputs) > 20  # the seed matters


def test_published_rates():
    """n = max(1, int(alpha * words)) changes for SR, RI and RS; RD deletes each word with probability alpha."""
    text = " ".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(40)).replace("w", "")  # 40 words
    words = text.split()
    one = lambda word: [word + "ish"]  # noqa: E731 - one one-word synonym per word
    sr = eda(text, "synonym", random.Random(0), 0.1, one).split(" ")
    assert sum(a != b for a, b in zip(words, sr, strict=True)) == 4
    ri = eda(text, "insert", random.Random(0), 0.1, one)
    assert len(free_words(ri)) - 40 == 4 and [w for w in free_words(ri) if w in words] == words
    rs = eda(text, "swap", random.Random(0), 0.1).split(" ")
    assert sorted(rs) == sorted(words) and 2 <= sum(a != b for a, b in zip(words, rs, strict=True)) <= 8
    long = " ".join(["word"] * 2000)
    kept = [len(eda(long, "delete", random.Random(s), 0.1).split()) for s in range(5)]
    assert all(1700 < k < 1900 for k in kept)  # ~10% deleted
    assert eda("one", "delete", random.Random(0), 1.0) == "one"  # one word always stays
    assert wei_zou_n_aug(500) == 16 and wei_zou_n_aug(501) == 8 and wei_zou_n_aug(2000) == 8
    assert wei_zou_n_aug(2001) == 4


def test_stop_words_are_not_replaced():
    out = eda("what is the of and", "synonym", random.Random(0), 1.0, fake_synonyms)
    assert out == "what is the of and"


def test_copies_change_only_the_user_side():
    record = {"messages": [{"role": "system", "content": "Answer with reasoning please"},
                           {"role": "user", "content": "Please compute the total quickly for me"},
                           {"role": "assistant", "content": "Sure thing my friend", "reasoning_content": "easy one"}]}
    augmenter = Augmenter({"swap": 0.1, "delete": 0.1, "synonym": 0.1, "insert": 0.1}, n_aug=8, seed=1,
                          synonyms=fake_synonyms)
    copies = augmenter.copies(record, 0, 1)
    assert 4 <= len(copies) <= 8 and record not in copies
    for c in copies:
        assert c["messages"][0] == record["messages"][0] and c["messages"][2] == record["messages"][2]
    assert copies == augmenter.copies(record, 0, 1)
    text = Augmenter({"swap": 0.5}, n_aug=1, seed=0).copies({"text": "alpha beta gamma delta"}, 0, 1)
    assert len(text) == 1 and sorted(text[0]["text"].split()) == ["alpha", "beta", "delta", "gamma"]
    record = {"prompt": "alpha beta gamma", "completion": "a b c"}
    prompt = Augmenter({"swap": 0.5}, n_aug=1, seed=0).copies(record, 0, 1)
    assert prompt[0]["completion"] == "a b c" and prompt[0]["prompt"] != "alpha beta gamma"


def test_wordnet_synonyms_offline(wordnet_synonyms):
    assert wordnet_synonyms.wordnet.get_version() == "3.0"
    assert {"total", "add", "summate"} <= set(wordnet_synonyms("sum"))
    assert "calculate" in wordnet_synonyms("compute") and wordnet_synonyms("qwzx") == []
    out = eda("Please compute the total of 47 and 38", "synonym", random.Random(0), 0.5, wordnet_synonyms)
    assert out != "Please compute the total of 47 and 38" and "47" in out and "38" in out


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(AugmentError, match="scripts/install_wordnet.sh"):
        load_wordnet(tmp_path)


# ---------------------------------------------------------------------------------------------------- back-translation


SCRIPT = {
    ("English", "French", "What is the sum of 4 and 5?"): "Quelle est la somme de 4 et 5 ?",
    ("French", "English", "Quelle est la somme de 4 et 5 ?"): "What is the total of 4 and 5?",
    ("English", "German", "What is the sum of 4 and 5?"): "Was ist die Summe von 4 und 5?",
    ("German", "English", "Was ist die Summe von 4 und 5?"): "What's the sum of 4 and 6?",  # lost a number
}


def scripted(prompt: str) -> str:
    """A scripted translator: the reply to TRANSLATE_PROMPT for each (source, target, text) of SCRIPT."""
    head, text = prompt.split("\n\n", 1)
    words = head.split()
    return SCRIPT[(words[words.index("from") + 1], words[words.index("to") + 1].rstrip("."), text)]


def test_back_translation_mechanics():
    bt = BackTranslator(scripted)
    assert bt("What is the sum of 4 and 5?", "French") == "What is the total of 4 and 5?"
    assert bt("What is the sum of 4 and 5?", "German") is None  # 5 became 6: dropped
    record = {"prompt": "What is the sum of 4 and 5?", "completion": "9"}
    copies = Augmenter({}, seed=0, back_translator=bt, languages=("French", "German")).copies(record, 0, 1)
    assert copies == [{"prompt": "What is the total of 4 and 5?", "completion": "9"}]


def test_back_translation_through_an_openai_compatible_server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], body["temperature"]))
            reply = json.dumps({"choices": [{"message": {"content": scripted(body["messages"][0]["content"])}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bt = BackTranslator(model_completer(f"http://127.0.0.1:{server.server_port}/v1", "my-model"))
        assert bt("What is the sum of 4 and 5?", "French") == "What is the total of 4 and 5?"
        assert seen == [("/v1/chat/completions", "my-model", 0)] * 2
        with pytest.raises(AugmentError, match="translator http://127.0.0.1:1/v1/chat/completions"):
            model_completer("http://127.0.0.1:1/v1")("hello")
    finally:
        server.shutdown()


def test_back_translation_through_an_r1kit_model():
    """The bundled model knows no French: the mechanics run (greedy, two calls), whatever it writes."""
    complete = model_completer(str(NANO), max_new_tokens=8)
    out = BackTranslator(complete)("What is 4+5?", "French")
    assert out is None or isinstance(out, str)


# ---------------------------------------------------------------------------------------------------- CLI and recipes


def test_cli_augment(tmp_path, capsys):
    from r1kit.__main__ import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "please add these two numbers now"},
                                            {"role": "assistant", "content": "ok"}]}) + "\n")
    dst = tmp_path / "out.jsonl"
    assert main(["augment", str(src), str(dst), "--ops", "swap,delete", "--n-aug", "4", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert rows[0] == json.loads(src.read_text()) and 2 <= len(rows) <= 5
    assert all(r["messages"][1] == {"role": "assistant", "content": "ok"} for r in rows)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == 1
    src.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert main(["augment", str(src), str(dst), "--ops", "swap"]) == 2
    assert f"{src}:1: message 0: unknown role 'robot'" in capsys.readouterr().err


def test_config_section_checked():
    with pytest.raises(TrainConfigError, match=r"augment.ops: unknown operation\(s\) \['synonim'\]"):
        TrainConfig.from_dict({"data": {"chat_jsonl": "x.jsonl"}, "augment": {"ops": {"synonim": 0.1}}})
    with pytest.raises(TrainConfigError, match="augment.ops: rates must be numbers in"):
        TrainConfig.from_dict({"data": {"chat_jsonl": "x.jsonl"}, "augment": {"ops": {"swap": 2}}})
    with pytest.raises(TrainConfigError, match="applies to data.chat_jsonl"):
        TrainConfig.from_dict({"augment": {"ops": {"swap": 0.1}}})
    assert AugmentSection().ops == {}  # off by default


def test_augment_section_applies_to_the_training_side_only(tmp_path):
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.chat_data import build_chat_batches

    rows = [{"prompt": f"please add {i} and {i + 1} for me now", "completion": str(2 * i + 1)} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.from_dir(NANO)
    base = {"data": {"chat_jsonl": str(path), "validation_fraction": 0.25}, "seq_len": 64, "batch_size": 2}
    plain_train, plain_val = build_chat_batches(TrainConfig.from_dict(base), tok)
    cfg = TrainConfig.from_dict({**base, "augment": {"ops": {"swap": 0.2, "delete": 0.2}, "n_aug": 2}})
    aug_train, aug_val = build_chat_batches(cfg, tok)
    assert len(plain_train.examples) == 15 and 15 + 20 <= len(aug_train.examples) <= 15 + 30
    assert [e.ids for e in aug_val.examples] == [e.ids for e in plain_val.examples]


def test_augment_recipe_loads():
    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "augment-nano.yaml")
    assert cfg.augment.ops == {op: 0.1 for op in EDA_OPS} and cfg.augment.n_aug is None
    assert cfg.data.chat_jsonl and cfg.init_from == "r1kit/nano" and cfg.early_stopping_patience == 3
