"""Continual learning measured: how much of the old tasks each method keeps while learning new ones.

    nice -n 10 python benchmarks/bench_continual.py --json runs/bench_continual.json [--quick] [--part digits|llm]

(a) Sanity against the literature, on scikit-learn's bundled 8x8 digits (offline) with a small MLP: permuted digits
    (5 tasks, a fixed pixel permutation each, domain-incremental) and split digits (5 tasks of 2 classes,
    class-incremental, one shared 10-way head), naive vs EWC vs replay, with r1kit's Fisher, EWC penalty and replay
    buffer. Peer: Avalanche's published reference results (permuted MNIST: EWC 0.83 stream accuracy; split MNIST:
    naive collapses, SI 0.97, LwF 0.23); Avalanche itself is not installed here, so the peer column is its numbers.
(b) The LLM sequence from the bundled nano, through r1kit's training loop (`continual:` section, one run per stage,
    each continuing from the previous with `continual.from_run`): stage 0 is nano (its original task: arithmetic
    add2/sub2/add3/sub3/mul2x1; the code side is not scored here), stage 1 learns "compare" (which of two numbers
    is larger, with a digit-by-digit <think> trace), stage 2 "reverse" (a 3-digit number with its digits reversed);
    nano scores 0 on both. Methods at equal steps and learning rate: plain fine-tuning and any combination of EWC,
    elastic freezing, replay and LwF (`--methods plain,replay=0.5+ewc=3e6,...`). Accuracy = greedy answers after
    </think> on held-out problems. The target (issue #18): the original task within 2 points of its start while the
    new tasks reach >= 90% of plain fine-tuning's accuracy; `target` in the JSON says which methods meet it.
    Long runs: `--resume` keeps what --json holds (a `--stages 1` search extends to 2 stages).

JSON: {"tasks": [...], "methods": {name: {"accuracy": [[task j after stage i]], "average_accuracy", "forgetting",
"backward_transfer"}}, "sanity": {...}}. Forgetting of task j = its best accuracy before the last stage minus its
last; backward transfer = mean over earlier tasks of (last accuracy - accuracy right after learning it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r1kit.fileio import atomic_write

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "continual"
ORIGINAL_KINDS = ["add2", "sub2", "add3", "sub3", "mul2x1"]

# ---------------------------------------------------------------------------------------------------- metrics


def stream_metrics(acc: list[list[float]]) -> dict[str, float]:
    """Average accuracy (last stage, all tasks), forgetting and backward transfer of an accuracy matrix acc[stage][task]
    where task j is learnt at stage j."""
    n = len(acc)
    acc = [row[:n] for row in acc]  # the tasks learnt so far (a --stages 1 run evaluates the later ones too)
    last = acc[-1]
    earlier = range(n - 1)
    forgetting = [max(acc[i][j] for i in range(j, n - 1)) - last[j] for j in earlier]
    bwt = [last[j] - acc[j][j] for j in earlier]
    return {"average_accuracy": sum(last) / len(last),
            "forgetting": sum(forgetting) / max(1, len(forgetting)),
            "backward_transfer": sum(bwt) / max(1, len(bwt))}


# ---------------------------------------------------------------------------------------------------- (a) digits


def digits_tasks(kind: str, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """5 tasks of (x_train, y_train, x_test, y_test): permuted pixels, or 2 classes each (split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    cut = int(0.7 * len(y))
    tasks = []
    for t in range(5):
        if kind == "permuted":
            perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
            xt, yt = x[:, perm], y
        else:
            keep = (y == 2 * t) | (y == 2 * t + 1)
            xt, yt = x[keep], y[keep]
        c = int(0.7 * len(yt)) if kind == "split" else cut
        tasks.append((xt[:c], yt[:c], xt[c:], yt[c:]))
    return tasks


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def classifier_ll(model, row, labels, gen):
    """Log-likelihood of one example for r1kit's fisher_diagonal; row = (x (1, 64), y (1,))."""
    logp = torch.log_softmax(model(row[0]), dim=-1)
    y = torch.multinomial(logp.exp().detach(), 1, generator=gen)[:, 0] if labels == "sampled" else row[1]
    return logp.gather(1, y[:, None]).sum()


def run_digits(kind: str, method: str, epochs: int, seed: int, ewc_lambda: float, replay_ratio: float = 0.5
               ) -> list[list[float]]:
    """Train an MLP on the 5 tasks in order with `method` (naive | ewc | replay); accuracy matrix [stage][task]."""
    from r1kit.train.continual.importance import Importance, ewc_penalty, fisher_diagonal
    from r1kit.train.continual.replay import ReplayBuffer

    tasks, model = digits_tasks(kind, seed), mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    buf, imp, acc = ReplayBuffer(200, 1 << 20, seed), None, []
    g = torch.Generator().manual_seed(seed)
    for t, (xt, yt, _, _) in enumerate(tasks):
        buf.begin_task(f"task{t}")
        for _ in range(epochs):
            for idx in torch.randperm(len(yt), generator=g).split(32):
                x, y = xt[idx], yt[idx]
                if method == "replay":
                    for i in range(len(y)):
                        buf.offer((x[i], y[i]))
                    old = buf.sample(round(replay_ratio * len(y)), (x[0], y[0]))
                    if old:
                        x = torch.cat([x, torch.stack([r[0] for r in old])])
                        y = torch.cat([y, torch.stack([r[1] for r in old])])
                loss = torch.nn.functional.cross_entropy(model(x), y)
                if method == "ewc" and imp is not None:
                    loss = loss + ewc_penalty(model, imp, ewc_lambda)
                opt.zero_grad()
                loss.backward()
                opt.step()
        if method == "ewc":
            rows = [(xt[i:i + 1], yt[i:i + 1]) for i in range(min(300, len(yt)))]
            fisher = fisher_diagonal(model, rows, classifier_ll, "empirical")
            imp = Importance.start(model, fisher, f"task{t}") if imp is None else imp.add_task(model, fisher, 1.0,
                                                                                               f"task{t}")
        with torch.no_grad():
            acc.append([float((model(xe).argmax(-1) == ye).float().mean()) for _, _, xe, ye in tasks])
    return acc


def digits_part(quick: bool, seed: int) -> dict:
    """Naive / EWC / replay on permuted and split digits; the stream accuracy is the final average accuracy."""
    epochs = 6 if quick else 10
    out = {"peer": "Avalanche reference results (published, not re-run): permuted MNIST EWC 0.83 stream accuracy; "
                   "split MNIST naive collapses (~0.2), LwF 0.23, SI 0.97", "epochs_per_task": epochs, "runs": {}}
    for kind, lam in (("permuted", 100.0), ("split", 1000.0)):
        for method in ("naive", "ewc", "replay"):
            acc = run_digits(kind, method, epochs, seed, lam)
            out["runs"][f"{kind}/{method}"] = {"accuracy": acc, **stream_metrics(acc),
                                                **({"ewc_lambda": lam} if method == "ewc" else {})}
            print(f"digits {kind:>8} {method:>6}: stream accuracy {stream_metrics(acc)['average_accuracy']:.3f}",
                  flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- (b) the LLM


def _heldout(key: str) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < 0.1


def compare_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, reasoning, answer): which of two different 2-digit numbers is larger, digit by digit."""
    a, b = rng.sample(range(10, 100), 2)
    lines = [f"tens: {a // 10} vs {b // 10}, " + ("equal." if a // 10 == b // 10 else
                                                 f"{max(a, b) // 10}>{min(a, b) // 10}.")]
    if a // 10 == b // 10:
        lines.append(f"ones: {a % 10} vs {b % 10}, {max(a, b) % 10}>{min(a, b) % 10}.")
    lines.append(f"So the larger is {max(a, b)}.")
    return f"Which is larger, {a} or {b}?", "\n".join(lines), max(a, b)


def reverse_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, reasoning, answer): a 3-digit number (last digit not 0) with its digits reversed, digit by digit."""
    n = rng.randrange(100, 1000)
    while n % 10 == 0:
        n = rng.randrange(100, 1000)
    d = str(n)
    lines = [f"digits: {', '.join(d)}.", f"reversed: {', '.join(d[::-1])}.", f"So {n} reversed is {d[::-1]}."]
    return f"What is {n} with its digits reversed?", "\n".join(lines), int(d[::-1])


NEW_TASKS = {"compare": compare_problem, "reverse": reverse_problem}


def task_problems(task: str, n: int, split: str, seed: int) -> list[tuple[str, str, int]]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = NEW_TASKS[task](rng)
        if _heldout(p[0]) == (split == "val"):
            out.append(p)
    return out


def write_task_jsonl(path: Path, task: str, n: int, seed: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "reasoning_content": r,
                                                           "content": str(a)}]}
            for q, r, a in task_problems(task, n, "train", seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy_accuracy(model, questions: list[tuple[str, int]], max_new_tokens: int = 160) -> float:
    """Fraction of questions whose greedy answer after </think> is right (r1kit.api.R1Model)."""
    from r1kit.generate import SamplingParams, generate_tokens
    from r1kit.train.data import parse_answer

    tok, stop = model._tok(chat=True), model.stop_ids()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    right = 0
    for start in range(0, len(questions), 48):
        chunk = questions[start:start + 48]
        prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q, _ in chunk]
        outs: list[list[int]] = [[] for _ in chunk]
        for step in generate_tokens(model.model, prompts, params, stop):
            for row, t in enumerate(step):
                if t is not None and t not in stop:
                    outs[row].append(t)
        right += sum(parse_answer(tok.decode(ids, skip_special_tokens=True)) == a
                     for (_, a), ids in zip(chunk, outs, strict=True))
    return right / len(questions)


