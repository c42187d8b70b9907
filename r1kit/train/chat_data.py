"""A user's chat data for supervised fine-tuning: JSONL in, token ids with an assistant-only loss mask out.

Each line of the file is one JSON object in one of the formats people already have:

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (OpenAI / TRL); an
  assistant turn may carry ``"reasoning_content"``, which becomes its ``<think>`` block. An assistant
  ``content`` that holds ``<think>...</think>`` itself (R1-distill data) is split the same way.
- ``{"prompt": ..., "completion": ...}``: strings (one user turn, one assistant turn) or lists of messages.
- ``{"text": ...}``: plain text, every token a target.

A conversation is rendered with the tokenizer's chat format (:meth:`Tokenizer.encode_chat`: the checkpoint's own
template, else the built-in R1 one; a control token written in a message stays text). Each assistant turn is
trained on what a generation from its prompt should produce, up to the token generation stops at. With R1's
format, a turn with reasoning follows ``<｜Assistant｜><think>\n`` and is ``{reasoning}\n</think>\n\n{answer}
<｜end▁of▁sentence｜>``; one without follows DeepSeek's thinking-off prompt (``...<think>\n\n</think>\n\n``) and is
``{answer}<eos>``. The loss mask is 1 on those tokens, in every assistant turn, and 0 elsewhere (system and user
text, the markers that open a turn).

:class:`PackedBatches` packs whole examples into training rows with per-token document ids, which the model
turns into a block-diagonal causal mask and per-document positions (``Transformer.forward(doc_ids=...)``), so
packed examples never see each other.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1kit.tokenizer import CHAT_ROLES, THINK_CLOSE, THINK_OPEN, Tokenizer, TokenizerError, split_reasoning

log = logging.getLogger("r1kit")

FORMATS = ('{"messages": [...]}', '{"prompt": ..., "completion": ...}', '{"text": ...}')


class ChatDataError(ValueError):
    """A line of a chat JSONL file cannot be used. The message names the file and the line number."""


@dataclass
class ChatExample:
    """One training document: token ids and a same-length loss mask (1 = this token is a target)."""

    ids: list[int]
    loss_mask: list[int]


@dataclass
class ChatData:
    """The examples of a file, and how many lines ``skip_invalid`` skipped (with the first reasons)."""

    examples: list[ChatExample]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- lines


def record_messages(record: Any) -> list[dict[str, Any]] | None:
    """The conversation of a parsed line, or None for a ``{"text": ...}`` line. Raises ValueError with what is
    wrong (the caller adds file and line)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = prompt + completion
        elif isinstance(prompt, str) and isinstance(completion, str):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be lists of messages")
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError("'text' must be a non-empty string")
        return None
    else:
        raise ValueError(f"unknown format (keys {sorted(record)}); expected one of {', '.join(FORMATS)}")
    _check_messages(messages)
    return messages


def _check_messages(messages: Any) -> None:
    """Raise ValueError naming the message and field when ``messages`` is not a usable conversation."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation (no messages)")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object, got {type(message).__name__}")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i}: unknown role {message.get('role')!r}; roles: {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: 'content' must be a string, got {type(message.get('content')).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and (message["role"] != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"message {i}: 'reasoning_content' must be a string on an assistant message")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from this conversation")


# ---------------------------------------------------------------------------------------------------- encoding


def _assistant_parts(message: Mapping[str, Any]) -> tuple[str | None, str]:
    """``(reasoning or None, answer)`` of an assistant message: its reasoning_content, or a think block in it."""
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"].strip(), message["content"].strip()
    if THINK_CLOSE in message["content"]:
        return split_reasoning(message["content"], starts_in_reasoning=True)
    return None, message["content"]


def turn_end_id(tokenizer: Tokenizer) -> int:
    """The token that ends an assistant turn, where a generation stops: the eos of the built-in R1 format, else the
    last stop token the checkpoint's template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``)."""
    if tokenizer.eos_id is None:
        raise TokenizerError("the tokenizer has no eos_token, which ends every assistant turn")
    if tokenizer.chat_template is None:
        return tokenizer.eos_id
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ends = [i for i in tokenizer.encode_chat(probe, add_generation_prompt=False) if i in tokenizer.stop_ids]
    return ends[-1] if ends else tokenizer.eos_id


