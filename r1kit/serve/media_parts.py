"""OpenAI content parts with media, for the servers: decoded, checked and turned into a prompt the engine runs.

A chat request's user message may carry, beside ``{"type": "text", "text": ...}`` parts:

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}      PNG or JPEG, base64 in a data: URL
    {"type": "input_audio", "input_audio": {"data": BASE64_WAV, "format": "wav"}}  PCM WAV, base64

The server never fetches: an http(s) URL is refused. ``prepare_media_chat`` turns such messages into a
`MediaRequest`: the prompt's token ids (placeholders expanded, `r1kit.multimodal.chat.encode_media_chat`), its
input embeddings with the media merged (`prompt_embeddings`, the same computation as `R1Model.chat`'s prefill)
for `EngineService.submit(prompt_embeds=...)`, the modality gate's weights and the user text for the safety
shield. Every error is a `MediaPartError` with the HTTP status (400, or 413 for a too large attachment) and the
part it is about (``messages[0].content[1]``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r1kit.multimodal.chat import encode_media_chat, prompt_embeddings, weights_dict
from r1kit.multimodal.media import MediaTooLargeError
from r1kit.multimodal.model import MediaError, MissingEncoderError
from r1kit.multimodal.prompt import user_texts

MEDIA_PART_TYPES = ("image_url", "input_audio")  # OpenAI's names; r1kit's own (image, audio, dicom) are not served
MAX_ATTACHMENTS = 8  # attachments per request
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg")
AUDIO_FORMATS = ("wav",)
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


class MediaPartError(ValueError):
    """A media part the server refuses: ``status`` (400, 413), ``param`` (messages.0.content.1...), ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class MediaRequest:
    """A chat with media, ready for EngineService.submit: ids (T,), embeds (T, C), gate weights, user texts."""

    ids: list[int]
    embeds: torch.Tensor
    modality_weights: dict[str, float]
    user_texts: list[str]  # what the safety shield screens (the text parts of the user messages)
    num_attachments: int


def has_media_parts(messages: Sequence[Any]) -> bool:
    """Whether any message's content is a list with a part that is not text (a media part, or one to refuse)."""
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if isinstance(content, list) and any(_part_type(p) != "text" for p in content):
            return True
    return False


def _part_type(part: Any) -> Any:
    return part.get("type") if isinstance(part, Mapping) else getattr(part, "type", None)


def _param(i: int, j: int, *field: str) -> str:
    return ".".join(["messages", str(i), "content", str(j), *field])


# ---------------------------------------------------------------------------------------------------- decoding
def _b64(data: Any, where: str, param: str) -> bytes:
    """Strict base64 -> bytes; a clear error for anything else."""
    if not isinstance(data, str) or not data:
        raise MediaPartError(f"{where}: expected a non-empty base64 string", param)
    try:
        return base64.b64decode(re.sub(r"\s+", "", data), validate=True)
    except (binascii.Error, ValueError):
        raise MediaPartError(f"{where}: not valid base64", param) from None


def image_bytes(image_url: Any, where: str, param: str) -> bytes:
    """The PNG/JPEG bytes of an ``image_url`` field ({"url": "data:image/png;base64,..."} or the URL string)."""
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str) or not url:
        raise MediaPartError(f"{where}.image_url.url: expected a data: URL string", f"{param}.image_url.url")
    if re.match(r"(?i)(https?|ftp|file)://", url):
        raise MediaPartError(f"{where}.image_url.url: this server does not fetch URLs ({url[:40]!r}); send the "
                             "image inline as data:image/png;base64,... or data:image/jpeg;base64,...",
                             f"{param}.image_url.url", code="url_not_allowed")
    found = _DATA_URL.fullmatch(url)
    if found is None:
        raise MediaPartError(f"{where}.image_url.url: expected a base64 data: URL (data:image/png;base64,...), got "
                             f"{url[:40]!r}", f"{param}.image_url.url")
    mime = (found["mime"] or "").lower()
    if mime not in IMAGE_MIME_TYPES:
        raise MediaPartError(f"{where}.image_url.url: unsupported image type {mime or 'none'!r} (PNG or JPEG: "
                             "image/png, image/jpeg)", f"{param}.image_url.url", code="unsupported_media_type")
    return _b64(found["data"], f"{where}.image_url.url", f"{param}.image_url.url")


