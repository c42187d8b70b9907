"""Inference engine figures, one run: batch-1 decode against transformers and the memory-bandwidth limit, and
throughput of a continuous-batching workload, on random-weight checkpoints written by transformers.

    python benchmarks/bench_engine.py [--json out.json] [--parts b1 step workload] [--dtype fp32|bf16] [--threads N]
                                      [--requests 32] [--models qwen2-150m deepseek-v3-moe] [--all]

- Batch-1 decode tokens/s (greedy, a 32-token prompt, timed from the first sampled token to the last) for
  transformers bf16 and r1kit as `R1Model` runs it (the LLMEngine; bf16 with r1kit's CPU decode kernels, int8,
  int4), plus r1kit bf16 through plain F.linear (kernels off) to show what the kernels add. Each is also given as
  a fraction of its bandwidth limit: the measured read bandwidth (large tensor sums, same run) divided by the
  weight bytes one token reads (all weights but the embedding; for MoE layers only the routed experts a token
  uses, k of E, plus the shared ones).
- Step (the dense model, `--dtype`): one batched decode step of the LLMEngine (`ModelRunner.run`: forward and
  greedy sampling) for 32 and 8 requests with 16-256-token contexts and 32 with 16-token ones, with the C decode
  attention over the paged pools (`r1kit.kernels.paged_attention`) and with the torch reference path (contexts
  gathered into a padded batch), runs alternated; beside it the step's linear layers alone (every weight of the
  model applied to that many rows). Also one engine prefill step of a 512-token prompt. Wall ms (median) and
  CPU ms (process time, median), which load on a shared machine disturbs less.
- Workload (the dense model, `--dtype`): `--requests` requests arriving together, prompts of `--prompt-len`
  tokens (default 16-256) and `--new-tokens` each (default 48): r1kit's LLMEngine (continuous batching, paged
  KV) vs transformers one request at a time vs transformers static batches of 8 (left-padded). Greedy; tokens/s
  counts generated tokens only.

`--all` also runs, after these, bench_quant_quality.py (perplexity / accuracy / bytes of int8, int4 and fp8 against
bf16 on the bundled r1kit/nano) and bench_speculative.py (MTP speed-up and acceptance on r1kit/nano), each in its
own process, printing their tables and adding their results under "quality" and "speculative".

`--json` writes every figure keyed by what it measures: decode_b1_tok_s[model][engine],
decode_b1_fraction_of_limit[model][engine], decode_b1_vs_transformers[model][engine], weight_MB_per_token[...],
workload_tok_s[engine], workload_engine_vs[engine], step_ms[case][path] (wall, cpu), prefill_ms[path],
read_bandwidth_GBs (and quality, speculative with --all).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import statistics
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
from r1kit.kernels import paged_attention  # noqa: E402
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def torch_decode_attention():
    """Within: the decode attention of the engine takes the torch reference path (padded gathered contexts)."""
    fast = paged_attention.decode_attention
    paged_attention.decode_attention = lambda *args: None
    try:
        yield
    finally:
        paged_attention.decode_attention = fast


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (process) seconds of each of `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus


def running_engine(model, prompts: list[list[int]]) -> tuple[LLMEngine, object]:
    """An engine whose requests are all prefilled, and its next (pure decode) scheduler step."""
    engine = LLMEngine(model, block_size=16, max_num_seqs=64, max_num_batched_tokens=4096,
                       num_blocks=sum(-(-(len(p) + 64) // 16) for p in prompts) + 8)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=64, temperature=0))
    while engine.scheduler.waiting or any(s.num_tokens <= len(s.prompt_token_ids) for s in engine.scheduler.running):
        engine.step()
    out = engine.scheduler.schedule()
    assert not out.prefills and len(out.decodes) == len(prompts)
    return engine, out


def linear_layers(model, rows: int):
    """A callable applying every linear layer of the model to `rows` rows, as one decode step of that many does."""
    dtype = model.embed_tokens.weight.dtype
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in layers}
    return lambda: [m(xs[m.in_features]) for m in layers]


def time_case(model, prompts: list[list[int]], repeats: int) -> dict[str, tuple[float, float]]:
    """{path: (median wall ms, median CPU ms)} of one decode step of these prompts' requests, with the C decode
    attention ("kernel") and the torch reference ("torch"), alternated, and of its linear layers ("linear")."""
    engine, sched = running_engine(model, prompts)
    step = functools.partial(engine.runner.run, sched)
    fns = {"kernel": step, "torch": step, "linear": linear_layers(model, len(prompts))}
    samples: dict[str, tuple[list, list]] = {k: ([], []) for k in fns}
    for _ in range(repeats):  # alternate the paths so that load changes hit them alike
        for k, fn in fns.items():
            with torch_decode_attention() if k == "torch" else contextlib.nullcontext():
                fn()  # warm-up (new shapes)
                w, c = timed(fn, 3)
            samples[k][0].extend(w)
            samples[k][1].extend(c)
    return {k: (1e3 * statistics.median(w), 1e3 * statistics.median(c)) for k, (w, c) in samples.items()}


def step_times(path: Path, dtype: torch.dtype, rng: random.Random, repeats: int = 5) -> dict[str, dict]:
    """case -> `time_case` figures for batched decode steps of mixed and short contexts, and an engine prefill
    step of a 512-token prompt."""
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    model = load_model(path, "cpu", dtype)
    kernels.accelerate(model)
    cases = {"32 x 16-256": (32, 16, 256), "8 x 16-256": (8, 16, 256), "32 x 16": (32, 16, 16),
             "1 x 128": (1, 128, 128)}  # requests x context lengths
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for case, (n, lo, hi) in cases.items():
            prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
            out[case] = time_case(model, prompts, repeats)
            print(f"  measured decode step {case}", file=sys.stderr)
        prompt = [rng.randrange(2, vocab) for _ in range(512)]

        def prefill():
            LLMEngine(model, block_size=16, num_blocks=40, max_num_batched_tokens=512).generate(
                [prompt], SamplingParams(max_new_tokens=1, temperature=0))

        prefill()
        w, c = timed(prefill, repeats)
        out["prefill 512"] = {"kernel": (1e3 * statistics.median(w), 1e3 * statistics.median(c))}
    return out


def workload(path: Path, dtype: torch.dtype, n_requests: int, prompt_len: tuple[int, int], new_tokens: int,
             rng: random.Random) -> dict:
    """Generated tokens/s of the engine, transformers one request at a time and transformers static batches of 8,
    on the same requests (wall; CPU seconds beside)."""
    import transformers

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    requests = [[rng.randrange(2, vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(n_requests)]
    total_new = new_tokens * n_requests
    model = load_model(path, "cpu", dtype)
    kernels.accelerate(model)
    engine = LLMEngine(model, block_size=16, max_num_seqs=64, max_num_batched_tokens=1024,
                       num_blocks=sum(-(-(len(p) + new_tokens) // 16) for p in requests) + 8)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def r1kit_engine():
        engine.generate(requests, params)

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0)

    def hf_sequential():
        for prompt in requests:
            hf.generate(torch.tensor([prompt]), **kw)

    def hf_static8():
        for i in range(0, len(requests), 8):
            batch = requests[i:i + 8]
            longest = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
            hf.generate(ids, attention_mask=mask, **kw)

    tok_s, cpu_s = {}, {}
    with torch.inference_mode():
        for name, fn in (("r1kit LLMEngine", r1kit_engine), ("transformers sequential", hf_sequential),
                         ("transformers static batches of 8", hf_static8)):
            (wall,), (cpu,) = timed(fn, 1)
            tok_s[name], cpu_s[name] = total_new / wall, cpu
            print(f"  measured {name}", file=sys.stderr)
    return {"requests": n_requests, "new_tokens": total_new, "tok_s": tok_s, "cpu_s": cpu_s}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", nargs="*", default=["b1", "step", "workload"], choices=["b1", "step", "workload"],
                    help="b1: batch-1 decode vs transformers (bf16, both models); step: batched decode step "
                         "times; workload: the continuous-batching workload (the first model)")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="of the step and workload parts "
                    "(fp32: CPUs without AVX-512 bf16 run bf16 matmuls slowly)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--step-repeats", type=int, default=5, help="alternated rounds of 3 timed steps per path")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--models", nargs="*", default=["qwen2-150m", "deepseek-v3-moe"], choices=list(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="also the quantization quality and speculative benchmarks")
    return ap.parse_args()


def run_b1(out: dict, paths: dict[str, Path], rng: random.Random) -> None:
    bw = out["read_bandwidth_GBs"] * 1e9
    for key in ("decode_b1_tok_s", "decode_b1_fraction_of_limit", "decode_b1_vs_transformers", "weight_MB_per_token"):
        out[key] = {}
    for name, path in paths.items():
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        rows = decode_rows(path, [rng.randrange(2, vocab) for _ in range(32)])
        base = rows["transformers bf16"][0]
        out["decode_b1_tok_s"][name] = {k: v for k, (v, _) in rows.items()}
        out["weight_MB_per_token"][name] = {k: b / 1e6 for k, (_, b) in rows.items()}
        out["decode_b1_fraction_of_limit"][name] = {k: v * b / bw for k, (v, b) in rows.items()}
        out["decode_b1_vs_transformers"][name] = {k: v / base for k, (v, _) in rows.items()}


def print_b1(out: dict) -> None:
    bw = out["read_bandwidth_GBs"] * 1e9
    print("| model | batch-1 decode | tok/s | MB read / token | bandwidth limit tok/s | fraction | vs transformers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in out["decode_b1_tok_s"]:
        for k, v in out["decode_b1_tok_s"][name].items():
            mb = out["weight_MB_per_token"][name][k]
            print(f"| {name} | {k} | {v:.1f} | {mb:.0f} | {bw / (mb * 1e6):.0f} | "
                  f"{out['decode_b1_fraction_of_limit'][name][k]:.0%} | "
                  f"{out['decode_b1_vs_transformers'][name][k]:.2f}x |")


def print_steps(out: dict) -> None:
    print(f"\n| {out['step_model']} {out['dtype']}: engine step, ms wall / CPU | C decode attention | torch path "
          "(padded gather) | linear layers alone | step / linear (CPU) |\n|---|---:|---:|---:|---:|")
    for case, t in out["step_ms"].items():
        if "torch" in t:
            print(f"| decode {case} | {t['kernel'][0]:.1f} / {t['kernel'][1]:.1f} | {t['torch'][0]:.1f} / "
                  f"{t['torch'][1]:.1f} | {t['linear'][0]:.1f} / {t['linear'][1]:.1f} | "
                  f"{t['kernel'][1] / t['linear'][1]:.2f}x |")
        else:
            print(f"| {case} | {t['kernel'][0]:.1f} / {t['kernel'][1]:.1f} | | | |")


def print_workload(out: dict, a: argparse.Namespace) -> None:
    print(f"\n| {out['workload_model']} {out['dtype']}: {out['workload_requests']} requests, prompts "
          f"{a.prompt_len[0]}-{a.prompt_len[1]}, {out['workload_new_tokens']} new tokens | tok/s | CPU s | "
          "r1kit engine / this |\n|---|---:|---:|---:|")
    for k, v in out["workload_tok_s"].items():
        print(f"| {k} | {v:.1f} | {out['workload_cpu_s'][k]:.1f} | {out['workload_engine_vs'][k]:.2f}x |")


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import bench_decode

    bench_decode.MODELS.update(MODELS)
    out: dict = {"read_bandwidth_GBs": read_bandwidth() / 1e9, "threads": torch.get_num_threads(),
                 "kernels": kernels.why_not() or "on", "paged_attention_kernel": paged_attention.why_not() or "on",
                 "dtype": a.dtype}
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: make_checkpoint(name, Path(tmp)) for name in a.models}
        if "b1" in a.parts:
            run_b1(out, paths, rng)
        if "step" in a.parts:
            out["step_model"] = a.models[0]
            out["step_ms"] = step_times(paths[a.models[0]], DTYPES[a.dtype], rng, a.step_repeats)
        if "workload" in a.parts and a.requests:
            w = workload(paths[a.models[0]], DTYPES[a.dtype], a.requests, tuple(a.prompt_len), a.new_tokens, rng)
            out["workload_model"] = a.models[0]
            out["workload_requests"], out["workload_new_tokens"] = w["requests"], w["new_tokens"]
            out["workload_tok_s"], out["workload_cpu_s"] = w["tok_s"], w["cpu_s"]
            out["workload_engine_vs"] = {k: w["tok_s"]["r1kit LLMEngine"] / v for k, v in w["tok_s"].items()}

    print(f"\nread bandwidth {out['read_bandwidth_GBs']:.1f} GB/s; CPU, {out['threads']} threads; "
          f"r1kit GEMV kernels: {out['kernels']}; paged decode attention kernel: {out['paged_attention_kernel']}\n")
    if "decode_b1_tok_s" in out:
        print_b1(out)
    if "step_ms" in out:
        print_steps(out)
    if "workload_tok_s" in out:
        print_workload(out, a)
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
