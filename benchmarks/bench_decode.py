"""Decode and prefill speed, r1kit vs transformers, on the same checkpoints, in one run.

    python benchmarks/bench_decode.py [--json out.json] [--new-tokens 64] [--quick]

Two random-weight checkpoints are written with `transformers.save_pretrained`: a ~150M-parameter
Qwen2-shaped dense model and a tiny DeepseekV3 MoE (MLA + routed/shared experts). Each (engine, model)
pair runs in its own subprocess, so the peak memory (max RSS) is that pair's alone. Decode tokens/s is
timed from the first to the last sampled token of an N-token greedy generation (a per-step clock: a
logits processor in transformers, the token stream in r1kit), so prefill is excluded; prefill tokens/s
is one forward over 1024 tokens. Times are the best of
`--repeats` runs. All in bf16 on CPU unless --dtype says otherwise. r1kit runs as `R1Model.from_pretrained`
sets it up: its CPU decode kernels (`r1kit.kernels`) on the linear layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    "qwen2-150m": dict(kind="qwen2", vocab_size=50000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096),
    "deepseek-v3-tiny-moe": dict(kind="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                 moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
                                 num_key_value_heads=8, n_routed_experts=16, n_shared_experts=1,
                                 num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                                 q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                 v_head_dim=64, max_position_embeddings=4096),
}


def make_checkpoint(name: str, root: Path) -> Path:
    import transformers

    spec = dict(MODELS[name])
    kind = spec.pop("kind")
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**spec, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1))
    path = root / name
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------- workers


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def worker(engine: str, path: str, dtype: torch.dtype, new_tokens: int, prefill_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    stamps: list[float] = []
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(2, vocab, (8, 32))
    long_prompt = torch.randint(2, vocab, (1, prefill_len))
    if engine == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

        class Clock(transformers.LogitsProcessor):  # called once per step, right after the forward
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        def gen(batch: int, n: int) -> None:
            with torch.inference_mode():
                model.generate(prompt[:batch], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt[:batch]),
                               logits_processor=transformers.LogitsProcessorList([Clock()]))

        def prefill() -> None:
            with torch.inference_mode():
                model(long_prompt, logits_to_keep=1)
    else:
        from r1kit import kernels
        from r1kit.checkpoint import load_model
        from r1kit.generate import SamplingParams, generate_tokens

        model = load_model(path, "cpu", dtype)
        kernels.accelerate(model)  # as R1Model.from_pretrained does on CPU (no-op where they can't run)

        def gen(batch: int, n: int) -> None:
            params = SamplingParams(max_new_tokens=n, temperature=0)
            for _ in generate_tokens(model, prompt[:batch].tolist(), params):  # yields right after each step
                stamps.append(time.perf_counter())

        def prefill() -> None:
            with torch.inference_mode():
                model(long_prompt, last_only=True)

    out = {}
    for batch in (1, 8):
        gen(batch, 4)  # warm-up
        best = float("inf")
        for _ in range(repeats):  # decode time = from the first sampled token to the last one
            stamps.clear()
            gen(batch, new_tokens)
            best = min(best, stamps[-1] - stamps[0])
        out[f"decode_b{batch}_tok_s"] = batch * (len(stamps) - 1) / best
    prefill()
    out["prefill_tok_s"] = prefill_len / _best(prefill, repeats)
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    if a.worker:
        print(json.dumps(worker(*a.worker, dtype, a.new_tokens, a.prefill, a.repeats)))
        return

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            path = make_checkpoint(name, Path(tmp))
            results[name] = {}
            for engine in ("transformers", "r1kit"):
                cmd = [sys.executable, __file__, "--worker", engine, str(path), "--dtype", a.dtype,
                       "--new-tokens", str(a.new_tokens), "--prefill", str(a.prefill), "--repeats", str(a.repeats)]
                env = {**os.environ, "PYTHONWARNINGS": "ignore"}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{engine} on {name} failed:\n{done.stderr[-3000:]}")
                results[name][engine] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  measured {engine:12s} on {name}", file=sys.stderr)

    metrics = [("decode_b1_tok_s", "decode tok/s, batch 1"), ("decode_b8_tok_s", "decode tok/s, batch 8"),
               ("prefill_tok_s", f"prefill tok/s at {a.prefill}"), ("peak_rss_MiB", "peak RSS MiB")]
    print(f"\n{a.dtype} on CPU ({torch.get_num_threads()} threads), greedy, {a.new_tokens} new tokens\n")
    print("| model | metric | transformers | r1kit | r1kit / transformers |\n|---|---|---:|---:|---:|")
    for name, res in results.items():
        for key, label in metrics:
            hf, r1 = res["transformers"][key], res["r1kit"][key]
            print(f"| {name} | {label} | {hf:.1f} | {r1:.1f} | {r1 / hf:.2f}x |")
            res.setdefault("ratio", {})[key] = r1 / hf
    if a.json:
        a.json.write_text(json.dumps({"dtype": a.dtype, "new_tokens": a.new_tokens, "results": results}, indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
