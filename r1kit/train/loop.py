"""The training loop, pretraining and SFT alike (SFT = a loss mask on the assistant tokens), written out.

    train(TrainConfig.from_yaml("configs/nano.yaml"))            # or: r1kit train --config ... [--resume]

One step: for each micro-batch, forward under autocast (bf16, or bf16 + FP8-emulated linears), masked
next-token cross-entropy plus the weighted multi-token-prediction loss, backward; then gradient clipping,
AdamW with warmup + cosine/linear decay, and DeepSeek-V3's auxiliary-loss-free balancing: each MoE
layer's per-expert bias moves by `moe_balance_rate` towards under-loaded experts. Optional, off by default:
the sequence-wise balance loss (`moe_aux_loss_alpha`) and an expert capacity with token dropping
(`moe_capacity_factor`, training forwards only). Metrics go to `metrics.jsonl` (with per-layer expert load,
MaxVio and dropped pairs; a loss-curve PNG and one expert-load heatmap per MoE layer); checkpoints (model,
optimizer, data position, RNG, step) are written atomically, and `resume=True` continues exactly where a
killed run stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from r1kit.checkpoint import save_model
from r1kit.fileio import atomic_write
from r1kit.model.moe import MoE
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer
from r1kit.train.config import TrainConfig
from r1kit.train.distributed import Parallel, full_model, remove_checkpoint, save_checkpoint, setup_parallel
from r1kit.train.plots import plot_expert_load, plot_metrics

log = logging.getLogger("r1kit")


class TrainingError(ValueError):
    """Training cannot start or resume (e.g. no usable checkpoint). The message says which file."""


# ---------------------------------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    peak, floor, total = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.total_steps
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is set. logits (B, T, V), targets/mask (B, T)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1)


def step_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                doc_ids: torch.Tensor | None = None, objective: Objective | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main next-token loss and the mean MTP loss (None without MTP). x, y, mask (B, T); y = x shifted.

    doc_ids (B, T): packed rows (r1kit.train.chat_data), attention within each document; an MTP target in the
    next document does not count. `objective(logits, x, y, mask, doc_ids)` replaces the main cross-entropy
    (r1kit.train.distill.LogitDistillation: the divergence to a teacher)."""
    logits, hidden = model(x, return_hidden=True, doc_ids=doc_ids)
    loss = masked_ce(logits, y, mask) if objective is None else objective(logits, x, y, mask, doc_ids)
    if not model.mtp:
        return loss, None
    mtp = []
    for d, lg in enumerate(model.mtp_logits(hidden, x, doc_ids)):  # position t predicts y[t + 1 + d]
        m = mask[:, 1 + d:]
        if doc_ids is not None:
            m = m * (doc_ids[:, :-1 - d] == doc_ids[:, 1 + d:])
        mtp.append(masked_ce(lg, y[:, 1 + d:], m))
    return loss, torch.stack(mtp).mean()


# the main loss of a step in place of the cross-entropy: (logits (B, T, V), x, y, mask, doc_ids) -> scalar
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def moe_layers(model: Transformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def balance_experts(layers: list[MoE], loads: list[torch.Tensor], rate: float) -> list[float]:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): bias += rate * sign(mean load - load).

    Returns each layer's MaxVio = max load / mean load - 1 (0 = perfectly balanced).
    """
    maxvio = []
    for moe, load in zip(layers, loads, strict=True):
        load = load.float()
        mean = load.mean().clamp(min=1e-9)
        maxvio.append(float(load.max() / mean - 1))
        bias = moe.gate.e_score_correction_bias
        if rate and bias is not None:
            bias += rate * torch.sign(mean - load).to(bias.device)
    return maxvio


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, ...]], precision: str) -> float:
    """Mean masked next-token loss over fixed validation batches."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    total = 0.0
    for x, y, mask, *doc in batches:  # doc: the document ids of packed rows, when the data has them
        doc_ids = doc[0].to(device) if doc else None
        with autocast(precision, device):
            total += float(masked_ce(model(x.to(device), doc_ids=doc_ids), y.to(device), mask.to(device)))
    model.train(was_training)
    return total / max(1, len(batches))


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_files(out_dir: Path) -> list[Path]:
    """Training checkpoints of a run, oldest first: step_N.pt files, or step_N.dcp folders of a distributed run."""
    return sorted([*(out_dir / "checkpoints").glob("step_*.pt"), *(out_dir / "checkpoints").glob("step_*.dcp")])


