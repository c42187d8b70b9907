"""The continual-learning hook of the training loop (r1kit.train.loop): what a `continual:` section adds to a run.

    hook = build_continual(cfg, model, tokenizer, device)   # from cfg.continual.from_run: the previous task's files
    data = hook.wrap_data(data)                             # replay rows mixed in (and offered to the buffer)
    loss = task_loss + hook.extra_loss(model, x)            # EWC penalty + LwF distillation, each logged
    hook.before_step(model); opt.step(); hook.after_step(model)   # elastic freezing / learning-rate scaling
    hook.finalize(out / "final", model, data)               # this task's Fisher accumulated, files saved

The previous task's importance and replay buffer are read from `FROM_RUN/final/continual/` when that run was itself
continual; otherwise (a plain run, or a bundled model with `previous_recipe`) they are computed from the previous
recipe's data with the previous model, before any step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.train.continual.freezing import UpdateScaler
from r1kit.train.continual.importance import (
    ContinualError,
    Importance,
    fisher_diagonal,
    identity_difference,
    lm_log_likelihood,
    load_importance,
    model_identity,
    save_importance,
)
from r1kit.train.continual.replay import ReplayBuffer, ReplayData, load_replay, save_replay

log = logging.getLogger("r1kit")
IMPORTANCE_FILE, REPLAY_FILE = "importance.safetensors", "replay.safetensors"


def lwf_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF (Li & Hoiem 2017): T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over positions.
    student, teacher (B, T, V) logits."""
    t = temperature
    s = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return t * t * F.kl_div(s, p, log_target=True, reduction="batchmean")


def tokenizer_digest(tokenizer: Any) -> str:
    """A short digest of a tokenizer's full definition (vocabulary, merges, specials)."""
    return hashlib.sha256(tokenizer._backend.to_str().encode()).hexdigest()[:16]


def resolve_previous(from_run: str) -> tuple[Path, Path | None, Path]:
    """(model folder, run folder or None, continual folder) of `from_run`: a training run (with final/) or a model
    folder."""
    root = Path(from_run)
    if (root / "final" / "config.json").is_file():
        return root / "final", root, root / "final" / "continual"
    if (root / "config.json").is_file() and (root / "tokenizer.json").is_file():
        return root, None, root / "continual"
    raise ContinualError(f"continual.from_run = {from_run!r}: neither a training run (no final/config.json) nor a "
                         "model folder (config.json + tokenizer.json)")


