"""The engine on the real model: paged attention == contiguous-cache attention, and LLMEngine (continuous
batching, chunked prefill, prefix sharing, preemption, abort) == the naive `generate_tokens` loop."""

from __future__ import annotations

import pytest
import torch

from r1kit.engine import FinishReason, LLMEngine, SchedulerError
from r1kit.engine.config import EngineConfig, bytes_per_block
from r1kit.generate import GenerationError, SamplingParams, generate_tokens
from r1kit.model.attention import PagedBatch, attention_mask
from r1kit.model.transformer import ContextLengthError

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13], [100], list(range(200, 219)), [33, 44, 55, 66, 77]]


def reference(model, prompts, params=GREEDY, stop_ids=()) -> list[list[int]]:
    """The naive KV-cached loop, all prompts in one left-padded batch."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, params, stop_ids):
        for row, tok in enumerate(step):
            if tok is not None:
                out[row].append(tok)
    return out


def drive(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int]]]], params=GREEDY
          ) -> dict[str, list[int]]:
    """Add arrivals[i] before step i, step until done; collect the streamed tokens per request."""
    got: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step <= max(arrivals, default=-1):
        for rid, prompt in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            got[rid] = []
        for r in engine.step():
            got[r.request_id].append(r.token)
            assert r.finished == (r.finish_reason is not None)
        step += 1
        assert step < 500
    return got


# ---------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("name,impl", [("tiny-dense", None), ("tiny-moe", "naive"), ("tiny-moe", "absorb")])
def test_paged_attention_matches_contiguous_cache(make_model, name, impl):
    """Several sequences packed per step, chunked prefill, a prefix read from another sequence's slots, and
    decode, over scattered slots: the same outputs as each sequence alone in a contiguous KVCache."""
    model = make_model(name)
    attn = model.layers[0].self_attn
    if impl:
        attn.impl = impl
    gen = torch.Generator().manual_seed(1)
    C = model.config.hidden_size
    xa = torch.randn(12, C, generator=gen)
    xs = {"a": xa, "b": torch.cat((xa[:8], torch.randn(7, C, generator=gen))), "c": torch.randn(12, C, generator=gen)}
    perm = torch.randperm(32, generator=gen).tolist()  # 32 blocks of 2 slots, handed out in random order
    tables = {"a": perm[:6], "c": perm[6:12]}
    tables["b"] = tables["a"][:4] + perm[12:16]  # b's first 8 positions are a's KV blocks (a shared prefix)
    # steps of (sequence, start, length): prefill chunks beside decodes; b starts after its prefix is written;
    # the last two steps decode sequences of three different context lengths together (one padded batch)
    steps = [[("a", 0, 5), ("c", 0, 7)], [("a", 5, 6), ("c", 7, 1)], [("b", 8, 2), ("c", 8, 1)],
             [("c", 9, 1), ("b", 10, 3)], [("a", 11, 1), ("c", 10, 1), ("b", 13, 1)], [("c", 11, 1), ("b", 14, 1)]]
    kv = attn.new_paged_cache(64, torch.float32, torch.device("cpu"))
    paged: dict[str, list[torch.Tensor]] = {k: [] for k in xs}
    with torch.no_grad():
        for step in steps:
            batch = PagedBatch.build([(tables[s], start + n, n) for s, start, n in step], block_size=2)
            x = torch.cat([xs[s][start:start + n] for s, start, n in step])[None]
            y = attn.forward_paged(x, model.rotary(batch.positions[None], x.dtype), batch, kv)[0]
            for (s, _, _), part in zip(step, y.split([n for _, _, n in step]), strict=True):
                paged[s].append(part)
        for s, x in xs.items():
            chunks = [(start, n) for step in steps for t, start, n in step if t == s]
            if s == "b":
                chunks = [(0, 8)] + chunks  # the contiguous cache computes the prefix itself
            cache = attn.new_cache(1, len(x), torch.float32, torch.device("cpu"))
            ref = []
            for start, n in chunks:
                rope = model.rotary(torch.arange(start, start + n)[None], x.dtype)
                ref.append(attn(x[None, start:start + n], rope, attention_mask(1, n, start, None, x.device),
                                cache, start)[0])
            if s == "b":
                ref = ref[1:]
            torch.testing.assert_close(torch.cat(paged[s]), torch.cat(ref), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_continuous_batching_matches_generate_tokens(make_model, name):
    model = make_model(name)
    ref = reference(model, PROMPTS)
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    free = engine.block_manager.num_free_blocks
    # two requests first; the others join while those decode
    got = drive(engine, {0: [("r0", PROMPTS[0]), ("r1", PROMPTS[1])], 3: [("r2", PROMPTS[2]), ("r3", PROMPTS[3])],
                         5: [("r4", PROMPTS[4])]})
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == ref
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished()
    assert engine.generate(PROMPTS, GREEDY) == ref  # the convenience loop, all at once


def test_chunked_prefill_matches_generate_tokens(make_model):
    model = make_model("tiny-moe")  # MLA "auto": chunks of <= 4 tokens take the absorbed path, longer the naive
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8, chunk_size=5)
    prompts = sorted(PROMPTS, key=len, reverse=True)  # 19 and 11 tokens first: several chunks each
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    got = {f"r{i}": [] for i in range(len(prompts))}
    per_step = []
    while engine.has_unfinished():
        per_step.append(engine.step())
        for r in per_step[-1]:
            got[r.request_id].append(r.token)
    assert per_step[0] == []  # 5 tokens of the first prompt and 3 of the second: nothing to sample yet
    assert [got[f"r{i}"] for i in range(len(prompts))] == reference(model, prompts)


def test_prefix_sharing_uses_fewer_blocks_and_gives_the_same_tokens(make_model):
    model = make_model("tiny-moe")
    prefix = list(range(300, 324))
    a, b = prefix + [1, 2, 3], prefix + [7, 8]
    engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request("a", a, GREEDY)
    got = {"a": [r.token for r in engine.step()]}  # a's prompt is written: its full blocks are cached
    engine.add_request("b", b, GREEDY)
    got["b"] = []
    for r in engine.step():
        got[r.request_id].append(r.token)
    seq_b = next(s for s in engine.scheduler.running if s.request_id == "b")
    assert seq_b.num_cached_tokens == 24
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    bm = engine.block_manager
    assert used == bm.blocks_needed(len(a) + 1) + bm.blocks_needed(len(b)) - 6  # 6 blocks held once
    while engine.has_unfinished():
        for r in engine.step():
            got[r.request_id].append(r.token)
    assert [got["a"], got["b"]] == reference(model, [a, b])
    assert bm.num_free_blocks == 32


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_preemption_under_a_tiny_block_pool_gives_the_same_tokens(make_model, name):
    model = make_model(name)
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35, 36]]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    engine = LLMEngine(model, num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    assert engine.generate(prompts, params) == reference(model, prompts, params)
    assert engine.num_preemptions > 0 and engine.block_manager.num_free_blocks == 8


def test_abort_frees_blocks(make_model):
    model = make_model("tiny-dense")
    engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=2, max_num_batched_tokens=32)
    free = engine.block_manager.num_free_blocks
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", p, params)
    streamed = {"r0": [], "r1": []}
    for _ in range(3):
        for r in engine.step():
            streamed[r.request_id].append(r.token)
    assert engine.block_manager.num_free_blocks < free
    assert engine.abort("r2") == []  # still waiting (max_num_seqs = 2)
    assert engine.abort("r1") == streamed["r1"] and len(streamed["r1"]) == 3
    with pytest.raises(SchedulerError, match="'r1'"):
        engine.abort("r1")
    with pytest.raises(SchedulerError, match="'nope'"):
        engine.abort("nope")
    while engine.has_unfinished():
        for r in engine.step():
            streamed[r.request_id].append(r.token)
    assert streamed["r0"] == reference(model, PROMPTS[:1], params)[0]
    assert engine.block_manager.num_free_blocks == free


def test_stop_ids_and_seeded_sampling(make_model):
    model = make_model("tiny-moe")
    prompt = PROMPTS[1]
    full = reference(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    i = next(i for i in range(2, 12) if full[i] not in full[:i])
    engine = LLMEngine(model, num_blocks=64, block_size=4, stop_ids=[full[i]])
    engine.add_request("s", prompt, SamplingParams(max_new_tokens=12, temperature=0))
    results = []
    while engine.has_unfinished():
        results += engine.step()
    assert [r.token for r in results] == full[:i + 1] and results[-1].finish_reason is FinishReason.STOP
    # a seeded request draws from its own generator: the same tokens as generate_tokens, alone or in a batch
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7)
    want = reference(model, [prompt], seeded)[0]
    engine = LLMEngine(model, num_blocks=64, block_size=4)
    assert engine.generate([prompt], seeded) == [want]
    other = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    assert engine.generate([PROMPTS[0], prompt, PROMPTS[3]], [other, seeded, GREEDY])[1] == want


def test_invalid_requests_have_clear_errors(make_model):
    model = make_model("tiny-dense")
    engine = LLMEngine(model, num_blocks=8, block_size=4)
    with pytest.raises(GenerationError, match="at least one token"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(GenerationError, match="prompt token 1 = 512"):
        engine.add_request("oov", [3, 512], GREEDY)
    with pytest.raises(GenerationError, match="request id 5"):
        engine.add_request(5, [3], GREEDY)
    with pytest.raises(GenerationError, match="SamplingParams"):
        engine.add_request("p", [3], {"temperature": 0})
    with pytest.raises(ContextLengthError, match="1000 prompt tokens \\+ 100 new tokens = 1100"):
        engine.add_request("long", [3] * 1000, SamplingParams(max_new_tokens=100))
    with pytest.raises(SchedulerError, match="'big' may need 9 KV blocks"):
        engine.add_request("big", [3] * 30, SamplingParams(max_new_tokens=5))
    engine.add_request("ok", [3, 4], GREEDY)
    with pytest.raises(SchedulerError, match="'ok' is already queued"):
        engine.add_request("ok", [5], GREEDY)
    with pytest.raises(GenerationError, match="idle engine"):
        engine.generate([[1, 2]], GREEDY)
    engine.abort("ok")
    with pytest.raises(GenerationError, match="2 prompts but 1"):
        engine.generate([[1], [2]], [GREEDY])
    with pytest.raises(GenerationError, match="max_length"):  # a bad later prompt leaves nothing queued
        engine.generate([[1], [2] * 10], SamplingParams(max_length=5))
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == 8


def test_pool_sizes_follow_engine_config(make_model):
    per_request = 1024 // 16  # blocks of one full-context request (the presets' context is 1024)
    for name, per_slot in (("tiny-moe", 3 * (32 + 8)), ("tiny-dense", 2 * 2 * 2 * 16)):
        model = make_model(name)
        block = per_slot * 4 * 16  # fp32
        assert bytes_per_block(model, 16) == block
        capped = EngineConfig(max_num_seqs=4, kv_cache_bytes=(2 * per_request + 3) * block + 5)
        engine = LLMEngine(model, capped)
        assert engine.block_manager.num_blocks == 2 * per_request + 3  # within kv_cache_bytes
        pool_bytes = sum(t.numel() * t.element_size() for layer in engine.runner.kv_pool for t in layer)
        assert pool_bytes == (2 * per_request + 3) * block
    assert LLMEngine(model, max_num_seqs=2).block_manager.num_blocks == 2 * per_request  # max_num_seqs full contexts
    assert LLMEngine(model, kv_cache_bytes=1).block_manager.num_blocks == per_request  # never below one context
    assert LLMEngine(model, num_blocks=7).block_manager.num_blocks == 7  # an exact size wins
    assert EngineConfig().kv_blocks(model, need_tokens=16 * 100) == 100  # one call's need, beyond a context
    assert EngineConfig().kv_blocks(model, need_tokens=16) == per_request  # grown to a full context