def eval_stage(folder: Path, tasks: list[str], n: int, seed: int) -> list[float]:
    """Accuracy of the model in `folder` on the original task and `tasks`, n held-out problems per kind."""
    from r1kit.api import R1Model
    from r1kit.train.data import sample_problem

    model = R1Model.from_pretrained(folder, device="cpu")
    rng = random.Random(seed)
    original = [(p.question, p.answer) for p in (sample_problem(rng, k, "val") for k in ORIGINAL_KINDS
                                                  for _ in range(n))]
    accs = [greedy_accuracy(model, original)]
    for task in tasks:
        accs.append(greedy_accuracy(model, [(q, a) for q, _, a in task_problems(task, n, "val", seed + 1)], 100))
    return accs


# A method is "plain" or a '+'-joined list of terms, each `name` or `name=value` (the value of its key; the default
# below), e.g. "replay=0.5+ewc=1e6". Every term is a key of the recipe's `continual:` section.
TERMS = {"ewc": ("ewc_lambda", 3e5), "freeze": ("freeze_fraction", 0.2), "replay": ("replay_ratio", 0.5),
         "lwf": ("lwf_alpha", 1.0)}
METHODS = ["plain", "ewc", "freeze", "replay", "lwf", "replay+ewc", "replay+lwf"]
QUICK_METHODS = ["plain", "replay+ewc"]


