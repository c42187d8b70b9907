"""Distributed training on this machine's CPUs: 1 process x 2 threads against 2 processes x 1 thread (torchrun,
gloo), for DDP and FSDP2, and the communication time of one step for DDP, FSDP and expert parallelism.

    python benchmarks/bench_distributed.py --json runs/bench_distributed.json [--steps 8]

- Throughput: the same recipe (tiny-moe, 2 layers, fp32, global batch 8 x 64 tokens) trained --steps steps by
  `r1kit.train.loop.train`: tokens/s of the whole job from its summary (time in steps only), the CPU seconds
  per token of all processes' threads during the steps, and each process's peak RSS; 1 process x 1 thread is
  run too, as the reference.
- Communication, measured on 2 ranks with the sizes of that model: DDP's all-reduce of the fp32 gradients, FSDP's
  all-gathers (forward and backward) and reduce-scatter of the parameters, and expert parallelism's four
  all_to_all_single of the routed token copies (dispatch and combine, forward and backward) per MoE layer; the
  median over 20 repetitions.
The machine's load average is recorded: on a shared machine the wall-clock figures are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def recipe(out: Path, mode: str, steps: int, threads: int) -> dict:
    return {"model": {"preset": "tiny-moe", "overrides": {"num_layers": 2, "max_position_embeddings": 128}},
            "data": {"mixture": {"arithmetic": 1.0}, "arithmetic_kinds": {"add2": 1.0, "sub2": 1.0},
                     "arithmetic_examples": 400, "max_files": 2, "max_chars": 20000, "tokenizer_vocab": 300,
                     "tokenizer_chars": 20000},
            "seq_len": 64, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 1, "max_steps": 1000,
            "precision": "fp32", "eval_interval": 1000, "eval_batches": 1, "checkpoint_interval": 1000,
            "log_interval": 1, "threads": threads, "out_dir": str(out), "distributed": {"mode": mode}}


def train_once(out: Path, mode: str, steps: int, threads: int) -> dict:
    """Train in this process; the summary with this process's peak RSS and the CPU seconds (all its threads) spent
    in the training steps, which the machine's load inflates much less than the wall clock."""
    from r1kit.train import loop
    from r1kit.train.config import TrainConfig

    step, cpu = loop.run_step, [0.0]

    def timed_step(*args, **kwargs):
        t = time.process_time()
        result = step(*args, **kwargs)
        cpu[0] += time.process_time() - t
        return result

    loop.run_step = timed_step
    try:
        summary = loop.train(TrainConfig.from_dict(recipe(out, mode, steps, threads)), progress=False,
                             stop_after=steps)
    finally:
        loop.run_step = step
    return {**summary, "step_cpu_s": cpu[0], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def median_time(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def comm_times() -> dict:
    """Seconds per step spent in each strategy's collectives, with this model's sizes (2 ranks)."""
    import torch.distributed as dist

    from r1kit.model.config import preset
    from r1kit.train.plan import Counts

    cfg = preset("tiny-moe", num_layers=2, vocab_size=300)
    c = Counts.of(cfg)
    world, p = dist.get_world_size(), c.params
    grads = torch.randn(p)
    shard = torch.randn(-(-p // world))
    full = torch.empty(shard.numel() * world)
    tokens = 8 * 64 // world  # this rank's tokens of the global batch
    routed = torch.randn(tokens * c.top_k, c.hidden)
    out = torch.empty_like(routed)

    def reduce_scatter() -> None:  # gloo has no reduce_scatter_tensor: all-reduce, keep this rank's part
        dist.all_reduce(full)

    ddp = median_time(lambda: dist.all_reduce(grads))
    gather = median_time(lambda: dist.all_gather_into_tensor(full, shard))
    scatter = median_time(reduce_scatter)
    a2a = median_time(lambda: dist.all_to_all_single(out, routed))
    return {"params": p, "ddp_all_reduce_s": ddp, "fsdp_s": 2 * gather + scatter,
            "fsdp_all_gather_s": gather, "fsdp_reduce_scatter_as_all_reduce_s": scatter,
            "ep_all_to_all_s": 4 * c.moe_layers * a2a, "ep_routed_rows": routed.shape[0]}


def worker(root: Path, steps: int) -> None:
    """Under torchrun: DDP and FSDP runs, then the communication timings; rank results to root/rank<R>.json."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    result = {"rank": rank}
    for mode in ("ddp", "fsdp"):
        result[mode] = train_once(root / f"{mode}", mode, steps, threads=1)
    result["comm"] = comm_times()
    (root / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker), a.steps)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    load_before = os.getloadavg()
    singles = {}
    for threads in (2, 1):  # one process: the comparison (2 threads) and the 1-thread reference
        proc = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, 'benchmarks'); "
                               "from bench_distributed import train_once; from pathlib import Path; print(json.dumps("
                               f"train_once(Path({str(root / f'single{threads}')!r}), 'none', {a.steps}, {threads})))"],
                              capture_output=True, text=True, cwd=ROOT, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        singles[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("ddp", "fsdp"):  # the tokenizer once, not trained by two ranks at a time
        shutil.copytree(root / "single2" / "tokenizer", root / mode / "tokenizer")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(Path(__file__).resolve()), "--worker", str(root), "--steps", str(a.steps)],
                   cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    result = {"steps": a.steps, "global_batch_tokens": 8 * 64, "cpus": os.cpu_count(),
              "load_average": [load_before, os.getloadavg()],
              **{f"one_process_{t}_thread{'s' if t > 1 else ''}": {
                  "tok_s": one["tok_s"], "peak_rss_mib": one["peak_rss_mib"],
                  "cpu_ms_per_token": 1e3 * one["step_cpu_s"] / one["tokens"]} for t, one in singles.items()},
              **{f"two_processes_1_thread_{m}": {"tok_s": ranks[0][m]["tok_s"],
                                                "peak_rss_mib": [r[m]["peak_rss_mib"] for r in ranks],
                                                "cpu_ms_per_token": 1e3 * sum(r[m]["step_cpu_s"] for r in ranks)
                                                / ranks[0][m]["tokens"]}
                 for m in ("ddp", "fsdp")},
              "comm_s_per_step": ranks[0]["comm"]}
    print(f"load average {result['load_average'][0][0]:.1f} on {os.cpu_count()} CPUs"
          + (" (shared machine: wall-clock figures are upper bounds)" if load_before[0] > 1.5 else ""))
    print("| run | tokens/s (whole job, wall) | CPU ms per token (all processes) | peak RSS per process (MiB) |")
    print("|---|---|---|---|")
    for t, name in ((2, "one_process_2_threads"), (1, "one_process_1_thread")):
        r = result[name]
        print(f"| 1 process x {t} thread{'s' if t > 1 else ''} | {r['tok_s']:.0f} | {r['cpu_ms_per_token']:.2f} | "
              f"{r['peak_rss_mib']:.0f} |")
    for m in ("ddp", "fsdp"):
        r = result[f"two_processes_1_thread_{m}"]
        print(f"| 2 processes x 1 thread, {m} | {r['tok_s']:.0f} | {r['cpu_ms_per_token']:.2f} | "
              f"{' / '.join(f'{x:.0f}' for x in r['peak_rss_mib'])} |")
    c = result["comm_s_per_step"]
    print(f"communication per step (2 ranks, gloo, {c['params']:,} parameters): DDP all-reduce "
          f"{c['ddp_all_reduce_s'] * 1e3:.2f} ms, FSDP all-gather x2 + reduce-scatter {c['fsdp_s'] * 1e3:.2f} ms, "
          f"expert-parallel all_to_all x4 x MoE layers {c['ep_all_to_all_s'] * 1e3:.2f} ms")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    main()
