"""A few-second timing of the quantized linears' CPU paths: ``python benchmarks/bench_quant_linear.py [--threads 1]``.

For an (M, K) x (K, N) matmul it times, in microseconds per call: ``F.linear`` on an already dequantized
weight (the unquantized speed), each quantized module's ``forward`` (the fast path) and ``reference_forward``
(dequantize per call + ``F.linear``). Numbers on a shared machine are noisy; use one thread there.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.quant.linear import Float8WeightLinear, Int4Linear, Int8Linear


def _time(fn, seconds: float = 0.3) -> float:  # noqa: ANN001
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


@torch.no_grad()
def bench(m: int = 1, k: int = 2048, n: int = 2048, dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    lin = nn.Linear(k, n, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(m, k).to(dtype)
    out = {}
    for name, mod in (("int8", Int8Linear.from_linear(lin)), ("int4", Int4Linear.from_linear(lin, group_size=64)),
                      ("fp8", Float8WeightLinear.from_linear(lin))):
        w = mod.dequantize(dtype)
        base = _time(lambda w=w: F.linear(x, w))
        fast = _time(lambda mod=mod: mod(x))
        ref = _time(lambda mod=mod: mod.reference_forward(x))
        out[name] = {"linear_us": base, "fast_us": fast, "reference_us": ref, "speedup_vs_linear": base / fast}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"({a.m}, {a.k}) x ({a.k}, {a.n}) {a.dtype}, {a.threads} thread(s)")
    for name, r in bench(a.m, a.k, a.n, dtype).items():
        print(f"{name:5s} F.linear(dequantized) {r['linear_us']:8.0f} us   fast {r['fast_us']:8.0f} us   "
              f"reference {r['reference_us']:8.0f} us   linear/fast {r['speedup_vs_linear']:.2f}x")


if __name__ == "__main__":
    main()
