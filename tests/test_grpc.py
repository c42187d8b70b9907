"""The gRPC service on real loopback servers: unary and streamed text equal to the plain R1Model path, health,
reflection, INVALID_ARGUMENT / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, cancellation freeing the request, health-
driven load balancing, and two replica processes behind round_robin with one SIGKILLed mid-load."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from r1kit.api import R1Model
from r1kit.serve import EngineService
from r1kit.serve.client import SERVICE_NAME, R1Client, R1ClientError, channel_target
from r1kit.serve.grpc_service import BadRequestLog, serve_grpc
from r1kit.serve.ports import PortError
from r1kit.serve.replicas import ReplicaError, ReplicaSet, replica_commands

CODE = "import os\nimport sys\n\n\ndef main("  # nano continues this for hundreds of tokens without an eos
QUESTION = [{"role": "user", "content": "What is 47+38?"}]


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def free_ports(n: int) -> int:
    """A base port with n consecutive free ports (best effort: checked, then released)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


@pytest.fixture(scope="module")
def model() -> R1Model:
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    model.use_engine = False  # the reference (model.generate / chat) runs the plain KV-cache loop, not an engine
    return model


@pytest.fixture(scope="module")
def service(model):
    svc = EngineService(model, max_queue=8, max_num_seqs=4)
    svc.start()
    yield svc
    svc.shutdown(drain=False)


@pytest.fixture(scope="module")
def server(service):
    srv = serve_grpc(service, port=0)
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def client(server):
    with R1Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------------- one server


def test_unary_and_stream_match_the_plain_model(model, client):
    """Completion and chat over gRPC give R1Model's text; streamed pieces join to the unary answer."""
    got = client.generate("Once upon", max_new_tokens=12, temperature=0)
    assert got.text == got.content == model.generate(prompt="Once upon", max_new_tokens=12, temperature=0)
    assert (got.finish_reason, got.completion_tokens, got.model) == ("length", 12, "r1kit/nano")
    assert got.prompt_tokens == len(model.tokenizer.encode("Once upon", add_bos=model.tokenizer.add_bos_token))

    ref = model.chat(QUESTION, max_new_tokens=120, temperature=0)
    reply = client.chat(QUESTION, max_new_tokens=120, temperature=0)
    assert (reply.text, reply.reasoning, reply.content) == (ref.text, ref.reasoning, ref.content)
    assert ref.content == "85" and reply.finish_reason == "stop"
    assert (reply.prompt_tokens, reply.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)

    chunks = list(client.chat(QUESTION, max_new_tokens=120, temperature=0, stream=True))
    assert len(chunks) > 5 and all(c.finish_reason is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == ref.text
    assert "".join(c.reasoning for c in chunks) == ref.reasoning
    assert "".join(c.content for c in chunks) == ref.content
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", ref.completion_tokens)


def test_health_and_reflection(server, client):
    assert client.health() == {f"127.0.0.1:{server.port}": "SERVING"}
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        overall = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        services = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        described = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=SERVICE_NAME)]), timeout=5))
        assert described[0].file_descriptor_response.file_descriptor_proto  # clients can discover the schema


@pytest.mark.parametrize("call, field", [
    (lambda c: c.generate("x", temperature=-1.0), "sampling.temperature"),
    (lambda c: c.generate("x", top_p=float("nan")), "sampling.top_p"),
    (lambda c: c.generate("x", top_p=1.5), "sampling.top_p"),
    (lambda c: c.generate("x", max_new_tokens=0), "sampling.max_new_tokens"),
    (lambda c: c.generate(""), "text is empty"),
    (lambda c: c.generate("1 " * 1100), "context"),
    (lambda c: c.generate("x", max_new_tokens=5000), "context"),
    (lambda c: c.chat([]), "chat.messages"),
    (lambda c: c.chat([{"role": "robot", "content": "hi"}]), "chat.messages[0].role"),
    (lambda c: c.chat([{"role": "system", "content": "x"}, {"role": "user", "content": ""}]),
     "chat.messages[1].content is empty"),
    # hostile values: each refused at once, naming the field (not RESOURCE_EXHAUSTED for a too-long error message)
    (lambda c: c.generate("x", stop=["s"] * 5000), "stop"),
    (lambda c: c.generate("x", stop=["s" * 100_000]), "stop"),
    (lambda c: c.generate("x", max_new_tokens=-5), "sampling.max_new_tokens"),
    (lambda c: c.generate("x", max_new_tokens=-2**31), "sampling.max_new_tokens"),
    (lambda c: c.generate("x", top_k=-1), "sampling.top_k"),
    (lambda c: c.generate("x", temperature=float("inf")), "sampling.temperature"),
    (lambda c: c.generate("x", request_id="r" * 100_000), "request_id"),
    (lambda c: c.generate("x", request_id="a\nforged log line"), "request_id"),
    (lambda c: c.chat([{"role": "user", "content": "x"}] * 5000), "5000 messages, but the model's context"),
])
def test_bad_params_are_invalid_argument(client, call, field):
    with pytest.raises(R1ClientError) as e:
        call(client)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details


