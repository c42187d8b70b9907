"""MoE at small scale, measured in one run: expert dispatch cost, load balancing, and the CEAP combiner.

    python benchmarks/bench_moe.py [--json out.json] [--steps 300] [--threads 2]

1. Dispatch: one routed-expert layer (hidden 128, expert width 64, top-4) at 8, 32 and 128 experts, r1kit's
   sorted grouped dispatch (`Experts.forward`, one `torch._grouped_mm`) against the per-expert Python loop that
   Hugging Face's DeepSeek code runs (`for e in experts: tokens of e -> MLP_e`): tokens/s of forward +
   backward on a 2048-token batch, and forward on a 1-token decode batch. Cost per token should stay about
   flat as experts are added at fixed top-k (sub-linear), where the loop grows with the expert count.
2. Balancing: configs/moe-balance.yaml (2 MoE layers of 16 experts, top-2, on standard-library code) trained
   with the same data and seed: (a) no balancing, (b) the sequence-wise auxiliary loss (alpha), (c)
   auxiliary-loss-free bias balancing at DeepSeek-V3's gamma 0.001 and (c') at the recipe's gamma, tuned for a
   300-step run, and (d) = (c') with a capacity factor (token dropping). MaxVio = max load / mean load - 1,
   per training batch (logged every 10 steps; final, mean of the last N, mean of all) and over the whole
   validation set with the final model (DeepSeek's MaxVio_global); validation loss; training tokens/s.
   Published anchor (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", 1B MoE): MaxVio_global 0.04 with
   bias balancing vs 0.72 with an auxiliary loss, perplexity 9.50 vs 9.56.
3. CEAP: configs/ceap.yaml (the same recipe, cross-expert attention combiner) against (c'): validation loss at
   equal training tokens, and at equal wall-clock (CEAP retrained with as many steps as fit in (c)'s time),
   with its parameter and FLOP overhead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1kit.model.config import ModelConfig, preset
from r1kit.model.moe import Experts
from r1kit.train.config import TrainConfig
from r1kit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK_GAMMA = 0.001  # DeepSeek-V3's bias update speed (for most of its 14.8T-token run)


# ---------------------------------------------------------------------------------------------------- dispatch


def per_expert_loop(ex: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The peer: a Python loop over experts, each running on the tokens routed to it. x (N, C) -> (N, C)."""
    out = torch.zeros_like(x)
    for e in range(ex.n_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], ex.gate_up_proj[e]).split(ex.hidden, dim=-1)
        y = F.linear(F.silu(gate) * up, ex.down_proj[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def dispatch(n_experts: int, n_tokens: int, k: int = 4, dim: int = 128, hidden: int = 64, backward: bool = True
             ) -> dict[str, float]:
    """Tokens/s of grouped dispatch and of the per-expert loop on one batch with random balanced-ish routing."""
    gen = torch.Generator().manual_seed(n_experts)
    ex = Experts(n_experts, dim, hidden)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * 0.05)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * 0.05)
    x = torch.randn(n_tokens, dim, generator=gen, requires_grad=backward)
    idx = torch.randn(n_tokens, n_experts, generator=gen).topk(k, -1).indices
    weights = torch.rand(n_tokens, k, generator=gen)
    torch.testing.assert_close(ex(x, weights, idx), per_expert_loop(ex, x, weights, idx), atol=1e-4, rtol=1e-4)

    def step(run):
        def go():
            if backward:
                run(ex, x, weights, idx).square().mean().backward()
                ex.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    run(ex, x, weights, idx)
        return go

    repeats = 10 if backward else 50
    grouped = _best_time(step(Experts.forward), repeats)
    loop = _best_time(step(per_expert_loop), repeats)
    return {"grouped_tok_s": n_tokens / grouped, "loop_tok_s": n_tokens / loop, "grouped_over_loop": loop / grouped}


# ---------------------------------------------------------------------------------------------------- training


def _read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def global_maxvio(cfg: TrainConfig, out: Path) -> list[float]:
    """MaxVio per MoE layer over every validation batch (one count per expert for the whole set)."""
    from r1kit.checkpoint import load_model
    from r1kit.model.moe import MoE
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.data import build_corpus

    model = load_model(out / "final", "cpu", torch.float32)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    _, val = build_corpus(cfg, Tokenizer.from_dir(out / "final"))
    loads = [torch.zeros(m.experts.n_experts) for m in layers]
    model.train()  # MoE layers record their load in training mode (no capacity set: nothing is dropped)
    for _ in range(cfg.eval_batches):
        x, _, _ = val.next_batch()
        model(x)
        for i, m in enumerate(layers):
            loads[i] += m.load.float()
    return [float(load.max() / load.mean() - 1) for load in loads]


