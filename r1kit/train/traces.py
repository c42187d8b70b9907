"""Verified reasoning traces, written as chat JSONL: sequence-level distillation's teacher traces (the R1-Distill
recipe) and rejection sampling's kept samples (``r1kit.train.rejection``) both come from ``sample_verified``.

    problems = training_prompts({"add2": 1, "sub3": 1}, n=2000, seed=0)      # training problems, never held out
    records, stats = teacher_traces(teacher, problems, TraceSection())       # sampled by the teacher, verified
    records, stats = sample_verified(model, problems, Sampling(8, params, keep="shortest"))   # the mechanism
    records = reference_traces(problems)                                      # the generator's own traces
    write_traces(records, "runs/distill/traces.jsonl")                        # -> r1kit.train.chat_data reads it

``sample_verified`` samples ``samples`` completions per prompt through r1kit's continuous-batching engine
(``rollout.generate_rollouts``); a completion is kept only when it is verified: R1's format (one ``</think>``,
then an answer; ``rewards.format_reward``) and the right answer (``rewards.accuracy_reward``). Of a prompt's
verified completions it keeps the first (teacher traces), the shortest or every distinct one (rejection
sampling). Each record is one line ``{"messages": [user, assistant with reasoning_content]}`` plus its
``answer`` and ``kind``, the format ``r1kit.train.chat_data`` trains on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from r1kit.fileio import atomic_write
from r1kit.generate import SamplingParams
from r1kit.tokenizer import THINK_CLOSE, split_reasoning
from r1kit.train.rewards import Prompt, PromptSource, accuracy_reward, format_reward
from r1kit.train.rollout import Rollout, generate_rollouts

if TYPE_CHECKING:
    from r1kit.api import R1Model

log = logging.getLogger("r1kit")


@dataclass
class TraceSection:
    """How the teacher writes the traces (the `traces:` section of a distillation recipe)."""

    prompts: int = 2000  # distinct training problems (drawn by the student's data.arithmetic_kinds weights)
    samples: int = 1  # teacher completions per problem; the first verified one is kept
    temperature: float = 0.0  # teacher sampling temperature (0: greedy)
    top_p: float = 1.0
    max_new_tokens: int = 320  # per completion (teacher traces and, on-policy, the student's samples)
    batch_size: int = 64  # requests the engine decodes together (EngineConfig.max_num_seqs)


def training_prompts(kinds: Mapping[str, float], n: int, seed: int) -> list[Prompt]:
    """`n` distinct training arithmetic problems, kinds drawn by weight (``rewards.PromptSource``), never held
    out (``data.is_heldout``), in a fixed order given the seed."""
    source = PromptSource.arithmetic(kinds, seed)
    seen: dict[str, Prompt] = {}
    step = 0
    while len(seen) < n:
        for prompt in source.take(step, n):
            if len(seen) < n:
                seen.setdefault(prompt.prompt, prompt)
        step += 1
        if step > 100:
            raise ValueError(f"traces.prompts = {n}: more than the {len(seen)} distinct training problems of {kinds}")
    return list(seen.values())


def trace_record(prompt: Prompt, completion: str) -> dict[str, Any]:
    """The chat JSONL line of one verified completion (text generated after ``<think>\\n``)."""
    reasoning, answer = split_reasoning(completion, starts_in_reasoning=True)
    return {"messages": [{"role": "user", "content": prompt.prompt},
                         {"role": "assistant", "content": answer, "reasoning_content": reasoning}],
            "answer": prompt.answer, "kind": prompt.kind}


def verified(completion: str, answer: str) -> bool:
    """A completion in R1's format whose answer is right (the two verifiable rewards of r1kit.train.rewards)."""
    return format_reward(completion) == 1.0 and accuracy_reward(completion, answer) == 1.0


def reference_traces(prompts: Sequence[Prompt]) -> list[dict[str, Any]]:
    """The records of the problems' own step-by-step traces (``data.reasoning``): the no-teacher baseline."""
    from r1kit.train.data import Problem, reasoning

    records = []
    for p in prompts:
        a, op, b = _parse_question(p.prompt)
        problem = Problem(a, op, b)
        records.append(trace_record(p, f"{reasoning(problem)}\n{THINK_CLOSE}\n\n{problem.answer}"))
    return records


def _parse_question(question: str) -> tuple[int, str, int]:
    """``"What is 47+38?"`` -> (47, "+", 38)."""
    expression = question.removeprefix("What is ").removesuffix("?")
    for op in "+-*":
        left, sep, right = expression.partition(op)
        if sep and left.isdigit() and right.isdigit():
            return int(left), op, int(right)
    raise ValueError(f"{question!r}: not an arithmetic question of r1kit.train.data")


KEEP = ("first", "shortest", "distinct")  # which verified completions of a prompt keep_verified keeps