def load_training_checkpoint(file: Path) -> dict[str, Any]:
    """Read one checkpoint (weights-only: no arbitrary unpickling); a damaged file raises TrainingError.
    A distributed checkpoint (step_N.dcp) gives its trainer state and ``dcp``, the folder its weights load from."""
    if file.is_dir():
        from r1kit.train.distributed import DistributedError, read_checkpoint_meta

        try:
            return read_checkpoint_meta(file)
        except DistributedError as e:
            raise TrainingError(str(e)) from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...: all mean "damaged"
        raise TrainingError(f"{file}: damaged or partial training checkpoint ({type(e).__name__}: {e})") from None
    missing = {"model", "optimizer", "step", "tokens", "data", "rng"} - set(state)
    if missing:
        raise TrainingError(f"{file}: not an r1kit training checkpoint (missing {sorted(missing)})")
    return state


def latest_usable_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; damaged newer ones are reported and skipped."""
    for file in reversed(checkpoint_files(out_dir)):
        try:
            return load_training_checkpoint(file)
        except TrainingError as e:
            log.warning("%s; trying the previous checkpoint", e)
    return None


# ---------------------------------------------------------------------------------------------------- the loop


# keys that may change between a run and its resumption; anything else would make it a different run
_RESUMABLE_CHANGES = {"max_steps", "token_budget", "out_dir", "eval_interval", "checkpoint_interval",
                      "keep_checkpoints", "log_interval", "threads", "distributed"}


def _check_same_recipe(saved: dict[str, Any], now: dict[str, Any], out: Path, kind: type = TrainConfig) -> None:
    # a key the checkpointed run did not have yet (added to its config class since) ran with its default
    defaults = kind().to_dict()  # sections too (e.g. `continual`, GRPO's `filter_groups`, absent from older ones)
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in _RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now.get(k))
    if changed:
        raise TrainingError(f"{out}: cannot resume: the config differs from the checkpointed run in {changed}; "
                            "use the original recipe (or start a new run in another out_dir)")


def build_model(cfg: TrainConfig, vocab_size: int, bos: int | None, eos: int | None, device: torch.device
                ) -> Transformer:
    if cfg.model.from_init:  # init_from's own architecture and weights (e.g. a compressed checkpoint)
        from r1kit.checkpoint import load_model

        model = load_model(cfg.init_from, device, torch.float32)
    else:
        mcfg = cfg.model_config().replace(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
        model = Transformer(mcfg).init_weights(cfg.seed).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    for moe in moe_layers(model):  # the training-only balancing aids (see r1kit.model.moe)
        moe.aux_loss_alpha, moe.capacity_factor = cfg.moe_aux_loss_alpha, cfg.moe_capacity_factor
    if cfg.precision == "fp8":
        from r1kit.train.fp8 import convert_to_fp8

        log.info("fp8: %d linear layers swapped to FP8 (emulated on CPU)", convert_to_fp8(model))
    return model


def build_lora_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """LoRA / QLoRA (``lora.r >= 1``): the init_from checkpoint as the frozen base, in its own architecture (the
    recipe's model section is not used), held in bf16 (fp32 with precision fp32) or int8/int4/nf4 with
    ``lora.qlora``, adapters injected (fp32); only the adapters are trainable."""
    from r1kit.checkpoint import load_model
    from r1kit.lora import LoRAConfig, inject_lora, mark_only_lora_trainable, quantize_base

    lo = cfg.lora
    frozen = torch.float32 if cfg.precision == "fp32" else torch.bfloat16  # no master copy of a frozen base
    model = load_model(cfg.init_from, device, frozen)
    if lo.qlora:
        quantize_base(model, lo.qlora)
    lcfg = LoRAConfig(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, use_rslora=lo.use_rslora,
                      **({"target_modules": lo.target_modules} if lo.target_modules is not None else {}))
    adapted = inject_lora(model, lcfg)
    params = mark_only_lora_trainable(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    for moe in moe_layers(model):
        moe.aux_loss_alpha, moe.capacity_factor = cfg.moe_aux_loss_alpha, cfg.moe_capacity_factor
    log.info("LoRA r=%d on %d modules of %s%s: %s trainable parameters", lo.r, len(adapted), cfg.init_from,
             f" (base {lo.qlora})" if lo.qlora else "", f"{sum(p.numel() for p in params):,}")
    return model.train()


def model_state(model: Transformer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What a training checkpoint keeps of the model: everything, or with LoRA the trainable adapters only."""
    if not cfg.lora.r:
        return model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in model.state_dict().items() if n in trainable}


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or the routing bias)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=False)


