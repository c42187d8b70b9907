"""A checkpoint's own Jinja chat template, rendered as `transformers`' ``apply_chat_template`` renders it.

    template = load_chat_template(folder, tokenizer_config)        # chat_template.jinja, else the config's field
    text = template.render(messages, tools=tools, add_generation_prompt=True, bos_token="<s>")

The template runs in jinja2's ``ImmutableSandboxedEnvironment`` with the same settings, filters and globals as
transformers (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that keeps non-ASCII text,
``raise_exception``, ``strftime_now``, a namespace that refuses ``_``-names), so the text is the same; a
template that reaches for Python internals is refused by the sandbox. Errors name the template and its line.

This module knows nothing of tokens: `r1kit.tokenizer.Tokenizer` holds a checkpoint's template, encodes its text
and derives the reasoning family from it (``Tokenizer.reasoning``).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PROBE = [{"role": "user", "content": "\ue000probe\ue000"}]  # a conversation to learn how a prompt ends


class ChatTemplateError(ValueError):
    """A chat template that cannot be read, compiled or rendered (the message names the template and line)."""


# ---------------------------------------------------------------------------------------------------- environment
class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() that refuses ``_``-prefixed attributes (no way to CPython internals), as transformers."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: no HTML escaping, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment(name: str, source: str) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                                        loader=jinja2.FunctionLoader(lambda _: (source, name, lambda: True)))
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _template_line(error: BaseException, name: str) -> int | None:
    """The template line an error was raised at (Jinja maps its frames to template lines), or None."""
    line = getattr(error, "lineno", None)
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == name:
            line = lineno
    return line


# ---------------------------------------------------------------------------------------------------- the template
class ChatTemplate:
    """A compiled Jinja chat template; ``name`` says where it came from (a file, a config field)."""

    def __init__(self, source: str, name: str = "chat_template") -> None:
        """Compile ``source``; ChatTemplateError naming ``name`` and the line for a syntax error."""
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{name}: a chat template must be a non-empty string, got {source!r:.80}")
        self.source, self.name = source, name
        try:
            self._template = _environment(name, source).get_template(name)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"{name}, line {err.lineno}: invalid Jinja: {err.message}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, documents: Sequence[Mapping[str, Any]] | None = None,
               **variables: Any) -> str:
        """The text of ``messages`` as transformers' ``apply_chat_template(..., tokenize=False)`` gives it, but for
        one difference: a key whose value is None stays (transformers 5 drops it), since DeepSeek-R1's template
        writes an assistant's tool calls only when its ``content is none``. ``variables`` (bos_token,
        eos_token, enable_thinking, ...) are passed to the template. ChatTemplateError naming the template line
        for a failed render, or a template that the sandbox refuses."""
        chat = [_message(m, i) for i, m in enumerate(_check_list(messages, "messages"))]
        try:
            return self._template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **_plain(variables))
        except jinja2.exceptions.SecurityError as err:
            line = _template_line(err, self.name)
            raise ChatTemplateError(f"{self.name}, line {line}: refused by the sandbox: {err}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            line = _template_line(err, self.name)
            raise ChatTemplateError(f"{self.name}, line {line}: cannot render these messages: "
                                    f"{type(err).__name__}: {err}") from None

    def generation_prompt(self, **variables: Any) -> str:
        """What the template writes after a conversation to prompt the assistant (the text that
        ``add_generation_prompt`` adds to a one-message conversation), "" if the render fails."""
        try:
            with_prompt = self.render(_PROBE, add_generation_prompt=True, **variables)
            without = self.render(_PROBE, add_generation_prompt=False, **variables)
        except ChatTemplateError:
            return ""
        return with_prompt.removeprefix(without)


def _check_list(value: Any, what: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ChatTemplateError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _message(message: Any, index: int) -> dict[str, Any]:
    """messages[index] as plain JSON data; it needs a string role."""
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
    if not isinstance(message.get("role"), str):
        raise ChatTemplateError(f"messages[{index}]['role'] must be a str, got {message.get('role')!r}")
    return {str(k): _plain(v) for k, v in message.items()}


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types (subclasses stripped), so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"a chat template takes JSON data only, got a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------- loading
def load_chat_template(folder: str | Path | None, config: Mapping[str, Any] | None = None,
                       override: str | Path | None = None) -> ChatTemplate | None:
    """The chat template of a checkpoint: ``override`` (a template file, ``--chat-template``), else
    ``folder/chat_template.jinja``, else ``config["chat_template"]`` (a string, or transformers' list of named
    templates, whose "default" is taken); None when there is none (r1kit's built-in R1 format applies)."""
    if override is not None:
        return _read_template(Path(override))
    if folder is not None and (Path(folder) / CHAT_TEMPLATE_FILE).is_file():
        return _read_template(Path(folder) / CHAT_TEMPLATE_FILE)
    source = (config or {}).get("chat_template")
    name = f"{Path(folder) / 'tokenizer_config.json' if folder else 'tokenizer_config.json'}: chat_template"
    if source is None:
        return None
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        if "default" not in named:
            raise ChatTemplateError(f"{name}: a list of templates needs one named 'default', got {sorted(named)}")
        return ChatTemplate(named["default"], f"{name}[default]")
    return ChatTemplate(source, name)


def _read_template(path: Path) -> ChatTemplate:
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatTemplateError(f"{path}: cannot read the chat template: {err}") from None
    if path.suffix == ".json":  # a tokenizer_config.json given as the template file
        try:
            return load_chat_template(None, json.loads(source)) or _missing(path)
        except json.JSONDecodeError as err:
            raise ChatTemplateError(f"{path}: not valid JSON: {err}") from None
    return ChatTemplate(source, str(path))


def _missing(path: Path) -> ChatTemplate:
    raise ChatTemplateError(f"{path}: has no 'chat_template' field")
