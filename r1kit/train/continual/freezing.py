"""Elastic freezing: keep the weights that matter for earlier tasks where they are, or let them move slower.

    units = importance_units(model, fisher, "head")            # layers | heads | experts | weights, scored by Fisher
    scaler = UpdateScaler.by_importance(model, fisher, "expert", fraction=0.25, lr_scale=0.0)
    ...loss.backward(); scaler.before_step(model); opt.step(); scaler.after_step(model)

A unit's score is its mean Fisher per weight; the top `fraction` of units (of individual weights, for "weight") get
update scale `lr_scale`: 0 freezes them (their values stay bit for bit), a value in (0, 1) scales their learning
rate. The scale applies to the optimizer's update itself, p <- p_old + scale * (p_adamw - p_old), because AdamW is
invariant to the gradient's scale and decays weights whose gradient is zero. Frozen weights also get a zero gradient,
so clipping sees only the weights that train.

Units: "layer" = each transformer block (`layers.N`) and each other top-level module (embeddings, final norm, head);
"head" = the rows (queries, MLA's per-head key/value up-projection) and output-projection columns of one attention
head (GQA's shared key/value heads stay free); "expert" = one routed expert's slices of the grouped expert weights;
"weight" = single weights. The MoE routing bias is a buffer moved by balancing, not by the optimizer: not covered.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from r1kit.train.continual.importance import ContinualError

GRANULARITIES = ("layer", "head", "expert", "weight")


@dataclasses.dataclass
class Unit:
    """One freezable unit: `parts` are (param name, dim, start, stop) slices (dim None = the whole parameter)."""

    name: str
    parts: list[tuple[str, int | None, int, int]]
    score: float = 0.0


def _slice(t: torch.Tensor, dim: int | None, start: int, stop: int) -> torch.Tensor:
    return t if dim is None else t.narrow(dim, start, stop - start)


def _layer_units(model: nn.Module) -> list[Unit]:
    groups: dict[str, list] = {}
    for n, _ in model.named_parameters():
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0] == "layers" and len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append((n, None, 0, 0))
    return [Unit(k, v) for k, v in groups.items()]


def _head_units(model: nn.Module) -> list[Unit]:
    units = []
    for prefix, mod in model.named_modules():
        if not (hasattr(mod, "n_heads") and isinstance(getattr(mod, "o_proj", None), nn.Linear)):
            continue
        h = mod.n_heads
        rows = [name for name in ("q_proj", "q_b_proj", "kv_b_proj") if isinstance(getattr(mod, name, None), nn.Linear)]
        for i in range(h):
            parts = []
            for name in rows:
                out = getattr(mod, name).weight.shape[0] // h  # per-head rows of a (H * d, in) projection
                parts.append((f"{prefix}.{name}.weight", 0, i * out, (i + 1) * out))
            cols = mod.o_proj.weight.shape[1] // h  # o_proj (C, H * dv): this head's columns
            parts.append((f"{prefix}.o_proj.weight", 1, i * cols, (i + 1) * cols))
            units.append(Unit(f"{prefix}.head{i}", parts))
    return units


def _expert_units(model: nn.Module) -> list[Unit]:
    from r1kit.model.moe import Experts

    units = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, Experts):
            names = [f"{prefix}.{n}" for n, p in mod.named_parameters(recurse=False) if p.ndim == 3]
            units += [Unit(f"{prefix}.{e}", [(n, 0, e, e + 1) for n in names]) for e in range(mod.n_experts)]
    return units


def importance_units(model: nn.Module, fisher: dict[str, torch.Tensor], granularity: str) -> list[Unit]:
    """The units of `granularity` ("layer", "head", "expert"), each scored by its mean Fisher, highest first."""
    build = {"layer": _layer_units, "head": _head_units, "expert": _expert_units}
    if granularity not in build:
        raise ContinualError(f"continual.freeze = {granularity!r}: must be one of {', '.join(GRANULARITIES)}")
    units = build[granularity](model)
    if not units:
        raise ContinualError(f"continual.freeze = {granularity!r}: the model has no such units")
    for u in units:
        vals = [_slice(fisher[n], d, a, b) for n, d, a, b in u.parts if n in fisher]
        count = sum(v.numel() for v in vals)
        u.score = float(sum(v.double().sum() for v in vals) / count) if count else 0.0
    return sorted(units, key=lambda u: -u.score)


def importance_scales(model: nn.Module, fisher: dict[str, torch.Tensor], granularity: str, fraction: float,
                      lr_scale: float) -> dict[str, torch.Tensor]:
    """Per parameter, its update scale (1 = free, `lr_scale` for the top `fraction` by importance); only the
    parameters with some scaled element appear."""
    if not 0 <= fraction <= 1:
        raise ContinualError(f"continual.freeze_fraction = {fraction!r}: must be in [0, 1]")
    params = dict(model.named_parameters())
    scales: dict[str, torch.Tensor] = {}
    if granularity == "weight":
        names = [n for n in fisher if n in params]
        flat = torch.cat([fisher[n].flatten().float().cpu() for n in names])
        k = math.floor(fraction * flat.numel())  # the k most important single weights
        if k == 0:
            return {}
        threshold = flat.topk(k).values[-1]
        for n in names:
            chosen = fisher[n].to(params[n].device) >= threshold
            if chosen.any():
                scales[n] = torch.where(chosen, lr_scale, 1.0).to(torch.float32)
        return scales
    units = importance_units(model, fisher, granularity)
    for u in units[:round(fraction * len(units))]:
        for n, d, a, b in u.parts:
            s = scales.setdefault(n, torch.ones_like(params[n], dtype=torch.float32))
            _slice(s, d, a, b).fill_(lr_scale)
    return scales


class UpdateScaler:
    """Scale (or cancel, at scale 0) the optimizer's update of chosen weights; see the module docstring."""

    def __init__(self, model: nn.Module, scales: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.scales = {n: s.to(params[n].device) for n, s in scales.items()}
        self._old: dict[str, torch.Tensor] = {}
        total = sum(p.numel() for p in params.values())
        self.frozen_fraction = sum(int((s == 0).sum()) for s in self.scales.values()) / max(1, total)
        self.scaled_fraction = sum(int((s != 1).sum()) for s in self.scales.values()) / max(1, total)

    @classmethod
    def by_importance(cls, model: nn.Module, fisher: dict[str, torch.Tensor], granularity: str, fraction: float,
                      lr_scale: float = 0.0) -> UpdateScaler:
        return cls(model, importance_scales(model, fisher, granularity, fraction, lr_scale))

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        """After backward, before clipping: zero the frozen weights' gradients and remember the weights."""
        params = dict(model.named_parameters())
        for n, s in self.scales.items():
            p = params[n]
            if p.grad is not None:
                p.grad.mul_((s != 0).to(p.grad.dtype))
            self._old[n] = p.detach().clone()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """After the optimizer step: p <- p_old + scale * (p - p_old); frozen weights get p_old exactly."""
        params = dict(model.named_parameters())
        for n, s in self.scales.items():
            p, old = params[n], self._old.pop(n)
            p.copy_(torch.where(s == 0, old, old + s.to(p.dtype) * (p - old)))
