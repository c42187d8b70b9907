"""Generative replay: the previous model's own answers to the previous task's (verifiable) arithmetic problems, kept
only when the answer is right, as training rows for the replay buffer.

    rows = generated_rows(previous_model, tokenizer, ["add2", "sub3"], n=256, seq_len=256, seed=0)
"""

from __future__ import annotations

import random

import torch
from torch import nn

from r1kit.generate import SamplingParams, generate_tokens


@torch.no_grad()
def verified_completions(model: nn.Module, tokenizer, kinds: list[str], n: int, seed: int, batch_size: int = 32,
                         max_new_tokens: int = 256) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids ending with EOS) of the greedy answers to `n` training problems of `kinds` whose
    answer after </think> is right."""
    from r1kit.train.data import parse_answer, sample_problem

    rng = random.Random(seed)
    problems = [sample_problem(rng, rng.choice(kinds), split="train") for _ in range(n)]
    stop = sorted(set(tokenizer.stop_ids) | {tokenizer.eos_id})
    kept = []
    for start in range(0, n, batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [tokenizer.encode_chat([{"role": "user", "content": p.question}]) for p in chunk]
        outs: list[list[int]] = [[] for _ in chunk]
        for step in generate_tokens(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
                                    stop):
            for row, t in enumerate(step):
                if t is not None and t not in stop:
                    outs[row].append(t)
        for p, prompt, ids in zip(chunk, prompts, outs, strict=True):
            if parse_answer(tokenizer.decode(ids, skip_special_tokens=True)) == p.answer:
                kept.append((list(prompt), ids + [tokenizer.eos_id]))
    return kept


def generated_rows(model: nn.Module, tokenizer, kinds: list[str], n: int, seq_len: int, seed: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The verified completions back to back (loss on the completions), cut into (x, y, mask) rows of seq_len."""
    from r1kit.train.data import Mixture, TokenStream

    kept = verified_completions(model, tokenizer, kinds, n, seed)
    if not kept:
        return []
    tokens = [t for prompt, comp in kept for t in prompt + comp]
    mask = [m for prompt, comp in kept for m in [0] * len(prompt) + [1] * len(comp)]
    mix = Mixture([TokenStream("generated", tokens, mask)], {"generated": 1.0}, seq_len, 1, seed)
    rows = []
    for _ in range(max(1, len(tokens) // seq_len)):
        x, y, m = mix.next_batch()
        rows.append((x[0], y[0], m[0]))
    return rows