def method_section(method: str) -> dict | None:
    """The `continual:` section of method `method` (None: plain fine-tuning, no continual section)."""
    if method == "plain":
        return None
    section: dict = {}
    for term in method.split("+"):
        name, _, value = term.partition("=")
        if name not in TERMS:
            raise SystemExit(f"method {method!r}: unknown term {name!r} (plain, or terms {', '.join(TERMS)} joined "
                             "by '+', each optionally =value)")
        key, default = TERMS[name]
        try:
            section[key] = float(value) if value else default
        except ValueError:
            raise SystemExit(f"method {method!r}: {term!r}: {value!r} is not a number") from None
    if "freeze_fraction" in section:
        section["freeze"] = "weight"
    if "ewc_lambda" in section:
        section["ewc_decay"] = 1.0
    return section


@dataclass(frozen=True)
class LLMSettings:
    """What every method of the LLM part shares: steps per stage, learning rate, data and evaluation sizes."""

    steps: int = 40
    n_eval: int = 25  # held-out problems per kind (5 original kinds, each new task)
    n_train: int = 1000  # training problems per new task
    fisher_rows: int = 32
    stages: int = 2  # new tasks learnt (1: compare only, e.g. for a search)
    learning_rate: float = 1e-3
    threads: int = 2
    nano: str = str(NANO)  # the starting model


