"""Serving benchmark: the HTTP server (a real `r1kit serve` process on loopback) against the same EngineService
called in-process, on the same requests, at several concurrency levels.

    python benchmarks/bench_serve.py [--concurrency 1,8,32,64] [--requests 64] [--max-tokens 64] [--json out.json]
                                     [--profile serve.prof]

Each level sends the same ``--requests`` chat requests (distinct arithmetic questions, greedy, streamed) with
at most C in flight, and measures generated tokens/s over the whole level, time to first token (first streamed
text) and request latency (p50/p99), and errors. "overhead" is 1 - HTTP tokens/s / in-process tokens/s: what
the HTTP layer (serialization, SSE, the event loop, the loopback client) costs. The two sides alternate
``--repeats`` times per level and the fastest run of each is shown (other load on a shared machine only ever
slows a run down). CPU milliseconds per token (all processes involved: for HTTP the server and the client)
depend far less on that load: their ratio is the overhead in work. Even so the engine's own CPU per token
varies by ~10% from run to run on a small shared machine, which moves tokens/s on either side; the server
loop's extra CPU per token over the engine's ("loop_overhead": the work that takes the GIL from the server's
engine thread) moves much less. The HTTP client is a minimal asyncio HTTP/1.1 reader on one keep-alive
connection per worker (as client libraries pool them), so that the client's own cost stays small.

The CPU time is split by thread: in-process, the engine thread and the event loop streaming the deltas; over
HTTP, the server's engine thread, the server's event loop (HTTP parsing, validation, JSON, SSE, socket writes)
and the client process. ``--profile FILE`` also runs cProfile on the server's event loop (its main thread)
during the HTTP runs only and prints where that loop's time goes, by component.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from r1kit.api import R1Model
from r1kit.generate import SamplingParams
from r1kit.serve.engine_service import EngineService


@dataclass
class Level:
    """What one side measured at one concurrency level."""

    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    text_events: int = 0  # deltas (in-process) or SSE chunks (HTTP) that carried text: tokens / this = coalescing
    errors: int = 0
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by thread/process (load-independent)

    def summary(self) -> dict[str, float | int]:
        def pct(xs: list[float], q: float) -> float:
            return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else
                         (xs[0] if xs else float("nan")), 4)

        return {"tokens_per_s": round(self.tokens / self.wall, 1), "tokens": self.tokens, "errors": self.errors,
                "tokens_per_text_event": round(self.tokens / max(self.text_events, 1), 3),
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99),
                "latency_p50_s": pct(self.latency, 50), "latency_p99_s": pct(self.latency, 99),
                "wall_s": round(self.wall, 2), "cpu_ms_per_token": self.per_token(sum(self.cpu.values())),
                "cpu_ms_per_token_by_part": {k: self.per_token(v) for k, v in self.cpu.items()}}

    def per_token(self, seconds: float) -> float:
        return round(1000 * seconds / max(self.tokens, 1), 3)


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"What is {rng.randint(10, 999)}+{rng.randint(10, 999)}?" for _ in range(n)]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU time (user + system) of process `pid`, or of its thread `tid` (Linux /proc)."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process_probes(service: EngineService) -> dict[str, Callable[[], float]]:
    """CPU seconds so far of this process's engine thread and of the rest (the event loop streaming deltas)."""
    pid, engine = os.getpid(), service._thread.native_id
    return {"engine": lambda: cpu_seconds(pid, engine), "loop": lambda: cpu_seconds(pid) - cpu_seconds(pid, engine)}


def http_probes(server_pid: int) -> dict[str, Callable[[], float]]:
    """CPU seconds so far of the server's event loop (its main thread), the rest of the server (the engine
    thread) and this process (the client; this process's own engine thread is idle meanwhile)."""
    return {"server_engine": lambda: cpu_seconds(server_pid) - cpu_seconds(server_pid, server_pid),
            "server_loop": lambda: cpu_seconds(server_pid, server_pid), "client": lambda: cpu_seconds(os.getpid())}


