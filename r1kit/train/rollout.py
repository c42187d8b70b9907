"""Rollouts for RL: completions sampled by r1kit's own engine, then scored token by token by the training model.

    rollout = generate_rollouts(model, tokenizer, prompts, num_generations=8, params=SamplingParams(...))
    ids, mask = pad_batch(rollout.prompt_ids[:16], rollout.completion_ids[:16])   # (B, T), (B, T - 1)
    logps = completion_logprobs(model, ids, temperature=1.0)                       # (B, T - 1)

Generation goes through `LLMEngine` (continuous batching over a paged KV cache; the num_generations copies of a
prompt share its KV blocks through the prefix cache). A fresh engine per rollout: the prefix cache holds KV
computed by the weights of the time, which a training step makes stale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from r1kit.engine import LLMEngine
from r1kit.engine.config import EngineConfig
from r1kit.generate import SamplingParams
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer
from r1kit.train.rewards import Prompt


@dataclass
class Rollout:
    """num_generations completions of each prompt, prompt-major: rows g*G .. g*G+G-1 share prompts[g]."""

    prompts: list[Prompt]  # one per row
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # generated ids, the stop id included when the model stopped
    texts: list[str]  # the completions decoded (special tokens dropped; </think> kept)
    truncated: list[bool]  # ran into max_completion_length without a stop id
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def engine_for(model: Transformer, rows: int, longest: int, stop_ids: list[int], block_size: int = 16,
               max_num_seqs: int | None = None) -> LLMEngine:
    """An engine over `model` with KV room for `rows` requests of up to `longest` tokens, all running at once
    (or max_num_seqs of them at a time)."""
    blocks = rows * -(-longest // block_size) + 1
    cfg = EngineConfig(block_size=block_size, num_blocks=blocks, max_num_seqs=max_num_seqs or rows,
                       max_num_batched_tokens=max(2048, rows))
    return LLMEngine(model, cfg, stop_ids=stop_ids)


@torch.no_grad()
def generate_rollouts(model: Transformer, tokenizer: Tokenizer, prompts: list[Prompt], num_generations: int,
                      params: SamplingParams, stop_ids: list[int], max_num_seqs: int | None = None) -> Rollout:
    """Sample num_generations completions of every prompt with the engine (the model in eval mode; the caller
    seeds torch's RNG for reproducible draws), max_num_seqs requests decoding together (None: all)."""
    was_training = model.training
    model.eval()
    rows = [p for p in prompts for _ in range(num_generations)]
    encoded = [tokenizer.encode_chat([{"role": "user", "content": p.prompt}]) for p in prompts]
    prompt_ids = [ids for ids in encoded for _ in range(num_generations)]
    longest = max(len(ids) for ids in prompt_ids) + params.max_new_tokens
    engine = engine_for(model, len(rows), longest, stop_ids, max_num_seqs=max_num_seqs)
    t0 = time.perf_counter()
    outs = engine.generate(prompt_ids, params)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    stops = set(stop_ids)
    texts = [tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True) for out in outs]
    truncated = [not out or out[-1] not in stops for out in outs]
    return Rollout(rows, prompt_ids, outs, texts, truncated, seconds)


def pad_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion of each row, right-padded: ids (B, T) and the mask (B, T - 1) of the targets
    ids[:, 1:] that are completion tokens (what the policy generated and the loss scores)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1:len(p) - 1 + len(c)] = True  # target t = ids[t + 1]
    return ids, mask


def completion_logprobs(model: Transformer, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) under `model` with logits / temperature (the distribution the
    engine sampled from, top-p/top-k aside): (B, T - 1), fp32. Differentiable unless called under no_grad."""
    logits = model(ids[:, :-1]).float() / temperature  # (B, T - 1, V)
    targets = ids[:, 1:].unsqueeze(-1)  # (B, T - 1, 1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
