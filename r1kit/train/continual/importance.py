"""Importance of each weight for the tasks learnt so far: the diagonal Fisher information, accumulated online (online
EWC, Schwarz et al. 2018), the EWC penalty (Kirkpatrick et al. 2017), and the file that carries both to the next task.

    fisher = fisher_diagonal(model, rows, lm_log_likelihood)                 # {param name: F_i}, shapes of the params
    imp = Importance.start(model, fisher, task="arith")                     # anchor = the weights now
    imp = imp.add_task(model, fisher_of_next_task, decay=0.9, task="mul")   # F <- decay * F + F_new, new anchor
    loss = task_loss + ewc_penalty(model, imp, ewc_lambda)  # lambda/2 * sum_i F_i (theta_i - theta*_i)^2
    save_importance(imp, run / "final" / "continual" / "importance.safetensors")

Fisher: F_i = E_rows[(d log p(labels of the row | row) / d theta_i)^2], one gradient per row (a sequence for a
language model, an example for a classifier). "empirical" uses the row's own labels, "sampled" draws each label from
the model's predictive distribution (the true Fisher's expectation, estimated with one sample per position).
The file is safetensors (tensors `fisher.NAME` and `anchor.NAME`) whose header names the model (its ModelConfig as
JSON and a signature of its parameter names and shapes) and the tasks; a file from another model is refused by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.fileio import atomic_write

FORMAT = "r1kit-continual-importance/1"
LogLikelihood = Callable[[nn.Module, Sequence[torch.Tensor], str, torch.Generator], torch.Tensor]


class ContinualError(ValueError):
    """A continual-learning file or setting is unusable. The message names the file, key or difference."""


# ---------------------------------------------------------------------------------------------------- Fisher


def lm_log_likelihood(model: nn.Module, row: Sequence[torch.Tensor], labels: str, gen: torch.Generator
                      ) -> torch.Tensor:
    """Mean log-likelihood of one row's masked targets under a language model. row = (x, y, mask), each (1, T).

    labels "empirical": the targets y; "sampled": each target drawn from the model's own softmax at that position."""
    x, y, mask = row[0], row[1], row[2]
    logits = model(x).float()  # (1, T, V)
    logp = F.log_softmax(logits, dim=-1)
    if labels == "sampled":
        with torch.no_grad():
            y = torch.multinomial(logp.exp().flatten(0, 1), 1, generator=gen).view_as(y)
    picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (1, T)
    m = mask.to(picked.dtype)
    return (picked * m).sum() / m.sum().clamp(min=1)


