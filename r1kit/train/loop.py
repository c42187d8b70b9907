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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1kit.checkpoint import save_model
from r1kit.model.moe import MoE
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer
from r1kit.train.config import TrainConfig

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


def step_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main next-token loss and the mean MTP loss (None without MTP). x, y, mask (B, T); y = x shifted."""
    logits, hidden = model(x, return_hidden=True)
    loss = masked_ce(logits, y, mask)
    if not model.mtp:
        return loss, None
    mtp = [masked_ce(lg, y[:, 1 + d:], mask[:, 1 + d:]) for d, lg in enumerate(model.mtp_logits(hidden, x))]
    return loss, torch.stack(mtp).mean()


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
    for x, y, mask in batches:
        with autocast(precision, device):
            total += float(masked_ce(model(x.to(device)), y.to(device), mask.to(device)))
    model.train(was_training)
    return total / max(1, len(batches))


# ---------------------------------------------------------------------------------------------------- checkpoints


def _atomic_torch_save(obj: Any, file: Path) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_files(out_dir: Path) -> list[Path]:
    """Training checkpoints of a run, oldest first."""
    return sorted((out_dir / "checkpoints").glob("step_*.pt"))


def load_training_checkpoint(file: Path) -> dict[str, Any]:
    """Read one checkpoint (weights-only: no arbitrary unpickling); a damaged file raises TrainingError."""
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
                      "keep_checkpoints", "log_interval", "threads"}


def _check_same_recipe(saved: dict[str, Any], now: dict[str, Any], out: Path) -> None:
    # a key the checkpointed run did not have yet (added to TrainConfig since) ran with its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in _RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now.get(k))
    if changed:
        raise TrainingError(f"{out}: cannot resume: the config differs from the checkpointed run in {changed}; "
                            "use the original recipe (or start a new run in another out_dir)")


def build_model(cfg: TrainConfig, vocab_size: int, bos: int | None, eos: int | None, device: torch.device
                ) -> Transformer:
    mcfg = cfg.model_config().replace(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    model = Transformer(mcfg).init_weights(cfg.seed).to(device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    for moe in moe_layers(model):  # the training-only balancing aids (see r1kit.model.moe)
        moe.aux_loss_alpha, moe.capacity_factor = cfg.moe_aux_loss_alpha, cfg.moe_capacity_factor
    if cfg.precision == "fp8":
        from r1kit.train.fp8 import convert_to_fp8

        log.info("fp8: %d linear layers swapped to FP8 (emulated on CPU)", convert_to_fp8(model))
    return model


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or the routing bias)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=False)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, device: str | torch.device = "cpu",
          stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a training recipe; returns a summary. `stop_after` ends early after that many steps."""
    from r1kit.hardware import choose
    from r1kit.train.data import build_corpus, prepare_tokenizer

    out = Path(cfg.out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for tmp in (out / "checkpoints").glob(".step_*.tmp-*"):  # left by a run killed while writing
        tmp.unlink()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = choose(device, "fp32").device  # master weights fp32; `precision` sets the autocast dtype
    torch.manual_seed(cfg.seed)
    state = latest_usable_checkpoint(out) if resume else None
    if resume and state is None and checkpoint_files(out):
        raise TrainingError(f"{out / 'checkpoints'}: no usable checkpoint to resume from (all damaged)")
    if not resume and checkpoint_files(out):
        raise TrainingError(f"{out}: already holds checkpoints; pass resume=True (--resume) or another out_dir")
    if state is not None:
        _check_same_recipe(state.get("config", {}), cfg.to_dict(), out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    tokenizer: Tokenizer = prepare_tokenizer(cfg, out / "tokenizer")
    train_data, val_data = build_corpus(cfg, tokenizer)
    val_batches = [val_data.next_batch() for _ in range(cfg.eval_batches)]
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, device)
    if cfg.init_from and state is None:
        from r1kit.checkpoint import load_model

        start = load_model(cfg.init_from, device, torch.float32)
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as e:
            raise TrainingError(f"init_from {cfg.init_from}: does not fit the recipe's model ({e})") from None
        log.info("initialised from %s", cfg.init_from)
    opt = make_optimizer(model, cfg)
    step, tokens, elapsed = 0, 0, 0.0
    metrics_file = out / "metrics.jsonl"
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{out / 'checkpoints'}: the checkpoint does not fit this model ({e})") from None
        train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        step, tokens, elapsed = state["step"], state["tokens"], state.get("elapsed", 0.0)
        if metrics_file.exists():  # drop what the killed run logged after its last checkpoint
            kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        log.info("resumed %s at step %d (%d tokens)", out, step, tokens)
    elif metrics_file.exists():
        metrics_file.unlink()

    layers = moe_layers(model)
    total = cfg.total_steps
    end = total if stop_after is None else min(total, step + stop_after)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    t_log, tok_log = time.perf_counter(), 0
    with open(metrics_file, "a") as metrics:
        while step < end:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loads = [torch.zeros(m.experts.n_experts, dtype=torch.long) for m in layers]
            dropped = [0] * len(layers)
            loss_sum, mtp_sum, aux_sum = 0.0, 0.0, 0.0
            t0 = time.perf_counter()
            for _ in range(cfg.gradient_accumulation):
                x, y, mask = (t.to(device) for t in train_data.next_batch())
                with autocast(cfg.precision, device):
                    loss, mtp = step_losses(model, x, y, mask)
                    total_loss = loss if mtp is None else loss + cfg.mtp_loss_weight * mtp
                    aux = [m.aux_loss for m in layers if m.aux_loss is not None]
                    if aux:
                        aux_loss = torch.stack(aux).sum()
                        total_loss = total_loss + aux_loss
                        aux_sum += float(aux_loss.detach())
                (total_loss / cfg.gradient_accumulation).backward()
                loss_sum += float(loss.detach())
                mtp_sum += float(mtp.detach()) if mtp is not None else 0.0
                for i, m in enumerate(layers):
                    loads[i] += m.load.cpu()
                    dropped[i] += int(m.dropped)
                tokens += x.numel()
                tok_log += x.numel()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            maxvio = balance_experts(layers, loads, cfg.moe_balance_rate)
            step += 1
            elapsed += time.perf_counter() - t0
            loss_avg = loss_sum / cfg.gradient_accumulation
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            if step % cfg.log_interval == 0 or step == end:
                now = time.perf_counter()
                record = {"step": step, "loss": loss_avg, "lr": lr, "tokens": tokens, "grad_norm": grad_norm,
                          "tok_s": tok_log / (now - t_log), "elapsed_s": elapsed}
                if layers:  # per MoE layer: MaxVio, the tokens each expert received and the pairs dropped this step
                    record.update(mtp_loss=mtp_sum / cfg.gradient_accumulation, maxvio=maxvio,
                                  load=[load.tolist() for load in loads], dropped=dropped)
                    if cfg.moe_aux_loss_alpha:
                        record["aux_loss"] = aux_sum / cfg.gradient_accumulation
                elif model.mtp:
                    record["mtp_loss"] = mtp_sum / cfg.gradient_accumulation
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                t_log, tok_log = now, 0
            if step % cfg.eval_interval == 0 or step == total:
                val = evaluate(model, val_batches, cfg.precision)
                metrics.write(json.dumps({"step": step, "val_loss": val, "tokens": tokens}) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.write(f"step {step}: val_loss {val:.4f}")
            if step % cfg.checkpoint_interval == 0 or step == end:
                save_training_checkpoint(out, cfg, model, opt, train_data, step, tokens, elapsed)
    if bar is not None:
        bar.close()
    summary = {"steps": step, "tokens": tokens, "elapsed_s": elapsed, "tok_s": tokens / max(elapsed, 1e-9)}
    if step == total:
        summary.update(finalize(out, model, tokenizer, cfg))
    return summary


def save_training_checkpoint(out: Path, cfg: TrainConfig, model: Transformer, opt: torch.optim.Optimizer,
                             data: Any, step: int, tokens: int, elapsed: float) -> Path:
    """Write step_N.pt atomically, then drop the oldest beyond keep_checkpoints."""
    file = out / "checkpoints" / f"step_{step:08d}.pt"
    _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "tokens": tokens, "elapsed": elapsed, "data": data.state_dict(),
                        "rng": torch.get_rng_state(), "config": cfg.to_dict()}, file)
    for old in checkpoint_files(out)[:-cfg.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return file


def finalize(out: Path, model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig) -> dict[str, Any]:
    """Save the trained model in Hugging Face format (bf16) with its tokenizer, the loss plot and, for a MoE,
    one expert-load heatmap per MoE layer (final/expert_load/)."""
    final = out / "final"
    save_model(model, final, dtype=torch.bfloat16)
    tokenizer.save(final)
    plot = plot_metrics(out / "metrics.jsonl", final / "loss.png")
    names = [name for name, m in model.named_modules() if isinstance(m, MoE)]  # the order of moe_layers()
    load_plots = plot_expert_load(out / "metrics.jsonl", final / "expert_load", names) if names else []
    return {"final": str(final), "plot": str(plot) if plot else None, "expert_load_plots": [str(p) for p in load_plots]}


def plot_metrics(metrics_file: Path, png: Path) -> Path | None:
    """Loss curves (train, validation, MTP) and per-layer MaxVio, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot written")
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 2 if any("maxvio" in r for r in train) else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
    if any("mtp_loss" in r for r in train):
        ax.plot([r["tokens"] for r in train], [r.get("mtp_loss", float("nan")) for r in train], label="MTP loss",
                alpha=0.6)
    ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if axes.shape[1] > 1:
        ax = axes[0][1]
        vio = [r["maxvio"] for r in train if "maxvio" in r]
        for layer in range(len(vio[0])):
            ax.plot([r["tokens"] for r in train if "maxvio" in r], [v[layer] for v in vio], label=f"MoE layer {layer}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("MaxVio (max load / mean - 1)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_expert_load(metrics_file: Path, folder: Path, layer_names: list[str]) -> list[Path]:
    """One PNG per MoE layer: a heatmap of each expert's load / mean load over the logged steps (1 = balanced),
    with MaxVio and the dropped pairs underneath. Returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no expert-load plots written")
        return []
    rows = [r for r in map(json.loads, metrics_file.read_text().splitlines()) if "load" in r]
    if not rows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5  # each logged step is one column
    files = []
    for i, name in enumerate(layer_names):
        load = torch.tensor([r["load"][i] for r in rows], dtype=torch.float32)  # (logged steps, E)
        rel = load / load.mean(1, keepdim=True).clamp(min=1e-9)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 1))
        image = top.imshow(rel.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=0, vmax=2, interpolation="nearest",
                           extent=(steps[0] - half, steps[-1] + half, load.shape[1] - 0.5, -0.5))
        fig.colorbar(image, ax=(top, bottom), label="load / mean load")
        top.set_ylabel("expert")
        top.set_title(f"{name}: expert load per step")
        bottom.plot(steps, [r["maxvio"][i] for r in rows], label="MaxVio")
        bottom.plot(steps, [r.get("dropped", [0] * len(layer_names))[i] / max(1, sum(r["load"][i])) for r in rows],
                    label="dropped fraction")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        bottom.legend()
        file = folder / f"{name.replace('.', '_')}.png"
        fig.savefig(file, dpi=100)
        plt.close(fig)
        files.append(file)
    return files