async def run_level(new_client, prompts: list[str], concurrency: int,
                    probes: dict[str, Callable[[], float]]) -> Level:
    """Send every prompt with `concurrency` workers, each with its own client from new_client() (an async
    callable prompt -> (time of the first text, tokens, events with text), with aclose()); ``probes`` read the
    CPU seconds of each part involved."""
    level = Level()
    todo = list(reversed(prompts))

    async def worker() -> None:
        client = new_client()
        try:
            while todo:
                prompt = todo.pop()
                start = time.perf_counter()
                try:
                    first, tokens, text_events = await client(prompt)
                except Exception:  # counted, not raised: the table reports errors
                    level.errors += 1
                    await client.aclose()
                    client = new_client()
                    continue
                level.ttft.append(first - start)
                level.latency.append(time.perf_counter() - start)
                level.tokens += tokens
                level.text_events += text_events
        finally:
            await client.aclose()

    cpu_start, start = {k: probe() for k, probe in probes.items()}, time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.wall = time.perf_counter() - start
    level.cpu = {k: probe() - cpu_start[k] for k, probe in probes.items()}
    return level


# ---------------------------------------------------------------------------------------------------- in-process
class InProcess:
    """Submits to the EngineService directly and streams with handle.stream()."""

    def __init__(self, service: EngineService, max_tokens: int):
        self.service, self.max_tokens = service, max_tokens

    async def __call__(self, prompt: str) -> tuple[float, int, int]:
        service = self.service
        handle = service.submit(service.encode_chat([{"role": "user", "content": prompt}]),
                                SamplingParams(max_new_tokens=self.max_tokens, temperature=0))
        first, text_events = None, 0
        async for delta in handle.stream():
            if delta.text:
                first, text_events = first or time.perf_counter(), text_events + 1
        if handle.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request ended with {handle.finish_reason}")
        return first or time.perf_counter(), handle.completion_tokens, text_events

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- over HTTP
class OverHTTP:
    """A minimal streaming client on one keep-alive connection: POST /v1/chat/completions, read the chunked SSE
    body, count tokens from the final usage chunk."""

    def __init__(self, port: int, model: str, max_tokens: int):
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, prompt: str) -> tuple[float, int, int]:
        if self.conn is None:
            self.conn = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.conn
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = (await reader.readline()).split()[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}")
        while (await reader.readline()) not in (b"\r\n", b""):  # headers
            pass
        first, tokens, buffer, text_events = None, None, b"", 0
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            chunk = await reader.readexactly(size + 2)  # the data and its CRLF (the last chunk: CRLF only)
            if size == 0:
                break
            buffer += chunk[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                parsed = json.loads(data)
                if "error" in parsed:
                    raise RuntimeError(parsed["error"]["message"])
                if parsed.get("usage"):
                    tokens = parsed["usage"]["completion_tokens"]
                delta = parsed["choices"][0]["delta"] if parsed["choices"] else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    first, text_events = first or time.perf_counter(), text_events + 1
        if tokens is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return first or time.perf_counter(), tokens, text_events

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


# The server under cProfile (--profile): on its main thread, which runs the event loop, with a CPU clock so that
# waiting in epoll costs nothing; SIGUSR1 starts it, SIGUSR2 stops it and writes the stats (atomically).
PROFILED_SERVER = """
import cProfile, os, runpy, signal, sys, time
path, prof = sys.argv.pop(1), cProfile.Profile(time.thread_time)
def dump(*_):
    prof.disable()
    prof.dump_stats(path + ".tmp")
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, dump)
runpy.run_module("r1kit", run_name="__main__")
"""

# Where the server's event loop spends its time: the first component whose pattern is in a profiled function's
# "file:name" takes it; a function that matches none (builtins like len, threading's locks) is charged to the
# components of its callers.
COMPONENTS = [
    ("pydantic (request validation)", ("pydantic",)),
    ("JSON encode/decode", ("json",)),
    ("r1kit SSE chunks (openai_api)", ("serve/openai_api.py",)),
    ("tokenizer (prompt encoding, reasoning parser)", ("r1kit/tokenizer.py", "tokenizers.")),
    ("handle.stream, wake-ups (engine_service)", ("serve/engine_service.py",)),
    ("starlette (StreamingResponse, routing)", ("starlette",)),
    ("fastapi (endpoint, body parsing)", ("fastapi",)),
    ("uvicorn + httptools (HTTP/1.1)", ("uvicorn", "httptools")),
    ("socket I/O (send/recv)", ("_socket.socket", "'send'", "'recv'", "writelines", "'write' of")),
    ("asyncio / uvloop (event loop, tasks)", ("asyncio", "uvloop", "selectors", "select.", "contextvars")),
]


def component_of(key: tuple[str, int, str]) -> str | None:
    where = f"{key[0]}:{key[2]}"
    return next((c for c, patterns in COMPONENTS if any(p in where for p in patterns)), None)


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    serve = ["serve", args.model, "--port", str(port), "--device", args.device,
             "--max-num-seqs", str(max(args.levels)), "--max-queue", str(max(args.levels))]
    if args.dtype:
        serve += ["--dtype", args.dtype]
    cmd = [sys.executable, "-c", PROFILED_SERVER, args.profile, *serve] if args.profile else \
        [sys.executable, "-m", "r1kit", *serve]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the same torch threads as the in-process side
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 120 s")


def profiled(server: subprocess.Popen, path: str | None, run: Callable[[], Level]) -> Level:
    """run(), with the server's event loop under cProfile if ``path`` (its stats, all runs so far, land there)."""
    if path is None:
        return run()
    if os.path.exists(path):
        os.remove(path)
    server.send_signal(signal.SIGUSR1)
    try:
        return run()
    finally:
        server.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)


