"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, in front of one EngineService.

    r1kit serve r1kit/nano --port 8000 [--api-key KEY] [--max-queue N]
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (server-sent events with
``stream: true``; the chat reply carries the ``<think>`` text in ``reasoning_content`` beside ``content``, as
DeepSeek's API does), ``/health``, ``/metrics`` (Prometheus text), ``/openapi.json`` and the chat page at ``/``
(``HEAD`` too on the page and ``/health``; ``OPTIONS`` on every path; no ``/docs``: its assets come from a CDN).

Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed or
invalid request (bad JSON or UTF-8, wrong types, out-of-range values, a prompt beyond the context, an OpenAI
parameter this server does not implement, see UNSUPPORTED_PARAMS), 401 for a missing or wrong API key, 404 for
an unknown model or path, 413 for a body over the size limit (Content-Length or chunked), 429 when the queue is
full, 503 while shutting down, 504 when a request runs past its timeout. A client that disconnects aborts its
request. Connections are limited in number and must send their request head within a timeout (slow clients).
On SIGTERM the server stops accepting, lets in-flight requests finish for up to the shutdown timeout, then ends
the rest with an error (streams: an error event, then ``[DONE]``) and exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import inspect
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, Router
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from r1kit.generate import (
    MAX_LOGPROBS,
    GenerationError,
    SamplingParams,
    TokenLogprob,
    check_prompt,
    default_max_new_tokens,
)
from r1kit.model.transformer import ContextLengthError
from r1kit.safety.shield import InputBlocked, Screening
from r1kit.serve.engine_service import EngineService, QueueFullError, RequestHandle, ServiceClosedError, TextDelta
from r1kit.serve.media_parts import MediaPartError, MediaRequest, has_media_parts, prepare_media_chat
from r1kit.sessions import SessionError, SessionStore
from r1kit.structured import StructuredError
from r1kit.tokenizer import PlainStreamParser, ReasoningStreamParser, TokenizerError
from r1kit.tools import ToolCallParser, ToolError, check_tool_choice, check_tools

ReasoningParser = ReasoningStreamParser | PlainStreamParser

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
MAX_BODY_BYTES = 1 << 20  # request bodies above this are refused with 413
MAX_N = 16
MAX_SEED = 2**63 - 1
HEADER_TIMEOUT = 10.0  # seconds a connection has to send its request head (slow-loris clients are closed)
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)
MAX_CONNECTIONS = 512  # open connections served at once; a request on one more gets 503
SHUTDOWN_GRACE = 5.0  # seconds after the shutdown timeout for aborted requests to send their error


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------------- schemas
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ExplainRequest(BaseModel):
    """POST /v1/explain: r1kit.interpret.explain of ``prompt`` -> ``target`` (None: the greedy continuation).
    ``config``: ExplainConfig fields over EXPLAIN_DEFAULTS (unknown ones refused by name)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str = Field(min_length=1)
    target: str | None = None
    chat: bool = True
    config: dict[str, Any] = Field(default_factory=dict)


EXPLAIN_DEFAULTS = {"methods": ["rollout", "grad_x_attention"]}  # /v1/explain: the cheap attributions unless asked


class _Request(BaseModel):
    """Fields shared by both generation endpoints. Other fields land in ``model_extra``: those in
    UNSUPPORTED_PARAMS are refused unless off, the rest (user, metadata, store, ...) are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured outputs (r1kit.structured): OpenAI's response_format, and vLLM's guided_regex / guided_choice
    response_format: dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(min_length=1)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=MAX_N)] | \
        TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_N)]  # token ids, as lm-eval sends
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # the k most likely tokens beside each
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt tokens' too)


class ContentPart(BaseModel):
    """One part of a message's content array: text (see _message_text), or media for a model with encoders
    (image_url, input_audio: r1kit.serve.media_parts)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    input_audio: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """``developer`` is the newer name of ``system``; ``content`` may be text parts; null only for assistant."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (OpenAI's form), rendered by the template
    tool_call_id: str | None = None  # a tool message's answer to that call


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens; wins
    logprobs: bool = False  # each content token's log-probability
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools (r1kit.tools.check_tools)
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" | "required" | {"type": "function", ...}
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # and its k most likely alternatives
    session_id: str | None = None  # r1kit: the server keeps the conversation (r1kit.sessions); send new messages only


# OpenAI parameters this server does not implement (yet). A request that turns one on gets 400 naming it rather
# than a reply that silently ignores it; the values that mean "off" are accepted, since clients send them:
# null, false, 0, "", [] and {}, plus the ones each row's function accepts. Implementing one: delete its row. An
# endpoint that implements a row's parameter declares it as a field (then it is not in model_extra): logprobs and
# echo in completions, logprobs, top_logprobs, tools and tool_choice in chat completions.
UNSUPPORTED_PARAMS: dict[str, Callable[[Any, _Request], bool] | None] = {
    "logprobs": None,
    "top_logprobs": None,
    "echo": None,
    "tools": None,
    "tool_choice": lambda value, body: value == "none",
    "suffix": None,
    "best_of": lambda value, body: value == body.n,
    "logit_bias": None,
    "frequency_penalty": None,
    "presence_penalty": None,
    "parallel_tool_calls": None,
    "functions": None,
    "function_call": lambda value, body: value == "none",
}


