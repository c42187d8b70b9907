"""LoRA vs full fine-tuning of the bundled model on the same task and steps, and QLoRA's memory against LoRA's.

    nice -n 10 python benchmarks/bench_finetune.py [--json runs/bench_finetune.json] [--steps 60] [--n 40]
    python benchmarks/bench_finetune.py --memory-only --device cuda --preset r1-distill-qwen-1.5b   # on a GPU
    python benchmarks/bench_finetune.py --memory-only --preset r1-distill-qwen-1.5b \
        --override num_layers=8,vocab_size=8192                                  # CPU: a model big enough to see

Task: teach r1kit/nano a question wording it has never seen. Both methods fine-tune it on the same chat JSONL of
200 training 2-digit additions asked as "Find the sum of A and B." (bench_augment.py's data; untuned nano answers
none of them) for the same steps, batch, sequence length and schedule, through the same loop (`r1kit finetune`
with configs/lora-nano.yaml for LoRA, `r1kit train` with data.chat_jsonl and init_from for full fine-tuning;
MTP loss off and no weight decay in both). Each run is its own process: trainable parameters, peak RSS of the
training (ru_maxrss, before the evaluation), seconds per step, then greedy accuracy on n held-out problems: in
the trained wording (the task), in a wording neither saw ("How much is A plus B?"), and on nano's own questions
("What is A+B?", add2 and sub3: what fine-tuning made it forget).

Memory (QLoRA): the frozen base held bf16 (LoRA), int8, int4 or NF4 (QLoRA), adapters fp32, a few training
steps: bytes of the model's tensors, and the peak memory (CPU: RSS of the process, which torch's own footprint
dominates for a model as small as nano; CUDA: torch.cuda.max_memory_allocated, the figure that matters).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "r1kit/nano"
LORA_RECIPE = ROOT / "configs" / "lora-nano.yaml"
# bench_augment.py's fine-tuning shape: 8 packed rows of 192 tokens, cosine to 10%, 5 warmup steps
COMMON = dict(batch_size=8, gradient_accumulation=1, seq_len=192, warmup_steps=5, seed=0)
LEARNING_RATES = {"lora": 5e-3, "full": 1e-3}  # full: bench_augment's; LoRA: its usual few times higher
# the held-out wordings measured (bench_augment.PHRASINGS' names)
WORDINGS = ("train phrasing", "other: how much")


def write_task(path: Path, n: int = 200) -> Path:
    """The task's chat JSONL: n training add2 problems in bench_augment's training wording."""
    from bench_augment import write_training_data

    write_training_data(path, n, seed=0)
    return path


def run_child(args: list[str]) -> dict:
    """Run this script as a child with `args`; its JSON result plus its own peak RSS (MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"child {args} failed ({status}); output: {out[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_peak_rss_MiB"] = round(usage.ru_maxrss / 1024, 1)
    return result


