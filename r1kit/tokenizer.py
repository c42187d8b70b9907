"""Tokenizer wrapper, DeepSeek-R1 chat template and reasoning parsing.

r1kit reads tokenizers in the Hugging Face "fast tokenizer" format (``tokenizer.json``, plus an optional
``tokenizer_config.json`` for the bos/eos/pad tokens) through the ``tokenizers`` library. The R1 chat template
is implemented in Python rather than by executing the Jinja ``chat_template`` of the config, and
:meth:`Tokenizer.encode_chat` reads message contents as plain text: only the template's own markers become
control tokens, whatever a message says.

Reasoning models emit ``<think>reasoning</think>answer``; :func:`split_reasoning` splits a whole completion
and :class:`ReasoningStreamParser` does the same incrementally while it is generated. :func:`fit_messages`
drops the oldest turns of a conversation that no longer fits the context.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from r1kit.chat_template import ChatTemplate, ChatTemplateError, load_chat_template

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# DeepSeek's special tokens use fullwidth vertical bars (U+FF5C) and U+2581 ("▁") instead of spaces.
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
DEEPSEEK_PAD = "<｜▁pad▁｜>"
USER_TAG = "<｜User｜>"
ASSISTANT_TAG = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Media placeholders (r1kit.multimodal): DeepSeek's image token, and an audio one in the same style; each is
# expanded to the encoder's number of embeddings, which replace it in the input sequence.
IMAGE_TOKEN = "<｜image｜>"
AUDIO_TOKEN = "<｜audio｜>"

DEEPSEEK_SPECIAL_TOKENS = [
    DEEPSEEK_BOS, DEEPSEEK_EOS, USER_TAG, ASSISTANT_TAG, THINK_OPEN, THINK_CLOSE, DEEPSEEK_PAD
]  # fmt: skip
# Added tokens that are never split but otherwise plain text (decode keeps them even when skipping specials).
NON_SPECIAL_ADDED_TOKENS = frozenset({THINK_OPEN, THINK_CLOSE})

# Tokens that end a turn in common chat formats; those present in a vocabulary are generation stop tokens.
END_OF_TURN_TOKENS = (
    DEEPSEEK_EOS, "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>"
)  # fmt: skip

CHAT_ROLES = ("system", "user", "assistant")

# Jinja equivalent of Tokenizer.apply_chat_template, written into the tokenizer_config.json of trained
# tokenizers so that transformers / vLLM render the same prompts (they tokenize the rendered text, so there a
# control token written in a message is not escaped as encode_chat does). r1kit itself never executes it.
_JINJA_ASSISTANT_TURN = (
    f"'{ASSISTANT_TAG}' + message['content'].split('{THINK_CLOSE}')[-1] + '{DEEPSEEK_EOS}'"
)
DEEPSEEK_R1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_prompt='', first=true) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system_prompt = message['content'] -%}{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{- bos_token | default('', true) -}}{{- ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '" + USER_TAG + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- " + _JINJA_ASSISTANT_TURN + " -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TAG + THINK_OPEN + "\\n' -}}"
    "{%- if thinking is defined and not thinking -%}{{- '\\n" + THINK_CLOSE + "\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# The R1 template plus a tool section in Hermes' text format, for a vocabulary without DeepSeek's tool tokens
# (r1kit/nano): the offered tools as JSON lines in ``<tools>...</tools>`` after the system prompt, an assistant's
# calls as ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`` after its answer text, and a tool
# result as a user turn ``<tool_response>\n...\n</tool_response>``. Without tools it renders what the R1 template
# renders. r1kit.tools parses the calls (format "hermes").
DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE = (
    DEEPSEEK_R1_CHAT_TEMPLATE.split("{{- bos_token")[0]
    + "{%- if tools -%}{%- set ns.system_prompt = ns.system_prompt + ('' if ns.first else '\\n\\n') + '<tools>' -%}"
    "{%- for tool in tools -%}{%- set ns.system_prompt = ns.system_prompt + '\\n' + (tool | tojson) -%}{%- endfor -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '\\n</tools>' -%}{%- endif -%}"
    "{{- bos_token | default('', true) -}}{{- ns.system_prompt -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '" + USER_TAG + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '" + ASSISTANT_TAG + "' -}}"
    "{%- if message['content'] is string -%}{{- message['content'].split('" + THINK_CLOSE + "')[-1] -}}{%- endif -%}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}{%- for call in message['tool_calls'] -%}"
    "{%- set f = call['function'] -%}{{- ('' if loop.first else '\\n') + '<tool_call>\\n{\"name\": \"' + f['name']"
    " + '\", \"arguments\": ' + (f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson))"
    " + '}\\n</tool_call>' -}}{%- endfor -%}{%- endif -%}{{- '" + DEEPSEEK_EOS + "' -}}"
    "{%- elif message['role'] == 'tool' -%}{{- '" + USER_TAG + "<tool_response>\\n' + message['content']"
    " + '\\n</tool_response>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TAG + THINK_OPEN + "\\n' -}}"
    "{%- if thinking is defined and not thinking -%}{{- '\\n" + THINK_CLOSE + "\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class TokenizerError(ValueError):
    """Bad tokenizer files, tokenizer settings or chat messages."""


class ContextFullError(TokenizerError):
    """A conversation whose newest turn does not fit the context even with every older turn dropped."""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the bos/eos/pad settings of ``tokenizer_config.json``.

    ``encode`` never adds special tokens on its own (only bos, when asked); special tokens written literally
    in the text are recognised as single ids.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        config: Mapping[str, Any] | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        """Wrap ``backend``; every given token must be in its vocabulary.

        ``add_bos_token`` is the config's hint that plain-text (non-chat) inputs should start with bos;
        ``config`` holds the other ``tokenizer_config.json`` fields, kept only to be written back by
        :meth:`save`. ``chat_template``: the checkpoint's own Jinja template (`r1kit.chat_template`); None: the
        built-in DeepSeek-R1 format.
        """
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.add_bos_token = add_bos_token
        self._config = dict(config or {})
        self.chat_template = chat_template
        self.bos_id = self._require_id("bos_token", bos_token)
        self.eos_id = self._require_id("eos_token", eos_token)
        self.pad_id = self._require_id("pad_token", pad_token)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        stop_ids = [self.eos_id] + [backend.token_to_id(token) for token in END_OF_TURN_TOKENS]
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in stop_ids if i is not None))

    def _require_id(self, field: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{field} {token!r} is not in the tokenizer vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``path/tokenizer.json`` and, if present, ``path/tokenizer_config.json``."""
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            hint = f" (found: {', '.join(found)})" if found else ""
            raise TokenizerError(
                f"{tokenizer_file} not found{hint}: r1kit needs tokenizer.json (Hugging Face fast-tokenizer "
                "format); convert other formats with transformers' AutoTokenizer.from_pretrained(dir)"
                ".save_pretrained(dir)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust side raises a bare Exception for any parse error
            raise TokenizerError(f"{tokenizer_file}: not a valid tokenizers tokenizer.json: {err}") from err

        config_file = path / TOKENIZER_CONFIG_FILE
        config = _read_config(config_file) if config_file.is_file() else {}
        add_bos_token = config.get("add_bos_token", False)
        if not isinstance(add_bos_token, bool):
            raise TokenizerError(
                f"{config_file}: field 'add_bos_token' must be true or false, got {add_bos_token!r}"
            )
        fields = ("bos_token", "eos_token", "pad_token")
        tokens = {field: _token_content(config, field, config_file) for field in fields}
        try:
            template = load_chat_template(path, config)
        except ChatTemplateError as err:
            raise TokenizerError(str(err)) from None
        if template is not None and template.source == DEEPSEEK_R1_CHAT_TEMPLATE:
            template = None  # r1kit's own template: the built-in renders the same text and escapes message text
        try:
            return cls(backend, **tokens, add_bos_token=add_bos_token, config=config, chat_template=template)
        except TokenizerError as err:
            raise TokenizerError(f"{config_file}: {err}") from err

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path`` (made if absent)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / TOKENIZER_FILE))
        config = {
            **self._config,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
        }
        text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
        (path / TOKENIZER_CONFIG_FILE).write_text(text, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1), added tokens included."""
        return self._vocab_size

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest token decoded alone: a text of N characters (<= its bytes) has at least
        N / max_token_bytes tokens, a bound servers check before tokenizing megabytes."""
        return max(1, max(len(self.decode([i]).encode()) for i in range(self.vocab_size)))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` the bos id is prepended."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("encode(add_bos=True): this tokenizer has no bos_token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops special tokens (``<think>`` is not special)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` (a vocabulary entry, not text to encode), or None if it is not in the vocab."""
        return self._backend.token_to_id(token)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: an added token written in it (``<think>``, ``<｜User｜>``,
        ...) is tokenized as its characters, never as its own id."""
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """The backend without its added tokens (the same normalizer, pre-tokenizer and model)."""
        data = json.loads(self._backend.to_str())
        data["added_tokens"] = []
        return tokenizers.Tokenizer.from_str(json.dumps(data))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` with the checkpoint's own template (:attr:`chat_template`, the text transformers'
        ``apply_chat_template`` gives; ``thinking=False`` passes ``thinking`` and ``enable_thinking`` false to
        it, ``tools`` as its ``tools``), or else in DeepSeek-R1's built-in chat format, described below.

        ``{bos}{system contents joined by "\\n\\n"}``, then ``<｜User｜>{content}`` per user message and
        ``<｜Assistant｜>{content}<｜end▁of▁sentence｜>`` per assistant message, where, as in R1's template,
        everything up to the last ``</think>`` of the content is dropped. With ``add_generation_prompt`` the
        text ends with ``<｜Assistant｜><think>\\n``; when ``thinking`` is False the think block is closed
        there, empty, as DeepSeek does: ``<｜Assistant｜><think>\\n\\n</think>\\n\\n``.
        """
        if self.chat_template is not None:
            return self._render(messages, add_generation_prompt, thinking, tools)
        self._builtin_takes(tools)
        return "".join(text for text, _ in self._chat_pieces(messages, add_generation_prompt, thinking))

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        thinking: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of :meth:`apply_chat_template`: its markers (bos, ``<｜User｜>``, ``<think>``, ...) as their
        token ids, and the message contents as plain text (:meth:`encode_plain`), so that a control token
        written in a message cannot end a turn, open a reasoning block or fake a role. With a Jinja template,
        every added token written in the messages or tools is encoded as plain text (transformers'
        ``sanitize_control_tokens``), the template's own as their ids."""
        if self.chat_template is not None:
            return self._encode_rendered(messages, add_generation_prompt, thinking, tools)
        self._builtin_takes(tools)
        ids: list[int] = []
        for text, is_marker in self._chat_pieces(messages, add_generation_prompt, thinking):
            ids += self.encode(text) if is_marker else self.encode_plain(text)
        return ids

    def _render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, thinking: bool,
                tools: Sequence[Mapping[str, Any]] | None) -> str:
        """The Jinja template's text (the special tokens as its variables, as transformers passes them)."""
        variables = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                        ("pad_token", self.pad_token)) if v is not None}
        if not thinking:
            variables.update(thinking=False, enable_thinking=False)
        try:
            return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             **variables)
        except ChatTemplateError as err:
            raise TokenizerError(str(err)) from None

    def _encode_rendered(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, thinking: bool,
                         tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """encode_chat for a Jinja template: each added token in the inputs is swapped for a private-use mark
        before rendering, and the marks are encoded as the token's text read plainly."""
        controls = sorted(self._backend.get_added_tokens_decoder().values(), key=lambda t: -len(t.content))
        names = [t.content for t in controls]
        pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None

        def mark(value: Any) -> Any:
            if isinstance(value, str) and pattern is not None:
                return pattern.sub(lambda m: f"{_MARK_OPEN}{names.index(m.group())}{_MARK_CLOSE}", value)
            if isinstance(value, Mapping):
                return {k: mark(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [mark(v) for v in value]
            return value

        text = self._render(mark(list(messages)), add_generation_prompt, thinking, mark(tools))
        ids: list[int] = []
        for i, piece in enumerate(_MARKED.split(text)):  # text, token index, text, ...
            ids += self.encode(piece) if i % 2 == 0 else self.encode_plain(names[int(piece)])
        return ids

    def _builtin_takes(self, tools: Sequence[Mapping[str, Any]] | None) -> None:
        if tools:
            raise TokenizerError("tools: the built-in DeepSeek-R1 chat format has no tool section; load a checkpoint "
                                 "whose chat template renders tools, or pass one (--chat-template FILE)")

    @property
    def reasoning(self) -> str:
        """The reasoning family of the chat format: "prompt" when the generation prompt opens ``<think>``
        (DeepSeek-R1: a completion starts inside its reasoning), "model" when the template knows the think tags
        but leaves opening them to the model (Qwen3), "none" when it has none (Llama-3, Qwen2: all content)."""
        if self.chat_template is None:
            return "prompt"
        if self.chat_template.generation_prompt().rstrip().endswith(THINK_OPEN):
            return "prompt"
        return "model" if THINK_CLOSE in self.chat_template.source else "none"

    def starts_in_reasoning(self, thinking: bool = True) -> bool:
        """Whether a chat completion starts inside a think block (the generation prompt ended with ``<think>``)."""
        if self.chat_template is None:
            return thinking
        variables = {} if thinking else {"thinking": False, "enable_thinking": False}
        return self.chat_template.generation_prompt(**variables).rstrip().endswith(THINK_OPEN)

    def reasoning_parser(self, thinking: bool = True) -> ReasoningStreamParser | PlainStreamParser:
        """A new stream parser splitting this chat format's completions into (reasoning, content)."""
        if self.reasoning == "none":
            return PlainStreamParser()
        return ReasoningStreamParser(starts_in_reasoning=self.starts_in_reasoning(thinking))

    def split_reasoning(self, text: str, thinking: bool = True) -> tuple[str, str]:
        """A whole chat completion as (reasoning, content), as :meth:`reasoning_parser` splits it (without
        reasoning, the text is the content as it is)."""
        if self.reasoning == "none":
            return "", text
        return split_reasoning(text, starts_in_reasoning=self.starts_in_reasoning(thinking))

    def _chat_pieces(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, thinking: bool
    ) -> list[tuple[str, bool]]:
        """The chat prompt as ``(text, is_marker)`` pieces: the template's markers and the text between them."""
        _validate_messages(messages)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        pieces = [(self.bos_token or "", True), (system, False)]
        for message in messages:
            if message["role"] == "user":
                pieces += [(USER_TAG, True), (message["content"], False)]
            elif message["role"] == "assistant":
                answer = message["content"].split(THINK_CLOSE)[-1]
                pieces += [(ASSISTANT_TAG, True), (answer, False), (DEEPSEEK_EOS, True)]
        if add_generation_prompt:
            pieces += [(ASSISTANT_TAG, True), (THINK_OPEN, True)]
            pieces += [("\n", False)] if thinking else [("\n\n", False), (THINK_CLOSE, True), ("\n\n", False)]
        return [(text, is_marker) for text, is_marker in pieces if text]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A new :class:`StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens)


