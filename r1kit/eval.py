"""Evaluation on held-out data: arithmetic accuracy (greedy chat answers) and perplexity on held-out text.

    r1kit eval r1kit/nano --task arithmetic [--kinds add2,sub2] [--n 200]
    r1kit eval r1kit/nano --task perplexity [--max-tokens 50000]

Arithmetic problems come from the held-out side of the hash split (never seen in training); the answer
is the integer after </think>. Perplexity is over the held-out standard-library files.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from r1kit.api import R1Model
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.tokenizer import split_reasoning


def eval_arithmetic(model: R1Model, kinds: list[str], n: int = 200, seed: int = 1234, batch_size: int = 32,
                    max_new_tokens: int = 256, progress: bool = True) -> dict[str, Any]:
    """Greedy accuracy on n held-out problems per kind; also returns a few worked examples."""
    from r1kit.train.data import parse_answer, sample_problem

    tok = model._tok()
    rng = random.Random(seed)
    results: dict[str, Any] = {"accuracy": {}, "n": n, "examples": []}
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(kinds), desc="eval arithmetic", unit="problem", dynamic_ncols=True)
    for kind in kinds:
        problems = [sample_problem(rng, kind, split="val") for _ in range(n)]
        correct = 0
        for start in range(0, n, batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [tok.encode_chat([{"role": "user", "content": p.question}]) for p in chunk]
            outs: list[list[int]] = [[] for _ in chunk]
            stop = model.stop_ids()
            for step in generate_tokens(model.model, prompts, params, stop):
                for row, t in enumerate(step):
                    if t is not None and t not in stop:
                        outs[row].append(t)
            for p, ids in zip(chunk, outs, strict=True):
                text = tok.decode(ids, skip_special_tokens=True)
                ok = parse_answer(text) == p.answer
                correct += ok
                if start == 0 and sum(e["kind"] == kind for e in results["examples"]) < 3:
                    reasoning, answer = split_reasoning("<think>" + text)
                    results["examples"].append({"kind": kind, "question": p.question, "reasoning": reasoning,
                                                "answer": answer, "expected": p.answer, "correct": ok})
            if bar is not None:
                bar.update(len(chunk))
        results["accuracy"][kind] = correct / n
    if bar is not None:
        bar.close()
    return results


@torch.inference_mode()
def eval_perplexity(model: R1Model, texts: list[str], seq_len: int = 256, max_tokens: int = 50_000
                    ) -> dict[str, float]:
    """Token-level perplexity over texts, in non-overlapping windows of seq_len, up to max_tokens."""
    tok = model._tok()
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text) + ([tok.eos_id] if tok.eos_id is not None else [])
        if len(ids) > max_tokens + 1:
            break
    ids = ids[:max_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor(ids[start:start + seq_len + 1], device=model.device)
        logits = model.model(window[None, :-1])[0]
        nll += float(F.cross_entropy(logits.float(), window[1:], reduction="sum"))
        count += window.numel() - 1
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}
