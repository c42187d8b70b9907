"""Speculative decoding in the paged engine: MTP drafts for a whole batch, verified in one forward.

The protocol is `r1kit.engine.speculative`'s (draft with the model's own MTP modules, verify with one
main-model forward, accept by the rejection rule, roll back), spread over the engine's parts so that every
running request of a step drafts and verifies together:

1. schedule (`Scheduler`): a speculative request's decode computes its last token and up to
   ``num_speculative_tokens`` drafts after it. Its drafts get KV slots after every decode has its own, within
   the step's token budget and the free blocks (fewer drafts rather than a preemption), and never past the
   request's token budget;
2. draft (`PagedDrafter.propose`): for j = 0 .. k - 1, one batched forward of MTP depth j over the speculative
   decodes, each sequence's rows packed as in `Transformer.forward_paged`. Depth j at position s reads depth
   j - 1's hidden state there (depth 0: the main model's) and the token x[s + 1 + j]; its KV lives in a paged
   pool of its own (one per draft position, a depth reused past the model's MTP depths as in `MTPDrafter`),
   addressed by the sequence's block table. Each draft is picked as the target would pick it (argmax, or a
   draw from the warped distribution q with the request's own generator);
3. verify (`ModelRunner.run`): one `forward_paged` of the whole step, where a speculative decode computes
   [x[R], d_1 .. d_n] and its n + 1 rows give the target distributions. Such short blocks (and the few
   positions an MTP depth computes per round) enter the batch as single-query rows of growing context
   (`query_contexts`): their KV is written before any row attends, so row i sees the rows before it, and every
   row joins the step's one batched decode attention instead of attending sequence by sequence;
4. accept: `speculative.accept_drafts` (greedy: the drafts equal to the target's argmax, then the argmax; sampled:
   `verify_drafts`' rejection sampling against q) returns the accepted drafts and one more token;
5. roll back: `Scheduler.postprocess` appends them, sets ``num_computed_tokens`` back to ``num_tokens - 1`` and
   frees the blocks that only rejected drafts used (`BlockManager.rollback`); a block enters the prefix cache
   only once all its tokens are accepted. The MTP pools never hold a rejected draft past the next round: depth
   j keeps the positions whose inputs are all accepted (s < R - j) and recomputes the others each round, from
   the hidden states it carries (`_DraftState`), exactly as `MTPDrafter` does for one sequence.

A speculative request drafts all k tokens at every decode that is not its last, even when the step verifies
fewer, so that each depth's state advances every round. It takes no prefix-cache hits: its MTP depths need
the main model's hidden state at every position, so it computes its whole prompt (the blocks of accepted tokens
it writes still serve later plain requests). The output is exact: greedy requests get the tokens of the
engine without speculation; sampled ones follow the target distribution (tests/test_engine_speculative.py).

``EngineConfig.num_speculative_tokens`` (``r1kit serve --speculative`` / ``--speculative-tokens N``) sets k;
``SamplingParams.speculative`` opts a request in or out. Sparse-attention models and models without MTP layers
are refused (`check_speculative_supported`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from r1kit.engine.config import check_speculative_supported
from r1kit.engine.sequence import Sequence
from r1kit.engine.speculative import DraftPicker, accept_drafts
from r1kit.model.attention import PagedBatch
from r1kit.model.transformer import Transformer

MAX_SPLIT_QUERIES = 16  # new tokens of a sequence up to which they attend as single-query rows (query_contexts)


def query_contexts(table: list[int], ctx: int, q_len: int) -> list[tuple[list[int], int, int]]:
    """`PagedBatch.build` contexts for the q_len new tokens at positions ctx - q_len .. ctx - 1 of a sequence
    with block table ``table``: up to MAX_SPLIT_QUERIES of them as single-query rows (contexts ctx - q_len + 1
    .. ctx), which attend in the batched decode path; more as one multi-token sequence."""
    if q_len > MAX_SPLIT_QUERIES:
        return [(table, ctx, q_len)]
    return [(table, c, 1) for c in range(ctx - q_len + 1, ctx + 1)]


@dataclass
class _DraftState:
    """One sequence's MTP state between steps, per draft position j: ``pos[j]`` positions of pool j hold final
    entries (all inputs accepted); ``carry[j]`` (r, C) holds the input hidden states of positions pos[j] ..
    pos[j] + r - 1 that depth j has not consumed yet."""

    pos: list[int]
    carry: list[torch.Tensor]


class PagedDrafter:
    """The MTP draft model of every speculative sequence, on paged KV pools of ``num_slots`` slots (the main
    pool's size: the same block tables address them), one pool per draft position."""

    def __init__(self, model: Transformer, num_draft: int, num_slots: int, block_size: int):
        check_speculative_supported(model.config)
        self.model, self.num_draft, self.block_size = model, num_draft, block_size
        w = model.embed_tokens.weight
        self.layers = [model.mtp[min(j, len(model.mtp) - 1)] for j in range(num_draft)]
        self.pools = [layer.block.self_attn.new_paged_cache(num_slots, w.dtype, w.device) for layer in self.layers]
        self._states: dict[str, _DraftState] = {}  # request id -> its state

    def add_hidden(self, seq: Sequence, hidden: torch.Tensor, first: bool) -> None:
        """Main-model final hidden states (T, C) of seq's next T positions, all of accepted tokens. ``first``:
        they start at position 0 (a new prefill, also after a preemption), so the old state is dropped."""
        state = None if first else self._states.get(seq.request_id)
        if state is None:
            empty = hidden.new_zeros(0, hidden.shape[-1])
            state = self._states[seq.request_id] = _DraftState([0] * self.num_draft, [empty] * self.num_draft)
        state.carry[0] = torch.cat((state.carry[0], hidden))

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def propose(self, seqs: list[Sequence], pickers: list[Callable[[int, torch.Tensor], int]]
                ) -> tuple[list[list[int]], dict[int, Exception]]:
        """num_draft drafts after each sequence's last token x[R] (R = num_tokens - 1 >= 1): pickers[i](j, logits
        (1, V)) picks sequence i's draft j (a `DraftPicker` keeps q and the repetition-penalty rows). Returns
        the drafts and {index: error} for the sequences whose pick failed (they draft no further)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        errors: dict[int, Exception] = {}
        prev: list[torch.Tensor | None] = [None] * len(seqs)  # depth j - 1's output rows this round
        for j in range(self.num_draft):
            live = [i for i in range(len(seqs)) if i not in errors]
            if not live:
                break
            rows, logits = self._forward(j, [seqs[i] for i in live], [drafts[i] for i in live],
                                         [prev[i] for i in live])
            for b, i in enumerate(live):
                prev[i] = rows[b]
                try:
                    drafts[i].append(pickers[i](j, logits[b:b + 1]))
                except Exception as e:  # noqa: BLE001 - this request fails, the others draft on
                    errors[i] = e
        return drafts, errors

    # ------------------------------------------------------------------------------------------ internals
    def _forward(self, j: int, seqs: list[Sequence], drafts: list[list[int]], prev: list[torch.Tensor | None]
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Depth j over positions pos[j] .. R - 1 of each sequence in one packed batch; returns each sequence's
        output rows and the logits (B, V) of its last position, which predict x[R + 1 + j]. Advances the
        states: the entries kept are those whose inputs are all accepted."""
        model, layer = self.model, self.layers[j]
        h_in, ids, contexts, last_rows = [], [], [], []
        for seq, seq_drafts, rows in zip(seqs, drafts, prev, strict=True):
            state, R = self._states[seq.request_id], seq.num_tokens - 1
            h = state.carry[j] if rows is None else torch.cat((state.carry[j], rows))  # (R - pos[j], C)
            start = state.pos[j]
            if h.shape[0] != R - start:
                raise RuntimeError(f"MTP draft position {j} of request {seq.request_id!r}: {h.shape[0]} hidden "
                                   f"states for {R - start} positions")
            tokens = seq.all_token_ids + seq_drafts
            ids += tokens[start + j + 1:R + j + 1]  # depth j at position s reads x[s + 1 + j]
            contexts += query_contexts(seq.block_table, R, R - start)
            h_in.append(h)
            last_rows.append(len(ids) - 1)
            state.pos[j] = max(0, R - j)  # keep s <= R - 1 - j; carry the input of position R - j (j >= 1)
            state.carry[j] = h[state.pos[j] - start:max(0, R - j + 1) - start]
        device = model.embed_tokens.weight.device
        batch = PagedBatch.build(contexts, self.block_size, device, last_rows)
        x = torch.cat(h_in)  # (N, C)
        rope = model.rotary(batch.positions[None], x.dtype)
        embed = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=device))
        out = layer.forward_paged(x[None], embed[None], rope, batch, self.pools[j])[0]  # (N, C)
        logits = model.lm_head(layer.shared_head_norm(out.index_select(0, batch.logits_rows)))  # (B, V)
        return list(out.split([h.shape[0] for h in h_in])), logits


def accept(logits: torch.Tensor, drafts: list[int], picker: DraftPicker, seq: Sequence,
           generator: torch.Generator | None) -> list[int]:
    """The tokens a speculative decode emits: logits (n + 1, V) of [x[R], d_1 .. d_n] give the target
    distributions; the first n of the drafts the picker drew are verified (`speculative.accept_drafts`)."""
    n = logits.shape[0] - 1
    picker.seen_rows, picker.q_rows = picker.seen_rows[:n + 1], picker.q_rows[:n]
    return accept_drafts(logits[None], drafts[:n], picker, seq.params, generator)


__all__ = ["MAX_SPLIT_QUERIES", "PagedDrafter", "accept", "query_contexts"]
