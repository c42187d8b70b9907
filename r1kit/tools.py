"""Tool calling: OpenAI tool schemas and tool_choice checked, and the tool-call text of a model parsed into calls.

    tools = check_tools(request["tools"])                         # ToolError naming the field (HTTP 400)
    choice = check_tool_choice(request.get("tool_choice"), tools)   # "auto" | "none" | "required" | a name
    fmt = tool_format(tokenizer)                                    # "deepseek" | "hermes" | "llama3"
    content, calls = parse_tool_calls(text, fmt, tools)             # calls: [ToolCall(id, name, arguments)]
    parser = ToolCallParser(tokenizer, tools, choice, stop_ids)
    parser.parse(token_ids)                                           # the same from a completion's ids
    parser.constraint()       # "required" / a name: the grammar (SamplingParams.structured) that forces a call

"required" and a named tool_choice are enforced while decoding: the answer (after ``</think>`` for a reasoning
model) is constrained by r1kit.structured to one or more well-formed calls in the model's format whose arguments
follow each tool's parameter schema (one call of the named function for a named choice; Llama-3: one call).

Formats (what the model writes after the chat template rendered the tools):
  deepseek  ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}
            \\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`` (DeepSeek-R1 / V3; V3.1's
            ``NAME<｜tool▁sep｜>{...}`` too)
  hermes    ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` (Qwen2/2.5/3, Hermes)
  llama3    the whole answer is ``{"name": NAME, "parameters": {...}}`` (optionally after ``<|python_tag|>``,
            several separated by ``;``)
A call whose JSON does not parse, names no offered tool or whose arguments are not a JSON object is not a call:
the text stays content. Arguments are returned as a JSON string (OpenAI's form), re-serialized from the parse.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_FORMATS = ("deepseek", "hermes", "llama3")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


class ToolError(ValueError):
    """An invalid tool schema or tool_choice; ``param`` names the request field (``tools[1].function.name``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    """One call the model made: OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``."""

    name: str
    arguments: str  # a JSON object, as text
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI's message field (with ``index`` for a streamed delta)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


# ---------------------------------------------------------------------------------------------------- checks
def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools``: a list of ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``
    whose names are unique and match ``[A-Za-z0-9_-]{1,64}`` and whose parameters are a valid JSON Schema object
    schema; ToolError naming the first bad field."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolError(f"{where}: must be an object with type 'function'", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function: must be an object with a name", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name = {name!r}: must match [A-Za-z0-9_-]{{1,64}}",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name = {name!r}: a second tool of that name", f"{where}.function.name")
        seen.add(name)
        if not isinstance(function.get("description", ""), str):
            raise ToolError(f"{where}.function.description: must be a string", f"{where}.function.description")
        _check_parameters(function.get("parameters"), f"{where}.function.parameters")
    return [dict(tool) for tool in tools]


def _check_parameters(schema: Any, where: str) -> None:
    if schema is None:
        return
    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        raise ToolError(f"{where}: must be a JSON Schema of type 'object'", where)
    try:
        import jsonschema
    except ImportError:  # without jsonschema only the shape above is checked
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        path = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err.path)
        raise ToolError(f"{where}{path}: not a valid JSON Schema: {err.message}", where) from None


