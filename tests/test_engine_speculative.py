"""MTP speculative decoding in the paged engine (r1kit.engine.spec_decode): greedy output identical to the engine
without speculation for whole batches, the sampled distribution through the engine, per-request selection,
preemption and abort, the counters in /metrics, and `r1kit serve --speculative` in a real subprocess.

Random MTP modules draft badly, so most tests use an "aligned" model (as tests/test_speculative.py): one layer,
whose MTP module is a copy of that layer reading only the next token's embedding. Its drafts are right most of
the time but not always, so full acceptance, rejections at every position and stops inside a step all occur.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from r1kit.engine import LLMEngine, Sequence
from r1kit.engine.config import (
    EngineConfig,
    EngineConfigError,
    add_engine_args,
    check_speculative_supported,
    engine_config_from_args,
    engine_flags,
)
from r1kit.engine.spec_decode import PagedDrafter
from r1kit.generate import GenerationError, SamplingParams, warp
from r1kit.model.config import preset

PROMPTS = [[5, 17, 42, 7], [9], list(range(200, 219)), [3, 3, 3, 3, 3, 3, 3, 3, 3], [33, 44, 55, 66, 77, 88]]



def run(engine: LLMEngine, prompts, params) -> tuple[list[list[int]], int]:
    """engine.generate, checking that every step's outputs come in order; returns the outputs and the steps."""
    steps = engine.num_steps
    out = engine.generate(prompts, params)
    return out, engine.num_steps - steps


# ---------------------------------------------------------------------------------------------------- drafter


@pytest.mark.parametrize("name, overrides", [("tiny-moe", dict(num_mtp_layers=2)),
                                             ("tiny-dense", dict(num_mtp_layers=1))])
def test_paged_drafter_matches_uncached_mtp_logits(make_model, name, overrides):
    """Two sequences drafting together, rounds that accept 0 .. k drafts, scattered blocks, the first round over
    a whole prompt (one multi-token sequence) and later ones as single-query rows: every draft whose inputs are
    all accepted tokens has the logits of mtp_logits over the whole sequence, so no pool keeps a stale entry."""
    model = make_model(name, **overrides)
    v, k = model.config.vocab_size, 2
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(2, v, (1, 60), generator=gen) for _ in range(2)]
    with torch.no_grad():
        hidden = [model(x, return_hidden=True)[1][0] for x in xs]  # (60, C) each
        want = [model.mtp_logits(h[None], x) for h, x in zip(hidden, xs, strict=True)]
    blocks = torch.randperm(40, generator=gen).tolist()
    seqs = [Sequence(f"s{i}", xs[i][0, :r + 1].tolist()) for i, r in enumerate((4, 20))]  # R = 4 and 20
    for i, seq in enumerate(seqs):
        seq.block_table = blocks[i * 20:(i + 1) * 20]  # 80 slots of 4-token blocks each
    drafter = PagedDrafter(model, k, 160, 4)
    for i, seq in enumerate(seqs):
        drafter.add_hidden(seq, hidden[i][:seq.num_tokens - 1], first=True)
    rng, checked = random.Random(0), 0
    while all(seq.num_tokens + k + 1 < 60 for seq in seqs):
        accept = [rng.randint(0, k) for _ in seqs]  # drafts before the a-th are right, the a-th is wrong
        got: list[dict[int, torch.Tensor]] = [{}, {}]

        def pick(i: int, j: int, logits: torch.Tensor, got: list[dict], accept: list[int]) -> int:
            got[i][j] = logits[0]
            real = xs[i][0, seqs[i].num_tokens + j].item()
            return real if j < accept[i] else (real + 1) % v

        with torch.no_grad():
            drafter.propose(seqs, [functools.partial(pick, i, got=got, accept=accept) for i in range(2)])
        for i, seq in enumerate(seqs):
            R = seq.num_tokens - 1
            for j in range(min(accept[i] + 1, len(want[i]))):  # draft j reads drafts 0 .. j - 1: right if j <= a
                torch.testing.assert_close(got[i][j], want[i][j][0, R - 1], atol=1e-4, rtol=1e-4)
                checked += 1
            drafter.add_hidden(seq, hidden[i][R:R + accept[i] + 1], first=False)
            for t in xs[i][0, R + 1:R + accept[i] + 2].tolist():
                seq.append_token(t)
    assert checked >= 20


