"""Structured outputs: grammar-constrained decoding with llguidance on the engine's batched sampler.

    guides = GuideFactory(tokenizer, vocab_size=model.config.vocab_size)       # once per model (~0.2 s)
    guide = guides.new({"type": "json_schema", "schema": {...}}, think_close_id=None)   # StructuredError: 400
    engine.add_request(rid, prompt, SamplingParams(structured=spec), guide=guide)

A spec (``SamplingParams.structured``, its shape checked by ``SamplingParams.validate``) is one of
``{"type": "json_object"}``, ``{"type": "json_schema", "schema": {...}}``, ``{"type": "regex", "pattern": "..."}``,
``{"type": "choice", "choices": ["a", "b"]}``, ``{"type": "grammar", "grammar": LARK}`` (llguidance's Lark
dialect: what r1kit.tools builds to enforce tool_choice "required" or a named function).
Each request gets its own `Guide` (an llguidance matcher): before
a step samples, the constrained rows' logits outside the grammar's next-token mask are set to -inf (the other rows
of the batch are untouched), and after it the sampled token advances the matcher; once the grammar is complete
only the end-of-sequence tokens are allowed. For a reasoning request (``think_close_id``: the prompt opened
``<think>``) the constraint starts after the model's ``</think>``: the reasoning stays free, as vLLM does.

Why llguidance: on this CPU-only Python both llguidance 1.9 and xgrammar 0.2.9 install from wheels; llguidance
computes a mask in ~50 us (median, nano's 4096-token vocabulary) and compiles a schema in ~1-20 ms, while
xgrammar's tokenizer detection refused the token ids of valid JSON from r1kit's byte-level BPE tokenizers
(benchmarks/bench_structured.py measures the per-token overhead on the engine).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

SPEC_TYPES = ("json_object", "json_schema", "regex", "choice", "grammar")


class StructuredError(ValueError):
    """A constraint the grammar library cannot compile (the message names the unsupported feature)."""


class Guide:
    """One request's constraint: an llguidance matcher, waiting for ``</think>`` first when ``wait_for`` is set."""

    def __init__(self, matcher: Any, wait_for: int | None = None):
        self.matcher, self.wait_for = matcher, wait_for

    @property
    def active(self) -> bool:
        """Whether the next token is constrained (not still inside the reasoning)."""
        return self.wait_for is None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32, 32 tokens per word)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token: int) -> None:
        """Consume a sampled token; StructuredError if the grammar does not allow it."""
        if self.wait_for is not None:
            if token == self.wait_for:
                self.wait_for = None
            return
        if not self.matcher.consume_token(token):
            raise StructuredError(f"token {token} breaks the grammar: {self.matcher.get_error()}")


class GuideFactory:
    """Compiles specs into guides for one tokenizer (an `r1kit.tokenizer.Tokenizer`) and model vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int] = ()):
        try:
            import llguidance
        except ImportError:
            raise StructuredError("structured outputs need the llguidance package: pip install llguidance") from None

        self.vocab_size = vocab_size
        eos = list(stop_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self._tokenizer = llguidance.LLTokenizer(tokenizer._backend.to_str(), n_vocab=vocab_size, eos_token=eos)

    def new(self, spec: Mapping[str, Any], think_close_id: int | None = None) -> Guide:
        """A fresh guide for ``spec``; StructuredError naming what the library refused."""
        import llguidance

        grammar = _grammar(json.dumps(spec, sort_keys=True))
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise StructuredError(f"{_what(spec)} cannot be compiled: {matcher.get_error()}")
        return Guide(matcher, think_close_id)


@functools.lru_cache(maxsize=256)
def _grammar(spec_json: str) -> str:
    """The llguidance grammar of a spec (cached: a server sees the same schema again and again)."""
    import llguidance

    spec = json.loads(spec_json)
    kind = spec["type"]
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                     defaults={"whitespace_flexible": False})
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec["schema"],
                                                                     defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec["pattern"])
        elif kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec["grammar"])
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec["choices"]))
    except ValueError as err:
        raise StructuredError(f"{_what(spec)} cannot be compiled: {err}") from None
    if message := llguidance.LLMatcher.validate_grammar(grammar):  # "" when valid
        raise StructuredError(f"{_what(spec)} cannot be compiled: {message}")
    return grammar


def _what(spec: Mapping[str, Any]) -> str:
    return {"json_object": "response_format json_object", "json_schema": "response_format json_schema",
            "regex": "guided_regex", "choice": "guided_choice",
            "grammar": "the grammar (tool_choice)"}.get(spec.get("type"), "the constraint")


def apply_guides(logits: torch.Tensor, guides: Sequence[Guide | None]) -> torch.Tensor:
    """logits (M, V) with each active guide's disallowed tokens at -inf (a copy when any row is constrained;
    rows without a guide unchanged). The guides' vocabulary is V (GuideFactory's vocab_size)."""
    rows = [i for i, g in enumerate(guides) if g is not None and g.active]
    if not rows:
        return logits
    import llguidance.torch

    bitmask = llguidance.torch.allocate_token_bitmask(len(rows), logits.shape[1])  # (R, ceil(V / 32)) int32
    for k, i in enumerate(rows):
        guides[i].fill(bitmask, k)
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    constrained = logits.index_select(0, index).float()  # (R, V)
    apply_bitmask_(constrained, bitmask.to(logits.device))
    out = logits.float().clone()
    out[index] = constrained
    return out


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with the tokens whose bit is 0 in bitmask (R, ceil(V / 32)) int32 set to -inf, in place.
    llguidance.torch's kernel in plain tensor ops: its own is torch.compile'd, ~8 s of CPU on the first call."""
    allowed = (bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1  # (R, W, 32): bit j of word w: token 32w + j
    allowed = allowed.reshape(bitmask.shape[0], -1)[:, :logits.shape[1]].bool()  # (R, V)
    return logits.masked_fill_(~allowed, float("-inf"))
