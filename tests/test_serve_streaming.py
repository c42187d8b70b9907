"""The HTTP server's event streams on the wire, read from a real loopback server with a raw socket: each HTTP
chunk holds whole events, the usage chunk and [DONE] go out in the stream's last write (with the end of the
body), failures end the same way, a client that leaves while its request still waits in the queue aborts it;
handle.stream() against an engine thread putting deltas; the JSON fallback for text orjson refuses; and
benchmarks/bench_serve.py with --profile, as a subprocess.
Model: the bundled r1kit/nano in fp32."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from r1kit.api import R1Model
from r1kit.generate import SamplingParams
from r1kit.serve.engine_service import EngineService, RequestHandle, TextDelta
from r1kit.serve.openai_api import _json, running_server

MODEL = "r1kit/nano"
CODE = "import os\nimport sys\n\n\ndef main("  # nano continues this for hundreds of tokens
QUESTION = [{"role": "user", "content": "What is 47+38?"}]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> R1Model:
    model = R1Model.from_pretrained(MODEL, device="cpu", dtype="fp32")
    model.use_engine = False  # the reference (model.chat) runs the plain KV-cache loop, not an engine
    return model


@contextlib.contextmanager
def serving(model: R1Model, **service_kw) -> Iterator[tuple[tuple[str, int], EngineService]]:
    """A real server on a free loopback port: yields ((host, port), its EngineService)."""
    service = EngineService(model, **service_kw)
    service.start()
    try:
        with running_server(service) as base:
            host, port = base.removeprefix("http://").split(":")
            yield (host, int(port)), service
    finally:
        service.shutdown(drain=False)


def post(address: tuple[str, int], path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(address, timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 f"{len(data)}\r\n\r\n".encode() + data)
    return sock


def read_chunked(sock: socket.socket) -> tuple[bytes, list[bytes]]:
    """(the response head, the payload of each HTTP chunk) of one chunked response."""
    reader = sock.makefile("rb")
    head = b""
    while (line := reader.readline()) not in (b"\r\n", b""):
        head += line
    chunks = []
    while (size := int(reader.readline().strip(), 16)) > 0:
        chunks.append(reader.read(size))
        assert reader.read(2) == b"\r\n"
    assert reader.read(2) == b"\r\n"  # the end of the body
    return head, chunks


def events(chunk: bytes) -> list[bytes]:
    """The events of one HTTP chunk, which must hold whole events only."""
    assert chunk.endswith(b"\n\n"), chunk
    out = chunk[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in out), chunk
    return [e.removeprefix(b"data: ") for e in out]


def test_a_chat_stream_ends_with_usage_and_done_in_one_write(model):
    ref = model.chat(QUESTION, max_new_tokens=200, temperature=0)
    with serving(model, max_num_seqs=2) as (address, _):
        sock = post(address, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": 0,
                                                      "max_tokens": 200, "stream": True,
                                                      "stream_options": {"include_usage": True}})
        head, chunks = read_chunked(sock)
        sock.close()
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: text/event-stream" in head.lower()
    assert b"cache-control: no-cache" in head.lower() and b"transfer-encoding: chunked" in head.lower()
    *body, last = [events(c) for c in chunks]
    assert len(last) == 2 and last[1] == b"[DONE]"  # usage and [DONE] in the stream's last write
    usage = json.loads(last[0])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == ref.completion_tokens
    parsed = [json.loads(e) for chunk in body for e in chunk]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [p["choices"][0]["delta"] for p in parsed]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == ref.reasoning
    assert "".join(d.get("content", "") for d in deltas) == ref.content
    assert [p["choices"][0]["finish_reason"] for p in parsed if p["choices"][0]["finish_reason"]] == ["stop"]
    assert len(body) > 10  # token by token: a write per token, not the whole answer at once


def test_a_failed_stream_ends_with_the_error_and_done_in_one_write(model):
    with serving(model, max_num_seqs=2, request_timeout=0.5) as (address, service):
        sock = post(address, "/v1/completions", {"model": MODEL, "prompt": CODE, "max_tokens": 600,
                                                 "temperature": 0, "stream": True, "n": 2})
        _, chunks = read_chunked(sock)
        sock.close()
        assert service.stats()["finished_timeout"] == 2
    *body, last = [events(c) for c in chunks]
    assert last[-1] == b"[DONE]" and "timeout" in json.loads(last[-2])["error"]["message"]
    assert {c["index"] for chunk in body for e in chunk for c in json.loads(e)["choices"]} == {0, 1}


def test_a_client_leaving_while_its_stream_is_queued_aborts_it(model):
    with serving(model, max_num_seqs=1, max_queue=2) as (address, service):
        running = post(address, "/v1/completions", {"model": MODEL, "prompt": CODE, "max_tokens": 600,
                                                    "temperature": 0, "stream": True})
        running.makefile("rb").readline()  # the status line: the request is in the engine
        queued = post(address, "/v1/completions", {"model": MODEL, "prompt": CODE, "max_tokens": 600,
                                                   "temperature": 0, "stream": True})
        deadline = time.monotonic() + 20
        while service.stats()["queue_depth"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        queued.close()  # no token was ever sent to it: only the disconnect can tell
        while service.stats().get("finished_abort", 0) != 1:
            assert time.monotonic() < deadline, "the queued request was not aborted"
            time.sleep(0.02)
        assert service.stats()["queue_depth"] == 0 and service.stats()["requests_running"] == 1
        running.close()


@pytest.mark.parametrize("merge", [False, True])
def test_stream_takes_every_delta_an_engine_thread_puts_in_order(model, merge):
    """handle.stream() takes deltas without the handle's lock while the engine thread appends them: none is lost
    or reordered, and no wake-up is missed (the stream would hang), however the two threads interleave."""
    service = EngineService(model, max_num_seqs=1)
    handle = RequestHandle(service, "r", [1], SamplingParams(max_new_tokens=1), frozenset(), None, None)
    n = 5_000

    def engine() -> None:
        for i in range(n):
            handle._put(TextDelta(f"{i},", [i], i == n - 1, "stop" if i == n - 1 else None))
            if i % 500 == 0:
                time.sleep(0.001)  # let the consumer catch up and wait again

    async def consume() -> tuple[str, list[int], int]:
        text, ids, pieces = "", [], 0
        async for d in handle.stream(merge=merge):
            text, ids, pieces = text + d.text, ids + d.token_ids, pieces + 1
        return text, ids, pieces

    async def run() -> tuple[str, list[int], int]:
        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0)  # the stream registers its waiter before the engine starts
        producer = threading.Thread(target=engine)
        producer.start()
        try:
            return await asyncio.wait_for(consumer, 60)
        finally:
            producer.join()

    text, ids, pieces = asyncio.run(run())
    assert text == "".join(f"{i}," for i in range(n)) and ids == list(range(n))
    assert pieces == n if not merge else pieces <= n


def test_json_is_compact_utf8_and_escapes_what_orjson_refuses():
    assert _json({"text": "é 😀", "n": None}) == '{"text":"é 😀","n":null}'.encode()
    lone = {"message": "bad \ud800 text"}  # a lone surrogate (valid as a JSON escape, not as UTF-8)
    assert _json(lone) == b'{"message": "bad \\ud800 text"}' and json.loads(_json(lone)) == lone


def test_bench_serve_profiles_the_servers_event_loop(tmp_path):
    out, prof = tmp_path / "bench.json", tmp_path / "serve.prof"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--concurrency", "2",
                          "--requests", "2", "--max-tokens", "4", "--json", str(out), "--profile", str(prof)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    (level,) = json.loads(out.read_text())["levels"]
    http = level["http"]
    assert http["errors"] == 0 and http["tokens"] == 8
    assert set(http["cpu_ms_per_token_by_part"]) == {"server_engine", "server_loop", "client"}
    assert set(level["in_process"]["cpu_ms_per_token_by_part"]) == {"engine", "loop"}
    assert isinstance(level["loop_overhead"], float)
    assert "server event loop under cProfile" in run.stdout and "| r1kit SSE chunks (openai_api) |" in run.stdout