def print_profile(path: str, tokens: int) -> None:
    """The server event loop's CPU time per streamed token by component, and its top functions."""
    stats = pstats.Stats(path).stats  # (file, line, name) -> (calls, calls, own time, cumulative time, callers)
    by_component: dict[str, float] = {}
    for key, (_, _, own, _, callers) in stats.items():
        if (name := component_of(key)) is not None:
            by_component[name] = by_component.get(name, 0.0) + own
            continue
        for caller, (_, _, own_here, _) in callers.items():  # this function's own time, per caller
            name = component_of(caller) or "other"
            by_component[name] = by_component.get(name, 0.0) + own_here
    total = sum(by_component.values())
    print(f"\nserver event loop under cProfile (CPU clock; cProfile itself inflates the many small calls): "
          f"{1000 * total / tokens:.3f} ms per streamed token over {tokens} tokens\n")
    print("| component | ms/token | share |\n|---|---:|---:|")
    for component, own in sorted(by_component.items(), key=lambda kv: -kv[1]):
        print(f"| {component} | {1000 * own / tokens:.4f} | {own / total:.1%} |")
    print("\ntop functions by own time:")
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    for (file, line, name), (_, calls, own, _, _) in top:
        print(f"  {1000 * own / tokens:.4f} ms/token  {calls / tokens:6.2f} calls/token  {name}  "
              f"({file.split('site-packages/')[-1]}:{line})")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="r1kit/nano")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the device's best (bf16 on capable CPUs)")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=64, help="requests per level (the same ones at every level)")
    p.add_argument("--max-tokens", type=int, default=64, help="per request (the answers end at ~50-60 tokens)")
    p.add_argument("--repeats", type=int, default=1, help="runs per level and side; the table shows the fastest")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each side (1: OpenMP teams spinning on a shared 2-core machine distort both)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="cProfile the server's event loop during the HTTP runs, write the stats to FILE and print "
                        "them by component (slows the HTTP side: its tokens/s then mean little)")
    args = p.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    return args


def measure(args: argparse.Namespace, service: EngineService, server: subprocess.Popen, port: int) -> list[dict]:
    """Both sides at every level, alternated ``--repeats`` times; one row per level (the fastest run of each)."""
    prompts = questions(args.requests)

    def local(n: int, c: int) -> Level:
        return asyncio.run(run_level(lambda: InProcess(service, args.max_tokens), prompts[:n], c,
                                     in_process_probes(service)))

    def remote(n: int, c: int) -> Level:
        return asyncio.run(run_level(lambda: OverHTTP(port, service.model_name, args.max_tokens), prompts[:n], c,
                                     http_probes(server.pid)))

    local(4, 4), remote(4, 4)  # warm-up, both sides
    rows = []
    for c in args.levels:
        runs: dict[str, list[dict]] = {"in_process": [], "http": []}
        for _ in range(args.repeats):  # alternated, so that a burst of load elsewhere hits both sides
            runs["in_process"].append(local(args.requests, c).summary())
            runs["http"].append(profiled(server, args.profile, lambda c=c: remote(args.requests, c)).summary())
        a, b = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in ("in_process", "http"))
        rows.append({"concurrency": c, "in_process": a, "http": b, "runs": runs,
                     "overhead": round(1 - b["tokens_per_s"] / a["tokens_per_s"], 4),
                     "cpu_overhead": round(b["cpu_ms_per_token"] / a["cpu_ms_per_token"] - 1, 4),
                     "loop_overhead": loop_overhead(runs)})
        print(f"concurrency {c}: in-process {a['tokens_per_s']} tok/s, HTTP {b['tokens_per_s']} tok/s", flush=True)
    return rows


