"""Package a finished `configs/nano.yaml` run as the bundled model r1kit/nano, with its measured card.

    python scripts/package_nano.py runs/nano [--n 200]

Copies the final checkpoint (config, bf16 safetensors, tokenizer, loss plot) into r1kit/nano/, evaluates
it on held-out data (arithmetic accuracy per kind, perplexity on held-out standard-library files) and
writes training_summary.json and a README.md model card from the run's metrics and those results.
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
from r1kit.train.data import KINDS, read_texts, split_files, stdlib_files

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=200, help="held-out problems per arithmetic kind")
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR / "nano")
    a = ap.parse_args()
    final = a.run / "final"
    missing = [f for f in FILES if not (final / f).is_file()]
    if missing:
        sys.exit(f"{final}: missing {missing}; did the run finish?")
    a.out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(final / f, a.out / f)

    model = R1Model.from_pretrained(a.out, device="cpu")
    arithmetic = eval_arithmetic(model, list(KINDS), n=a.n)
    _, val_files = split_files(stdlib_files())
    ppl = eval_perplexity(model, read_texts(val_files), max_tokens=50_000)
    rows = [json.loads(line) for line in (a.run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    info = model.info()
    summary = {
        "recipe": "configs/nano.yaml",
        "params_total": info["params_total"], "params_active": info["params_active"],
        "steps": train_rows[-1]["step"], "tokens": train_rows[-1]["tokens"],
        "train_time_s": round(train_rows[-1]["elapsed_s"]), "machine": f"{platform.machine()}, CPU",
        "final_train_loss": round(sum(r["loss"] for r in train_rows[-10:]) / len(train_rows[-10:]), 4),
        "final_val_loss": round(val_rows[-1]["val_loss"], 4),
        "final_maxvio": train_rows[-1].get("maxvio"),
        "stdlib_of_python": platform.python_version(),
        "eval": {"arithmetic": arithmetic["accuracy"], "arithmetic_n_per_kind": a.n,
                 "stdlib_perplexity": round(ppl["perplexity"], 3), "perplexity_tokens": ppl["tokens"]},
        "examples": arithmetic["examples"][::3],
    }
    (a.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = "\n".join(f"| {k} | {v:.1%} |" for k, v in arithmetic["accuracy"].items())
    ex = summary["examples"][0]
    (a.out / "README.md").write_text(f"""# r1kit/nano

The model r1kit bundles: a DeepSeek-V3-shaped MoE in miniature, trained from scratch by r1kit's own
recipe (`configs/nano.yaml`) on a {summary['machine']} machine in {summary['train_time_s'] / 60:.0f} minutes.

- Architecture: MLA attention, 1 shared + 8 routed experts (top-2, sigmoid scores, group-limited routing,
  auxiliary-loss-free balancing), one multi-token-prediction depth; {format_count(summary['params_total'])}
  parameters, {format_count(summary['params_active'])} active per token; bf16 safetensors.
- Data (no download): the Python {summary['stdlib_of_python']} standard library's source (held-out files
  for validation) and generated arithmetic problems answered in the R1 format, with step-by-step
  `<think>` traces; held-out problems never appear in training.
- Training: {summary['steps']} steps, {summary['tokens'] / 1e6:.1f}M tokens; final train loss
  {summary['final_train_loss']}, validation loss {summary['final_val_loss']} (see loss.png).

## Held-out evaluation (greedy, {a.n} problems per kind)

| kind | accuracy |
|---|---:|
{acc}

Perplexity on held-out standard-library code: {summary['eval']['stdlib_perplexity']}
({summary['eval']['perplexity_tokens']} tokens).

Example ({ex['question']}):
```
<think>
{ex['reasoning']}
</think>
{ex['answer']}
```

Reproduce: `r1kit train --config configs/nano.yaml --out-dir runs/nano && python scripts/package_nano.py runs/nano`.
It is a toy for trying the stack end to end, not a general assistant.
""")
    print(json.dumps(summary["eval"], indent=2))


if __name__ == "__main__":
    main()