def _target_ids(tokenizer: Tokenizer, reasoning: str | None, answer: str, end_id: int) -> list[int]:
    """What the model generates for one assistant turn after its generation prompt, the end-of-turn token included.

    With reasoning: ``{reasoning}\n</think>\n\n{answer}`` when the prompt opened ``<think>`` (R1), else the model
    opens it: ``<think>\n{reasoning}\n</think>\n\n{answer}``."""
    if reasoning is None:
        return tokenizer.encode_plain(answer) + [end_id]
    opened = tokenizer.starts_in_reasoning(thinking=True)
    head = [] if opened else tokenizer.encode(THINK_OPEN) + tokenizer.encode_plain("\n")
    return (head + tokenizer.encode_plain(f"{reasoning}\n") + tokenizer.encode(THINK_CLOSE)
            + tokenizer.encode_plain(f"\n\n{answer}") + [end_id])


def _context_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], turn: int, since: int,
                 ids: list[int], thinking: bool) -> list[int]:
    """The tokens between the conversation so far (``ids``) and assistant message ``turn``: the chat template's
    rendering of ``messages[:turn]`` with its generation prompt, less ``ids`` when it starts with them. When the
    template renders the earlier turns otherwise (R1 drops their reasoning), the messages since the previous
    assistant turn (``messages[since:turn]``) rendered alone, without a second bos."""
    full = tokenizer.encode_chat(list(messages[:turn]), add_generation_prompt=True, thinking=thinking)
    if full[:len(ids)] == ids:
        return full[len(ids):]
    alone = tokenizer.encode_chat(list(messages[since:turn]), add_generation_prompt=True, thinking=thinking)
    return alone[1:] if tokenizer.bos_id is not None and alone[:1] == [tokenizer.bos_id] else alone


def encode_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> ChatExample:
    """Token ids of a checked conversation and its loss mask: 1 on every assistant turn's generated tokens.

    The context before each assistant turn is what :meth:`Tokenizer.encode_chat` gives for the messages before
    it with the generation prompt (thinking on when the turn has reasoning), so the first turn is trained exactly
    as a request is served (see :func:`_context_ids` for the later ones). Messages after the last assistant turn
    teach nothing and are dropped.
    """
    end_id = turn_end_id(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    since = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        reasoning, answer = _assistant_parts(message)
        context = _context_ids(tokenizer, messages, turn, since, ids, thinking=reasoning is not None)
        target = _target_ids(tokenizer, reasoning, answer, end_id)
        ids += context + target
        mask += [0] * len(context) + [1] * len(target)
        since = turn + 1
    return ChatExample(ids, mask)


def encode_text(text: str, tokenizer: Tokenizer) -> ChatExample:
    """A ``{"text": ...}`` document: bos (if any), the text as plain text, eos; every token but the first is
    a target."""
    if tokenizer.eos_id is None:
        raise TokenizerError("the tokenizer has no eos_token, which ends every document")
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode_plain(text)
    ids.append(tokenizer.eos_id)
    return ChatExample(ids, [0] + [1] * (len(ids) - 1))


def encode_record(record: Any, tokenizer: Tokenizer, max_len: int) -> ChatExample:
    """One parsed JSONL line as a :class:`ChatExample` of at most ``max_len`` tokens (else ValueError)."""
    messages = record_messages(record)
    example = encode_text(record["text"], tokenizer) if messages is None else encode_conversation(messages, tokenizer)
    example.loss_mask[0] = 0  # a document's first token is never predicted (packed: from another document)
    if len(example.ids) > max_len:
        raise ValueError(f"{len(example.ids)} tokens, longer than the context (max_len = {max_len})")
    if not any(example.loss_mask):
        raise ValueError("no target tokens")
    return example


@dataclass
class ChatRecord:
    """One checked line of a chat JSONL file: its parsed object and where it came from (``file:line``)."""

    where: str
    record: dict[str, Any]


def read_chat_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[ChatRecord], ChatData]:
    """The file's lines parsed and format-checked (not yet tokenized), and a ChatData counting the skipped ones.

    A bad line raises :class:`ChatDataError` naming file and line, or with ``skip_invalid`` is counted.
    """
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    records: list[ChatRecord] = []
    data = ChatData([])
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    record = _parse_line(line)
                    record_messages(record)
                    records.append(ChatRecord(f"{path}:{number}", record))
                except ValueError as e:
                    _refuse_or_count(data, f"{path}:{number}: {e}", skip_invalid)
    return records, data


