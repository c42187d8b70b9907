"""The tensor side of the engine: the paged KV pools, one model step per `SchedulerOutput`, and sampling.

``tokens, errors = runner.run(scheduler.schedule())`` packs the step's prefill chunks and decodes into one flat batch
(prefills first, then decodes, the order of ``SchedulerOutput.sample_seqs``), runs
`Transformer.forward_paged` over the paged KV pools, and samples one token per sampling sequence with
`r1kit.generate.sample` and that request's own `SamplingParams`. A request with a seed has its own
`torch.Generator`, kept across steps (and across preemption) until `release`: its draws do not depend on
which other requests share the batch. When sampling a group of rows fails, its rows are sampled one by one so
that only the request at fault fails (`run` returns its error beside the tokens).

With ``num_speculative_tokens`` > 0 the runner also owns the MTP drafter's paged pools (`r1kit.engine.spec_decode`):
before the forward the speculative decodes draft, in the forward each verifies its drafts as extra rows, and
after it each gets its accepted drafts and one more token, so `run` returns a list of tokens per sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from r1kit.engine.block_manager import BlockManager
from r1kit.engine.scheduler import PrefillChunk, SchedulerOutput
from r1kit.engine.sequence import Sequence
from r1kit.engine.spec_decode import PagedDrafter, accept, query_contexts
from r1kit.engine.speculative import DraftPicker
from r1kit.generate import SamplingParams, sample, token_logprobs
from r1kit.model.attention import PagedBatch
from r1kit.model.transformer import Transformer
from r1kit.structured import apply_guides


def _sampler_key(params: SamplingParams) -> tuple:
    """Rows whose params give the same key are sampled together (only these fields affect `sample`)."""
    if params.temperature == 0:
        return (0, params.repetition_penalty)
    return (params.temperature, params.top_k, params.top_p, params.repetition_penalty)


def _prompt_logprob_chunks(out: SchedulerOutput) -> list[tuple[PrefillChunk, int]]:
    """The step's prefill chunks whose sequence wants its prompt's log-probabilities, each with its first row
    in the step's flat tokens (prefill chunks come first, in order)."""
    firsts = [0, *itertools.accumulate(chunk.length for chunk in out.prefills)]
    return [(chunk, first) for chunk, first in zip(out.prefills, firsts, strict=False)
            if chunk.seq.prompt_logprobs is not None]


