"""The gRPC front end of an EngineService: r1kit.v1.Generator, the standard health service, reflection.

    service = EngineService(R1Model.from_pretrained("r1kit/nano")); service.start()
    server = serve_grpc(service, port=50051)      # started, on its own thread pool
    ...
    server.stop(grace=5)                          # health NOT_SERVING first, then the gRPC server stops

    python -m r1kit.serve.grpc_service r1kit/nano --port 50051   # a standalone server; SIGTERM drains it

The wire format is r1kit/serve/proto/r1kit.proto. Each call is one engine request: a client that cancels (or
whose deadline passes) aborts it and frees its KV blocks. Errors are status codes whose message names the
field at fault: INVALID_ARGUMENT (bad parameter, empty prompt, prompt beyond the context), RESOURCE_EXHAUSTED
(the engine's queue is full), UNAVAILABLE (shutting down; safe to retry elsewhere), DEADLINE_EXCEEDED (the
server's per-request timeout). Every response carries the trailing metadata ``r1kit-server: HOST:PORT`` so a
client behind a load balancer can tell which replica answered.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import NamedTuple

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from r1kit.generate import SamplingParams, TokenLogprob, default_max_new_tokens
from r1kit.safety.shield import InputBlocked, Screening
from r1kit.serve.client import SERVER_METADATA_KEY, SERVICE_NAME
from r1kit.serve.engine_service import (
    DEFAULT_MAX_QUEUE,
    EngineService,
    QueueFullError,
    RequestHandle,
    ServiceClosedError,
    TextDelta,
)
from r1kit.serve.media_parts import MediaPartError, MediaRequest, media_chat
from r1kit.serve.ports import PortError, check_free, check_port
from r1kit.serve.proto import r1kit_pb2 as pb
from r1kit.serve.proto import r1kit_pb2_grpc as pb_grpc
from r1kit.tools import ToolCall, ToolCallParser, check_tool_choice, check_tools

log = logging.getLogger("r1kit.serve")

# a chat message's role -> the chat template's (developer: OpenAI's newer name for system)
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
NO_DEADLINE = 1e8  # seconds: what grpc reports as the time remaining of a call without a deadline is beyond it
MAX_REQUEST_ID_CHARS = 128  # a request_id is echoed in every streamed chunk
MAX_DETAILS_CHARS = 1000  # of a status message (it may quote a client's value): clients refuse > 16 KiB trailers
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "tool_calls": pb.FINISH_REASON_TOOL_CALLS}


class InvalidRequest(ValueError):
    """A request the server refuses as INVALID_ARGUMENT; the message names the field at fault."""


class _Prepared(NamedTuple):
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool  # split reasoning from content
    thinking: bool
    tools: ToolCallParser | None = None  # a chat with tools: its calls parsed from the answer
    prompt_embeds: torch.Tensor | None = None  # a chat with attachments: its prompt's embeddings (media merged)
    modality_weights: dict[str, float] | None = None  # ... and the modality gate's weights


# ---------------------------------------------------------------------------------------------------- requests


def _sampling_params(options: pb.SamplingOptions, default_max_new_tokens: int,
                     tools: ToolCallParser | None = None) -> SamplingParams:
    """SamplingParams from the proto's optional fields (unset: r1kit's defaults); InvalidRequest if out of range.
    ``tools``: a chat's tool parser, whose tool_choice "required" / name constrains the answer."""
    kwargs: dict = {"max_new_tokens": default_max_new_tokens, "stop": list(options.stop)}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "logprobs",
                 "prompt_logprobs"):
        if options.HasField(name):
            kwargs[name] = getattr(options, name)
    kwargs["structured"] = _structured(options)
    if tools is not None and (forced := tools.constraint()) is not None:
        if kwargs["structured"] is not None:
            raise InvalidRequest(f"chat.tool_choice = {tools.choice!r} makes the answer a tool call: it does not "
                                 "combine with sampling.json_schema / json_object / regex / choice")
        kwargs["structured"] = forced
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # GenerationError names the field and its valid range
        raise InvalidRequest(f"sampling.{e}") from None