def loop_overhead(runs: dict[str, list[dict]]) -> float:
    """The server event loop's CPU per token beyond the in-process loop's, over the engine's (medians of the
    runs): the work that holds the GIL the server's engine thread needs, so about the share of tokens/s it
    costs when the client has a core of its own."""
    def median(side: str, part: str) -> float:
        return statistics.median(run["cpu_ms_per_token_by_part"][part] for run in runs[side])

    extra = median("http", "server_loop") - median("in_process", "loop")
    return round(extra / median("in_process", "engine"), 4)


def print_table(args: argparse.Namespace, dtype: str, rows: list[dict]) -> None:
    print(f"\n{args.model} ({dtype}, {torch.get_num_threads()} threads), {args.requests} chat requests per level, "
          f"<= {args.max_tokens} tokens each, greedy, streamed; fastest of {args.repeats} alternated runs; load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| concurrency | in-process tok/s | HTTP tok/s | overhead | CPU ms/token in-process / HTTP (+client) "
          "| TTFT p50/p99 in-process | TTFT p50/p99 HTTP | latency p50/p99 in-process | latency p50/p99 HTTP "
          "| errors (in-process/HTTP) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["in_process"], r["http"]
        print(f"| {r['concurrency']} | {a['tokens_per_s']} | {b['tokens_per_s']} | {r['overhead']:.1%} "
              f"| {a['cpu_ms_per_token']:.2f} / {b['cpu_ms_per_token']:.2f} ({r['cpu_overhead']:+.1%}) "
              f"| {a['ttft_p50_s']:.3f} / {a['ttft_p99_s']:.3f} s | {b['ttft_p50_s']:.3f} / {b['ttft_p99_s']:.3f} s "
              f"| {a['latency_p50_s']:.2f} / {a['latency_p99_s']:.2f} s "
              f"| {b['latency_p50_s']:.2f} / {b['latency_p99_s']:.2f} s | {a['errors']} / {b['errors']} |")
    print("\nCPU ms per token by part, and tokens per event with text (in-process: deltas; HTTP: SSE chunks, which "
          "merge the deltas that arrived while the event loop was busy), fastest runs:\n\n"
          "| concurrency | in-process: engine / loop "
          "| HTTP: server engine / server loop / client | server loop's extra / engine (medians) "
          "| tokens per text event in-process / HTTP |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["in_process"]["cpu_ms_per_token_by_part"], r["http"]["cpu_ms_per_token_by_part"]
        print(f"| {r['concurrency']} | {a['engine']:.3f} / {a['loop']:.3f} "
              f"| {b['server_engine']:.3f} / {b['server_loop']:.3f} / {b['client']:.3f} | {r['loop_overhead']:.1%} "
              f"| {r['in_process']['tokens_per_text_event']:.2f} / {r['http']['tokens_per_text_event']:.2f} |")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = R1Model.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    service = EngineService(model, max_num_seqs=max(args.levels), max_queue=max(args.levels))
    service.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(args, port)
    try:
        rows = measure(args, service, server, port)
    finally:
        server.terminate()
        server.wait(timeout=60)
        service.shutdown(drain=False)
    dtype = model.info()["dtype"]
    print_table(args, dtype, rows)
    if args.profile:
        print_profile(args.profile, sum(run["tokens"] for r in rows for run in r["runs"]["http"]))
    if args.json:
        result = {"model": args.model, "dtype": dtype, "threads": torch.get_num_threads(),
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "requests_per_level": args.requests,
                  "max_tokens": args.max_tokens, "repeats": args.repeats, "levels": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
