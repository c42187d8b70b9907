"""Package finished training runs as the bundled model r1kit/nano, with its measured card.

    python scripts/package_nano.py runs/nano runs/nano-sft [--n 200]
    python scripts/package_nano.py --rl runs/nano-grpo --base runs/nano-before-rl [--n 200]
    python scripts/package_nano.py --tools-base runs/nano-before-tools
    python scripts/package_nano.py --tools runs/nano-tools --base runs/nano-before-tools [--tool-results J]

The second form adds the RL stage (configs/grpo-nano.yaml, `r1kit rl`) on top of the packaged SFT model `--base`
(a copy of r1kit/nano taken before RL, whose training_summary.json holds stages 1-2 and their evaluation): it
copies the RL run's final model, keeps the stage 1-2 loss plot, adds the RL curves (rl.png), evaluates the result
the same way and writes the card with every kind and the perplexity before and after RL.

The tools forms add the calculator-tool stage (configs/nano-tools.yaml): `--tools-base` copies the bundled model
and gives its tokenizer the R1 chat template with a tool section (`DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE`), the stage's
starting point; `--tools` bundles the stage's final model on top of it, re-measures every kind without tools and
the perplexity, measures tool use through the agent loop (`r1kit.eval.tool_use`, or the figures of a
`benchmarks/bench_tools.py` JSON of the same model given as `--tool-results`) and writes the card with all stages.

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
import subprocess
import sys
from pathlib import Path

from r1kit.api import BUNDLED_DIR, R1Model
from r1kit.eval import eval_arithmetic, eval_perplexity
from r1kit.eval.tool_use import eval_tool_use
from r1kit.model.config import format_count
from r1kit.tokenizer import DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE
from r1kit.train.data import KINDS
from r1kit.train.plots import plot_metrics, plot_rl_metrics
from r1kit.train.tool_data import CALL_KINDS

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="*", help="the training runs, stage by stage")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per arithmetic kind")
    ap.add_argument("--out", type=Path, default=BUNDLED_DIR / "nano")
    ap.add_argument("--rl", type=Path, default=None, help="the GRPO run (r1kit rl) to package on top of --base")
    ap.add_argument("--base", type=Path, default=None, help="with --rl/--tools: the packaged model it started from")
    ap.add_argument("--tools-base", type=Path, default=None, help="write the tools stage's starting model here")
    ap.add_argument("--tools", type=Path, nargs="+", default=None,
                    help="the calculator-tool run(s), in order, to package on top of --base")
    ap.add_argument("--tool-results", type=Path, default=None, help="with --tools: bench_tools.py's JSON of the run")
    a = ap.parse_args()
    if a.tools_base is not None:
        tools_base(a.tools_base)
        return
    if a.tools is not None:
        if a.base is None:
            sys.exit("--tools needs --base (the model the tools stage started from: --tools-base's folder)")
        package_tools(a.tools, a.base, a.out, a.n, a.tool_results)
        return
    if a.rl is not None:
        if a.base is None:
            sys.exit("--rl needs --base (the packaged model the RL run started from)")
        package_rl(a.rl, a.base, a.out, a.n)
        return
    if not a.runs:
        sys.exit("give the training runs stage by stage, or --rl RUN --base FOLDER")
    package_stages(a.runs, a.out, a.n)


def package_stages(runs: list[Path], out: Path, n: int) -> None:
    """Package the pretraining/SFT runs (stage by stage) as `out`: weights, loss.png across the stages, the
    held-out evaluation, training_summary.json and the model card."""
    final = runs[-1] / "final"
    missing = [f for f in FILES if not (final / f).is_file()]
    if missing:
        sys.exit(f"{final}: missing {missing}; did the run finish?")
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(final / f, out / f)
    rows, offset, elapsed, stages = [], 0, 0.0, []
    for run in runs:  # one token axis across the stages
        stage = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for r in stage:
            r["tokens"] += offset
            r["elapsed_s"] = r.get("elapsed_s", 0.0) + elapsed
        last = [r for r in stage if "loss" in r][-1]
        stages.append({"run": str(run), "steps": last["step"], "tokens": last["tokens"] - offset})
        offset, elapsed = last["tokens"], last["elapsed_s"]
        rows += stage
    combined = out / "metrics.jsonl"
    combined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_metrics(combined, out / "loss.png")
    combined.unlink()

    model = R1Model.from_pretrained(out, device="cpu", dtype="fp32")
    arithmetic = eval_arithmetic(model, list(KINDS), n=n)
    ppl = eval_perplexity(model)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    info = model.info()
    summary = {
        "recipe": ["configs/nano.yaml", "configs/nano-sft.yaml"][:len(runs)], "stages": stages,
        "params_total": info["params_total"], "params_active": info["params_active"],
        "steps": sum(s["steps"] for s in stages), "tokens": train_rows[-1]["tokens"],
        "train_time_s": round(train_rows[-1]["elapsed_s"]), "machine": f"{platform.machine()}, CPU",
        "final_train_loss": round(sum(r["loss"] for r in train_rows[-10:]) / len(train_rows[-10:]), 4),
        "final_val_loss": round(val_rows[-1]["val_loss"], 4),
        "final_maxvio": train_rows[-1].get("maxvio"),
        "stdlib_of_python": platform.python_version(),
        "eval": {"arithmetic": arithmetic["accuracy"], "arithmetic_n_per_kind": n,
                 "stdlib_perplexity": round(ppl["perplexity"], 3), "perplexity_tokens": ppl["tokens"],
                 "perplexity_windows": ppl["windows"], "perplexity_window": ppl["window"],
                 "perplexity_of_tokens": ppl["of_tokens"]},
        "examples": arithmetic["examples"][::3],
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = "\n".join(f"| {k} | {v:.1%} |" for k, v in arithmetic["accuracy"].items())
    ex = summary["examples"][0]
    per_stage = " + ".join(str(s["steps"]) for s in stages)
    (out / "README.md").write_text(f"""# r1kit/nano

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

