"""The engine: requests in, tokens out, with continuous batching over a paged KV cache.

    engine = LLMEngine(model, EngineConfig(max_num_seqs=8), stop_ids=[eos])   # or LLMEngine(model, num_blocks=256)
    engine.add_request("a", prompt_ids, SamplingParams(max_new_tokens=64, temperature=0))
    while engine.has_unfinished():
        for request_id, token, finished, reason in engine.step():
            ...
    engine.generate([prompt1, prompt2], SamplingParams(...))   # -> [[ids...], [ids...]]

Each `step()` is one scheduler step (see `r1kit.engine.scheduler`): a request added between two steps joins
the next one, prompts are prefilled in chunks beside running decodes, full prompt blocks are shared through
the prefix cache, and when blocks run out the newest request is preempted and later recomputed.

One request's failure is its own: when sampling fails for a request (e.g. non-finite logits), that request
ends with finish reason ``error`` and its ``StepOutput.error``; the others in the batch carry on.

Speculative decoding (``EngineConfig.num_speculative_tokens`` > 0, per request ``SamplingParams.speculative``;
see `r1kit.engine.spec_decode`): a step may give a request several tokens, one `StepOutput` each, in order.
``engine.spec_stats`` counts drafted and accepted tokens over all speculative requests.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import Any, NamedTuple

import torch

from r1kit.engine.config import EngineConfig
from r1kit.engine.model_runner import ModelRunner
from r1kit.engine.scheduler import Scheduler, SchedulerOutput
from r1kit.engine.sequence import FinishReason, Sequence
from r1kit.engine.speculative import SpeculativeStats
from r1kit.generate import GenerationError, SamplingParams, TokenLogprob, check_budget, check_prompt
from r1kit.model.transformer import Transformer


class StepOutput(NamedTuple):
    """One new token of one request (a speculative step may give a request several, in order); finish_reason is
    set on the request's last token. A request that failed this step has token None, finish_reason ERROR and
    the exception in ``error``. ``logprobs``: the token's (SamplingParams.logprobs); ``prompt_logprobs``: on
    a request's first token, one per prompt token, None for the first (SamplingParams.prompt_logprobs)."""

    request_id: str
    token: int | None
    finished: bool
    finish_reason: FinishReason | None
    error: BaseException | None = None
    logprobs: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def check_prompt_embeds(embeds: Any, num_tokens: int, hidden_size: int, request_id: str | None = None) -> None:
    """GenerationError unless embeds is a finite floating tensor (num_tokens, hidden_size): one row per prompt
    token."""
    where = f"request {request_id!r}: " if request_id else ""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise GenerationError(f"{where}prompt_embeds must be a floating-point torch.Tensor, not "
                              f"{getattr(embeds, 'dtype', type(embeds).__name__)}")
    if tuple(embeds.shape) != (num_tokens, hidden_size):
        raise GenerationError(f"{where}prompt_embeds has shape {tuple(embeds.shape)}, expected ({num_tokens}, "
                              f"{hidden_size}): one row of hidden_size per prompt token")
    if not bool(torch.isfinite(embeds).all()):
        raise GenerationError(f"{where}prompt_embeds holds NaN or infinite values")


