"""Training on several processes with torchrun: the process group, DDP, FSDP2, sharded batches, DCP checkpoints.

    torchrun --nproc-per-node 2 -m r1kit train --config configs/tiny.yaml --distributed ddp   # or fsdp

The training loop (r1kit.train.loop) calls the hooks of one `Parallel` object; with one process (no torchrun,
or mode none) every hook is the identity and the loop is the single-process loop.

Global batch semantics: `batch_size` is the batch of the whole job. Every rank draws the same global batch from
the same seeded data and keeps its rows [rank * b, (rank + 1) * b), b = batch_size / world (`RankShard`); each
rank's loss is weighted by world x (its unmasked targets) / (the job's), so that DDP's and FSDP's average of
the ranks' gradients is the gradient of the global batch's masked mean. A recipe therefore trains the same
model at any world size, and the data position is one state for every world size (resumable at another one).

Checkpoints (mode ddp or fsdp, any world size including 1): `checkpoints/step_N.dcp/`, written by
torch.distributed.checkpoint (each rank its shards) into a temporary folder that rank 0 completes with
`trainer.pt` (step, tokens, data position, RNG, config) and renames: a reader sees the whole checkpoint or
none. DCP reshards on load, so a run saved on 2 ranks resumes on 1 or 4; `export_checkpoint` writes the
ordinary single-file safetensors checkpoint from one.

Failure: every collective has the configured timeout (`distributed.timeout_s`); a rank that dies makes the
others' next collective fail, the survivors log which step they were in and exit non-zero, and torchrun's
summary names the rank that failed first. Under `torchrun --max-restarts N` a restarted job resumes from its
last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from r1kit.fileio import atomic_write

log = logging.getLogger("r1kit")
T = TypeVar("T")

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # the collective library of each device type


class DistributedError(RuntimeError):
    """A distributed run cannot start or has lost a rank. The message names the rank, the setting or the file."""


# ---------------------------------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Parallel:
    """How this process takes part in training: mode, rank and world size (world 1: no process group)."""

    mode: str = "none"  # "none" | "ddp" | "fsdp"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 120.0
    expert_parallel: bool = False  # ddp: the routed experts split across the ranks (ExpertParallelExperts)
    comm_device: str = "cpu"  # where the loop's own small all-reduces run (NCCL/HCCL need the accelerator)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics.jsonl and announces checkpoints."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: an accelerator by local rank, the CPU as it is."""
        if device.type in ("cuda", "npu") and self.world > 1:
            return torch.device(device.type, self.local_rank)
        return device

    # ------------------------------------------------------------------ collectives (identity on one process)

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `t` over the ranks in place; a failed collective (a dead rank, a timeout) is a DistributedError."""
        if self.world > 1:
            try:
                buf = t.to(self.comm_device)
                dist.all_reduce(buf)
                t.copy_(buf)
            except Exception as e:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses of many kinds
                raise DistributedError(
                    f"rank {self.rank} of {self.world}: the all-reduce of {what} failed ({type(e).__name__}: {e}); "
                    f"another rank has died or stopped responding (timeout {self.timeout_s:g} s)") from e
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then on the other ranks (which then find what rank 0 wrote: the tokenizer)."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()

    # ------------------------------------------------------------------ hooks of the training loop

    def shard(self, data: Any) -> Any:
        """This rank's rows of each global batch (RankShard); the data itself on one process."""
        return data if self.world == 1 else RankShard(data, self.rank, self.world)

    def loss_weights(self, mask: torch.Tensor) -> tuple[float, float]:
        """Weights of this rank's main and first-MTP-depth losses (masked means over its rows) that make the
        ranks' average the masked mean over the global batch: world x local targets / global targets.
        mask (b, T) this rank's loss mask. (1.0, 1.0) on one process."""
        if self.world == 1:
            return 1.0, 1.0
        local = torch.tensor([float(mask.sum()), float(mask[:, 1:].sum())], dtype=torch.float64)
        total = self.all_reduce(local.clone(), "the loss-mask counts")
        w = self.world * local / total.clamp(min=1.0)
        return float(w[0]), float(w[1])

    def sync_gradients(self, net: nn.Module, last: bool) -> None:
        """Before one micro-batch's forward: gradients are reduced across ranks only on the last micro-batch of a
        step (what DDP's no_sync context sets, and FSDP2's set_requires_gradient_sync)."""
        if self.world == 1:
            return
        if self.mode == "fsdp":
            net.set_requires_gradient_sync(last)
        else:
            net.require_backward_grad_sync = last

    def reduce_step(self, sums: list[float], loads: list[torch.Tensor], dropped: list[int]
                    ) -> tuple[list[float], list[torch.Tensor], list[int]]:
        """One all-reduce for the logs and balancing of a step: `sums` (this rank's shares of the global means),
        each MoE layer's expert loads (E,) and dropped pairs, summed over the ranks."""
        if self.world == 1:
            return sums, loads, dropped
        flat = torch.cat([torch.tensor([*sums, *dropped], dtype=torch.float64), *[x.double() for x in loads]])
        self.all_reduce(flat, "the step's losses and expert loads")
        n = len(sums) + len(dropped)
        loads = [x.round().long() for x in flat[n:].split([len(x) for x in loads])] if loads else []
        return flat[:len(sums)].tolist(), loads, [int(v) for v in flat[len(sums):n].round()]

    def clip_grad_norm_(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        """torch's clip_grad_norm_; with sharded (DTensor) gradients the norm is the whole model's. Expert
        parallel: the experts' gradients, which summed every rank's tokens, are first divided by the world size
        (DDP averages the others), and the norm adds every rank's experts."""
        params = list(params)
        if self.world == 1 or (self.mode == "ddp" and not self.expert_parallel):
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        if self.expert_parallel:
            for g in sharded:
                g.div_(self.world)
        plain = [g for g in grads if not isinstance(g, DTensor)]
        norms = [torch.nn.utils.get_total_norm(group) for group in (sharded, plain)]
        total = float(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm())
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    def wrap(self, model: nn.Module, cfg: Any) -> nn.Module:
        """What the loop calls for the training forward: the model itself (one process, or FSDP2, which shards
        it in place), or its DDP wrapper. Call before building the optimizer."""
        if self.world == 1:
            return model
        if self.mode == "fsdp":
            return shard_fsdp(model, cfg)
        if self.expert_parallel:
            split_experts(model, self)
        device_ids = [self.local_rank] if next(model.parameters()).device.type == "cuda" else None
        return DDPModel(model, device_ids=device_ids, forward_sync_buffers=False)


def split_experts(model: nn.Module, par: Parallel) -> None:
    """Expert parallelism under DDP: each MoE layer's routed experts replaced by this rank's E/W of them
    (ExpertParallelExperts, DTensor weights sharded on dim 0), which DDP then leaves alone. In place."""
    from torch.distributed.device_mesh import init_device_mesh

    from r1kit.model.moe import ExpertParallelExperts, MoE

    mesh = init_device_mesh(next(model.parameters()).device.type, (par.world,))
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.experts = ExpertParallelExperts(moe.experts, par.rank, par.world, mesh=mesh)
    ignored = [name for name, p in model.named_parameters() if ".experts." in name]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)