## Held-out evaluation (greedy, {n} problems per kind)

| kind | accuracy |
|---|---:|
{acc}

Perplexity on held-out standard-library code: {summary['eval']['stdlib_perplexity']} (fp32; {ppl['tokens']}
tokens scored in {ppl['windows']} windows of {ppl['window']} spread evenly over all {ppl['of_tokens']} held-out
tokens; `r1kit eval r1kit/nano --task perplexity`, defined in r1kit/eval.py).

{example_block(ex)}

Reproduce: `r1kit train --config configs/nano.yaml --out-dir runs/nano`, then
`r1kit train --config configs/nano-sft.yaml --out-dir runs/nano-sft`, then
`python scripts/package_nano.py runs/nano runs/nano-sft`.
It is a toy for trying the stack end to end, not a general assistant.
""")
    print(json.dumps(summary["eval"], indent=2))


def copy_final(final: Path, out: Path) -> None:
    missing = [f for f in FILES if not (final / f).is_file()]
    if missing:
        sys.exit(f"{final}: missing {missing}; did the run finish?")
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(final / f, out / f)


def rl_stage(run: Path) -> dict:
    """The RL run's figures from its metrics.jsonl and config.json: steps, rollout tokens, time, curve ends."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((run / "config.json").read_text())
    first, last = rows[:10], rows[-10:]

    def mean(rs: list, key: str) -> float:
        return round(sum(r[key] for r in rs) / len(rs), 4)

    return {"run": str(run), "recipe": "configs/grpo-nano.yaml", "steps": rows[-1]["step"],
            "completions": rows[-1]["step"] * cfg["generation_batch_size"],
            "rollout_tokens": sum(r["tokens"] for r in rows), "step_time_s": round(rows[-1]["elapsed_s"]),
            "rollout_time_s": round(sum(r["rollout_s"] for r in rows)),
            "reward_first10": mean(first, "reward"), "reward_last10": mean(last, "reward"),
            "accuracy_first10": mean(first, "accuracy"), "accuracy_last10": mean(last, "accuracy"),
            "config": {k: cfg[k] for k in ("num_generations", "generation_batch_size", "learning_rate", "beta",
                                           "epsilon", "epsilon_high", "loss_type", "scale_rewards", "temperature",
                                           "reward_funcs", "reward_weights", "arithmetic_kinds")}}


def package_rl(run: Path, base: Path, out: Path, n: int) -> None:
    """Bundle the GRPO run's final model on top of `base` (see the module doc)."""
    before = json.loads((base / "training_summary.json").read_text())
    copy_final(run / "final", out)
    if (base / "loss.png").resolve() != (out / "loss.png").resolve():
        shutil.copy2(base / "loss.png", out / "loss.png")
    plot_rl_metrics(run / "metrics.jsonl", out / "rl.png")
    model = R1Model.from_pretrained(out, device="cpu", dtype="fp32")
    arithmetic = eval_arithmetic(model, list(KINDS), n=n)
    ppl = eval_perplexity(model)
    stage = rl_stage(run)
    summary = {**before, "recipe": [*before["recipe"], stage["recipe"]],
               "stages": [*before["stages"], {k: v for k, v in stage.items() if k != "config"}],
               "rl": stage,
               "eval_before_rl": before["eval"],
               "eval": {**before["eval"], "arithmetic": arithmetic["accuracy"], "arithmetic_n_per_kind": n,
                        "stdlib_perplexity": round(ppl["perplexity"], 3), "perplexity_tokens": ppl["tokens"]},
               "examples": arithmetic["examples"][::3]}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(rl_card(summary))
    print(json.dumps({"before": before["eval"], "after": summary["eval"]}, indent=2))


