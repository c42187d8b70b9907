"""The engine: requests in, tokens out, with continuous batching over a paged KV cache.

    engine = LLMEngine(model, num_blocks=256, block_size=16, stop_ids=[eos])
    engine.add_request("a", prompt_ids, SamplingParams(max_new_tokens=64, temperature=0))
    while engine.has_unfinished():
        for request_id, token, finished, reason in engine.step():
            ...
    engine.generate([prompt1, prompt2], SamplingParams(...))   # -> [[ids...], [ids...]]

Each `step()` is one scheduler step (see `r1kit.engine.scheduler`): a request added between two steps joins
the next one, prompts are prefilled in chunks beside running decodes, full prompt blocks are shared through
the prefix cache, and when blocks run out the newest request is preempted and later recomputed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import NamedTuple

from r1kit.engine.model_runner import ModelRunner
from r1kit.engine.scheduler import Scheduler
from r1kit.engine.sequence import FinishReason, Sequence
from r1kit.generate import GenerationError, SamplingParams
from r1kit.model.transformer import ContextLengthError, Transformer


class StepOutput(NamedTuple):
    """One new token of one request; finish_reason is set on the request's last token."""

    request_id: str
    token: int
    finished: bool
    finish_reason: FinishReason | None


class LLMEngine:
    """Continuous-batching inference over a paged KV cache (see the module doc).

    ``num_blocks`` KV blocks of ``block_size`` token slots per layer; None: ``memory_bytes`` worth of KV
    pool when given, else enough blocks for one request of the model's full context. ``max_num_seqs``
    caps the running batch, ``max_num_batched_tokens`` the tokens of one step, ``chunk_size`` one prompt's
    tokens per step (None: only the step budget). ``stop_ids`` end a request (the stop id is output).
    """

    def __init__(self, model: Transformer, num_blocks: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, chunk_size: int | None = None,
                 stop_ids: Iterable[int] = (), memory_bytes: int | None = None):
        self.model = model
        self.context_length = model.config.max_position_embeddings
        if num_blocks is None:
            if memory_bytes is not None:
                num_blocks = ModelRunner.num_blocks_for(model, memory_bytes, block_size)
            else:
                num_blocks = -(-self.context_length // block_size)
        self.runner = ModelRunner(model, num_blocks, block_size)
        self.scheduler = Scheduler(self.runner.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, chunk_size=chunk_size,
                                   stop_ids=stop_ids)
        self.block_manager = self.runner.block_manager
        self.num_steps = 0
        self.num_preemptions = 0
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams | None = None) -> None:
        """Queue a request; it joins the next step. Raises GenerationError for a bad request,
        ContextLengthError when prompt + token budget exceed the model's context, SchedulerError for a
        duplicate id or a request larger than the whole KV cache."""
        if not isinstance(request_id, str) or not request_id:
            raise GenerationError(f"request id {request_id!r}: must be a non-empty str")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"request {request_id!r}: params must be a SamplingParams, "
                                  f"not {type(params).__name__}")
        params.validate()
        prompt = list(prompt_ids)
        vocab = self.model.config.vocab_size
        for i, t in enumerate(prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise GenerationError(f"request {request_id!r}: prompt token {i} = {t!r} is not a token id "
                                      f"in [0, {vocab})")
        seq = Sequence(request_id, prompt, params)  # empty prompt, max_length too short: GenerationError
        need = len(prompt) + seq.max_tokens
        if need > self.context_length:
            raise ContextLengthError(f"request {request_id!r}: {len(prompt)} prompt tokens + {seq.max_tokens} new "
                                     f"tokens = {need} exceeds the model's context of {self.context_length} "
                                     f"tokens; shorten the prompt or generate fewer tokens")
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> list[int]:
        """Stop a waiting or running request and free its KV blocks; returns the tokens it generated so far.
        SchedulerError for an unknown or finished request."""
        seq = self.scheduler.abort(request_id)
        self.runner.release([request_id])
        return list(seq.output_token_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------------ stepping
    def step(self) -> list[StepOutput]:
        """Run one scheduler step on the model; returns the new token of every request that got one."""
        out = self.scheduler.schedule()
        self.num_steps += 1
        self.num_preemptions += len(out.preempted)
        seqs = out.sample_seqs
        tokens = self.runner.run(out)
        self.scheduler.postprocess(seqs, tokens)
        results = [StepOutput(seq.request_id, token, seq.is_finished, seq.finish_reason)
                   for seq, token in zip(seqs, tokens, strict=True)]
        self.runner.release(r.request_id for r in results if r.finished)
        return results

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion on an idle engine; returns each prompt's generated token ids (a stop id
        included). params: one SamplingParams for all, or one per prompt."""
        if self.has_unfinished():
            raise GenerationError("generate() needs an idle engine: other requests are queued or running "
                                  "(drive them with step(), or abort them)")
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        rids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = f"generate-{next(self._ids)}"
                self.add_request(rid, prompt, p)
                rids.append(rid)
        except Exception:
            for rid in rids:
                self.abort(rid)
            raise
        outputs: dict[str, list[int]] = {rid: [] for rid in rids}
        while self.has_unfinished():
            for r in self.step():
                outputs[r.request_id].append(r.token)
        return [outputs[rid] for rid in rids]