class DDPModel(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's attributes (``mtp``, ``mtp_logits``), so
    the loop's loss code runs on it unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def shard_fsdp(model: nn.Module, cfg: Any) -> nn.Module:
    """FSDP2 (torchtitan's layout): ``fully_shard`` each transformer block (also MTP's), then the root; bf16
    compute with fp32 gradient reduction under precision bf16; optional CPU offload. In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.precision == "bf16" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cfg.distributed.cpu_offload else OffloadPolicy()
    for block in [*model.layers, *(depth.block for depth in model.mtp)]:  # MTP's norms/projection: the root's
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def setup_parallel(cfg: Any, device: torch.device) -> Parallel:
    """The job this process belongs to, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); the process group is created once, with the backend of the device and the configured
    timeout. Mode none, or no torchrun: one process. The global batch must divide across the ranks."""
    d = cfg.distributed
    if d.mode == "none":
        return Parallel()
    env = os.environ
    par = Parallel(d.mode, int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   d.timeout_s, d.expert_parallel)
    if cfg.batch_size % par.world:
        raise DistributedError(f"batch_size = {cfg.batch_size} is the global batch and does not divide across "
                               f"{par.world} ranks ({cfg.batch_size} % {par.world} = {cfg.batch_size % par.world}); "
                               f"use a multiple of {par.world}")
    if par.world > 1 and not dist.is_initialized():
        backend = d.backend or BACKENDS.get(device.type)
        if backend is None:
            raise DistributedError(f"distributed.backend: no collective library known for device {device.type!r}; "
                                   f"set one of {sorted(set(BACKENDS.values()))}")
        if device.type == "cuda":
            torch.cuda.set_device(par.local_rank)
        if not par.is_main:
            log.setLevel(logging.WARNING)  # rank 0 logs for the job
        dist.init_process_group(backend, timeout=timedelta(seconds=d.timeout_s), **attempt_store(par, d.timeout_s))
        log.info("%s: %d ranks, backend %s, timeout %g s; global batch %d = %d rows per rank", d.mode, par.world,
                 backend, d.timeout_s, cfg.batch_size, cfg.batch_size // par.world)
    if par.world > 1:
        par.comm_device = "cpu" if dist.get_backend() == "gloo" else str(par.place(device))
    return par


def attempt_store(par: Parallel, timeout_s: float) -> dict[str, Any]:
    """After a torchrun restart (--max-restarts), a key space of this attempt's own in torchrun's store: the keys
    the killed attempt's ranks left there (their addresses) would otherwise be read by the new ones."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), par.world, is_master=False,
                         timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"r1kit/attempt_{attempt}/", base), "rank": par.rank, "world_size": par.world}


