"""Long context: dense attention vs local-global vs top-k block sparse attention, measured in one run.

    python benchmarks/bench_long_context.py [--json out.json] [--contexts 1024,4096,8192,16384] [--quality]
                                            [--no-speed]

- Speed: the same small GQA model (only the attention pattern differs; local_global adds its importance
  scorer and global tokens) at each context length: prefill tokens/s of the whole context in one forward,
  then the decode time per token of the next --decode tokens with the KV cache (median wall time; the
  median thread CPU time beside it, which other processes on a shared machine disturb less). The sparse
  target: decode ms/token at the longest context <= 1.15x that at the shortest; dense's ratio beside it.
- Quality (--quality): (a) passkey (needle) retrieval: a tiny 2-layer model trained briefly on a synthetic
  task, random filler with "KEY d" (d one of 10 digit tokens that the filler never uses) in the first half,
  then "QUERY" last, answer d: the needle is further back than the sparse block and window, so only the
  global tokens (local_global) or the block selection (topk) can reach it. Accuracy (chance 0.1) on fresh
  sequences at the trained length and at twice it. (b) validation loss after the same short training run
  of configs/sparse.yaml with dense, local_global and topk attention (same data, seed and steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from r1kit.model.config import preset
from r1kit.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("dense", "local_global", "topk")
SPARSE = dict(sparse_block_size=64, sparse_window_base=64, sparse_window_max=256, sparse_global_tokens=4,
              sparse_importance="key", sparse_topk_blocks=4)


def bench_model(variant: str, max_len: int, dtype: torch.dtype) -> Transformer:
    """4 layers, hidden 256, 4 query heads over 2 kv heads of 64 channels; the pattern is the only difference."""
    sparse = {} if variant == "dense" else dict(SPARSE, sparse_attention=variant)
    cfg = preset("tiny-dense", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                 intermediate_size=768, max_position_embeddings=max_len, **sparse)
    return Transformer(cfg).init_weights(0).to(dtype).eval()


@torch.inference_mode()
def speed(variant: str, context: int, n_decode: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """(prefill tokens/s of `context` tokens, decode ms per token after them: wall, thread CPU)."""
    model = bench_model(variant, context + n_decode + 4, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context + n_decode + 2), generator=gen)
    cache = model.new_cache(1, context + n_decode + 2)
    t = time.perf_counter()
    model(ids[:, :context], cache, last_only=True)
    prefill = context / (time.perf_counter() - t)
    wall, cpu = [], []
    for i in range(context, context + n_decode + 2):
        t, c = time.perf_counter(), time.thread_time()
        model(ids[:, i:i + 1], cache, last_only=True)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return prefill, 1e3 * statistics.median(wall[2:]), 1e3 * statistics.median(cpu[2:])  # 2 warm-up steps


# ---------------------------------------------------------------------------------------------------- quality


def lm_quality(steps: int) -> dict[str, dict[str, float]]:
    """configs/sparse.yaml trained with each attention pattern: final validation loss and tokens/s."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    out: dict[str, dict[str, float]] = {}
    base = TrainConfig.from_yaml(ROOT / "configs" / "sparse.yaml").to_dict()
    for variant in VARIANTS:
        d = json.loads(json.dumps(base))
        d["model"]["overrides"]["sparse_attention"] = None if variant == "dense" else variant
        d["max_steps"] = steps
        d["eval_interval"] = steps
        d["checkpoint_interval"] = steps
        with tempfile.TemporaryDirectory() as tmp:
            d["out_dir"] = tmp
            summary = train(TrainConfig.from_dict(d), progress=False)
            vals = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in vals if "val_loss" in r][-1]
        out[variant] = {"val_loss": val, "tok_s": summary["tok_s"], "steps": steps}
        print(f"  lm {variant:12s} val_loss {val:.4f}  {summary['tok_s']:.0f} tok/s")
    return out


KEY, QUERY, DIGIT0, FILLER0, PASSKEY_VOCAB = 1, 2, 3, 13, 64  # digits 3..12, filler 13..63


