"""MTP speculative decoding served: the engine with and without drafts at batch 1 and batch 8, on r1kit/nano.

    python benchmarks/bench_spec_engine.py [--json out.json] [--requests 8] [--max-new 64] [--drafts 1] [--repeats 2]

The same held-out prompts as bench_speculative.py (half arithmetic chats, half standard-library windows), greedy,
bf16 when the CPU has native bf16 (else fp32), 1 thread. Each method is an `EngineService` (what `r1kit serve`
runs, without the HTTP layer): "plain" has no drafts, "mtp k=N" is ``EngineConfig(num_speculative_tokens=N)``.
Batch 1 submits the requests one at a time, batch 8 all together. Time is from the first submit to the last
token (prefill included); tokens/s counts generated tokens; each method's time is the best of --repeats runs
(the machine is shared); the CPU seconds of the process (1 thread: the engine's work, less exposed to other
processes on a shared machine) give a second speed-up. "identical" counts requests whose tokens equal the plain
engine's: all of them in fp32
(tests/test_engine_speculative.py); in bf16 the multi-token verify rounds differently from a one-token step, so
a near-tie can go the other way (see bench_speculative.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_speculative import arithmetic_prompts, text_prompts  # noqa: E402  (the same held-out prompts)

from r1kit import R1Model, hardware  # noqa: E402
from r1kit.generate import SamplingParams  # noqa: E402
from r1kit.serve.engine_service import EngineService  # noqa: E402


def serve(service: EngineService, prompts: list[list[int]], params: SamplingParams, batch: int
          ) -> tuple[list[list[int]], float, float]:
    """Submit the prompts `batch` at a time (the next batch after the previous one finished); returns each
    request's token ids, the wall time and the process's CPU time."""
    outs: list[list[int]] = []
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        handles = [service.submit(p, params) for p in prompts[i:i + batch]]
        outs += [[t for delta in h for t in delta.token_ids] for h in handles]
    return outs, time.perf_counter() - start, time.process_time() - cpu


def measure(model: R1Model, prompts: list[list[int]], max_new: int, drafts: int, repeats: int) -> dict[str, dict]:
    """Both services at batch 1 and batch 8; best time of repeats per method and batch."""
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    services = {"plain": EngineService(model, max_num_seqs=8),
                f"mtp k={drafts}": EngineService(model, max_num_seqs=8, num_speculative_tokens=drafts)}
    result: dict[str, dict] = {}
    try:
        for service in services.values():
            service.start()
            serve(service, prompts[:2], SamplingParams(max_new_tokens=8, temperature=0), 2)  # warm-up
        for batch in (1, 8):
            best = {name: float("inf") for name in services}
            best_cpu = dict(best)
            outs: dict[str, list[list[int]]] = {}
            counts: dict[str, tuple[int, int]] = {}
            for _ in range(repeats):
                for name, service in services.items():
                    before = service.stats()
                    outs[name], sec, cpu = serve(service, prompts, params, batch)
                    best[name], best_cpu[name] = min(best[name], sec), min(best_cpu[name], cpu)
                    after = service.stats()
                    counts[name] = tuple(after[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens"))
            plain_tokens = sum(map(len, outs["plain"]))
            for name in services:
                tokens = sum(map(len, outs[name]))
                drafted, accepted = counts[name]
                result[f"batch {batch} {name}"] = {
                    "batch": batch, "method": name, "tokens": tokens, "seconds": best[name],
                    "tokens_per_s": tokens / best[name],
                    "speedup": tokens / best[name] / (plain_tokens / best["plain"]), "cpu_seconds": best_cpu[name],
                    "speedup_cpu": tokens / best_cpu[name] / (plain_tokens / best_cpu["plain"]),
                    "drafted": drafted, "accepted": accepted,
                    "acceptance_rate": accepted / drafted if drafted else None,
                    "identical_to_plain": sum(a == b for a, b in zip(outs[name], outs["plain"], strict=True)),
                    "requests": len(prompts)}
    finally:
        for service in services.values():
            service.shutdown(drain=False)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--requests", type=int, default=8, help="requests per run (half arithmetic chats, half text)")
    ap.add_argument("--max-new", type=int, default=64, help="new tokens per request (chats may stop earlier)")
    ap.add_argument("--drafts", type=int, default=1, help="MTP drafts per step (nano has one trained depth)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method and batch; the best time counts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = "bf16" if hardware.cpu_supports_bf16() else "fp32"
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype=dtype)
    half = args.requests // 2
    prompts = arithmetic_prompts(model, args.requests - half) + text_prompts(model, half)
    t0 = time.perf_counter()
    results = measure(model, prompts, args.max_new, args.drafts, args.repeats)

    print(f"r1kit/nano served (EngineService), {dtype}, CPU, 1 thread, greedy, {len(prompts)} requests of up to "
          f"{args.max_new} new tokens; best of {args.repeats}")
    head = (f"{'batch':>5} {'method':<8} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'speed-up':>8} {'CPU s':>6} "
            f"{'speed-up (CPU)':>14} {'accepted':>9} {'identical':>9}")
    print(head)
    print("-" * len(head))
    for r in results.values():
        acc = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else ""
        print(f"{r['batch']:>5} {r['method']:<8} {r['tokens']:>6} {r['seconds']:>8.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['speedup']:>7.2f}x {r['cpu_seconds']:>6.2f} {r['speedup_cpu']:>13.2f}x {acc:>9} "
              f"{str(r['identical_to_plain']) + '/' + str(r['requests']):>9}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "r1kit/nano", "dtype": dtype, "device": "cpu", "threads": 1, "greedy": True,
                       "drafts": args.drafts, "max_new_tokens": args.max_new, "repeats": args.repeats,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