# ---------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_batch_equals_the_engine_without_speculation(aligned_model, name, k):
    """Prompts of 1-19 tokens in one batch, small blocks (drafts cross block boundaries), a repetition penalty
    on one pass: token for token the plain engine's output, in fewer steps."""
    model = aligned_model(name)
    for params in (SamplingParams(max_new_tokens=30, temperature=0),
                   SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.5)):
        plain, plain_steps = run(LLMEngine(model, num_blocks=128, block_size=4), PROMPTS, params)
        engine = LLMEngine(model, num_blocks=128, block_size=4, num_speculative_tokens=k)
        got, steps = run(engine, PROMPTS, params)
        assert got == plain
        st = engine.spec_stats
        assert 0 < st.accepted < st.drafted and len(st.acceptance_at()) == k
        assert st.tokens == sum(map(len, got)) and steps < plain_steps
        assert engine.block_manager.num_free_blocks == 128 and not engine.runner.drafter._states


@pytest.mark.parametrize("name, overrides", [("tiny-moe", dict(num_mtp_layers=2)),  # two chained depths, MLA
                                             ("tiny-dense", dict(num_mtp_layers=1))])  # GQA
def test_greedy_random_mtp_chunked_prefill_and_stops(make_model, name, overrides):
    """Random MTP weights (drafts mostly rejected), prompts prefilled in chunks, a stop id: still exact."""
    model = make_model(name, **overrides)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    plain = LLMEngine(model, num_blocks=96, block_size=4, max_num_seqs=5, max_num_batched_tokens=16, chunk_size=6)
    want = plain.generate(PROMPTS, params)
    stop = want[2][5]
    for k in (1, 3):
        engine = LLMEngine(model, num_blocks=96, block_size=4, max_num_seqs=5, max_num_batched_tokens=16, chunk_size=6,
                           stop_ids=[stop], num_speculative_tokens=k)
        got = engine.generate(PROMPTS, params)
        assert got == [w[:w.index(stop) + 1] if stop in w else w for w in want]
        assert engine.spec_stats.drafted > 0 and engine.block_manager.num_free_blocks == 96


def test_nano_greedy_batch_is_exact_and_its_mtp_head_drafts_well():
    from r1kit.api import BUNDLED_DIR, R1Model

    if not (BUNDLED_DIR / "nano" / "config.json").is_file():
        pytest.skip("r1kit/nano is not bundled")
    nano = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    tok = nano._tok()
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in ("What is 47+38?", "What is 6*7?",
                                                                            "What is 305-178?")]
    prompts.append(tok.encode("import os\nimport sys\n\n\ndef main("))
    params = SamplingParams(max_new_tokens=64, temperature=0)
    plain = LLMEngine(nano.model, stop_ids=nano.stop_ids(), num_blocks=64).generate(prompts, params)
    engine = LLMEngine(nano.model, stop_ids=nano.stop_ids(), num_blocks=64, num_speculative_tokens=1)
    assert engine.generate(prompts, params) == plain
    assert engine.spec_stats.acceptance_rate > 0.6, engine.spec_stats.as_dict()
    nano.use_engine = True  # R1Model.generate(speculative=True): a batch, on the engine
    texts = [tok.decode(p) for p in prompts[:2]]
    assert nano.generate(texts, max_new_tokens=24, temperature=0, speculative=True) == nano.generate(
        texts, max_new_tokens=24, temperature=0)
    assert nano.speculative_stats.accepted > 0 and nano.speculative_stats.tokens > 0