def check_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> str:
    """``tool_choice`` as "auto", "none", "required" or the name of the function that must be called
    (``{"type": "function", "function": {"name": ...}}``); default "auto" with tools, "none" without. ToolError
    for another value or a name that is not among the tools."""
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:
        return "auto" if names else "none"
    if choice in ("auto", "none", "required"):
        if choice != "none" and not names:
            raise ToolError(f"tool_choice = {choice!r} needs tools", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError(f"tool_choice = {choice!r:.80}: expected 'auto', 'none', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in names:
        raise ToolError(f"tool_choice names function {name!r}, which is not among the tools ({', '.join(names)})",
                        "tool_choice.function.name")
    return name


# ---------------------------------------------------------------------------------------------------- formats
def tool_format(tokenizer: Any) -> str:
    """The tool-call format of a `r1kit.tokenizer.Tokenizer`'s chat format: the markers its template writes
    (DeepSeek's, Hermes' ``<tool_call>``), else, without a template, those in its vocabulary; else Llama-3 JSON."""
    text = tokenizer.chat_template.source if tokenizer.chat_template is not None else ""
    markers = {"deepseek": "<｜tool▁calls▁begin｜>", "hermes": "<tool_call>"}
    for fmt, marker in markers.items():
        if marker.removesuffix("｜>").removeprefix("<｜") in text:
            return fmt
    for fmt, marker in markers.items():
        if not text and tokenizer.token_to_id(marker) is not None:
            return fmt
    return "llama3"


class ToolCallParser:
    """Finds the tool calls of one request's completion: built per request from the tokenizer, the checked tools
    and tool_choice. A named tool_choice counts calls of that function only. Parses the completion's token ids
    decoded with the special tokens kept (tool-call markers often are special), after the reasoning."""

    def __init__(self, tokenizer: Any, tools: Sequence[Mapping[str, Any]], choice: str, stop_ids: Sequence[int] = ()):
        """``choice`` from :func:`check_tool_choice` ("none": no parsing)."""
        self.tokenizer, self.choice, self.stop_ids = tokenizer, choice, set(stop_ids)
        self.offered = list(tools)  # what the template renders (all tools, whatever the choice)
        self.format = tool_format(tokenizer)
        named = choice not in ("auto", "required", "none")
        self.tools = [t for t in tools if not named or t["function"]["name"] == choice]

    def parse(self, token_ids: Sequence[int], thinking: bool = True) -> tuple[str, list[ToolCall]] | None:
        """(content without the calls, calls) when the completion made calls, else None."""
        if self.choice == "none" or not self.tools:
            return None
        raw = self.tokenizer.decode([t for t in token_ids if t not in self.stop_ids])
        _, content = self.tokenizer.split_reasoning(raw, thinking)
        text, calls = parse_tool_calls(content, self.format, self.tools)
        return (text, calls) if calls else None

    def constraint(self) -> dict[str, Any] | None:
        """The grammar spec (``{"type": "grammar", "grammar": lark}``, r1kit.structured) that makes the answer a
        call when tool_choice is "required" or names a function; None for "auto" and "none"."""
        if self.choice in ("auto", "none") or not self.tools:
            return None
        return {"type": "grammar", "grammar": tool_call_grammar(self.tokenizer, self.format, self.tools,
                                                                several=self.choice == "required")}


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>\s*(?:(?P<type>\w+)<｜tool▁sep｜>(?P<name>[^\n<]+)\s*```(?:json)?\s*"
                            r"(?P<args>.*?)\s*```|(?P<name2>[^\n<]+?)<｜tool▁sep｜>(?P<args2>.*?))\s*<｜tool▁call▁end｜>",
                            re.DOTALL)
_DEEPSEEK_BLOCK = re.compile(r"<｜tool▁calls▁begin｜>.*?(?:<｜tool▁calls▁end｜>|$)", re.DOTALL)
_HERMES_CALL = re.compile(r"<tool_call>\s*(?P<body>.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, fmt: str, tools: Sequence[Mapping[str, Any]]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a model's answer in format ``fmt`` (see the module doc): the calls' text removed from
    the content. Nothing is a call unless all of the answer's calls are well-formed calls of offered tools."""
    names = {t["function"]["name"] for t in tools}
    if fmt == "deepseek":
        block = _DEEPSEEK_BLOCK.search(text)
        if block is None:
            return text, []
        found = [(m["name"] or m["name2"], m["args"] if m["name"] else m["args2"])
                 for m in _DEEPSEEK_CALL.finditer(block.group())]
        rest = text[:block.start()] + text[block.end():]
    elif fmt == "hermes":
        found = [_name_and_args(m["body"]) for m in _HERMES_CALL.finditer(text)]
        rest = _HERMES_CALL.sub("", text)
    elif fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        found = [_name_and_args(part) for part in body.split(";")]
        rest = ""
    else:
        raise ValueError(f"tool format {fmt!r}: expected one of {TOOL_FORMATS}")
    calls = [_call(name, args, names) for name, args in found]
    if not calls or any(c is None for c in calls):
        return text, []
    return rest.strip(), calls


def _name_and_args(body: str) -> tuple[str | None, Any]:
    """(name, arguments) of a JSON call object ``{"name", "arguments" | "parameters"}``; (None, None) if not one."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    return obj.get("name"), obj.get("arguments", obj.get("parameters"))


def _call(name: Any, args: Any, names: set[str]) -> ToolCall | None:
    """A ToolCall when ``name`` is an offered tool and ``args`` a JSON object (or its text), else None."""
    if not isinstance(name, str) or name.strip() not in names:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(name.strip(), json.dumps(args, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------- grammar
def tool_call_grammar(tokenizer: Any, fmt: str, tools: Sequence[Mapping[str, Any]], several: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) of the answer that is only tool calls in format ``fmt``: each a call
    of one of ``tools`` whose arguments follow its parameter schema, compact JSON (``", "`` and ``": "``). A
    marker that is one token of ``tokenizer`` is that token (special tokens cannot be spelled); ``several``: one
    or more calls, else exactly one."""
    def marker(text: str) -> str:
        token = tokenizer.token_to_id(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    more = '("\\n" call)*' if several else ""
    if fmt == "deepseek":
        rules = [f'start: {marker("<｜tool▁calls▁begin｜>")} call {more} {marker("<｜tool▁calls▁end｜>")}',
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            head = json.dumps(tool["function"]["name"] + "\n```json\n")
            args = json.dumps({**_arguments_schema(tool), **_COMPACT})
            rules += [f'call_{i}: {marker("<｜tool▁call▁begin｜>")} "function" {marker("<｜tool▁sep｜>")} {head} '
                      f'args_{i} "\\n```" {marker("<｜tool▁call▁end｜>")}', f"args_{i}: %json {args}"]
        return "\n".join(rules) + "\n"
    key = "parameters" if fmt == "llama3" else "arguments"
    body = "body: %json " + json.dumps({"anyOf": [{
        "type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: _arguments_schema(t)},
        "required": ["name", key], "additionalProperties": False} for t in tools], **_COMPACT})
    if fmt == "llama3":
        return f"start: body\n{body}\n"
    if fmt == "hermes":
        return (f"start: call {more}\n"
                f'call: {marker("<tool_call>")} "\\n" body "\\n" {marker("</tool_call>")}\n{body}\n')
    raise ValueError(f"tool format {fmt!r}: expected one of {TOOL_FORMATS}")


_COMPACT = {"x-guidance": {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}}


def _arguments_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's parameter schema (an object without properties when it declares none)."""
    return dict(tool["function"].get("parameters") or {"type": "object", "properties": {},
                                                       "additionalProperties": False})


# ---------------------------------------------------------------------------------------------------- calculator
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """The built-in ``calculator`` tool: an arithmetic expression's value as text (numbers, + - * / // % **,
    parentheses; exponents up to 100); "error: ..." for anything else. Never evaluates Python."""
    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 100:
                raise ValueError("exponent above 100")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    try:
        if not isinstance(expression, str) or len(expression) > 200:
            raise ValueError("expression must be a string of at most 200 characters")
        result = value(ast.parse(expression.replace("×", "*").replace("^", "**"), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as err:
        return f"error: {err}"
    return str(int(result)) if isinstance(result, float) and result.is_integer() else str(result)


BUILTIN_TOOLS = {"calculator": calculator}  # `r1kit chat --tools NAME`; their schemas: r1kit.agent.BUILTIN_SCHEMAS