def _structured(options: pb.SamplingOptions) -> dict | None:
    """SamplingParams.structured from json_schema / json_object / regex / choice (at most one)."""
    specs = []
    if options.json_schema:
        try:
            specs.append({"type": "json_schema", "schema": json.loads(options.json_schema)})
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"sampling.json_schema is not valid JSON: {e}") from None
    if options.json_object:
        specs.append({"type": "json_object"})
    if options.regex:
        specs.append({"type": "regex", "pattern": options.regex})
    if options.choice:
        specs.append({"type": "choice", "choices": list(options.choice)})
    if len(specs) > 1:
        raise InvalidRequest("sampling: give one of json_schema, json_object, regex and choice, not several")
    return specs[0] if specs else None


def _chat_messages(chat: pb.ChatPrompt) -> list[dict]:
    """The chat template's messages (a developer message is a system one; an assistant's tool calls and a tool
    message's call id as OpenAI writes them); InvalidRequest naming the bad field."""
    if not chat.messages:
        raise InvalidRequest("chat.messages is empty: give at least one message")
    messages = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"chat.messages[{i}].role = {m.role!r}: expected one of {', '.join(CHAT_ROLES)}")
        if not m.content and m.role != "assistant" and not m.attachments:
            raise InvalidRequest(f"chat.messages[{i}].content is empty: a {m.role} message needs text")
        message: dict = {"role": CHAT_ROLES[m.role], "content": m.content}
        if m.tool_calls:
            message.update(content=m.content or None, tool_calls=[
                ToolCall(c.name, c.arguments, c.id).to_openai() for c in m.tool_calls])
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    return messages


def _media_request(service: EngineService, chat: pb.ChatPrompt, messages: list[dict], thinking: bool,
                   tools: ToolCallParser | None) -> MediaRequest:
    """A chat with attachments (each user message's attachments, then its text) as a MediaRequest
    (r1kit.serve.media_parts); InvalidRequest naming chat.messages[i].attachments[j] for a bad one."""
    converted = []
    for i, (m, message) in enumerate(zip(chat.messages, messages, strict=True)):
        if not m.attachments:
            converted.append(message)
            continue
        if message["role"] != "user":
            raise InvalidRequest(f"chat.messages[{i}].attachments: only a user message may carry attachments")
        parts = []
        for j, a in enumerate(m.attachments):
            kind = a.WhichOneof("media")
            if kind is None:
                raise InvalidRequest(f"chat.messages[{i}].attachments[{j}]: set its image or audio bytes")
            parts.append({"type": kind, kind: a.image if kind == "image" else a.audio})
        converted.append({**message, "content": [*parts, {"type": "text", "text": m.content}]})
    try:
        return media_chat(service.model, converted, thinking, tools.offered if tools else None)
    except MediaPartError as e:  # its part index is the attachment's: the text comes after them
        raise InvalidRequest(re.sub(r"^messages\[(\d+)\]\.content\[(\d+)\]", r"chat.messages[\1].attachments[\2]",
                                    e.message)) from None


def _tool_parser(service: EngineService, chat: pb.ChatPrompt) -> ToolCallParser | None:
    """The chat's tool-call parser (None without tools); InvalidRequest naming the field of a bad tool (its
    parameters must be JSON) or tool_choice."""
    if not chat.tools and chat.tool_choice in ("", "none"):
        return None
    tools = []
    for i, t in enumerate(chat.tools):
        try:
            parameters = json.loads(t.parameters) if t.parameters else None
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"chat.tools[{i}].parameters is not valid JSON: {e}") from None
        function = {"name": t.name, **({"description": t.description} if t.description else {}),
                    **({"parameters": parameters} if parameters is not None else {})}
        tools.append({"type": "function", "function": function})  # as the HTTP API passes it to the template
    choice = chat.tool_choice or None
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    try:
        checked = check_tools(tools) if tools else []
        choice = check_tool_choice(choice, checked)
    except ValueError as e:  # ToolError: its message names the field
        raise InvalidRequest(f"chat.{e}") from None
    return ToolCallParser(service.model.tokenizer, checked, choice, service.model.stop_ids()) if checked else None


