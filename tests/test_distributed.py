"""Distributed training (r1kit.train.distributed) on 2 CPU processes with gloo, under a real torchrun.

One torchrun launch runs every 2-rank check (this file is also its worker script, see `worker`): gradients of DDP
and FSDP2 against one process, loss curves of the training loop, resuming a 1-process checkpoint on 2 ranks,
expert-parallel MoE forward/backward, and last a rank that kills itself. The single-process references and the
2 -> 1 resume run in the pytest process. Tiny fp32 models, 4 steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1kit.train.config import TrainConfig

WORLD = 2
STEPS = 4
MODELS = {"dense": {"preset": "tiny-dense", "overrides": {"num_layers": 2, "max_position_embeddings": 64}},
          "moe": {"preset": "tiny-moe", "overrides": {"num_layers": 2, "max_position_embeddings": 64}}}


def recipe(out: Path, model: str = "dense", mode: str = "none", expert_parallel: bool = False) -> TrainConfig:
    """A tiny fp32 recipe; max_steps is far away so that runs stop by stop_after (no finalize, no plots)."""
    return TrainConfig.from_dict({
        "model": MODELS[model],
        "data": {"mixture": {"arithmetic": 1.0}, "arithmetic_kinds": {"add2": 1.0}, "arithmetic_examples": 200,
                 "max_files": 2, "max_chars": 20000, "tokenizer_vocab": 300, "tokenizer_chars": 20000},
        "seq_len": 32, "batch_size": 4, "gradient_accumulation": 2, "learning_rate": 3e-3, "warmup_steps": 1,
        "max_steps": 100, "precision": "fp32", "eval_interval": 100, "eval_batches": 1, "checkpoint_interval": 2,
        "log_interval": 1, "threads": 1, "moe_balance_rate": 0.01, "out_dir": str(out),
        "distributed": {"mode": mode, "timeout_s": 30.0, "expert_parallel": expert_parallel}})


def run(root: Path, name: str, model: str = "dense", mode: str = "none", steps: int = STEPS,
        resume: bool = False, expert_parallel: bool = False) -> list[dict]:
    """Train `steps` steps in root/name (the shared tokenizer copied in first); its metrics.jsonl step records."""
    from r1kit.train.loop import train

    out = root / name
    if not (out / "tokenizer").exists() and (root / "tokenizer").exists():
        shutil.copytree(root / "tokenizer", out / "tokenizer")
    train(recipe(out, model, mode, expert_parallel), resume=resume, progress=False, stop_after=steps)
    return curve(out)


def curve(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


# ---------------------------------------------------------------------------------------------------- the worker


def grads_check(model_name: str, mode: str, par) -> float:
    """Largest gradient difference (relative to the largest reference gradient) between one backward of the
    2-rank model (DDP or FSDP2, this rank's rows, the loop's loss weights) and one process on the whole batch."""
    from torch.distributed.tensor import DTensor

    from r1kit.train.loop import build_model, step_losses

    cfg = recipe(Path("unused"), model_name, mode)
    ref, model = (build_model(cfg, 300, 0, 1, torch.device("cpu")) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (4, 32), generator=g)
    y = torch.randint(0, 300, (4, 32), generator=g)
    mask = (torch.rand(4, 32, generator=g) < torch.tensor([[0.9], [0.2], [0.6], [0.4]])).float()  # uneven counts
    loss, mtp = step_losses(ref, x, y, mask)
    (loss if mtp is None else loss + 0.3 * mtp).backward()
    net = par.wrap(model, cfg)
    rows = slice(par.rank * 2, par.rank * 2 + 2)
    w, w_mtp = par.loss_weights(mask[rows])
    loss, mtp = step_losses(net, x[rows], y[rows], mask[rows])
    (loss * w if mtp is None else loss * w + 0.3 * mtp * w_mtp).backward()
    worst = 0.0
    for (_name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        worst = max(worst, float((grad - q.grad).abs().max() / q.grad.abs().max().clamp(min=1e-12)))
    return worst


def expert_parallel_check(par) -> dict[str, float]:
    """ExpertParallelExperts on 2 ranks (each its half of the experts and its own tokens) against Experts on one
    process on all tokens: outputs, input gradients, and each rank's expert-weight gradients."""
    from r1kit.model.config import preset
    from r1kit.model.moe import ExpertParallelExperts, MoE

    torch.manual_seed(0)
    moe = MoE(preset("tiny-moe"))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2 * WORLD, 16, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = moe(x)
    (y * torch.linspace(-1, 1, 64)).sum().backward()
    ep = MoE(preset("tiny-moe"))
    ep.load_state_dict(moe.state_dict())
    ep.experts = ExpertParallelExperts(ep.experts, par.rank, par.world)
    mine = x.detach()[par.rank * 2:par.rank * 2 + 2].clone().requires_grad_(True)
    y_ep = ep(mine)
    (y_ep * torch.linspace(-1, 1, 64)).sum().backward()  # this rank's part of the same objective
    own = slice(par.rank * 4, par.rank * 4 + 4)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    return {"out": rel(y_ep, y[par.rank * 2:par.rank * 2 + 2]),
            "grad_x": rel(mine.grad, x.grad[par.rank * 2:par.rank * 2 + 2]),
            "grad_gate_up": rel(ep.experts.gate_up_proj.grad, moe.experts.gate_up_proj.grad[own]),
            "grad_down": rel(ep.experts.down_proj.grad, moe.experts.down_proj.grad[own])}