# ---------------------------------------------------------------------------------------------------- the app
def create_app(service: EngineService, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_tokens_limit: int | None = None, shutdown_timeout: float | None = 30.0,
               cors_origins: Sequence[str] = (), sessions: SessionStore | None = None) -> FastAPI:
    """The FastAPI app serving ``service`` (already started). At app shutdown the service drains and stops
    (in-flight requests get up to ``shutdown_timeout`` seconds). ``api_key``: required as a Bearer token on
    /v1/* and /metrics when set. ``max_tokens_limit``: the most tokens one choice may ask for (None: the
    context). ``cors_origins``: origins (``"https://app.example"``, or ``"*"``) whose pages may call the API from
    a browser; none by default (the chat page at / is same-origin and needs none). ``sessions``: the store of
    server-side conversations (chat requests with ``session_id``; none: such requests get 400)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.shutdown, drain=True, timeout=shutdown_timeout)

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:  # recent FastAPI: OpenTelemetry checks on
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}  # every request (~0.5 ms)
    app = FastAPI(title="r1kit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,  # /docs: CDN
                  description="OpenAI-compatible API for a DeepSeek-R1-style model served by r1kit.", **options)
    status_counts: collections.Counter[int] = collections.Counter()
    app.add_middleware(_GuardMiddleware, router=app.router, api_key=api_key, max_body_bytes=max_body_bytes,
                       status_counts=status_counts)
    if cors_origins:  # outermost: it answers preflights (browsers send no API key there) and its headers reach
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), max_age=600,  # the 401s too
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"], allow_headers=["Authorization",
                                                                                          "Content-Type"])
    _add_error_handlers(app)
    _add_info_routes(app, service, status_counts)
    _add_generation_routes(app, service, max_tokens_limit, sessions)
    _add_session_routes(app, sessions)
    _add_explain_route(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI-shaped JSON (APIError.body), FastAPI's own too (validation, 404, 405)."""
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            return APIError(400, "the request body is not valid JSON").response()
        problems = []
        for err in e.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        param = ".".join(str(p) for p in e.errors()[0].get("loc", ()) if p != "body") if e.errors() else None
        return APIError(400, "invalid request: " + "; ".join(problems), param=param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = ("the request body is not valid JSON (or not UTF-8)" if e.status_code == 400 else str(e.detail))
        return APIError(e.status_code, message, "not_found_error" if e.status_code == 404 else
                        "invalid_request_error", headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()


def _add_info_routes(app: FastAPI, service: EngineService, status_counts: collections.Counter[int]) -> None:
    """The chat page, /health (both also HEAD, for load balancers), /metrics and /v1/models."""
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.head("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        """200 while serving, 503 once shutting down (load balancers take the replica out)."""
        stats = service.stats()
        body = {"status": "shutting_down" if service.closed else "ok", "model": service.model_name,
                "requests_running": stats["requests_running"], "queue_depth": stats["queue_depth"]}
        return JSONResponse(body, status_code=503 if service.closed else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(prometheus_text(service.stats(), status_counts),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        _check_model(service, model)
        return _model_card(service)


def _add_generation_routes(app: FastAPI, service: EngineService, max_tokens_limit: int | None,
                           sessions: SessionStore | None = None) -> None:
    """POST /v1/completions and /v1/chat/completions: JSON, or server-sent events with ``stream``."""
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(service, body.model)
        _refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        ids = [_encode(lambda p=p: service.encode_prompt(p) if isinstance(p, str) else
                       check_prompt(p, service.model.config.vocab_size), "prompt") for p in prompts]
        tok = service.model.tokenizer
        prompts = [p if isinstance(p, str) else tok.decode(p) if tok is not None else "" for p in prompts]
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", "text_completion", service.model_name, ids)
        if (screening := _screen(service, request, body, prompts, meta)) and screening.refusal is not None:
            return _refusal(body, meta, screening.refusal)
        handles = _submit(service, body, ids, "completion", max_tokens_limit, screening)
        if body.stream:
            return _sse(_completion_chunks(handles, meta, _include_usage(body), body.echo))
        return await _until_done(request, handles, lambda: _completion_body(handles, meta, body.echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(service, body.model)
        _refuse_unsupported(body)
        tools = _tool_parser(service, body)
        media = await _media_request(service, body, tools)
        if media is None:
            messages = _session_messages(service, sessions, body, _chat_messages(body.messages), tools)
            ids = [_encode(lambda: service.encode_chat(messages, thinking=True, tools=tools and tools.offered),
                           "messages")]
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", service.model_name,
                     ids if media is None else [media.ids])
        if media is not None:  # an extra field on every response object of the request
            meta.extra["modality_weights"] = media.modality_weights
        # the operator's system prompt is trusted
        users = media.user_texts if media else [m["content"] for m in messages if m["role"] == "user"]
        if (screening := _screen(service, request, body, users, meta)) and screening.refusal is not None:
            return _refusal(body, meta, screening.refusal)
        handles = _submit(service, body, meta.prompts, "chat", max_tokens_limit, screening, tools,
                          media and media.embeds)
        if body.session_id is not None:
            return await _session_answer(request, sessions, body, messages, handles, meta, service, tools)
        if body.stream:
            return _sse(_chat_chunks(handles, meta, _include_usage(body), service.reasoning_parser, tools))
        return await _until_done(request, handles, lambda: _chat_body(handles, meta, service.reasoning_parser, tools))


def _add_session_routes(app: FastAPI, sessions: SessionStore | None) -> None:
    """GET /v1/sessions/{id} (the kept messages) and DELETE /v1/sessions/{id}; 404 for an unknown session."""
    def store() -> SessionStore:
        if sessions is None:
            raise APIError(404, "this server keeps no sessions (r1kit serve --sessions POLICY)", "not_found_error")
        return sessions

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        messages = _session_call(lambda: store().history(session_id))
        if not messages:
            raise APIError(404, f"no session {session_id!r} (never started, deleted or expired)", "not_found_error")
        return {"id": session_id, "object": "session", "messages": messages}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        return {"id": session_id, "object": "session", "deleted": _session_call(lambda: store().delete(session_id))}


def _add_explain_route(app: FastAPI, service: EngineService) -> None:
    """POST /v1/explain: the JSON of r1kit.interpret.explain (the chat page's Explain view; README
    "Interpretability" lists its keys). Same API key rule as the other /v1 routes; bad fields get 400."""
    lock = threading.Lock()  # one explanation at a time: each holds a copy of the model and runs backward passes

    def run(body: ExplainRequest) -> dict[str, Any]:
        from r1kit.interpret import ExplainConfig, TargetError, explain, to_json
        from r1kit.interpret.attribution import QuadraticLimitError

        try:
            cfg = ExplainConfig.from_dict({**EXPLAIN_DEFAULTS, **body.config}, "config")
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e), param="config") from None
        with lock:
            # The engine thread owns service.model (it steps it without a lock) and explain adds hooks and runs
            # backward passes, so it runs on a private copy of the weights (copying only reads them: safe).
            copy = _copy_model(service.model)
            try:
                result = explain(copy, body.prompt, body.target, chat=body.chat, config=cfg)
            except TargetError as e:
                raise APIError(400, str(e), param="target") from None
            except (QuadraticLimitError, ContextLengthError) as e:
                raise APIError(400, str(e), param="prompt") from None
        return {"object": "explanation", "model": service.model_name, **to_json(result)}

    @app.post("/v1/explain")
    async def explain_route(body: ExplainRequest) -> dict[str, Any]:
        if service.model.tokenizer is None:
            raise APIError(400, f"{service.model_name}: no tokenizer, so text cannot be explained", param="prompt")
        return await asyncio.to_thread(run, body)


def _copy_model(model: Any) -> Any:
    """A shallow copy of the R1Model whose network is a deep copy (same tokenizer, own weights)."""
    import copy

    clone = copy.copy(model)
    clone.model = copy.deepcopy(model.model)
    return clone


def _session_call(fn: Callable[[], Any]) -> Any:
    """fn() with a SessionError as a 400 naming its field."""
    try:
        return fn()
    except SessionError as e:
        raise APIError(400, str(e), param=e.param) from None


def _session_messages(service: EngineService, sessions: SessionStore | None, body: ChatCompletionRequest,
                      messages: list[dict[str, Any]], tools: ToolCallParser | None) -> list[dict[str, Any]]:
    """The messages of a chat: with ``session_id``, the session's history then the new ones, fitted to the context
    less the reply's room (max_tokens, else a quarter of the context) by the session policy."""
    if body.session_id is None:
        return messages
    if sessions is None:
        raise APIError(400, "session_id: this server keeps no sessions (start it with r1kit serve --sessions "
                       "POLICY)", param="session_id")
    reply_room = body.max_completion_tokens or body.max_tokens or service.context_length // 4

    def count(candidate: list[dict[str, Any]]) -> int:
        try:
            return len(service.encode_chat(candidate, thinking=True, tools=tools and tools.offered))
        except ContextLengthError:  # more text than the context could hold: too long whatever its tokens
            return service.context_length + 1

    history = _session_call(lambda: sessions.history(body.session_id))
    fitted, _ = _session_call(lambda: sessions.fit(history + messages, count, service.context_length - reply_room))
    return fitted


async def _session_answer(request: Request, sessions: SessionStore, body: ChatCompletionRequest,
                          messages: list[dict[str, Any]], handles: list[RequestHandle], meta: _Meta,
                          service: EngineService, tools: ToolCallParser | None) -> Response:
    """A session chat's answer (streamed or not); once it is whole, the turn is kept: the fitted messages and the
    first choice's reply (its content, or its tool calls)."""
    def keep(message: dict[str, Any]) -> None:
        reply = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            reply["tool_calls"] = message["tool_calls"]
        sessions.record(body.session_id, messages, reply)

    if not body.stream:
        answer = await _until_done(request, handles, lambda: _chat_body(handles, meta, service.reasoning_parser,
                                                                         tools))
        found = json.loads(answer.body)
        keep(found["choices"][0]["message"])
        return JSONResponse({**found, "session_id": body.session_id}, status_code=answer.status_code)

    async def events() -> AsyncIterator[list[bytes]]:
        async for batch in _chat_chunks(handles, meta, _include_usage(body), service.reasoning_parser, tools):
            yield batch
        message = _chat_body(handles[:1], meta, service.reasoning_parser, tools)["choices"][0]["message"]
        keep(message)

    return _sse(events())


class _GuardMiddleware:
    """Pure ASGI (streaming-safe): counts responses by status code, answers OPTIONS (the methods a path takes;
    CORS preflights, when enabled, are answered by CORSMiddleware before this), checks the API key on /v1/* and
    /metrics and the body size limit."""

    def __init__(self, app, router: Router, api_key: str | None, max_body_bytes: int,
                 status_counts: collections.Counter):
        self.app, self.router, self.max_body_bytes, self.status_counts = app, router, max_body_bytes, status_counts
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.status_counts[message["status"]] += 1
            await send(message)

        if scope["method"] == "OPTIONS" and (methods := _allowed_methods(self.router, scope)):
            allow = ", ".join(sorted(methods | {"OPTIONS"}))
            return await Response(status_code=204, headers={"Allow": allow})(scope, receive, counting_send)
        headers = dict(scope.get("headers") or [])
        error = self._key_error(scope["path"], headers)
        if error is None:
            receive, error = await self._bounded_body(headers, receive)
        if error is not None:
            return await error.response()(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)

    def _key_error(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        """401 when an API key is set, the path needs it and the request's Bearer token is not it."""
        if self.api_key is None or not (path.startswith("/v1/") or path == "/metrics"):
            return None
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(token, self.api_key):
            return None
        return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _bounded_body(self, headers: dict[bytes, bytes], receive) -> tuple[Callable, APIError | None]:
        """(the receive to pass on, 413 or None). A Content-Length over the limit is refused at once; a chunked
        body, whose size shows only as it arrives, is read here (up to the limit) and replayed to the app. An
        over-limit body is read on (up to 4x the limit) so that a client still sending sees the 413."""
        too_big = APIError(413, f"request body larger than {self.max_body_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) <= self.max_body_bytes:
                return receive, None
            if length.isdigit() and int(length) <= 4 * self.max_body_bytes:
                while (await receive()).get("more_body"):
                    pass
            return receive, too_big
        if b"transfer-encoding" not in headers:  # no body
            return receive, None
        parts, size, message = [], 0, {"more_body": True}
        while message.get("more_body") and size <= 4 * self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return _replay(message, receive), None
            size += len(message.get("body", b""))
            parts.append(message.get("body", b"") if size <= self.max_body_bytes else b"")
        if size > self.max_body_bytes:
            return receive, too_big
        return _replay({"type": "http.request", "body": b"".join(parts), "more_body": False}, receive), None


def _replay(first: dict[str, Any], receive: Callable) -> Callable:
    """A receive that returns ``first``, then what ``receive`` returns."""
    pending = [first]

    async def replaying() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replaying


def _allowed_methods(router: Router, scope: dict[str, Any]) -> set[str]:
    """The methods the routes at this request's path take (empty: no route has the path)."""
    methods: set[str] = set()
    for route in router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


# ---------------------------------------------------------------------------------------------------- requests
def _model_card(service: EngineService) -> dict[str, Any]:
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "r1kit",
            "max_model_len": service.context_length}


def _check_model(service: EngineService, name: str) -> None:
    if name != service.model_name:
        raise APIError(404, f"model {name!r} does not exist: this server serves {service.model_name!r}",
                       "not_found_error", code="model_not_found", param="model")


def _refuse_unsupported(body: _Request) -> None:
    """400 naming the first parameter of UNSUPPORTED_PARAMS that the request turns on."""
    extra = body.model_extra or {}
    for name, also_off in UNSUPPORTED_PARAMS.items():
        value = extra.get(name)
        if _off(value) or (also_off is not None and also_off(value, body)):
            continue
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise APIError(400, f"{name} = {shown} is not supported by this server: leave it out (or send null)",
                       code="unsupported_parameter", param=name)


def _off(value: Any) -> bool:
    """Whether a parameter's value means "not used": null, false, 0, "", [] or {}."""
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int | float):
        return value == 0
    return value in ("", [], {})


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: ``developer`` as ``system``, content parts joined; an
    assistant's tool calls (its content stays null, as DeepSeek's template wants) and a tool message's call id."""
    out = []
    for i, m in enumerate(messages):
        content = None if m.content is None and m.tool_calls else _message_text(m, i)
        extra = {k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id)) if v is not None}
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content, **extra})
    return out


