"""Training speed and memory, measured in one run: tokens/s and MFU, gradient checkpointing, bf16 vs fp32,
FP8-emulated loss vs bf16 loss.

    python benchmarks/bench_train.py [--json out.json] [--steps 20]

- MFU: model FLOPs per token (6 x active parameters + attention) x tokens/s, over the matmul peak of this
  machine measured in the same run (a large bf16 GEMM).
- Gradient checkpointing: a deep model, memory = peak RSS growth over its first forward+backward
  (activations + gradients), each variant in its own fresh process; the time of a second step beside it.
- Precision: the same model and data trained for --steps steps in fp32, bf16 and fp8 (emulated on CPU):
  tokens/s, and the final loss relative to bf16 (DeepSeek-V3 reports < 0.25% relative error for FP8 at scale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from r1kit.model.config import preset
from r1kit.model.transformer import Transformer
from r1kit.train.loop import autocast, step_losses


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n matmul (best of repeats)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg, seq_len: int) -> float:
    """6 N (active, without embeddings lookups) + attention scores/values, forward + backward."""
    n = cfg.num_params(active=True) - cfg.vocab_size * cfg.hidden_size
    d_qk = cfg.qk_head_dim if cfg.attention == "mla" else cfg.gqa_head_dim
    d_v = cfg.v_head_dim if cfg.attention == "mla" else cfg.gqa_head_dim
    attn = 6 * cfg.num_layers * cfg.num_heads * (d_qk + d_v) * seq_len / 2  # causal: half the keys on average
    return 6 * n + attn


def train_steps(name: str, precision: str, steps: int, batch: int, seq_len: int, seed: int = 0,
                grad_ckpt: bool = False, **overrides) -> dict:
    torch.manual_seed(seed)
    cfg = preset(name, **overrides)
    model = Transformer(cfg).init_weights(seed).train()
    model.gradient_checkpointing = grad_ckpt
    if precision == "fp8":
        from r1kit.train.fp8 import convert_to_fp8

        convert_to_fp8(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    # a learnable stream: a random "grammar" of repeated 8-token phrases
    phrases = torch.randint(0, cfg.vocab_size, (64, 8), generator=gen)
    losses, t_start = [], None
    for step in range(steps + 1):
        if step == 1:
            t_start = time.perf_counter()
        x = phrases[torch.randint(0, 64, (batch, seq_len // 8 + 1), generator=gen)].flatten(1)[:, :seq_len + 1]
        with autocast("fp32" if precision == "fp32" else "bf16", torch.device("cpu")):
            loss, mtp = step_losses(model, x[:, :-1], x[:, 1:], torch.ones(batch, seq_len))
            total = loss if mtp is None else loss + 0.3 * mtp
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    dt = time.perf_counter() - t_start
    return {"tok_s": steps * batch * seq_len / dt, "step_s": dt / steps, "final_loss": sum(losses[-5:]) / 5,
            "losses": losses, "flops_per_token": flops_per_token(cfg, seq_len)}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def activation_memory(grad_ckpt: bool, layers: int, batch: int, seq_len: int) -> dict:
    """Peak RSS growth over the first forward+backward of a deep dense model, in a fresh process.

    The growth holds the saved activations plus the gradients (the same in both variants); measured on the
    first step because the allocator keeps and reuses memory afterwards. The step time is the second step's.
    """
    torch.manual_seed(0)
    model = Transformer(preset("tiny-dense", num_layers=layers, hidden_size=256, intermediate_size=1024,
                               num_heads=4, num_kv_heads=4, max_position_embeddings=4096)).init_weights(0).train()
    model.gradient_checkpointing = grad_ckpt
    x = torch.randint(0, 512, (batch, seq_len + 1))
    before = _rss_mib()
    with autocast("bf16", torch.device("cpu")):
        model.loss(x[:, :-1], x[:, 1:]).backward()
    grown = _peak_rss_mib() - before
    model.zero_grad(set_to_none=False)
    t = time.perf_counter()
    with autocast("bf16", torch.device("cpu")):
        model.loss(x[:, :-1], x[:, 1:]).backward()
    return {"activation_MiB": grown, "step_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:  # "ckpt" or "plain"
        print(json.dumps(activation_memory(a.worker == "ckpt", layers=24, batch=8, seq_len=512)))
        return

    out: dict = {"threads": torch.get_num_threads()}
    out["peak_flops"] = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak: bf16 {out['peak_flops']['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {out['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s ({out['threads']} threads)", file=sys.stderr)

    out["precision"] = {}
    for precision in ("fp32", "bf16", "fp8"):
        r = train_steps("nano", precision, a.steps, batch=8, seq_len=256)
        peak = out["peak_flops"]["fp32" if precision == "fp32" else "bf16"]
        r["mfu"] = r["tok_s"] * r["flops_per_token"] / peak
        out["precision"][precision] = r
        print(f"  trained nano in {precision}", file=sys.stderr)

    out["checkpointing"] = {}
    for variant in ("plain", "ckpt"):
        done = subprocess.run([sys.executable, __file__, "--worker", variant], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
        out["checkpointing"][variant] = json.loads(done.stdout.strip().splitlines()[-1])

    p = out["precision"]
    mflop = p["bf16"]["flops_per_token"] / 1e6
    print(f"\n| nano ({mflop:.1f} MFLOP/token), batch 8 x 256 | fp32 | bf16 | fp8 (emulated) |")
    print("|---|---:|---:|---:|")
    print("| tokens/s | " + " | ".join(f"{p[k]['tok_s']:.0f}" for k in ("fp32", "bf16", "fp8")) + " |")
    print("| MFU (vs measured matmul peak of that dtype) | "
          + " | ".join(f"{p[k]['mfu']:.1%}" for k in ("fp32", "bf16", "fp8")) + " |")
    losses = " | ".join(f"{p[k]['final_loss']:.4f}" for k in ("fp32", "bf16", "fp8"))
    print(f"| final loss after {a.steps} steps | {losses} |")
    rel = {k: p[k]["final_loss"] / p["bf16"]["final_loss"] - 1 for k in ("fp32", "fp8")}
    print(f"| loss relative to bf16 | {rel['fp32']:+.2%} | 0 | {rel['fp8']:+.2%} |")
    c = out["checkpointing"]
    saved = 1 - c["ckpt"]["activation_MiB"] / c["plain"]["activation_MiB"]
    extra = c["ckpt"]["step_s"] / c["plain"]["step_s"] - 1
    print("\n| 24-layer dense, batch 8 x 512, bf16 | no checkpointing | gradient checkpointing | change |")
    print("|---|---:|---:|---:|")
    plain, ckpt = c["plain"]["activation_MiB"], c["ckpt"]["activation_MiB"]
    print(f"| peak memory growth, activations + grads (MiB) | {plain:.0f} | {ckpt:.0f} | {-saved:+.0%} "
          "(target <= -60%) |")
    print(f"| step time (s) | {c['plain']['step_s']:.2f} | {c['ckpt']['step_s']:.2f} | {extra:+.0%} (target <= +35%) |")
    out["summary"] = {"fp8_rel_loss_vs_bf16": rel["fp8"], "ckpt_activation_saving": saved, "ckpt_extra_time": extra,
                      "bf16_over_fp32_speed": p["bf16"]["tok_s"] / p["fp32"]["tok_s"]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