def example_block(ex: dict) -> str:
    """The model card's worked example: the question, then the reasoning in <think> and the answer, fenced."""
    return f"Example ({ex['question']}):\n```\n<think>\n{ex['reasoning']}\n</think>\n{ex['answer']}\n```"


def pretrain_sft_stages(s: dict) -> str:
    """Stages 1-2 of a model card (pretraining, SFT) from the packaged model's training_summary `s`."""
    pre, sft = s["stages"][0], s["stages"][1]
    return f"""1. **Pretraining** (`configs/nano.yaml`, {pre['steps']} steps, {pre['tokens'] / 1e6:.1f}M tokens):
   the Python {s['stdlib_of_python']} standard library's source and generated arithmetic problems answered in
   the R1 format, with step-by-step `<think>` traces.
2. **SFT** (`configs/nano-sft.yaml`, {sft['steps']} steps, {sft['tokens'] / 1e6:.1f}M tokens):
   loss on the assistant tokens, more weight on the kinds stage 1 got wrong most. Stages 1-2 took
   {s['train_time_s'] / 60:.0f} minutes of training steps; final train loss {s['final_train_loss']}, validation
   loss {s['final_val_loss']} (loss.png)."""


def rl_card(s: dict) -> str:
    """The model card of the SFT + RL model: stages, before/after table, curves, recipe."""
    rl, b, e = s["rl"], s["eval_before_rl"], s["eval"]
    rows = "\n".join(f"| {k} | {b['arithmetic'][k]:.1%} | {v:.1%} | {v - b['arithmetic'][k]:+.1%} |"
                     for k, v in e["arithmetic"].items())
    ex = s["examples"][0]
    c = rl["config"]
    return f"""# r1kit/nano

The model r1kit bundles: a DeepSeek-V3-shaped MoE in miniature, trained from scratch by r1kit's own recipes
on a {s['machine']} machine (2 cores), in three stages as DeepSeek-R1 was post-trained:

{pretrain_sft_stages(s)}
3. **RL: GRPO with verifiable rewards** (`configs/grpo-nano.yaml`, `r1kit rl`): {rl['steps']} steps of
   {c['generation_batch_size'] // c['num_generations']} training problems x {c['num_generations']} sampled
   completions ({rl['completions']} completions, {rl['rollout_tokens'] / 1e6:.2f}M generated tokens) through
   r1kit's engine at temperature {c['temperature']}; rewards {c['reward_funcs']} with weights
   {c['reward_weights']} (accuracy: the integer after `</think>` equals the answer; format: one think block,
   then a non-empty answer); loss `{c['loss_type']}`, epsilon {c['epsilon']} / {c['epsilon_high']}, beta
   {c['beta']}, learning rate {c['learning_rate']}; prompt mix {c['arithmetic_kinds']} (training problems only).
   {rl['step_time_s'] / 60:.0f} minutes of steps ({rl['rollout_time_s'] / 60:.0f} of them generating). Mean
   reward of the first / last 10 steps: {rl['reward_first10']} / {rl['reward_last10']}; sampled accuracy
   {rl['accuracy_first10']:.1%} / {rl['accuracy_last10']:.1%} (rl.png).

Architecture: MLA attention, 1 shared + 8 routed experts (top-2, sigmoid scores, group-limited routing,
auxiliary-loss-free balancing, kept on during RL), one multi-token-prediction depth (not trained by RL);
{format_count(s['params_total'])} parameters, {format_count(s['params_active'])} active per token; bf16 safetensors.
Held-out problems never appear in any stage.

## Held-out evaluation (greedy, {e['arithmetic_n_per_kind']} problems per kind, fp32)

| kind | after SFT | after RL | change |
|---|---:|---:|---:|
{rows}

Perplexity on held-out standard-library code: {b['stdlib_perplexity']} after SFT, {e['stdlib_perplexity']}
after RL ({e['perplexity_tokens']} tokens scored in {e['perplexity_windows']} windows of
{e['perplexity_window']} spread evenly over all {e['perplexity_of_tokens']} held-out tokens;
`r1kit eval r1kit/nano --task perplexity`, defined in r1kit/eval).

![RL curves](rl.png)

{example_block(ex)}

Reproduce: `r1kit train --config configs/nano.yaml --out-dir runs/nano`, then
`r1kit train --config configs/nano-sft.yaml --out-dir runs/nano-sft`, then
`python scripts/package_nano.py runs/nano runs/nano-sft`, then `cp -r r1kit/nano runs/nano-before-rl`,
`r1kit rl --config configs/grpo-nano.yaml --out-dir runs/nano-grpo` and
`python scripts/package_nano.py --rl runs/nano-grpo --base runs/nano-before-rl`.
It is a toy for trying the stack end to end, not a general assistant.
"""


