"""Speculative decoding with the model's own multi-token-prediction (MTP) modules as the draft model.

DeepSeek-V3 (§2.2, §5.4.3) trains MTP modules next to the main model and reuses them at inference as a
draft: it reports 85-90% acceptance of the second token and 1.8x decode tokens/s. One round here, with
x[R] the newest token (known, not yet run through the main model; for the first round, the prompt's last
token):

1. draft: MTP depth j at position R - 1 combines depth j-1's hidden state there (depth 0 reads the main
   model's final hidden state) with the embedding of token x[R + j] and proposes d_{j+1} = x[R + 1 + j],
   drawn from its distribution q_j (warped by the same temperature / top-k / top-p / repetition penalty as
   the target);
2. verify: one main-model forward of [x[R], d_1 .. d_k] gives the target distributions p_0 .. p_k;
3. accept (Leviathan et al. 2023, Chen et al. 2023): d_{j+1} is kept with probability min(1, p_j(d)/q_j(d));
   at the first rejection a token is drawn from norm(max(0, p_j - q_j)) instead and the round ends; when
   all k drafts are kept, a bonus token is drawn from p_k. Greedy (temperature 0) keeps a draft when it
   is the target's argmax and otherwise emits the argmax, so the output is the plain greedy loop's;
4. roll back: the main KV cache's ``pos`` is set back past the rejected drafts, and each MTP depth keeps
   in its own small KV cache only the positions whose inputs are all accepted tokens.

The output distribution is the target model's whatever the draft (exact); the draft only sets how many
tokens each main-model forward yields. Depth j at position s reads x[s + 1 + j], so its cache entry at s
is final once x[s + 1 + j] is accepted: each round recomputes the few entries that read a draft.
``num_draft`` beyond the model's MTP depths reuses the last depth (its own cache per draft position),
as vLLM does for DeepSeek's single MTP layer; the drafts are then off the training distribution but the
output stays exact.

One sequence at a time (batch 1): the number of accepted tokens differs between rows, which the shared
write position of `KVCache` cannot follow. A fixed seed gives reproducible draws, but not the same draws
as `generate_tokens` (the distribution is the same, the random stream is consumed differently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from r1kit.engine.config import check_speculative_supported
from r1kit.generate import GenerationError, SamplingParams, check_budget, check_prompt, penalize, warp
from r1kit.model.attention import KVCache, attention_mask
from r1kit.model.transformer import Transformer

# ---------------------------------------------------------------------------------------------------- sampling


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None = None
                     ) -> tuple[bool, int]:
    """Speculative sampling's acceptance rule for one draft token drawn from q.

    p, q (V,) target and draft probabilities. Keeps ``draft`` with probability min(1, p[draft] / q[draft]);
    otherwise returns a token drawn from norm(max(0, p - q)). Either way the returned token is distributed
    as p. Returns (accepted, token).
    """
    u = torch.rand((), generator=generator, device=p.device)
    if bool(u * q[draft] < p[draft]):  # u < p/q without dividing by a zero q
        return True, draft
    residual = (p - q).clamp(min=0)  # (V,)
    if not bool(residual.sum() > 0):  # p == q up to rounding: the rejection had probability ~0
        residual = p
    return False, int(torch.multinomial(residual, 1, generator=generator))


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                  generator: torch.Generator | None = None) -> list[int]:
    """The tokens one round emits: the accepted prefix of drafts, then a resampled or bonus token.

    p (k + 1, V): target distributions, row j for the token after drafts[:j]; q (k, V): the draft
    distributions each draft was drawn from. Returns between 1 and k + 1 tokens.
    """
    out = []
    for j, d in enumerate(drafts):
        accepted, token = rejection_sample(p[j], q[j], d, generator)
        out.append(token)
        if not accepted:
            return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=generator)))
    return out


# ---------------------------------------------------------------------------------------------------- drafter


class MTPDrafter:
    """The MTP draft model of one sequence: per draft position j a module (depth min(j, depths - 1)), its
    own KV cache, ``pos[j]`` (its cached positions, all with accepted inputs) and ``carry[j]`` (1, r, C),
    the input hidden states at positions pos[j] .. pos[j] + r - 1 it has not consumed yet.

    Call `add_hidden` with the main model's hidden states of each newly accepted position, then `draft`.
    """

    def __init__(self, model: Transformer, num_draft: int, max_len: int):
        if not model.mtp:
            raise GenerationError("MTPDrafter: the model has no MTP layers (num_mtp_layers = 0)")
        self.model = model
        w = model.embed_tokens.weight
        self.layers = [model.mtp[min(j, len(model.mtp) - 1)] for j in range(num_draft)]
        self.caches = [layer.block.self_attn.new_cache(1, max_len, w.dtype, w.device) for layer in self.layers]
        self.pos = [0] * num_draft
        self.carry = [w.new_zeros(1, 0, model.config.hidden_size) for _ in range(num_draft)]

    def add_hidden(self, hidden: torch.Tensor) -> None:
        """Main-model final hidden states (1, T, C) of the next T positions, whose tokens are accepted."""
        self.carry[0] = torch.cat((self.carry[0], hidden), dim=1)

    def draft(self, tokens: Sequence[int], num: int, pick: Callable[[int, torch.Tensor], int]) -> list[int]:
        """Propose num tokens after tokens (all accepted; the last, x[R], not yet in the main model's cache).

        pick(j, logits (1, V)) chooses draft j from depth j's logits. Needs R >= 1 and the hidden states of
        positions up to R - 1 added. Returns the num drafts.
        """
        model, R = self.model, len(tokens) - 1
        seq = list(tokens)
        rows = None  # the previous depth's output this round, positions start_{j-1} .. R - 1
        for j in range(num):
            start = self.pos[j]
            h_in = self.carry[j] if rows is None else torch.cat((self.carry[j], rows), dim=1)  # (1, n, C)
            n = R - start
            if h_in.shape[1] != n:
                raise RuntimeError(f"MTP draft position {j}: {h_in.shape[1]} hidden states for {n} positions")
            positions = torch.arange(start, R, device=h_in.device)[None]  # (1, n)
            ids = torch.tensor(seq[start + j + 1:R + j + 1], device=h_in.device)[None]  # x[s + 1 + j]
            layer = self.layers[j]
            rope = model.rotary(positions, h_in.dtype)
            mask = attention_mask(1, n, start, None, h_in.device)
            rows = layer(h_in, model.embed_tokens(ids), rope, mask, self.caches[j], start)  # (1, n, C)
            logits = model.lm_head(layer.shared_head_norm(rows[:, -1]))  # (1, V): x[R + 1 + j]
            seq.append(pick(j, logits))
            # keep the positions s <= R - 1 - j (they read only accepted tokens) and carry our input rows
            # from there up to where depth j - 1's next output starts (one row for j >= 1, none for j = 0)
            self.pos[j] = max(0, R - j)
            self.carry[j] = h_in[:, self.pos[j] - start:max(0, R - j + 1) - start]
        return seq[R + 1:]


# ---------------------------------------------------------------------------------------------------- decode loop


@dataclass
class SpeculativeStats:
    """Counters of one or more `speculative_generate` runs (pass the same object to accumulate)."""

    tokens: int = 0  # tokens emitted
    rounds: int = 0  # draft + verify rounds
    target_forwards: int = 0  # main-model forwards, the prompt prefill included
    draft_forwards: int = 0  # MTP module forwards
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position j (0 = the first draft)
    accepted_at: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted over all draft positions."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def track_positions(self, k: int) -> None:
        """Make room for the per-position counters of k drafts per round."""
        self.drafted_at += [0] * (k - len(self.drafted_at))
        self.accepted_at += [0] * (k - len(self.accepted_at))

    def record_round(self, drafted: int, accepted: int) -> None:
        """Count one draft + verify round that drafted `drafted` tokens and kept the first `accepted`."""
        self.rounds += 1
        self.target_forwards += 1
        self.draft_forwards += drafted
        self.drafted += drafted
        self.accepted += accepted
        for j in range(drafted):
            self.drafted_at[j] += 1
            self.accepted_at[j] += j < accepted

    def acceptance_at(self) -> list[float]:
        """Acceptance rate per draft position (position 0 is DeepSeek-V3's "second token")."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"tokens": self.tokens, "rounds": self.rounds, "target_forwards": self.target_forwards,
                "draft_forwards": self.draft_forwards, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "acceptance_at": self.acceptance_at(),
                "tokens_per_target_forward": self.tokens / max(self.target_forwards, 1)}


class DraftPicker:
    """Chooses each draft from the MTP logits as the target would choose (argmax, or a draw from the warped
    distribution, kept in q_rows); seen_rows[j] is the sequence seen before draft j (repetition penalty)."""

    def __init__(self, params: SamplingParams, seen: torch.Tensor | None, generator: torch.Generator | None):
        self.params, self.generator = params, generator
        self.seen_rows = [seen] if seen is not None else []  # (1, V) bool each
        self.q_rows: list[torch.Tensor] = []  # (V,) each

    def __call__(self, j: int, logits: torch.Tensor) -> int:
        seen = self.seen_rows[j] if self.seen_rows else None
        if self.params.temperature == 0:
            d = int(penalize(logits, self.params, seen).argmax(-1))
        else:
            self.q_rows.append(warp(logits, self.params, seen)[0])
            d = int(torch.multinomial(self.q_rows[-1], 1, generator=self.generator))
        if seen is not None:
            self.seen_rows.append(seen.index_fill(1, torch.tensor([d], device=seen.device), True))
        return d


def _flat_prompt(prompt_ids: Sequence[int] | torch.Tensor) -> list:
    """One prompt as a flat list (a (1, T) tensor or a batch of one accepted); a batch of several is refused."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        prompt_ids = prompt_ids.tolist()
    prompt = list(prompt_ids)
    if prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        if len(prompt) != 1:
            raise GenerationError(f"speculative decoding runs one sequence at a time (batch 1); got a batch of "
                                  f"{len(prompt)} prompts: call it once per prompt, or use generate_tokens")
        prompt = list(prompt[0])
    return prompt


def _check_request(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams,
                   num_draft: int | None) -> tuple[list[int], int, int]:
    """The prompt as a flat list, the drafts per round and the new-token budget; errors for what cannot run
    (the shared request checks of r1kit.generate and the engine's speculative limits)."""
    check_speculative_supported(model.config)
    params.validate()
    prompt = check_prompt(_flat_prompt(prompt_ids), model.config.vocab_size)
    k = len(model.mtp) if num_draft is None else num_draft
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise GenerationError(f"num_draft = {num_draft!r}: must be an int >= 1 (None: the model's MTP depths)")
    return prompt, k, check_budget(len(prompt), params, model.config.max_position_embeddings)


def _verify(model: Transformer, cache: KVCache, last: int, drafts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: one main-model forward of [x[R], d_1 .. d_k]: logits (1, k + 1, V) and hidden states (1, k + 1, C)."""
    ids = torch.tensor([[last, *drafts]], device=model.embed_tokens.weight.device)
    return model(ids, cache, return_hidden=True)


def accept_drafts(logits: torch.Tensor, drafts: list[int], picker: DraftPicker, params: SamplingParams,
            generator: torch.Generator | None) -> list[int]:
    """Step 3: the round's tokens: the accepted drafts, then the target's correction or bonus token.

    Greedy keeps the drafts that equal the target's argmax; sampling applies the rejection rule against the
    distributions the drafts were drawn from.
    """
    rows_seen = torch.cat(picker.seen_rows) if picker.seen_rows else None  # (k + 1, V)
    if params.temperature == 0:
        targets = penalize(logits[0], params, rows_seen).argmax(-1).tolist()  # (k + 1,)
        a = next((j for j, d in enumerate(drafts) if d != targets[j]), len(drafts))
        return drafts[:a] + [targets[a]]
    p = warp(logits[0], params, rows_seen)  # (k + 1, V)
    return verify_drafts(p, torch.stack(picker.q_rows) if drafts else p[:0], drafts, generator)


def _roll_back(cache: KVCache, drafter: MTPDrafter, hidden: torch.Tensor, R: int, accepted: int) -> None:
    """Step 4: keep the verify block's KV entries and hidden states up to the last accepted draft; the rejected
    drafts' KV entries are overwritten next round."""
    cache.pos = R + accepted + 1
    drafter.add_hidden(hidden[:, :accepted + 1])


def _emitted_chunk(new: list[int], stop: set[int], emitted: int, budget: int) -> list[int]:
    """The round's tokens up to a stop id or the token that spends the budget, whichever comes first."""
    chunk = []
    for t in new:
        chunk.append(t)
        if t in stop or emitted + len(chunk) == budget:
            break
    return chunk


@torch.inference_mode()
def speculative_generate(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams,
                         stop_ids: Sequence[int] = (), num_draft: int | None = None,
                         stats: SpeculativeStats | None = None) -> Iterator[list[int]]:
    """Generate for one prompt with MTP speculative decoding; yields the tokens each round accepts (>= 1).

    The output follows the target model's distribution exactly (greedy: the tokens of `generate_tokens`);
    it ends after a stop id (which is yielded) or params' token budget, as `generate_tokens` does.
    num_draft: drafts per round (default: the model's MTP depths; more reuse the last depth). stats, when
    given, accumulates the counters (acceptance rate, forwards).
    """
    prompt, k, budget = _check_request(model, prompt_ids, params, num_draft)
    n_prompt, device = len(prompt), model.embed_tokens.weight.device
    stats = SpeculativeStats() if stats is None else stats
    stats.track_positions(k)
    drafter = MTPDrafter(model, k, n_prompt + budget)
    cache = model.new_cache(1, n_prompt + budget)  # the verify block never passes the last token's slot
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    seen = None  # (1, V) bool: tokens in the sequence, for the repetition penalty
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[0, prompt] = True
    stop = set(stop_ids)

    tokens = list(prompt)  # accepted so far; tokens[-1] = x[R] is not in the main cache yet
    if n_prompt > 1:
        _, hidden = model(torch.tensor([prompt[:-1]], device=device), cache, last_only=True, return_hidden=True)
        drafter.add_hidden(hidden)
        stats.target_forwards += 1
    emitted = 0
    while True:
        R = len(tokens) - 1
        num = min(k, budget - emitted - 1) if R > 0 else 0  # never draft past the budget
        picker = DraftPicker(params, seen, generator)
        drafts = drafter.draft(tokens, num, picker)
        logits, hidden = _verify(model, cache, tokens[R], drafts)
        new = accept_drafts(logits, drafts, picker, params, generator)
        _roll_back(cache, drafter, hidden, R, len(new) - 1)
        tokens += new
        stats.record_round(num, len(new) - 1)
        chunk = _emitted_chunk(new, stop, emitted, budget)
        emitted += len(chunk)
        stats.tokens += len(chunk)
        yield chunk
        if chunk[-1] in stop or emitted == budget:
            return
        if seen is not None:
            seen = seen.index_fill(1, torch.tensor(new, device=device), True)