QUICK = LLMSettings(steps=40, n_eval=8, n_train=400, fisher_rows=16)


def stage_recipe(method: str, data: Path, prev: Path, out: Path, s: LLMSettings, seed: int) -> dict:
    """The training recipe of one stage: the same for every method but its continual section."""
    start = prev == Path(s.nano)
    recipe = {"model": {"preset": "nano"}, "init_from": str(prev if start else prev / "final"),
              "out_dir": str(out), "data": {"chat_jsonl": str(data), "validation_fraction": 0.05},
              "seq_len": 128, "batch_size": 8, "max_steps": s.steps, "warmup_steps": 5,
              "learning_rate": s.learning_rate, "min_lr_ratio": 0.1, "eval_interval": s.steps, "eval_batches": 1,
              "checkpoint_interval": s.steps, "log_interval": 5, "precision": "fp32", "threads": s.threads,
              "seed": seed, "moe_balance_rate": 0.0}
    c = method_section(method)
    if c is not None:
        recipe["continual"] = {**c, "from_run": str(prev), "fisher_rows": s.fisher_rows,
                               "replay_examples": 256, "task": out.name,
                               **({"previous_recipe": "configs/nano-sft.yaml", "previous_task": "original"}
                                  if start else {})}
    return recipe


def write_json(file: Path | None, results: dict) -> None:
    if file is not None:
        atomic_write(file, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


def target_check(results: dict) -> dict[str, dict]:
    """Per method, the issue's target: the original task's accuracy after the last stage within 2 points of its start,
    and the new tasks' accuracy (each right after the stage that learns it, averaged) at least 90% of plain's."""
    methods = results["methods"]
    if "plain" not in methods:
        return {}

    def new_acc(acc: list[list[float]], stages: int) -> float:
        return sum(acc[j][j] for j in range(1, stages + 1)) / max(1, stages)

    out = {}
    for name, m in methods.items():
        acc, plain = m["accuracy"], methods["plain"]["accuracy"]
        stages = min(len(acc), len(plain)) - 1  # a --stages 1 method is compared with plain's first stage
        plain_new = new_acc(plain, stages)
        drop, rel = acc[0][0] - acc[stages][0], new_acc(acc, stages) / plain_new if plain_new else 0.0
        out[name] = {"stages": stages, "original_drop": drop, "new_vs_plain": rel,
                     "met": drop <= 0.02 + 1e-9 and rel >= 0.9}
    return out


def llm_part(seed: int, out: Path, results: dict, json_file: Path | None, methods: list[str],
             s: LLMSettings) -> dict:
    """The nano sequence for every method; the results dict is written after each stage (partial results kept).
    Every stage is evaluated on all tasks. Stages `results` already holds with the same settings (--resume; a run
    with --stages 1 extends to 2) are not run again: the next stage continues from their run folder."""
    tasks = list(NEW_TASKS)[:s.stages]
    data = {t: write_task_jsonl(out / f"{t}.jsonl", t, s.n_train, seed + i) for i, t in enumerate(NEW_TASKS)}
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("stages", "threads")}
    if results.get("llm", {}).get("settings") != settings:
        results.update(methods={}, llm={})
    results.update(tasks=["original", *NEW_TASKS], llm={**results["llm"], "settings": settings,
                                                        "original_kinds": ORIGINAL_KINDS})
    results["llm"].setdefault("recipes", {})
    t0 = time.perf_counter()
    if "start" not in results["llm"]:
        results["llm"]["start"] = eval_stage(Path(s.nano), list(NEW_TASKS), s.n_eval, seed + 100)
        print(f"stage 0 (nano): {results['llm']['start']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    for method in methods:
        results["llm"]["recipes"][method] = method_section(method)
        done = results["methods"].get(method, {"accuracy": [results["llm"]["start"]], "train_s": [], "seconds": 0})
        for stage, task in enumerate(tasks, start=1):
            run = out / method / f"{stage}-{task}"
            if stage < len(done["accuracy"]) and (run / "final").is_dir():
                print(f"{method} stage {stage}: done earlier (--resume)", flush=True)
                continue
            done = run_stage(method, stage, done, data[task], run, s, seed)
            results["methods"][method] = {**done, **stream_metrics(done["accuracy"])}
            write_json(json_file, results)
    results["target"] = target_check(results)
    return results


def run_stage(method: str, stage: int, done: dict, data: Path, run: Path, s: LLMSettings, seed: int) -> dict:
    """Train stage `stage` of `method` (continuing from stage - 1's run, or nano) and evaluate it; `done` extended."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    t0 = time.perf_counter()
    prev = Path(s.nano) if stage == 1 else run.parent / f"{stage - 1}-{list(NEW_TASKS)[stage - 2]}"
    shutil.rmtree(run, ignore_errors=True)
    summary = train(TrainConfig.from_dict(stage_recipe(method, data, prev, run, s, seed)), progress=False)
    acc = eval_stage(run / "final", list(NEW_TASKS), s.n_eval, seed + 100)
    print(f"{method} stage {stage} ({run.name}): {acc}  train {summary['elapsed_s']:.0f} s", flush=True)
    return {"accuracy": [*done["accuracy"][:stage], acc], "train_s": [*done["train_s"][:stage - 1],
                                                                      summary["elapsed_s"]],
            "seconds": done["seconds"] + time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------- report


def plot(results: dict, png_dir: Path) -> list[Path]:
    """The accuracy matrices (one panel per method) and the original task's accuracy over the stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_dir.mkdir(parents=True, exist_ok=True)
    methods, tasks = results["methods"], results["tasks"]
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, (name, m) in zip(axes.flat, methods.items(), strict=False):
        a = torch.tensor(m["accuracy"])
        ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in zip(((i, j) for i in range(a.shape[0]) for j in range(a.shape[1])), a.flatten(),
                             strict=True):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set(title=name, xticks=range(len(tasks)), xticklabels=tasks, yticks=range(a.shape[0]),
               ylabel="after stage")
    fig.tight_layout()
    matrix = png_dir / "accuracy_matrix.png"
    fig.savefig(matrix, dpi=110)
    fig2, ax = plt.subplots(figsize=(6, 4))
    for name, m in methods.items():
        ax.plot(range(len(m["accuracy"])), [row[0] for row in m["accuracy"]], "o-", label=name)
    ax.set(xlabel="stage (0 = nano, then " + ", ".join(tasks[1:]) + ")", ylabel="original-task accuracy",
           title="forgetting of the original task")
    ax.legend(fontsize=7)
    fig2.tight_layout()
    curves = png_dir / "forgetting.png"
    fig2.savefig(curves, dpi=110)
    return [matrix, curves]


def print_tables(results: dict) -> None:
    if "sanity" in results:
        s = results["sanity"]["runs"]
        print(f"\n{'digits stream':<22}{'naive':>8}{'ewc':>8}{'replay':>8}   Avalanche (MNIST, published)")
        for kind, peer in (("permuted", "EWC 0.83"), ("split", "naive collapses; LwF 0.23, SI 0.97")):
            print(f"{kind:<22}" + "".join(f"{s[f'{kind}/{m}']['average_accuracy']:>8.3f}"
                                          for m in ("naive", "ewc", "replay")) + f"   {peer}")
    if results.get("methods"):
        first = next(iter(results["methods"].values()))["accuracy"][0][0]
        print(f"\n{'method':<24}" + "".join(f"{t:>10}" for t in results["tasks"]) + f"{'avg':>8}{'forget':>8}"
              f"{'BWT':>8}   (after the last stage; the original task started at {first:.3f})")
        target = results.get("target", {})
        for name, m in results["methods"].items():
            last, t = m["accuracy"][-1], target.get(name)
            print(f"{name:<24}" + "".join(f"{v:>10.3f}" for v in last) + f"{m['average_accuracy']:>8.3f}"
                  f"{m['forgetting']:>8.3f}{m['backward_transfer']:>8.3f}" +
                  (f"   original -{100 * t['original_drop']:.1f} pts, new {100 * t['new_vs_plain']:.0f}% of plain"
                   f"{'  TARGET MET' if t['met'] else ''}" if t else ""))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the results here (after every stage)")
    parser.add_argument("--quick", action="store_true", help="reduced version (same schema)")
    parser.add_argument("--part", choices=("all", "digits", "llm"), default="all")
    parser.add_argument("--out", default="runs/bench_continual")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods: plain, or terms " + ", ".join(f"{k}[={v[1]:g}]" for k, v in
                                                                           TERMS.items()) + " joined by '+' "
                        f"(default {','.join(METHODS)}; quick: {','.join(QUICK_METHODS)})")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per stage (default {QUICK.steps} quick, "
                                                                f"{LLMSettings.steps} full)")
    parser.add_argument("--n-eval", type=int, default=None, help=f"held-out problems per kind (default "
                                                                 f"{QUICK.n_eval} / {LLMSettings.n_eval})")
    parser.add_argument("--stages", type=int, choices=(1, 2), default=2, help="new tasks learnt (1: compare only)")
    parser.add_argument("--lr", type=float, default=LLMSettings.learning_rate, help="peak learning rate")
    parser.add_argument("--nano", default=str(NANO), help="the starting model (default: the bundled nano)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the methods --json already holds with the same settings; run the others")
    parser.add_argument("--write-data", default=None, metavar="DIR",
                        help="only write the new tasks' chat JSONL (compare.jsonl, reverse.jsonl) to DIR, for "
                             "configs/continual-nano-*.yaml")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the machine's cores, when alone)")
    return parser.parse_args()