def _refuse_or_count(data: ChatData, reason: str, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise ChatDataError(f"{reason} (skip_invalid: true skips such lines)")
    data.skipped += 1
    if len(data.skip_reasons) < 10:
        data.skip_reasons.append(reason)


def encode_records(records: Sequence[ChatRecord], tokenizer: Tokenizer, max_len: int, skip_invalid: bool = False,
                   data: ChatData | None = None) -> ChatData:
    """Tokenize checked records into ``data`` (a new ChatData by default): an example longer than ``max_len``
    raises :class:`ChatDataError` naming its line, or with ``skip_invalid`` is counted."""
    data = ChatData([]) if data is None else data
    for r in records:
        try:
            data.examples.append(encode_record(r.record, tokenizer, max_len))
        except (ValueError, TokenizerError) as e:
            _refuse_or_count(data, f"{r.where}: {e}", skip_invalid)
    return data


def read_chat_jsonl(path: str | Path, tokenizer: Tokenizer, max_len: int, skip_invalid: bool = False) -> ChatData:
    """Read a chat JSONL file (formats in the module docstring) into examples of at most ``max_len`` tokens.

    A malformed line, an unknown role, an empty conversation, one without an assistant turn or one longer
    than ``max_len`` raises :class:`ChatDataError` naming the file and line; with ``skip_invalid`` it is
    counted in ``skipped`` (the first reasons kept in ``skip_reasons`` and logged) instead. Blank lines are
    ignored. A file with no usable example is an error either way.
    """
    records, data = read_chat_records(path, skip_invalid)
    return _require_examples(encode_records(records, tokenizer, max_len, skip_invalid, data), path)


def _require_examples(data: ChatData, path: str | Path) -> ChatData:
    if data.skipped:
        log.warning("%s: skipped %d invalid line(s); first: %s", path, data.skipped, data.skip_reasons[0])
    if not data.examples:
        raise ChatDataError(f"{path}: no usable example (skipped {data.skipped} line(s))")
    return data


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None


def split_validation(examples: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, validation)``: a seeded random ``fraction`` of ``examples`` (at least one when fraction > 0),
    each side in the original order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else max(1, round(fraction * len(examples)))
    if n_val >= len(examples):
        raise ValueError(f"{len(examples)} example(s) cannot be split with a validation fraction of {fraction}")
    chosen = set(random.Random(seed).sample(range(len(examples)), n_val))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]


# ---------------------------------------------------------------------------------------------------- packing


def pack_rows(examples: Sequence[ChatExample], row_len: int, pad_id: int) -> list[tuple[list[int], ...]]:
    """Pack whole examples, in order, into rows of ``row_len`` tokens (a new row when the next one does not
    fit). Each row is ``(ids, loss_mask, doc_ids)``; the padding at a row's end is one more document, mask 0."""
    rows: list[tuple[list[int], ...]] = []
    ids: list[int] = []
    mask: list[int] = []
    docs: list[int] = []

    def close() -> None:
        pad = row_len - len(ids)
        doc = docs[-1] + 1 if docs else 0
        rows.append((ids + [pad_id] * pad, mask + [0] * pad, docs + [doc] * pad))

    for example in examples:
        if len(example.ids) > row_len:
            raise ValueError(f"an example of {len(example.ids)} tokens does not fit a row of {row_len}")
        if len(ids) + len(example.ids) > row_len:
            close()
            ids, mask, docs = [], [], []
        doc = docs[-1] + 1 if docs else 0
        ids, mask, docs = ids + example.ids, mask + example.loss_mask, docs + [doc] * len(example.ids)
    if ids:
        close()
    return rows