_MARK_OPEN, _MARK_CLOSE = "\U000f0000", "\U000f0001"  # private-use marks around an escaped token's index
_MARKED = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


class StreamDecoder:
    """Incremental detokenizer: feed token ids one at a time, get back only the new, complete text.

    Text is held back while the decoded tail ends with U+FFFD (an incomplete multi-byte UTF-8 character).
    Each new piece is the difference between decoding a short window of recent ids with and without the newest
    ones, which also keeps decoders that strip a leading space (SentencePiece style) correct mid-stream. The
    concatenation of all pushes and :meth:`flush` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        """Start an empty stream over ``tokenizer``."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this have been returned as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ('' while a character is still incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the held-back text (invalid UTF-8 shows as U+FFFD), ending the current stream."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class TextStream:
    """The text of one generation as its token ids arrive: incremental detokenization (`StreamDecoder`), stop
    ids, and stop strings, which are cut out of the text and held back while they may still be starting.

        stream = TextStream(tokenizer, stop=["\n\n"], stop_ids=tokenizer.stop_ids)
        text, ended = stream.push(token)           # the text this token releases; ended: a stop id or string
        text, ended = stream.push(token, last=True)  # the budget ends here: nothing is held back
    Without a tokenizer, each token shows as "<id>".
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = (), stop_ids: Collection[int] = ()):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.stop, self.stop_ids = list(stop), stop_ids
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.pending = ""  # text held back

    def push(self, token: int, last: bool = False) -> tuple[str, bool]:
        """The text released by one more token, and whether the generation ends at it (a stop id, whose own
        text is not output, or a stop string, cut out with everything after it). ``last``: the token budget
        ends here, so everything held back is released."""
        if token in self.stop_ids:
            text, ended = self.pending + self._decoded_rest(), True
        else:
            text, ended = self.pending + (self.decoder.push(token) if self.decoder else f"<{token}>"), False
            if last:
                text += self._decoded_rest()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        if ended or last:
            self.pending = ""
            return text, ended
        split = max(0, len(text) - self.hold) if self.stop else len(text)
        self.pending = text[split:]
        return text[:split], False

    def flush(self) -> str:
        """What is still held back (the budget ended without a last=True push)."""
        rest = self.pending + self._decoded_rest()
        self.pending = ""
        return rest

    def _decoded_rest(self) -> str:
        return self.decoder.flush() if self.decoder else ""


def fit_messages(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    context: int,
    min_new_tokens: int,
    thinking: bool = True,
) -> tuple[list[Mapping[str, Any]], int]:
    """The newest part of a conversation whose chat prompt leaves ``min_new_tokens`` of ``context`` to the answer.

    Policy: the system messages always stay; the others form turns (a user message and the replies after it),
    and the oldest turns are dropped, whole, until the prompt fits. Returns the messages kept (system messages
    first, which renders the same: the template joins them at the top) and the number of turns dropped.
    ContextFullError if the newest turn does not fit even alone.
    """
    _validate_messages(messages)
    system = [m for m in messages if m["role"] == "system"]
    turns = _turns([m for m in messages if m["role"] != "system"])

    def prompt(first: int) -> list[Mapping[str, Any]]:
        return system + [m for turn in turns[first:] for m in turn]

    def fits(first: int) -> bool:
        return len(tokenizer.encode_chat(prompt(first), thinking=thinking)) + min_new_tokens <= context

    last = max(len(turns) - 1, 0)
    if not fits(last):
        size = len(tokenizer.encode_chat(prompt(last), thinking=thinking))
        with_system = " with the system prompt" if system else ""
        raise ContextFullError(
            f"the newest message is too long: its chat prompt is {size} tokens{with_system}, but the context is "
            f"{context} tokens and {min_new_tokens} of them are kept for the answer"
        )
    first = bisect.bisect_left(range(last), True, key=fits)  # dropping a turn only shortens the prompt
    return prompt(first), first


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Messages grouped into turns, each starting at a user message (or at the very first message)."""
    turns: list[list[Mapping[str, Any]]] = []
    for message in messages:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