def embeds_hash(embeds: torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes: the prefix-cache salt of a prompt with its own embeddings."""
    raw = embeds.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{embeds.dtype}{tuple(embeds.shape)}".encode() + raw).digest()


class LLMEngine:
    """Continuous-batching inference over a paged KV cache (see the module doc).

    ``config`` holds every engine setting (see `EngineConfig`: block size, KV pool size, batch limits, chunked
    prefill, prefix caching, speculative drafts); keyword ``settings`` override its fields
    (``LLMEngine(model, num_blocks=64)``). ``stop_ids`` end a request (the stop id is output).
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, *, stop_ids: Iterable[int] = (),
                 **settings: Any):
        self.config = (config or EngineConfig()).replace(**settings)
        self.model = model
        self.context_length = model.config.max_position_embeddings
        cfg = self.config
        self.runner = ModelRunner(model, cfg.kv_blocks(model), cfg.block_size, cfg.enable_prefix_caching,
                                  cfg.num_speculative_tokens)
        self.scheduler = Scheduler(self.runner.block_manager, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens, chunk_size=cfg.chunk_size,
                                   stop_ids=stop_ids)
        self.block_manager = self.runner.block_manager
        self.num_steps = 0
        self.num_preemptions = 0
        self.spec_stats = SpeculativeStats()  # speculative requests: tokens, verify rounds, drafted, accepted
        self.spec_stats.track_positions(cfg.num_speculative_tokens)
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt_ids: Seq[int], params: SamplingParams | None = None,
                    guide: Any = None, prompt_embeds: torch.Tensor | None = None) -> None:
        """Queue a request; it joins the next step. Raises GenerationError for a bad request,
        ContextLengthError when prompt + token budget exceed the model's context, SchedulerError for a
        duplicate id or a request larger than the whole KV cache; GenerationError for ``speculative=True`` on
        an engine without speculative decoding. ``guide``: the `r1kit.structured.Guide` of a request with
        ``params.structured`` (its logits are masked to the grammar each step). ``prompt_embeds`` (T, C): the
        prompt's input embeddings in place of embed_tokens(prompt_ids) (media merged at placeholders, e.g.
        `r1kit.multimodal.chat.prompt_embeddings`); prefix-cache hits only with bit-identical embeddings."""
        if not isinstance(request_id, str) or not request_id:
            raise GenerationError(f"request id {request_id!r}: must be a non-empty str")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"request {request_id!r}: params must be a SamplingParams, "
                                  f"not {type(params).__name__}")
        params.validate()
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size, request_id)
        check_budget(len(prompt), params, self.context_length, request_id)
        drafts = self.config.drafts_for(params, request_id)
        if (guide is None) != (params.structured is None):
            raise GenerationError(f"request {request_id!r}: params.structured needs its guide (and a guide its "
                                  "params.structured): r1kit.structured.GuideFactory(tokenizer, vocab).new(spec)")
        seq = Sequence(request_id, prompt, params, num_speculative_tokens=drafts, guide=guide)
        if prompt_embeds is not None:
            check_prompt_embeds(prompt_embeds, len(prompt), self.model.config.hidden_size, request_id)
            seq.prompt_embeds = prompt_embeds.to(self.runner.device, self.model.embed_tokens.weight.dtype)
            seq.cache_salt = embeds_hash(seq.prompt_embeds)
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
        """Run one scheduler step on the model; returns the new tokens of every request that got some (and the
        requests whose sampling failed, finished with reason ERROR)."""
        out = self.scheduler.schedule()
        self.num_steps += 1
        self.num_preemptions += len(out.preempted)
        seqs = out.sample_seqs
        tokens, errors = self.runner.run(out)
        failed = [self._fail(seq, errors[i]) for i, seq in enumerate(seqs) if i in errors]
        ok = [(seq, new) for i, (seq, new) in enumerate(zip(seqs, tokens, strict=True)) if i not in errors]
        self._count_speculative(out, ok)
        before = [seq.num_output_tokens for seq, _ in ok]
        self.scheduler.postprocess([seq for seq, _ in ok], [new for _, new in ok])
        results = [r for (seq, _), n in zip(ok, before, strict=True) for r in self._outputs(seq, n)]
        self.runner.release(r.request_id for r in results if r.finished)
        return results + failed

    def _outputs(self, seq: Sequence, first: int) -> list[StepOutput]:
        """One StepOutput per token seq got this step (its outputs from index ``first``); the last one carries
        the finish."""
        logprobs = seq.logprobs[first:] if seq.params.logprobs is not None else []
        outs = [StepOutput(seq.request_id, token, False, None, logprobs=logprobs[i] if i < len(logprobs) else None,
                           prompt_logprobs=seq.prompt_logprobs if first + i == 0 else None)
                for i, token in enumerate(seq.output_token_ids[first:])]
        if outs:
            outs[-1] = outs[-1]._replace(finished=seq.is_finished, finish_reason=seq.finish_reason)
        if seq.num_speculative_tokens:
            self.spec_stats.tokens += len(outs)
        return outs

    def _count_speculative(self, out: SchedulerOutput, ok: list[tuple[Sequence, list[int]]]) -> None:
        """Count the main-model forwards, drafted and accepted tokens of the step's speculative requests (before
        postprocess, while a decode's computed tokens still count its drafts)."""
        stats = self.spec_stats
        stats.target_forwards += sum(1 for chunk in out.prefills if chunk.seq.num_speculative_tokens)
        decoding = {id(seq) for seq in out.decodes}
        for seq, new in ok:
            if seq.num_speculative_tokens and id(seq) in decoding:
                stats.record_round(seq.num_scheduled_drafts, len(new) - 1)

    def _fail(self, seq: Sequence, error: BaseException) -> StepOutput:
        """End a request whose sampling failed: free its KV blocks, report the error as its last output."""
        self.scheduler.abort(seq.request_id)
        self.runner.release([seq.request_id])
        seq.finish(FinishReason.ERROR)
        return StepOutput(seq.request_id, None, True, FinishReason.ERROR, error)

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
                if r.error is not None:
                    for rid in rids:
                        if self.scheduler.is_unfinished(rid):
                            self.abort(rid)
                    raise GenerationError(f"generate: request {r.request_id!r} failed: {r.error}") from r.error
                outputs[r.request_id].append(r.token)
        return [outputs[rid] for rid in rids]
