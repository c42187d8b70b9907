"""Calculator-tool conversations that teach a model when to call the built-in ``calculator`` and how.

With the calculator offered (OpenAI tool schema ``r1kit.tools.CALCULATOR``, rendered by the chat template), a
problem of a *call* kind (:data:`CALL_KINDS`: the multiplications nano cannot do in its head) is two model turns,
each trained exactly as `r1kit.agent.run` prompts it:

    turn 1  prompt: [user "What is 47*38?"] + tools       -> "47*38 has two factors of two or more digits: use the
            calculator.\\n</think>\\n\\n<tool_call>\\n{"name": "calculator", "arguments": {"expression": "47*38"}}
            \\n</tool_call><eos>"
    turn 2  prompt: + [assistant (the call), tool "1786"] -> "So 47*38=1786.\\n</think>\\n\\n1786<eos>" (the
            last line of nano's own traces, with the result from the call)

Any other kind, with the calculator offered, is answered in the head exactly as without tools
(`r1kit.train.data.reasoning`), so the model learns when not to call. Each turn is one document (its prompt, loss
mask 0; its completion, mask 1); :func:`tool_stream` puts them back to back as a mixture source ("tools" in
``data.mixture``, kinds in ``data.tool_kinds``). Problems come from the hash split's training side, or its held-out
side for validation (``split="val"``). The chat format must render tools (nano: the R1 template with a Hermes tool
section, `r1kit.tokenizer.DEEPSEEK_R1_TOOLS_CHAT_TEMPLATE`).
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Mapping
from typing import Any

from r1kit.tokenizer import Tokenizer
from r1kit.tools import CALCULATOR, calculator
from r1kit.train.chat_data import _target_ids, turn_end_id
from r1kit.train.data import ALL_KINDS, Problem, TokenStream, reasoning, sample_problem

CALL_KINDS = ("mul2x2", "mul3x2", "mul3x3")
"""Kinds answered through the calculator when it is offered."""


def call_text(expression: str) -> str:
    """The answer of a calculator call turn in the Hermes format the template renders and r1kit.tools parses."""
    arguments = json.dumps({"expression": expression})
    return f'<tool_call>\n{{"name": "calculator", "arguments": {arguments}}}\n</tool_call>'


def tool_turns(problem: Problem, kind: str) -> list[tuple[list[dict[str, Any]], str, str]]:
    """The model turns of one conversation with the calculator offered: ``(messages before the turn, reasoning,
    answer)`` for each; two (the call, then the answer from its result) for a call kind, else one."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": problem.question}]
    if kind not in CALL_KINDS:
        return [(messages, reasoning(problem), str(problem.answer))]
    result = calculator(problem.expression)
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": problem.expression})}}
    after = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_0", "content": result}]
    return [(messages, f"{problem.expression} has two factors of two or more digits: use the calculator.",
             call_text(problem.expression)),
            (after, f"So {problem.expression}={result}.", result)]


def tool_documents(problem: Problem, kind: str, tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss mask of each turn of :func:`tool_turns`: the prompt `r1kit.agent.run` sends (calculator
    offered, generation prompt), mask 0, then the completion (reasoning, ``</think>``, answer, end of turn), mask 1."""
    end_id = turn_end_id(tokenizer)
    documents = []
    for messages, thought, answer in tool_turns(problem, kind):
        prompt = tokenizer.encode_chat(messages, add_generation_prompt=True, tools=[CALCULATOR])
        target = _target_ids(tokenizer, thought, answer, end_id)
        documents.append((prompt + target, [0] * len(prompt) + [1] * len(target)))
    return documents


def tool_stream(tokenizer: Tokenizer, n_examples: int, seed: int, kinds: Mapping[str, float],
                split: str = "train", name: str = "tools") -> TokenStream:
    """``n_examples`` conversations (kind drawn by weight from ``kinds``, problem from ``split``) as one stream of
    their turns' documents, back to back (see the module doc)."""
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}")
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if not kinds or unknown:
        raise ValueError(f"tool kinds {dict(kinds)}: unknown {unknown} or none; kinds: {', '.join(ALL_KINDS)}")
    rng = random.Random(seed)
    tokens, mask = array("i"), array("b")
    for kind in rng.choices(list(kinds), weights=list(kinds.values()), k=n_examples):
        for ids, loss_mask in tool_documents(sample_problem(rng, kind, split), kind, tokenizer):
            tokens.extend(ids)
            mask.extend(loss_mask)
    return TokenStream(name, tokens, mask)
