"""A Python client for r1kit's gRPC service, load-balanced over one or more replicas.

    from r1kit.serve.client import R1Client
    with R1Client(["127.0.0.1:50051", "127.0.0.1:50052"]) as client:
        print(client.generate("Once upon", max_new_tokens=32).text)
        reply = client.chat([{"role": "user", "content": "What is 47+38?"}])
        print(reply.reasoning, reply.content)
        for chunk in client.generate_stream("def f(x):", max_new_tokens=64):
            print(chunk.text, end="")
        client.health()   # {"127.0.0.1:50051": "SERVING", "127.0.0.1:50052": "SERVING"}

One channel spans every replica: gRPC's client-side ``round_robin`` policy sends each call to the next
ready replica, and ``healthCheckConfig`` makes it watch each replica's grpc.health.v1 status, so a replica
that reports NOT_SERVING (shutting down) or dies is out of rotation until it is back. Calls that fail with
UNAVAILABLE before any response arrived (a dead or closing replica) are retried on another replica by
gRPC's retry policy; a stream that has already sent text is never retried (its caller sees the error).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from r1kit.serve.proto import r1kit_pb2 as pb
from r1kit.serve.proto import r1kit_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "r1kit.v1.Generator"
SERVER_METADATA_KEY = "r1kit-server"  # trailing metadata: which replica answered
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}


class R1ClientError(RuntimeError):
    """A call failed; ``code`` is the grpc.StatusCode (see r1kit.proto for what each means)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass
class Completion:
    """A whole answer. For a chat, ``reasoning`` is the <think> part and ``content`` the answer; for a
    completion ``content`` equals ``text``. ``server`` is the replica that answered (HOST:PORT)."""

    text: str
    reasoning: str
    content: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    model: str
    server: str
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's form: {"id", "type", "function": {...}}
    logprobs: list[tuple[str, float]] | None = None  # (token text, logprob) per generated token, with logprobs=k
    modality_weights: dict[str, float] | None = None  # a chat with images / audio: the modality gate's weights


@dataclass
class Chunk:
    """A piece of a streamed answer; the last one has ``finish_reason`` and the token counts."""

    text: str
    reasoning: str
    content: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    modality_weights: dict[str, float] | None = None  # the last chunk of a chat with images / audio