# ---------------------------------------------------------------------------------------------------- tools stage
def tools_base(out: Path) -> None:
    """The tools stage's starting point: the bundled nano copied to ``out`` with the tool chat template, and the
    commit its weights come from (base.json)."""
    if out.exists():
        sys.exit(f"{out} exists; remove it or pick another folder")
    shutil.copytree(BUNDLED_DIR / "nano", out)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", "utf-8")
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(BUNDLED_DIR / "nano" / "model.safetensors")],
                            capture_output=True, text=True, cwd=BUNDLED_DIR.parent).stdout.strip()
    (out / "base.json").write_text(json.dumps({"nano_commit": commit or "unknown"}) + "\n")
    print(f"{out}: r1kit/nano of commit {commit or 'unknown'} with the tool chat template")


def tools_stage(runs: list[Path], base: Path) -> dict:
    """The tools runs' figures from their metrics.jsonl and config.json: recipes, steps, tokens, time, the last
    run's final losses, and the commit of the nano they started from."""
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    train = [[r for r in stage if "loss" in r] for stage in rows]
    val = [r for r in rows[-1] if "val_loss" in r]
    recipes = [f"configs/{run.name}.yaml" for run in runs]  # runs/nano-tools: configs/nano-tools.yaml
    commit = json.loads((base / "base.json").read_text())["nano_commit"] if (base / "base.json").is_file() else None
    return {"runs": [str(run) for run in runs], "steps_per_run": [t[-1]["step"] for t in train],
            "recipes": recipes,
            "steps": sum(t[-1]["step"] for t in train), "tokens": sum(t[-1]["tokens"] for t in train),
            "train_time_s": round(sum(t[-1].get("elapsed_s", 0) for t in train)),
            "final_train_loss": round(sum(r["loss"] for r in train[-1][-10:]) / len(train[-1][-10:]), 4),
            "final_val_loss": round(val[-1]["val_loss"], 4) if val else None, "started_from_commit": commit}


def package_tools(runs: list[Path], base: Path, out: Path, n: int, tool_results: Path | None) -> None:
    """Bundle the calculator-tool run's final model on top of ``base`` (see the module doc)."""
    before = json.loads((base / "training_summary.json").read_text())
    copy_final(runs[-1] / "final", out)
    if (base / "loss.png").resolve() != (out / "loss.png").resolve():
        shutil.copy2(base / "loss.png", out / "loss.png")
    plot_metrics(runs[-1] / "metrics.jsonl", out / "tools.png")
    model = R1Model.from_pretrained(out, device="cpu", dtype="fp32")
    arithmetic = eval_arithmetic(model, list(KINDS), n=n)
    ppl = eval_perplexity(model)
    if tool_results is not None:
        bench = json.loads(tool_results.read_text())
        tool = {"accuracy": bench["with_tool"], "called": bench["called"], "n": bench["n"],
                "without_tool": bench["without_tool"], "examples": bench["examples"]}
    else:
        tool = eval_tool_use(model, list(CALL_KINDS), n=n)
    stage = tools_stage(runs, base)
    summary = {**before, "recipe": [*before["recipe"], *stage["recipes"]],
               "stages": [*before["stages"], {k: stage[k] for k in ("runs", "steps", "tokens")}],
               "tools": stage,
               "eval_before_tools": before["eval"],
               "eval": {**before["eval"], "arithmetic": arithmetic["accuracy"], "arithmetic_n_per_kind": n,
                        "stdlib_perplexity": round(ppl["perplexity"], 3), "perplexity_tokens": ppl["tokens"]},
               "tool_use": {k: tool.get(k) for k in ("accuracy", "called", "n", "without_tool")},
               "tool_examples": tool["examples"], "examples": arithmetic["examples"][::3]}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(tools_card(summary))
    print(json.dumps({"before": before["eval"], "after": summary["eval"], "tool_use": summary["tool_use"]}, indent=2))


