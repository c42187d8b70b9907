"""Protocol hardening of the HTTP server, on real loopback servers: OpenAI parameters it does not implement are
refused by name (their "off" values accepted), newer message shapes (content parts, the developer role, null
assistant content), chunked bodies over the limit, slow-loris connections and the connection limit, HEAD,
OPTIONS and CORS, no page that needs the internet, and a shutdown timeout that expires mid-stream."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

import openai
import pytest
from test_serve_http import AUTH, CODE, KEY, MODEL, QUESTION, client, request, wait_for

from r1kit.api import R1Model
from r1kit.serve.engine_service import EngineService
from r1kit.serve.openai_api import UNSUPPORTED_PARAMS, running_server


@pytest.fixture(scope="module")
def model() -> R1Model:
    model = R1Model.from_pretrained(MODEL, device="cpu", dtype="fp32")
    model.use_engine = False  # the reference (model.chat) runs the plain KV-cache loop, not an engine
    return model


@contextlib.contextmanager
def serve(model: R1Model, **server_kw) -> Iterator[str]:
    """A real server (API key KEY) on a free loopback port, in a thread; ``server_kw``: as build_server."""
    service = EngineService(model, max_num_seqs=4, max_queue=4)
    service.start()
    try:
        with running_server(service, api_key=KEY, **server_kw) as base:
            yield base
    finally:
        service.shutdown(drain=False)


@pytest.fixture(scope="module")
def base(model) -> Iterator[str]:
    with serve(model) as url:
        yield url


class Reply(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def raw(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """One request of any method over http.client."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------- parameters
TURNED_ON = {  # one value per UNSUPPORTED_PARAMS row that asks for the feature
    "logprobs": True, "top_logprobs": 3, "echo": True, "suffix": "\n}", "best_of": 3, "logit_bias": {"50": 5},
    "frequency_penalty": 0.5, "presence_penalty": -0.5,
    "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "parallel_tool_calls": True, "functions": [{"name": "add"}], "function_call": "auto",
}  # response_format: implemented by both endpoints (#13, tests/test_structured.py)


def test_every_unsupported_parameter_has_a_case():
    assert set(TURNED_ON) == set(UNSUPPORTED_PARAMS)


IMPLEMENTED = {"/v1/chat/completions": {"logprobs", "top_logprobs", "tools", "tool_choice"},  # #13
               "/v1/completions": {"logprobs", "echo"}}


@pytest.mark.parametrize("name", sorted(TURNED_ON))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unsupported_parameters_are_refused_by_name(base, path, name):
    if name in IMPLEMENTED[path]:
        pytest.skip(f"{path} implements {name} (tests/test_logprobs.py, tests/test_tools.py)")
    body = {"model": MODEL, "max_tokens": 1, name: TURNED_ON[name]}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "def "})
    status, reply = request(base, "POST", path, json.dumps(body).encode())
    assert status == 400, reply
    error = reply["error"]
    assert (error["param"], error["code"], error["type"]) == (name, "unsupported_parameter", "invalid_request_error")
    assert error["message"].startswith(f"{name} = ") and "not supported" in error["message"]


def test_off_values_and_harmless_fields_are_accepted(base):
    c = client(base)
    with pytest.raises(openai.BadRequestError) as err:  # the official client, a parameter turned on
        c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, frequency_penalty=0.5)
    assert err.value.body["param"] == "frequency_penalty"
    chat = c.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, logprobs=False, top_logprobs=0, tools=[], tool_choice="none",
        response_format={"type": "text"}, frequency_penalty=0, presence_penalty=0.0, logit_bias={},
        parallel_tool_calls=False, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
        extra_body={"functions": None, "function_call": "none", "best_of": 1})
    assert chat.usage.completion_tokens == 2
    completion = c.completions.create(model=MODEL, prompt="def ", max_tokens=2, n=2, best_of=2, echo=False,
                                      logprobs=None, suffix="", user="u1")
    assert [choice.index for choice in completion.choices] == [0, 1]


# ---------------------------------------------------------------------------------------------------- messages
def test_content_parts_developer_role_and_null_assistant_content(model, base):
    c = client(base)
    given = [{"role": "developer", "content": "Answer with a number."},
             {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": None},
             {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "47+38?"}]}]
    meant = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": ""}, {"role": "user", "content": "What is\n47+38?"}]
    reply = c.chat.completions.create(model=MODEL, messages=given, max_tokens=24, temperature=0)
    ref = model.chat(meant, max_new_tokens=24, temperature=0)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (ref.reasoning, ref.content)
    assert reply.usage.prompt_tokens == ref.prompt_tokens

    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "messages[0].content[1]" in err.value.body["message"] and "image" in err.value.body["message"]
    assert err.value.body["param"] == "messages.0.content.1.type"
    for content in (None, [{"type": "text"}]):
        status, error = request(base, "POST", "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode())
        assert status == 400 and "messages[0].content" in error["error"]["message"], error


# ---------------------------------------------------------------------------------------------------- bodies
def test_chunked_body_over_the_limit_is_413(base):
    host, port = base.removeprefix("http://").split(":")

    def post_chunked(parts: list[bytes]) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", body=iter(parts), headers={**AUTH, "Transfer-Encoding": "chunked"},
                     encode_chunked=True)
        response = conn.getresponse()
        try:
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    big = json.dumps({"model": MODEL, "prompt": "x" * (1 << 20), "max_tokens": 1}).encode()
    status, reply = post_chunked([big[i:i + 65536] for i in range(0, len(big), 65536)])
    assert status == 413 and "larger than" in reply["error"]["message"], reply
    assert reply["error"]["code"] == "request_too_large"
    small = json.dumps({"model": MODEL, "prompt": "def ", "max_tokens": 2}).encode()
    status, reply = post_chunked([small[:10], small[10:]])  # a chunked body within the limit is served
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply


# ---------------------------------------------------------------------------------------------------- connections
def connect(url: str, data: bytes = b"") -> socket.socket:
    """A raw connection to the server at ``url`` that has sent ``data``."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)
    sock.sendall(data)
    return sock


def closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (reading what it sends first)."""
    start = time.monotonic()
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_slow_loris_connections_are_closed(model):
    timeout = 1.0
    with serve(model, header_timeout=timeout) as url:
        # connections that trickle a request head are closed after the timeout; others are served meanwhile
        partial = [connect(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl") for _ in range(20)]
        started = time.monotonic()
        assert raw(url, "GET", "/health").status == 200
        waits = [closed_after(sock) for sock in partial]
        assert 0.5 * timeout < time.monotonic() - started and max(waits) < 10 * timeout
        # ... also on a keep-alive connection, after its first response
        kept = connect(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert closed_after(kept) < 10 * timeout
        assert raw(url, "GET", "/health").status == 200
        for sock in [*partial, kept]:
            sock.close()


def test_over_the_connection_limit_is_503_not_a_hang(model):
    with serve(model, max_connections=8) as url:
        idle = [connect(url) for _ in range(8)]
        assert raw(url, "GET", "/health").status == 503  # the server accepts in order: the 8 are open by now
        for sock in idle:
            sock.close()
        wait_for(lambda: raw(url, "GET", "/health").status == 200)


# ---------------------------------------------------------------------------------------------------- methods
def test_head_and_options_without_cors(base):
    for path, kind in (("/", "text/html"), ("/health", "application/json")):
        response = raw(base, "HEAD", path)
        assert response.status == 200 and response.headers.get("Content-Type").startswith(kind)
        assert response.body == b""
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    for headers in ({}, preflight):  # no key needed; no CORS headers: browsers keep other origins out
        response = raw(base, "OPTIONS", "/v1/chat/completions", headers)
        assert response.status == 204, response.body
        assert set(response.headers.get("Allow").split(", ")) == {"POST", "OPTIONS"}
        assert response.headers.get("Access-Control-Allow-Origin") is None
    assert set(raw(base, "OPTIONS", "/health").headers.get("Allow").split(", ")) == {"GET", "HEAD", "OPTIONS"}
    assert raw(base, "OPTIONS", "/nothing").status == 404


def test_cors_origins(model):
    origin = "http://app.example"
    with serve(model, cors_origins=[origin]) as url:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        response = raw(url, "OPTIONS", "/v1/chat/completions", preflight)
        assert response.status == 200 and response.headers.get("Access-Control-Allow-Origin") == origin
        assert "authorization" in response.headers.get("Access-Control-Allow-Headers").lower()
        response = raw(url, "OPTIONS", "/v1/chat/completions", {**preflight, "Origin": "http://evil.example"})
        assert response.headers.get("Access-Control-Allow-Origin") is None
        # the actual requests carry the header, errors too (a browser page can then read the 401's message)
        response = raw(url, "GET", "/v1/models", {"Origin": origin, "Authorization": f"Bearer {KEY}"})
        assert response.status == 200 and response.headers.get("Access-Control-Allow-Origin") == origin
        response = raw(url, "GET", "/v1/models", {"Origin": origin})
        assert response.status == 401 and response.headers.get("Access-Control-Allow-Origin") == origin


def test_no_page_needs_the_internet(base):
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert raw(base, "GET", path).status == 404
    assert raw(base, "GET", "/openapi.json").status == 200
    page = raw(base, "GET", "/")
    assert page.status == 200 and b"<html" in page.body
    urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", page.body.decode())
    assert urls == [], urls  # no script, style, font or image from elsewhere


# ---------------------------------------------------------------------------------------------------- shutdown
def test_shutdown_timeout_mid_stream_ends_with_an_error_event():
    """A real `r1kit serve` with a short --shutdown-timeout, SIGTERM while a long stream runs: the stream ends
    with an OpenAI-shaped error event and [DONE], the process exits 0 and logs no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r1kit", "serve", MODEL, "--port", str(port), "--device", "cpu",
                             "--dtype", "fp32", "--shutdown-timeout", "0.3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return raw(url, "GET", "/health").status == 200
            except OSError:
                return False

        wait_for(up, timeout=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": MODEL, "prompt": CODE, "max_tokens": 1000, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")  # the stream is running
        proc.send_signal(signal.SIGTERM)
        events = [line[6:].decode() for line in response.read().splitlines() if line.startswith(b"data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert (error["code"], error["type"]) == ("shutting_down", "service_unavailable") and error["message"]
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])  # cut short
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read().decode()
        assert "Traceback" not in log and "Cancel" not in log, log
        assert "Application shutdown complete" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(base):
    """~1 MB of prompt (under the body limit) is a 400 at once, as over gRPC: the shared size bound in
    EngineService.encode_prompt / encode_chat refuses it without tokenizing (which would stall the server)."""
    text = "ab " * 330_000
    start = time.monotonic()
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]})):
        status, reply = request(base, "POST", path, json.dumps(body).encode(), {**AUTH, "Content-Type":
                                                                                 "application/json"})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        assert "characters, more than the model's context" in reply["error"]["message"]
    assert time.monotonic() - start < 3.0
