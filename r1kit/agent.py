"""The agent loop: the model answers with the tools offered; the calls it makes are run and their results fed back
as ``tool`` messages, until it answers without a call or the step limit is reached.

    from r1kit import agent
    from r1kit.tools import calculator
    result = agent.run(model, [{"role": "user", "content": "What is 123*456?"}], tools={"calculator": calculator})
    result.reply.content, result.messages, result.steps, result.stopped     # stopped: "answer" | "max_steps"

Tool schemas: ``schemas=[...]`` (OpenAI's form), else the built-in one of a known tool (``calculator``), else one
derived from the function's signature (str/int/float/bool/list/dict parameters; those without a default are
required) and its docstring's first line. A tool that raises returns ``"error: ..."`` to the model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r1kit.tools import CALCULATOR, ToolCall, ToolError, check_tools

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
BUILTIN_SCHEMAS = {"calculator": CALCULATOR}


@dataclass
class AgentResult:
    """What :func:`run` ends with: the last reply, the whole conversation (calls and tool results included), the
    number of model turns, and why it stopped."""

    reply: Any  # r1kit.api.ChatReply
    messages: list[dict[str, Any]]
    steps: int
    stopped: str  # "answer": a reply without tool calls; "max_steps": the limit was reached


def function_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    """An OpenAI tool schema for ``fn`` from its signature and docstring (see the module doc)."""
    params, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if not isinstance(p.annotation, str) else {
            t.__name__: t for t in _JSON_TYPES}.get(p.annotation)
        params[p.name] = {"type": _JSON_TYPES.get(annotation, "string")}
        if p.default is p.empty:
            required.append(p.name)
    doc = (inspect.getdoc(fn) or name).splitlines()[0]
    return {"type": "function", "function": {"name": name, "description": doc, "parameters": {
        "type": "object", "properties": params, "required": required}}}


def run(model: Any, messages: Sequence[Mapping[str, Any]], tools: Mapping[str, Callable[..., Any]], *,
        schemas: Sequence[Mapping[str, Any]] | None = None, max_steps: int = 8, **chat: Any) -> AgentResult:
    """Chat with ``model`` (an `r1kit.api.R1Model`, or anything with its ``chat(messages, tools=...)``), running
    the calls it makes with ``tools`` ({name: function}) for at most ``max_steps`` model turns. ``chat``: the
    keywords of ``model.chat`` (sampling, thinking, tool_choice)."""
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps = {max_steps!r}: must be an int >= 1")
    offered = check_tools(list(schemas) if schemas is not None else [
        BUILTIN_SCHEMAS.get(name) or function_schema(name, fn) for name, fn in tools.items()])
    missing = [t["function"]["name"] for t in offered if t["function"]["name"] not in tools]
    if missing:
        raise ToolError(f"schemas name tools without a function: {', '.join(missing)}", "tools")
    conversation = [dict(m) for m in messages]
    for step in range(1, max_steps + 1):
        reply = model.chat(conversation, tools=offered, **chat)
        if advance(conversation, reply, tools):
            return AgentResult(reply, conversation, step, "answer")
    return AgentResult(reply, conversation, max_steps, "max_steps")


def advance(conversation: list[dict[str, Any]], reply: Any, tools: Mapping[str, Callable[..., Any]]) -> bool:
    """One model turn of the loop: append ``reply`` (its ``content`` and ``tool_calls``) to ``conversation`` and,
    for calls, run them and append their results as ``tool`` messages. True when the reply made no call (the
    answer). A batched evaluation (r1kit.eval.tool_use) drives many conversations through it in lockstep."""
    if not reply.tool_calls:
        conversation.append({"role": "assistant", "content": reply.content})
        return True
    conversation.append({"role": "assistant", "content": None,
                         "tool_calls": [call.to_openai() for call in reply.tool_calls]})
    conversation += [{"role": "tool", "tool_call_id": call.id, "content": _call(tools, call)}
                     for call in reply.tool_calls]
    return False


def _call(tools: Mapping[str, Callable[..., Any]], call: ToolCall) -> str:
    """Run one call; its result as text (JSON for what is not a string), or "error: ..." when it raises."""
    try:
        result = tools[call.name](**json.loads(call.arguments))
    except Exception as err:  # noqa: BLE001 - the model reads the error and may try again
        return f"error: {type(err).__name__}: {err}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