def tool_conversation(messages: list) -> str:
    """A worked agent conversation as the card shows it: the calls, the results, the answer."""
    lines = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            lines.append(f"[call {call['function']['name']}({call['function']['arguments']})]")
        if m["role"] == "tool":
            lines.append(f"[result {m['content']}]")
        elif m["role"] == "assistant" and m.get("content"):
            lines.append(m["content"])
    return "\n".join(lines)


def tools_card(s: dict) -> str:
    """The model card of the SFT + calculator-tool model: stages, before/after table, tool use, recipe."""
    t, b, e, u = s["tools"], s["eval_before_tools"], s["eval"], s["tool_use"]
    rows = "\n".join(f"| {k} | {b['arithmetic'][k]:.1%} | {v:.1%} | {v - b['arithmetic'][k]:+.1%} |"
                     for k, v in e["arithmetic"].items())
    without = u.get("without_tool") or {}
    tool_rows = "\n".join(f"| {k} | {without[k]:.1%} | {v:.1%} | {u['called'][k]:.1%} |" if k in without else
                          f"| {k} | - | {v:.1%} | {u['called'][k]:.1%} |" for k, v in u["accuracy"].items())
    ex = s["tool_examples"][0]
    recipes = " then ".join(f"`{r}` ({n} steps)" for r, n in zip(t["recipes"], t["steps_per_run"], strict=True))
    train_cmds = ", ".join(f"`r1kit train --config {r} --out-dir runs/{Path(r).stem}`" for r in t["recipes"])
    return f"""# r1kit/nano

The model r1kit bundles: a DeepSeek-V3-shaped MoE in miniature, trained from scratch by r1kit's own recipes
on a {s['machine']} machine (2 cores), in three stages:

{pretrain_sft_stages(s)} Bundled as r1kit/nano at commit {t['started_from_commit']}.
3. **Calculator tool** ({recipes}: {t['steps']} steps, {t['tokens'] / 1e6:.2f}M tokens,
   {t['train_time_s'] / 60:.0f} minutes, fp32), starting from the stage-2 model of commit
   {t['started_from_commit']} whose chat template gained a tool section (the offered tools as JSON in
   `<tools>...</tools>`, calls as `<tool_call>{{"name": ..., "arguments": {{...}}}}</tool_call>` after `</think>`,
   results as a `<tool_response>` turn; no new tokens). Generated conversations (r1kit.train.tool_data): with the
   calculator offered, 2x2-, 3x2- and 3x3-digit multiplications call it and answer with its result; the other
   kinds are answered in the head as before; nano's arithmetic and code data replayed. Final train loss
   {t['final_train_loss']}, validation loss {t['final_val_loss']} (tools.png).

Architecture: MLA attention, 1 shared + 8 routed experts (top-2, sigmoid scores, group-limited routing,
auxiliary-loss-free balancing), one multi-token-prediction depth; {format_count(s['params_total'])} parameters,
{format_count(s['params_active'])} active per token; bf16 safetensors. Held-out problems never appear in any stage.

## Held-out evaluation without tools (greedy, {e['arithmetic_n_per_kind']} problems per kind, fp32)

| kind | after SFT | after the tool stage | change |
|---|---:|---:|---:|
{rows}

Perplexity on held-out standard-library code: {e['stdlib_perplexity']} after the tool stage, against
{b['stdlib_perplexity']} after SFT ({e['perplexity_tokens']} tokens; `r1kit eval r1kit/nano --task perplexity`).

## With the calculator (greedy, {u['n']} held-out problems per kind, through `r1kit.agent`'s loop)

| kind | no tool | with the calculator | called it |
|---|---:|---:|---:|
{tool_rows}

`r1kit chat r1kit/nano --tools calculator`; `python benchmarks/bench_tools.py` measures this table. Example
({ex['kind']}, {ex['question']}):
```
{tool_conversation(ex['messages'])}
```

Reproduce: `r1kit train --config configs/nano.yaml --out-dir runs/nano`, then
`r1kit train --config configs/nano-sft.yaml --out-dir runs/nano-sft`, then
`python scripts/package_nano.py runs/nano runs/nano-sft`, then
`python scripts/package_nano.py --tools-base runs/nano-before-tools`,
{train_cmds} and
`python scripts/package_nano.py --tools {' '.join(t['runs'])} --base runs/nano-before-tools`.
It is a toy for trying the stack end to end, not a general assistant.
"""


if __name__ == "__main__":
    main()