def keep_verified(rollout: Rollout, num_generations: int, keep: str) -> list[int]:
    """The rows of the rollout (prompt-major groups of num_generations) to keep: verified completions only, of
    each prompt "first" the first, "shortest" the shortest (fewest tokens, the first among equals), "distinct"
    every distinct text."""
    if keep not in KEEP:
        raise ValueError(f"keep = {keep!r}: must be one of {KEEP}")
    kept: list[int] = []
    for g in range(0, len(rollout.texts), num_generations):
        rows = [i for i in range(g, g + num_generations) if verified(rollout.texts[i], rollout.prompts[i].answer)]
        if keep == "first":
            rows = rows[:1]
        elif keep == "shortest" and rows:
            rows = [min(rows, key=lambda i: len(rollout.completion_ids[i]))]
        seen: set[str] = set()
        for i in rows:
            if rollout.texts[i] not in seen:
                seen.add(rollout.texts[i])
                kept.append(i)
    return kept


@dataclass
class Sampling:
    """How sample_verified draws: completions per prompt, the sampling parameters, which verified ones it keeps,
    prompts per engine call, requests decoding at once, and the seed of each call's draws (None: unseeded)."""

    samples: int
    params: SamplingParams
    keep: str = "first"
    chunk: int = 256
    max_num_seqs: int | None = None
    seed: int | None = None


def sample_verified(model: R1Model, prompts: Sequence[Prompt], how: Sampling, progress: bool = True,
                    desc: str = "verified samples") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``how.samples`` completions per prompt from `model` with its engine (``rollout.generate_rollouts``),
    keep the verified ones (``keep_verified``) as chat records (``trace_record``). Returns the records, in
    prompt order, and stats (kept per kind, completions and tokens sampled, seconds, tokens/s). With a seed, call
    i's draws are seeded with ``seed * 1_000_003 + i``."""
    tok, stop_ids = model._tok(), model.stop_ids()
    bar = _bar(progress, len(prompts), desc)
    records: list[dict[str, Any]] = []
    sampled = tokens = 0
    t0 = time.perf_counter()
    for call, start in enumerate(range(0, len(prompts), how.chunk)):
        part = list(prompts[start:start + how.chunk])
        if how.seed is not None:
            torch.manual_seed(how.seed * 1_000_003 + call)
        rollout = generate_rollouts(model.model, tok, part, how.samples, how.params, stop_ids, how.max_num_seqs)
        records += [trace_record(rollout.prompts[i], rollout.texts[i])
                    for i in keep_verified(rollout, how.samples, how.keep)]
        sampled, tokens = sampled + len(rollout.texts), tokens + rollout.num_tokens
        if bar is not None:
            bar.update(len(part))
            bar.set_postfix(kept=len(records))
    if bar is not None:
        bar.close()
    stats = trace_stats(prompts, records, tokens, time.perf_counter() - t0)
    return records, {**stats, "sampled": sampled}


def teacher_traces(teacher: R1Model, prompts: Sequence[Prompt], cfg: TraceSection, progress: bool = True
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``cfg.samples`` completions per prompt from `teacher` with its engine, keep the first verified one
    of each prompt. Returns the records and stats (kept per kind, tokens, seconds, tokens/s)."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    how = Sampling(cfg.samples, params, "first", chunk=cfg.batch_size * 4, max_num_seqs=cfg.batch_size)
    return sample_verified(teacher, prompts, how, progress, desc="teacher traces")


def trace_stats(prompts: Sequence[Prompt], records: Sequence[Mapping[str, Any]], tokens: int, seconds: float
                ) -> dict[str, Any]:
    """How many prompts of each kind kept a verified trace, and the generation's cost."""
    kinds = sorted({p.kind for p in prompts})
    asked = {k: sum(p.kind == k for p in prompts) for k in kinds}
    got = {k: sum(r["kind"] == k for r in records) for k in kinds}
    return {"prompts": len(prompts), "kept": len(records), "kept_by_kind": {k: f"{got[k]}/{asked[k]}" for k in kinds},
            "generated_tokens": tokens, "seconds": round(seconds, 1), "tok_s": round(tokens / max(seconds, 1e-9), 1)}


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)


def write_traces(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the records as chat JSONL, atomically (a killed run leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("wrote %d traces to %s", len(records), path)
    return path


def heldout_prompts(kinds: Sequence[str], n: int, seed: int) -> list[Prompt]:
    """`n` held-out problems per kind (``data.sample_problem(split="val")``): validation only, never trained on."""
    import random

    from r1kit.train.data import sample_problem

    rng = random.Random(seed)
    out = []
    for kind in kinds:
        for _ in range(n):
            problem = sample_problem(rng, kind, split="val")
            out.append(Prompt(problem.question, str(problem.answer), kind))
    return out
