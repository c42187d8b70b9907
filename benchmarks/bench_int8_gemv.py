"""Batch-1 int8 weight-only GEMV on CPU: which torch op reads the weights fastest, in effective GB/s.

    python benchmarks/bench_int8_gemv.py [--threads 1,2] [--no-compile] [--json out.json]

For the matrix shapes of the ~150M Qwen2-shaped model of bench_engine.py (hidden 768, kv 256, intermediate 2048,
vocab 50000; q/k/v and gate/up also fused into one matrix each), y (1, N) = x (1, K) @ W^T with W int8 (N, K)
and a bf16 per-row scale, timed per call (best of 3 short runs) and reported as weight bytes read per second:

    bf16_linear      F.linear on a bf16 weight (2 bytes per weight: the unquantized peer; its GB/s counts bf16 bytes)
    int8pack_mm      torch._weight_int8pack_mm (what Int8Linear runs for bf16 decode)
    convert_linear   F.linear(x, W.to(bf16)) * scale (Int8Linear's fallback)
    int_mm_w8a8      torch._int_mm on int8 activations too (W8A8: other numerics, for reference; 32 rows, the
                     op's minimum, so it does 32x the useful work at M = 1)
    compiled_reduce  torch.compile of (x * W.float()).sum(-1) * scale: one fused conversion + reduction loop
    r1kit_c_int8     r1kit.kernels.linear_int8, the C AVX-512 GEMV (when it builds on this machine)

Int8Linear runs r1kit_c_int8 for weights >= r1kit.quant.linear.INT8_STREAM_MIN_BYTES (0: all), else int8pack_mm.
    read_sum         torch.sum over an fp32 tensor of the same bytes (the read speed of that working set)

Every variant is checked against int8pack_mm before it is timed (relative error printed). The machine is shared:
compare columns within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1kit import kernels

SHAPES = {"q/o 768x768": (768, 768), "k/v 256x768": (256, 768), "qkv fused 1280x768": (1280, 768),
          "gate/up 2048x768": (2048, 768), "gate_up fused 4096x768": (4096, 768), "down 768x2048": (768, 2048),
          "lm_head 50000x768": (50000, 768)}


def best_seconds(fn, budget: float = 0.3) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget / 3:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - start) / n)
    return best


def reduce_gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return ((x.float()[:, None, :] * q.float()[None]).sum(-1) * s.float()).to(x.dtype)


@torch.no_grad()
def bench_shape(n: int, k: int, compiled) -> dict[str, dict]:  # noqa: ANN001
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    scale32 = w.abs().amax(1) / 127
    q = torch.round(w / scale32[:, None]).to(torch.int8)
    s = scale32.to(torch.bfloat16)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    wb = w.to(torch.bfloat16)
    xi = torch.randint(-127, 128, (32, k), dtype=torch.int8, generator=gen)
    read = torch.ones(n * k // 4)
    variants = {
        "bf16_linear": (lambda: F.linear(x, wb), 2 * n * k),
        "int8pack_mm": (lambda: torch._weight_int8pack_mm(x, q, s), n * k),
        "convert_linear": (lambda: F.linear(x, q.to(torch.bfloat16)) * s, n * k),
        "int_mm_w8a8": (lambda: torch._int_mm(xi, q.t()), n * k),
        "read_sum": (lambda: read.sum(), n * k),
    }
    if compiled is not None:
        variants["compiled_reduce"] = (lambda: compiled(x, q, s), n * k)
    if kernels.load() is not None:
        variants["r1kit_c_int8"] = (lambda: kernels.linear_int8(x, q, scale32), n * k)
    ref = torch._weight_int8pack_mm(x, q, s).float()
    out = {}
    for name, (fn, nbytes) in variants.items():
        err = None
        if name in ("int8pack_mm", "convert_linear", "compiled_reduce", "r1kit_c_int8"):
            err = float((fn().float() - ref).norm() / ref.norm())
        seconds = best_seconds(fn)
        out[name] = {"us": seconds * 1e6, "GBs": nbytes / seconds / 1e9, "rel_err_vs_int8pack": err}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (compiling takes ~3-13 s/shape)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compile per shape (and per thread count)
    compiled = None if a.no_compile else torch.compile(reduce_gemv, dynamic=False)
    results: dict[str, dict] = {}
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        results[str(threads)] = {}
        print(f"\n{threads} thread(s): effective GB/s of weights read (bf16_linear counts its 2-byte weights)")
        cols = None
        for label, (n, k) in SHAPES.items():
            r = bench_shape(n, k, compiled)
            results[str(threads)][label] = r
            if cols is None:
                cols = list(r)
                print("| shape | " + " | ".join(cols) + " | int8pack speed-up vs bf16 |")
                print("|---|" + "---:|" * (len(cols) + 1))
            print(f"| {label} | " + " | ".join(f"{r[c]['GBs']:.2f}" for c in cols)
                  + f" | {r['bf16_linear']['us'] / r['int8pack_mm']['us']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