class PackedBatches:
    """Batches of packed rows for the training loop: ``next_batch() -> (x, y, mask, doc_ids)``, all (B, T).

    ``x`` and ``y`` are a row of ``seq_len + 1`` tokens without its last / first token, ``mask`` the loss mask
    of ``y`` and ``doc_ids`` the document of each ``x`` token. Every epoch shuffles the examples (seeded by
    ``seed`` and the epoch) and packs them again; batches run on across epochs. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the position exactly.
    """

    def __init__(self, examples: Sequence[ChatExample], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 shuffle: bool = True) -> None:
        """``examples`` of at most ``seq_len`` tokens each; ``pad_id`` fills the rows' ends (mask 0)."""
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = list(examples)
        self.seq_len, self.batch_size, self.seed, self.pad_id, self.shuffle = seq_len, batch_size, seed, pad_id, shuffle
        self.epoch, self.row = 0, 0
        self._rows = self._epoch_rows(0)

    def _epoch_rows(self, epoch: int) -> list[tuple[list[int], ...]]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return pack_rows([self.examples[i] for i in order], self.seq_len + 1, self.pad_id)

    @property
    def rows_per_epoch(self) -> int:
        """Packed rows in the current epoch."""
        return len(self._rows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, mask, doc_ids)``: int64, int64, float32, int64, each (batch_size, seq_len)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.row == len(self._rows):
                self.epoch, self.row = self.epoch + 1, 0
                self._rows = self._epoch_rows(self.epoch)
            picked.append(self._rows[self.row])
            self.row += 1
        ids, mask, docs = (torch.tensor([row[k] for row in picked]) for k in range(3))  # (B, T + 1) each
        return ids[:, :-1], ids[:, 1:], mask[:, 1:].float(), docs[:, :-1]

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and row within it (plain ints)."""
        return {"epoch": self.epoch, "row": self.row, "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (of a PackedBatches over the same examples, seq_len and batch_size)."""
        if (state["seq_len"], state["batch_size"]) != (self.seq_len, self.batch_size):
            raise ValueError(f"state is for seq_len={state['seq_len']}, batch_size={state['batch_size']}; these "
                             f"batches have seq_len={self.seq_len}, batch_size={self.batch_size}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        self._rows = self._epoch_rows(self.epoch)


# ---------------------------------------------------------------------------------------------------- recipes


def build_chat_batches(cfg: Any, tokenizer: Tokenizer) -> tuple[PackedBatches, PackedBatches]:
    """Train and validation PackedBatches for a TrainConfig with ``data.chat_jsonl`` (what build_corpus returns).

    Validation is ``data.validation_jsonl``, or a seeded ``data.validation_fraction`` of chat_jsonl's lines
    (the training examples themselves when that is 0). The ``augment:`` section adds augmented copies of the
    training side only; a copy that no longer fits ``seq_len`` is dropped and counted in the log.
    """
    d = cfg.data
    records, train = read_chat_records(d.chat_jsonl, d.skip_invalid)
    if d.validation_jsonl:
        val_records, val = read_chat_records(d.validation_jsonl, d.skip_invalid)
    else:
        records, val_records = split_validation(records, d.validation_fraction, cfg.seed)
        val = ChatData([])
    train = _require_examples(encode_records(records, tokenizer, cfg.seq_len, d.skip_invalid, train), d.chat_jsonl)
    if cfg.augment.ops or cfg.augment.translator:
        from r1kit.train.augment import augment_records

        copies = encode_records(augment_records(records, cfg.augment), tokenizer, cfg.seq_len, skip_invalid=True)
        log.info("augment: %d augmented copies of %d training examples (%d too long, dropped)",
                 len(copies.examples), len(train.examples), copies.skipped)
        train.examples += copies.examples
    if val_records:
        val = _require_examples(encode_records(val_records, tokenizer, cfg.seq_len, d.skip_invalid, val),
                                d.validation_jsonl or d.chat_jsonl)
    else:
        log.info("%s: no validation split (validation_fraction = 0): validating on training examples", d.chat_jsonl)
        val = train
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return (PackedBatches(train.examples, cfg.seq_len, cfg.batch_size, cfg.seed, pad_id),
            PackedBatches(val.examples, cfg.seq_len, cfg.batch_size, cfg.seed + 1, pad_id, shuffle=False))