def open_run_dir(out: Path, cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """Prepare `out` for a new or resumed run and write its config.json; returns the checkpoint to resume from.

    A new run refuses a folder that holds checkpoints; a resumed one needs a usable checkpoint of the same recipe.
    """
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for tmp in (out / "checkpoints").glob(".step_*.tmp-*"):  # left by a run killed while writing
        tmp.unlink()
    state = latest_usable_checkpoint(out) if resume else None
    if resume and state is None and checkpoint_files(out):
        raise TrainingError(f"{out / 'checkpoints'}: no usable checkpoint to resume from (all damaged)")
    if not resume and checkpoint_files(out):
        raise TrainingError(f"{out}: already holds checkpoints; pass resume=True (--resume) or another out_dir")
    if state is not None:
        _check_same_recipe(state.get("config", {}), cfg.to_dict(), out, type(cfg))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return state


def load_initial_weights(model: Transformer, folder: str, device: torch.device) -> None:
    """Start from a trained model's weights (`init_from`: a later stage of a multi-stage recipe)."""
    from r1kit.checkpoint import load_model

    start = load_model(folder, device, torch.float32)
    try:
        model.load_state_dict(start.state_dict())
    except RuntimeError as e:
        raise TrainingError(f"init_from {folder}: does not fit the recipe's model ({e})") from None
    log.info("initialised from %s", folder)


@dataclasses.dataclass
class RunState:
    """How far a run has come: optimizer steps, training tokens, and seconds spent in steps."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def restore_run(state: dict[str, Any] | None, out: Path, model: Transformer, opt: torch.optim.Optimizer,
                data: Any, cfg: TrainConfig | None = None, par: Parallel | None = None) -> RunState:
    """Load a checkpoint's weights, optimizer, data position and RNG, and cut metrics.jsonl back to its step.

    Without a checkpoint (a new run) the run starts at step 0 with no metrics.jsonl. Distributed (`par`): every
    rank loads its part of a DCP checkpoint; rank 0 alone touches metrics.jsonl.
    """
    metrics_file = out / "metrics.jsonl"
    main = par is None or par.is_main
    if state is None:
        if main:
            metrics_file.unlink(missing_ok=True)
        return RunState()
    if "dcp" in state:
        from r1kit.train.distributed import load_checkpoint

        load_checkpoint(state["dcp"], model, opt)
        state = {**state, "model": None, "optimizer": None}
    try:
        lora = cfg is not None and cfg.lora.r
        if state["model"] is not None:
            missing = set(model.load_state_dict(state["model"], strict=not lora).missing_keys)
            if lora and missing & set(model_state(model, cfg)):  # with LoRA the checkpoint holds the adapters only
                raise KeyError(f"missing {sorted(missing & set(model_state(model, cfg)))[:5]}")
            opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainingError(f"{out / 'checkpoints'}: the checkpoint does not fit this model ({e})") from None
    data.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"])
    run = RunState(state["step"], state["tokens"], state.get("elapsed", 0.0))
    if main and metrics_file.exists():  # drop what the killed run logged after its last checkpoint
        kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= run.step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    log.info("resumed %s at step %d (%d tokens)", out, run.step, run.tokens)
    return run


@dataclasses.dataclass
class StepResult:
    """What one optimizer step measured; the losses are means over its micro-batches."""

    lr: float
    loss: float
    mtp_loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    seconds: float
    loads: list[torch.Tensor]  # per MoE layer: the tokens each expert received, (E,)
    dropped: list[int]  # per MoE layer: (token, expert) pairs over the capacity
    maxvio: list[float]  # per MoE layer: max load / mean load - 1
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # continual learning's terms (ewc_loss, ...)


def run_step(model: Transformer, opt: torch.optim.Optimizer, data: Any, layers: list[MoE], cfg: TrainConfig,
             lr: float, device: torch.device, continual: Any = None, par: Parallel | None = None,
             objective: Objective | None = None) -> StepResult:
    """One optimizer step: forward and backward over gradient_accumulation micro-batches, clipping, AdamW at
    `lr`, then the experts' bias balancing. `continual` (r1kit.train.continual.hook.ContinualHook) adds its loss
    terms to each micro-batch and scales the update of the weights it freezes. `par` (r1kit.train.distributed):
    `model` is then what the ranks train through (DDP's wrapper, or the FSDP2-sharded model), data gives this
    rank's rows; the losses are weighted to the global batch's mean, gradients are reduced on the last
    micro-batch only, and the logged means, tokens and expert loads are the whole job's. `objective` replaces
    the main cross-entropy (step_losses)."""
    par = par or Parallel()
    for group in opt.param_groups:
        group["lr"] = lr
    loads = [torch.zeros(m.experts.n_experts, dtype=torch.long) for m in layers]
    dropped = [0] * len(layers)
    loss_sum, mtp_sum, aux_sum, tokens = 0.0, 0.0, 0.0, 0
    t0 = time.perf_counter()
    for i in range(cfg.gradient_accumulation):
        x, y, mask, *doc = (t.to(device) for t in data.next_batch())
        par.sync_gradients(model, last=i == cfg.gradient_accumulation - 1)
        w, w_mtp = par.loss_weights(mask)  # 1.0 on one process
        with autocast(cfg.precision, device):
            loss, mtp = step_losses(model, x, y, mask, doc[0] if doc else None, objective)
            total_loss = loss * w if mtp is None else loss * w + cfg.mtp_loss_weight * mtp * w_mtp
            aux = [m.aux_loss for m in layers if m.aux_loss is not None]
            if aux:
                aux_loss = torch.stack(aux).sum()
                total_loss = total_loss + aux_loss
                aux_sum += float(aux_loss.detach())
            if continual is not None and (extra := continual.extra_loss(model, x)) is not None:
                total_loss = total_loss + extra
        (total_loss / cfg.gradient_accumulation).backward()
        loss_sum += float(loss.detach()) * w / par.world  # this rank's share of the global mean
        mtp_sum += float(mtp.detach()) * w_mtp / par.world if mtp is not None else 0.0
        for i, m in enumerate(layers):
            loads[i] += m.load.cpu()
            dropped[i] += int(m.dropped)
        tokens += x.numel() * par.world
    (loss_sum, mtp_sum, aux_sum), loads, dropped = par.reduce_step([loss_sum, mtp_sum, aux_sum / par.world],
                                                                   loads, dropped)
    if continual is not None:
        continual.before_step(model)
    grad_norm = par.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if continual is not None:
        continual.after_step(model)
    maxvio = balance_experts(layers, loads, 0.0 if cfg.lora.r else cfg.moe_balance_rate)  # LoRA: the base is frozen
    n = cfg.gradient_accumulation
    return StepResult(lr, loss_sum / n, mtp_sum / n, aux_sum / n, grad_norm, tokens, time.perf_counter() - t0,
                      loads, dropped, maxvio, continual.terms() if continual is not None else {})


class MetricsLog:
    """metrics.jsonl, appended to: one line per logged step (tokens/s since the previous logged one) and one per
    validation. For a MoE: MaxVio, expert loads and dropped pairs per layer."""

    def __init__(self, file: TextIO, model: Transformer, cfg: TrainConfig):
        self.file = file
        self.moe, self.mtp, self.aux = bool(moe_layers(model)), bool(model.mtp), bool(cfg.moe_aux_loss_alpha)
        self.since, self.tokens_since = time.perf_counter(), 0

    def step(self, run: RunState, r: StepResult, write: bool) -> None:
        """Count a finished step; with `write`, log it."""
        self.tokens_since += r.tokens
        if not write:
            return
        now = time.perf_counter()
        record = {"step": run.step, "loss": r.loss, "lr": r.lr, "tokens": run.tokens, "grad_norm": r.grad_norm,
                  "tok_s": self.tokens_since / (now - self.since), "elapsed_s": run.elapsed, **r.extra}
        if self.moe:  # per MoE layer: MaxVio, the tokens each expert received and the pairs dropped this step
            record.update(mtp_loss=r.mtp_loss, maxvio=r.maxvio, load=[load.tolist() for load in r.loads],
                          dropped=r.dropped)
            if self.aux:
                record["aux_loss"] = r.aux_loss
        elif self.mtp:
            record["mtp_loss"] = r.mtp_loss
        self._write(record)
        self.since, self.tokens_since = now, 0

    def validation(self, run: RunState, val_loss: float) -> None:
        self._write({"step": run.step, "val_loss": val_loss, "tokens": run.tokens})

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


@dataclasses.dataclass
class EarlyStopping:
    """Early stopping on validation loss: stop once `patience` validations in a row did not go `min_delta` below
    the best so far (never with patience None). The run then ends, and is finalized, at that step's weights."""

    patience: int | None
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    bad: int = 0

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def update(self, step: int, val_loss: float) -> None:
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.bad = val_loss, step, 0
        else:
            self.bad += 1

    @classmethod
    def replay(cls, cfg: TrainConfig, metrics_file: Path) -> EarlyStopping:
        """The state after the validations already in metrics.jsonl (a resumed run's, cut to its checkpoint)."""
        stopper = cls(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
        lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
        for record in map(json.loads, lines):
            if "val_loss" in record:
                stopper.update(record["step"], record["val_loss"])
        return stopper

    def summary(self) -> dict[str, Any]:
        if self.patience is None:
            return {}
        return {"early_stopped": self.stopped, "best_val_loss": self.best, "best_val_step": self.best_step}


def progress_bar(progress: bool, total: int, step: int) -> Any:
    """A tqdm bar over the run's steps, starting at `step`; None without progress."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, device: str | torch.device = "cpu",
          stop_after: int | None = None, prepare: Callable[[Transformer], None] | None = None,
          objective: Objective | None = None) -> dict[str, Any]:
    """Run (or resume) a training recipe; returns a summary. `stop_after` ends early after that many steps.

    `prepare(model)` runs once the weights are in place and before the optimizer is built: the hook through which
    other recipes change the model the loop trains (QAT's fake quantization, pruning masks; see r1kit.compress).
    `objective` replaces the cross-entropy of every step (r1kit.train.distill.LogitDistillation: a teacher's
    logits; validation stays the cross-entropy).
    """
    from r1kit.hardware import choose
    from r1kit.train.data import build_corpus, prepare_tokenizer

    out = Path(cfg.out_dir)
    state = open_run_dir(out, cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = choose(device, "fp32").device  # master weights fp32; `precision` sets the autocast dtype
    par = setup_parallel(cfg, device)  # torchrun's job (distributed.mode ddp/fsdp), or one process
    device = par.place(device)
    torch.manual_seed(cfg.seed)
    tokenizer: Tokenizer = par.main_first(lambda: prepare_tokenizer(cfg, out / "tokenizer"))
    train_data, val_data = build_corpus(cfg, tokenizer)
    val_batches = [val_data.next_batch() for _ in range(cfg.eval_batches)]
    model = assemble_model(cfg, tokenizer, device, fresh=state is None, prepare=prepare)
    continual = None
    if cfg.continual.from_run:  # the previous task's importance / replay buffer / model (r1kit.train.continual)
        from r1kit.train.continual.hook import build_continual

        continual = build_continual(cfg, model, tokenizer, device)
        train_data = continual.wrap_data(train_data)
    train_data, net = par.shard(train_data), par.wrap(model, cfg)  # this rank's rows; DDP / FSDP2 (in place)
    opt = make_optimizer(model, cfg)
    run = restore_run(state, out, model, opt, train_data, cfg, par)
    par.barrier()  # metrics.jsonl is cut back by rank 0 before any rank reads it
    stopper = EarlyStopping.replay(cfg, out / "metrics.jsonl")

    layers, total = moe_layers(model), cfg.total_steps
    end = total if stop_after is None else min(total, run.step + stop_after)
    bar = progress_bar(progress and par.is_main, total, run.step)
    model.train()
    with open(out / "metrics.jsonl" if par.is_main else os.devnull, "a") as file:
        metrics = MetricsLog(file, model, cfg)
        while run.step < end and not stopper.stopped:
            r = run_step(net, opt, train_data, layers, cfg, lr_at(run.step, cfg), device, continual, par, objective)
            run.step, run.tokens, run.elapsed = run.step + 1, run.tokens + r.tokens, run.elapsed + r.seconds
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{run.tokens / max(run.elapsed, 1e-9):.0f}")
            metrics.step(run, r, write=run.step % cfg.log_interval == 0 or run.step == end)
            if run.step % cfg.eval_interval == 0 or run.step == total:
                val = evaluate(model, val_batches, cfg.precision)
                metrics.validation(run, val)
                stopper.update(run.step, val)
                if bar is not None:
                    bar.write(f"step {run.step}: val_loss {val:.4f}" + (" (early stop)" if stopper.stopped else ""))
            if run.step % cfg.checkpoint_interval == 0 or run.step == end or stopper.stopped:
                save_training_checkpoint(out, cfg, model, opt, train_data, run.step, run.tokens, run.elapsed, par)
    if bar is not None:
        bar.close()
    return finish_run(out, cfg, run, par, stopper, model, tokenizer, continual, train_data)


def assemble_model(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device, fresh: bool,
                   prepare: Callable[[Transformer], None] | None) -> Transformer:
    """The model a run trains: LoRA-wrapped or plain, with `init_from`'s weights on a fresh (not resumed) full
    run, then `prepare(model)` (QAT, pruning masks) before any optimizer sees it."""
    if cfg.lora.r:
        model = build_lora_model(cfg, device)
    else:
        model = build_model(cfg, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, device)
    if cfg.init_from and fresh and not cfg.lora.r and not cfg.model.from_init:
        load_initial_weights(model, cfg.init_from, device)
    if prepare is not None:
        prepare(model)
    return model


def finish_run(out: Path, cfg: TrainConfig, run: RunState, par: Parallel, stopper: EarlyStopping, model: Transformer,
               tokenizer: Tokenizer, continual: Any, train_data: Any) -> dict[str, Any]:
    """The run's summary; once the last step (or an early stop) is reached, the final model, tokenizer and
    plots (rank 0) and the continual-learning files are written and their paths added to it."""
    summary = {"steps": run.step, "tokens": run.tokens, "elapsed_s": run.elapsed,
               "tok_s": run.tokens / max(run.elapsed, 1e-9), "world_size": par.world, "global_batch": cfg.batch_size,
               **stopper.summary()}
    if par.world > 1:
        summary["rank"] = par.rank
    if run.step == cfg.total_steps or stopper.stopped:
        whole = full_model(model, par)  # every rank takes part (FSDP gathers the shards); None off rank 0
        if whole is not None:
            summary.update(finalize(out, whole, tokenizer, cfg))
        if continual is not None:
            summary.update(continual.finalize(out / "final", model, train_data))
    return summary


def save_training_checkpoint(out: Path, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer,
                             data: Any, step: int, tokens: int, elapsed: float, par: Parallel | None = None) -> Path:
    """Write step_N.pt atomically (distributed.mode ddp/fsdp: the step_N.dcp folder, every rank its shards), then
    drop the oldest beyond keep_checkpoints."""
    if par is not None and par.mode != "none":  # cfg may be a GRPO/distill config, which has no distributed:
        meta = {"step": step, "tokens": tokens, "elapsed": elapsed, "data": data.state_dict(),
                "rng": torch.get_rng_state(), "config": cfg.to_dict()}
        file = save_checkpoint(out / "checkpoints" / f"step_{step:08d}.dcp", model, opt, meta, par or Parallel())
    else:
        file = out / "checkpoints" / f"step_{step:08d}.pt"
        state = {"model": model_state(model, cfg), "optimizer": opt.state_dict(), "step": step, "tokens": tokens,
                 "elapsed": elapsed, "data": data.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict()}
        atomic_write(file, lambda tmp: torch.save(state, tmp))
    if par is None or par.is_main:
        for old in checkpoint_files(out)[:-cfg.keep_checkpoints]:
            remove_checkpoint(old)
    return file


def finalize(out: Path, model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig) -> dict[str, Any]:
    """Save the trained model in Hugging Face format (bf16) with its tokenizer, the loss plot and, for a MoE,
    one expert-load heatmap per MoE layer (final/expert_load/). With LoRA: the adapter (PEFT's layout) at the top
    of `out` instead of a model (the plots still in final/)."""
    final = out / "final"
    if cfg.lora.r:
        from r1kit.lora import save_adapter

        final.mkdir(parents=True, exist_ok=True)
        save_adapter(model, out, base_model=cfg.init_from)
    else:
        save_model(model, final, dtype=torch.bfloat16)
        tokenizer.save(final)
    plot = plot_metrics(out / "metrics.jsonl", final / "loss.png")
    names = [name for name, m in model.named_modules() if isinstance(m, MoE)]  # the order of moe_layers()
    load_plots = plot_expert_load(out / "metrics.jsonl", final / "expert_load", names) if names else []
    return {"final": str(final), "plot": str(plot) if plot else None, "expert_load_plots": [str(p) for p in load_plots]}