class RankShard:
    """This rank's rows of every global batch from `source` (anything with next_batch / state_dict): rows
    [rank * b, (rank + 1) * b) of each tensor, b = rows / world. Every rank draws the same global batches, so
    across the ranks each row is trained once, and the data state is the same on every rank."""

    def __init__(self, source: Any, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self.source.next_batch()
        rows = batch[0].shape[0]
        if rows % self.world:
            raise DistributedError(f"a global batch of {rows} rows does not divide across {self.world} ranks")
        b = rows // self.world
        return tuple(t[self.rank * b:(self.rank + 1) * b] for t in batch)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # rows_drawn, epochs, ... of the source
        return getattr(self.source, name)


# ---------------------------------------------------------------------------------------------------- checkpoints


def is_distributed_checkpoint(path: Path) -> bool:
    return path.is_dir() and path.suffix == ".dcp"


def read_checkpoint_meta(folder: Path) -> dict[str, Any]:
    """A DCP checkpoint's trainer state (step, tokens, data, rng, config) plus ``dcp``: its folder. Raises
    DistributedError naming the folder when it is incomplete."""
    file = folder / "trainer.pt"
    if not (folder / ".metadata").is_file() or not file.is_file():
        raise DistributedError(f"{folder}: incomplete distributed checkpoint (no .metadata or trainer.pt)")
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means a damaged checkpoint
        raise DistributedError(f"{file}: damaged ({type(e).__name__}: {e})") from None
    return {**meta, "dcp": str(folder)}


def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any],
                    par: Parallel) -> Path:
    """Write `folder` (step_N.dcp) with torch.distributed.checkpoint: all ranks write their shards of the model
    and optimizer into a temporary folder, rank 0 adds trainer.pt (`meta`) and renames it into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = folder.with_name(f".{folder.name}.tmp")
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    par.barrier()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    if par.is_main:
        atomic_write(tmp / "trainer.pt", lambda f: torch.save(meta, f))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    par.barrier()
    return folder


def load_checkpoint(folder: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into `model` (and `opt`), resharded to this job's layout: any world size, DDP,
    FSDP or one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if opt is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(model, state["model"])
        return
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def full_model(model: nn.Module, par: Parallel) -> nn.Module | None:
    """The whole trained model as ordinary tensors on rank 0 (None elsewhere); every rank must call it (FSDP
    gathers the shards). One process and DDP: the model itself."""
    if par.world == 1 or (par.mode == "ddp" and not par.expert_parallel):
        return model if par.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not par.is_main:
        return None
    from r1kit.model.transformer import Transformer

    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def export_checkpoint(folder: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A DCP training checkpoint (step_N.dcp, saved at any world size) as an ordinary safetensors checkpoint
    folder (config.json + model.safetensors), in one process. The run's tokenizer is copied when found."""
    from r1kit.checkpoint import save_model
    from r1kit.model.config import ModelConfig
    from r1kit.model.transformer import Transformer
    from r1kit.train.config import TrainConfig

    folder, out = Path(folder), Path(out)
    meta = read_checkpoint_meta(folder)
    run = folder.parent.parent
    cfg = TrainConfig.from_dict(meta["config"])
    mcfg: ModelConfig = cfg.model_config()
    tokenizer_dir = run / "tokenizer"
    if tokenizer_dir.is_dir():
        from r1kit.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tokenizer_dir)
        mcfg = mcfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(mcfg)
    load_checkpoint(folder, model, None)
    save_model(model, out, dtype=dtype)
    if tokenizer_dir.is_dir():
        tok.save(out)
    return out


# ---------------------------------------------------------------------------------------------------- launching


def restarted() -> bool:
    """Whether torchrun restarted this job (--max-restarts): it should then resume from its last checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


@contextlib.contextmanager
def job() -> Iterator[None]:
    """Around a whole distributed command: a failure on any rank is logged with the rank and re-raised (torchrun
    then stops the other ranks and names the first failure); the process group is closed at the end."""
    try:
        yield
    except BaseException as e:
        if dist.is_initialized():
            log.error("rank %d of %d stopped: %s: %s", dist.get_rank(), dist.get_world_size(), type(e).__name__, e)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
