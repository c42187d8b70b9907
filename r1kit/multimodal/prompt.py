"""Prompts with media: the tokenizer's placeholder tokens, and their expansion in a token sequence.

Each attachment of a user message becomes num_tokens placeholder tokens placed right after that message's
``<｜User｜>`` tag, in the order of the message's content parts (as LLaVA puts ``<image>`` before the text).
Placeholders never come from the user's text: chat encoding escapes control tokens written in messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken

from r1kit.multimodal.model import PlaceholderMismatchError
from r1kit.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, USER_TAG, Tokenizer

PLACEHOLDER_TOKENS = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN}


def add_media_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the image and audio placeholders added as special tokens (when missing)."""
    backend = tokenizer._backend
    missing = [t for t in PLACEHOLDER_TOKENS.values() if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
    return Tokenizer(backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                     pad_token=tokenizer.pad_token, add_bos_token=tokenizer.add_bos_token,
                     config=tokenizer._config, chat_template=tokenizer.chat_template)


def placeholder_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"image": id, "audio": id} of a tokenizer that has them (add_media_tokens)."""
    ids = {kind: tokenizer.token_to_id(tok) for kind, tok in PLACEHOLDER_TOKENS.items()}
    missing = [PLACEHOLDER_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise PlaceholderMismatchError(f"the tokenizer has no media placeholder token(s) {missing}")
    return ids  # type: ignore[return-value]


def insert_placeholders(ids: Sequence[int], mask: Sequence[int], turns_media: Sequence[Sequence[str]],
                        tokenizer: Tokenizer, num_tokens: Mapping[str, int]) -> tuple[list[int], list[int]]:
    """Insert each user turn's placeholders after its ``<｜User｜>`` tag. turns_media[k]: the media kinds of the
    k-th user message in order; mask (loss mask) gets 0 at the inserted positions. Returns (ids, mask)."""
    user_id = tokenizer.token_to_id(USER_TAG)
    slots = placeholder_ids(tokenizer)
    tags = [i for i, t in enumerate(ids) if t == user_id]
    if len(tags) < len(turns_media):
        raise PlaceholderMismatchError(f"{len(turns_media)} user turns carry media but the prompt has {len(tags)} "
                                       f"{USER_TAG} tags")
    out_ids, out_mask, start = [], [], 0
    for tag, kinds in zip(tags, turns_media, strict=False):
        out_ids += list(ids[start:tag + 1])
        out_mask += list(mask[start:tag + 1])
        for kind in kinds:
            out_ids += [slots[kind]] * num_tokens[kind]
            out_mask += [0] * num_tokens[kind]
        start = tag + 1
    return out_ids + list(ids[start:]), out_mask + list(mask[start:])


def user_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The text of each user message (content parts of type text joined), for encoding without media."""
    out = []
    for m in messages:
        if m.get("role") == "user":
            c = m.get("content")
            out.append(c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text"))
    return out