class ContinualHook:
    """The per-step pieces of a continual run; built by build_continual."""

    def __init__(self, cfg: Any, task: str, importance: Importance | None, buffer: ReplayBuffer | None,
                 teacher: nn.Module | None, scaler: UpdateScaler | None, identity: dict[str, str]):
        self.c, self.task, self.importance, self.buffer = cfg.continual, task, importance, buffer
        self.teacher, self.scaler, self.identity = teacher, scaler, identity
        self._logits: torch.Tensor | None = None
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, model: nn.Module) -> None:
        """Keep the logits of the model's last forward (for LwF), without changing the loop's forward."""
        if self.teacher is not None:
            model.register_forward_hook(self._keep_logits)

    def _keep_logits(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._logits = output[0] if isinstance(output, tuple) else output

    def wrap_data(self, data: Any) -> Any:
        """The loop's batch source, with replay when replay_ratio > 0."""
        if self.buffer is None or not self.c.replay_ratio:
            return data
        return ReplayData(data, self.buffer, self.c.replay_ratio)

    def extra_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """EWC penalty plus LwF distillation for micro-batch x (B, T), after the model's forward on x."""
        from r1kit.train.continual.importance import ewc_penalty

        terms = {}
        if self.importance is not None and self.c.ewc_lambda:
            terms["ewc_loss"] = ewc_penalty(model, self.importance, self.c.ewc_lambda)
        if self.teacher is not None and self._logits is not None:
            with torch.no_grad():
                teacher = self.teacher(x)
            terms["lwf_loss"] = self.c.lwf_alpha * lwf_loss(self._logits, teacher, self.c.lwf_temperature)
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._count += 1
        return sum(terms.values()) if terms else None

    def before_step(self, model: nn.Module) -> None:
        if self.scaler is not None:
            self.scaler.before_step(model)

    def after_step(self, model: nn.Module) -> None:
        if self.scaler is not None:
            self.scaler.after_step(model)

    def terms(self) -> dict[str, float]:
        """Means of each extra loss term since the last call, and the frozen/scaled fractions: for metrics.jsonl."""
        out = {k: v / max(1, self._count) for k, v in self._sums.items()}
        if self.scaler is not None:
            out.update(frozen_fraction=self.scaler.frozen_fraction, scaled_fraction=self.scaler.scaled_fraction)
        self._sums, self._count = {}, 0
        return out

    def finalize(self, final: Path, model: nn.Module, data: Any) -> dict[str, Any]:
        """This task's Fisher (on its own rows) accumulated into the importance (online EWC), and the importance and
        replay buffer written to final/continual/."""
        files: dict[str, Any] = {"task": self.task}
        if self.importance is not None:  # EWC or freezing: the next task will want this one's importance too
            inner = data.inner if isinstance(data, ReplayData) else data
            fisher = fisher_diagonal(model, task_rows(inner, self.c.fisher_rows), lm_log_likelihood, self.c.fisher)
            imp = self.importance.add_task(model, fisher, self.c.ewc_decay, self.task)
            files.update(tasks=imp.tasks, importance=str(save_importance(imp, final / "continual" / IMPORTANCE_FILE)))
        if self.buffer is not None:
            files["replay"] = str(save_replay(self.buffer, final / "continual" / REPLAY_FILE, self.identity))
        return {"continual": files}


def task_rows(data: Any, n: int) -> list[tuple[torch.Tensor, ...]]:
    """`n` single rows (x, y, mask), each (1, T), from a batch source."""
    rows: list[tuple[torch.Tensor, ...]] = []
    while len(rows) < n:
        batch = data.next_batch()
        rows += [tuple(t[i:i + 1] for t in batch[:3]) for i in range(batch[0].shape[0])]
    return rows[:n]


def previous_recipe(cfg: Any, run: Path | None) -> Any:
    """The TrainConfig of the previous task: continual.previous_recipe, or the previous run's config.json."""
    from r1kit.train.config import TrainConfig

    c = cfg.continual
    if c.previous_recipe:
        return TrainConfig.from_yaml(c.previous_recipe)
    if run is not None and (run / "config.json").is_file():
        return TrainConfig.from_dict(json.loads((run / "config.json").read_text()), str(run / "config.json"))
    raise ContinualError(f"continual.from_run = {c.from_run!r}: a model folder without continual/ files; set "
                         "continual.previous_recipe to the recipe of the task it learnt")


def previous_data(cfg: Any, run: Path | None, tokenizer: Any) -> Any:
    """The previous task's training batches (see previous_recipe), rebuilt with this run's seq_len and batch size
    and a small arithmetic set (only a few hundred rows are used)."""
    import dataclasses

    from r1kit.train.data import build_corpus

    prev = previous_recipe(cfg, run)
    small = dataclasses.replace(prev.data, arithmetic_examples=min(prev.data.arithmetic_examples, 4000),
                                max_chars=min(prev.data.max_chars or 1_000_000, 1_000_000))
    prev = dataclasses.replace(prev, data=small, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed + 7)
    return build_corpus(prev, tokenizer)[0]


def check_same_model(folder: Path, previous: nn.Module, model: nn.Module, prev_tok: Any, tokenizer: Any) -> None:
    """ContinualError naming the difference when the model or tokenizer trained now is not the previous run's."""
    if diff := identity_difference(model_identity(previous), model):
        raise ContinualError(f"continual.from_run {folder}: the model differs from the previous run's ({diff})")
    if prev_tok.vocab_size != tokenizer.vocab_size:
        raise ContinualError(f"continual.from_run {folder}: the tokenizer differs (vocab_size {prev_tok.vocab_size} "
                             f"vs {tokenizer.vocab_size})")
    if tokenizer_digest(prev_tok) != tokenizer_digest(tokenizer):
        raise ContinualError(f"continual.from_run {folder}: the tokenizer differs (same vocab_size, other "
                             "tokens/merges in tokenizer.json)")


def build_continual(cfg: Any, model: nn.Module, tokenizer: Any, device: torch.device) -> ContinualHook:
    """The hook for cfg.continual (call once the starting weights are loaded and before any step)."""
    from r1kit.checkpoint import load_model
    from r1kit.tokenizer import Tokenizer

    c = cfg.continual
    model_dir, run_dir, cont_dir = resolve_previous(c.from_run)
    previous = load_model(model_dir, device, torch.float32).eval()
    check_same_model(model_dir, previous, model, Tokenizer.from_dir(model_dir), tokenizer)
    identity = {**model_identity(model), "tokenizer": tokenizer_digest(tokenizer)}
    prev_task = c.previous_task or (run_dir or model_dir).name
    task = c.task or Path(cfg.out_dir).name
    data = None
    importance = None
    if c.ewc_lambda or c.freeze:
        if (cont_dir / IMPORTANCE_FILE).is_file():
            importance = load_importance(cont_dir / IMPORTANCE_FILE, model)
        else:
            data = previous_data(cfg, run_dir, tokenizer)
            fisher = fisher_diagonal(previous, task_rows(data, c.fisher_rows), lm_log_likelihood, c.fisher)
            importance = Importance.start(model, fisher, prev_task)
    buffer = None
    if c.replay_ratio or c.generative_replay:
        buffer = build_buffer(cfg, (cont_dir, run_dir), prev_task, identity, data, previous, tokenizer)
        buffer.begin_task(task)
    scaler = None
    if c.freeze:
        scaler = UpdateScaler.by_importance(model, importance.fisher, c.freeze, c.freeze_fraction, c.freeze_lr_scale)
        log.info("continual: %s freezing, %.2f%% of the weights frozen, %.2f%% scaled", c.freeze,
                 100 * scaler.frozen_fraction, 100 * scaler.scaled_fraction)
    hook = ContinualHook(cfg, task, importance, buffer, previous if c.lwf_alpha else None, scaler, identity)
    hook.attach(model)
    return hook


def build_buffer(cfg: Any, dirs: tuple[Path, Path | None], prev_task: str, identity: dict[str, str], data: Any,
                 previous: nn.Module, tokenizer: Any) -> ReplayBuffer:
    """The replay buffer: the previous run's file, or a reservoir over the previous task's rows `data` (built when
    None) plus, with generative_replay, the previous model's own verified answers to its arithmetic kinds."""
    c, (cont_dir, run_dir) = cfg.continual, dirs
    if (cont_dir / REPLAY_FILE).is_file():
        return load_replay(cont_dir / REPLAY_FILE, c.replay_examples, c.replay_bytes, cfg.seed, identity)
    buffer = ReplayBuffer(c.replay_examples, c.replay_bytes, cfg.seed)
    buffer.begin_task(prev_task)
    if c.replay_ratio:
        data = data if data is not None else previous_data(cfg, run_dir, tokenizer)
        for row in task_rows(data, 2 * c.replay_examples):
            buffer.offer(tuple(t[0] for t in row))
    if c.generative_replay:
        from r1kit.train.continual.generative import generated_rows

        kinds = list(previous_recipe(cfg, run_dir).data.arithmetic_kinds)
        buffer.begin_task(f"{prev_task}-generated")
        for row in generated_rows(previous, tokenizer, kinds, c.generative_replay, cfg.seq_len, cfg.seed):
            buffer.offer(row)
    return buffer
