"""Continuous batching with chunked prefill, prefix caching and recompute-style preemption.

One engine step is::

    out = scheduler.schedule()                        # what to compute: prefill chunks and decodes
    tokens, _ = runner.run(out)                       # the new tokens of each of out.sample_seqs (model runner)
    finished = scheduler.postprocess(out.sample_seqs, tokens)

Each step spends at most ``max_num_batched_tokens`` tokens, in this order (stall-free batching, as in
Sarathi-Serve and vLLM): one token for every decoding sequence, then the next prompt chunk (at most
``chunk_size`` tokens) of running sequences still in prefill, then new requests from the waiting queue,
first come first served, while the running batch has fewer than ``max_num_seqs`` sequences and the
block manager has room. A request added between two steps therefore joins the very next step.

A speculative sequence's decode also computes its MTP drafts (`r1kit.engine.spec_decode`): once every decode
has its own slot, each one, oldest first, gets slots for up to ``num_drafts_wanted`` drafts from the step
budget and the free blocks left; a decode verifies fewer drafts rather than preempt anything.

When a decoding sequence needs a new KV block and none is free, the most recently arrived running
sequence is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt and outputs so far, largely from the prefix cache when its blocks were not reused
meanwhile) once there is room. No new request is admitted in a step that preempted.

The scheduler advances ``num_computed_tokens`` when it schedules tokens; ``postprocess`` runs after the
model has written their KV: it appends the new tokens (several for a speculative decode: the accepted drafts
and one more), rolls the rejected drafts back (``num_computed_tokens`` to ``num_tokens - 1``, their blocks
freed) and only then lets the newly full blocks enter the prefix cache, so no unverified token is ever hashed.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from r1kit.engine.block_manager import BlockManager
from r1kit.engine.config import EngineConfig, EngineConfigError
from r1kit.engine.sequence import FinishReason, Sequence, SequenceStatus


class SchedulerError(ValueError):
    """Invalid scheduler use: bad limits, duplicate or unknown request, a token for a sequence not sampling."""


@dataclass
class PrefillChunk:
    """Token positions [start, start + length) of seq computed this step. ``sample``: the chunk ends the
    prefill, so the step samples the sequence's next token from the logits of its last position."""

    seq: Sequence
    start: int
    length: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.seq.all_token_ids[self.start:self.start + self.length]


@dataclass
class SchedulerOutput:
    """One step's work. A decode computes position ``seq.num_tokens - 1`` (token ``seq.last_token``)."""

    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the waiting queue this step

    @property
    def num_batched_tokens(self) -> int:
        """Tokens this step computes (until postprocess: the decodes' drafts are counted from their sequences)."""
        return (sum(chunk.length for chunk in self.prefills) + len(self.decodes)
                + sum(seq.num_scheduled_drafts for seq in self.decodes))

    @property
    def sample_seqs(self) -> list[Sequence]:
        """Sequences that get a new token this step, in the order postprocess expects their tokens."""
        return [chunk.seq for chunk in self.prefills if chunk.sample] + self.decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes


class Scheduler:
    """Decides, step by step, which tokens of which sequences the model computes (see the module doc).

    ``chunk_size`` caps one sequence's prefill tokens per step (None: only the step's token budget does).
    ``stop_ids`` finish a sequence when sampled (the stop id is kept in its output). Request ids must be
    unique among unfinished requests.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int = EngineConfig.max_num_seqs,
                 max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens, chunk_size: int | None = None,
                 stop_ids: Iterable[int] = ()):
        try:  # the limits' rules live in EngineConfig
            EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         chunk_size=chunk_size)
        except EngineConfigError as e:
            raise SchedulerError(str(e)) from None
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size or max_num_batched_tokens
        self.stop_ids = frozenset(stop_ids)
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted sequences re-enter at the front
        self.running: list[Sequence] = []  # in arrival order: the last one is preempted first
        self._requests: dict[str, Sequence] = {}  # unfinished requests by id

    def add(self, seq: Sequence) -> None:
        """Queue a new request; it can join the next step."""
        if seq.request_id in self._requests:
            raise SchedulerError(f"add: request {seq.request_id!r} is already queued or running")
        if seq.status is not SequenceStatus.WAITING:
            raise SchedulerError(f"add: request {seq.request_id!r} is {seq.status.value}, not new")
        most = len(seq.prompt_token_ids) + seq.max_tokens - 1  # the last sampled token is never computed
        need = self.block_manager.blocks_needed(most)
        if need > self.block_manager.num_blocks:
            raise SchedulerError(f"add: request {seq.request_id!r} may need {need} KV blocks ({most} tokens) but "
                                 f"the cache has {self.block_manager.num_blocks}; shorten it or enlarge the cache")
        self.waiting.append(seq)
        self._requests[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence:
        """Finish a waiting or running request with reason "abort", freeing its blocks; returns it."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            raise SchedulerError(f"abort: no unfinished request {request_id!r} (unknown, or already finished)")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.finish(FinishReason.ABORT)
        return seq

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def is_unfinished(self, request_id: str) -> bool:
        """Whether this request is waiting or running."""
        return request_id in self._requests

    def schedule(self) -> SchedulerOutput:
        """Pick this step's decodes and prefill chunks (and preempt when KV blocks run out)."""
        out = SchedulerOutput()
        self._schedule_decodes(out)
        budget = self.max_num_batched_tokens - len(out.decodes)
        budget -= self._schedule_drafts(out, budget)
        for seq in self.running:
            if budget == 0:
                break
            if seq.remaining_prefill:
                budget -= self._schedule_chunk(seq, budget, out)
        if out.preempted:
            return out
        while (self.waiting and budget and len(self.running) < self.max_num_seqs
               and self.block_manager.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_order)
            budget -= self._schedule_chunk(seq, budget, out)
        return out

    def postprocess(self, seqs: list[Sequence], new_tokens: list[list[int]]) -> list[Sequence]:
        """Record the step's tokens (new_tokens[i]: the tokens seqs[i] got, one, or for a speculative decode its
        accepted drafts and one more); returns the sequences that finished.

        Call after the model ran the step from ``schedule()``, with its ``sample_seqs``. A sequence finishes
        on a stop id (the tokens after it are dropped) or when it has ``max_tokens`` outputs; its blocks are
        freed. Tokens of sequences aborted while the step ran are dropped.
        """
        if len(seqs) != len(new_tokens):
            raise SchedulerError(f"postprocess: {len(seqs)} sequences but {len(new_tokens)} tokens")
        finished = [seq for seq, tokens in zip(seqs, new_tokens, strict=True)
                    if not seq.is_finished and self._append(seq, tokens)]
        for seq in self.running:  # the step wrote their KV: full blocks of accepted tokens can now be shared
            self.block_manager.cache_full_blocks(seq)
        for seq in finished:
            self.block_manager.free(seq)
            del self._requests[seq.request_id]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    # ------------------------------------------------------------------------------------------ internals
    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        """One token for each decoding sequence, oldest first, preempting the newest when blocks run out."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            i += 1
            if seq.remaining_prefill:
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running.pop()  # newer than every sequence scheduled so far
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return
            self.block_manager.append_slot(seq)
            seq.num_computed_tokens += 1
            out.decodes.append(seq)

    def _schedule_drafts(self, out: SchedulerOutput, budget: int) -> int:
        """Slots for the speculative decodes' drafts, oldest first, within budget and the free blocks; returns
        the tokens they add to the step."""
        used = 0
        for seq in out.decodes:
            n = min(seq.num_drafts_wanted, budget - used)
            while n and not self.block_manager.can_append(seq, n):
                n -= 1
            if n:
                self.block_manager.append_slot(seq, n)
                seq.num_computed_tokens += n
                used += n
        return used

    def _append(self, seq: Sequence, tokens: list[int]) -> bool:
        """Append seq's new tokens up to a stop id or its budget and roll back the rejected drafts (the slots
        past its last token are freed); returns whether it finished."""
        drafts = seq.num_computed_tokens - seq.num_tokens  # verified this step (0: a plain sample)
        if seq.status is not SequenceStatus.RUNNING or drafts < 0 or not 1 <= len(tokens) <= 1 + drafts:
            raise SchedulerError(f"postprocess: request {seq.request_id!r} was not scheduled to sample "
                                 f"{len(tokens)} token(s)")
        for token in tokens:
            seq.append_token(token)
            if token in self.stop_ids:
                seq.finish(FinishReason.STOP)
            elif seq.num_output_tokens >= seq.max_tokens:
                seq.finish(FinishReason.LENGTH)
            if seq.is_finished:
                break
        seq.num_computed_tokens = seq.num_tokens - 1  # the last token's KV is written by the next step
        if not seq.is_finished:
            self.block_manager.rollback(seq)
        return seq.is_finished

    def _schedule_chunk(self, seq: Sequence, budget: int, out: SchedulerOutput) -> int:
        """Schedule seq's next prefill chunk within budget; returns its length."""
        n = min(seq.remaining_prefill, self.chunk_size, budget)
        out.prefills.append(PrefillChunk(seq, seq.num_computed_tokens, n, sample=n == seq.remaining_prefill))
        seq.num_computed_tokens += n
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