def _message_text(message: ChatMessage, i: int) -> str:
    """The text of messages[i]: a string; text parts joined by newlines; null (an assistant's) as empty."""
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        if message.role != "assistant":
            raise APIError(400, f"messages[{i}].content is null: only an assistant message may have no content",
                           param=f"messages.{i}.content")
        return ""
    for j, part in enumerate(message.content):
        where = f"messages[{i}].content[{j}]"
        if part.type != "text":
            raise APIError(400, f"{where}: content parts of type {part.type!r} are not supported (this model "
                           "reads text only)", code="unsupported_content", param=f"messages.{i}.content.{j}.type")
        if part.text is None:
            raise APIError(400, f"{where}: a text part needs a 'text' string", param=f"messages.{i}.content.{j}.text")
    return "\n".join(part.text for part in message.content)


async def _media_request(service: EngineService, body: ChatCompletionRequest, tools: ToolCallParser | None
                         ) -> MediaRequest | None:
    """A chat with image_url / input_audio parts as a MediaRequest (decoded and encoded off the event loop; None
    for a text chat); 400 or 413 naming the part at fault (r1kit.serve.media_parts)."""
    if not has_media_parts(body.messages):
        return None
    if body.session_id is not None:
        raise APIError(400, "session_id: a chat with media attachments cannot be kept in a session",
                       param="session_id")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        return await asyncio.to_thread(prepare_media_chat, service.model, messages, True, tools and tools.offered)
    except MediaPartError as e:
        raise APIError(e.status, e.message, code=e.code, param=e.param) from None


