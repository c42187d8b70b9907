"""Train, measure and bundle r1kit/nano-distill-qwen2.

    python scripts/package_distill.py run [--device cuda] [--recipes baseline,distilled,ce] [--json J]
        the recipes (RECIPES: configs/distill-nano-baseline.yaml, configs/distill-nano.yaml (CE + JSD),
        configs/distill-nano-ce.yaml (CE only); a finished run is kept, a killed one resumed), then held-out
        arithmetic accuracy (r1kit.eval.eval_arithmetic: greedy, 200 per kind) of each student and the teacher,
        with the seconds each stage took.
    python scripts/package_distill.py package [--bundle distilled|ce] [--json J] [--out DIR]
        copies that recipe's final/ into r1kit/nano-distill-qwen2 (or DIR) with a loss plot of the runs and the
        model card (README.md) holding the measured table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"baseline": ROOT / "configs/distill-nano-baseline.yaml", "distilled": ROOT / "configs/distill-nano.yaml",
           "ce": ROOT / "configs/distill-nano-ce.yaml"}
LABELS = {"distilled": "CE + JSD, lmbda 0.25", "ce": "teacher traces, CE only", "baseline": "baseline, no teacher"}
BUNDLE = ROOT / "r1kit/nano-distill-qwen2"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def train_all(device: str, names: list[str]) -> dict[str, dict]:
    """Run (or resume, or keep when finished) the named recipes; each one's summary with its wall time."""
    from r1kit.train.distill import DistillConfig, distill

    out = {}
    for name in names:
        cfg = DistillConfig.from_yaml(RECIPES[name])
        done = Path(cfg.student.out_dir) / "summary.json"
        if done.is_file() and json.loads(done.read_text()).get("steps") == cfg.student.total_steps:
            out[name] = json.loads(done.read_text())
            continue
        t0 = time.perf_counter()
        resume = (Path(cfg.student.out_dir) / "checkpoints").is_dir()
        summary = distill(cfg, resume=resume, device=device)
        summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
        done.write_text(json.dumps(summary, indent=2))
        out[name] = summary
        print(name, json.dumps(summary), flush=True)
    return out


def evaluate_all(device: str, teacher: str, names: list[str]) -> dict[str, dict]:
    """Held-out accuracy per kind (the one definition, r1kit.eval) of the named students and the teacher."""
    from r1kit.api import R1Model
    from r1kit.eval import eval_arithmetic
    from r1kit.train.data import KINDS
    from r1kit.train.distill import DistillConfig

    models = {name: str(Path(DistillConfig.from_yaml(RECIPES[name]).student.out_dir) / "final") for name in names}
    models["teacher"] = teacher
    results = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        model = R1Model.from_pretrained(path, device=device, dtype="fp32")
        res = eval_arithmetic(model, list(KINDS), n=200, batch_size=200, progress=False)
        results[name] = {"path": path, "accuracy": res["accuracy"], "seconds": round(time.perf_counter() - t0, 1),
                         "params": model.config.num_params(), "examples": res["examples"][::3]}
        print(name, json.dumps(res["accuracy"]), flush=True)
    return results


def cmd_run(a: argparse.Namespace) -> None:
    torch.manual_seed(0)
    machine = (torch.cuda.get_device_name() if a.device.startswith("cuda") else
               f"{platform.machine()}, {torch.get_num_threads()} threads")
    names = a.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; known: {sorted(RECIPES)}")
    runs = train_all(a.device, names)
    evals = evaluate_all(a.device, a.teacher, names)
    Path(a.json).write_text(json.dumps({"machine": machine, "device": a.device, "runs": runs, "eval": evals},
                                       indent=2))


# ---------------------------------------------------------------------------------------------------- package