def fisher_diagonal(model: nn.Module, rows: Iterable[Sequence[torch.Tensor]], log_likelihood: LogLikelihood,
                    labels: str = "empirical", seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable parameters: the mean over `rows` of each row's squared log-likelihood
    gradient. Each row is one sample (a batch of one); `log_likelihood(model, row, labels, generator)` scores it.

    Returns {name: tensor shaped like the parameter}, float32 on the parameter's device. The model's mode and
    gradients are left as they were (the gradients are restored)."""
    if labels not in ("empirical", "sampled"):
        raise ContinualError(f"continual.fisher = {labels!r}: must be empirical or sampled")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen, count, was_training = torch.Generator().manual_seed(seed), 0, model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    try:
        for row in rows:
            grads = torch.autograd.grad(log_likelihood(model, row, labels, gen), list(params.values()),
                                        allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    fisher[n] += g.float().square()
            count += 1
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.grad = saved[n]
    if not count:
        raise ContinualError("fisher_diagonal: no rows to estimate the Fisher information from")
    return {n: f / count for n, f in fisher.items()}


# ---------------------------------------------------------------------------------------------------- online EWC


def model_identity(model: nn.Module) -> dict[str, str]:
    """What names a model for the continual files: its config (JSON, when it has one) and a digest of its
    parameter names and shapes."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    cfg = getattr(model, "config", None)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"} if dataclasses.is_dataclass(cfg) else {}
    config = json.dumps(fields, sort_keys=True, default=str) if fields else ""  # "extra": what it was loaded from
    return {"model_config": config, "param_signature": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


def identity_difference(saved: dict[str, str], model: nn.Module) -> str | None:
    """None when `saved` (a model_identity) names `model`; else the first differences, e.g. "hidden_size 192 vs 256"."""
    now = model_identity(model)
    if saved.get("model_config") and now["model_config"]:
        a, b = json.loads(saved["model_config"]), json.loads(now["model_config"])
        diff = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            return ", ".join(diff[:4])
    if saved.get("param_signature") != now["param_signature"]:
        return "parameter names/shapes differ"
    return None


@dataclasses.dataclass
class Importance:
    """Accumulated diagonal Fisher `fisher` and the weights `anchor` the EWC penalty pulls towards (the end of the
    last task), both {param name: tensor}; `tasks` the tasks they summarise, oldest first."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    tasks: list[str]
    identity: dict[str, str]

    @classmethod
    def start(cls, model: nn.Module, fisher: dict[str, torch.Tensor], task: str) -> Importance:
        """The importance after the first task: its Fisher, anchored at the model's current weights."""
        return cls(fisher, _current_weights(model, fisher), [task], model_identity(model))

    def add_task(self, model: nn.Module, fisher: dict[str, torch.Tensor], decay: float, task: str) -> Importance:
        """Online EWC: F <- decay * F + F_task, anchor <- the model's current weights."""
        merged = {n: decay * self.fisher[n].to(f.device) + f if n in self.fisher else f.clone()
                  for n, f in fisher.items()}
        return Importance(merged, _current_weights(model, merged), [*self.tasks, task], model_identity(model))


def _current_weights(model: nn.Module, names: dict[str, Any]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().float().clone() for n in names}


def ewc_penalty(model: nn.Module, imp: Importance, ewc_lambda: float) -> torch.Tensor:
    """lambda / 2 * sum_i F_i (theta_i - theta*_i)^2 over the parameters `imp` covers (a scalar, differentiable)."""
    params = dict(model.named_parameters())
    total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    for n, f in imp.fisher.items():
        p = params[n]
        total = total + (f.to(p.device) * (p.float() - imp.anchor[n].to(p.device)).square()).sum()
    return 0.5 * ewc_lambda * total


# ---------------------------------------------------------------------------------------------------- the file


def save_importance(imp: Importance, file: str | Path) -> Path:
    """Write `imp` as safetensors (atomically) with a header naming the model and tasks."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {**{f"fisher.{n}": t.contiguous().cpu() for n, t in imp.fisher.items()},
               **{f"anchor.{n}": t.contiguous().cpu() for n, t in imp.anchor.items()}}
    meta = {"format": FORMAT, "tasks": json.dumps(imp.tasks), **imp.identity}
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return file


def load_importance(file: str | Path, model: nn.Module | None = None) -> Importance:
    """Read an importance file; ContinualError naming the file when it is missing, damaged, not one, or (given
    `model`) from another model (the message names the difference)."""
    file = Path(file)
    meta, tensors = read_safetensors(file, FORMAT)
    identity = {k: meta.get(k, "") for k in ("model_config", "param_signature")}
    if model is not None and (diff := identity_difference(identity, model)):
        raise ContinualError(f"{file}: made for another model ({diff})")
    fisher = {k[len("fisher."):]: t for k, t in tensors.items() if k.startswith("fisher.")}
    anchor = {k[len("anchor."):]: t for k, t in tensors.items() if k.startswith("anchor.")}
    if set(fisher) != set(anchor) or not fisher:
        raise ContinualError(f"{file}: damaged importance file (fisher and anchor tensors do not pair up)")
    return Importance(fisher, anchor, json.loads(meta.get("tasks", "[]")), identity)


def read_safetensors(file: Path, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of an r1kit continual file of format `fmt`; ContinualError naming the file if it
    is missing, unreadable or of another format."""
    from safetensors import safe_open

    if not file.is_file():
        raise ContinualError(f"{file}: no such file")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - a truncated header, bad JSON, short data: all mean "damaged"
        raise ContinualError(f"{file}: damaged or not a safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != fmt:
        raise ContinualError(f"{file}: not an r1kit {fmt.split('/')[0]} file (format {meta.get('format')!r})")
    return meta, tensors
