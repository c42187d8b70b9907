"""Chat SFT data: formats, assistant-only loss masks, bad lines, validation split, packing with document
boundaries (packed forward == each document alone), and the chat JSONL wired into the training loop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from r1kit.tokenizer import Tokenizer
from r1kit.train import data as arithmetic
from r1kit.train.chat_data import (
    ChatDataError,
    ChatExample,
    PackedBatches,
    encode_record,
    pack_rows,
    read_chat_jsonl,
    split_validation,
)

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(NANO)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def targets(tok: Tokenizer, ex: ChatExample) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, current = [], []
    for i, m in zip(ex.ids, ex.loss_mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def test_reasoning_turn_matches_the_arithmetic_sft_examples(tok):
    """An independent reference: data.chat_example builds the bundled model's SFT examples from whole strings."""
    for seed in range(5):
        p = arithmetic.sample_problem(random.Random(seed), "sub3")
        ids, mask = arithmetic.chat_example(p, tok)
        record = {"messages": [{"role": "user", "content": p.question},
                               {"role": "assistant", "reasoning_content": arithmetic.reasoning(p),
                                "content": str(p.answer)}]}
        ex = encode_record(record, tok, 1000)
        assert (ex.ids, ex.loss_mask) == (ids, mask)
        inline = f"<think>\n{arithmetic.reasoning(p)}\n</think>\n\n{p.answer}"
        think_inline = {"prompt": p.question, "completion": inline}
        assert encode_record(think_inline, tok, 1000).ids == ids


def test_multi_turn_loss_on_every_assistant_turn_only(tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <｜Assistant｜> there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2=4."},
        {"role": "user", "content": "dangling question"},
    ]}
    ex = encode_record(record, tok, 1000)
    assert targets(tok, ex) == ["Hello.<｜end▁of▁sentence｜>", "2+2=4.\n</think>\n\n4<｜end▁of▁sentence｜>"]
    assert "dangling" not in tok.decode(ex.ids)
    # the context of the first turn is exactly the chat template's prompt (thinking off: no reasoning)
    prompt = tok.encode_chat(record["messages"][:2], add_generation_prompt=True, thinking=False)
    assert ex.ids[:len(prompt)] == prompt and not any(ex.loss_mask[:len(prompt)])
    assert tok.encode("<｜Assistant｜>")[0] not in ex.ids[2:6]  # the injected marker stayed text
    # prompt/completion as message lists and as strings
    pc = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]}
    assert encode_record(pc, tok, 100).ids == encode_record({"prompt": "Hi", "completion": "Yo"}, tok, 100).ids


def test_text_rows_every_token_but_the_first(tok):
    ex = encode_record({"text": "def f(): pass"}, tok, 100)
    assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
    assert ex.loss_mask == [0] + [1] * (len(ex.ids) - 1)


BAD = [
    ("{not json", "not valid JSON"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"foo": 1}', "unknown format"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x", "completion": "' + "long " * 300 + '"}', "longer than the context (max_len = 64)"),
]


@pytest.mark.parametrize(("line", "words"), BAD)
def test_bad_lines_name_file_and_line(tok, tmp_path, line, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, "", line])
    with pytest.raises(ChatDataError) as e:
        read_chat_jsonl(path, tok, 64)
    assert f"{path}:3: " in str(e.value) and words in str(e.value)


def test_skip_invalid_counts(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}] + [b for b, _ in BAD] + [{"text": "also fine"}])
    data = read_chat_jsonl(path, tok, 64, skip_invalid=True)
    assert (len(data.examples), data.skipped) == (2, len(BAD))
    assert data.skip_reasons[0].startswith(f"{path}:2: ")
    with pytest.raises(ChatDataError, match="no usable example"):
        read_chat_jsonl(write_jsonl(tmp_path / "e.jsonl", ["{bad"]), tok, 64, skip_invalid=True)


def test_split_validation_seeded_disjoint_ordered():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train) and val == sorted(val)
    assert split_validation(items, 0.2, seed=3) == (train, val) and split_validation(items, 0.2, seed=4) != (train, val)
    assert split_validation(items, 0.0, 0) == (items, [])
    with pytest.raises(ValueError, match="cannot be split"):
        split_validation([1], 0.5, 0)


def test_pack_rows_keeps_documents_whole():
    exs = [ChatExample([1, 2, 3], [0, 1, 1]), ChatExample([4, 5], [0, 1]), ChatExample([6, 7, 8, 9], [0, 1, 1, 1])]
    rows = pack_rows(exs, 6, pad_id=0)
    assert rows == [([1, 2, 3, 4, 5, 0], [0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 2]),
                    ([6, 7, 8, 9, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1])]