def worker(root: Path) -> None:
    """The 2-rank side of the tests (run by torchrun): writes results_rank<R>.json, then rank 1 kills itself
    during a DDP run."""
    import torch.distributed as dist

    from r1kit.train import loop
    from r1kit.train.distributed import Parallel, job, setup_parallel

    torch.set_num_threads(1)
    par = setup_parallel(recipe(root / "unused", mode="ddp"), torch.device("cpu"))
    results: dict = {"grads": {}}
    for model_name in ("dense", "moe"):
        for mode in ("ddp", "fsdp"):
            results["grads"][f"{mode}_{model_name}"] = grads_check(model_name, mode, Parallel(mode, par.rank, WORLD))
            run(root, f"{mode}_{model_name}", model_name, mode)
    results["expert_parallel"] = expert_parallel_check(par)
    run(root, "ep_moe", "moe", "ddp", expert_parallel=True)
    run(root, "one_then_two", "dense", "fsdp", steps=STEPS // 2, resume=True)  # saved on 1 rank by pytest
    (root / f"results_rank{par.rank}.json").write_text(json.dumps(results))
    dist.barrier()
    step = loop.run_step

    def dying_step(*args, **kwargs):  # rank 1 dies (SIGKILL) before its second step
        if par.rank == 1 and dying_step.calls == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dying_step.calls += 1
        return step(*args, **kwargs)

    dying_step.calls = 0
    loop.run_step = dying_step
    with job():  # what `r1kit train` runs in: logs the failing rank, closes the process group
        run(root, "kill", "dense", "ddp")


# ---------------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Single-process references, one torchrun launch of `worker`, and the 2 -> 1 resume."""
    root = tmp_path_factory.mktemp("distributed")
    torch.set_num_threads(1)
    refs = {m: run(root, f"single_{m}", m) for m in ("dense", "moe")}
    shutil.copytree(root / "single_dense" / "tokenizer", root / "tokenizer")
    run(root, "one_then_two", "dense", "fsdp", steps=STEPS // 2)  # saved on 1 process, resumed on 2 below
    for name in ("ddp_dense", "fsdp_dense", "ddp_moe", "fsdp_moe", "ep_moe", "kill"):  # not copied by 2 ranks at once
        shutil.copytree(root / "tokenizer", root / name / "tokenizer")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           __file__, str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    results = [json.loads((root / f"results_rank{r}.json").read_text()) for r in range(WORLD)
               if (root / f"results_rank{r}.json").exists()]
    assert len(results) == WORLD, f"the workers did not finish their checks:\n{out[-4000:]}"
    # 2 -> 1: the 2-rank FSDP run's step-2 checkpoint resumed on one process
    two = root / "two_then_one"
    (two / "checkpoints").mkdir(parents=True)
    step2 = "checkpoints/step_00000002.dcp"
    shutil.copytree(root / "fsdp_dense" / step2, two / step2)
    (two / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve(root / "fsdp_dense")[:2]))
    run(root, "two_then_one", "dense", "fsdp", steps=STEPS // 2, resume=True)
    return {"root": root, "refs": refs, "results": results, "rc": proc.returncode, "out": out}


def assert_same_curve(got: list[dict], want: list[dict], rtol: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rtol), (a["step"], a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("name", ["ddp_dense", "fsdp_dense", "ddp_moe", "fsdp_moe", "ep_moe"])
def test_two_ranks_train_the_single_process_curve(job, name):
    mode, model = name.split("_")
    got = curve(job["root"] / name)
    assert len(got) == STEPS
    assert_same_curve(got, job["refs"][model], rtol=1e-4)  # fp32; the target is 0.5 %
    if model == "moe":  # globally reduced expert loads: the same balancing as one process
        assert [r["load"] for r in got] == [r["load"] for r in job["refs"][model]]


def test_gradients_equal_one_process(job):
    """Each rank's gradient after one 2-rank backward equals one process's; a sum instead of an average (gloo)
    would be off by 100 %."""
    for results in job["results"]:
        for name, err in results["grads"].items():
            assert err < 1e-5, (name, err)


def test_expert_parallel_forward_backward_equal_one_process(job):
    for results in job["results"]:
        for name, err in results["expert_parallel"].items():
            assert err < 1e-5, (name, err)


def test_checkpoint_saved_on_one_resumes_on_two_and_back(job):
    root, ref = job["root"], job["refs"]["dense"]
    for name in ("one_then_two", "two_then_one"):
        assert (root / name / "checkpoints" / "step_00000004.dcp" / "trainer.pt").is_file()
        assert_same_curve(curve(root / name), ref, rtol=1e-4)


def test_exported_checkpoint_loads_as_a_model(job, tmp_path):
    from r1kit.checkpoint import load_model
    from r1kit.train.distributed import export_checkpoint

    export_checkpoint(job["root"] / "fsdp_dense" / "checkpoints" / "step_00000004.dcp", tmp_path / "m",
                      dtype=torch.float32)
    model = load_model(tmp_path / "m", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 300, (1, 8))
    assert torch.isfinite(model(ids)).all() and model.config.num_layers == 2


def test_a_killed_rank_ends_the_job_naming_it(job):
    assert job["rc"] != 0
    out = job["out"]
    assert re.search(r"rank 0 of 2 stopped: DistributedError: rank 0 of 2: the all-reduce of .* failed", out)
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", out, re.S), out[-3000:]


def test_indivisible_global_batch_is_an_error(tmp_path):
    from r1kit.train.distributed import DistributedError, setup_parallel

    cfg = recipe(tmp_path, mode="ddp")
    cfg.batch_size = 3
    os.environ.update(WORLD_SIZE="2", RANK="0")
    try:
        with pytest.raises(DistributedError, match=r"batch_size = 3 is the global batch .* 2 ranks"):
            setup_parallel(cfg, torch.device("cpu"))
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
