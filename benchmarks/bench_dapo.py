"""DAPO's dynamic sampling (GRPOConfig.filter_groups) against plain GRPO: the same recipe, the same start, N steps.

    python benchmarks/bench_dapo.py --init runs/dapo/nano-start --steps 10 --json runs/dapo/bench_dapo.json

Both arms run `--recipe` (default configs/grpo-nano.yaml) from `--init` for `--steps` steps; the second with
`filter_groups: {enable: true, max_num_gen_batches: ...}`. Per step it reads metrics.jsonl: the informative
groups trained on (groups whose rewards vary, i.e. non-zero advantages), the generation rounds, the completions
and tokens generated, rollout and step seconds. Then greedy accuracy on `--heldout` held-out problems per kind
(`r1kit.eval.eval_arithmetic`) of the start model and of both final models. Runs resume (the GRPO checkpoints,
and each evaluation is kept in the output folder), so a killed benchmark continues. Prints one table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from r1kit.train.grpo import train_grpo
from r1kit.train.rl_config import GRPOConfig


def run_arm(args: argparse.Namespace, name: str, enable: bool) -> list[dict[str, Any]]:
    """Train one arm (resuming a killed run) and return its metrics.jsonl records."""
    out = Path(args.out) / name
    cfg = GRPOConfig.from_yaml(args.recipe, init_from=args.init, max_steps=args.steps, out_dir=str(out),
                               threads=args.threads, checkpoint_interval=1, keep_checkpoints=1,
                               filter_groups={"enable": enable, "max_num_gen_batches": args.max_num_gen_batches})
    if not (out / "final" / "model.safetensors").is_file():
        train_grpo(cfg, resume=True, progress=True)  # a fresh run when there is no checkpoint yet
    return read_metrics(args, name)


def read_metrics(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    """An arm's metrics.jsonl records (the steps it has run so far)."""
    return [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]


def evaluate(args: argparse.Namespace, name: str, folder: str) -> dict[str, float]:
    """Held-out greedy accuracy per kind of the model in `folder`, cached in <out>/eval-<name>.json."""
    from r1kit.api import R1Model
    from r1kit.eval import eval_arithmetic

    cache = Path(args.out) / f"eval-{name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model = R1Model.from_pretrained(folder, device="cpu", dtype="fp32")
    accuracy = eval_arithmetic(model, args.kinds.split(","), n=args.heldout)["accuracy"]
    cache.write_text(json.dumps(accuracy))
    return accuracy


def summarize(records: list[dict[str, Any]], cfg_groups: int) -> dict[str, float]:
    """Per-step means of what the comparison is about."""
    def mean(key: str, default: float = 0.0) -> float:
        return statistics.fmean(r.get(key, default) for r in records)

    return {"steps": len(records), "informative_groups": mean("informative_groups"),
            "groups_sampled": statistics.fmean(r.get("filter_rounds", 1) * cfg_groups for r in records),
            "rounds": mean("filter_rounds", 1), "max_rounds": max(r.get("filter_rounds", 1) for r in records),
            "generated_tokens": mean("tokens"), "rollout_s": mean("rollout_s"), "step_s": mean("step_s"),
            "sampled_accuracy": mean("accuracy"), "trained_rows": mean("trained_rows")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="runs/dapo/nano-start", help="the start model (copy r1kit/nano there)")
    p.add_argument("--recipe", default="configs/grpo-nano.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-num-gen-batches", type=int, default=10)
    p.add_argument("--heldout", type=int, default=200, help="held-out problems per kind (0: no evaluation)")
    p.add_argument("--kinds", default="sub3,add3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/dapo")
    p.add_argument("--arms", default="grpo,dapo", help="the arms to run now (a finished arm's metrics are reused)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    groups = GRPOConfig.from_yaml(args.recipe).prompts_per_step
    arms = {name: run_arm(args, name, name == "dapo") if name in args.arms.split(",") else read_metrics(args, name)
            for name in ("grpo", "dapo")}
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                              "recipe": args.recipe, "init": args.init, "groups_per_step": groups,
                              "arms": {k: summarize(v, groups) for k, v in arms.items()},
                              "per_step": {k: [{key: r.get(key) for key in ("step", "informative_groups",
                                                                              "filter_rounds", "groups_dropped",
                                                                              "tokens", "rollout_s", "step_s")}
                                               for r in v] for k, v in arms.items()}}
    if args.heldout:
        result["heldout"] = {"start": evaluate(args, "start", args.init),
                             **{k: evaluate(args, k, str(Path(args.out) / k / "final")) for k in arms}}
    print(f"{'per step (mean)':<34}{'GRPO':>12}{'GRPO + dynamic sampling':>26}")
    a, b = result["arms"]["grpo"], result["arms"]["dapo"]
    for key in ("informative_groups", "groups_sampled", "rounds", "generated_tokens", "rollout_s", "step_s",
                "sampled_accuracy"):
        print(f"{key:<34}{a[key]:>12.2f}{b[key]:>26.2f}")
    for kind, start in result.get("heldout", {}).get("start", {}).items():
        print(f"{'held-out ' + kind + ' (start ' + format(start, '.1%') + ')':<34}"
              f"{result['heldout']['grpo'][kind]:>12.1%}{result['heldout']['dapo'][kind]:>26.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
