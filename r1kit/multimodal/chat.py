"""Chat with media: OpenAI-style content parts -> token ids with expanded placeholders + decoded media, and
generation with the media merged into the prefill (r1kit.generate.generate_tokens' embed_prompt).

A user message's content may be a string or a list of parts:
    {"type": "text", "text": ...}
    {"type": "image", "image": PATH | BYTES | ARRAY | PIL.Image}
    {"type": "audio", "audio": PATH | BYTES | ARRAY, "sample_rate": HZ (arrays only)}
    {"type": "dicom", "path": PATH | BYTES, "frame": N (optional)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r1kit.generate import SamplingParams, generate_tokens
from r1kit.multimodal.config import MODALITIES
from r1kit.multimodal.media import load_audio, load_dicom, load_image
from r1kit.multimodal.model import Media, MediaError, MissingEncoderError, VisionAudioLM
from r1kit.multimodal.prompt import insert_placeholders
from r1kit.tokenizer import Tokenizer

MEDIA_PART_TYPES = ("image", "audio", "dicom")


@dataclass
class MediaPrompt:
    """A chat prompt ready for generation: ids with placeholders, the media in order, DICOM summaries."""

    ids: list[int]
    media: list[Media]
    dicom: list[dict[str, Any]] = field(default_factory=list)  # de-identified summaries (safe to log)


def has_media(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message has a content part other than text (a media type, or an unknown one to refuse)."""
    return any(isinstance(m, Mapping) and isinstance(m.get("content"), list) and any(
        not isinstance(p, Mapping) or p.get("type") != "text" for p in m["content"]) for m in messages)


def decode_part(vl: VisionAudioLM, part: Mapping[str, Any], name: str) -> tuple[Media, dict[str, Any] | None]:
    """One media content part -> Media (and a DICOM summary); errors name the part."""
    kind = part.get("type")
    cfg = vl.config
    try:
        vl.encoder("audio" if kind == "audio" else "image")
    except MissingEncoderError as e:
        raise MissingEncoderError(f"{name}: {e}") from None
    if kind == "image":
        if part.get("image") is None:
            raise MediaError(f"{name}: an image part needs an 'image' field (path, bytes, array or PIL image)")
        return Media("image", load_image(part["image"], cfg.image, name), name), None
    if kind == "audio":
        if part.get("audio") is None:
            raise MediaError(f"{name}: an audio part needs an 'audio' field (WAV path or bytes, or an array)")
        return Media("audio", load_audio(part["audio"], cfg.audio, part.get("sample_rate"), name), name), None
    src = part.get("path", part.get("dicom"))
    if src is None:
        raise MediaError(f"{name}: a dicom part needs a 'path' field")
    image, summary = load_dicom(src, cfg.image, name, part.get("frame"))
    return Media("image", image, name), summary


def encode_media_chat(vl: VisionAudioLM, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                      thinking: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> MediaPrompt:
    """Messages with content parts -> MediaPrompt. Text parts are joined; each user message's media go after its
    <｜User｜> tag in part order. ``tools``: OpenAI function tools, rendered by the chat template."""
    plain, turns, media, dicom = [], [], [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            plain.append(dict(message))
            if message.get("role") == "user":
                turns.append([])
            continue
        texts, kinds = [], []
        for j, part in enumerate(content):
            name = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind in MEDIA_PART_TYPES:
                if message.get("role") != "user":
                    raise MediaError(f"{name}: only user messages may carry media, not {message.get('role')!r}")
                item, summary = decode_part(vl, part, name)
                media.append(item)
                kinds.append(item.kind)
                if summary is not None:
                    dicom.append(summary)
            else:
                raise MediaError(f"{name}: unknown content part type {kind!r} (text, {', '.join(MEDIA_PART_TYPES)})")
        plain.append({**message, "content": "".join(texts)})
        if message.get("role") == "user":
            turns.append(kinds)
    ids = tokenizer.encode_chat(plain, add_generation_prompt=True, thinking=thinking, tools=tools)
    counts = {k: vl.num_tokens(k) for k in {m.kind for m in media}}
    ids, _ = insert_placeholders(ids, [0] * len(ids), turns, tokenizer, counts)
    return MediaPrompt(ids, media, dicom)


def prompt_embeddings(vl: VisionAudioLM, prompt: MediaPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's input embeddings (T, C) with its media merged (exactly as generate_with_media's prefill) and
    the gate's weights (M,) over MODALITIES: what the paged engine takes as ``prompt_embeds``."""
    with torch.inference_mode():
        device = vl.lm.embed_tokens.weight.device
        embeds, weights = vl.embed(torch.tensor([prompt.ids], device=device), [list(prompt.media)])
    return embeds[0], weights[0]


def generate_with_media(vl: VisionAudioLM, prompts: Sequence[MediaPrompt], params: SamplingParams,
                        stop_ids: Sequence[int] = ()) -> tuple[list[list[int]], torch.Tensor]:
    """Generate for each prompt -> (new token ids per prompt, gate weights (B, M) over MODALITIES)."""
    box: dict[str, torch.Tensor] = {}

    def embed(ids: torch.Tensor) -> torch.Tensor:  # (B, T) left-padded -> (B, T, C)
        embeds, box["weights"] = vl.embed(ids, [list(p.media) for p in prompts])
        return embeds

    rows: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(vl.lm, [p.ids for p in prompts], params, stop_ids, embed_prompt=embed):
        for b, token in enumerate(step):
            if token is not None:
                rows[b].append(token)
    return rows, box["weights"]


def weights_dict(weights: torch.Tensor) -> dict[str, float]:
    """One row of gate weights as {"text": w, "image": w, "audio": w}."""
    return {m: round(float(w), 4) for m, w in zip(MODALITIES, weights.tolist(), strict=True)}
