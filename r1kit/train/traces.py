"""Reasoning traces for sequence-level distillation (the R1-Distill recipe), written as chat JSONL.

    problems = training_prompts({"add2": 1, "sub3": 1}, n=2000, seed=0)      # training problems, never held out
    records, stats = teacher_traces(teacher, problems, TraceSection())       # sampled by the teacher, verified
    records = reference_traces(problems)                                      # the generator's own traces
    write_traces(records, "runs/distill/traces.jsonl")                        # -> r1kit.train.chat_data reads it

The teacher samples ``samples`` completions per prompt through r1kit's continuous-batching engine; a completion
is kept only when it is verified: R1's format (one ``</think>``, then an answer; ``rewards.format_reward``) and
the right answer (``rewards.accuracy_reward``). Of a prompt's verified completions the first is kept. Each
record is one line ``{"messages": [user, assistant with reasoning_content]}`` plus its ``answer`` and ``kind``,
the format ``r1kit.train.chat_data`` trains on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1kit.fileio import atomic_write
from r1kit.tokenizer import THINK_CLOSE, split_reasoning
from r1kit.train.rewards import Prompt, PromptSource, accuracy_reward, format_reward

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


def teacher_traces(teacher: Any, prompts: Sequence[Prompt], cfg: TraceSection, progress: bool = True
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample ``cfg.samples`` completions per prompt from `teacher` (an R1Model) with its engine, keep the first
    verified one of each prompt. Returns the records and stats (kept per kind, tokens, seconds, tokens/s)."""
    from r1kit.generate import SamplingParams

    tok = teacher._tok()
    teacher.engine_config = teacher.engine_config.replace(max_num_seqs=cfg.batch_size)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    chunk = cfg.batch_size * 4  # prompts per engine.generate call (the bar advances per call)
    bar = _bar(progress, len(prompts))
    kept: dict[int, dict[str, Any]] = {}
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        ids = [tok.encode_chat([{"role": "user", "content": p.prompt}]) for p in part]
        outs = teacher.engine(need_tokens=len(part) * cfg.samples * (cfg.max_new_tokens + 64)).generate(
            [i for i in ids for _ in range(cfg.samples)], params)
        for j, out in enumerate(outs):
            tokens += len(out)
            index = start + j // cfg.samples
            text = tok.decode(out, skip_special_tokens=True)
            if index not in kept and verified(text, prompts[index].answer):
                kept[index] = trace_record(prompts[index], text)
        if bar is not None:
            bar.update(len(part))
            bar.set_postfix(kept=f"{len(kept) / (start + len(part)):.1%}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    records = [kept[i] for i in sorted(kept)]
    return records, trace_stats(prompts, records, tokens, seconds)


def trace_stats(prompts: Sequence[Prompt], records: Sequence[Mapping[str, Any]], tokens: int, seconds: float
                ) -> dict[str, Any]:
    """How many prompts of each kind kept a verified trace, and the generation's cost."""
    kinds = sorted({p.kind for p in prompts})
    asked = {k: sum(p.kind == k for p in prompts) for k in kinds}
    got = {k: sum(r["kind"] == k for r in records) for k in kinds}
    return {"prompts": len(prompts), "kept": len(records), "kept_by_kind": {k: f"{got[k]}/{asked[k]}" for k in kinds},
            "generated_tokens": tokens, "seconds": round(seconds, 1), "tok_s": round(tokens / max(seconds, 1e-9), 1)}


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="teacher traces", unit="prompt", dynamic_ncols=True)


def write_traces(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the records as chat JSONL, atomically (a killed run leaves no partial file)."""
    path = Path(path)
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