def passkey_batch(batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of `length` tokens: random filler, "KEY d" in the first half, "QUERY" last.
    Returns ids (batch, length) and the passkey digit ids (batch,)."""
    ids = torch.randint(FILLER0, PASSKEY_VOCAB, (batch, length), generator=gen)
    digit = torch.randint(DIGIT0, DIGIT0 + 10, (batch,), generator=gen)
    where = torch.randint(0, length // 2, (batch,), generator=gen)
    rows = torch.arange(batch)
    ids[rows, where] = KEY
    ids[rows, where + 1] = digit
    ids[:, -1] = QUERY
    return ids, digit


def passkey_model(variant: str, length: int) -> Transformer:
    sparse = {} if variant == "dense" else dict(sparse_attention=variant, sparse_block_size=16,
                                                 sparse_window_base=16, sparse_window_max=32,
                                                 sparse_global_tokens=4, sparse_topk_blocks=2)
    cfg = preset("tiny-dense", vocab_size=PASSKEY_VOCAB, hidden_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, intermediate_size=256, max_position_embeddings=2 * length, **sparse)
    return Transformer(cfg).init_weights(0)


def passkey(variant: str, length: int, steps: int, batch: int = 32) -> dict[str, float]:
    """Train on the passkey task (loss on the answer only), then accuracy on 256 fresh sequences per length."""
    torch.manual_seed(0)
    model = passkey_model(variant, length).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        ids, digit = passkey_batch(batch, length, gen)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(ids, last_only=True)[:, -1]
        loss = F.cross_entropy(logits.float(), digit)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"    passkey {variant} step {step + 1}: loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    out = {"train_s": train_s, "final_loss": loss.item()}
    test_gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for n in (length, 2 * length):
            right = 0
            for _ in range(4):
                ids, digit = passkey_batch(64, n, test_gen)
                right += int((model(ids, last_only=True)[:, -1].argmax(-1) == digit).sum())
            out[f"acc_{n}"] = right / 256
    print(f"  passkey {variant:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def speed_table(contexts: list[int], n_decode: int, dtype: torch.dtype, threads: int) -> dict:
    """Measure every variant at every context; print the tables; return the JSON sections."""
    keys = ("prefill_tokens_per_s", "decode_ms_per_token", "decode_cpu_ms_per_token")
    res: dict = {key: {v: {} for v in VARIANTS} for key in keys}
    for ctx in contexts:
        for variant in VARIANTS:
            figures = speed(variant, ctx, n_decode, dtype)
            for key, value in zip(keys, figures, strict=True):
                res[key][variant][str(ctx)] = value
            print(f"  {variant:12s} ctx {ctx:6d}: prefill {figures[0]:7.0f} tok/s, decode {figures[1]:7.2f} ms/token "
                  f"({figures[2]:.2f} ms CPU)", flush=True)
    lo, hi = str(contexts[0]), str(contexts[-1])
    for key, what in (("decode_ms_per_token", "wall"), ("decode_cpu_ms_per_token", "thread CPU")):
        d = res[key]
        print(f"\ndecode ms/token, {what} ({dtype}, {threads} thread(s))")
        print(f"{'context':>8s}" + "".join(f"{v:>14s}" for v in VARIANTS)
              + "".join(f"{v + '/dense':>20s}" for v in VARIANTS[1:]))
        for ctx in map(str, contexts):
            print(f"{ctx:>8s}" + "".join(f"{d[v][ctx]:14.2f}" for v in VARIANTS)
                  + "".join(f"{d[v][ctx] / d['dense'][ctx]:20.2f}" for v in VARIANTS[1:]))
        growth = {v: d[v][hi] / d[v][lo] for v in VARIANTS}
        res.setdefault("decode_growth", {})[what] = {"from": lo, "to": hi, **growth, "target_sparse_max": 1.15}
        print(f"decode time at {hi} / at {lo}: " + ", ".join(f"{v} {g:.2f}x" for v, g in growth.items())
              + "  (target for the sparse paths: <= 1.15x)")
    print(f"\nprefill tokens/s\n{'context':>8s}" + "".join(f"{v:>14s}" for v in VARIANTS))
    for ctx in map(str, contexts):
        print(f"{ctx:>8s}" + "".join(f"{res['prefill_tokens_per_s'][v][ctx]:14.0f}" for v in VARIANTS))
    return res


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--contexts", default="1024,4096,8192,16384")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per context (median)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1, help="1: decode steps are tiny ops, and spinning "
                    "OpenMP workers on a shared machine slow them many-fold")
    ap.add_argument("--quality", action="store_true", help="also the training runs (several minutes)")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    ap.add_argument("--lm-steps", type=int, default=150)
    ap.add_argument("--passkey-length", type=int, default=128)
    ap.add_argument("--passkey-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]
    res: dict = {"setup": {"dtype": args.dtype, "threads": args.threads, "decode_steps": args.decode,
                           "model": "GQA, 4 layers, hidden 256, 4 heads / 2 kv heads x 64", **SPARSE}}
    if args.quality:  # first: the training runs change the thread count back (configs/sparse.yaml: threads)
        print("quality (training runs)")
        res["passkey"] = {v: passkey(v, args.passkey_length, args.passkey_steps) for v in VARIANTS}
        res["lm_val_loss"] = lm_quality(args.lm_steps)
        torch.set_num_threads(args.threads)
    if not args.no_speed:
        res.update(speed_table(contexts, args.decode, dtype, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
