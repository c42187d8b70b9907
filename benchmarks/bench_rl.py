"""RL throughput: rollouts through r1kit's engine against the plain KV-cache generate loop, and the GRPO step.

    python benchmarks/bench_rl.py --json runs/bench_rl.json [--model r1kit/nano] [--prompts 16] [--generations 8]

The same prompts (training arithmetic problems, each repeated --generations times as a GRPO group) are sampled at
temperature 1 by (a) `LLMEngine` as `r1kit rl` runs it (continuous batching, paged KV, the group sharing its
prompt's blocks) and (b) `r1kit.generate.generate_tokens`, the plain batched loop over a contiguous KV cache
(every row decodes until the longest finishes). Then one GRPO optimizer step (forward, backward, AdamW) on those
completions is timed. Prints one table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from r1kit.generate import SamplingParams, generate_tokens
from r1kit.train.grpo import group_advantages, load_policy, micro_batches, optimize
from r1kit.train.rewards import PromptSource, accuracy_reward
from r1kit.train.rl_config import GRPOConfig
from r1kit.train.rollout import Rollout, generate_rollouts


def plain_loop(policy, prompt_ids: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """Tokens generated and seconds for the plain KV-cache loop (stop ids end a row, as in the engine)."""
    t0 = time.perf_counter()
    count = 0
    with torch.inference_mode():
        for step in generate_tokens(policy.model.eval(), prompt_ids, params, policy.stop_ids):
            count += sum(1 for t in step if t is not None)  # a finished row yields None
    return count, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="r1kit/nano")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = GRPOConfig(init_from=a.model, num_generations=a.generations, generation_batch_size=a.prompts * a.generations,
                     beta=0.0, learning_rate=1e-5, per_device_train_batch_size=32,
                     arithmetic_kinds={"add3": 1.0, "sub3": 2.0, "sub2": 1.0})
    policy = load_policy(cfg)
    prompts = PromptSource.arithmetic(cfg.arithmetic_kinds, seed=123).take(0, a.prompts)
    params = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=1.0, top_p=1.0)

    torch.manual_seed(0)
    rollout: Rollout = generate_rollouts(policy.model, policy.tokenizer, prompts, a.generations, params,
                                         policy.stop_ids)
    engine_tok_s = rollout.num_tokens / rollout.seconds
    torch.manual_seed(0)
    plain_tokens, plain_s = plain_loop(policy, rollout.prompt_ids, params)
    rewards = torch.tensor([accuracy_reward(t, p.answer) for t, p in zip(rollout.texts, rollout.prompts, strict=True)])
    accuracy = float(rewards.mean())
    advantages = group_advantages(rewards + torch.arange(len(rewards)) * 1e-3, a.generations)  # every row trains
    batches = micro_batches(rollout, advantages, cfg)
    t0 = time.perf_counter()
    stats = optimize(policy, batches, cfg, cfg.learning_rate, len(advantages), rollout.num_tokens)
    step_s = time.perf_counter() - t0
    trained_tokens = sum(int(mb.mask.sum()) for mb in batches)

    result = {
        "model": a.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "completions": len(rollout.texts), "prompts": a.prompts, "generations": a.generations,
        "engine": {"tokens": rollout.num_tokens, "seconds": rollout.seconds, "tok_s": engine_tok_s,
                   "accuracy": accuracy},
        "plain_loop": {"tokens": plain_tokens, "seconds": plain_s, "tok_s": plain_tokens / plain_s},
        "engine_over_plain": engine_tok_s / (plain_tokens / plain_s),
        "optimizer_step": {"seconds": step_s, "rows": stats["trained_rows"], "completion_tokens": trained_tokens,
                           "tok_s": trained_tokens / step_s},
    }
    print(f"{'rollouts (' + str(len(rollout.texts)) + ' completions, T=1)':<44}{'tokens':>8}{'seconds':>9}{'tok/s':>9}")
    print(f"{'  r1kit LLMEngine (paged, continuous batching)':<44}{rollout.num_tokens:>8}{rollout.seconds:>9.1f}"
          f"{engine_tok_s:>9.0f}")
    print(f"{'  plain KV-cache loop (generate_tokens)':<44}{plain_tokens:>8}{plain_s:>9.1f}"
          f"{plain_tokens / plain_s:>9.0f}")
    print(f"  engine / plain: {result['engine_over_plain']:.2f}x")
    print(f"GRPO optimizer step ({stats['trained_rows']} completions, {trained_tokens} completion tokens, "
          f"fwd+bwd+AdamW): {step_s:.1f} s ({trained_tokens / step_s:.0f} tok/s)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