def _encode(encode: Callable[[], list[int]], param: str) -> list[int]:
    try:
        return encode()
    except ContextLengthError as e:  # a text longer than the context could hold, refused before tokenizing
        raise APIError(400, str(e), code="context_length_exceeded", param=param) from None
    except (TokenizerError, GenerationError) as e:
        raise APIError(400, str(e), param=param) from None
    except (UnicodeError, TypeError) as e:  # lone surrogates (valid JSON escapes, not text) and the like
        raise APIError(400, f"{param}: text the tokenizer cannot encode ({e})", param=param) from None


def _submit(service: EngineService, body: _Request, prompts: list[list[int]], kind: str,
            limit: int | None, screening: Screening | None = None, tools: ToolCallParser | None = None,
            prompt_embeds: Any = None) -> list[RequestHandle]:
    """Submit n requests per prompt (all or none); the sampling fields map onto SamplingParams (``tools``: a
    chat's tool parser, whose tool_choice may constrain the answer; ``prompt_embeds``: a media chat's, for its
    one prompt)."""
    if limit is not None and body.max_tokens is not None and body.max_tokens > limit:
        raise APIError(400, f"max_tokens = {body.max_tokens} exceeds this server's limit of {limit}",
                       param="max_tokens")
    total = len(prompts) * body.n
    if total > service.max_num_seqs + service.max_queue:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} = {total} requests exceed this server's "
                       f"capacity of {service.max_num_seqs + service.max_queue}", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    handles: list[RequestHandle] = []
    try:
        for ids in prompts:
            max_tokens = body.max_tokens if body.max_tokens is not None else default_max_new_tokens(
                len(ids), service.context_length, kind, limit)
            for i in range(body.n):
                seed = None if body.seed is None else (body.seed + i) % (MAX_SEED + 1)
                given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                         "repetition_penalty": body.repetition_penalty}  # unset: SamplingParams' defaults
                params = SamplingParams(max_new_tokens=max_tokens, stop=stop, seed=seed, **_logprob_params(body),
                                        structured=_structured_spec(body, tools),
                                        **{k: v for k, v in given.items() if v is not None})
                after_think = kind == "chat" and service.model.tokenizer.starts_in_reasoning()
                handles.append(service.submit(ids, params, screening=screening, after_think=after_think,
                                              prompt_embeds=prompt_embeds))
    except BaseException as e:
        for h in handles:
            h.abort()
        if isinstance(e, ContextLengthError):
            raise APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
        if isinstance(e, GenerationError):
            raise APIError(400, str(e)) from None
        if isinstance(e, StructuredError):
            raise APIError(400, str(e), code="unsupported_schema", param=_structured_param(body, tools)) from None
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        if isinstance(e, ServiceClosedError):
            raise APIError(503, str(e), "service_unavailable", code="shutting_down") from None
        raise
    return handles


def _screen(service: EngineService, request: Request, body: _Request, texts: list[str], meta: _Meta
            ) -> Screening | None:
    """The safety shield's input check (None without a shield): 400 with code content_filter naming the category
    when it blocks (the shield audits the request either way)."""
    if service.shield is None:
        return None
    auth = request.headers.get("authorization", "")
    try:
        return service.shield.screen(
            texts, request_id=meta.id, api_key=auth[7:].strip() if auth[:7].lower() == "bearer " else None,
            client=request.client.host if request.client else None, model=service.model_name,
            params=body.model_dump(exclude={"messages", "prompt"}, exclude_none=True))
    except InputBlocked as e:
        v = e.verdict
        raise APIError(400, f"the request was blocked by the safety shield: {v.category} (score {v.score:.2f}, "
                       f"matched {v.evidence[:80]!r})", code="content_filter",
                       param="messages" if meta.object == "chat.completion" else "prompt") from None