def plot_runs(png: Path, names: list[str]) -> None:
    """Training and validation loss of the named runs against steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from r1kit.train.distill import DistillConfig

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rows = [json.loads(line) for line in (Path(DistillConfig.from_yaml(RECIPES[name]).student.out_dir)
                                              / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{name}: training loss")
        if any(r["kd_loss"] for r in train):
            axes[0].plot([r["step"] for r in train], [r["kd_loss"] for r in train], label=f"{name}: JSD to teacher")
        axes[1].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label=name)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].set_title("training objective")
    axes[1].set_title("held-out reference traces: cross-entropy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


ABLATIONS = {"seq": "sequence-level only (CE on the teacher's traces)", "fkl": "forward KL + CE, off-policy"}


def loss_step(cfg) -> str:
    """Step 2 of the card's recipe: the bundled run's loss."""
    lo = cfg.loss
    if not lo.kd_weight:
        return (f"Sequence-level only: cross-entropy on those traces (weight {lo.ce_weight}); no divergence to the "
                "teacher's logits (kd_weight 0, lmbda 0): the teacher's part ended with the traces.")
    return (f"Logit-level: cross-entropy on those traces (weight {lo.ce_weight}) plus GKD's generalised JSD to the "
            f"teacher's logits (weight {lo.kd_weight}, beta {lo.beta}, temperature {lo.temperature}), with a "
            f"fraction lmbda = {lo.lmbda} of the micro-batches on-policy (the student samples, the teacher scores).")


def card(results: dict, ablations: dict | None, bundle: str) -> str:
    """The model card of recipe `bundle`: what it is, the measured table (every evaluated recipe and the
    ablations run beside it), how it was made."""
    from r1kit.train.data import KINDS
    from r1kit.train.distill import DistillConfig

    ev, runs = results["eval"], results["runs"]
    cfg = DistillConfig.from_yaml(RECIPES[bundle])
    recipe = RECIPES[bundle].relative_to(ROOT)
    stats = json.loads((Path(cfg.student.out_dir) / "traces.json").read_text())["stats"]
    teacher_commit = (ROOT / "runs/teacher-nano/COMMIT").read_text().strip()
    students = [n for n in ("distilled", "ce") if n in ev]
    cols = {f"{LABELS[n]}{' (this model)' if n == bundle else ''}": ev[n]["accuracy"] for n in students}
    cols.update({ABLATIONS[k]: v["accuracy"] for k, v in (ablations or {}).items() if not (k == "seq" and "ce" in ev)})
    cols.update({"baseline, no teacher": ev["baseline"]["accuracy"], "teacher r1kit/nano": ev["teacher"]["accuracy"]})
    head = "| kind | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)
    rows = "\n".join(f"| {k} | " + " | ".join(f"{c[k]:.1%}" for c in cols.values()) + " |" for k in KINDS)
    mean = "| mean | " + " | ".join(f"{sum(c.values()) / len(c):.1%}" for c in cols.values()) + " |"
    d, b, s = runs[bundle], runs["baseline"], cfg.student
    return f"""# r1kit/nano-distill-qwen2