# ---------------------------------------------------------------------------------------------------- sampling


def test_sampled_output_follows_the_target_distribution(make_model):
    """Empirical joint of the 2nd and 3rd tokens (the first decode verifies two drafts for them) against the exact
    target joint, with top-k and the repetition penalty; each request has its own seed, 64 per batch."""
    model = make_model("tiny-dense", num_mtp_layers=1, vocab_size=16, num_layers=1, hidden_size=32)
    params = SamplingParams(max_new_tokens=4, temperature=1.2, top_k=3, repetition_penalty=1.3)
    prompt, v = [3, 9, 4], 16

    def dist(ids: list[int]) -> torch.Tensor:  # (V,) the target's warped next-token distribution after ids
        seen = torch.zeros(1, v, dtype=torch.bool).index_fill(1, torch.tensor(ids), True)
        return warp(model(torch.tensor([ids]))[:, -1], params, seen)[0]

    exact = torch.zeros(v, v)  # P(x2, x3), summed over x1
    with torch.no_grad():
        p1 = dist(prompt)
        for a in p1.nonzero()[:, 0].tolist():
            p2 = dist(prompt + [a])
            for b in p2.nonzero()[:, 0].tolist():
                exact[b] += p1[a] * p2[b] * dist(prompt + [a, b])
        hidden = model(torch.tensor([prompt + [2]]), return_hidden=True)[1]
        q = warp(model.mtp_logits(hidden, torch.tensor([prompt + [2]]))[0][:, -1], params,
                 torch.zeros(1, v, dtype=torch.bool).index_fill(1, torch.tensor(prompt + [2]), True))[0]
        assert 0.5 * float((q - dist(prompt + [2])).abs().sum()) > 0.3  # drafts far from the target
    engine = LLMEngine(model, num_blocks=256, block_size=4, max_num_seqs=64, num_speculative_tokens=2)
    n = 1024
    outs = []
    for start in range(0, n, 64):
        outs += engine.generate([prompt] * 64, [dataclasses.replace(params, seed=s) for s in range(start, start + 64)])
    st = engine.spec_stats
    assert st.drafted_at[1] == n and 0 < st.accepted < st.drafted  # every first decode verifies two drafts
    counts = torch.zeros(v, v)
    for out in outs:
        counts[out[1], out[2]] += 1
    assert counts[exact == 0].sum() == 0  # nothing outside the warped support
    expected = exact[exact > 0] * n
    chi2 = float(((counts[exact > 0] - expected) ** 2 / expected).sum())
    dof = int((exact > 0).sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)  # ~5 standard deviations of the chi-square
    assert 0.5 * float((counts / n - exact).abs().sum()) < 0.1
    # a seeded request draws from its own generator: the same tokens alone as in a batch
    alone = LLMEngine(model, num_blocks=64, block_size=4, num_speculative_tokens=2)
    for s in (0, 17, 63):
        assert alone.generate([prompt], dataclasses.replace(params, seed=s)) == [outs[s]]


# ---------------------------------------------------------------------------------------------------- engine


def test_per_request_selection_and_the_counters(aligned_model):
    model = aligned_model("tiny-moe")
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    want = LLMEngine(model, num_blocks=64, block_size=4).generate(PROMPTS[:2], greedy)
    engine = LLMEngine(model, num_blocks=64, block_size=4, num_speculative_tokens=2)
    off = dataclasses.replace(greedy, speculative=False)
    assert engine.generate(PROMPTS[:2], [off, off]) == want
    assert engine.spec_stats.drafted == 0 and engine.spec_stats.tokens == 0
    assert engine.generate(PROMPTS[:2], [off, greedy]) == want  # None: the engine's setting (on)
    st = engine.spec_stats
    assert st.tokens == len(want[1]) and 0 < st.accepted < st.drafted
    assert st.drafted == sum(st.drafted_at) and st.accepted == sum(st.accepted_at)
    plain = LLMEngine(model, num_blocks=64, block_size=4)
    with pytest.raises(GenerationError, match="request 'x': speculative=True, but this engine runs without"):
        plain.add_request("x", [1, 2], dataclasses.replace(greedy, speculative=True))
    with pytest.raises(GenerationError, match="speculative = 'yes'"):
        SamplingParams(speculative="yes")