def _prepare(service: EngineService, request: pb.GenerateRequest) -> _Prepared:
    """Tokenize the prompt and build the sampling parameters, or raise InvalidRequest (ContextLengthError when
    the prompt leaves no room to generate)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("the request has no prompt: set `text` (a completion) or `chat` (messages)")
    embeds = weights = None
    if kind == "text":
        if not request.text:
            raise InvalidRequest("text is empty: give a prompt to continue")
        ids, thinking, tools = service.encode_prompt(request.text), False, None
    else:
        messages = _chat_messages(request.chat)
        thinking = request.chat.thinking if request.chat.HasField("thinking") else True
        tools = _tool_parser(service, request.chat)
        if any(m.attachments for m in request.chat.messages):
            media = _media_request(service, request.chat, messages, thinking, tools)
            ids, embeds, weights = media.ids, media.embeds, media.modality_weights
        else:
            ids = service.encode_chat(messages, thinking=thinking, tools=tools.offered if tools else None)
    default = default_max_new_tokens(len(ids), service.context_length, "chat" if kind == "chat" else "completion")
    params = _sampling_params(request.sampling, default, tools)
    return _Prepared(ids, params, kind == "chat", thinking, tools, embeds, weights)


def _screen(service: EngineService, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Screening | None:
    """The safety shield's check of the user's text (None without a shield). A blocked input raises InputBlocked,
    a ValueError (INVALID_ARGUMENT naming the category); gRPC has no refusal answer: on_block "refuse" is the same."""
    if service.shield is None:
        return None
    texts = [request.text] if request.WhichOneof("prompt") == "text" else [
        m.content for m in request.chat.messages if CHAT_ROLES.get(m.role) == "user"]
    auth = dict(context.invocation_metadata()).get("authorization", "")
    screening = service.shield.screen(texts, request_id=request.request_id or None, client=context.peer(),
                                      api_key=auth[7:].strip() if auth[:7].lower() == "bearer " else None,
                                      model=service.model_name)
    if screening.refusal is not None:
        raise InputBlocked(screening.verdict)
    return screening


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with ``code``; details beyond MAX_DETAILS_CHARS are cut (a client would see RESOURCE_EXHAUSTED
    for its metadata instead of the error)."""
    if len(details) > MAX_DETAILS_CHARS:
        details = f"{details[:MAX_DETAILS_CHARS]}... ({len(details)} characters in all)"
    context.abort(code, details)


class _Collector:
    """Turns a request's text deltas into (text, reasoning, content) deltas: the reasoning split of a chat. With
    tools the content is held back to the last delta, where the calls are parsed out of it (`answer`)."""

    def __init__(self, prepared: _Prepared, service: EngineService, handle: RequestHandle):
        self.parser = service.reasoning_parser(prepared.thinking) if prepared.chat else None
        self.prepared, self.handle, self.held = prepared, handle, ""
        self.arrived = self.sent = 0  # generated tokens whose deltas came / whose logprobs went out
        self.prompt_sent = False

    def push(self, delta: TextDelta) -> tuple[str, str, str]:
        self.arrived += len(delta.token_ids)
        if self.parser is None:
            return delta.text, "", delta.text
        reasoning, content = self.parser.push(delta.text)
        if delta.finished:
            more_reasoning, more_content = self.parser.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if self.prepared.tools is not None:
            self.held, content = self.held + content, ""
        return delta.text, reasoning, content

    def answer(self, content: str) -> tuple[str, list[pb.ToolCall], int]:
        """The finished answer's content, tool calls and finish reason (its calls parsed when it had tools)."""
        handle, tools = self.handle, self.prepared.tools
        found = tools.parse(handle.token_ids, self.prepared.thinking) if tools is not None else None
        if found is None:
            return self.held + content, [], FINISH_REASONS[handle.finish_reason]
        return found[0], [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in found[1]], \
            pb.FINISH_REASON_TOOL_CALLS

    def logprobs(self) -> dict[str, list[pb.TokenLogprob]]:
        """The logprobs not sent yet (those of the tokens that arrived; the prompt's once), as message fields."""
        handle, fields = self.handle, {}
        if handle.params.logprobs is not None:
            new = handle.logprobs[self.sent:self.arrived]
            fields["logprobs"] = [_token_logprob(handle, lp.token, lp) for lp in new]
            self.sent = self.arrived
        if handle.prompt_logprobs is not None and not self.prompt_sent:
            fields["prompt_logprobs"] = [_token_logprob(handle, t, lp)
                                         for t, lp in zip(handle.prompt_ids, handle.prompt_logprobs, strict=False)]
            self.prompt_sent = True
        return fields


