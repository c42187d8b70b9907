"""MTP speculative decoding: the acceptance rule, the drafter's caches, and exactness against the plain loop.

Random MTP modules draft badly (their drafts are almost always rejected), so the greedy tests also run on
an "aligned" model: one layer, whose MTP module is a copy of that layer reading only the next token's
embedding. Its drafts agree with the target most of the time but not always, so every round type runs:
all drafts kept plus a bonus token, a rejection at each draft position, and stops inside a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import pytest
import torch

from r1kit.engine.speculative import MTPDrafter, SpeculativeStats, rejection_sample, speculative_generate, verify_drafts
from r1kit.generate import GenerationError, SamplingParams, generate_tokens, penalize, sample, warp
from r1kit.model.transformer import ContextLengthError


def plain(model, prompt, stop=(), **kw) -> list[int]:
    return [step[0] for step in generate_tokens(model, [prompt], SamplingParams(**kw), stop) if step[0] is not None]


def speculative(model, prompt, stop=(), num_draft=None, stats=None, **kw) -> list[int]:
    chunks = list(speculative_generate(model, prompt, SamplingParams(**kw), stop, num_draft, stats))
    assert all(chunks), "every round yields at least one token"
    return [t for chunk in chunks for t in chunk]


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())



# ---------------------------------------------------------------------------------------------------- the rule


def test_rejection_sample_output_follows_p_on_hand_made_distributions():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.4, 0.1])  # mass where p has none, too little where p has most
    gen = torch.Generator().manual_seed(0)
    n, counts, accepted = 10_000, torch.zeros(5), 0
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    for d in drafts:
        ok, token = rejection_sample(p, q, d, gen)
        counts[token] += 1
        accepted += ok
        assert token == d if ok else p[token] > q[token]  # a resample only lands where p exceeds q
    assert tv(counts / n, p) < 0.02
    assert tv(q, p) > 0.4  # keeping every draft would fail the bound above by far
    assert abs(accepted / n - float(torch.minimum(p, q).sum())) < 0.02  # P(accept) = sum min(p, q)


def test_rejection_sample_keeps_every_draft_when_q_equals_p():
    p = torch.tensor([0.25, 0.75])
    gen = torch.Generator().manual_seed(1)
    assert all(rejection_sample(p, p.clone(), d, gen) == (True, d) for d in [0, 1] * 200)


def test_verify_drafts_rounds():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # (k + 1, V), deterministic targets
    gen = torch.Generator().manual_seed(0)
    assert verify_drafts(p, p[:2], [1, 2], gen) == [1, 2, 0]  # both kept, then the bonus token from p[2]
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert verify_drafts(p, q, [1, 0], gen) == [1, 2]  # second draft rejected, replaced from p - q
    assert verify_drafts(p[:1], p[:0], [], gen) == [1]  # no drafts: a plain step


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_p=1.0), dict(temperature=1.3, top_k=5, top_p=1.0),
                                dict(temperature=0.6, top_p=0.8), dict(temperature=1.0, repetition_penalty=1.7)])
def test_warp_is_the_distribution_sample_draws_from(kw):
    params = SamplingParams(**kw)
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.rand(64, 40, generator=torch.Generator().manual_seed(1)) < 0.3
    for row in range(4):  # against the definition, one row at a time with plain Python
        z = [(x / params.repetition_penalty if x > 0 else x * params.repetition_penalty) if s else x
             for x, s in zip(logits[row].tolist(), seen[row].tolist(), strict=True)]
        z = [x / params.temperature for x in z]
        order = sorted(range(40), key=lambda i: -z[i])
        keep = set(order[:params.top_k] if params.top_k else order)
        e = [math.exp(z[i]) if i in keep else 0.0 for i in range(40)]
        total, mass, kept = sum(e), 0.0, set()
        for i in order:  # the smallest prefix (by probability) whose mass reaches top_p
            if i in keep and mass < params.top_p:
                kept.add(i)
                mass += e[i] / total
        ref = torch.tensor([e[i] if i in kept else 0.0 for i in range(40)])
        torch.testing.assert_close(warp(logits[row:row + 1], params, seen[row:row + 1])[0], ref / ref.sum(),
                                   atol=1e-6, rtol=1e-5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = sample(logits, params, seen, g1)
    got = torch.multinomial(warp(logits, params, seen), 1, generator=g2).squeeze(-1)
    assert torch.equal(got, want)
    greedy = SamplingParams(temperature=0, repetition_penalty=kw.get("repetition_penalty", 1.0))
    assert torch.equal(penalize(logits, greedy, seen).argmax(-1), sample(logits, greedy, seen))


# ---------------------------------------------------------------------------------------------------- drafter


@pytest.mark.parametrize("name, overrides", [("tiny-moe", dict(num_mtp_layers=2)),
                                             ("tiny-dense", dict(num_mtp_layers=3))])
def test_drafter_caches_match_uncached_mtp_logits(make_model, name, overrides):
    """Rounds that accept 0 .. k drafts: each draft whose inputs are all accepted tokens has the logits of
    mtp_logits over the whole sequence, so no cache keeps an entry computed from a rejected draft."""
    model = make_model(name, **overrides)
    v, k = model.config.vocab_size, model.config.num_mtp_layers
    x = torch.randint(2, v, (1, 40), generator=torch.Generator().manual_seed(0))
    seq = x[0].tolist()
    with torch.no_grad():
        hidden = model(x, return_hidden=True)[1]  # (1, 40, C)
        want = model.mtp_logits(hidden, x)  # depth j at position s predicts x[s + 2 + j]
    R = 4
    drafter = MTPDrafter(model, k, 48)
    drafter.add_hidden(hidden[:, :R])
    rng = random.Random(0)
    checked = 0

    def force(j: int, logits: torch.Tensor, got: dict[int, torch.Tensor], r: int, a: int) -> int:
        got[j] = logits
        real = seq[r + 1 + j]
        return real if j < a else (real + 1) % v  # drafts before the a-th are right; the a-th is wrong

    while R + k + 1 < len(seq):
        a = rng.randint(0, k)  # drafts this round will accept
        got: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            drafter.draft(seq[:R + 1], k, functools.partial(force, got=got, r=R, a=a))
        for j in range(min(a + 1, k)):  # draft j reads drafts 0 .. j - 1, all right when j <= a
            torch.testing.assert_close(got[j][0], want[j][0, R - 1], atol=1e-4, rtol=1e-4)
            checked += 1
        drafter.add_hidden(hidden[:, R:R + a + 1])
        R += a + 1
    assert checked >= 20


# ---------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("name, overrides, num_draft", [
    ("tiny-moe", {}, None),  # MLA + MoE, random MTP
    ("tiny-dense", dict(num_mtp_layers=1), None),  # GQA
    ("tiny-moe", dict(num_mtp_layers=2, q_lora_rank=None), None),  # two chained depths
    ("tiny-moe", {}, 3),  # the one depth reused for three drafts
])
def test_greedy_equals_plain_loop_random_models(make_model, name, overrides, num_draft):
    model = make_model(name, **overrides)
    prompt = [5, 17, 42, 7, 99, 3]
    assert speculative(model, prompt, num_draft=num_draft, max_new_tokens=24, temperature=0) == plain(
        model, prompt, max_new_tokens=24, temperature=0)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("num_draft", [1, 2, 3])
def test_greedy_equals_plain_loop_when_drafts_are_mostly_right(aligned_model, name, num_draft):
    model = aligned_model(name)
    stats = SpeculativeStats()
    for prompt in ([5, 17, 42, 7], [9], [3, 3, 3, 3, 3, 3, 3, 3, 3]):
        assert speculative(model, prompt, num_draft=num_draft, stats=stats, max_new_tokens=30,
                           temperature=0) == plain(model, prompt, max_new_tokens=30, temperature=0)
    assert 0 < stats.accepted < stats.drafted  # both paths ran
    assert stats.tokens == 90 and stats.target_forwards < 90 - 15  # fewer main forwards than tokens
    assert 0 < stats.acceptance_rate < 1 and len(stats.acceptance_at()) == num_draft


def test_greedy_stop_ids_and_budget(aligned_model):
    model = aligned_model("tiny-moe")
    prompt = [5, 17, 42, 7]
    free = plain(model, prompt, max_new_tokens=30, temperature=0)
    stop = free[7]
    want = free[:free.index(stop) + 1]  # the stop id is emitted, then nothing
    assert speculative(model, prompt, [stop], num_draft=2, max_new_tokens=30, temperature=0) == want
    assert plain(model, prompt, [stop], max_new_tokens=30, temperature=0) == want
    for n in (1, 2, 3, 7):  # the budget is never exceeded, even when a round could accept more
        assert speculative(model, prompt, num_draft=3, max_new_tokens=n, temperature=0) == free[:n]


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_greedy_repetition_penalty_counts_the_accepted_drafts(aligned_model, name):
    model = aligned_model(name)
    kw = dict(max_new_tokens=30, temperature=0, repetition_penalty=1.5)
    for prompt in ([5, 17, 42, 7], [3] * 9):
        penalized = plain(model, prompt, **kw)
        assert penalized != plain(model, prompt, max_new_tokens=30, temperature=0)
        for num_draft in (1, 2):
            assert speculative(model, prompt, num_draft=num_draft, **kw) == penalized


# ---------------------------------------------------------------------------------------------------- sampling


def test_sampled_output_follows_the_target_distribution(make_model):
    """Empirical joint of the first two tokens vs the exact target joint, with warping and the penalty."""
    model = make_model("tiny-dense", num_mtp_layers=1, vocab_size=16, num_layers=1, hidden_size=32)
    params = SamplingParams(max_new_tokens=3, temperature=1.2, top_k=3, repetition_penalty=1.3)
    prompt = [3, 9, 4]
    v = model.config.vocab_size

    def seen_of(ids: list[int]) -> torch.Tensor:
        return torch.zeros(1, v, dtype=torch.bool).index_fill(1, torch.tensor(ids), True)

    with torch.no_grad():
        p1 = warp(model(torch.tensor([prompt]))[:, -1], params, seen_of(prompt))[0]  # (V,)
        exact = torch.zeros(v, v)
        for a in p1.nonzero()[:, 0].tolist():
            ids = prompt + [a]
            exact[a] = p1[a] * warp(model(torch.tensor([ids]))[:, -1], params, seen_of(ids))[0]
        hidden = model(torch.tensor([prompt]), return_hidden=True)[1]
        q1 = warp(model.mtp_logits(hidden, torch.tensor([prompt]))[0][:, -1], params, seen_of(prompt))[0]
    assert tv(p1, q1) > 0.3  # the drafts are far from the target: emitting them unchecked would fail below
    n = 1000
    counts = torch.zeros(v, v)
    stats = SpeculativeStats()
    for i in range(n):  # two drafts a round: the first two tokens can be draft + draft, draft + bonus, ...
        out: list[int] = []
        for chunk in speculative_generate(model, prompt, dataclasses.replace(params, seed=i), num_draft=2,
                                          stats=stats):
            out += chunk
            if len(out) >= 2:
                break
        counts[out[0], out[1]] += 1
    assert 0 < stats.accepted < stats.drafted
    assert counts[exact == 0].sum() == 0  # nothing outside the warped support
    expected = exact[exact > 0] * n
    chi2 = float(((counts[exact > 0] - expected) ** 2 / expected).sum())
    dof = int((exact > 0).sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~5 standard deviations of the chi-square
    assert tv(counts / n, exact) < 0.1


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_requests_name_what_is_wrong(make_model):
    model = make_model("tiny-moe")
    params = SamplingParams(max_new_tokens=4, temperature=0)
    with pytest.raises(GenerationError, match="batch 1"):
        next(speculative_generate(model, [[1, 2], [3, 4]], params))
    with pytest.raises(GenerationError, match="at least one token"):
        next(speculative_generate(model, [], params))
    with pytest.raises(GenerationError, match="num_draft"):
        next(speculative_generate(model, [1, 2], params, num_draft=0))
    with pytest.raises(ContextLengthError, match="context"):
        next(speculative_generate(model, [1] * 1020, SamplingParams(max_new_tokens=10)))
    with pytest.raises(GenerationError, match="no MTP|has none"):
        next(speculative_generate(make_model("tiny-dense"), [1, 2], params))
    with pytest.raises(GenerationError, match="temperature"):
        warp(torch.zeros(1, 4), params)
    assert speculative(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, temperature=0) == plain(
        model, [5, 6, 7], max_new_tokens=4, temperature=0)  # a (1, T) tensor is one prompt


# ---------------------------------------------------------------------------------------------------- nano


def test_nano_greedy_is_exact_and_its_mtp_head_drafts_well():
    from r1kit.api import BUNDLED_DIR, R1Model

    if not (BUNDLED_DIR / "nano" / "config.json").is_file():
        pytest.skip("r1kit/nano is not bundled")
    nano = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    tok, stop = nano._tok(), nano.stop_ids()
    stats = SpeculativeStats()
    for question in ("What is 47+38?", "What is 6*7?"):
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        got = speculative(nano.model, prompt, stop, stats=stats, max_new_tokens=160, temperature=0)
        assert got == plain(nano.model, prompt, stop, max_new_tokens=160, temperature=0)
        assert got[-1] in stop
    assert stats.acceptance_rate > 0.7, stats.as_dict()  # trained with the MTP loss: its drafts mostly hold