def _refusal(body: _Request, meta: _Meta, text: str) -> Response:
    """The shield's refusal as the answer, finish_reason content_filter, streamed or not (nothing generated)."""
    chat = meta.object == "chat.completion"
    obj = "chat.completion.chunk" if chat and body.stream else meta.object
    choice = ({"index": 0, "message" if not body.stream else "delta": {"role": "assistant", "content": text}}
              if chat else {"index": 0, "text": text})
    choice.update(finish_reason="content_filter", logprobs=None)
    usage = {"prompt_tokens": sum(len(p) for p in meta.prompts), "completion_tokens": 0,
             "total_tokens": sum(len(p) for p in meta.prompts)}
    if not body.stream:
        return JSONResponse({**meta.envelope(obj, [choice]), "usage": usage})

    async def events() -> AsyncIterator[list[bytes]]:
        yield [meta.chunk(obj, choice), *_usage_event(meta, obj, [], _include_usage(body)), DONE_EVENT]

    return _sse(events())


def _include_usage(body: _Request) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


class _Meta:
    """What every response of one request shares: id, object type, model, created time, prompts."""

    def __init__(self, id_: str, obj: str, model: str, prompts: list[list[int]]):
        self.id, self.object, self.model, self.prompts = id_, obj, model, prompts
        self.created = int(time.time())
        self.extra: dict[str, Any] = {}  # r1kit's extra fields (a media chat's modality_weights)

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **self.extra}

    def chunk(self, obj: str, choice: dict[str, Any]) -> bytes:
        """The server-sent event of one streamed choice."""
        return _event(self.envelope(obj, [choice]))

    def usage(self, handles: list[RequestHandle]) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(h.completion_tokens for h in handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_error(handle: RequestHandle) -> APIError | None:
    """The error to report for a request that ended badly (timeout, engine failure, aborted by a shutdown whose
    timeout expired: a client's own aborts have nobody listening), else None."""
    if handle.finish_reason == "timeout":
        return APIError(504, f"request {handle.request_id} ran past the server's timeout after "
                        f"{handle.completion_tokens} tokens", "timeout_error", code="timeout")
    if handle.finish_reason == "abort":
        return APIError(503, f"request {handle.request_id} was aborted after {handle.completion_tokens} tokens: the "
                        "server is shutting down and its shutdown timeout expired", "service_unavailable",
                        code="shutting_down")
    if handle.finish_reason == "error":
        return APIError(500, f"generation failed: {handle.error}", "server_error")
    return None


async def _until_done(request: Request, handles: list[RequestHandle], build: Callable[[], dict[str, Any]]
                      ) -> JSONResponse:
    """Wait for all handles (aborting them if the client disconnects first), then answer build()."""
    async def drain(h: RequestHandle) -> None:
        async for _ in h.stream():
            pass

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(asyncio.gather(*(drain(h) for h in handles), return_exceptions=True))
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # client gone (or server cancelled): the streams' finally blocks abort the requests
    if not work.done() or work.cancelled():
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    for h in handles:
        if (error := _finish_error(h)) is not None:
            raise error
    return JSONResponse(build())


def _completion_body(handles: list[RequestHandle], meta: _Meta, echo: bool = False) -> dict[str, Any]:
    choices = [{"index": i, "text": (_prompt_text(h) if echo else "") + h.text, "finish_reason": _reason(h),
                "logprobs": _completion_logprobs(h, _logprob_entries(h, echo=echo))} for i, h in enumerate(handles)]
    return {**meta.envelope("text_completion", choices), "usage": meta.usage(handles)}


def _chat_body(handles: list[RequestHandle], meta: _Meta, new_parser: Callable[[], ReasoningParser],
               tools: ToolCallParser | None = None) -> dict[str, Any]:
    choices = []
    for i, h in enumerate(handles):
        parser = new_parser()  # the chat template's reasoning family: R1's opened <think>
        r1, c1 = parser.push(h.text)
        r2, c2 = parser.flush()
        message = {"role": "assistant", "content": c1 + c2, "reasoning_content": r1 + r2}
        reason = _reason(h)
        if tools is not None and (found := tools.parse(h.token_ids)) is not None:
            message.update(content=found[0] or None, tool_calls=[call.to_openai() for call in found[1]])
            reason = "tool_calls"
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": _chat_logprobs(h, _logprob_entries(h))})
    return {**meta.envelope("chat.completion", choices), "usage": meta.usage(handles)}


# ---------------------------------------------------------------------------------------------------- structured
def _structured_spec(body: _Request, tools: ToolCallParser | None = None) -> dict[str, Any] | None:
    """SamplingParams.structured of a request: response_format json_object / json_schema, guided_regex,
    guided_choice or the call grammar of tool_choice "required" / a named function (one at a time); 400 naming the
    field of a malformed one."""
    forced = tools.constraint() if tools is not None else None
    specs = [forced] if forced is not None else []
    rf = body.response_format
    if rf is not None and rf.get("type") != "text":
        if rf.get("type") == "json_object":
            specs.append({"type": "json_object"})
        elif rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
            if not isinstance(schema, dict):
                raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                               param="response_format.json_schema.schema")
            specs.append({"type": "json_schema", "schema": schema})
        else:
            raise APIError(400, f"response_format.type = {rf.get('type')!r}: expected 'text', 'json_object' or "
                           "'json_schema'", param="response_format.type")
    if body.guided_regex is not None:
        specs.append({"type": "regex", "pattern": body.guided_regex})
    if body.guided_choice is not None:
        specs.append({"type": "choice", "choices": body.guided_choice})
    if len(specs) > 1:
        raise APIError(400, "give one of response_format (json), guided_regex, guided_choice and tool_choice "
                       "'required' / a named function, not several", param="tool_choice" if forced else
                       "response_format")
    return specs[0] if specs else None