def test_huge_prompt_is_refused_before_tokenizing(client):
    """Megabytes of prompt are refused at once: tokenizing them would hold the GIL for seconds, stalling the
    server (engine, health checks) for every client."""
    start = time.monotonic()
    for call in (lambda: client.generate("ab " * 1_300_000), lambda: client.chat([{"role": "user",
                                                                                   "content": "ab " * 1_300_000}])):
        with pytest.raises(R1ClientError) as e:
            call()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details
    assert time.monotonic() - start < 2.0


def test_developer_role_is_a_system_message(model, client):
    as_system = model.chat([{"role": "system", "content": "Be brief."}, *QUESTION], max_new_tokens=24, temperature=0)
    reply = client.chat([{"role": "developer", "content": "Be brief."}, *QUESTION], max_new_tokens=24, temperature=0)
    assert reply.text == as_system.text and reply.prompt_tokens == as_system.prompt_tokens


def test_tiny_deadlines_end_cleanly(service, client):
    for timeout in (0, 1e-6, 0.005):
        with pytest.raises(R1ClientError) as e:
            client.generate(CODE, max_new_tokens=400, timeout=timeout)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: service.stats()["requests_running"] == 0 and service.stats()["queue_depth"] == 0)
    assert service.stats()["kv_blocks_free"] == service.stats()["kv_blocks_total"]


@pytest.mark.parametrize("api_key", [None, "k"])
def test_malformed_messages_are_invalid_argument_and_one_log_line(service, caplog, api_key):
    """Garbage bytes to every method, with and without the API key: INVALID_ARGUMENT (UNAUTHENTICATED without the
    key), no traceback in the log and a bounded number of lines after 50 bad calls; the server keeps serving."""
    srv = serve_grpc(service, port=0, api_key=api_key)
    garbage = b"\xff\xff\xff\xff"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel, caplog.at_level(logging.INFO):
            raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
            generate = channel.unary_unary(f"/{SERVICE_NAME}/Generate", **raw)
            stream = channel.unary_stream(f"/{SERVICE_NAME}/GenerateStream", **raw)
            health_check = channel.unary_unary("/grpc.health.v1.Health/Check", **raw)
            reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", **raw)
            key = (("authorization", f"Bearer {api_key}"),) if api_key else None
            calls = [(lambda: generate(garbage, timeout=5, metadata=key), "INVALID_ARGUMENT"),
                     (lambda: list(stream(garbage, timeout=5, metadata=key)), "INVALID_ARGUMENT"),
                     (lambda: health_check(garbage, timeout=5), "INVALID_ARGUMENT"),
                     (lambda: list(reflect(iter([garbage]), timeout=5)), "INVALID_ARGUMENT")]
            if api_key:  # refused before the bytes are read
                calls.append((lambda: generate(garbage, timeout=5), "UNAUTHENTICATED"))
            for i in range(50):
                call, code = calls[i % len(calls)]
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code().name == code, e.value.details()
        assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records), caplog.text
        assert len(caplog.records) <= 2, caplog.text  # one line per kind (malformed, unauthenticated) per 10 s
        assert all("malformed request" in r.message or "unauthenticated" in r.message for r in caplog.records)
        with R1Client(f"127.0.0.1:{srv.port}", api_key=api_key, timeout=30) as c:
            assert c.generate("Once upon", max_new_tokens=2).completion_tokens == 2  # still serving
    finally:
        srv.stop(grace=None)


def test_bad_request_log_is_rate_limited(caplog):
    bad = BadRequestLog(interval=0.3)
    with caplog.at_level(logging.WARNING, logger="r1kit.serve"):
        for i in range(50):
            bad.warn("malformed", f"bad call {i}")
        bad.warn("unauthenticated", "no key")
        time.sleep(0.35)
        bad.warn("malformed", "bad call 50")
    assert [r.getMessage() for r in caplog.records] == [
        "bad call 0", "no key", "bad call 50 (and 49 more malformed calls not logged)"]


def test_a_busy_grpc_port_is_refused(service, server):
    """SO_REUSEPORT is off: a second server on a port in use is an error, not a silent split of the traffic."""
    with pytest.raises(PortError, match=f"gRPC port {server.port}: cannot listen"):
        serve_grpc(service, port=server.port)
    with pytest.raises(PortError, match="not a port"):
        serve_grpc(service, port=70000)


