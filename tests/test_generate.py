"""Sampling and the KV-cached decode loop: parameter checks, sampler semantics, batch == one by one."""

from __future__ import annotations

import pytest
import torch

from r1kit.generate import GenerationError, SamplingParams, generate_tokens, sample
from r1kit.model.transformer import ContextLengthError


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """No cache at all: re-run the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run(model, prompts, **kw) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, SamplingParams(**kw)):
        for row, tok in enumerate(step):
            if tok is not None:
                out[row].append(tok)
    return out


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(max_length=0), dict(repetition_penalty=0.0),
                                 dict(stop=[""])])
def test_invalid_sampling_params_name_the_field(bad):
    with pytest.raises(GenerationError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_length_rules():
    assert SamplingParams(max_new_tokens=5, max_length=100).new_tokens_for(10) == 5  # max_new_tokens wins
    assert SamplingParams(max_length=30).new_tokens_for(10) == 20  # prompt + new
    assert SamplingParams().new_tokens_for(10) == 256
    with pytest.raises(GenerationError, match="max_length"):
        SamplingParams(max_length=8).new_tokens_for(10)


def test_sampler_semantics():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert sample(logits, SamplingParams(temperature=0)).item() == 1
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1)).item() == 1  # only the best survives
    assert sample(logits, SamplingParams(temperature=5.0, top_p=0.01)).item() == 1
    seen = torch.tensor([[False, True, False, False]])
    # penalty 3 on the seen positive logit 3.0 -> 1.0, so token 2 (2.0) now wins
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=3.0), seen).item() == 2
    # same seed, same draws; the empirical distribution follows softmax(logits / T)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    wide = logits.expand(4000, -1)
    a = sample(wide, SamplingParams(temperature=1.0, top_p=1.0), generator=g1)
    b = sample(wide, SamplingParams(temperature=1.0, top_p=1.0), generator=g2)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).float() / len(a)
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.03)
    # top_p keeps the smallest prefix with mass >= p: here tokens 1 and 2 (0.66 + 0.24)
    c = sample(wide, SamplingParams(temperature=1.0, top_p=0.8), generator=g1)
    assert set(c.unique().tolist()) == {1, 2}


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_cached_greedy_matches_uncached_reference(make_model, name):
    model = make_model(name)
    prompt = [5, 17, 42, 7, 99, 3]
    assert run(model, [prompt], max_new_tokens=12, temperature=0)[0] == greedy_reference(model, prompt, 12)


def test_mixed_length_batch_equals_one_by_one(make_model):
    model = make_model("tiny-moe")
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2], [100]]
    batch = run(model, prompts, max_new_tokens=10, temperature=0)
    for prompt, got in zip(prompts, batch, strict=True):
        assert got == run(model, [prompt], max_new_tokens=10, temperature=0)[0]


def test_stop_ids_end_a_row_and_seed_reproduces(make_model):
    model = make_model("tiny-dense")
    free = run(model, [[1, 2, 3]], max_new_tokens=10, temperature=0)[0]
    stop = free[3]
    stopped = []
    for step in generate_tokens(model, [[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0), [stop]):
        stopped.append(step[0])
    assert stopped == free[: free.index(stop) + 1]  # the stop id is emitted, then the row ends
    a = run(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, seed=7)
    b = run(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, seed=7)
    assert a == b


def test_prompt_longer_than_context(make_model):
    model = make_model("tiny-dense", max_position_embeddings=32)
    with pytest.raises(ContextLengthError, match="context of 32"):
        run(model, [list(range(30))], max_new_tokens=5)
    with pytest.raises(GenerationError, match="at least one token"):
        run(model, [[]], max_new_tokens=5)
