"""The OpenAI-compatible HTTP server, on real loopback servers: the official `openai` client (chat, completion,
streaming, errors), validation, API key, backpressure, timeouts, client disconnects, SIGTERM in a real
subprocess, and fuzzing from the server's own OpenAPI document. Model: the bundled r1kit/nano in fp32."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from r1kit.api import R1Model
from r1kit.serve.engine_service import EngineService
from r1kit.serve.openai_api import running_server

KEY = "test-key-123"
MODEL = "r1kit/nano"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CODE = "import os\nimport sys\n\n\ndef main("  # nano continues this for hundreds of tokens
QUESTION = [{"role": "user", "content": "What is 47+38?"}]


@pytest.fixture(scope="module")
def model() -> R1Model:
    model = R1Model.from_pretrained(MODEL, device="cpu", dtype="fp32")
    model.use_engine = False  # the reference (model.generate / chat) runs the plain KV-cache loop, not an engine
    return model


@contextlib.contextmanager
def http_server(model: R1Model, api_key: str | None = KEY, max_tokens_limit: int | None = None,
                **service_kw) -> Iterator[tuple[str, EngineService]]:
    """A real server on a free loopback port, in a thread: yields (base url, its EngineService)."""
    service = EngineService(model, **service_kw)
    service.start()
    try:
        with running_server(service, api_key=api_key, max_tokens_limit=max_tokens_limit) as base:
            yield base, service
    finally:
        service.shutdown(drain=False)


@pytest.fixture(scope="module")
def server(model) -> Iterator[tuple[str, EngineService]]:
    with http_server(model, max_num_seqs=4, max_queue=4) as s:
        yield s


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def request(base: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, data=body, method=method, headers=AUTH if headers is None else headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------------- openai client
def test_chat_completion_with_reasoning_matches_the_model(model, server):
    base, _ = server
    ref = model.chat(QUESTION, max_new_tokens=200, temperature=0)
    reply = client(base).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=200)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (ref.reasoning, ref.content)
    assert ref.reasoning and ref.content
    assert reply.choices[0].finish_reason == "stop" and reply.model == MODEL
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert reply.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_chat_streaming_reasoning_then_content(model, server):
    base, _ = server
    ref = model.chat(QUESTION, max_new_tokens=200, temperature=0)
    stream = client(base).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=200,
                                                  stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage, order = [], [], [], None, []
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            reasoning.append(delta.reasoning_content)
            order.append("r")
        if delta.content:
            content.append(delta.content)
            order.append("c")
        finish.append(chunk.choices[0].finish_reason)
    assert "".join(reasoning) == ref.reasoning and "".join(content) == ref.content
    assert len(reasoning) > 10  # token by token
    assert order == sorted(order, reverse=True)  # all reasoning before any content
    assert [f for f in finish if f] == ["stop"] and finish[-1] == "stop"
    assert usage.completion_tokens == ref.completion_tokens and usage.prompt_tokens == ref.prompt_tokens


def test_completions_stop_n_seed_and_streaming(model, server):
    base, _ = server
    c = client(base)
    ref = model.generate(prompt=CODE, max_new_tokens=24, temperature=0)
    out = c.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0)
    assert out.choices[0].text == ref and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24 and out.object == "text_completion"
    stop = ref[8:12]
    out = c.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == model.generate(prompt=CODE, max_new_tokens=24, temperature=0, stop=stop)
    assert out.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == ref
    # n choices, a list of prompts; a seed makes sampled choices reproducible
    kw = dict(model=MODEL, prompt=[CODE, "def "], max_tokens=12, temperature=1.0, n=2, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert a.choices[0].text != a.choices[1].text  # the n choices of one prompt get different seeds


def test_models_health_metrics_openapi(server):
    base, service = server
    c = client(base)
    assert [m.id for m in c.models.list()] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    status, body = request(base, "GET", "/health", headers={})
    assert (status, body["status"], body["model"]) == (200, "ok", MODEL)
    c.completions.create(model=MODEL, prompt="def ", max_tokens=3, temperature=0)
    with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=AUTH)) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        metrics = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if not line.startswith("#"))
    stats = service.stats()
    assert int(metrics["r1kit_requests_total"]) == stats["requests_total"] >= 1
    assert int(metrics["r1kit_generated_tokens_total"]) == stats["tokens_generated"] >= 3
    assert int(metrics["r1kit_time_to_first_token_seconds_count"]) >= 1
    assert float(metrics["r1kit_time_to_first_token_seconds_sum"]) > 0
    for name in ("r1kit_queue_depth", "r1kit_requests_running", "r1kit_decode_tokens_per_second_sum",
                 'r1kit_http_responses_total{code="200"}', 'r1kit_requests_finished_total{reason="length"}'):
        assert name in metrics
    status, spec = request(base, "GET", "/openapi.json", headers={})
    assert status == 200 and {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(spec["paths"])


def test_api_key(server):
    base, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        assert request(base, "GET", "/v1/models", headers=headers)[0] == 401
        assert request(base, "GET", "/metrics", headers=headers)[0] == 401
    assert request(base, "GET", "/health", headers={})[0] == 200  # open: load balancers probe it


# ---------------------------------------------------------------------------------------------------- bad input
BAD_REQUESTS = [  # (path, body, status, words in the message)
    ("/v1/completions", b"{bad json", 400, "not valid JSON"),
    ("/v1/completions", b'{"model": "r1kit/nano", "prompt": "caf\xe9 \xff"}', 400, "JSON"),
    ("/v1/completions", b"[1, 2]", 400, "dictionary"),
    ("/v1/completions", b'{"model": "r1kit/nano", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 100}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 9}, 400, "capacity"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "context"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "1+1=2. " * 400}]}, 400,
     "context"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * (1 << 20)}, 413, "larger than"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_clear_4xx(server, path, body, status, words):
    base, _ = server
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, reply = request(base, "POST", path, data)
    assert got == status, reply
    assert words in reply["error"]["message"] and reply["error"]["type"]
    if words == "context":
        assert reply["error"]["code"] == "context_length_exceeded"


def test_unknown_paths_and_methods_are_json_errors(server):
    base, service = server
    assert request(base, "GET", "/v1/nothing")[0] == 404
    status, reply = request(base, "DELETE", "/v1/models")
    assert status == 405 and reply["error"]["message"]
    assert "failed" not in service.stats()  # no engine failures
    out = client(base).completions.create(model=MODEL, prompt="def ", max_tokens=2)  # still serving
    assert out.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------------- load, time
def test_queue_full_is_429_then_recovers(model):
    with http_server(model, max_num_seqs=1, max_queue=1) as (base, service):
        c = client(base)
        stream = c.completions.create(model=MODEL, prompt=CODE, max_tokens=600, temperature=0, n=2, stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model=MODEL, prompt="def ", max_tokens=2)
        assert err.value.response.headers["Retry-After"] == "1"
        assert "queue full" in err.value.body["message"]
        stream.close()  # disconnect: both choices are aborted
        wait_for(lambda: service.stats()["requests_running"] + service.stats()["queue_depth"] == 0)
        assert c.completions.create(model=MODEL, prompt="def ", max_tokens=2).usage.completion_tokens == 2
        assert service.stats()["rejected_queue_full"] == 1


def test_request_timeout_is_504(model):
    with http_server(model, request_timeout=0.4) as (base, service):
        c = client(base)
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model=MODEL, prompt=CODE, max_tokens=600, temperature=0)
        assert err.value.status_code == 504 and "timeout" in err.value.body["message"]
        with pytest.raises(openai.APIError, match="timeout"):  # streamed: an error event ends the stream
            # (CODE: nano continues it for hundreds of tokens, far longer than the timeout, whatever the speed)
            for _ in c.completions.create(model=MODEL, prompt=CODE, max_tokens=600, stream=True, temperature=0):
                pass
        assert service.stats()["finished_timeout"] >= 1


def test_client_disconnect_aborts_and_frees_kv_blocks(server):
    base, service = server
    start, aborted = service.stats()["kv_blocks_free"], service.stats().get("finished_abort", 0)
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": CODE, "max_tokens": 600, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers=AUTH)
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(6):  # a few tokens in
        assert response.fp.readline()
    assert service.stats()["kv_blocks_free"] < start
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: service.stats().get("finished_abort", 0) == aborted + 1)
    wait_for(lambda: service.stats()["kv_blocks_free"] == start)
    # a client that gives up on a non-streamed request too
    sock = socket.create_connection((host, int(port)))
    body = json.dumps({"model": MODEL, "prompt": CODE, "max_tokens": 600, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    wait_for(lambda: service.stats()["requests_running"] == 1)
    sock.close()
    wait_for(lambda: service.stats().get("finished_abort", 0) == aborted + 2)
    wait_for(lambda: service.stats()["kv_blocks_free"] == start)


def test_sigterm_finishes_in_flight_and_refuses_new():
    """A real `r1kit serve` process: SIGTERM mid-stream lets the stream finish, refuses new work, exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r1kit", "serve", MODEL, "--port", str(port), "--device", "cpu",
                             "--dtype", "fp32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return request(base, "GET", "/health", headers={})[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=60)
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        stream = c.completions.create(model=MODEL, prompt=CODE, max_tokens=40, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):  # refused, or 503
            c.completions.create(model=MODEL, prompt="def ", max_tokens=2)
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 40
        assert [ch.choices[0].finish_reason for ch in rest if ch.choices][-1] == "length"
        assert proc.wait(timeout=30) == 0
        assert b"Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------- fuzzing
def test_fuzz_from_the_openapi_document(model):
    """Schemathesis generates valid and invalid requests for every operation: never a 5xx, still serving."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    with http_server(model, max_tokens_limit=4, max_num_seqs=4, max_queue=16) as (base, service):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        auth = {"Authorization": f"Bearer {KEY}"}
        seen: list[int] = []
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @settings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(operation.as_strategy(generation_mode=mode))
                def check(case) -> None:
                    response = case.call(base_url=base, headers=auth, timeout=30)
                    seen.append(response.status_code)
                    assert response.status_code < 500, (case.method, case.path, case.body, response.text)

                try:
                    check()
                except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                    assert mode is schemathesis.GenerationMode.NEGATIVE
        assert len(seen) > 50 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
        assert request(base, "GET", "/health", headers={})[0] == 200
        assert client(base).completions.create(model=MODEL, prompt="def ", max_tokens=2).usage.completion_tokens == 2
        assert "failed" not in service.stats()
