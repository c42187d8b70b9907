"""EngineService: text equal to the plain R1Model path, streaming, stop strings, abort/timeout free the KV
blocks, backpressure, drain on shutdown, errors. Runs the bundled r1kit/nano model in fp32 on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from r1kit.api import R1Model
from r1kit.generate import GenerationError, SamplingParams
from r1kit.model.transformer import ContextLengthError
from r1kit.serve import EngineService, QueueFullError, ServiceClosedError

CODE = "import os\nimport sys\n\n\ndef main("  # nano continues this for hundreds of tokens without an eos
QUESTIONS = ["What is 47+38?", "What is 305-178?", "What is 12*7?"]


@pytest.fixture(scope="module")
def model() -> R1Model:
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    model.use_engine = False  # model.generate / chat, the reference, run the plain KV-cache loop (no engine)
    return model


@pytest.fixture
def service(model):
    svc = EngineService(model, max_queue=4, max_num_seqs=4)
    svc.start()
    yield svc
    svc.shutdown(drain=False)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_concurrent_greedy_text_matches_the_plain_model(model, service):
    """Chat prompts batched together in the engine give exactly R1Model.chat's text, token counts included."""
    handles = [service.submit(service.encode_chat([{"role": "user", "content": q}]), greedy(120)) for q in QUESTIONS]
    assert service.model_name == "r1kit/nano"
    for q, h in zip(QUESTIONS, handles, strict=True):
        text, reason = h.result()
        ref = model.chat([{"role": "user", "content": q}], max_new_tokens=120, temperature=0)
        assert text == ref.text and "</think>" in text
        assert reason == "stop"  # the model's end-of-sentence token
        assert (h.prompt_tokens, h.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    stats = service.stats()
    assert stats["requests_total"] == 3 and stats["finished_stop"] == 3
    assert stats["tokens_generated"] == sum(h.completion_tokens for h in handles)
    assert stats["ttft_seconds_count"] == 3 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.parametrize("stop", ["so far", "=85", "\n</think>", "never appears"])
def test_stop_strings_streamed_match_the_plain_model(model, service, stop):
    ids = service.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    deltas = list(service.submit(ids, greedy(120, stop=[stop])))
    ref = model.generate(input_ids=ids, max_new_tokens=120, temperature=0, stop=stop)
    assert "".join(d.text for d in deltas) == ref
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == "stop"
    assert stop not in ref
    assert len(deltas) > 5  # streamed token by token, not in one piece
    assert sum(len(d.token_ids) for d in deltas) == len(deltas)


def test_length_limit_and_completion_prompt(model, service):
    handle = service.submit(service.encode_prompt(CODE), greedy(20))
    text, reason = handle.result()
    assert reason == "length" and handle.completion_tokens == 20
    assert text == model.generate(prompt=CODE, max_new_tokens=20, temperature=0)


def test_async_stream(model, service):
    async def run(merge: bool, lag: float) -> tuple[str, str | None, int, int]:
        handle = service.submit(service.encode_prompt(CODE), greedy(30))
        deltas = []
        async for d in handle.stream(merge=merge):
            deltas.append(d)
            await asyncio.sleep(lag)  # a slow consumer
        tokens = sum(len(d.token_ids) for d in deltas)
        return "".join(d.text for d in deltas), handle.finish_reason, tokens, len(deltas)

    ref = model.generate(prompt=CODE, max_new_tokens=30, temperature=0)
    assert asyncio.run(run(False, 0.0)) == (ref, "length", 30, 30)
    text, reason, tokens, pieces = asyncio.run(run(True, 0.1))  # merged: catches up in fewer pieces
    assert (text, reason, tokens) == (ref, "length", 30) and pieces < 30


def test_abort_frees_kv_blocks(service):
    start = service.stats()["kv_blocks_free"]
    handle = service.submit(service.encode_prompt(CODE), greedy(600))
    stream = iter(handle)
    for _ in range(5):
        assert not next(stream).finished
    assert service.stats()["kv_blocks_free"] < start  # the request holds blocks
    handle.abort()
    handle.abort()  # idempotent
    rest = list(stream)
    assert rest[-1].finished and handle.finish_reason == "abort"
    assert service.stats()["kv_blocks_free"] == start
    assert service.stats()["finished_abort"] == 1


def test_leaving_a_stream_early_aborts(service):
    start = service.stats()["kv_blocks_free"]
    handle = service.submit(service.encode_prompt(CODE), greedy(600))
    for i, _ in enumerate(handle):  # a consumer that goes away (break closes the generator)
        if i == 3:
            break
    wait_for(lambda: handle.finished)
    assert handle.finish_reason == "abort" and handle.completion_tokens < 600
    wait_for(lambda: service.stats()["kv_blocks_free"] == start)

    async def cancelled_task() -> None:  # what a server does when its client disconnects
        h = service.submit(service.encode_prompt(CODE), greedy(600))

        async def consume() -> None:
            async for _ in h.stream():
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0 < h.completion_tokens < 600
        wait_for(lambda: h.finish_reason == "abort")

        h = service.submit(service.encode_prompt(CODE), greedy(600))
        async with contextlib.aclosing(h.stream()) as stream:
            async for _ in stream:
                break
        wait_for(lambda: h.finish_reason == "abort")

    asyncio.run(cancelled_task())
    wait_for(lambda: service.stats()["kv_blocks_free"] == start)


def test_queue_full_then_accepts_again(model):
    svc = EngineService(model, max_queue=1, max_num_seqs=1)
    svc.start()
    try:
        ids = svc.encode_prompt(CODE)
        running, waiting = svc.submit(ids, greedy(600)), svc.submit(ids, greedy(600))
        with pytest.raises(QueueFullError, match="queue full"):
            svc.submit(ids, greedy(4))
        assert svc.stats()["rejected_queue_full"] == 1
        wait_for(lambda: svc.stats()["queue_depth"] == 1 and svc.stats()["requests_running"] == 1)
        waiting.abort()
        running.abort()
        assert running.result()[1] == "abort" and waiting.result()[1] == "abort"
        assert waiting.completion_tokens == 0  # aborted while still queued
        assert svc.submit(ids, greedy(4)).result()[1] == "length"
    finally:
        svc.shutdown(drain=False)


def test_timeout(model):
    svc = EngineService(model, request_timeout=0.3)
    svc.start()
    try:
        start = svc.stats()["kv_blocks_free"]
        handle = svc.submit(svc.encode_prompt(CODE), greedy(600))
        text, reason = handle.result()
        assert reason == "timeout" and 0 < handle.completion_tokens < 600 and text
        assert svc.stats()["kv_blocks_free"] == start and svc.stats()["finished_timeout"] == 1
        quick = svc.submit(svc.encode_prompt(CODE), greedy(600), timeout=0.05)  # per-request override
        assert quick.result()[1] == "timeout"
    finally:
        svc.shutdown(drain=False)


def test_drain_on_shutdown(model):
    svc = EngineService(model, max_num_seqs=2, max_queue=4)
    svc.start()
    ids = svc.encode_prompt(CODE)
    handles = [svc.submit(ids, greedy(40)) for _ in range(3)]  # two run, one waits
    closer = threading.Thread(target=svc.shutdown, kwargs={"drain": True})
    closer.start()
    wait_for(lambda: svc.closed)
    with pytest.raises(ServiceClosedError):
        svc.submit(ids, greedy(4))
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert [h.finish_reason for h in handles] == ["length"] * 3
    assert all(h.completion_tokens == 40 for h in handles)


def test_shutdown_without_drain_aborts(model):
    svc = EngineService(model)
    svc.start()
    handle = svc.submit(svc.encode_prompt(CODE), greedy(600))
    svc.shutdown(drain=False)
    assert handle.finish_reason == "abort"
    with pytest.raises(ServiceClosedError):
        svc.submit([1, 2], greedy(4))


def test_bad_requests_raise_at_submit(model, service):
    ctx = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        service.submit([5] * (ctx - 10), greedy(20))
    with pytest.raises(GenerationError, match="not a token id"):
        service.submit([5, model.config.vocab_size], greedy(4))
    with pytest.raises(GenerationError, match="at least one token"):
        service.submit([], greedy(4))
    with pytest.raises(GenerationError, match="top_p"):
        service.submit([5], _bad_top_p())
    small = EngineService(model, num_blocks=2, block_size=16)  # 32 token slots
    with pytest.raises(GenerationError, match="KV blocks"):
        small.submit([5] * 20, greedy(20))
    with pytest.raises(ServiceClosedError):  # never started
        small.submit([5], greedy(2))
    assert service.stats()["requests_total"] == 0


def _bad_top_p() -> SamplingParams:
    params = SamplingParams(max_new_tokens=4)
    params.top_p = 1.5  # changed after construction: submit validates again
    return params


def test_kv_cache_size(model):
    per_request = model.config.max_position_embeddings // 16
    assert EngineService(model, max_num_seqs=4).kv_blocks_total == 4 * per_request  # room for 4 full contexts
    assert EngineService(model, max_num_seqs=4, kv_cache_bytes=1 << 20).kv_blocks_total == per_request  # capped
    assert EngineService(model, num_blocks=7).kv_blocks_total == 7


def test_stop_string_limits(service):
    ids = service.encode_prompt(CODE)
    with pytest.raises(GenerationError, match="at most 4 strings"):
        service.submit(ids, greedy(4, stop=["a", "b", "c", "d", "e"]))
    with pytest.raises(GenerationError, match="256 characters"):
        service.submit(ids, greedy(4, stop=["x" * 257]))


def test_a_dead_engine_thread_fails_its_requests_and_closes_the_service(model):
    """An unexpected error on the engine thread (here: in the engine itself) ends every request with an error
    and closes the service (health then reports it down), instead of leaving callers waiting forever."""
    svc = EngineService(model, max_queue=4, max_num_seqs=4)
    svc.start()
    try:
        stream = iter(svc.submit(svc.encode_prompt(CODE), greedy(200)))
        next(stream)

        def broken() -> bool:
            raise RuntimeError("simulated engine failure")

        svc.engine.has_unfinished = broken
        with pytest.raises(RuntimeError, match="simulated engine failure"):  # the stream ends with the error
            list(stream)
        assert svc.closed
        with pytest.raises(ServiceClosedError):
            svc.submit(svc.encode_prompt(CODE), greedy(4))
    finally:
        svc.shutdown(drain=False)


@pytest.mark.parametrize("kind", ["local_global", "topk"])
def test_sparse_models_are_served_like_the_plain_loop(make_model, kind):
    """A sparse-attention model (small blocks and windows: these contexts are sparse) in EngineService:
    concurrent requests give R1Model.generate's text on the plain KV-cache loop."""
    sparse = R1Model(make_model("tiny-dense", sparse_attention=kind, sparse_block_size=8, sparse_window_base=4,
                                sparse_window_max=12, sparse_global_tokens=3, sparse_topk_blocks=2), None)
    assert sparse.use_engine  # R1Model.generate runs them on the engine too
    sparse.use_engine = False
    prompts = [list(range(40, 66)), [5, 17, 42], list(range(100, 119))]
    want = [sparse.generate(input_ids=p, max_new_tokens=12, temperature=0) for p in prompts]
    svc = EngineService(sparse, max_num_seqs=4, block_size=4)
    svc.start()
    try:
        handles = [svc.submit(p, greedy(12)) for p in prompts]
        assert [h.result()[0] for h in handles] == want
    finally:
        svc.shutdown(drain=False)
