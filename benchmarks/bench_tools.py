"""Calculator-tool use of a model: held-out accuracy per kind through the agent loop, beside the same kinds without
the tool.

    python benchmarks/bench_tools.py [--model r1kit/nano] [--kinds mul2x2,mul3x2,mul3x3] [--n 200] \\
        [--json runs/bench_tools.json]

With the tool: each held-out problem is one `r1kit.agent.run` with the built-in calculator offered, greedy
(`r1kit.eval.tool_use.eval_tool_use`; "called" is the share of conversations that made a call). Without: the
batched greedy chat answer with no tools (`r1kit.eval.eval_arithmetic`, the model card's figure). The peer column
is the model on its own; `--no-baseline` skips it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r1kit.api import R1Model
from r1kit.eval import eval_arithmetic
from r1kit.eval.tool_use import eval_tool_use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="r1kit/nano")
    ap.add_argument("--kinds", default="mul2x2,mul3x2,mul3x3", help="comma-separated problem kinds")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-tool column")
    ap.add_argument("--json", default="runs/bench_tools.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kinds = a.kinds.split(",")
    model = R1Model.from_pretrained(a.model, device="cpu", dtype="fp32")
    start = time.perf_counter()
    tool = eval_tool_use(model, kinds, n=a.n)
    tool_s = time.perf_counter() - start
    plain = None if a.no_baseline else eval_arithmetic(model, kinds, n=a.n, max_new_tokens=384)
    print(f"\n{a.model}, {a.n} held-out problems per kind, greedy, fp32, {a.threads} thread(s)")
    print(f"{'kind':8} {'no tool':>8} {'with calculator':>16} {'called':>7}")
    for k in kinds:
        without = "-" if plain is None else f"{plain['accuracy'][k]:.1%}"
        print(f"{k:8} {without:>8} {tool['accuracy'][k]:>16.1%} {tool['called'][k]:>7.1%}")
    print(f"agent loop: {tool_s:.0f} s for {a.n * len(kinds)} conversations")
    result = {"model": a.model, "n": a.n, "with_tool": tool["accuracy"], "called": tool["called"],
              "without_tool": None if plain is None else plain["accuracy"], "agent_seconds": round(tool_s, 1),
              "threads": a.threads, "examples": tool["examples"]}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", a.json)


if __name__ == "__main__":
    main()