def _token_logprob(handle: RequestHandle, token: int, lp: TokenLogprob | None) -> pb.TokenLogprob:
    """One token's log-probability and its alternatives as the proto's message (``none``: a prompt's first)."""
    def text(t: int) -> str:
        return handle.tokenizer.decode([t]) if handle.tokenizer is not None else f"<{t}>"

    if lp is None:
        return pb.TokenLogprob(token=token, text=text(token), none=True)
    return pb.TokenLogprob(token=token, text=text(token), logprob=lp.logprob,
                           top=[pb.TopLogprob(token=t, text=text(t), logprob=v) for t, v in lp.top])


# ---------------------------------------------------------------------------------------------------- the service


class GeneratorServicer(pb_grpc.GeneratorServicer):
    """r1kit.v1.Generator on one EngineService (see the module doc for the status codes)."""

    def __init__(self, service: EngineService, server_name: str):
        self.service = service
        self.server_name = server_name

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        prepared, handle = self._submit(request, context)
        collector = _Collector(prepared, self.service, handle)
        text, reasoning, content = [], [], []
        for delta in self._deltas(handle, context):
            t, r, c = collector.push(delta)
            text.append(t), reasoning.append(r), content.append(c)
        answer, calls, reason = collector.answer("".join(content))
        return pb.GenerateResponse(
            request_id=handle.request_id, model=self.service.model_name, text="".join(text),
            reasoning="".join(reasoning), content=answer, finish_reason=reason, usage=self._usage(handle),
            tool_calls=calls, modality_weights=prepared.modality_weights, **collector.logprobs())

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        prepared, handle = self._submit(request, context)
        collector = _Collector(prepared, self.service, handle)
        for delta in self._deltas(handle, context):
            text, reasoning, content = collector.push(delta)
            if delta.finished:
                answer, calls, reason = collector.answer(content)
                yield pb.GenerateChunk(request_id=handle.request_id, model=self.service.model_name, text=text,
                                       reasoning=reasoning, content=answer, finish_reason=reason,
                                       usage=self._usage(handle), tool_calls=calls,
                                       modality_weights=prepared.modality_weights, **collector.logprobs())
            elif text:
                yield pb.GenerateChunk(request_id=handle.request_id, model=self.service.model_name, text=text,
                                       reasoning=reasoning, content=content, **collector.logprobs())

    # ------------------------------------------------------------------------------------------ helpers
    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> tuple[_Prepared, RequestHandle]:
        """Validate and queue the request, tying its lifetime to the call; aborts the call on refusal."""
        context.set_trailing_metadata(((SERVER_METADATA_KEY, self.server_name),))
        remaining = context.time_remaining()  # the call's deadline, if it has one: the engine stops there too
        timeout = remaining if remaining is not None and remaining < NO_DEADLINE else None
        try:
            self._check_size(request)
            prepared = _prepare(self.service, request)
            after_think = prepared.chat and self.service.model.tokenizer.starts_in_reasoning(prepared.thinking)
            handle = self.service.submit(prepared.prompt_ids, prepared.params, request_id=request.request_id or None,
                                         timeout=timeout, screening=_screen(self.service, request, context),
                                         after_think=after_think, prompt_embeds=prepared.prompt_embeds)
        except QueueFullError as e:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later or on another replica")
        except ServiceClosedError as e:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:  # InvalidRequest, GenerationError, ContextLengthError, TokenizerError
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # runs when the call ends for any reason: a cancelled call or a passed deadline frees the request's KV
        context.add_callback(handle.abort)
        return prepared, handle

    def _check_size(self, request: pb.GenerateRequest) -> None:
        """InvalidRequest for a request_id unfit to echo in every chunk. (A prompt too large to tokenize is refused
        by EngineService.encode_prompt / encode_chat, for HTTP alike.)"""
        if len(request.request_id) > MAX_REQUEST_ID_CHARS or not request.request_id.isprintable():
            raise InvalidRequest(f"request_id is {len(request.request_id)} characters: at most "
                                 f"{MAX_REQUEST_ID_CHARS} printable ones (no line breaks or control characters)")

    @staticmethod
    def _deltas(handle: RequestHandle, context: grpc.ServicerContext) -> Iterator[TextDelta]:
        """The request's deltas; the call ends with a status unless the request finished normally (stop or
        length). Leaving early (a cancelled call) aborts the request."""
        deltas = iter(handle)
        while True:
            try:
                delta = next(deltas)
            except StopIteration:
                return
            except Exception as e:  # the engine failed on this request
                log.exception("request %s failed", handle.request_id)
                _abort(context, grpc.StatusCode.INTERNAL, f"request {handle.request_id} failed in the engine: {e}")
            if delta.finished and delta.finish_reason == "timeout":
                _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"request {handle.request_id} passed its deadline after {handle.completion_tokens} "
                       "generated tokens")
            if delta.finished and delta.finish_reason == "content_filter":
                _abort(context, grpc.StatusCode.PERMISSION_DENIED, f"request {handle.request_id}: the safety shield "
                       "withheld the rest of the response (content_filter: a blocked type in the output)")
            if delta.finished and delta.finish_reason not in FINISH_REASONS:  # "abort": shutdown without drain
                _abort(context, grpc.StatusCode.UNAVAILABLE,
                       f"request {handle.request_id} was aborted by the server ({delta.finish_reason})")
            yield delta

    @staticmethod
    def _usage(handle: RequestHandle) -> pb.Usage:
        return pb.Usage(prompt_tokens=handle.prompt_tokens, completion_tokens=handle.completion_tokens,
                        total_tokens=handle.prompt_tokens + handle.completion_tokens)


