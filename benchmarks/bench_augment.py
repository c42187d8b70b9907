"""What EDA augmentation buys: fine-tune the bundled nano on arithmetic questions in ONE phrasing, with and without
augmentation, at equal steps, and measure greedy accuracy on held-out problems asked in that phrasing and in
paraphrases it never saw (WordNet-style synonyms, and other wordings).

    nice -n 10 python benchmarks/bench_augment.py [--json runs/bench_augment.json] [--steps 60] [--n-eval 40]

Both runs are full SFT through r1kit's training loop (`data.chat_jsonl`, the same seed, steps and learning rate);
the augmented one adds `augment: {ops: {synonym, insert, swap, delete: 0.1}}` (Wei & Zou's alpha and n_aug). The
untuned nano is measured too. Questions come from the held-out problems (never in training); the answer counts
when the integer after </think> is right. The peer is "no augmentation": the same loop on the same data.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from r1kit.api import R1Model
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.train.config import TrainConfig
from r1kit.train.data import parse_answer, reasoning, sample_problem
from r1kit.train.loop import train

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"
TRAIN_PHRASING = "Find the sum of {a} and {b}."
# Held-out paraphrases: the first ones swap in WordNet synonyms of the training words (what EDA can produce),
# the others are wordings EDA cannot reach.
PHRASINGS = {
    "train phrasing": TRAIN_PHRASING,
    "syn: total": "Find the total of {a} and {b}.",
    "syn: determine": "Determine the sum of {a} and {b}.",
    "syn: calculate": "Calculate the sum of {a} and {b}.",
    "other: how much": "How much is {a} plus {b}?",
    "other: add": "Add {a} and {b}.",
    "other: what do you get": "What do you get if you add {a} to {b}?",
}


def write_training_data(path: Path, n: int, seed: int) -> None:
    """n training problems (add2, never held out) asked in TRAIN_PHRASING, answered R1-style."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = sample_problem(rng, "add2", split="train")
        rows.append({"messages": [{"role": "user", "content": TRAIN_PHRASING.format(a=p.a, b=p.b)},
                                  {"role": "assistant", "reasoning_content": reasoning(p), "content": str(p.answer)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def finetune(data: Path, out: Path, steps: int, augment: bool, seed: int, threads: int = 1) -> dict:
    """Full SFT of nano on `data` through the training loop; returns the loop's summary."""
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"model": {"preset": "nano"}, "init_from": str(NANO), "out_dir": str(out),
              "data": {"chat_jsonl": str(data), "validation_fraction": 0.1},
              "seq_len": 192, "batch_size": 8, "max_steps": steps, "warmup_steps": 5, "learning_rate": 1e-3,
              "min_lr_ratio": 0.1, "eval_interval": steps, "eval_batches": 2, "checkpoint_interval": steps,
              "log_interval": 10, "precision": "fp32", "threads": threads, "seed": seed}
    if augment:
        recipe["augment"] = {"ops": {"synonym": 0.1, "insert": 0.1, "swap": 0.1, "delete": 0.1}, "seed": seed}
    return train(TrainConfig.from_dict(recipe), progress=False)


def accuracy(model: R1Model, n: int, seed: int, max_new_tokens: int = 96,
             phrasings: dict[str, str] | None = None) -> dict[str, float]:
    """Greedy accuracy per phrasing (default: all of PHRASINGS) on the same n held-out add2 problems."""
    rng = random.Random(seed)
    problems = [sample_problem(rng, "add2", split="val") for _ in range(n)]
    tok, stop = model._tok(chat=True), model.stop_ids()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    result = {}
    for name, phrasing in (PHRASINGS if phrasings is None else phrasings).items():
        prompts = [tok.encode_chat([{"role": "user", "content": phrasing.format(a=p.a, b=p.b)}]) for p in problems]
        outs: list[list[int]] = [[] for _ in problems]
        for step in generate_tokens(model.model, prompts, params, stop):
            for row, t in enumerate(step):
                if t is not None and t not in stop:
                    outs[row].append(t)
        right = sum(parse_answer(tok.decode(ids, skip_special_tokens=True)) == p.answer
                    for p, ids in zip(problems, outs, strict=True))
        result[name] = right / n
        print(f"  {name}: {right}/{n}", flush=True)
    return result


def summarize(acc: dict[str, float]) -> dict[str, float]:
    """Mean accuracy over the synonym paraphrases and over the other wordings."""
    syn = [v for k, v in acc.items() if k.startswith("syn:")]
    other = [v for k, v in acc.items() if k.startswith("other:")]
    return {"synonym paraphrases": sum(syn) / len(syn), "other wordings": sum(other) / len(other)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_augment")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    write_training_data(data, a.n_train, a.seed)
    results: dict = {"threads": a.threads, "steps": a.steps, "n_train": a.n_train, "n_eval_per_phrasing": a.n_eval,
                     "train_phrasing": TRAIN_PHRASING, "phrasings": PHRASINGS, "runs": {}}
    t0, cpu0 = time.perf_counter(), time.process_time()
    print("nano, not fine-tuned:", flush=True)
    results["runs"]["nano (not fine-tuned)"] = {"accuracy": accuracy(R1Model.from_pretrained(NANO, device="cpu"),
                                                                     a.n_eval, a.seed + 1)}
    for name, augment in (("SFT, no augmentation", False), ("SFT + EDA", True)):
        start = time.perf_counter()
        print(f"{name}: {a.steps} steps, then", flush=True)
        summary = finetune(data, out / ("eda" if augment else "plain"), a.steps, augment, a.seed, a.threads)
        model = R1Model.from_pretrained(out / ("eda" if augment else "plain") / "final", device="cpu")
        results["runs"][name] = {"accuracy": accuracy(model, a.n_eval, a.seed + 1), "train_s": summary["elapsed_s"],
                                 "run_s": time.perf_counter() - start, "tokens": summary["tokens"]}
    results["total_s"], results["cpu_s"] = time.perf_counter() - t0, time.process_time() - cpu0
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict) -> None:
    names = list(results["runs"])
    print(f"{'phrasing':<28}" + "".join(f"{n:>24}" for n in names))
    for phrasing in PHRASINGS:
        print(f"{phrasing:<28}" + "".join(f"{results['runs'][n]['accuracy'][phrasing]:>24.1%}" for n in names))
    for group in ("synonym paraphrases", "other wordings"):
        print(f"{'mean ' + group:<28}" + "".join(f"{summarize(results['runs'][n]['accuracy'])[group]:>24.1%}"
                                                 for n in names))
    print(f"({results['n_eval_per_phrasing']} held-out problems per phrasing, {results['steps']} steps each, "
          f"{results['total_s']:.0f} s in all, {results['cpu_s']:.0f} s of CPU)")


if __name__ == "__main__":
    main()
