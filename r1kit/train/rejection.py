"""Rejection-sampling SFT (DeepSeek-R1's third stage): sample, keep the verified-correct, fine-tune on them.

    r1kit rl --config configs/grpo-nano.yaml --mode rejection-sampling --sft-config configs/rs-nano-sft.yaml

`rs_prompts` prompts of the GRPO recipe's task are each sampled `num_generations` times with the engine (at the
recipe's temperature); a completion is kept when every configured reward that verifies (accuracy, format) gives
1.0, and with `rs_keep_shortest` only the shortest kept completion of each prompt. The kept conversations go to
`<out_dir>/samples.jsonl` in chat JSONL (`{"messages": [user, assistant]}`, the assistant's `<think>` block
inside its content), which the training loop reads as `data.chat_jsonl`; with an SFT recipe it then trains on
them (`r1kit.train.loop.train`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from r1kit.fileio import atomic_write
from r1kit.generate import SamplingParams
from r1kit.tokenizer import THINK_OPEN
from r1kit.train.rewards import accuracy_reward, format_reward
from r1kit.train.rl_config import GRPOConfig
from r1kit.train.rollout import Rollout, generate_rollouts


def keep_correct(rollout: Rollout, num_generations: int, keep_shortest: bool) -> list[tuple[str, str]]:
    """(prompt, completion) of the verified completions: accuracy and format both 1.0; per prompt the shortest
    (fewest tokens, the first among equals) with keep_shortest, else every distinct one."""
    kept: list[tuple[str, str]] = []
    for g in range(0, len(rollout.texts), num_generations):
        rows = [i for i in range(g, g + num_generations)
                if accuracy_reward(rollout.texts[i], rollout.prompts[i].answer) == 1.0
                and format_reward(rollout.texts[i]) == 1.0]
        if keep_shortest and rows:
            rows = [min(rows, key=lambda i: len(rollout.completion_ids[i]))]
        seen = set()
        for i in rows:
            if rollout.texts[i] not in seen:
                seen.add(rollout.texts[i])
                kept.append((rollout.prompts[i].prompt, rollout.texts[i]))
    return kept


def chat_line(prompt: str, completion: str) -> str:
    """One chat JSONL line: the user prompt and the assistant completion with its <think> block opened."""
    content = completion if completion.lstrip().startswith(THINK_OPEN) else f"{THINK_OPEN}\n{completion}"
    return json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}]})


def sample_verified(cfg: GRPOConfig, progress: bool = True) -> dict[str, Any]:
    """Sample rs_prompts x num_generations completions from init_from, keep the verified ones, write
    <out_dir>/samples.jsonl atomically; returns counts."""
    from r1kit.api import R1Model
    from r1kit.train.grpo import prompt_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = R1Model.from_pretrained(cfg.init_from, device="cpu", dtype="fp32")
    source = prompt_source(cfg)
    params = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    kept, sampled, bar = [], 0, None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.rs_prompts, desc="rejection sampling", unit="prompt", dynamic_ncols=True)
    for step in range(-(-cfg.rs_prompts // cfg.prompts_per_step)):
        prompts = source.take(step, cfg.prompts_per_step)[:cfg.rs_prompts - step * cfg.prompts_per_step]
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        rollout = generate_rollouts(model.model, model._tok(), prompts, cfg.num_generations, params,
                                    model.stop_ids())
        kept += keep_correct(rollout, cfg.num_generations, cfg.rs_keep_shortest)
        sampled += len(rollout.texts)
        if bar is not None:
            bar.update(len(prompts))
            bar.set_postfix(kept=len(kept))
    if bar is not None:
        bar.close()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "samples.jsonl"
    atomic_write(file, lambda tmp: Path(tmp).write_text("".join(chat_line(p, c) + "\n" for p, c in kept)))
    return {"samples": str(file), "prompts": cfg.rs_prompts, "sampled": sampled, "kept": len(kept)}


def rejection_sampling(cfg: GRPOConfig, sft_config: str | None = None, resume: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Sample and keep the verified completions (skipped on --resume when samples.jsonl exists), then SFT with the
    `sft_config` recipe (its data.chat_jsonl should name <out_dir>/samples.jsonl) when given."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    file = Path(cfg.out_dir) / "samples.jsonl"
    summary = {"samples": str(file)} if resume and file.is_file() else sample_verified(cfg, progress)
    if sft_config is not None:
        summary["sft"] = train(TrainConfig.from_yaml(sft_config), resume=resume, progress=progress)
    return summary
