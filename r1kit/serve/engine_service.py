"""EngineService: one LLMEngine behind a thread-safe, text-level request API for the HTTP and gRPC servers.

    service = EngineService(R1Model.from_pretrained("r1kit/nano"), max_queue=64)
    service.start()
    handle = service.submit(service.encode_prompt("Once upon"), SamplingParams(max_new_tokens=32, stop=["."]))
    for delta in handle:                       # or: async for delta in handle.stream()
        print(delta.text, end="")
    service.shutdown(drain=True)               # in-flight requests finish, new ones are refused

A background thread owns the engine: it admits submitted requests (up to ``max_num_seqs`` in the engine, up
to ``max_queue`` more waiting here), applies aborts and timeouts, loops ``engine.step()`` while work exists,
and turns each request's new token into text (incremental detokenization, stop strings). No other thread
touches the engine, so ``submit`` checks a request against the engine's limits itself and raises at once.

Text: special tokens are not shown; a stop token id ends a request without text; a stop string ends it with
the text before it, and text that might be the start of a stop string is held back while streaming.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from r1kit.api import BUNDLED_DIR, R1Model
from r1kit.engine import LLMEngine, SchedulerError
from r1kit.engine.config import EngineConfig
from r1kit.engine.llm_engine import check_prompt_embeds
from r1kit.generate import GenerationError, SamplingParams, TokenLogprob, check_budget, check_prompt
from r1kit.model.transformer import ContextLengthError
from r1kit.safety.shield import Screening, Shield
from r1kit.structured import Guide, GuideFactory
from r1kit.tokenizer import PlainStreamParser, ReasoningStreamParser, TextStream, Tokenizer

log = logging.getLogger("r1kit")

DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the engine before submit() refuses (HTTP 429)


class QueueFullError(RuntimeError):
    """The service already holds max_num_seqs running + max_queue waiting requests (HTTP 429)."""


class ServiceClosedError(RuntimeError):
    """The service is shutting down or not started: no new requests (HTTP 503)."""


class TextDelta(NamedTuple):
    """New text of one request (possibly empty while text is held back) and the token ids that made it."""

    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | "error" on the last delta


class RequestHandle:
    """One submitted request: iterate it (blocking) or ``async for`` over ``stream()`` to get its TextDeltas.

    Leaving the iteration early (break, a cancelled task, a closed generator) aborts the request.
    """

    def __init__(self, service: EngineService, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: frozenset[int], tokenizer: Tokenizer | None, deadline: float | None,
                 screening: Screening | None = None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.completion_tokens = 0
        self.text = ""  # all text handed out so far (the whole completion once finished)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # set when the engine failed on this request
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.deadline = deadline
        self._service = service
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []  # the generated tokens (tool calls are parsed from them)
        self.guide: Guide | None = None  # the grammar of a structured-output request (set by submit)
        self.prompt_embeds: torch.Tensor | None = None  # the prompt's input embeddings, with media (set by submit)
        self.modality_weights: dict[str, float] | None = None  # the modality gate's, with media (set by the server)
        self.logprobs: list[TokenLogprob] = []  # of each generated token (params.logprobs)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # of each prompt token (params.prompt_logprobs)
        self._text = TextStream(tokenizer, params.stop, stop_ids)
        self._screening = screening  # the safety shield's view of the request: output redaction, audit record
        self._redactor = screening.stream() if screening is not None else None
        self._deltas: collections.deque[TextDelta] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # async consumers

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # ------------------------------------------------------------------------------------------ consumers
    def __iter__(self) -> Iterator[TextDelta]:
        """Deltas as they arrive (blocking); the last one has finished=True. Raises the engine's error if any."""
        done = False
        try:
            while not done:
                with self._cond:
                    while not self._deltas:
                        self._cond.wait()
                    delta = self._deltas.popleft()
                done = delta.finished
                if done and self.error is not None:
                    raise self.error
                yield delta
        finally:
            if not done:
                self.abort()

    async def stream(self, merge: bool = False) -> AsyncIterator[TextDelta]:
        """``__iter__`` for asyncio: awaits deltas without blocking the event loop. With ``merge``, the deltas
        that arrived since the last one are merged into one (text joined, token ids concatenated): a consumer
        that falls behind catches up in fewer, larger pieces."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        event = waiter[1]
        with self._cond:
            self._waiters.append(waiter)
        deltas, done = self._deltas, False
        try:
            while not done:
                if not deltas:
                    # No lock: deque appends and pops are atomic, and the engine thread appends a delta before it has
                    # the event set on this loop, so this clear never drops the wake-up of a delta not yet taken.
                    event.clear()
                    await event.wait()
                    continue
                taken = [deltas.popleft() for _ in range(len(deltas) if merge else 1)]
                delta = taken[0] if len(taken) == 1 else TextDelta(
                    "".join(d.text for d in taken), [t for d in taken for t in d.token_ids], taken[-1].finished,
                    taken[-1].finish_reason)
                done = delta.finished
                if done and self.error is not None:
                    raise self.error
                yield delta
        finally:
            with self._cond:
                self._waiters.remove(waiter)
            if not done:
                self.abort()

    def result(self) -> tuple[str, str | None]:
        """Block until done; returns (the whole text, finish_reason)."""
        for _ in self:
            pass
        return self.text, self.finish_reason

    def abort(self) -> None:
        """Stop the request and free its KV blocks (on the engine thread, within a step). Idempotent."""
        if not self.finished:
            self._service._request_abort(self, "abort")

    # ------------------------------------------------------------------------------------------ engine thread
    def _on_token(self, token: int, finished: bool, reason: str | None) -> TextDelta:
        """Account one generated token and return its delta (finished at a stop id, stop string or the end)."""
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.completion_tokens += 1
        text, ended = self._text.push(token, last=finished)
        if self._redactor is not None:
            text, blocked = self._redactor.push(text, final=ended or finished)
            if blocked:  # the output shield withholds the rest of the response
                self._mark_finished("content_filter")
                return TextDelta(text, [token], True, self.finish_reason)
        if ended or finished:
            self._mark_finished("stop" if ended else reason or "stop")
            return TextDelta(text, [token], True, self.finish_reason)
        return TextDelta(text, [token], False, None)

    def _mark_finished(self, reason: str, error: BaseException | None = None) -> None:
        self.error = error
        self.finish_reason = reason
        self.finished_at = time.monotonic()

    def _put(self, delta: TextDelta, wake: bool = True) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]:
        """Hand a delta to the consumers; returns the async ones to wake (woken here too unless ``wake`` is False:
        the engine thread wakes a whole step's consumers with one call per event loop)."""
        with self._cond:
            self.text += delta.text
            if delta.finished and self._screening is not None:  # queue the audit record
                self._screening.finish(self.text, self._redactor.counts(), self.finish_reason, self.request_id)
            self._deltas.append(delta)
            self._cond.notify_all()
            waiters = list(self._waiters)
        if wake:
            _wake(waiters)
        return waiters


class EngineService:
    """Owns one LLMEngine on a background thread that loops engine.step() while work exists; thread-safe
    submit/abort.

    ``config`` holds the engine's settings (None: the model's ``engine_config``); keyword ``settings``
    override its fields (``EngineService(model, max_num_seqs=4)``). The KV pool is sized up front for
    ``max_num_seqs`` full-context requests within ``kv_cache_bytes`` (see `EngineConfig.kv_blocks`). Up to
    ``max_num_seqs`` requests run in the engine at once and up to ``max_queue`` more wait here; a submit beyond
    that raises QueueFullError. ``request_timeout`` seconds (None: no limit) after submission a request is
    aborted with finish_reason "timeout".
    """

    def __init__(self, model: R1Model, config: EngineConfig | None = None, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout: float | None = None, model_name: str | None = None, shield: Shield | None = None,
                 **settings: Any):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue = {max_queue!r}: must be an int >= 0")
        if request_timeout is not None and not (isinstance(request_timeout, (int, float)) and request_timeout > 0
                                                and math.isfinite(request_timeout)):
            raise ValueError(f"request_timeout = {request_timeout!r}: must be > 0 seconds (or None: no limit)")
        self.config = (config or model.engine_config).replace(**settings)
        self.model = model
        self.model_name = model_name or _model_name(model)
        self.shield = shield  # r1kit.safety: input screening (by the servers), output redaction, audit trail
        self._guides: GuideFactory | None = None  # structured outputs' grammar compiler (new_guide)
        self.context_length = model.config.max_position_embeddings
        self.max_queue, self.max_num_seqs, self.request_timeout = max_queue, self.config.max_num_seqs, request_timeout
        self.engine = LLMEngine(model.model, self.config, stop_ids=model.stop_ids())
        self._stop_ids = frozenset(model.stop_ids())
        self._lock = threading.Condition()  # guards everything below; the engine thread waits on it when idle
        self._waiting: collections.deque[RequestHandle] = collections.deque()  # submitted, not yet in the engine
        self._running: dict[str, RequestHandle] = {}  # in the engine
        self._aborts: list[tuple[RequestHandle, str]] = []  # (handle, reason) to apply on the engine thread
        self._ids = itertools.count()
        self._closed = True  # until start()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters = collections.Counter()  # see stats()
        self._kv_free = self.engine.block_manager.num_free_blocks
        self.kv_blocks_total = self.engine.block_manager.num_blocks

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; submit() is accepted from now on."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("EngineService.start(): already started (a service runs once)")
            self._closed = False
            self._thread = threading.Thread(target=self._loop, args=(torch.get_num_threads(),), name="r1kit-engine",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Refuse new requests from now on (in-flight ones go on); returns at once. shutdown() also does this."""
        with self._lock:
            self._closed = True

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` let in-flight ones finish (for up to ``timeout`` seconds, then
        abort the rest), without it abort them now; then stop the engine thread."""
        with self._lock:
            self._closed = True
            if not drain:
                self._abort_all_locked("abort")
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._waiting or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._abort_all_locked("abort")
                    deadline = None  # the aborts are applied within a step
                    continue
                self._lock.wait(left)
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------------------------------ requests
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a completion prompt (bos as tokenizer_config.json's add_bos_token says). ContextLengthError,
        before tokenizing, for a text longer than the context could hold."""
        tok = self._tokenizer()
        self._check_size(len(text), 0, "the prompt")
        return tok.encode(text, add_bos=tok.add_bos_token and tok.bos_id is not None)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], thinking: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat template, ending with the assistant's turn
        (``<think>`` opened when ``thinking``). TokenizerError for a malformed message; ContextLengthError, before
        tokenizing, for messages longer than the context could hold."""
        tok = self._tokenizer()
        chars = sum(len(m["content"]) for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), str))
        self._check_size(chars, len(messages), "the messages")
        return tok.encode_chat(list(messages), add_generation_prompt=True, thinking=thinking, tools=tools)

    def new_guide(self, spec: Mapping[str, Any], after_think: bool = False) -> Guide:
        """A grammar guide for a structured-output spec (r1kit.structured; the factory is built on first use);
        StructuredError for what the grammar library cannot compile."""
        if self._guides is None:
            self._guides = GuideFactory(self._tokenizer(), self.model.config.vocab_size, self._stop_ids)
        think = self._tokenizer().token_to_id("</think>") if after_think else None
        return self._guides.new(spec, think)

    def reasoning_parser(self, thinking: bool = True) -> ReasoningStreamParser | PlainStreamParser:
        """A new parser splitting a chat completion into (reasoning, content) as the model's chat template
        says (`Tokenizer.reasoning_parser`)."""
        return self._tokenizer().reasoning_parser(thinking)

    def _check_size(self, chars: int, messages: int, what: str) -> None:
        """Refuse text that cannot fit the context, without tokenizing it: tokenizing megabytes holds the GIL for
        seconds and stalls every other request. A prompt has at least one token per message and one per
        ``max_token_bytes`` characters."""
        context = self.context_length
        if messages >= context:
            raise ContextLengthError(f"{what}: {messages} messages, but the model's context is {context} tokens "
                                     "(each message takes at least one)")
        if chars > context and chars > context * self._tokenizer().max_token_bytes:
            raise ContextLengthError(f"{what}: {chars} characters, more than the model's context of {context} tokens "
                                     f"can hold (a token is at most {self._tokenizer().max_token_bytes} bytes); "
                                     "shorten the prompt")

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None,
               timeout: float | None = None, screening: Screening | None = None,
               after_think: bool = False, prompt_embeds: torch.Tensor | None = None) -> RequestHandle:
        """Queue a request; returns its handle at once.

        Raises GenerationError (bad params or token ids, or more KV blocks than the cache holds),
        ContextLengthError (prompt + token budget beyond the context), QueueFullError, ServiceClosedError.
        ``timeout`` overrides the service's request_timeout for this request. ``screening``: the shield's
        verdict on the request's text (``shield.screen``; None with a shield: redaction and audit only).
        ``params.structured``: the grammar is compiled here (StructuredError); with ``after_think`` (a chat whose
        prompt opened ``<think>``) it applies after the model's ``</think>``. ``prompt_embeds`` (len(prompt_ids), C):
        the prompt's input embeddings (media merged at placeholders: `r1kit.serve.media_parts`), see
        `LLMEngine.add_request`.
        """
        prompt = self._check(prompt_ids, params)
        if prompt_embeds is not None:
            check_prompt_embeds(prompt_embeds, len(prompt), self.model.config.hidden_size)
        guide = self.new_guide(params.structured, after_think) if params.structured is not None else None
        if screening is None and self.shield is not None:
            screening = self.shield.unscreened(model=self.model_name)
        timeout = self.request_timeout if timeout is None else timeout
        tok = self.model.tokenizer
        with self._lock:
            if self._closed:
                raise ServiceClosedError("the server is shutting down (or not started): not accepting requests")
            if len(self._waiting) + len(self._running) >= self.max_num_seqs + self.max_queue:
                self._counters["rejected_queue_full"] += 1
                raise QueueFullError(f"queue full: {len(self._running)} requests running and {len(self._waiting)} "
                                     f"waiting (max_queue = {self.max_queue}); retry later")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._running or any(h.request_id == rid for h in self._waiting):
                raise GenerationError(f"request id {rid!r} is already in use")
            handle = RequestHandle(self, rid, prompt, params, self._stop_ids, tok,
                                   None if timeout is None else time.monotonic() + timeout, screening)
            handle.guide, handle.prompt_embeds = guide, prompt_embeds
            self._waiting.append(handle)
            self._counters["requests_total"] += 1
            self._lock.notify_all()
        return handle

    def stats(self) -> dict[str, float | int]:
        """Counters and gauges for /metrics: requests_total, requests_running, queue_depth, tokens_generated,
        prompt_tokens, finished_<reason>, rejected_queue_full, ttft_seconds_sum/count, request_seconds_sum/
        count, decode_tokens_per_second_sum/count (per request, after its first token), kv_blocks_free/total,
        spec_draft_tokens / spec_accepted_tokens (speculative decoding: MTP drafts verified, and accepted)."""
        with self._lock:
            out: dict[str, float | int] = {
                "requests_total": 0, "requests_running": len(self._running), "queue_depth": len(self._waiting),
                "tokens_generated": 0, "prompt_tokens": 0, "rejected_queue_full": 0,
                "ttft_seconds_sum": 0.0, "ttft_seconds_count": 0, "request_seconds_sum": 0.0,
                "request_seconds_count": 0, "decode_tokens_per_second_sum": 0.0,
                "decode_tokens_per_second_count": 0, "kv_blocks_free": self._kv_free,
                "kv_blocks_total": self.kv_blocks_total, "spec_draft_tokens": self.engine.spec_stats.drafted,
                "spec_accepted_tokens": self.engine.spec_stats.accepted}
            out.update(self._counters)
        if self.shield is not None:
            out.update({f"safety_{k}": v for k, v in self.shield.stats().items()})
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _tokenizer(self):
        if self.model.tokenizer is None:
            raise GenerationError(f"{self.model.path}: no tokenizer.json, so text cannot be encoded")
        return self.model.tokenizer

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """The checks LLMEngine.add_request makes (the shared request checks of r1kit.generate), done in the
        caller's thread so that submit raises them; and that the request fits in the KV cache."""
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params must be a SamplingParams, not {type(params).__name__}")
        params.validate()
        self.config.drafts_for(params)  # speculative=True on an engine without drafts
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size)
        need = len(prompt) + check_budget(len(prompt), params, self.context_length)
        bm = self.engine.block_manager
        if bm.blocks_needed(need - 1) > bm.num_blocks:
            raise GenerationError(f"{need} tokens need {bm.blocks_needed(need - 1)} KV blocks but the cache has "
                                  f"{bm.num_blocks}; shorten the request or start the server with more blocks")
        return prompt

    def _request_abort(self, handle: RequestHandle, reason: str) -> None:
        with self._lock:
            self._aborts.append((handle, reason))
            self._lock.notify_all()

    def _abort_all_locked(self, reason: str) -> None:
        self._aborts.extend((h, reason) for h in [*self._waiting, *self._running.values()])
        self._lock.notify_all()

    def _loop(self, num_threads: int) -> None:
        """The engine thread (see _serve); an unexpected error closes the service and fails every request,
        instead of leaving them waiting on a dead thread (health checks then report the replica down)."""
        torch.set_num_threads(num_threads)  # the starting thread's setting (OpenMP keeps it per thread)
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 - anything: the thread must not die silently
            log.exception("engine thread failed: closing the service")
            with self._lock:
                self._closed = True
                handles = [*self._waiting, *self._running.values()]
                self._waiting.clear()
                self._running.clear()
                self._lock.notify_all()
            for handle in handles:
                handle._mark_finished("error", e)
                handle._put(TextDelta("", [], True, "error"))

    def _serve(self) -> None:
        """Admit, abort, time out, step, hand out tokens; sleep when there is no work; return once stopped."""
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running or self._aborts):
                    self._lock.wait()
                if self._stopping and not (self._waiting or self._running or self._aborts):
                    return
                aborts, self._aborts = self._aborts, []
                now = time.monotonic()
                aborts += [(h, "timeout") for h in [*self._waiting, *self._running.values()]
                           if h.deadline is not None and now >= h.deadline]
                for handle, reason in aborts:
                    self._abort_locked(handle, reason)
                admitted = []
                while self._waiting and len(self._running) < self.max_num_seqs:
                    handle = self._waiting.popleft()
                    self._running[handle.request_id] = handle
                    admitted.append(handle)
            for handle in admitted:
                try:
                    self.engine.add_request(handle.request_id, handle.prompt_ids, handle.params, handle.guide,
                                            prompt_embeds=handle.prompt_embeds)
                except (ValueError, SchedulerError) as e:  # submit() checked these: only a race lands here
                    self._fail(handle, e)
            if self.engine.has_unfinished():
                self._step()
            with self._lock:
                self._kv_free = self.engine.block_manager.num_free_blocks
                self._lock.notify_all()  # shutdown() waits for the requests to drain

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step leaves the engine's state unknown: fail every request in it
            with self._lock:
                handles = list(self._running.values())
            for handle in handles:
                self._fail(handle, e)
            return
        with self._lock:
            pairs = [(self._running.get(o.request_id), o) for o in outputs]
        waiters = []
        for handle, o in pairs:
            if handle is None or handle.finished:
                continue
            if o.error is not None:  # this request alone failed (its sampling); the engine freed its blocks
                log.warning("request %s failed: %s", handle.request_id, o.error)
                self._fail(handle, o.error)
                continue
            handle.token_ids.append(o.token)
            if o.logprobs is not None:  # before the delta: a consumer reads them by its token count
                handle.logprobs.append(o.logprobs)
            if o.prompt_logprobs is not None:
                handle.prompt_logprobs = o.prompt_logprobs
            delta = handle._on_token(o.token, o.finished, o.finish_reason.value if o.finish_reason else None)
            if delta.finished:
                with self._lock:
                    if not o.finished:  # a stop string: the engine still runs it
                        self._abort_engine(handle.request_id)
                    self._retire_locked(handle)
            waiters += handle._put(delta, wake=False)  # after the KV blocks are freed: a consumer may check them
        _wake(waiters)

    def _abort_locked(self, handle: RequestHandle, reason: str) -> None:
        """Apply an abort or timeout on the engine thread (lock held)."""
        if handle.finished:
            return
        if handle.request_id in self._running:
            self._abort_engine(handle.request_id)
        else:
            self._waiting.remove(handle)
        handle._mark_finished(reason)
        self._retire_locked(handle)
        handle._put(TextDelta("", [], True, reason))

    def _abort_engine(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except SchedulerError:  # finished in the engine already (or never added after a failed add_request)
            pass
        self._kv_free = self.engine.block_manager.num_free_blocks

    def _fail(self, handle: RequestHandle, error: BaseException) -> None:
        with self._lock:
            if handle.request_id in self._running:
                self._abort_engine(handle.request_id)
            handle._mark_finished("error", error)
            self._retire_locked(handle)
            self._counters["failed"] += 1
        handle._put(TextDelta("", [], True, "error"))

    def _retire_locked(self, handle: RequestHandle) -> None:
        """Forget a finished request and add it to the counters."""
        self._running.pop(handle.request_id, None)
        c = self._counters
        c["tokens_generated"] += handle.completion_tokens
        c["prompt_tokens"] += handle.prompt_tokens
        c[f"finished_{handle.finish_reason}"] += 1
        end = handle.finished_at or time.monotonic()
        c["request_seconds_sum"] += end - handle.submitted_at
        c["request_seconds_count"] += 1
        if handle.first_token_at is not None:
            c["ttft_seconds_sum"] += handle.first_token_at - handle.submitted_at
            c["ttft_seconds_count"] += 1
            if handle.completion_tokens > 1 and end > handle.first_token_at:
                c["decode_tokens_per_second_sum"] += (handle.completion_tokens - 1) / (end - handle.first_token_at)
                c["decode_tokens_per_second_count"] += 1


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Set the events, with one call_soon_threadsafe per event loop (one wake-up of each loop, not one per
    request)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, event in waiters:
        by_loop.setdefault(loop, []).append(event)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _model_name(model: R1Model) -> str:
    """The name clients use: "r1kit/<name>" for a bundled model, else the checkpoint folder's name."""
    path = model.path
    if path is None:
        return "r1kit-model"
    if path.resolve().parent == BUNDLED_DIR.resolve():
        return f"r1kit/{path.name}"
    return path.name


__all__ = ["EngineService", "RequestHandle", "TextDelta", "QueueFullError", "ServiceClosedError"]
