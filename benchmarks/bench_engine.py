"""Inference engine figures, one run: batch-1 decode against transformers and the memory-bandwidth limit, and
throughput of a continuous-batching workload, on random-weight checkpoints written by transformers.

    python benchmarks/bench_engine.py [--json out.json] [--requests 64] [--models qwen2-150m deepseek-v3-moe] [--all]

- Batch-1 decode tokens/s (greedy, a 32-token prompt, timed from the first sampled token to the last) for
  transformers bf16 and r1kit as `R1Model` runs it (the LLMEngine; bf16 with r1kit's CPU decode kernels, int8,
  int4), plus r1kit bf16 through plain F.linear (kernels off) to show what the kernels add. Each is also given as
  a fraction of its bandwidth limit: the measured read bandwidth (large tensor sums, same run) divided by the
  weight bytes one token reads (all weights but the embedding; for MoE layers only the routed experts a token
  uses, k of E, plus the shared ones).
- Workload (the dense model): `--requests` requests arriving together, prompts of 32-512 tokens and budgets of
  16-256 new tokens: r1kit's LLMEngine (continuous batching, paged KV, kernels on) vs transformers one request at
  a time vs transformers static batches of 8 (left-padded, each batch as long as its longest request). Greedy;
  tokens/s counts generated tokens only.

`--all` also runs, after these, bench_quant_quality.py (perplexity / accuracy / bytes of int8, int4 and fp8 against
bf16 on the bundled r1kit/nano) and bench_speculative.py (MTP speed-up and acceptance on r1kit/nano), each in its
own process, printing their tables and adding their results under "quality" and "speculative".

`--json` writes every figure keyed by what it measures: decode_b1_tok_s[model][engine],
decode_b1_fraction_of_limit[model][engine], decode_b1_vs_transformers[model][engine], weight_MB_per_token[...],
workload_tok_s[engine], workload_engine_vs[engine], read_bandwidth_GBs (and quality, speculative with --all).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import MODELS, make_checkpoint  # noqa: E402  (same checkpoints as the decode benchmark)

from r1kit import kernels  # noqa: E402
from r1kit.checkpoint import load_model  # noqa: E402
from r1kit.engine import LLMEngine  # noqa: E402
from r1kit.generate import SamplingParams  # noqa: E402
from r1kit.model.moe import Experts  # noqa: E402
from r1kit.quant import quantize_model  # noqa: E402

# a DeepSeek-V3-shaped MoE whose active size per token is close to the dense model's (~110M read per token)
MODELS = {**MODELS, "deepseek-v3-moe": dict(
    kind="deepseek_v3", vocab_size=50000, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
    num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=12, n_routed_experts=32, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096)}


def read_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes/s of reading tensors much larger than the caches: the fastest of fp32, bf16 and int64 sums (best of 5
    each, after a first touch), i.e. the read bandwidth this CPU's threads can reach, not one op's."""
    best = float("inf")
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = torch.ones(n_bytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        x.sum()
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        del x
    return n_bytes / best


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of the tensors one batch-1 decode step reads: all but the embedding (one row), and of each routed
    expert stack only the k of E experts the token uses."""
    total, seen = 0, set()
    for name, t in model.state_dict().items():
        if "embed_tokens" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    cfg = model.config
    for m in model.modules():
        if isinstance(m, Experts) or type(m).__name__ == "QuantizedExperts":
            stack = sum(t.numel() * t.element_size() for t in m.state_dict().values())
            total -= stack * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    return int(total)


def engine_decode_tok_s(model, prompt: list[int], n: int = 48) -> float:
    """Batch-1 decode on the LLMEngine, as R1Model.generate runs it (best of 2 after a warm-up)."""
    engine = LLMEngine(model, block_size=16, num_blocks=-(-(len(prompt) + n) // 16) + 1)
    best = 0.0
    for i, steps in enumerate((8, n, n)):
        stamps: list[float] = []
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=steps, temperature=0))
        with torch.inference_mode():
            while engine.has_unfinished():
                if engine.step():
                    stamps.append(time.perf_counter())
        if i:
            best = max(best, (len(stamps) - 2) / (stamps[-1] - stamps[1]))  # stamps[0] is the prefill step
    return best


def hf_decode_tok_s(model, prompt: list[int], n: int = 48) -> float:
    import transformers

    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    best = 0.0
    for steps in (8, n, n):
        stamps.clear()
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0,
                           logits_processor=transformers.LogitsProcessorList([Clock()]))
        if steps == n:
            best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def decode_rows(path: Path, prompt: list[int]) -> dict[str, tuple[float, int]]:
    """engine name -> (batch-1 tok/s, weight bytes read per token)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    bf16_bytes = bytes_per_token(load_model(path, "cpu", torch.bfloat16))  # the same architecture and dtype
    rows = {"transformers bf16": (hf_decode_tok_s(hf, prompt), bf16_bytes)}
    del hf
    for name, method, fast in (("r1kit bf16", None, True), ("r1kit bf16, F.linear", None, False),
                               ("r1kit int8", "int8", True), ("r1kit int4", "int4", True)):
        model = load_model(path, "cpu", torch.bfloat16)
        if method:
            quantize_model(model, method)
        if fast:
            kernels.accelerate(model)
        rows[name] = (engine_decode_tok_s(model, prompt), bytes_per_token(model))
        print(f"  measured {name}", file=sys.stderr)
    return rows


def workload(path: Path, n_requests: int, rng: random.Random) -> dict[str, float]:
    import transformers

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    requests = [([rng.randrange(2, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
                for _ in range(n_requests)]
    total_new = sum(n for _, n in requests)
    out = {"requests": n_requests, "new_tokens": total_new}
    model = load_model(path, "cpu", torch.bfloat16)
    kernels.accelerate(model)
    engine = LLMEngine(model, block_size=16, max_num_seqs=64, max_num_batched_tokens=1024,
                       num_blocks=sum(-(-(len(p) + n) // 16) for p, n in requests) + 8)
    t = time.perf_counter()
    with torch.inference_mode():
        engine.generate([p for p, _ in requests], [SamplingParams(max_new_tokens=n, temperature=0)
                                                   for _, n in requests])
    tok_s = {"r1kit LLMEngine": total_new / (time.perf_counter() - t)}
    print("  measured r1kit LLMEngine workload", file=sys.stderr)
    del engine, model
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for p, n in requests:
            hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    tok_s["transformers sequential"] = total_new / (time.perf_counter() - t)
    print("  measured transformers sequential", file=sys.stderr)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), 8):
            batch = requests[i:i + 8]
            longest = max(len(p) for p, _ in batch)
            ids = torch.tensor([[0] * (longest - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p, _ in batch])
            n = max(n for _, n in batch)
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    tok_s["transformers static batches of 8"] = total_new / (time.perf_counter() - t)
    out["tok_s"] = tok_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--models", nargs="*", default=["qwen2-150m", "deepseek-v3-moe"], choices=list(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="also the quantization quality and speculative benchmarks")
    a = ap.parse_args()
    import bench_decode

    bench_decode.MODELS.update(MODELS)
    out: dict = {"read_bandwidth_GBs": read_bandwidth() / 1e9, "threads": torch.get_num_threads(),
                 "kernels": kernels.why_not() or "on"}
    bw = out["read_bandwidth_GBs"] * 1e9
    rng = random.Random(a.seed)
    for key in ("decode_b1_tok_s", "decode_b1_fraction_of_limit", "decode_b1_vs_transformers", "weight_MB_per_token"):
        out[key] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: make_checkpoint(name, Path(tmp)) for name in a.models}
        for name, path in paths.items():
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            rows = decode_rows(path, [rng.randrange(2, vocab) for _ in range(32)])
            base = rows["transformers bf16"][0]
            out["decode_b1_tok_s"][name] = {k: v for k, (v, _) in rows.items()}
            out["weight_MB_per_token"][name] = {k: b / 1e6 for k, (_, b) in rows.items()}
            out["decode_b1_fraction_of_limit"][name] = {k: v * b / bw for k, (v, b) in rows.items()}
            out["decode_b1_vs_transformers"][name] = {k: v / base for k, (v, _) in rows.items()}
        if a.requests:
            w = workload(paths[a.models[0]], a.requests, rng)
            out["workload_model"] = a.models[0]
            out["workload_requests"], out["workload_new_tokens"] = w["requests"], w["new_tokens"]
            out["workload_tok_s"] = w["tok_s"]
            out["workload_engine_vs"] = {k: w["tok_s"]["r1kit LLMEngine"] / v for k, v in w["tok_s"].items()}

    print(f"\nread bandwidth {out['read_bandwidth_GBs']:.1f} GB/s; CPU, {out['threads']} threads; "
          f"r1kit kernels: {out['kernels']}\n")
    print("| model | batch-1 decode | tok/s | MB read / token | bandwidth limit tok/s | fraction | vs transformers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in out["decode_b1_tok_s"]:
        for k, v in out["decode_b1_tok_s"][name].items():
            mb = out["weight_MB_per_token"][name][k]
            print(f"| {name} | {k} | {v:.1f} | {mb:.0f} | {bw / (mb * 1e6):.0f} | "
                  f"{out['decode_b1_fraction_of_limit'][name][k]:.0%} | "
                  f"{out['decode_b1_vs_transformers'][name][k]:.2f}x |")
    if "workload_tok_s" in out:
        print(f"\n| {out['workload_model']}: {out['workload_requests']} requests, {out['workload_new_tokens']} new "
              "tokens | tok/s | r1kit engine / this |\n|---|---:|---:|")
        for k, v in out["workload_tok_s"].items():
            print(f"| {k} | {v:.1f} | {out['workload_engine_vs'][k]:.2f}x |")
    if a.all:
        for key, script in (("quality", "bench_quant_quality.py"), ("speculative", "bench_speculative.py")):
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "out.json"
                subprocess.run([sys.executable, str(Path(__file__).with_name(script)), "--json", str(result)],
                               check=True, stderr=subprocess.DEVNULL)  # its table goes to our stdout
                out[key] = json.loads(result.read_text())
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
