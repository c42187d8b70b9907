"""Package finished training runs as the bundled model r1kit/nano, with its measured card.

    python scripts/package_nano.py runs/nano runs/nano-sft [--n 200]

The runs are the stages in order (configs/nano.yaml, then configs/nano-sft.yaml). Copies the last stage's
final checkpoint (config, bf16 safetensors, tokenizer) into r1kit/nano/, plots the loss curves of all
stages on one token axis, evaluates the model in fp32 on held-out data (arithmetic accuracy per kind,
perplexity by r1kit.eval's one definition: the figure `r1kit eval --task perplexity` gives) and writes
training_summary.json and a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from r1kit.api import BUNDLED_DIR, R1Model
from r1kit.eval import eval_arithmetic, eval_perplexity
from r1kit.model.config import format_count
from r1kit.train.data import KINDS
from r1kit.train.plots import plot_metrics

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="the training runs, stage by stage")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per arithmetic kind")
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR / "nano")
    a = ap.parse_args()
    final = a.runs[-1] / "final"
    missing = [f for f in FILES if not (final / f).is_file()]
    if missing:
        sys.exit(f"{final}: missing {missing}; did the run finish?")
    a.out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(final / f, a.out / f)
    rows, offset, elapsed, stages = [], 0, 0.0, []
    for run in a.runs:  # one token axis across the stages
        stage = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in stage:
            r["tokens"] += offset
            r["elapsed_s"] = r.get("elapsed_s", 0.0) + elapsed
        last = [r for r in stage if "loss" in r][-1]
        stages.append({"run": str(run), "steps": last["step"], "tokens": last["tokens"] - offset})
        offset, elapsed = last["tokens"], last["elapsed_s"]
        rows += stage
    combined = a.out / "metrics.jsonl"
    combined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(combined, a.out / "loss.png")
    combined.unlink()

    model = R1Model.from_pretrained(a.out, device="cpu", dtype="fp32")
    arithmetic = eval_arithmetic(model, list(KINDS), n=a.n)
    ppl = eval_perplexity(model)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    info = model.info()
    summary = {
        "recipe": ["configs/nano.yaml", "configs/nano-sft.yaml"][:len(a.runs)], "stages": stages,
        "params_total": info["params_total"], "params_active": info["params_active"],
        "steps": sum(s["steps"] for s in stages), "tokens": train_rows[-1]["tokens"],
        "train_time_s": round(train_rows[-1]["elapsed_s"]), "machine": f"{platform.machine()}, CPU",
        "final_train_loss": round(sum(r["loss"] for r in train_rows[-10:]) / len(train_rows[-10:]), 4),
        "final_val_loss": round(val_rows[-1]["val_loss"], 4),
        "final_maxvio": train_rows[-1].get("maxvio"),
        "stdlib_of_python": platform.python_version(),
        "eval": {"arithmetic": arithmetic["accuracy"], "arithmetic_n_per_kind": a.n,
                 "stdlib_perplexity": round(ppl["perplexity"], 3), "perplexity_tokens": ppl["tokens"],
                 "perplexity_windows": ppl["windows"], "perplexity_window": ppl["window"],
                 "perplexity_of_tokens": ppl["of_tokens"]},
        "examples": arithmetic["examples"][::3],
    }
    (a.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = "\n".join(f"| {k} | {v:.1%} |" for k, v in arithmetic["accuracy"].items())
    ex = summary["examples"][0]
    per_stage = " + ".join(str(s["steps"]) for s in stages)
    (a.out / "README.md").write_text(f"""# r1kit/nano

The model r1kit bundles: a DeepSeek-V3-shaped MoE in miniature, trained from scratch by r1kit's own
recipes (`configs/nano.yaml`, then `configs/nano-sft.yaml`) on a {summary['machine']} machine (2 cores) in
{summary['train_time_s'] / 60:.0f} minutes of training steps.

- Architecture: MLA attention, 1 shared + 8 routed experts (top-2, sigmoid scores, group-limited routing,
  auxiliary-loss-free balancing), one multi-token-prediction depth; {format_count(summary['params_total'])}
  parameters, {format_count(summary['params_active'])} active per token; bf16 safetensors.
- Data (no download): the Python {summary['stdlib_of_python']} standard library's source (held-out files
  for validation) and generated arithmetic problems answered in the R1 format, with step-by-step
  `<think>` traces; held-out problems never appear in training.
- Training: {summary['steps']} steps ({per_stage}), {summary['tokens'] / 1e6:.1f}M tokens; final train loss
  {summary['final_train_loss']}, validation loss {summary['final_val_loss']} (on the last stage's validation
  mixture, mostly arithmetic: the drop at the stage boundary in loss.png is the mixture changing).

## Held-out evaluation (greedy, {a.n} problems per kind)

| kind | accuracy |
|---|---:|
{acc}

Perplexity on held-out standard-library code: {summary['eval']['stdlib_perplexity']} (fp32; {ppl['tokens']}
tokens scored in {ppl['windows']} windows of {ppl['window']} spread evenly over all {ppl['of_tokens']} held-out
tokens; `r1kit eval r1kit/nano --task perplexity`, defined in r1kit/eval.py).

Example ({ex['question']}):
```
<think>
{ex['reasoning']}
</think>
{ex['answer']}
```

Reproduce: `r1kit train --config configs/nano.yaml --out-dir runs/nano`, then
`r1kit train --config configs/nano-sft.yaml --out-dir runs/nano-sft`, then
`python scripts/package_nano.py runs/nano runs/nano-sft`.
It is a toy for trying the stack end to end, not a general assistant.
""")
    print(json.dumps(summary["eval"], indent=2))


if __name__ == "__main__":
    main()