_THINK_TAG = re.compile(f"({re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)})")
_REASONING, _CONTENT = "reasoning", "content"


def split_reasoning(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """Split a reasoning model's completion into ``(reasoning, answer)``, both stripped of outer whitespace;
    neither ever holds a ``<think>`` or ``</think>`` tag.

    After a ``<think>`` the text is reasoning, after a ``</think>`` it is answer; a tag that changes nothing (a
    second ``<think>``, a stray ``</think>`` in the answer) is dropped. The text before the first tag is
    reasoning with ``starts_in_reasoning`` (the prompt opened ``<think>``, as R1's template does, so text
    without any tag is reasoning cut off by the budget); without it, it is reasoning only if the first tag is
    a ``</think>`` (a model that reasons although the prompt closed the think block) and answer otherwise.
    """
    head, *rest = _THINK_TAG.split(text)  # text before the first tag, then tag, text, tag, text, ...
    reasoning, answer = [], []
    (reasoning if starts_in_reasoning or rest[:1] == [THINK_CLOSE] else answer).append(head)
    for tag, part in zip(rest[::2], rest[1::2], strict=True):
        (reasoning if tag == THINK_OPEN else answer).append(part)
    return "".join(reasoning).strip(), "".join(answer).strip()


class PlainStreamParser:
    """The stream parser of a chat format without reasoning: every piece is content (`ReasoningStreamParser`'s
    interface)."""

    def push(self, piece: str) -> tuple[str, str]:
        """(reasoning, content) of the next piece: ("", piece)."""
        return "", piece

    def flush(self) -> tuple[str, str]:
        """Nothing is held back."""
        return "", ""


class ReasoningStreamParser:
    """Streaming :func:`split_reasoning`: push text pieces, get ``(reasoning_delta, content_delta)``.

    For any split of ``text`` into pieces, joining the deltas of all pushes and :meth:`flush` gives exactly
    ``split_reasoning(text, starts_in_reasoning)``. To that end a piece that could be the start of a tag
    (``"</thi"``) is held back until it resolves, and so is whitespace that may turn out to be at either end of
    the reasoning or of the content. Without ``starts_in_reasoning`` (the prompt closed the think block), the
    text before the first tag is reasoning if that tag is ``</think>``: nothing is released until a tag comes
    or the text ends, so content never holds reasoning that a late ``</think>`` would reveal.
    """

    def __init__(self, starts_in_reasoning: bool = True) -> None:
        """``starts_in_reasoning``: the prompt ended with ``<think>\\n`` (R1's template with thinking on)."""
        self._mode: str | None = _REASONING if starts_in_reasoning else None  # None: decided by the first tag
        self._buffer = ""  # text received but not yet released
        self._started = {_REASONING: False, _CONTENT: False}  # whether the section has released text yet
        self._space = {_REASONING: "", _CONTENT: ""}  # its trailing whitespace, held back

    def push(self, piece: str) -> tuple[str, str]:
        """Add the next piece of generated text; return the newly resolved ``(reasoning, content)`` text."""
        self._buffer += piece
        return self._process(final=False)

    def flush(self) -> tuple[str, str]:
        """Resolve everything held back at the end of the text."""
        return self._process(final=True)

    def _process(self, final: bool) -> tuple[str, str]:
        out = {_REASONING: "", _CONTENT: ""}
        while (tag := _THINK_TAG.search(self._buffer)) is not None:  # release the text before each tag
            mode = self._mode or (_REASONING if tag.group() == THINK_CLOSE else _CONTENT)
            out[mode] += self._release(mode, self._buffer[: tag.start()])
            self._buffer = self._buffer[tag.end() :]
            self._mode = _REASONING if tag.group() == THINK_OPEN else _CONTENT
        if self._mode is None and not final:  # undecided until a tag or the end
            return "", ""
        mode = self._mode or _CONTENT
        keep = 0 if final else max(_partial_tag_length(self._buffer, t) for t in (THINK_OPEN, THINK_CLOSE))
        out[mode] += self._release(mode, self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out[_REASONING], out[_CONTENT]

    def _release(self, section: str, text: str) -> str:
        """``text`` of ``section`` without the section's leading whitespace; its trailing whitespace is held
        back until more text follows (and dropped if none does)."""
        text = self._space[section] + text if self._started[section] else text.lstrip()
        kept = len(text.rstrip())
        self._space[section] = text[kept:]
        self._started[section] = self._started[section] or kept > 0
        return text[:kept]


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{config_file}: not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise TokenizerError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def _token_content(config: Mapping[str, Any], field: str, config_file: Path) -> str | None:
    """A token field of tokenizer_config.json: a string, null, or an AddedToken object with a "content"."""
    value = config.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{config_file}: field {field!r} must be a string, null or an object with a string 'content', "
        f"got {value!r}"
    )


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            roles = ", ".join(CHAT_ROLES)
            raise TokenizerError(f"messages[{index}]['role'] must be one of {roles}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{index}]['content'] must be a str, got {type(content).__name__}")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None, split_digits: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, no prefix space) on ``texts``.

    ``special_tokens`` (default :data:`DEEPSEEK_SPECIAL_TOKENS`) get the first ids, in order; ``<think>`` and
    ``</think>`` are unsplittable but not special (decode keeps them), the others are special. The DeepSeek
    bos/eos/pad tokens become the tokenizer's bos/eos/pad when listed. ``vocab_size`` counts every token; the
    result is smaller if the texts do not support that many merges. With ``split_digits`` every digit is
    pre-tokenized on its own, so numbers are always one token per digit (what arithmetic needs); the setting
    is part of ``tokenizer.json`` and decoding is unaffected.
    """
    special_tokens = list(DEEPSEEK_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(f"special_tokens has duplicates: {special_tokens}")
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
    if vocab_size < min_size:
        raise TokenizerError(
            f"vocab_size must be at least {min_size} (256 byte tokens + {len(special_tokens)} special "
            f"tokens), got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(token, normalized=False) for token in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # The trainer marks all its tokens special, and add_tokens() would not refresh the decoder's set of
    # special ids, so the flag is changed in the serialized form.
    data = json.loads(backend.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in NON_SPECIAL_ADDED_TOKENS
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))

    def listed(token: str) -> str | None:
        return token if token in special_tokens else None

    return Tokenizer(
        backend,
        bos_token=listed(DEEPSEEK_BOS),
        eos_token=listed(DEEPSEEK_EOS),
        pad_token=listed(DEEPSEEK_PAD),
        config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "chat_template": DEEPSEEK_R1_CHAT_TEMPLATE,
        },
    )