class ModelRunner:
    """Owns the model's paged KV pools (``num_blocks * block_size`` slots per layer, the model's dtype and
    device) and the `BlockManager` that hands out their blocks; runs one scheduler step at a time.
    ``num_speculative_tokens`` > 0: also the MTP drafter of speculative requests, with a pool per draft."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_speculative_tokens: int = 0):
        self.model = model
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)  # validates the sizes
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = model.embed_tokens.weight.device
        self.vocab_size = model.config.vocab_size
        self.kv_pool = model.new_paged_cache(num_blocks * block_size)
        self.drafter = (PagedDrafter(model, num_speculative_tokens, num_blocks * block_size, block_size)
                        if num_speculative_tokens else None)
        self._generators: dict[str, torch.Generator] = {}  # request id -> its seeded generator

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget the sampling (and drafting) state of finished or aborted requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)
            if self.drafter is not None:
                self.drafter.release(rid)

    # ------------------------------------------------------------------------------------------ one step
    def prepare(self, out: SchedulerOutput, drafts: list[list[int]] | None = None) -> tuple[torch.Tensor, PagedBatch]:
        """The step's flat token ids (N,) and its PagedBatch (logits rows: the last token of each sampling
        sequence, in ``out.sample_seqs`` order; a decode that verifies drafts, ``drafts[i]`` for
        ``out.decodes[i]``, has a row for its last token and one per draft)."""
        ids: list[int] = []
        contexts: list[tuple[list[int], int, int]] = []  # (block table, context length, new tokens)
        sample_rows: list[int] = []
        for chunk in out.prefills:
            ids.extend(chunk.token_ids)
            contexts.append((chunk.seq.block_table, chunk.start + chunk.length, chunk.length))
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        for i, seq in enumerate(out.decodes):  # computes position num_tokens - 1 (and the drafts after it)
            extra = drafts[i] if drafts else []
            ids += [seq.last_token, *extra]
            contexts += query_contexts(seq.block_table, seq.num_tokens + len(extra), 1 + len(extra))
            sample_rows += range(len(ids) - 1 - len(extra), len(ids))
        sample_rows += [first + i for chunk, first in _prompt_logprob_chunks(out) for i in range(chunk.length)]
        batch = PagedBatch.build(contexts, self.block_size, self.device, sample_rows)
        return torch.tensor(ids, dtype=torch.long, device=self.device), batch

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[list[list[int]], dict[int, Exception]]:
        """Compute the step's tokens (writing their KV); returns the new tokens of each of out.sample_seqs (one
        sampled token, or for a speculative decode its accepted drafts and one more) and {row: error} for the
        sequences whose sampling or drafting failed (their tokens are meaningless)."""
        if out.is_empty:
            return [], {}
        drafts, pickers, errors = self._draft(out)
        ids, batch = self.prepare(out, drafts)
        logits, hidden = self.model.forward_paged(ids, batch, self.kv_pool, return_hidden=True,  # (M, V), (N, C)
                                                  inputs_embeds=self.input_embeds(out, ids))
        chunks = _prompt_logprob_chunks(out)
        if chunks:  # the prompt rows' logits come after the sampling rows' (see prepare)
            split = logits.shape[0] - sum(chunk.length for chunk, _ in chunks)
            self._record_prompt_logprobs(logits[split:], chunks)
            logits = logits[:split]
        tokens = self._sample_and_verify(logits, out, drafts, pickers, errors)
        if self.drafter is not None:
            self._carry_hidden(out, hidden, drafts, tokens, errors)
        return tokens, errors

    def input_embeds(self, out: SchedulerOutput, ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings (N, C) when a prefill chunk's sequence carries prompt embeddings (media):
        its prompt rows from ``seq.prompt_embeds``, every other row embed_tokens(ids); None when none does."""
        if all(c.seq.prompt_embeds is None for c in out.prefills):  # text only (every decode step): no work
            return None
        firsts = [0, *itertools.accumulate(chunk.length for chunk in out.prefills)]
        chunks = [(c, first) for c, first in zip(out.prefills, firsts, strict=False) if c.seq.prompt_embeds is not None]
        x = self.model.embed_tokens(ids)  # (N, C)
        for chunk, first in chunks:  # a recomputed (preempted) sequence's outputs are plain tokens
            end = min(chunk.start + chunk.length, len(chunk.seq.prompt_token_ids))
            if end > chunk.start:
                x[first:first + end - chunk.start] = chunk.seq.prompt_embeds[chunk.start:end]
        return x

    # ------------------------------------------------------------------------------------------ speculative
    def _draft(self, out: SchedulerOutput) -> tuple[list[list[int]], dict[int, DraftPicker], dict[int, Exception]]:
        """MTP drafts for the speculative decodes that will decode again; returns per decode the drafts its step
        verifies, {decode index: its draft picker} and {sample row: error} for the failed drafts."""
        drafts: list[list[int]] = [[] for _ in out.decodes]
        if self.drafter is None:
            return drafts, {}, {}
        index = [i for i, seq in enumerate(out.decodes) if seq.num_drafts_wanted]
        pickers = {i: DraftPicker(out.decodes[i].params, self._seen(out.decodes[i]), self._generator(out.decodes[i]))
                   for i in index}
        drafted, failed = self.drafter.propose([out.decodes[i] for i in index], [pickers[i] for i in index])
        for i, d in zip(index, drafted, strict=True):
            drafts[i] = d[:out.decodes[i].num_scheduled_drafts]
        first_decode_row = len(out.sample_seqs) - len(out.decodes)
        return drafts, pickers, {first_decode_row + index[b]: e for b, e in failed.items()}

    def _sample_and_verify(self, logits: torch.Tensor, out: SchedulerOutput, drafts: list[list[int]],
                           pickers: dict[int, DraftPicker], errors: dict[int, Exception]) -> list[list[int]]:
        """Each sample row's tokens from its logits rows: one sampled token, or a speculative decode's verified
        drafts and one more. Errors are added to ``errors`` by sample row."""
        seqs = out.sample_seqs
        first_decode_row = len(seqs) - len(out.decodes)
        counts = [1] * first_decode_row + [1 + len(d) for d in drafts]
        firsts = [0, *itertools.accumulate(counts)][:-1]  # each sample row's first logits row
        plain = [r for r in range(len(seqs)) if r - first_decode_row not in pickers]
        tokens: list[list[int]] = [[] for _ in seqs]
        if plain:
            rows = torch.tensor([firsts[r] for r in plain], dtype=torch.long, device=logits.device)
            plain_logits = logits.index_select(0, rows)  # (len(plain), V)
            plain_seqs = [seqs[r] for r in plain]
            sampled, failed = self.sample(apply_guides(plain_logits, [s.guide for s in plain_seqs]), plain_seqs)
            self._advance_guides(plain_seqs, sampled, failed)
            errors.update({plain[i]: e for i, e in failed.items()})
            self._record_logprobs(plain_logits, plain_seqs, sampled, failed)
            for r, token in zip(plain, sampled, strict=True):
                tokens[r] = [token]
        for i, picker in pickers.items():
            r = first_decode_row + i
            if r in errors:
                continue
            try:
                tokens[r] = accept(logits[firsts[r]:firsts[r] + counts[r]], drafts[i], picker, seqs[r],
                                   self._generator(seqs[r]))
            except Exception as e:  # noqa: BLE001 - the request at fault fails, the others go on
                errors[r] = e
        return tokens

    def _carry_hidden(self, out: SchedulerOutput, hidden: torch.Tensor, drafts: list[list[int]],
                      tokens: list[list[int]], errors: dict[int, Exception]) -> None:
        """Hand the drafter the main model's hidden states of the speculative sequences' accepted positions:
        every prefill chunk row, and a decode's rows up to its last accepted draft."""
        row = 0
        for chunk in out.prefills:
            if chunk.seq.num_speculative_tokens:
                self.drafter.add_hidden(chunk.seq, hidden[row:row + chunk.length], first=chunk.start == 0)
            row += chunk.length
        first_decode_row = len(out.sample_seqs) - len(out.decodes)
        for i, seq in enumerate(out.decodes):
            r = first_decode_row + i
            if seq.num_drafts_wanted and r not in errors:
                self.drafter.add_hidden(seq, hidden[row:row + len(tokens[r])], first=False)
            row += 1 + len(drafts[i])

    @staticmethod
    def _advance_guides(seqs: list[Sequence], tokens: list[int], failed: dict[int, Exception]) -> None:
        """Feed each constrained sequence's sampled token to its grammar matcher; a refusal fails that row."""
        for i, seq in enumerate(seqs):
            if seq.guide is not None and i not in failed:
                try:
                    seq.guide.advance(tokens[i])
                except Exception as e:  # noqa: BLE001 - the request at fault fails, the others go on
                    failed[i] = e

    def _record_logprobs(self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int],
                         failed: dict[int, Exception]) -> None:
        """Append each sampled token's TokenLogprob to the sequences that asked (params.logprobs); logits (M, V)
        are the rows the tokens were sampled from."""
        rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None and i not in failed]
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        found = token_logprobs(logits.index_select(0, index), [tokens[i] for i in rows],
                               [seqs[i].params.logprobs for i in rows])
        for i, logprob in zip(rows, found, strict=True):
            seqs[i].logprobs.append(logprob)

    def _record_prompt_logprobs(self, logits: torch.Tensor, chunks: list[tuple[PrefillChunk, int]]) -> None:
        """Fill seq.prompt_logprobs from the logits (sum of chunk lengths, V) of every position of the chunks:
        position p's row predicts the token at p + 1, a prompt token while p + 1 < prompt length."""
        row = 0
        for chunk, _ in chunks:
            seq, prompt = chunk.seq, chunk.seq.prompt_token_ids
            positions = [p for p in range(chunk.start, chunk.start + chunk.length) if p + 1 < len(prompt)]
            if positions:
                rows = logits[row + positions[0] - chunk.start: row + positions[-1] - chunk.start + 1]
                found = token_logprobs(rows, [prompt[p + 1] for p in positions],
                                       [seq.params.prompt_logprobs] * len(positions))
                for p, logprob in zip(positions, found, strict=True):
                    seq.prompt_logprobs[p + 1] = logprob
            row += chunk.length

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        """(1, V) bool: the tokens of seq, for the repetition penalty (None without one)."""
        if seq.params.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
        seen[0, torch.tensor(seq.all_token_ids, device=self.device)] = True
        return seen

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, Exception]]:
        """One token per row of logits (M, V) for seqs[row], with each sequence's params; rows with equal
        params and no seed are sampled together, seeded ones each with their own generator. A group that fails
        is sampled again row by row: only the rows that fail alone are reported, as {row: error}."""
        tokens = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(seqs):
            key = ("seed", row) if seq.params.seed is not None and seq.params.temperature != 0 else None
            groups.setdefault(key or _sampler_key(seq.params), []).append(row)
        errors: dict[int, Exception] = {}
        for rows in groups.values():
            try:
                self._sample_rows(logits, seqs, rows, tokens)
            except Exception:  # noqa: BLE001 - find the request at fault, the others go on
                for row in rows:
                    try:
                        self._sample_rows(logits, seqs, [row], tokens)
                    except Exception as e:  # noqa: BLE001
                        errors[row] = e
        return tokens.tolist(), errors  # the one host transfer per step

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int], tokens: torch.Tensor
                     ) -> None:
        """Sample rows (sharing one SamplingParams) into tokens[rows]."""
        params = seqs[rows[0]].params
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        seen = torch.cat([self._seen(seqs[row]) for row in rows]) if params.repetition_penalty != 1.0 else None
        tokens[index] = sample(logits.index_select(0, index), params, seen, self._generator(seqs[rows[0]]))

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.temperature == 0:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return gen
