"""Serving benchmark: the HTTP server (a real `r1kit serve` process on loopback) against the same EngineService
called in-process, on the same requests, at several concurrency levels.

    python benchmarks/bench_serve.py [--concurrency 1,8,32,64] [--requests 64] [--max-tokens 64] [--json out.json]

Each level sends the same ``--requests`` chat requests (distinct arithmetic questions, greedy, streamed) with
at most C in flight, and measures generated tokens/s over the whole level, time to first token (first streamed
text) and request latency (p50/p99), and errors. "overhead" is 1 - HTTP tokens/s / in-process tokens/s: what
the HTTP layer (serialization, SSE, the event loop, the loopback client) costs. The two
sides alternate ``--repeats`` times per level and the fastest run of each is shown (other load on a shared
machine only ever slows a run down). CPU milliseconds per token (all processes involved: for HTTP the server
and the client) do not depend on that load: their ratio is the overhead in work. The HTTP client is a minimal
asyncio HTTP/1.1 reader on one keep-alive connection per worker (as client libraries pool them), so that the
client's own cost stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
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
    errors: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # CPU seconds of every process involved (load-independent, unlike wall time)

    def summary(self) -> dict[str, float | int]:
        def pct(xs: list[float], q: float) -> float:
            return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else
                         (xs[0] if xs else float("nan")), 4)

        return {"tokens_per_s": round(self.tokens / self.wall, 1), "tokens": self.tokens, "errors": self.errors,
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p99_s": pct(self.ttft, 99),
                "latency_p50_s": pct(self.latency, 50), "latency_p99_s": pct(self.latency, 99),
                "wall_s": round(self.wall, 2), "cpu_ms_per_token": round(1000 * self.cpu / max(self.tokens, 1), 3)}


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"What is {rng.randint(10, 999)}+{rng.randint(10, 999)}?" for _ in range(n)]


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process `pid` (Linux /proc)."""
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(new_client, prompts: list[str], concurrency: int, server_pid: int | None = None) -> Level:
    """Send every prompt with `concurrency` workers, each with its own client from new_client() (an async
    callable prompt -> (time of the first text, tokens), with aclose()); CPU time counts this process and the
    server process `server_pid` if given."""
    level = Level()
    todo = list(reversed(prompts))

    async def worker() -> None:
        client = new_client()
        try:
            while todo:
                prompt = todo.pop()
                start = time.perf_counter()
                try:
                    first, tokens = await client(prompt)
                except Exception:  # counted, not raised: the table reports errors
                    level.errors += 1
                    await client.aclose()
                    client = new_client()
                    continue
                level.ttft.append(first - start)
                level.latency.append(time.perf_counter() - start)
                level.tokens += tokens
        finally:
            await client.aclose()

    def cpu() -> float:
        return cpu_seconds() + (cpu_seconds(server_pid) if server_pid is not None else 0.0)

    start, cpu_start = time.perf_counter(), cpu()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.wall, level.cpu = time.perf_counter() - start, cpu() - cpu_start
    return level


# ---------------------------------------------------------------------------------------------------- in-process
class InProcess:
    """Submits to the EngineService directly and streams with handle.stream()."""

    def __init__(self, service: EngineService, max_tokens: int):
        self.service, self.max_tokens = service, max_tokens

    async def __call__(self, prompt: str) -> tuple[float, int]:
        service = self.service
        handle = service.submit(service.encode_chat([{"role": "user", "content": prompt}]),
                                SamplingParams(max_new_tokens=self.max_tokens, temperature=0))
        first = None
        async for delta in handle.stream():
            if first is None and delta.text:
                first = time.perf_counter()
        if handle.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request ended with {handle.finish_reason}")
        return first or time.perf_counter(), handle.completion_tokens

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- over HTTP
class OverHTTP:
    """A minimal streaming client on one keep-alive connection: POST /v1/chat/completions, read the chunked SSE
    body, count tokens from the final usage chunk."""

    def __init__(self, port: int, model: str, max_tokens: int):
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self, prompt: str) -> tuple[float, int]:
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
        first, tokens, buffer = None, None, b""
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
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter()
        if tokens is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return first or time.perf_counter(), tokens

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r1kit", "serve", args.model, "--port", str(port), "--device", args.device,
           "--max-num-seqs", str(max(args.levels)), "--max-queue", str(max(args.levels))]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
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


def main() -> None:
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    prompts = questions(args.requests)

    model = R1Model.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    service = EngineService(model, max_num_seqs=max(args.levels), max_queue=max(args.levels))
    service.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(args, port)
    def local() -> InProcess:
        return InProcess(service, args.max_tokens)

    def remote() -> OverHTTP:
        return OverHTTP(port, service.model_name, args.max_tokens)

    rows = []
    try:
        asyncio.run(run_level(local, prompts[:4], 4))  # warm-up, both sides
        asyncio.run(run_level(remote, prompts[:4], 4))
        for c in args.levels:
            runs: dict[str, list[dict]] = {"in_process": [], "http": []}
            for _ in range(args.repeats):  # alternated, so that a burst of load elsewhere hits both sides
                runs["in_process"].append(asyncio.run(run_level(local, prompts, c)).summary())
                runs["http"].append(asyncio.run(run_level(remote, prompts, c, server.pid)).summary())
            a, b = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in ("in_process", "http"))
            rows.append({"concurrency": c, "in_process": a, "http": b, "runs": runs,
                         "overhead": round(1 - b["tokens_per_s"] / a["tokens_per_s"], 4),
                         "cpu_overhead": round(b["cpu_ms_per_token"] / a["cpu_ms_per_token"] - 1, 4)})
            print(f"concurrency {c}: in-process {a['tokens_per_s']} tok/s, HTTP {b['tokens_per_s']} tok/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        service.shutdown(drain=False)

    print(f"\n{args.model} ({model.info()['dtype']}, {torch.get_num_threads()} threads), {args.requests} chat requests "
          f"per level, <= {args.max_tokens} tokens each, greedy, streamed; fastest of {args.repeats} alternated runs\n")
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
    if args.json:
        result = {"model": args.model, "dtype": model.info()["dtype"], "threads": torch.get_num_threads(),
                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "requests_per_level": args.requests,
                  "max_tokens": args.max_tokens, "repeats": args.repeats, "levels": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
