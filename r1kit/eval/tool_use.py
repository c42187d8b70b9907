"""Tool-use accuracy: held-out arithmetic problems answered through the agent loop with the calculator offered.

    r = eval_tool_use(model, ["mul2x2", "mul3x2", "mul3x3"], n=200)
    r["accuracy"]["mul2x2"], r["called"]["mul2x2"]      # right answers; conversations that called the tool

Each problem (the held-out side of the hash split, `r1kit.train.data.sample_problem(split="val")`) is one
`r1kit.agent.run` with ``{"calculator": r1kit.tools.calculator}``, greedy, at most ``max_steps`` model turns;
the answer is the integer of the last reply's content (`r1kit.train.data.parse_answer`). One conversation at a
time (the agent loop is sequential), so this is slower per problem than the batched `eval_arithmetic`.
"""

from __future__ import annotations

import random
from typing import Any

from r1kit.eval import _check_kinds, _need_positive


def eval_tool_use(model: Any, kinds: list[str], n: int = 200, seed: int = 1234, max_steps: int = 4,
                  max_new_tokens: int = 256, progress: bool = True) -> dict[str, Any]:
    """Accuracy and call rate per kind on ``n`` held-out problems each through the agent loop (module doc);
    also a few worked conversations per kind."""
    from r1kit import agent
    from r1kit.tools import calculator
    from r1kit.train.data import parse_answer, sample_problem

    _check_kinds(kinds)
    for name, value in (("n", n), ("max_steps", max_steps), ("max_new_tokens", max_new_tokens)):
        _need_positive(name, value)
    rng = random.Random(seed)
    results: dict[str, Any] = {"accuracy": {}, "called": {}, "n": n, "examples": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(kinds), desc="eval tool use", unit="problem", dynamic_ncols=True)
    for kind in kinds:
        correct = called = 0
        for i in range(n):
            p = sample_problem(rng, kind, split="val")
            run = agent.run(model, [{"role": "user", "content": p.question}], {"calculator": calculator},
                            max_steps=max_steps, temperature=0, max_new_tokens=max_new_tokens)
            ok = run.stopped == "answer" and parse_answer(run.reply.content) == p.answer
            made_call = any(m.get("tool_calls") for m in run.messages)
            correct, called = correct + ok, called + made_call
            if i < 2:
                results["examples"].append({"kind": kind, "question": p.question, "messages": run.messages[1:],
                                            "expected": p.answer, "correct": ok})
            if bar is not None:
                bar.update(1)
        results["accuracy"][kind], results["called"][kind] = correct / n, called / n
    if bar is not None:
        bar.close()
    return results
