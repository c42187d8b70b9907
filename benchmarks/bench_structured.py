"""Structured outputs' per-token overhead on the engine: the same batch decoded free and under a JSON schema.

    python benchmarks/bench_structured.py [--json runs/bench_structured.json] [--requests 8] [--max-new 64]

Model: the bundled nano (fp32, 1 thread). Side A (the peer): ``--requests`` requests without a grammar; side B:
the same requests, each under a JSON schema (llguidance masks applied on the batched sampler). Neither side has
stop ids, so both run the same number of engine steps and the time per generated token compares like for like
(the difference is the mask work structured outputs add). Sides alternate ``--repeats`` times; the best of each is
kept. Also: llguidance's own mask time per token (median) and the schema's compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from r1kit.api import R1Model
from r1kit.engine import LLMEngine
from r1kit.generate import SamplingParams
from r1kit.structured import GuideFactory

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"]}


def run(model: R1Model, prompt: list[int], n: int, max_new: int, guides: GuideFactory | None) -> tuple[float, int]:
    """(seconds, tokens) for n requests of max_new tokens each (no stop ids: every request runs its budget)."""
    engine = LLMEngine(model.model, max_num_seqs=n, num_blocks=8 * n)
    spec = {"type": "json_schema", "schema": SCHEMA} if guides else None
    for i in range(n):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0,
                                                           seed=i, structured=spec),
                           guides.new(spec) if guides else None)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(1 for o in engine.step() if o.token is not None)
    return time.perf_counter() - start, tokens


def mask_timing(model: R1Model, guides: GuideFactory) -> dict[str, float]:
    """llguidance alone: compile time of SCHEMA (uncached) and mask time per token along a valid JSON text."""
    import llguidance.torch

    from r1kit import structured

    structured._grammar.cache_clear()
    start = time.perf_counter()
    guide = guides.new({"type": "json_schema", "schema": SCHEMA})
    compile_ms = (time.perf_counter() - start) * 1e3
    bitmask = llguidance.torch.allocate_token_bitmask(1, model.config.vocab_size)
    times = []
    for token in model.tokenizer.encode(json.dumps({"name": "a structured answer", "tags": ["x", "y", "zz"]},
                                                   separators=(",", ":"))):
        t0 = time.perf_counter()
        guide.fill(bitmask, 0)
        times.append(time.perf_counter() - t0)
        guide.advance(token)
    return {"compile_ms": round(compile_ms, 2), "mask_us_median": round(statistics.median(times) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    guides = GuideFactory(model.tokenizer, model.config.vocab_size, model.stop_ids())
    prompt = model.tokenizer.encode("Answer in JSON: ")
    run(model, prompt, 2, 4, guides)  # warm-up (grammar cache, allocator)
    free, constrained = [], []
    for _ in range(args.repeats):  # interleaved: both sides see the same machine load
        seconds, tokens = run(model, prompt, args.requests, args.max_new, None)
        free.append(seconds / tokens * 1e3)
        seconds, tokens = run(model, prompt, args.requests, args.max_new, guides)
        constrained.append(seconds / tokens * 1e3)
    result = {"model": "r1kit/nano", "dtype": "fp32", "threads": 1, "requests": args.requests,
              "max_new_tokens": args.max_new, "ms_per_token_free": round(min(free), 3),
              "ms_per_token_constrained": round(min(constrained), 3),
              "overhead_ms_per_token": round(min(constrained) - min(free), 3),
              "ratio": round(min(constrained) / min(free), 3), **mask_timing(model, guides)}
    print(f"{'side':<34}{'ms / generated token':>22}")
    print(f"{'engine, no grammar (peer)':<34}{result['ms_per_token_free']:>22.3f}")
    print(f"{'engine, JSON schema (llguidance)':<34}{result['ms_per_token_constrained']:>22.3f}")
    print(f"overhead {result['overhead_ms_per_token']:.3f} ms/token (x{result['ratio']}); llguidance mask "
          f"{result['mask_us_median']} us/token (median), schema compile {result['compile_ms']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