def _structured_param(body: _Request, tools: ToolCallParser | None = None) -> str:
    """The request field a structured-output error is about."""
    if tools is not None and tools.constraint() is not None:
        return "tool_choice"
    if body.guided_regex is not None:
        return "guided_regex"
    return "guided_choice" if body.guided_choice is not None else "response_format"


# ---------------------------------------------------------------------------------------------------- logprobs
LogprobEntry = tuple[int, TokenLogprob | None]  # (token id, its log-probability; None for a prompt's first token)


def _logprob_params(body: _Request) -> dict[str, int | None]:
    """SamplingParams' logprobs / prompt_logprobs of a request: a completion's ``logprobs`` k (with ``echo``,
    for the prompt too), a chat's ``top_logprobs`` (0 if unset) when ``logprobs`` is true."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
    k = getattr(body, "logprobs", None)
    return {"logprobs": k, "prompt_logprobs": k if k is not None and getattr(body, "echo", False) else None}


def _logprob_entries(h: RequestHandle, echo: bool = False, output: bool = True) -> list[LogprobEntry] | None:
    """A request's logprob entries (None when it asked for none): with ``echo`` the prompt's, then the output's."""
    if h.params.logprobs is None:
        return None
    prompt = list(zip(h.prompt_ids, h.prompt_logprobs or [], strict=False)) if echo else []
    return prompt + ([(lp.token, lp) for lp in h.logprobs] if output else [])


def _prompt_text(h: RequestHandle) -> str:
    return h.tokenizer.decode(h.prompt_ids) if h.tokenizer is not None else ""


def _token_text(h: RequestHandle, token: int) -> str:
    return h.tokenizer.decode([token]) if h.tokenizer is not None else f"<{token}>"


def _completion_logprobs(h: RequestHandle, entries: list[LogprobEntry] | None, offset: int = 0
                         ) -> dict[str, list] | None:
    """OpenAI's completion ``logprobs``: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    if entries is None:
        return None
    texts = [_token_text(h, t) for t, _ in entries]
    return {"tokens": texts, "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
            "top_logprobs": [{_token_text(h, t): v for t, v in lp.top} if lp else None for _, lp in entries],
            "text_offset": list(itertools.accumulate((len(t) for t in texts), initial=offset))[:-1]}


def _chat_logprobs(h: RequestHandle, entries: list[LogprobEntry] | None) -> dict[str, list] | None:
    """OpenAI's chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    if entries is None:
        return None

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(h, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(a, v) for a, v in lp.top]}
                        for t, lp in entries if lp is not None]}


class _LogprobCursor:
    """A streamed request's logprob entries not sent yet: those of the tokens that arrived, taken when a chunk
    goes out (a delta whose text is held back sends its entries with a later chunk)."""

    def __init__(self, handle: RequestHandle):
        self.handle, self.arrived_tokens, self.sent, self.offset, self.echoed = handle, 0, 0, 0, False

    def arrived(self, delta: TextDelta) -> None:
        self.arrived_tokens += len(delta.token_ids)

    def take(self) -> list[LogprobEntry] | None:
        if self.handle.params.logprobs is None:
            return None
        entries = [(lp.token, lp) for lp in self.handle.logprobs[self.sent:self.arrived_tokens]]
        self.sent = self.arrived_tokens
        return entries

    def completion_logprobs(self, entries: list[LogprobEntry] | None) -> dict[str, list] | None:
        """_completion_logprobs with text offsets that go on from the chunks before."""
        found = _completion_logprobs(self.handle, entries, self.offset)
        if found is not None:
            self.offset += sum(len(t) for t in found["tokens"])
        return found


def _reason(handle: RequestHandle) -> str | None:
    return handle.finish_reason if handle.finish_reason in ("stop", "length", "content_filter") else None


# ---------------------------------------------------------------------------------------------------- streaming
def _json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON: orjson (a streamed token's chunk in ~1 us, the stdlib takes ~10), or the
    stdlib for what orjson refuses (text with lone surrogates: it escapes them)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj).encode()


def _event(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + _json(obj) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"  # the last event of every stream (OpenAI's)


def _sse(events: AsyncIterator[list[bytes]]) -> _EventStream:
    """A server-sent events response; each list of events from ``events`` goes out in one write."""
    return _EventStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                          "X-Accel-Buffering": "no"})