def run_recipe(name: str, cfg: TrainConfig, work: Path, tokenizer: Path | None, last_n: int) -> dict:
    """Train one variant into work/name; returns its figures. The tokenizer folder is shared between runs."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if tokenizer is not None:
        shutil.copytree(tokenizer, out / "tokenizer")
    cfg.out_dir = str(out)
    t = time.perf_counter()
    summary = train(cfg, progress=False)
    wall = time.perf_counter() - t
    rows = _read_metrics(out)
    vio = [sum(r["maxvio"]) / len(r["maxvio"]) for r in rows if "maxvio" in r]  # mean over the MoE layers
    val = [r for r in rows if "val_loss" in r]
    dropped = sum(sum(r["dropped"]) for r in rows if "dropped" in r)
    pairs = sum(sum(map(sum, r["load"])) for r in rows if "load" in r)
    result = {
        "steps": summary["steps"], "tokens": summary["tokens"], "train_s": summary["elapsed_s"],
        "tok_s": summary["tok_s"], "wall_s": wall, "val_loss": val[-1]["val_loss"],
        "val_curve": [(r["step"], r["val_loss"]) for r in val],
        "maxvio_final": vio[-1], f"maxvio_last{last_n}": sum(vio[-last_n:]) / len(vio[-last_n:]),
        "maxvio_mean": sum(vio) / len(vio), "maxvio_curve": vio, "maxvio_global": global_maxvio(cfg, out),
        "dropped_frac": dropped / max(1, pairs), "expert_load_plots": summary.get("expert_load_plots", []),
    }
    print(f"  {name}: {result['steps']} steps, val loss {result['val_loss']:.4f}, "
          f"MaxVio final {result['maxvio_final']:.2f}, {result['tok_s']:.0f} tok/s", file=sys.stderr)
    return result


def ceap_overhead(mc: ModelConfig) -> dict[str, float]:
    """Parameters and per-token FLOPs CEAP adds, against the MoE layers' own (active) figures."""
    from r1kit.model.moe import CrossExpertAttention

    plain = mc.replace(moe_combiner="weighted_sum")
    c, i, k = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts_per_tok
    ceap = CrossExpertAttention(c, mc.moe_combiner_heads, mc.moe_combiner_head_dim)
    moe_flops = 2 * (c * mc.n_routed_experts + (k + mc.n_shared_experts) * 3 * c * i) + 2 * k * c  # + weighted sum
    return {"params_added": mc.num_params() - plain.num_params(), "params_total": mc.num_params(),
            "params_added_frac": mc.num_params() / plain.num_params() - 1,
            "active_params_added_frac": mc.num_params(active=True) / plain.num_params(active=True) - 1,
            "flops_per_token_per_layer_added": ceap.flops_per_token(k),
            "moe_layer_flops_per_token": moe_flops,
            "flops_added_frac_of_moe_layer": ceap.flops_per_token(k) / moe_flops}


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=300, help="training steps of each variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.01, help="aux loss weight of variant (b)")
    ap.add_argument("--gamma", type=float, default=None, help="bias rate of (c) (default: the YAML's)")
    ap.add_argument("--capacity", type=float, default=1.25, help="capacity factor of variant (d)")
    ap.add_argument("--last", type=int, default=5, help="MaxVio mean over the last N logged steps")
    ap.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out: dict = {"threads": a.threads, "steps": a.steps}

    out["dispatch"] = {}
    for experts in (8, 32, 128):
        out["dispatch"][experts] = {"train_2048": dispatch(experts, 2048),
                                    "decode_1": dispatch(experts, 1, backward=False)}
        print(f"  dispatch at {experts} experts done", file=sys.stderr)

    base = TrainConfig.from_yaml(ROOT / "configs" / "moe-balance.yaml", max_steps=a.steps, threads=a.threads,
                                 eval_interval=max(1, a.steps // 3))
    ceap_cfg = TrainConfig.from_yaml(ROOT / "configs" / "ceap.yaml", max_steps=a.steps, threads=a.threads,
                                     eval_interval=max(1, a.steps // 3))
    gamma = base.moe_balance_rate if a.gamma is None else a.gamma
    same = {k: v for k, v in ceap_cfg.to_dict().items() if k not in ("model", "out_dir")}
    if same != {k: v for k, v in base.to_dict().items() if k not in ("model", "out_dir")}:
        raise SystemExit("configs/ceap.yaml must be configs/moe-balance.yaml with only the combiner changed")
    variants = {
        "none": dict(moe_balance_rate=0.0, moe_aux_loss_alpha=0.0),
        "aux_loss": dict(moe_balance_rate=0.0, moe_aux_loss_alpha=a.alpha),
        "bias_deepseek": dict(moe_balance_rate=DEEPSEEK_GAMMA, moe_aux_loss_alpha=0.0),
        "bias": dict(moe_balance_rate=gamma, moe_aux_loss_alpha=0.0),
        "bias_capacity": dict(moe_balance_rate=gamma, moe_aux_loss_alpha=0.0, moe_capacity_factor=a.capacity),
    }
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench_moe_"))
    runs: dict[str, dict] = {}
    tokenizer = None
    for name, changes in variants.items():
        runs[name] = run_recipe(name, TrainConfig.from_dict({**base.to_dict(), **changes}), work, tokenizer, a.last)
        tokenizer = work / name / "tokenizer"
    ceap = TrainConfig.from_dict({**ceap_cfg.to_dict(), "moe_balance_rate": gamma})
    runs["ceap"] = run_recipe("ceap", ceap, work, tokenizer, a.last)
    budget = runs["bias"]["train_s"]
    steps_equal_time = max(1, int(a.steps * budget / runs["ceap"]["train_s"]))
    runs["ceap_equal_time"] = run_recipe("ceap_equal_time", TrainConfig.from_dict(
        {**ceap.to_dict(), "max_steps": steps_equal_time, "eval_interval": steps_equal_time}), work, tokenizer, a.last)
    out["runs"] = runs
    out["settings"] = {"alpha": a.alpha, "gamma": gamma, "model": base.model.overrides, "seq_len": base.seq_len,
                       "batch_size": base.batch_size, "work_dir": str(work)}
    out["ceap_overhead"] = ceap_overhead(ceap_cfg.model_config())
    mc = ceap_cfg.model_config()  # the same heads at DeepSeek-V3's shape (computed, not trained)
    out["ceap_overhead_deepseek_v3_shape"] = ceap_overhead(preset(
        "deepseek-v3", moe_combiner=mc.moe_combiner, moe_combiner_heads=mc.moe_combiner_heads,
        moe_combiner_head_dim=mc.moe_combiner_head_dim))
    report(out, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


def report(out: dict, a: argparse.Namespace) -> None:
    d = out["dispatch"]
    print(f"\n| experts (hidden 128, width 64, top-4; {out['threads']} threads) | grouped tok/s (fwd+bwd, 2048 tok) "
          "| per-expert loop tok/s | grouped / loop | grouped time per token vs 8 experts "
          "| decode 1 token: grouped tok/s | loop tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for e, r in d.items():
        t, dec = r["train_2048"], r["decode_1"]
        per_token = d[8]["train_2048"]["grouped_tok_s"] / t["grouped_tok_s"]
        print(f"| {e} | {t['grouped_tok_s']:.0f} | {t['loop_tok_s']:.0f} | {t['grouped_over_loop']:.2f}x "
              f"| {per_token:.2f}x ({e // 8}x experts) | {dec['grouped_tok_s']:.0f} | {dec['loop_tok_s']:.0f} "
              f"| {dec['grouped_over_loop']:.2f}x |")
    r, s = out["runs"], out["settings"]
    n = a.last
    print(f"\n| {a.steps} steps x {s['batch_size']}x{s['seq_len']} tokens | MaxVio batch final | mean last {n} logged "
          "| mean all | MaxVio global (val set, per layer) | val loss | tokens/s | pairs dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"none": "(a) no balancing", "aux_loss": f"(b) aux loss, alpha {s['alpha']}",
              "bias_deepseek": f"(c) bias balancing, gamma {DEEPSEEK_GAMMA} (DeepSeek-V3's)",
              "bias": f"(c') bias balancing, gamma {s['gamma']} (the recipe's)",
              "bias_capacity": f"(d) = (c') + capacity factor {a.capacity}"}
    for key, label in labels.items():
        x = r[key]
        glob = " / ".join(f"{v:.2f}" for v in x["maxvio_global"])
        print(f"| {label} | {x['maxvio_final']:.2f} | {x[f'maxvio_last{n}']:.2f} | {x['maxvio_mean']:.2f} "
              f"| {glob} | {x['val_loss']:.4f} | {x['tok_s']:.0f} | {x['dropped_frac']:.2%} |")
    print("| DeepSeek anchor (1B MoE, MaxVio_global): aux loss 0.72, loss-free bias 0.04; ppl 9.56 vs 9.50 "
          "| | | | | | | |")
    o = out["ceap_overhead"]
    print("\n| combiner (bias balancing) | steps | tokens | train s | val loss | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, label in (("bias", "weighted sum"), ("ceap", "CEAP, equal tokens"),
                       ("ceap_equal_time", "CEAP, equal wall-clock")):
        x = r[key]
        print(f"| {label} | {x['steps']} | {x['tokens']} | {x['train_s']:.1f} | {x['val_loss']:.4f} "
              f"| {x['tok_s']:.0f} |")
    print(f"\nCEAP overhead: +{o['params_added']} parameters (+{o['params_added_frac']:.2%} total, "
          f"+{o['active_params_added_frac']:.2%} active); +{o['flops_per_token_per_layer_added']} FLOPs per token "
          f"per MoE layer = +{o['flops_added_frac_of_moe_layer']:.1%} of the layer's "
          f"{o['moe_layer_flops_per_token']} (router + active experts + combine); measured speed "
          f"{r['ceap']['tok_s'] / r['bias']['tok_s']:.2f}x the weighted sum")
    v3 = out["ceap_overhead_deepseek_v3_shape"]
    print(f"At DeepSeek-V3's shape with the same heads (computed): +{v3['params_added_frac']:.3%} parameters, "
          f"+{v3['flops_added_frac_of_moe_layer']:.1%} of a MoE layer's FLOPs per token")


if __name__ == "__main__":
    main()