class RssPeak:
    """The highest resident set size (MiB) of this process while the block runs, sampled every 2 ms from
    /proc/self/statm (ru_maxrss cannot be reset: it would include building the model before quantizing it)."""

    def __enter__(self) -> RssPeak:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page / 2**20)
            self._stop.wait(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _tensor_bytes(model) -> int:
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def train_run(method: str, data: str, out: str, steps: int, device: str, lr: float) -> dict:
    """Fine-tune nano by `method` ("lora" | "full") for `steps`; what the training measured."""
    import torch

    from r1kit.train.config import TrainConfig
    from r1kit.train.finetune import finetune
    from r1kit.train.loop import train

    precision = "bf16" if device.startswith("cuda") else "fp32"  # fp32: CPUs without native bf16 are ~3x slower
    flags = dict(COMMON, max_steps=steps, learning_rate=lr, precision=precision, validation_fraction=0.1)
    t0 = time.perf_counter()
    if method == "lora":
        summary = finetune(BASE, data, out, str(LORA_RECIPE), progress=False, device=device, **flags)
    else:
        flags.pop("validation_fraction")
        cfg = TrainConfig.from_dict(dict(flags, init_from=BASE, out_dir=out, model={"preset": "nano"},
                                         eval_interval=steps, checkpoint_interval=steps, min_lr_ratio=0.1,
                                         weight_decay=0.0, mtp_loss_weight=0.0,
                                         data={"chat_jsonl": data, "validation_fraction": 0.1}))
        summary = train(cfg, progress=False, device=device)
    result = dict(learning_rate=lr, train_s=round(time.perf_counter() - t0, 1),
                  s_per_step=round(summary["elapsed_s"] / steps, 3),
                  train_peak_rss_MiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if device.startswith("cuda"):
        result["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    metrics = [json.loads(x) for x in open(Path(out) / "metrics.jsonl")]
    result["final_train_loss"] = next(m["loss"] for m in reversed(metrics) if "loss" in m)
    result["final_val_loss"] = next(m["val_loss"] for m in reversed(metrics) if "val_loss" in m)
    return result


def held_out_accuracy(model, n: int) -> dict[str, float]:
    """Greedy accuracy on n held-out problems: the task's wordings, then nano's own add2 / sub3 questions."""
    from bench_augment import PHRASINGS
    from bench_augment import accuracy as wording_accuracy

    from r1kit.eval import eval_arithmetic

    acc = wording_accuracy(model, n, seed=1, phrasings={k: PHRASINGS[k] for k in WORDINGS})
    own = eval_arithmetic(model, ["add2", "sub3"], n=n, progress=False)["accuracy"]
    return {**acc, **{f"nano's {k}": v for k, v in own.items()}}


def child_train(method: str, data: str, out: str, steps: int, n: int, device: str, lr: float,
                threads: int) -> dict:
    """Fine-tune nano by `method` ("lora" | "full" | "base" = no training), then evaluate held-out accuracy."""
    import torch

    from r1kit.api import R1Model
    from r1kit.lora import lora_param_count

    torch.set_num_threads(threads)
    result: dict = {"method": method, "threads": threads}
    if method != "base":
        result.update(train_run(method, data, out, steps, device, lr))
    dtype = "bf16" if device.startswith("cuda") else "fp32"  # CUDA's grouped matmul (the MoE experts) is bf16-only
    path, adapter = (Path(out) / "final", None) if method == "full" else (BASE, out if method == "lora" else None)
    model = R1Model.from_pretrained(path, device=device, dtype=dtype, adapter=adapter)
    trainable = lora_param_count(model.model) if method == "lora" else model.model.num_params()
    result.update(trainable_params=trainable,
                  total_params=model.model.num_params() - (trainable if method == "lora" else 0))
    result["accuracy"] = held_out_accuracy(model, n) if n else None
    return result


def child_memory(method: str, device: str, preset_name: str | None, steps: int, overrides: str = "") -> dict:
    """A few LoRA steps on a base held in full precision ("lora": bf16 on CUDA, fp32 on CPU, whose bf16 matmuls
    are emulated and ~20x slower here) or quantized ("qlora-int8|int4|nf4"); memory figures."""
    import torch

    from r1kit.checkpoint import load_model
    from r1kit.lora import LoRAConfig, inject_lora, mark_only_lora_trainable, quantize_base
    from r1kit.model.config import preset
    from r1kit.model.transformer import Transformer

    torch.set_num_threads(2)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if preset_name:  # random weights, drawn on the device (values do not matter for memory)
        fields = {k: int(v) for k, v in (kv.split("=") for kv in overrides.split(",") if kv)}
        with torch.device(dev):
            model = Transformer(preset(preset_name, **fields)).to(dtype)
        with torch.no_grad():
            for t in model.parameters():
                t.normal_(0, 0.02)
    else:
        model = load_model(ROOT / BASE, dev, dtype)
    if method != "lora":
        quantize_base(model, method.removeprefix("qlora-"))
    inject_lora(model, LoRAConfig(r=8))
    params = mark_only_lora_trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    base_bytes = _tensor_bytes(model) - sum(p.numel() * p.element_size() for p in params)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vocab, shape = model.config.vocab_size, (4, 257) if dev.type == "cuda" else (1, 65)
    t0 = None
    with RssPeak() as rss:
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            ids = torch.randint(0, vocab, shape, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    result = {"method": method, "model": preset_name or BASE, "device": device, "tokens_per_step": shape[0] * shape[1],
              "overrides": overrides,
              "base_MiB": round(base_bytes / 2**20, 1), "adapter_params": sum(p.numel() for p in params),
              "s_per_step": round((time.perf_counter() - t0) / steps, 3)}
    if dev.type == "cuda":
        result["cuda_peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["train_peak_rss_MiB"] = round(rss.peak, 1)  # during the training steps only
    return result


def print_tables(train_runs: list[dict], memory_runs: list[dict]) -> None:
    if train_runs:
        print("\nmethod  lr       trainable params  fraction  peak RSS MiB  s/step  val loss  held-out accuracy")
        for r in train_runs:
            frac = r["trainable_params"] / r["total_params"]
            acc = r["accuracy"]
            shown = "  ".join(f"{k} {v:.1%}" for k, v in acc.items()) if acc else "(not evaluated)"
            print(f"{r['method']:<6}  {r.get('learning_rate', '-'):<7}  {r['trainable_params']:>16,}  {frac:>8.2%}"
                  f"  {r.get('train_peak_rss_MiB', '-'):>12}  {r.get('s_per_step', '-'):>6}"
                  f"  {r.get('final_val_loss', float('nan')):>8.4f}  {shown}")
    if memory_runs:
        print("\nbase held   model            base MiB  adapter params  peak MiB (what)             s/step")
        for r in memory_runs:
            peak = (f"{r['cuda_peak_MiB']} (cuda allocated)" if "cuda_peak_MiB" in r
                    else f"{r['train_peak_rss_MiB']} (RSS during steps)")
            print(f"{r['method']:<10}  {r['model']:<15}  {r['base_MiB']:>8}  {r['adapter_params']:>14,}  {peak:<24}"
                  f"  {r['s_per_step']}")


def run_training(a: argparse.Namespace, work: Path, json_file: Path | None) -> list[dict]:
    """Each of --methods ("base", "lora", "full", or "lora:LR" / "full:LR") in its own process, one after the
    other; the JSON file is rewritten after each, so a long run's finished rows survive."""
    import shutil

    data = write_task(work / "task.jsonl")
    runs: list[dict] = []
    for spec in a.methods.split(","):
        method, _, lr = spec.partition(":")
        if method not in ("base", "lora", "full"):
            raise SystemExit(f"--methods: {spec!r}: use base, lora, full, lora:LR or full:LR")
        lr = float(lr) if lr else LEARNING_RATES.get(method, 0.0)
        out = work / (spec.replace(":", "-lr"))
        shutil.rmtree(out, ignore_errors=True)
        runs.append(run_child(["--child", "train", method, str(data), str(out), str(a.steps), str(a.n), a.device,
                               str(lr), str(a.threads)]))
        print(json.dumps(runs[-1]), flush=True)
        if json_file:
            json_file.write_text(json.dumps({"train": runs, "common": COMMON, "steps": a.steps, "n": a.n}, indent=2))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n", type=int, default=40, help="held-out problems per wording and kind (0: no evaluation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training runs")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="only the LoRA vs full fine-tuning runs")
    p.add_argument("--methods", default="base,lora,full",
                   help="which of base, lora, full to run; lora:LR / full:LR set the learning rate")
    p.add_argument("--device", default="cpu", help="cpu or cuda: training, evaluation and memory runs")
    p.add_argument("--preset", default=None, help="memory runs on a random model of this preset (default: nano)")
    p.add_argument("--override", default="", help="with --preset: ModelConfig fields, e.g. num_layers=8")
    p.add_argument("--work", default="runs/bench_finetune")
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        result = (child_train(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), rest[5], float(rest[6]),
                              int(rest[7]))
                  if kind == "train"
                  else child_memory(rest[0], rest[1], rest[2] or None, int(rest[3]), rest[4]))
        print(json.dumps(result))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    json_file = Path(a.json) if a.json else None
    train_runs = [] if a.memory_only else run_training(a, work, json_file)
    memory_runs = []
    for method in () if a.no_memory else ("lora", "qlora-int8", "qlora-int4", "qlora-nf4"):
        memory_runs.append(run_child(["--child", "memory", method, a.device, a.preset or "", "3", a.override]))
        print(json.dumps(memory_runs[-1]), flush=True)
    print_tables(train_runs, memory_runs)
    if json_file:
        json_file.write_text(json.dumps({"train": train_runs, "memory": memory_runs, "common": COMMON,
                                         "learning_rates": LEARNING_RATES, "steps": a.steps, "n": a.n}, indent=2))


if __name__ == "__main__":
    main()
