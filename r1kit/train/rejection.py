"""Rejection-sampling SFT (DeepSeek-R1's third stage): sample, keep the verified-correct, fine-tune on them.

    r1kit rl --config configs/grpo-nano.yaml --mode rejection-sampling --sft-config configs/rs-nano-sft.yaml

`rs_prompts` prompts of the GRPO recipe's task are each sampled `num_generations` times with the engine (at the
recipe's temperature, seeded per batch of prompts_per_step prompts); a completion is kept when it is verified
(R1's format and the right answer: ``traces.verified``), with `rs_keep_shortest` only the shortest kept
completion of each prompt, else every distinct one. Sampling, verifying and the record format are
``r1kit.train.traces``' (``sample_verified``, the mechanism distillation's teacher traces use too). The kept
conversations go to `<out_dir>/samples.jsonl` in chat JSONL (``{"messages": [user, assistant with
reasoning_content], "answer", "kind"}``), which the training loop reads as `data.chat_jsonl`; with an SFT recipe
it then trains on them (`r1kit.train.loop.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1kit.generate import SamplingParams
from r1kit.train.rl_config import GRPOConfig
from r1kit.train.traces import Sampling, sample_verified, write_traces


def rs_sampling(cfg: GRPOConfig) -> Sampling:
    """How a rejection-sampling recipe draws: num_generations per prompt at its sampling parameters, one engine
    call per prompts_per_step prompts seeded by cfg.seed, the shortest or every distinct verified completion."""
    params = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    return Sampling(cfg.num_generations, params, "shortest" if cfg.rs_keep_shortest else "distinct",
                    chunk=cfg.prompts_per_step, seed=cfg.seed)


def sample_and_keep(cfg: GRPOConfig, progress: bool = True) -> dict[str, Any]:
    """Sample rs_prompts x num_generations completions from init_from, keep the verified ones, write
    <out_dir>/samples.jsonl atomically; returns counts."""
    from r1kit.api import R1Model
    from r1kit.train.grpo import prompt_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = R1Model.from_pretrained(cfg.init_from, device="cpu", dtype="fp32")
    source, per_step = prompt_source(cfg), cfg.prompts_per_step
    prompts = [p for step in range(-(-cfg.rs_prompts // per_step)) for p in source.take(step, per_step)]
    records, stats = sample_verified(model, prompts[:cfg.rs_prompts], rs_sampling(cfg), progress,
                                     desc="rejection sampling")
    file = write_traces(records, Path(cfg.out_dir) / "samples.jsonl")
    return {"samples": str(file), **stats}


def rejection_sampling(cfg: GRPOConfig, sft_config: str | None = None, resume: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Sample and keep the verified completions (skipped on --resume when samples.jsonl exists), then SFT with the
    `sft_config` recipe (its data.chat_jsonl should name <out_dir>/samples.jsonl) when given."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    file = Path(cfg.out_dir) / "samples.jsonl"
    summary = {"samples": str(file)} if resume and file.is_file() else sample_and_keep(cfg, progress)
    if sft_config is not None:
        summary["sft"] = train(TrainConfig.from_yaml(sft_config), resume=resume, progress=progress)
    return summary