def _address(target: str) -> tuple[int, str]:
    """(address family, "ip:port") of a "host:port" target; hostnames resolved (IPv4 first)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        if not infos:
            raise ValueError(f"target {target!r}: cannot resolve {host!r}") from None
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        ip = ipaddress.ip_address(infos[0][4][0])
    if ip.version == 6:
        return socket.AF_INET6, f"[{ip}]:{port}"
    return socket.AF_INET, f"{ip}:{port}"


def channel_target(targets: Sequence[str]) -> str:
    """One gRPC target naming every replica: "ipv4:a:p,b:q" (or ipv6:...); a single target with a scheme
    ("dns:///host:port", "unix:...") is kept as it is, for its resolver to expand."""
    if len(targets) == 1 and ("://" in targets[0] or targets[0].startswith(("unix:", "ipv4:", "ipv6:"))):
        return targets[0]
    resolved = [_address(t) for t in targets]
    families = {family for family, _ in resolved}
    if len(families) > 1:
        raise ValueError(f"targets {list(targets)} mix IPv4 and IPv6 addresses: use one family")
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    return f"{scheme}:" + ",".join(address for _, address in resolved)


def service_config(max_attempts: int = 5) -> str:
    """The channel's service config: round_robin + health checking, retry of UNAVAILABLE calls (max_attempts 1:
    no retries)."""
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME}}
    if max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {"maxAttempts": max_attempts, "initialBackoff": "0.05s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return json.dumps(config)


def _sampling(max_new_tokens: int | None, temperature: float | None, top_k: int | None, top_p: float | None,
              repetition_penalty: float | None, stop: str | Sequence[str] | None, seed: int | None
              ) -> pb.SamplingOptions:
    """SamplingOptions with only the given fields set (the server's defaults fill in the rest)."""
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return pb.SamplingOptions(stop=stops, **{k: v for k, v in given.items() if v is not None})


def _message(m: dict) -> pb.ChatMessage:
    """A chat message (OpenAI's form; content may be R1Model.chat's parts: text, {"type": "image", "image": BYTES |
    PATH}, {"type": "audio", "audio": BYTES | PATH} (WAV)) as the proto's: media become attachments, text joined."""
    calls = [pb.ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"]["arguments"])
             for c in m.get("tool_calls") or []]
    content, attachments = m.get("content") or "", []
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                texts.append(part.get("text") or "")
            elif kind in ("image", "audio"):
                attachments.append(pb.Attachment(**{kind: _media_bytes(part.get(kind), kind)}))
            else:
                raise ValueError(f"content part of type {kind!r}: R1Client sends text, image and audio parts")
        content = "".join(texts)
    return pb.ChatMessage(role=m["role"], content=content, tool_calls=calls, tool_call_id=m.get("tool_call_id") or "",
                          attachments=attachments)


def _media_bytes(src: bytes | str | os.PathLike, kind: str) -> bytes:
    """An attachment's file bytes: given as bytes, or read from a path."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        return Path(src).read_bytes()
    raise ValueError(f"an {kind} part needs the file's bytes or its path, not {type(src).__name__}")


def _tool(tool: dict) -> pb.Tool:
    """An OpenAI function tool as the proto's (its parameter schema as JSON text)."""
    f = tool["function"]
    return pb.Tool(name=f["name"], description=f.get("description", ""),
                   parameters=json.dumps(f["parameters"]) if f.get("parameters") is not None else "")


class R1Client:
    """Calls r1kit's Generator service over one load-balanced channel to ``targets``.

    Args:
        targets: "host:port", a list of them (one per replica), or one gRPC target with a scheme
            ("dns:///host:port" spreads over every address the name resolves to).
        timeout: default deadline of each call in seconds (None: no deadline); the server aborts the
            request when it passes.
        max_attempts: tries per call for UNAVAILABLE before any response (gRPC caps this at 5).
        wait_for_ready: queue calls while no replica is ready instead of failing at once (up to the deadline).
        api_key: sent as ``authorization: Bearer KEY`` metadata (servers started with --api-key need it).
    """

    def __init__(self, targets: str | Sequence[str], *, timeout: float | None = 120.0, max_attempts: int = 5,
                 wait_for_ready: bool = False, api_key: str | None = None):
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("R1Client needs at least one target (HOST:PORT)")
        self.timeout, self.wait_for_ready = timeout, wait_for_ready
        self.channel = grpc.insecure_channel(channel_target(self.targets), options=[
            ("grpc.service_config", service_config(max_attempts)),
            ("grpc.service_config_disable_resolution", 1),  # ours, not one from DNS TXT records
            ("grpc.enable_retries", 1),
        ])
        self.stub = pb_grpc.GeneratorStub(self.channel)

    # ------------------------------------------------------------------------------------------ calls
    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, request_id: str = "",
                 timeout: float | None = None) -> Completion:
        """Continue ``prompt``; unset sampling fields take the server's defaults (temperature 0.6, top_p 0.95)."""
        request = pb.GenerateRequest(text=prompt, request_id=request_id, sampling=_sampling(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed))
        return self._unary(request, timeout)

    def generate_stream(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float | None = None, stop: str | Sequence[str] | None = None,
                        seed: int | None = None, request_id: str = "", timeout: float | None = None
                        ) -> Iterator[Chunk]:
        """Stream the continuation of ``prompt`` as it is generated; closing the iterator cancels the request."""
        request = pb.GenerateRequest(text=prompt, request_id=request_id, sampling=_sampling(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed))
        return self._stream(request, timeout)

    def chat(self, messages: Sequence[dict], *, thinking: bool = True, stream: bool = False,
             max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None, request_id: str = "",
             timeout: float | None = None, tools: Sequence[dict] | None = None, tool_choice: str | None = None,
             logprobs: int | None = None) -> Completion | Iterator[Chunk]:
        """Answer ``messages`` ([{"role": ..., "content": ...}], OpenAI's assistant ``tool_calls`` and tool
        messages' ``tool_call_id`` too) with the reasoning split from the answer. A user message's content may be
        a list of parts with images and audio, as R1Model.chat takes them (``{"type": "image", "image": PNG_BYTES
        or PATH}``, ``{"type": "audio", "audio": WAV_BYTES or PATH}``, text parts); ``Completion.modality_weights``.

        Without max_new_tokens the server allows up to 1024 new tokens (as far as the context allows).
        ``tools``: OpenAI function tools; ``tool_choice``: "auto", "none", "required" or a function name (enforced);
        the calls come back in ``Completion.tool_calls``. ``logprobs``: k alternatives per generated token.
        """
        chat = pb.ChatPrompt(messages=[_message(m) for m in messages], thinking=thinking,
                             tools=[_tool(t) for t in tools or []], tool_choice=tool_choice or "")
        options = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
        if logprobs is not None:
            options.logprobs = logprobs
        request = pb.GenerateRequest(chat=chat, request_id=request_id, sampling=options)
        return self._stream(request, timeout) if stream else self._unary(request, timeout)

    def health(self, timeout: float = 5.0) -> dict[str, str]:
        """Each target's grpc.health.v1 status for the Generator service: "SERVING", "NOT_SERVING",
        or "UNREACHABLE" (asked directly, not through the load balancer)."""
        statuses = {}
        for target in self.targets:
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
                    statuses[target] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as e:
                    statuses[target] = "UNREACHABLE" if e.code() == grpc.StatusCode.UNAVAILABLE else e.code().name
        return statuses

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> R1Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ internals
    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, request: pb.GenerateRequest, timeout: float | None) -> Completion:
        try:
            reply, call = self.stub.Generate.with_call(request, timeout=self._deadline(timeout),
                                                       wait_for_ready=self.wait_for_ready, metadata=self.metadata)
        except grpc.RpcError as e:
            raise R1ClientError(e.code(), e.details()) from None
        server = dict(call.trailing_metadata() or ()).get(SERVER_METADATA_KEY, "")
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in reply.tool_calls]
        logprobs = [(e.text, e.logprob) for e in reply.logprobs] if request.sampling.HasField("logprobs") else None
        return Completion(reply.text, reply.reasoning, reply.content, FINISH_REASONS[reply.finish_reason],
                          reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.request_id, reply.model,
                          server, calls, logprobs, dict(reply.modality_weights) or None)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        call = self.stub.GenerateStream(request, timeout=self._deadline(timeout), wait_for_ready=self.wait_for_ready,
                                        metadata=self.metadata)
        try:
            for chunk in call:
                if chunk.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                    yield Chunk(chunk.text, chunk.reasoning, chunk.content)
                else:
                    yield Chunk(chunk.text, chunk.reasoning, chunk.content, FINISH_REASONS[chunk.finish_reason],
                                chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                                dict(chunk.modality_weights) or None)
        except grpc.RpcError as e:
            raise R1ClientError(e.code(), e.details()) from None
        finally:
            call.cancel()  # the caller stopped early (or it ended): free the server's request