def main() -> None:
    a = parse_args()
    if a.write_data:
        Path(a.write_data).mkdir(parents=True, exist_ok=True)
        for i, task in enumerate(NEW_TASKS):
            print(write_task_jsonl(Path(a.write_data) / f"{task}.jsonl", task, 1000, a.seed + i))
        return
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    json_file = Path(a.json) if a.json else None
    results: dict = {"quick": a.quick, "tasks": [], "methods": {}}
    if a.resume and json_file and json_file.is_file():
        results = {**json.loads(json_file.read_text()), "quick": a.quick}
    base = QUICK if a.quick else LLMSettings()
    settings = dataclasses.replace(base, steps=a.steps or base.steps, n_eval=a.n_eval or base.n_eval,
                                   stages=a.stages, learning_rate=a.lr, threads=a.threads, nano=a.nano)
    methods = a.methods.split(",") if a.methods else QUICK_METHODS if a.quick else METHODS
    for m in methods:
        method_section(m)  # a misspelt method fails now, not after an hour
    t0 = time.perf_counter()
    if a.part in ("all", "digits") and "sanity" not in results:
        results["sanity"] = digits_part(a.quick, a.seed)
        write_json(json_file, results)
    if a.part in ("all", "llm"):
        llm_part(a.seed, out, results, json_file, methods, settings)
        results["plots"] = [str(p) for p in plot(results, DOCS if not a.quick else out)]
    results["total_s"] = time.perf_counter() - t0
    print_tables(results)
    write_json(json_file, results)


if __name__ == "__main__":
    main()