class _EventStream(StreamingResponse):
    """StreamingResponse's behaviour with less work per write: the event lists are joined and sent as they are
    (bytes already), the last one (ending with DONE_EVENT) in the same write as the end of the chunked body. A
    client that disconnects, or the response's task being cancelled, closes the events at once, so that the
    requests behind them are aborted then rather than when the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self._send_events(send))
        disconnect = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((stream, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            stream.cancel()  # the client went away (or the server cancelled this): the events close
        if stream.done() and not stream.cancelled():
            stream.result()  # raises what failed while streaming (the server then closes the connection)

    async def _send_events(self, send) -> None:
        ended = False
        async with contextlib.aclosing(self.body_iterator) as events:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for batch in events:
                if batch:
                    ended = batch[-1] is DONE_EVENT
                    await send({"type": "http.response.body", "body": b"".join(batch), "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive) -> None:
    """Return once the client has disconnected (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


Arrival = tuple[int, TextDelta | None, Exception | None]  # (choice index, delta, the engine's error)


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[list[Arrival]]:
    """What arrived from all handles since the last batch (each handle's deltas merged). Closing it early (a
    disconnect cancels the response) aborts the requests still running."""
    if len(handles) == 1:  # the common case, without a task per choice
        try:
            async for delta in handles[0].stream(merge=True):
                yield [(0, delta, None)]
        except Exception as e:  # the engine failed on this request
            yield [(0, None, e)]
        return
    queue: asyncio.Queue[Arrival] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        try:
            async for d in h.stream(merge=True):
                queue.put_nowait((i, d, None))
        except Exception as e:
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            left -= sum(delta is None or delta.finished for _, delta, _ in batch)
            yield batch
    finally:
        for t in tasks:
            t.cancel()


async def _completion_chunks(handles: list[RequestHandle], meta: _Meta, include_usage: bool, echo: bool = False
                             ) -> AsyncIterator[list[bytes]]:
    cursors = [_LogprobCursor(h) for h in handles]
    async with contextlib.aclosing(_merged(handles)) as merged:
        async for batch in merged:
            events: list[bytes] = []
            for i, delta, error in batch:
                if (failure := _stream_error(handles[i], error)) is not None:
                    yield [*events, _event(failure), DONE_EVENT]
                    return
                if echo and not cursors[i].echoed:  # the prompt's chunk, once its logprobs have come
                    cursors[i].echoed = True
                    entries = _logprob_entries(handles[i], echo=True, output=False)
                    events.append(meta.chunk("text_completion", {
                        "index": i, "text": _prompt_text(handles[i]), "finish_reason": None,
                        "logprobs": cursors[i].completion_logprobs(entries)}))
                cursors[i].arrived(delta)
                if delta.text or delta.finished:
                    choice = {"index": i, "text": delta.text,
                              "logprobs": cursors[i].completion_logprobs(cursors[i].take()),
                              "finish_reason": _reason(handles[i]) if delta.finished else None}
                    events.append(meta.chunk("text_completion", choice))
            yield events
    yield [*_usage_event(meta, "text_completion", handles, include_usage), DONE_EVENT]


async def _chat_chunks(handles: list[RequestHandle], meta: _Meta, include_usage: bool,
                       new_parser: Callable[[], ReasoningParser], tools: ToolCallParser | None = None
                       ) -> AsyncIterator[list[bytes]]:
    """The chat's SSE events. With tools, the content is held back until the end, then sent as tool_calls
    (finish_reason "tool_calls") or as content: a call's text is only known to be one once it is whole."""
    obj = "chat.completion.chunk"
    yield [meta.chunk(obj, {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                            "logprobs": None}) for i in range(len(handles))]
    parsers = [new_parser() for _ in handles]
    cursors = [_LogprobCursor(h) for h in handles]
    held = [""] * len(handles)  # content held back while tool calls may be in it
    async with contextlib.aclosing(_merged(handles)) as merged:
        async for batch in merged:
            events: list[bytes] = []
            for i, delta, error in batch:
                if (failure := _stream_error(handles[i], error)) is not None:
                    yield [*events, _event(failure), DONE_EVENT]
                    return
                reasoning, content = parsers[i].push(delta.text)
                if delta.finished:
                    r, c = parsers[i].flush()
                    reasoning, content = reasoning + r, content + c
                if tools is not None:
                    held[i], content = held[i] + content, ""
                part = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
                cursors[i].arrived(delta)
                if part:
                    events.append(meta.chunk(obj, {"index": i, "delta": part, "finish_reason": None,
                                                   "logprobs": _chat_logprobs(handles[i], cursors[i].take())}))
                if delta.finished:
                    tool_delta, reason = _tool_delta(handles[i], tools, held[i])
                    if tool_delta:
                        events.append(meta.chunk(obj, {"index": i, "delta": tool_delta, "finish_reason": None,
                                                       "logprobs": None}))
                    events.append(meta.chunk(obj, {"index": i, "delta": {}, "finish_reason": reason,
                                                   "logprobs": _chat_logprobs(handles[i], cursors[i].take())}))
            yield events
    yield [*_usage_event(meta, obj, handles, include_usage), DONE_EVENT]


def _tool_delta(handle: RequestHandle, tools: ToolCallParser | None, held: str) -> tuple[dict[str, Any], str | None]:
    """The last delta of a streamed chat with tools (its calls, or the content held back) and its finish reason."""
    if tools is None:
        return {}, _reason(handle)
    if (found := tools.parse(handle.token_ids)) is not None:
        calls = [call.to_openai(index) for index, call in enumerate(found[1])]
        return {"content": found[0], "tool_calls": calls} if found[0] else {"tool_calls": calls}, "tool_calls"
    return ({"content": held} if held else {}), _reason(handle)


def _tool_parser(service: EngineService, body: ChatCompletionRequest) -> ToolCallParser | None:
    """The request's tool-call parser (None without tools); 400 naming the field of a bad tool or tool_choice."""
    if not body.tools and body.tool_choice in (None, "none"):
        return None
    try:
        tools = check_tools(body.tools) if body.tools is not None else []
        choice = check_tool_choice(body.tool_choice, tools)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
    return ToolCallParser(service.model.tokenizer, tools, choice, service.model.stop_ids()) if tools else None


def _usage_event(meta: _Meta, obj: str, handles: list[RequestHandle], include_usage: bool) -> list[bytes]:
    """The stream's usage chunk (no choices) when the request asked for it (``stream_options``)."""
    return [_event({**meta.envelope(obj, []), "usage": meta.usage(handles)})] if include_usage else []


def _stream_error(handle: RequestHandle, error: Exception | None) -> dict[str, Any] | None:
    """An SSE error event (the openai client raises it; [DONE] follows) for a request that failed, timed out or
    was aborted by the shutdown, else None."""
    if error is not None:
        return APIError(500, f"generation failed: {error}", "server_error").body()
    if handle.finished and (failure := _finish_error(handle)) is not None:
        return failure.body()
    return None


# ---------------------------------------------------------------------------------------------------- metrics
_METRICS = [  # (name, type, help, stats key)
    ("r1kit_requests_total", "counter", "Generation requests accepted.", "requests_total"),
    ("r1kit_requests_running", "gauge", "Requests in the engine now.", "requests_running"),
    ("r1kit_queue_depth", "gauge", "Requests waiting for a slot in the engine.", "queue_depth"),
    ("r1kit_generated_tokens_total", "counter", "Tokens generated.", "tokens_generated"),
    ("r1kit_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", "prompt_tokens"),
    ("r1kit_kv_blocks_free", "gauge", "Free KV cache blocks.", "kv_blocks_free"),
    ("r1kit_kv_blocks_total", "gauge", "KV cache blocks.", "kv_blocks_total"),
    ("r1kit_spec_draft_tokens_total", "counter", "MTP draft tokens verified (speculative decoding).",
     "spec_draft_tokens"),
    ("r1kit_spec_accepted_tokens_total", "counter", "MTP draft tokens accepted (speculative decoding).",
     "spec_accepted_tokens"),
]
_SUMMARIES = [  # (name, help, stats key prefix)
    ("r1kit_time_to_first_token_seconds", "Time from submission to the first generated token.", "ttft_seconds"),
    ("r1kit_request_duration_seconds", "Time from submission to the end of a request.", "request_seconds"),
    ("r1kit_decode_tokens_per_second", "Per-request generation speed after the first token.",
     "decode_tokens_per_second"),
]


def prometheus_text(stats: dict[str, float | int], status_counts: collections.Counter[int]) -> str:
    """The service's stats (and HTTP responses by status) in Prometheus' text exposition format."""
    lines: list[str] = []
    for name, kind, help_, key in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {stats.get(key, 0)}"]
    lines += ["# HELP r1kit_requests_finished_total Finished requests by reason.",
              "# TYPE r1kit_requests_finished_total counter"]
    for reason in ("stop", "length", "abort", "timeout", "error"):
        lines.append(f'r1kit_requests_finished_total{{reason="{reason}"}} {stats.get(f"finished_{reason}", 0)}')
    lines += ["# HELP r1kit_requests_rejected_total Requests refused because the queue was full.",
              "# TYPE r1kit_requests_rejected_total counter",
              f'r1kit_requests_rejected_total{{reason="queue_full"}} {stats.get("rejected_queue_full", 0)}']
    for name, help_, key in _SUMMARIES:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} summary",
                  f"{name}_sum {stats.get(key + '_sum', 0.0)}", f"{name}_count {stats.get(key + '_count', 0)}"]
    lines += _safety_lines(stats)
    lines += ["# HELP r1kit_http_responses_total HTTP responses by status code.",
              "# TYPE r1kit_http_responses_total counter"]
    lines += [f'r1kit_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(status_counts.items())]
    return "\n".join(lines) + "\n"


def _safety_lines(stats: dict[str, float | int]) -> list[str]:
    """The safety shield's counters (stats keys safety_input_<category>, safety_redacted_<type>), when it is on."""
    lines = []
    for prefix, name, label, help_ in (
            ("safety_input_", "r1kit_safety_input_verdicts_total", "category", "Input verdicts by category."),
            ("safety_redacted_", "r1kit_safety_redactions_total", "type", "Output items redacted by type.")):
        keys = sorted(k for k in stats if k.startswith(prefix) and k != "safety_input_blocked")
        if keys:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            lines += [f'{name}{{{label}="{k.removeprefix(prefix)}"}} {stats[k]}' for k in keys]
    return lines


# ---------------------------------------------------------------------------------------------------- running
class _Server(uvicorn.Server):
    """uvicorn that, on SIGINT/SIGTERM, first marks the service closed (new requests: 503) and then shuts
    down as uvicorn does (stop listening, let open responses finish, run the app's shutdown) while the service
    drains: requests still running after ``shutdown_timeout`` are aborted and end with an error response or
    event, before uvicorn (SHUTDOWN_GRACE later) would cut them off."""

    def __init__(self, config: uvicorn.Config, service: EngineService, shutdown_timeout: float,
                 on_exit: Callable[[], None] | None = None):
        super().__init__(config)
        self.service, self.shutdown_timeout, self.on_exit = service, shutdown_timeout, on_exit

    def handle_exit(self, sig, frame) -> None:
        self.service.close()
        if self.on_exit is not None:
            threading.Thread(target=self.on_exit, daemon=True).start()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.ensure_future(asyncio.to_thread(self.service.shutdown, drain=True,
                                                        timeout=self.shutdown_timeout))
        await super().shutdown(sockets)
        if not self.force_exit:
            await drain


class _HTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol plus the header timeout uvicorn lacks (it times out idle keep-alive connections
    only): a connection that has not sent a whole request head ``header_timeout`` seconds after it opened, or
    after its last response, is closed. Slow-loris clients trickling headers no longer hold connections."""

    header_timeout = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout, self.cycle)

    def _header_timeout(self, cycle) -> None:
        """Close the connection unless a request head came since the timer started (a new, or running, cycle)."""
        if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def build_server(service: EngineService, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_tokens_limit: int | None = None, shutdown_timeout: float = 30.0, cors_origins: Sequence[str] = (),
                 header_timeout: float = HEADER_TIMEOUT, keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, log_level: str = "info",
                 on_exit: Callable[[], None] | None = None, sessions: SessionStore | None = None) -> uvicorn.Server:
    """A uvicorn server for ``service`` (started already); ``server.run()`` blocks until SIGTERM/SIGINT (or
    ``server.should_exit = True``). ``on_exit`` runs (in a thread) when a signal asks the server to stop.

    Connections: a request head must arrive within ``header_timeout`` seconds (10) of connecting or of the
    previous response, an idle keep-alive connection closes after ``keep_alive_timeout`` (5), and at most
    ``max_connections`` (512) are served at once: a request on one more gets 503. ``cors_origins``, ``sessions``:
    as create_app."""
    for name, value in (("header_timeout", header_timeout), ("keep_alive_timeout", keep_alive_timeout),
                        ("max_connections", max_connections)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    app = create_app(service, api_key=api_key, max_tokens_limit=max_tokens_limit, shutdown_timeout=shutdown_timeout,
                     cors_origins=cors_origins, sessions=sessions)
    protocol = type("_HTTPProtocol", (_HTTPProtocol,), {"header_timeout": header_timeout})
    cutoff = shutdown_timeout + SHUTDOWN_GRACE  # uvicorn cancels what is left then; the drain ends it before
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                            timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=cutoff,
                            limit_concurrency=max_connections + 1,  # uvicorn counts the connection it answers
                            access_log=log_level == "debug")
    return _Server(config, service, shutdown_timeout, on_exit)


@contextlib.contextmanager
def running_server(service: EngineService, *, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Iterator[str]:
    """Serve ``service`` (started already) from a background thread; yields the base URL ("http://host:port",
    port 0: a free one) and stops the server, draining the service, on exit. ``kw``: as build_server."""
    server = build_server(service, host=host, port=port, log_level=kw.pop("log_level", "warning"), **kw)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="r1kit-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the HTTP server on {host}:{port} did not start (see the log above)")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


__all__ = ["create_app", "build_server", "running_server", "prometheus_text", "APIError", "CompletionRequest",
           "ChatCompletionRequest"]
