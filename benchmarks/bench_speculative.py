"""MTP speculative decoding on the bundled r1kit/nano: tokens/s plain vs speculative, acceptance of the draft.

    python benchmarks/bench_speculative.py [--json out.json] [--n-arith 6] [--n-text 4] [--repeats 2]

Greedy, bf16, batch 1, CPU. Two workloads: held-out arithmetic problems as R1 chat prompts (the data the
model was fine-tuned on; generation ends at the stop id) and windows of held-out standard-library source
(64-token prompt, 64 new tokens). Per prompt, in one run: the plain KV-cached loop (`generate_tokens`), then
`speculative_generate` with 1 draft (nano's one trained MTP depth) and with 2 drafts (the depth reused for
the third token). Each prompt's time is the best of --repeats (the machine is shared); tokens/s is the sum
of generated tokens over the sum of those times, prefill included (same prompt for every method).

What the columns mean:
- accept@j: fraction of draft j accepted (accept@1 is DeepSeek-V3's "second token" acceptance);
- tok/fwd: generated tokens per main-model forward (the speed-up if drafting and a wider verify were free);
- round cost: one draft + verify round in units of one plain decode step (tokens/s speed-up is about
  tok/fwd / round cost). On a model this small each forward is mostly Python and kernel-launch overhead,
  not weight reads, so the MTP block (one of nano's 7 blocks plus the output head) and the 2-3 token verify
  cost more relative to a plain step than on a large bandwidth-bound model;
- identical: prompts whose speculative output equals the plain loop's token for token. Both are exact in
  exact arithmetic (and identical in fp32: tests/test_speculative.py), but in bf16 the 2-3 token verify
  forward rounds differently from a 1-token step, so a near-tie (or an MoE routing decision on the edge) can
  go the other way, as it can between the plain cached loop and a full recompute.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from r1kit import R1Model
from r1kit.engine.speculative import SpeculativeStats, speculative_generate
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.train.data import read_texts, sample_problem, split_files, stdlib_files

DEEPSEEK = {"acceptance_second_token": "85-90%", "tokens_per_s_speedup": 1.8,
            "source": "DeepSeek-V3 technical report, section 5.4.3 (MTP depth 1, 671B model, GPU serving)"}
KINDS = ["add2", "sub2", "add3", "sub3", "mul2x1", "mul2x2"]


def arithmetic_prompts(model: R1Model, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    tok = model._tok()
    return [tok.encode_chat([{"role": "user", "content": sample_problem(rng, KINDS[i % len(KINDS)],
                                                                          split="val").question}])
            for i in range(n)]


def text_prompts(model: R1Model, n: int, length: int = 64, seed: int = 0) -> list[list[int]]:
    """n windows of `length` tokens from held-out standard-library files (one per file)."""
    rng = random.Random(seed)
    tok = model._tok()
    prompts = []
    for text in read_texts(split_files(stdlib_files())[1]):
        ids = tok.encode(text)
        if len(ids) > 4 * length:
            start = rng.randrange(0, len(ids) - 2 * length)
            prompts.append(ids[start:start + length])
        if len(prompts) == n:
            break
    return prompts


def run_plain(model: R1Model, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    t = time.perf_counter()
    out = [step[0] for step in generate_tokens(model.model, [prompt], params, model.stop_ids())]
    return out, time.perf_counter() - t


def run_speculative(model: R1Model, prompt: list[int], params: SamplingParams, num_draft: int,
                    stats: SpeculativeStats) -> tuple[list[int], float]:
    t = time.perf_counter()
    chunks = speculative_generate(model.model, prompt, params, model.stop_ids(), num_draft, stats)
    out = [token for chunk in chunks for token in chunk]
    return out, time.perf_counter() - t


def measure(model: R1Model, prompts: list[list[int]], max_new_tokens: int, repeats: int,
            drafts: list[int]) -> dict[str, dict]:
    """Plain and speculative runs of every prompt, interleaved; best time per prompt over repeats."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    methods = ["plain"] + [f"mtp k={k}" for k in drafts]
    best = {m: [float("inf")] * len(prompts) for m in methods}
    outs: dict[str, list[list[int]]] = {m: [[] for _ in prompts] for m in methods}
    stats = {k: SpeculativeStats() for k in drafts}
    for rep in range(repeats):
        for i, prompt in enumerate(prompts):
            out, sec = run_plain(model, prompt, params)
            best["plain"][i], outs["plain"][i] = min(best["plain"][i], sec), out
            for k in drafts:
                st = stats[k] if rep == 0 else SpeculativeStats()  # count each prompt once
                out, sec = run_speculative(model, prompt, params, k, st)
                name = f"mtp k={k}"
                best[name][i], outs[name][i] = min(best[name][i], sec), out
    plain_tokens = sum(len(o) for o in outs["plain"])
    plain_s = sum(best["plain"])
    result: dict[str, dict] = {"plain": {"tokens": plain_tokens, "seconds": plain_s,
                                         "tokens_per_s": plain_tokens / plain_s}}
    for k in drafts:
        name, st = f"mtp k={k}", stats[k]
        tokens, sec = sum(len(o) for o in outs[name]), sum(best[name])
        result[name] = {
            "tokens": tokens, "seconds": sec, "tokens_per_s": tokens / sec,
            "speedup": (tokens / sec) / (plain_tokens / plain_s),
            "acceptance_at": st.acceptance_at(), "acceptance_rate": st.acceptance_rate,
            "tokens_per_target_forward": st.tokens / st.target_forwards,
            "round_cost_in_plain_steps": (sec / st.rounds) / (plain_s / plain_tokens),
            "identical_to_plain": sum(a == b for a, b in zip(outs[name], outs["plain"], strict=True)),
            "prompts": len(prompts), "stats": st.as_dict(),
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--n-arith", type=int, default=6, help="held-out arithmetic prompts (kinds cycled)")
    ap.add_argument("--n-text", type=int, default=4, help="held-out stdlib windows")
    ap.add_argument("--repeats", type=int, default=2, help="runs per prompt and method; the best time counts")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="bf16")
    drafts = [1, 2]
    workloads = {
        "arithmetic chat (held-out, up to 256 new)": (arithmetic_prompts(model, args.n_arith), 256),
        "stdlib text (held-out, 64 new)": (text_prompts(model, args.n_text), 64),
    }
    t0 = time.perf_counter()
    warmup = SamplingParams(max_new_tokens=8, temperature=0)
    list(generate_tokens(model.model, [[5, 6, 7]], warmup))
    list(speculative_generate(model.model, [5, 6, 7], warmup))
    results = {name: measure(model, prompts, n_new, args.repeats, drafts)
               for name, (prompts, n_new) in workloads.items()}

    print(f"r1kit/nano ({model.model.num_params() / 1e6:.1f}M params), bf16, CPU, {args.threads} thread(s), "
          f"greedy, batch 1; best of {args.repeats} per prompt")
    head = (f"{'workload':<42} {'method':<9} {'tokens':>6} {'tok/s':>7} {'speed-up':>8} {'accept@1':>8} "
            f"{'accept@2':>8} {'tok/fwd':>7} {'round cost':>10} {'identical':>9}")
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        for method, r in res.items():
            acc = r.get("acceptance_at", [])
            cells = [f"{a:.1%}" for a in acc] + [""] * (2 - len(acc))
            print(f"{name:<42} {method:<9} {r['tokens']:>6} {r['tokens_per_s']:>7.1f} "
                  f"{r.get('speedup', 1.0):>7.2f}x {cells[0]:>8} {cells[1]:>8} "
                  f"{r.get('tokens_per_target_forward', 1.0):>7.2f} {r.get('round_cost_in_plain_steps', 1.0):>10.2f} "
                  f"{str(r['identical_to_plain']) + '/' + str(r['prompts']) if 'prompts' in r else '':>9}")
    print(f"{'DeepSeek-V3 reported (671B, GPU)':<42} {'MTP k=1':<9} {'':>6} {'':>7} "
          f"{DEEPSEEK['tokens_per_s_speedup']:>7.2f}x {DEEPSEEK['acceptance_second_token']:>8}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "r1kit/nano", "dtype": "bf16", "device": "cpu", "threads": args.threads,
                       "batch": 1, "greedy": True, "repeats": args.repeats, "workloads": results,
                       "deepseek_v3_reported": DEEPSEEK}, f, indent=2)


if __name__ == "__main__":
    main()
