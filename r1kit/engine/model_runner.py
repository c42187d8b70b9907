"""The tensor side of the engine: the paged KV pools, one model step per `SchedulerOutput`, and sampling.

``tokens = runner.run(scheduler.schedule())`` packs the step's prefill chunks and decodes into one flat batch
(prefills first, then decodes, the order of ``SchedulerOutput.sample_seqs``), runs
`Transformer.forward_paged` over the paged KV pools, and samples one token per sampling sequence with
`r1kit.generate.sample` and that request's own `SamplingParams`. A request with a seed has its own
`torch.Generator`, kept across steps (and across preemption) until `release`: its draws do not depend on
which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from r1kit.engine.block_manager import BlockManager
from r1kit.engine.scheduler import SchedulerOutput
from r1kit.engine.sequence import Sequence
from r1kit.generate import SamplingParams, sample
from r1kit.model.attention import PagedBatch
from r1kit.model.transformer import Transformer


def _sampler_key(params: SamplingParams) -> tuple:
    """Rows whose params give the same key are sampled together (only these fields affect `sample`)."""
    if params.temperature == 0:
        return (0, params.repetition_penalty)
    return (params.temperature, params.top_k, params.top_p, params.repetition_penalty)


class ModelRunner:
    """Owns the model's paged KV pools (``num_blocks * block_size`` slots per layer, the model's dtype and
    device) and the `BlockManager` that hands out their blocks; runs one scheduler step at a time."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model
        self.block_manager = BlockManager(num_blocks, block_size)  # validates the sizes
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = model.embed_tokens.weight.device
        self.vocab_size = model.config.vocab_size
        self.kv_pool = model.new_paged_cache(num_blocks * block_size)
        self._generators: dict[str, torch.Generator] = {}  # request id -> its seeded generator

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        """KV pool bytes one block takes over all layers."""
        pools = model.new_paged_cache(block_size, device="meta")
        return sum(t.numel() * t.element_size() for layer in pools for t in layer)

    @classmethod
    def num_blocks_for(cls, model: Transformer, memory_bytes: int, block_size: int = 16) -> int:
        """How many blocks of block_size slots fit in memory_bytes of KV pool."""
        return memory_bytes // cls.bytes_per_block(model, block_size)

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget the sampling state of finished or aborted requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    # ------------------------------------------------------------------------------------------ one step
    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, PagedBatch]:
        """The step's flat token ids (N,) and its PagedBatch (logits rows: the last token of each sampling
        sequence, in ``out.sample_seqs`` order)."""
        ids: list[int] = []
        contexts: list[tuple[list[int], int, int]] = []  # (block table, context length, new tokens)
        sample_rows: list[int] = []
        for chunk in out.prefills:
            ids.extend(chunk.token_ids)
            contexts.append((chunk.seq.block_table, chunk.start + chunk.length, chunk.length))
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        for seq in out.decodes:  # computes position num_tokens - 1
            ids.append(seq.last_token)
            contexts.append((seq.block_table, seq.num_tokens, 1))
            sample_rows.append(len(ids) - 1)
        batch = PagedBatch.build(contexts, self.block_size, self.device, sample_rows)
        return torch.tensor(ids, dtype=torch.long, device=self.device), batch

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> list[int]:
        """Compute the step's tokens (writing their KV) and return one sampled token per out.sample_seqs."""
        if out.is_empty:
            return []
        ids, batch = self.prepare(out)
        logits = self.model.forward_paged(ids, batch, self.kv_pool)  # (M, V)
        seqs = out.sample_seqs
        if not seqs:
            return []
        return self.sample(logits, seqs)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of logits (M, V) for seqs[row], with each sequence's params; rows with equal
        params and no seed are sampled together, seeded ones each with their own generator."""
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(seqs):
            key = ("seed", row) if seq.params.seed is not None and seq.params.temperature != 0 else None
            groups.setdefault(key or _sampler_key(seq.params), []).append(row)
        for rows in groups.values():
            params = seqs[rows[0]].params
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=logits.device)
                for i, row in enumerate(rows):
                    seen[i, torch.tensor(seqs[row].all_token_ids, device=logits.device)] = True
            tokens[index] = sample(logits.index_select(0, index), params, seen, self._generator(seqs[rows[0]]))
        return tokens.tolist()  # the one host transfer per step

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.temperature == 0:
            return None
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return gen