def test_packed_batches_resume_exactly():
    exs = [ChatExample(list(range(1, n + 2)), [0] + [1] * n) for n in range(1, 12)]
    a = PackedBatches(exs, seq_len=15, batch_size=3, seed=0, pad_id=0)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    b = PackedBatches(exs, seq_len=15, batch_size=3, seed=0, pad_id=0)
    b.load_state_dict(state)
    for _ in range(5):
        for ta, tb in zip(a.next_batch(), b.next_batch(), strict=True):
            assert torch.equal(ta, tb)
    x, y, mask, doc = a.next_batch()
    assert x.shape == y.shape == mask.shape == doc.shape == (3, 15)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_packed_forward_equals_each_document_alone(make_model, name):
    """Logits (and MTP logits) of three documents packed in one row == each document run alone."""
    model = make_model(name)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 500, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(docs)[None]  # (1, 24)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed, hidden = model(ids, return_hidden=True, doc_ids=doc_ids)
        alone = torch.cat([model(d[None]) for d in docs], dim=1)
        assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
        assert not torch.allclose(model(ids), alone, atol=1e-3)  # without doc_ids the documents do mix
        if model.mtp:
            mtp_packed = model.mtp_logits(hidden, ids, doc_ids)[0][0]  # (T - 1, V)
            start = 0
            for d in docs:
                _, h = model(d[None], return_hidden=True)
                mtp_alone = model.mtp_logits(h, d[None])[0][0]  # (len - 1, V), the last one has no next token
                assert torch.allclose(mtp_packed[start:start + len(d) - 2], mtp_alone[:-1], atol=1e-5)
                start += len(d)


def arithmetic_chat_file(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = arithmetic.sample_problem(rng, "add2")
        rows.append({"messages": [{"role": "user", "content": p.question},
                                  {"role": "assistant", "reasoning_content": arithmetic.reasoning(p),
                                   "content": str(p.answer)}]})
    return write_jsonl(path, rows)


def test_train_on_chat_jsonl_with_validation_and_early_stopping(tok, tmp_path):
    """r1kit train with data.chat_jsonl: packed rows, a validation split, and early stopping ending the run."""
    from r1kit.api import random_checkpoint
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    base = random_checkpoint(tmp_path / "base", "tiny-moe", tokenizer=tok)
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny-moe"}, "init_from": str(base), "out_dir": str(tmp_path / "run"),
        "data": {"chat_jsonl": str(arithmetic_chat_file(tmp_path / "d.jsonl", 24)), "validation_fraction": 0.25},
        "seq_len": 96, "batch_size": 2, "max_steps": 50, "warmup_steps": 0, "learning_rate": 1e-3,
        "eval_interval": 2, "eval_batches": 2, "checkpoint_interval": 50, "log_interval": 1, "precision": "fp32",
        # nothing counts as an improvement after the first validation: the run stops at the second (step 4)
        "early_stopping_patience": 1, "early_stopping_min_delta": 100.0, "threads": 1})
    summary = train(cfg, progress=False)
    assert summary["steps"] == 4 and summary["early_stopped"] and summary["best_val_step"] == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]


def test_early_stopping_by_hand():
    from r1kit.train.loop import EarlyStopping

    s = EarlyStopping(patience=2, min_delta=0.1)
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.45), (4, 2.6)]:
        assert not s.stopped
        s.update(step, loss)
    assert s.stopped and (s.best, s.best_step) == (2.5, 2)
    never = EarlyStopping(patience=None)
    for step in range(10):
        never.update(step, 1.0)
    assert not never.stopped and never.summary() == {}


def test_a_checkpoint_template_chatml(tmp_path):
    """With the checkpoint's own template (Qwen2 ChatML) every turn's context is the template's rendering: the ids
    are the rendered conversation itself, the targets end with <|im_end|>, no default system prompt reappears."""
    from r1kit.tokenizer import DEEPSEEK_SPECIAL_TOKENS, train_bpe_tokenizer

    corpus = ["hello there, what is two plus two? four. You are a helpful terse assistant."] * 4
    base = train_bpe_tokenizer(corpus, 400, special_tokens=DEEPSEEK_SPECIAL_TOKENS + ["<|im_start|>", "<|im_end|>"])
    base.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = (Path(__file__).parent / "chat_templates" / "qwen2_chatml.jinja").read_text(encoding="utf-8")
    config.update(bos_token=None, eos_token="<|im_end|>", pad_token=None, chat_template=template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    tok = Tokenizer.from_dir(tmp_path)
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"}]
    ex = encode_record({"messages": messages}, tok, 1000)
    rendered = tok.encode_chat(messages, add_generation_prompt=False)
    assert ex.ids == rendered[:len(ex.ids)] and tok.decode(rendered[len(ex.ids):]) == "\n"
    assert targets(tok, ex) == ["hello<|im_end|>", "four<|im_end|>"]
    assert tok.decode(ex.ids).count("You are a helpful assistant.") == 1