def audio_bytes(input_audio: Any, where: str, param: str) -> bytes:
    """The WAV bytes of an ``input_audio`` field ({"data": BASE64, "format": "wav"})."""
    if not isinstance(input_audio, Mapping):
        raise MediaPartError(f"{where}.input_audio: expected an object {{'data': BASE64_WAV, 'format': 'wav'}}",
                             f"{param}.input_audio")
    fmt = input_audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise MediaPartError(f"{where}.input_audio.format: {fmt!r} is not supported (this server reads 'wav')",
                             f"{param}.input_audio.format", code="unsupported_media_type")
    return _b64(input_audio.get("data"), f"{where}.input_audio.data", f"{param}.input_audio.data")


def to_media_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> r1kit's media chat messages (image_url -> {"type": "image", "image": bytes},
    input_audio -> {"type": "audio", "audio": bytes}; ``developer`` as ``system``)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if not isinstance(content, list):
            out.append({**message, "role": role, "content": "" if content is None else content})
            continue
        parts = []
        for j, part in enumerate(content):
            where, param = f"messages[{i}].content[{j}]", _param(i, j)
            kind = _part_type(part)
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise MediaPartError(f"{where}: a text part needs a 'text' string", f"{param}.text")
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in MEDIA_PART_TYPES:
                raise MediaPartError(f"{where}: unknown content part type {kind!r} (text, image_url, input_audio)",
                                     f"{param}.type", code="unsupported_content")
            if role != "user":
                raise MediaPartError(f"{where}: only user messages may carry media, not {role!r}", f"{param}.type")
            parts.append({"type": "image", "image": image_bytes(part.get("image_url"), where, param)}
                         if kind == "image_url" else
                         {"type": "audio", "audio": audio_bytes(part.get("input_audio"), where, param)})
        out.append({**message, "role": role, "content": parts})
    return out


# ---------------------------------------------------------------------------------------------------- the prompt
def prepare_media_chat(model: Any, messages: Sequence[Mapping[str, Any]], thinking: bool = True,
                       tools: Sequence[Mapping[str, Any]] | None = None) -> MediaRequest:
    """OpenAI messages with media parts -> MediaRequest for ``model`` (an R1Model with encoders); see media_chat."""
    return media_chat(model, to_media_messages(messages), thinking, tools)


def media_chat(model: Any, messages: Sequence[Mapping[str, Any]], thinking: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> MediaRequest:
    """r1kit's media chat messages (parts {"type": "image", "image": BYTES}, {"type": "audio", "audio": BYTES},
    text) -> MediaRequest; MediaPartError naming the part for more than MAX_ATTACHMENTS, a bad, too large or
    unreadable attachment, a modality the model has no encoder for, or a prompt beyond the context."""
    converted = list(messages)
    found = [(i, j) for i, m in enumerate(converted) if isinstance(m.get("content"), list)
             for j, p in enumerate(m["content"]) if _part_type(p) != "text"]
    count = len(found)
    if count > MAX_ATTACHMENTS:
        i, j = found[MAX_ATTACHMENTS]
        raise MediaPartError(f"messages[{i}].content[{j}]: more than {MAX_ATTACHMENTS} attachments in one request "
                             f"(this server accepts up to {MAX_ATTACHMENTS})", _param(i, j),
                             code="too_many_attachments")
    vl = getattr(model, "multimodal", None)
    if vl is None:
        i, j = found[0] if found else (0, 0)
        kind = _part_type(converted[i]["content"][j]) if found else "media"
        raise MediaPartError(f"messages[{i}].content[{j}]: this model reads text only (it has no image or audio "
                             f"encoder), so it cannot read this {kind} part", _param(i, j, "type"),
                             code="unsupported_content")
    try:
        prompt = encode_media_chat(vl, model.tokenizer, converted, thinking, tools)
    except MissingEncoderError as e:
        raise MediaPartError(str(e), _named_param(str(e)), code="unsupported_content") from None
    except MediaTooLargeError as e:
        raise MediaPartError(str(e), _named_param(str(e)), status=413, code="media_too_large") from None
    except MediaError as e:
        raise MediaPartError(str(e), _named_param(str(e))) from None
    context = model.config.max_position_embeddings
    if len(prompt.ids) >= context:
        raise MediaPartError(f"messages: the prompt with its {count} attachment(s) is {len(prompt.ids)} tokens, the "
                             f"model's context is {context}", "messages", code="context_length_exceeded")
    embeds, weights = prompt_embeddings(vl, prompt)
    return MediaRequest(prompt.ids, embeds, weights_dict(weights), user_texts(converted), count)


def _named_param(message: str) -> str | None:
    """messages.I.content.J of an error message that starts with messages[I].content[J]."""
    found = re.match(r"messages\[(\d+)\]\.content\[(\d+)\]", message)
    return _param(int(found[1]), int(found[2])) if found else None