def test_no_prompt_is_invalid_argument(server, client):
    from r1kit.serve.proto import r1kit_pb2, r1kit_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            r1kit_pb2_grpc.GeneratorStub(channel).Generate(r1kit_pb2.GenerateRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no prompt" in e.value.details()
    assert client.generate("Once upon", max_new_tokens=2).completion_tokens == 2  # still serving


def test_cancel_and_deadline_free_the_request(service, client):
    """A stream closed by the client and a call past its deadline both abort the engine request."""
    before = service.stats()
    stream = client.generate_stream(CODE, max_new_tokens=400, temperature=0)
    assert next(stream).text
    stream.close()  # cancels the call
    wait_for(lambda: service.stats().get("finished_abort", 0) == before.get("finished_abort", 0) + 1)
    with pytest.raises(R1ClientError) as e:
        client.generate(CODE, max_new_tokens=400, temperature=0, timeout=0.3)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: service.stats()["requests_running"] == 0)
    stopped = [stats.get("finished_abort", 0) + stats.get("finished_timeout", 0) for stats in (before, service.stats())]
    assert stopped[1] == stopped[0] + 2  # the call's deadline reached the engine (as a timeout or an abort)
    assert service.stats()["kv_blocks_free"] == service.stats()["kv_blocks_total"]


def test_queue_full_is_resource_exhausted(model):
    """With room for one request, a second one while the first streams is refused, and accepted after."""
    svc = EngineService(model, max_queue=0, max_num_seqs=1)
    svc.start()
    srv = serve_grpc(svc, port=0)
    try:
        with R1Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            stream = c.generate_stream(CODE, max_new_tokens=400, temperature=0)
            assert next(stream).text  # the first request is running
            with pytest.raises(R1ClientError) as e:
                c.generate("Once upon", max_new_tokens=4)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in e.value.details
            stream.close()
            wait_for(lambda: svc.stats()["requests_running"] == 0)
            assert c.generate("Once upon", max_new_tokens=4).completion_tokens == 4
    finally:
        srv.stop(grace=None)
        svc.shutdown(drain=False)