A dense Qwen2-architecture student ({ev[bundle]['params'] / 1e6:.2f}M parameters: 4 layers, hidden 192, 6 query /
2 key-value heads, tied embeddings) distilled from r1kit/nano (a DeepSeek-V3-shaped MoE, 8.67M parameters) by
`r1kit distill --config {recipe}`. Hugging Face format: `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load this folder (`model_type: qwen2`; nano's 4096-token tokenizer, its R1 chat template and
bos/eos), and their greedy continuation equals r1kit's (tests/test_nano_distill.py). tokenizer_config.json carries an
`auto_map` naming PreTrainedTokenizerFast: transformers 5 otherwise builds Qwen2Tokenizer for any qwen2 checkpoint,
whose own pre-tokenizer splits text (e.g. Python code) differently from this tokenizer.json.

Teacher: r1kit/nano as of commit {teacher_commit[:7]} (snapshot runs/teacher-nano).

## Held-out evaluation (greedy, 200 problems per kind, `r1kit eval ... --task arithmetic`)

Same student architecture, the same {stats['prompts']} training problems, {s.max_steps} steps of {s.batch_size} x
{s.seq_len} tokens and the same schedule in every column; the baseline trains on the problems' reference traces
(configs/distill-nano-baseline.yaml), the others on the teacher's verified traces only and differ only in `loss:`.

{head}
{rows}
{mean}

The teacher is the ceiling of what its traces teach: it solved {stats['kept_by_kind']['mul2x2']} of the mul2x2
problems, so no distilled student learns mul2x2, and dropping those ~1,050 multiplication traces also costs mul2x1
(fewer multiplication examples). On addition and subtraction the distilled students reach or pass the teacher. The
reference traces are a better teacher still (correct on every problem), so here the no-teacher baseline wins.
Columns other than this model's were run with the same code and recipe except `loss:`; their weights are not bundled.

## Recipe

1. Sequence-level: the teacher answered {stats['prompts']} training problems (never held-out ones), greedy, through
   r1kit's engine; {stats['kept']} verified traces were kept (right answer in R1's format), per kind
   {', '.join(f"{k} {v}" for k, v in stats['kept_by_kind'].items())}.
2. {textwrap.fill(loss_step(cfg), 114, subsequent_indent="   ")}
3. {s.max_steps} steps of {s.batch_size} x {s.seq_len} tokens (packed, per-document attention), AdamW, lr
   {s.learning_rate} with warmup and cosine decay, fp32.

Ran on {results['machine']} ({results['device']}): teacher traces {d['trace_seconds']} s ({stats['tok_s']} tokens/s),
this student {d['train_seconds']} s of steps, baseline {b['train_seconds']} s; evaluation {ev[bundle]['seconds']} s
per student. The teacher's column reproduces r1kit/nano's own card. loss.png: the runs' training objective and their
cross-entropy on held-out reference traces. It is a toy for trying the stack end to end, not a general assistant.
"""


def cmd_package(a: argparse.Namespace) -> None:
    from r1kit.train.distill import DistillConfig

    results = json.loads(Path(a.json).read_text())
    if a.bundle not in results["eval"]:
        raise SystemExit(f"--bundle {a.bundle}: {a.json} has no evaluation of it (evaluated: "
                         f"{sorted(results['eval'])}); run `package_distill.py run --recipes ...,{a.bundle}` first")
    final = Path(DistillConfig.from_yaml(RECIPES[a.bundle]).student.out_dir) / "final"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(final / name, out / name)
    plot_runs(out / "loss.png", [n for n in RECIPES if n in results["runs"]])
    ablations = json.loads(Path(a.ablations).read_text()) if a.ablations else None
    (out / "README.md").write_text(card(results, ablations, a.bundle))
    summary = {k: v for k, v in results.items() if k != "eval"}
    summary["bundled"] = a.bundle
    summary["eval"] = {n: {"accuracy": e["accuracy"], "seconds": e["seconds"]} for n, e in results["eval"].items()}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    print(subprocess.run(["ls", "-la", str(out)], capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--device", default="cpu")
    r.add_argument("--teacher", default="runs/teacher-nano")
    r.add_argument("--json", default="runs/distill-eval.json")
    r.add_argument("--recipes", default="baseline,distilled,ce", help=f"comma-separated, of {sorted(RECIPES)}")
    k = sub.add_parser("package")
    k.add_argument("--bundle", default="distilled", choices=["distilled", "ce"], help="the recipe whose student ships")
    k.add_argument("--out", default=str(BUNDLE), help="the bundle folder (default r1kit/nano-distill-qwen2)")
    k.add_argument("--json", default="runs/distill-eval.json")
    k.add_argument("--ablations", default=None, help="JSON of other loss settings' accuracy (same recipe otherwise)")
    a = p.parse_args()
    {"run": cmd_run, "package": cmd_package}[a.cmd](a)


if __name__ == "__main__":
    main()