def test_preemption_and_abort_free_everything(aligned_model):
    """A pool too small for the batch: speculative requests are preempted and recomputed to the same tokens;
    aborting mid-generation returns every block and drops the drafter's state."""
    model = aligned_model("tiny-dense")
    params = SamplingParams(max_new_tokens=24, temperature=0)
    prompts = [[i + 1, i + 2, i + 3, i + 4, i + 5] for i in range(0, 40, 10)]
    want = LLMEngine(model, num_blocks=64, block_size=4).generate(prompts, params)
    engine = LLMEngine(model, num_blocks=16, block_size=4, num_speculative_tokens=2)
    assert engine.generate(prompts, params) == want
    assert engine.num_preemptions > 0 and engine.block_manager.num_free_blocks == 16
    for rid, prompt in zip("abcd", prompts, strict=True):
        engine.add_request(rid, prompt, params)
    for _ in range(6):
        engine.step()
    assert engine.spec_stats.accepted > 0 and engine.runner.drafter._states
    for rid in "abcd":
        engine.abort(rid)
    assert engine.block_manager.num_free_blocks == 16 and not engine.runner.drafter._states
    assert not engine.has_unfinished() and engine.generate(prompts[:1], params) == want[:1]


def test_refusals_and_settings(make_model):
    with pytest.raises(GenerationError, match="this model has none"):
        LLMEngine(make_model("tiny-dense"), num_blocks=8, num_speculative_tokens=1)
    with pytest.raises(GenerationError, match="'local_global' sparse attention caches cannot be rolled back"):
        check_speculative_supported(preset("tiny-dense", num_mtp_layers=1, sparse_attention="local_global"))
    with pytest.raises(EngineConfigError, match="num_speculative_tokens = -1"):
        EngineConfig(num_speculative_tokens=-1)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--speculative"])).num_speculative_tokens == 1
    args = p.parse_args(["--speculative-tokens", "3"])
    assert engine_config_from_args(args).num_speculative_tokens == 3
    assert engine_config_from_args(p.parse_args(engine_flags(args))) == engine_config_from_args(args)
    assert engine_config_from_args(p.parse_args([])).num_speculative_tokens == 0


# ---------------------------------------------------------------------------------------------------- serving


def test_serve_speculative_subprocess_matches_the_plain_model_and_counts_drafts():
    """A real `r1kit serve r1kit/nano --speculative`: greedy completions equal the plain loop's, and /metrics
    counts the drafted and accepted tokens."""
    import openai

    from r1kit.api import BUNDLED_DIR, R1Model

    if not (BUNDLED_DIR / "nano" / "config.json").is_file():
        pytest.skip("r1kit/nano is not bundled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r1kit", "serve", "r1kit/nano", "--port", str(port), "--device",
                             "cpu", "--dtype", "fp32", "--speculative"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        nano = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
        nano.use_engine = False  # the reference: the plain KV-cache loop
        prompts = ["import os\nimport sys\n\n\ndef main(", "def add(a, b):"]
        want = [nano.generate(p, max_new_tokens=24, temperature=0) for p in prompts]
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < end, "the server did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="r1kit/nano", prompt=prompts, max_tokens=24, temperature=0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == want
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines() if line[0] != "#")
        drafted, accepted = (int(metrics[f"r1kit_spec_{k}_tokens_total"]) for k in ("draft", "accepted"))
        assert 0 < accepted <= drafted
    finally:
        proc.kill()
        proc.wait()