def test_round_robin_skips_a_replica_that_reports_not_serving(service):
    """Two servers on one engine: both get calls; once one reports NOT_SERVING the client's health checking
    sends every call to the other, and a stopped server tells its health watchers NOT_SERVING first."""
    a, b = serve_grpc(service, port=0), serve_grpc(service, port=0)
    try:
        with R1Client([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], wait_for_ready=True, timeout=30) as c:
            servers = Counter(c.generate("Once upon", max_new_tokens=1).server for _ in range(8))
            assert set(servers) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
            a.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            time.sleep(0.5)  # the channel's health watch sees the change
            servers = Counter(c.generate("Once upon", max_new_tokens=1).server for _ in range(6))
            assert servers == {f"127.0.0.1:{b.port}": 6}
        with grpc.insecure_channel(f"127.0.0.1:{b.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                              timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            b.stop(grace=1.0)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        a.stop(grace=None)
        b.stop(grace=None)


def test_unavailable_calls_are_retried_on_another_replica(model, server):
    """A replica whose engine is closed answers UNAVAILABLE; the client's retry policy sends those calls to the
    other replica, so none fails (without retries, about half would)."""
    closed = EngineService(model)
    closed.start()
    closed.shutdown()
    dead = serve_grpc(closed, port=0)
    targets = [f"127.0.0.1:{dead.port}", f"127.0.0.1:{server.port}"]
    try:
        with R1Client(targets, wait_for_ready=True, timeout=30) as c:
            assert {c.generate("Once upon", max_new_tokens=1).server for _ in range(6)} == {targets[1]}
        with R1Client(targets, wait_for_ready=True, timeout=30, max_attempts=1) as c:
            codes = []
            for _ in range(6):
                try:
                    c.generate("Once upon", max_new_tokens=1)
                except R1ClientError as e:
                    codes.append(e.code)
            assert codes and set(codes) == {grpc.StatusCode.UNAVAILABLE}
    finally:
        dead.stop(grace=None)


def test_channel_target():
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:5"]) == "ipv6:[::1]:5"
    assert channel_target(["dns:///example.com:50051"]) == "dns:///example.com:50051"
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target(["127.0.0.1"])


# ---------------------------------------------------------------------------------------------------- replicas


def test_supervisor_restarts_with_backoff_then_gives_up():
    """A replica that keeps exiting at once is restarted after 0.5 s, then 1 s, then left down."""
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    replicas = ReplicaSet([crash], [free_ports(1)], max_restarts=2, stdout=subprocess.DEVNULL)
    replicas.start()
    try:
        wait_for(lambda: replicas.replicas[0].process is None, timeout=20)  # given up
        assert replicas.replicas[0].restarts == 2 and replicas.replicas[0].exit_codes == [3, 3, 3]
    finally:
        replicas.stop(grace=1)
    with pytest.raises(ReplicaError, match="exited with code 3 before serving"):
        with ReplicaSet([crash], [free_ports(1)], restart=False, stdout=subprocess.DEVNULL) as once:
            once.wait_ready(timeout=20)


def test_replicas_survive_a_sigkill_mid_load(tmp_path, monkeypatch):
    """Two replica processes behind round_robin; many concurrent calls; one replica SIGKILLed while calls are in
    flight on it: every call succeeds (gRPC retries those that the dead replica never answered), both replicas
    served calls before the kill, and the supervisor restarts the dead one. Then SIGTERM drains a stream."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two model processes on a small machine
    base = free_ports(4)  # `r1kit serve` replicas: gRPC on base, base + 1; HTTP on base + 2, base + 3
    ports = [base, base + 1]
    log = open(tmp_path / "replicas.log", "w")  # noqa: SIM115 (closed below)
    commands = replica_commands("r1kit/nano", 2, grpc_port=base, http_port=base + 2, extra_args=["--device", "cpu"])
    replicas = ReplicaSet(commands, ports, stdout=log)
    replicas.start()
    try:
        replicas.wait_ready(timeout=120)
        done: list[tuple[float, str]] = []
        with R1Client(replicas.targets, timeout=60) as client, ThreadPoolExecutor(8) as pool:
            def call(i: int) -> str:
                reply = client.generate(f"def f{i}(x):", max_new_tokens=16, temperature=0)
                done.append((time.monotonic(), reply.server))
                return reply.text

            futures = [pool.submit(call, i) for i in range(40)]
            wait_for(lambda: len(done) >= 10 and len({server for _, server in done}) == 2, timeout=60)
            served_before_kill = {server for _, server in done}

            def running_on_replica_0() -> int:  # from its own /metrics: calls inside its engine right now
                text = urllib.request.urlopen(f"http://127.0.0.1:{base + 2}/metrics", timeout=5).read().decode()
                return int(float(next(line.split()[1] for line in text.splitlines()
                                      if line.startswith("r1kit_requests_running "))))

            wait_for(lambda: running_on_replica_0() > 0, timeout=30)  # kill it while it is generating
            killed_at, restarts = time.monotonic(), replicas.replicas[0].restarts
            os.kill(replicas.replicas[0].process.pid, signal.SIGKILL)
            texts = [f.result() for f in futures]  # raises if any call failed
        assert len(texts) == 40 and all(texts)
        assert served_before_kill == set(replicas.targets), served_before_kill
        assert replicas.targets[1] in {server for t, server in done if t > killed_at}
        wait_for(lambda: replicas.replicas[0].restarts == restarts + 1, timeout=10)  # the supervisor's restart
        assert replicas.replicas[0].exit_codes[-1] == -signal.SIGKILL

        with R1Client(replicas.targets[1], timeout=60) as direct:  # graceful shutdown: in-flight calls finish
            stream = direct.generate_stream(CODE, max_new_tokens=40, temperature=0)
            first = next(stream)
            stopper = threading.Thread(target=replicas.stop, kwargs={"grace": 60})
            stopper.start()
            rest = list(stream)
            stopper.join()
        assert first.text and rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 40
        assert replicas.replicas[1].process.returncode == 0
    finally:
        replicas.stop(grace=5)
        log.close()


def test_serve_replicas_cli(tmp_path):
    """`r1kit serve --replicas 2`: two supervised servers on consecutive ports, both healthy and answering behind
    round_robin (with the API key passed on through the environment); SIGTERM stops them all, exit code 0."""
    base = free_ports(4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "r1kit", "serve", "r1kit/nano", "--replicas", "2", "--device", "cpu",
                             "--grpc-port", str(base), "--port", str(base + 2), "--api-key", "k"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        targets = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        with R1Client(targets, timeout=60, wait_for_ready=True, api_key="k") as client:
            wait_for(lambda: set(client.health().values()) == {"SERVING"}, timeout=120)  # health needs no key
            servers = {client.chat(QUESTION, temperature=0, max_new_tokens=48).server for _ in range(4)}
        assert servers == set(targets)
        for key in (None, "wrong"):  # the key guards gRPC as it guards HTTP
            with R1Client(targets, timeout=60, api_key=key) as client:
                for call in (lambda: client.chat(QUESTION, temperature=0, max_new_tokens=4),
                             lambda: list(client.generate_stream("x", max_new_tokens=4))):
                    with pytest.raises(R1ClientError) as err:
                        call()
                    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        req = urllib.request.Request(f"http://127.0.0.1:{base + 3}/v1/models", headers={"Authorization": "Bearer k"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["data"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
