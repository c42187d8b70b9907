"""One request as the engine sees it: token ids, sampling parameters, KV block table and progress counters.

Token ids in, token ids out: text, tokenizers and tensors live elsewhere. The scheduler moves a sequence
through its states (``WAITING -> RUNNING -> FINISHED``, with ``RUNNING -> PREEMPTED -> RUNNING`` when KV
blocks run out); the block manager fills in ``block_table`` and ``num_cached_tokens``.

Progress is counted in tokens. ``num_computed_tokens`` of the ``num_tokens`` tokens have their KV written
(or being written by the step in flight: the scheduler advances it when it schedules them). The token at
``num_tokens - 1`` is computed by the step that samples the next one, so a decoding sequence always has
``num_computed_tokens == num_tokens - 1`` between steps. A speculative decode step also computes the draft
tokens after it: while it runs, ``num_computed_tokens - num_tokens`` is the number of drafts it verifies, and
the scheduler sets it back to ``num_tokens - 1`` once the accepted tokens are appended (`r1kit.engine.spec_decode`).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from r1kit.generate import GenerationError, SamplingParams, TokenLogprob

_arrivals = itertools.count()  # process-wide arrival order: ties in arrival_time cannot reorder requests


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued, in the running batch, queued again after preemption, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a sequence stopped: a stop token id, its token budget, an abort, or a failure of its own (sampling)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)  # identity semantics: two requests with equal tokens are still two sequences
class Sequence:
    """A request's token ids and engine state.

    ``max_tokens`` (the generation budget) is ``params.new_tokens_for(len(prompt_token_ids))``.
    ``num_prefill_tokens`` is how many tokens must be computed before the next sample: the prompt, or after a
    recompute-style preemption the prompt plus the outputs so far; after that the sequence decodes one token
    per step.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)  # physical KV block ids, in token order
    num_cached_tokens: int = 0  # leading tokens whose KV came from the prefix cache at the last admission
    num_computed_tokens: int = 0  # leading tokens whose KV is written (or scheduled to be, this step)
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrivals))
    num_speculative_tokens: int = 0  # MTP drafts per decode step (0: not speculative; EngineConfig.drafts_for)
    max_tokens: int = field(init=False)
    num_prefill_tokens: int = field(init=False)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of each output token (params.logprobs set)
    guide: Any = None  # r1kit.structured.Guide of a request with params.structured (its matcher's state)
    prompt_logprobs: list[TokenLogprob | None] | None = field(init=False)  # by position (params.prompt_logprobs)
    # the prompt's input embeddings (len(prompt), C) when they are not embed_tokens(prompt) (media merged at
    # placeholders, r1kit.multimodal); cache_salt (a hash of them) starts its prefix-cache hash chain
    prompt_embeds: Any = None
    cache_salt: bytes | None = None

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise GenerationError(f"request {self.request_id!r}: the prompt must have at least one token")
        self.max_tokens = self.params.new_tokens_for(len(self.prompt_token_ids))
        self.num_prefill_tokens = self.num_tokens
        wants = self.params.prompt_logprobs is not None
        self.prompt_logprobs = [None] * len(self.prompt_token_ids) if wants else None  # the first stays None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token(self) -> int:
        """The token a decode step feeds to the model."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_drafts_wanted(self) -> int:
        """Drafts the next decode step would verify: num_speculative_tokens, fewer at the end of the token budget
        (a step that verifies n drafts may emit n + 1 tokens)."""
        return max(0, min(self.num_speculative_tokens, self.max_tokens - self.num_output_tokens - 1))

    @property
    def num_scheduled_drafts(self) -> int:
        """Draft tokens the step in flight computes after the last token (0 outside a speculative decode)."""
        return max(0, self.num_computed_tokens - self.num_tokens)

    @property
    def remaining_prefill(self) -> int:
        """Tokens still to compute before the next sample; 0 once the sequence decodes."""
        return max(self.num_prefill_tokens - self.num_computed_tokens, 0)

    def append_token(self, token_id: int) -> None:
        """Record a sampled token (its KV is written by the next decode step)."""
        self.output_token_ids.append(token_id)

    def preempt(self) -> None:
        """Drop all KV progress for recompute-style preemption; the caller has freed the blocks."""
        self.status = SequenceStatus.PREEMPTED
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_prefill_tokens = self.num_tokens

    def finish(self, reason: FinishReason | str) -> None:
        """Mark the sequence done; the caller frees its blocks."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = FinishReason(reason)