# ---------------------------------------------------------------------------------------------------- the server


class GrpcServer:
    """A started gRPC server: ``port`` (the bound one), ``stop(grace)``, ``wait_for_termination()``."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, port: int):
        self.server, self.health, self.port = server, health_servicer, port

    def stop(self, grace: float | None = None) -> threading.Event:
        """Report NOT_SERVING to every health watcher (load balancers drop this replica), then stop.

        In-flight calls get ``grace`` seconds to finish; new calls are refused at once.
        Returns an event set when the server has stopped.
        """
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


class BadRequestLog:
    """Logs refused calls (malformed, unauthenticated) as one WARNING line each, at most one line per ``interval``
    seconds per kind; the next line says how many were left out, so a flood of bad calls cannot flood the log."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._last: dict[str, float] = {}  # kind -> monotonic time of its last line
        self._left_out: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if kind in self._last and now - self._last[kind] < self.interval:
                self._left_out[kind] += 1
                return
            self._last[kind], left_out = now, self._left_out.pop(kind, 0)
        more = f" (and {left_out} more {kind} calls not logged)" if left_out else ""
        log.warning("%s%s", message, more)


class _Undecodable(NamedTuple):
    """What a request that does not parse as its message type decodes to (instead of grpc's INTERNAL)."""

    method: str
    error: str


