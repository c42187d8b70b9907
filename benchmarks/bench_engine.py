"""Inference engine figures, one run: batch-1 decode against the memory-bandwidth limit, and throughput of a
continuous-batching workload, r1kit vs transformers on the same random-weight Qwen2-shaped checkpoint.

    python benchmarks/bench_engine.py [--json out.json] [--requests 16]

- Batch-1 decode tokens/s for transformers bf16 and r1kit bf16 / int8 / int4 (the plain KV-cached loop),
  each also as a fraction of its bandwidth limit: measured read bandwidth (a large tensor sum, same run)
  divided by the weight bytes one token reads.
- Workload: `--requests` requests arriving together with random prompt lengths and output budgets:
  r1kit's LLMEngine (continuous batching, paged KV) vs transformers one request at a time vs transformers
  static batches of 8 (left-padded, each batch as long as its longest request). Greedy; tokens/s counts the
  generated tokens only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import make_checkpoint  # noqa: E402  (same checkpoint as the decode benchmark)

from r1kit.checkpoint import load_model  # noqa: E402
from r1kit.engine import LLMEngine  # noqa: E402
from r1kit.generate import SamplingParams, generate_tokens  # noqa: E402
from r1kit.quant import quantize_model  # noqa: E402


def read_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes/s of summing a tensor much larger than the caches (best of 3)."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors one decode step reads (the embedding reads one row: not counted)."""
    tensors = {t.data_ptr(): (n, t) for n, t in model.state_dict().items()}
    return sum(t.numel() * t.element_size() for n, t in tensors.values() if "embed_tokens" not in n)


def decode_tok_s(step_fn, n: int = 48) -> float:
    stamps: list[float] = []
    for _ in step_fn(n):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def r1kit_decode(model, prompt: list[int]):
    def run(n: int):
        return generate_tokens(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0))
    return run


def time_hf_decode(model, prompt: list[int], n: int = 48) -> float:
    import transformers

    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0, logits_processor=transformers.LogitsProcessorList([Clock()]))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import transformers

    out: dict = {"read_bandwidth_GBs": read_bandwidth() / 1e9}
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint("qwen2-150m", Path(tmp))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        vocab = hf.config.vocab_size
        prompt = [rng.randrange(2, vocab) for _ in range(32)]

        decode = {}
        hf_bytes = weight_bytes(hf)
        decode["transformers bf16"] = (time_hf_decode(hf, prompt), hf_bytes)
        for method in (None, "int8", "int4"):
            model = load_model(path, "cpu", torch.bfloat16)
            if method:
                quantize_model(model, method)
            name = f"r1kit {method or 'bf16'}"
            with torch.inference_mode():
                decode_tok_s(r1kit_decode(model, prompt), 8)  # warm-up (int4 packs its weights on first use)
                decode[name] = (decode_tok_s(r1kit_decode(model, prompt)), weight_bytes(model))
            print(f"  measured {name}", file=sys.stderr)
        bw = out["read_bandwidth_GBs"] * 1e9
        out["decode_b1"] = {k: {"tok_s": v, "weight_MB": b / 1e6, "limit_tok_s": bw / b,
                                "fraction_of_limit": v * b / bw} for k, (v, b) in decode.items()}

        requests = [([rng.randrange(2, vocab) for _ in range(rng.randint(32, 256))], rng.randint(16, 64))
                    for _ in range(a.requests)]
        total_new = sum(n for _, n in requests)
        model = load_model(path, "cpu", torch.bfloat16)
        engine = LLMEngine(model, block_size=16, max_num_seqs=a.requests, max_num_batched_tokens=1024,
                           num_blocks=sum(-(-(len(p) + n) // 16) for p, n in requests) + 8)
        t = time.perf_counter()
        with torch.inference_mode():
            engine.generate([p for p, _ in requests], [SamplingParams(max_new_tokens=n, temperature=0)
                                                       for _, n in requests])
        workload = {"r1kit LLMEngine": total_new / (time.perf_counter() - t)}
        t = time.perf_counter()
        with torch.inference_mode():
            for p, n in requests:
                hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        workload["transformers sequential"] = total_new / (time.perf_counter() - t)
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
        workload["transformers static batches of 8"] = total_new / (time.perf_counter() - t)
        out["workload"] = {"requests": a.requests, "new_tokens": total_new, "tok_s": workload}

    threads = torch.get_num_threads()
    print(f"\nread bandwidth {out['read_bandwidth_GBs']:.1f} GB/s; qwen2-150m, CPU, {threads} threads\n")
    print("| batch-1 decode | tok/s | weights read (MB) | bandwidth limit tok/s | fraction | vs transformers |")
    print("|---|---:|---:|---:|---:|---:|")
    base = out["decode_b1"]["transformers bf16"]["tok_s"]
    for k, v in out["decode_b1"].items():
        print(f"| {k} | {v['tok_s']:.1f} | {v['weight_MB']:.0f} | {v['limit_tok_s']:.0f} | "
              f"{v['fraction_of_limit']:.0%} | {v['tok_s'] / base:.2f}x |")
    w = out["workload"]
    print(f"\n| {w['requests']} requests, {w['new_tokens']} new tokens | tok/s | r1kit engine / this |")
    print("|---|---:|---:|")
    for k, v in w["tok_s"].items():
        print(f"| {k} | {v:.1f} | {w['tok_s']['r1kit LLMEngine'] / v:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
