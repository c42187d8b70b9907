"""Tool-use accuracy: held-out arithmetic problems answered through the agent loop with the calculator offered.

    r = eval_tool_use(model, ["mul2x2", "mul3x2", "mul3x3"], n=200)
    r["accuracy"]["mul2x2"], r["called"]["mul2x2"]      # right answers; conversations that called the tool

Each problem (the held-out side of the hash split, `r1kit.train.data.sample_problem(split="val")`) is one
conversation with ``{"calculator": r1kit.tools.calculator}`` offered, at most ``max_steps`` model turns, driven by
`r1kit.agent.advance` (the step of `r1kit.agent.run`: a reply's calls are run and their results fed back) with the
model turns of ``batch_size`` conversations decoded together, greedy, on the plain KV-cache loop as
`eval_arithmetic` does (the agent loop itself is one conversation at a time). A reply is what `R1Model.chat` makes
of the tokens: the calls `r1kit.tools.ToolCallParser` finds, else the content after ``</think>``. The answer is the
integer of the last reply's content (`r1kit.train.data.parse_answer`).
"""

from __future__ import annotations

import random
import types
from collections.abc import Callable, Mapping
from typing import Any

from r1kit.eval import _check_kinds, _need_positive


def agent_batch(model: Any, conversations: list[list[dict[str, Any]]], tools: Mapping[str, Callable[..., Any]],
                max_steps: int = 4, max_new_tokens: int = 256) -> list[str]:
    """Drive ``conversations`` (lists of messages, extended in place) through `r1kit.agent.advance` in lockstep,
    each model turn of all unfinished ones one greedy batch; why each stopped: "answer" or "max_steps"."""
    from r1kit import agent
    from r1kit.generate import SamplingParams, generate_tokens
    from r1kit.tools import ToolCallParser

    tok, stop = model._tok(chat=True), model.stop_ids()
    offered = [agent.BUILTIN_SCHEMAS.get(name) or agent.function_schema(name, fn) for name, fn in tools.items()]
    parser = ToolCallParser(tok, offered, "auto", stop)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    stopped, active = ["max_steps"] * len(conversations), list(range(len(conversations)))
    for _ in range(max_steps):
        prompts = [tok.encode_chat(conversations[i], tools=offered) for i in active]  # each (T_i,)
        outs: list[list[int]] = [[] for _ in active]
        for step in generate_tokens(model.model, prompts, params, stop):
            for row, t in enumerate(step):
                if t is not None and t not in stop:
                    outs[row].append(t)
        still = []
        for i, ids in zip(active, outs, strict=True):
            _, content = tok.split_reasoning(tok.decode(ids, skip_special_tokens=True))
            content, calls = parser.parse(ids) or (content, [])
            if agent.advance(conversations[i], types.SimpleNamespace(content=content, tool_calls=calls), tools):
                stopped[i] = "answer"
            else:
                still.append(i)
        if not (active := still):
            break
    return stopped


def eval_tool_use(model: Any, kinds: list[str], n: int = 200, seed: int = 1234, max_steps: int = 4,
                  batch_size: int = 32, max_new_tokens: int = 256, progress: bool = True) -> dict[str, Any]:
    """Accuracy and call rate per kind on ``n`` held-out problems each with the calculator offered (module doc);
    also two worked conversations per kind."""
    from r1kit.tools import calculator
    from r1kit.train.data import parse_answer, sample_problem

    _check_kinds(kinds)
    for name, value in (("n", n), ("max_steps", max_steps), ("batch_size", batch_size),
                        ("max_new_tokens", max_new_tokens)):
        _need_positive(name, value)
    rng = random.Random(seed)
    results: dict[str, Any] = {"accuracy": {}, "called": {}, "n": n, "examples": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(kinds), desc="eval tool use", unit="problem", dynamic_ncols=True)
    for kind in kinds:
        problems = [sample_problem(rng, kind, split="val") for _ in range(n)]
        correct = called = 0
        for start in range(0, n, batch_size):
            chunk = problems[start:start + batch_size]
            conversations = [[{"role": "user", "content": p.question}] for p in chunk]
            stopped = agent_batch(model, conversations, {"calculator": calculator}, max_steps, max_new_tokens)
            for p, conversation, why in zip(chunk, conversations, stopped, strict=True):
                ok = why == "answer" and parse_answer(conversation[-1]["content"] or "") == p.answer
                correct += ok
                called += any(m.get("tool_calls") for m in conversation)
                if sum(e["kind"] == kind for e in results["examples"]) < 2:
                    results["examples"].append({"kind": kind, "question": p.question, "messages": conversation[1:],
                                                "expected": p.answer, "correct": ok})
            if bar is not None:
                bar.update(len(chunk))
        results["accuracy"][kind], results["called"][kind] = correct / n, called / n
    if bar is not None:
        bar.close()
    return results