class DecodeGuard(grpc.ServerInterceptor):
    """A request message that does not parse (to any service: Generator, health, reflection) is refused as
    INVALID_ARGUMENT with one line in ``bad_requests``; left to gRPC it is INTERNAL and a logged traceback."""

    def __init__(self, bad_requests: BadRequestLog):
        self.bad_requests = bad_requests
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # method -> guarded handler (they never change)

    def intercept_service(self, continuation, details):  # noqa: ANN001 (grpc's own types)
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = continuation(details)
            if handler is None or handler.request_deserializer is None:
                return handler
            handler = self._handlers.setdefault(details.method, self._guard(details.method, handler))
        return handler

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = handler.request_deserializer

        def safe_decode(data: bytes) -> object:
            try:
                return decode(data)
            except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
                return _Undecodable(method, str(e) or type(e).__name__)

        def refuse(request: _Undecodable, context: grpc.ServicerContext) -> None:
            self.bad_requests.warn("malformed", f"malformed request to {method} from {context.peer()}: "
                                                f"{request.error}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {method}: "
                                                            f"{request.error}")

        name = f"{'stream' if handler.request_streaming else 'unary'}_" \
               f"{'stream' if handler.response_streaming else 'unary'}"
        behavior = getattr(handler, name)

        def checked(requests: Iterator[object], context: grpc.ServicerContext) -> Iterator[object]:
            for request in requests:
                if isinstance(request, _Undecodable):
                    refuse(request, context)
                yield request

        def guarded(request: object, context: grpc.ServicerContext, *args: object) -> object:
            if handler.request_streaming:
                return behavior(checked(request, context), context, *args)
            if isinstance(request, _Undecodable):
                refuse(request, context)
            return behavior(request, context, *args)

        functools.update_wrapper(guarded, behavior)  # keeps grpc's experimental_* attributes (health's Watch)
        return handler._replace(request_deserializer=safe_decode, **{name: guarded})


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Generator calls need metadata ``authorization: Bearer KEY`` (compared in constant time); others get
    UNAUTHENTICATED (and a line in ``bad_requests``, if given). Health checks and reflection stay open, so that
    load balancers can probe the server."""

    def __init__(self, api_key: str, bad_requests: BadRequestLog | None = None):
        self.expected = f"Bearer {api_key}".encode()

        def deny(request: object, context: grpc.ServicerContext) -> None:
            if bad_requests is not None:
                bad_requests.warn("unauthenticated", f"unauthenticated call from {context.peer()}: missing or "
                                                     "wrong API key")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send metadata "
                                                           "'authorization: Bearer KEY'")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):  # noqa: ANN001 (grpc's own types)
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(details)
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self.expected):
            return continuation(details)
        return self._deny_stream if details.method.endswith("Stream") else self._deny_unary


def serve_grpc(service: EngineService, port: int, host: str = "127.0.0.1", max_workers: int = 128,
               api_key: str | None = None) -> GrpcServer:
    """Start the Generator, health and reflection services for ``service`` on ``host:port`` (0: any free port).

    Each in-flight call holds one of ``max_workers`` threads; calls beyond it are refused as
    RESOURCE_EXHAUSTED by gRPC itself (the engine's own queue bound usually refuses first). With ``api_key``,
    Generator calls need ``authorization: Bearer KEY`` metadata (`ApiKeyInterceptor`). Malformed and
    unauthenticated calls are logged one line each, rate-limited (`BadRequestLog`).
    Raises PortError (a ValueError) when the address cannot be bound: the port is in use (also by another gRPC
    server: SO_REUSEPORT is off, so two servers never share a port silently) or the host has no such address.
    """
    bad_requests = BadRequestLog()
    interceptors = ([ApiKeyInterceptor(api_key, bad_requests)] if api_key else []) + [DecodeGuard(bad_requests)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="r1kit-grpc"),
                         maximum_concurrent_rpcs=max_workers, interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0)])
    check_port(port, "gRPC port")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpc reports a failed bind as RuntimeError (and logs its own line)
        raise PortError(f"gRPC port {port}: cannot listen on {address}: in use, or no such address here") from None
    name = f"{host}:{bound}"
    pb_grpc.add_GeneratorServicer_to_server(GeneratorServicer(service, name), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)  # Watch streams hold no thread
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.start()
    log.info("gRPC %s serving %s on %s", SERVICE_NAME, service.model_name, name)
    return GrpcServer(server, health_servicer, bound)


def install_shutdown_handler(stop: Callable[[], None]) -> threading.Event:
    """Call ``stop`` once on the first SIGTERM or SIGINT; returns an event set when it has run."""
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if not done.is_set():
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop()
            done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return done


def main(argv: list[str] | None = None) -> None:
    """A standalone gRPC server: ``python -m r1kit.serve.grpc_service MODEL --port P``."""
    from r1kit.api import R1Model
    from r1kit.engine.config import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser(prog="python -m r1kit.serve.grpc_service", description=__doc__.split("\n")[0])
    p.add_argument("model", help="checkpoint folder, r1kit/<bundled>, or org/name in the local HF cache")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (server side)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--api-key", default=None, help="require 'authorization: Bearer KEY' (or set R1KIT_API_KEY)")
    add_engine_args(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_free(a.host, a.port, "--port")  # before the model loads: a bad or busy port fails at once
    model = R1Model.from_pretrained(a.model, device=a.device, dtype=a.dtype)
    service = EngineService(model, engine_config_from_args(a), max_queue=a.max_queue,
                            request_timeout=a.request_timeout)
    log.info("%s; max_queue=%d, request_timeout=%s", service.config.describe(), service.max_queue,
             service.request_timeout)
    service.start()
    server = serve_grpc(service, a.port, a.host, api_key=a.api_key or os.environ.get("R1KIT_API_KEY") or None)

    def stop() -> None:
        server.health.enter_graceful_shutdown()  # watchers move their traffic elsewhere first
        service.shutdown(drain=True, timeout=a.grace)  # in-flight requests finish, new ones get UNAVAILABLE
        server.stop(grace=1.0)

    install_shutdown_handler(stop)
    server.wait_for_termination()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # as `r1kit serve`: one line naming the flag or file, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
