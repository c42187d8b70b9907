"""Plots of a training run from its metrics.jsonl: loss curves with MaxVio, and expert-load heatmaps.

    plot_metrics(out / "metrics.jsonl", out / "final" / "loss.png")
    plot_expert_load(out / "metrics.jsonl", out / "final" / "expert_load", ["layers.1.mlp", ...])

Read-only over the metrics file (the loop writes it, r1kit.train.loop.finalize and scripts/package_nano.py
call these); matplotlib is optional: without it nothing is drawn and a warning says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("r1kit")


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


def plot_rl_metrics(metrics_file: Path, png: Path) -> Path | None:
    """An RL run's curves (r1kit.train.grpo's metrics.jsonl) as one PNG: reward mean (band: std) per reward and in
    total, accuracy per kind, completion length, and KL / clip fraction / zero-variance groups; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot written")
        return None
    rows = [r for r in map(json.loads, metrics_file.read_text().splitlines()) if "reward" in r]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax = axes[0][0]
    names = [k.split("/")[1] for k in rows[0] if k.startswith("rewards/") and k.endswith("/mean")] if rows else []
    for key, label in [("reward", "total"), *[(f"rewards/{n}/mean", n) for n in names]]:
        mean = torch.tensor([r[key] for r in rows])
        std = torch.tensor([r[key.replace("/mean", "/std") if "/" in key else "reward_std"] for r in rows])
        ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    ax.set_ylabel("reward (band: std)")
    ax = axes[0][1]
    for kind in sorted({k for r in rows for k in r.get("accuracy_by_kind", {})}):
        ax.plot(steps, [r["accuracy_by_kind"].get(kind, float("nan")) for r in rows], label=kind, alpha=0.8)
    ax.plot(steps, [r["accuracy"] for r in rows], "k-", label="all", linewidth=2)
    ax.set_ylabel("rollout accuracy (sampled)")
    axes[1][0].plot(steps, [r["completion_length"] for r in rows], label="completion length")
    axes[1][0].set_ylabel("tokens per completion")
    ax = axes[1][1]
    for key in ("kl", "clip_fraction", "zero_std_groups"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_ylabel("fraction / nats")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("RL step")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
