"""Sparse attention (local_global, topk; GQA and MLA) in the paged engine: the paged layer == the layer on its
contiguous cache, and LLMEngine (continuous batching, chunked prefill, prefix sharing, preemption) == the
KV-cache loop `generate_tokens`, each prompt alone (a left-padded batch shifts the block grid of its padded
rows), greedy in fp32."""

from __future__ import annotations

import pytest
import torch

from r1kit.engine import LLMEngine
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.model.attention import PagedBatch, attention_mask
from r1kit.model.sparse_attention import SparseGQAttention, SparseMLAttention

# block 8, windows 4..12, 3 global tokens, top-2 blocks: contexts of 20-40 tokens are sparse under every rule
SMALL = dict(sparse_block_size=8, sparse_window_base=4, sparse_window_max=12, sparse_global_tokens=3,
             sparse_topk_blocks=2, num_mtp_layers=0)
CASES = {
    "gqa-local_global-key": ("tiny-dense", "local_global", {}),
    "gqa-local_global-query": ("tiny-dense", "local_global", {"sparse_importance": "query"}),
    "gqa-local_global-none": ("tiny-dense", "local_global", {"sparse_importance": "none", "sparse_global_tokens": 0}),
    "mla-local_global-key": ("tiny-moe", "local_global", {}),
    "gqa-topk": ("tiny-dense", "topk", {}),
    "mla-topk": ("tiny-moe", "topk", {}),
}
ENGINE_CASES = ["gqa-local_global-key", "mla-local_global-key", "gqa-topk", "mla-topk"]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0)
PROMPTS = [list(range(40, 66)), [5, 17, 42], list(range(100, 119)), [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13],
           list(range(300, 331))]


def sparse_model(make_model, case: str, **overrides):
    name, kind, extra = CASES[case]
    return make_model(name, **{**SMALL, "sparse_attention": kind, **extra, **overrides})


def reference(model, prompts, params=GREEDY) -> list[list[int]]:
    """The KV-cache loop, one prompt at a time."""
    return [[step[0] for step in generate_tokens(model, [p], params)] for p in prompts]


# ---------------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_paged_sparse_layer_matches_its_contiguous_cache(make_model, case):
    """Prefill chunks beside decodes, a prefix read from another sequence's blocks, decodes of three context
    lengths in one padded batch, over scattered slots: the outputs of each sequence alone on new_cache."""
    model = sparse_model(make_model, case)
    attn = model.layers[1].self_attn
    assert isinstance(attn, SparseMLAttention if CASES[case][0] == "tiny-moe" else SparseGQAttention)
    gen = torch.Generator().manual_seed(1)
    C, L = model.config.hidden_size, 30
    xa = torch.randn(L, C, generator=gen)
    xs = {"a": xa, "b": torch.cat((xa[:16], torch.randn(L - 16, C, generator=gen))),
          "c": torch.randn(L, C, generator=gen)}
    perm = torch.randperm(40, generator=gen).tolist()  # 40 blocks of 4 slots, handed out in random order
    tables = {"a": perm[:8], "c": perm[8:16]}
    tables["b"] = tables["a"][:4] + perm[16:20]  # b's first 16 positions are a's blocks (a shared prefix)
    # per sequence: the step it starts at, its first position and its chunk lengths (b after a wrote its prefix)
    plan = {"a": (0, 0, [13, 12] + [1] * 5), "c": (0, 0, [9] + [1] * 21), "b": (2, 16, [5, 4] + [1] * 5)}
    chunks = {s: [(start + sum(lens[:i]), n) for i, n in enumerate(lens)] for s, (_, start, lens) in plan.items()}
    steps = [[(s, *chunks[s][i - first]) for s, (first, _, lens) in plan.items() if 0 <= i - first < len(lens)]
             for i in range(max(first + len(lens) for first, _, lens in plan.values()))]
    assert any(sum(n == 1 for _, _, n in step) == 3 for step in steps)  # three decodes, three lengths
    kv = attn.new_paged_cache(160, torch.float32, torch.device("cpu"))
    paged: dict[str, list[torch.Tensor]] = {s: [] for s in xs}
    for step in steps:
        batch = PagedBatch.build([(tables[s], start + n, n) for s, start, n in step], block_size=4)
        x = torch.cat([xs[s][start:start + n] for s, start, n in step])[None]
        y = attn.forward_paged(x, model.rotary(batch.positions[None], x.dtype), batch, kv)[0]
        for (s, _, _), part in zip(step, y.split([n for _, _, n in step]), strict=True):
            paged[s].append(part)
    for s, x in xs.items():
        cache = attn.new_cache(1, L, torch.float32, torch.device("cpu"))
        ref = []
        for start, n in ([(0, 16)] if s == "b" else []) + chunks[s]:  # the contiguous cache computes b's prefix
            rope = model.rotary(torch.arange(start, start + n)[None], x.dtype)
            ref.append(attn(x[None, start:start + n], rope, attention_mask(1, n, start, None, x.device), cache,
                            start)[0])
        torch.testing.assert_close(torch.cat(paged[s]), torch.cat(ref[1:] if s == "b" else ref), atol=1e-5,
                                   rtol=1e-5)


def test_paged_pools_hold_one_entry_per_token(make_model):
    """local_global keeps each token's importance and global-token scores beside its key and value (fp32);
    topk only keys and values. A sparse_layers model mixes sparse and dense pools."""
    model = sparse_model(make_model, "gqa-local_global-key", sparse_layers=[1])
    dense, lg = model.new_paged_cache(64)
    assert [t.shape for t in dense] == [(64, 2, 16), (64, 2, 16)]
    assert [t.shape for t in lg] == [(64, 2, 16), (64, 2, 16), (64, 2), (64, 4, 3)]
    assert lg[2].dtype == lg[3].dtype == torch.float32
    topk = sparse_model(make_model, "mla-topk").new_paged_cache(64)[0]
    assert [t.shape for t in topk] == [(64, 4, 24), (64, 4, 16)]  # expanded keys (nope + rope) and values


# ---------------------------------------------------------------------------------------------------- the engine


def drive(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int]]]]) -> dict[str, list[int]]:
    """Add arrivals[i] before step i, step until done; collect the streamed tokens per request."""
    got: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step <= max(arrivals):
        for rid, prompt in arrivals.get(step, []):
            engine.add_request(rid, prompt, GREEDY)
            got[rid] = []
        for r in engine.step():
            got[r.request_id].append(r.token)
        step += 1
        assert step < 500
    return got


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_continuous_batching_matches_generate_tokens(make_model, case):
    """Requests arriving at different steps, prefill chunks (chunk_size 7) beside decodes of different context
    lengths: each request's greedy tokens are those of the KV-cache loop."""
    model = sparse_model(make_model, case)
    ref = reference(model, PROMPTS)
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, chunk_size=7)
    free = engine.block_manager.num_free_blocks
    got = drive(engine, {0: [("r0", PROMPTS[0]), ("r1", PROMPTS[1])], 3: [("r2", PROMPTS[2]), ("r3", PROMPTS[3])],
                         6: [("r4", PROMPTS[4])]})
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == ref
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished()


@pytest.mark.parametrize("case", ["gqa-local_global-query", "mla-topk"])
def test_prefix_sharing_gives_the_same_tokens(make_model, case):
    """b's first 24 prompt tokens are a's cached blocks (their keys, importances and global scores written by a)."""
    model = sparse_model(make_model, case)
    prefix = list(range(300, 324))
    a, b = prefix + [1, 2, 3], prefix + [7, 8]
    engine = LLMEngine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request("a", a, GREEDY)
    got = {"a": [r.token for r in engine.step()], "b": []}
    engine.add_request("b", b, GREEDY)
    for r in engine.step():
        got[r.request_id].append(r.token)
    assert next(s for s in engine.scheduler.running if s.request_id == "b").num_cached_tokens == 24
    while engine.has_unfinished():
        for r in engine.step():
            got[r.request_id].append(r.token)
    assert [got["a"], got["b"]] == reference(model, [a, b])


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_preemption_under_a_tiny_block_pool_gives_the_same_tokens(make_model, case):
    """Preempted requests are recomputed from their tokens: the pools' entries are functions of the tokens."""
    model = sparse_model(make_model, case)
    prompts = [list(range(10, 24)), list(range(30, 41)), list(range(50, 66))]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    engine = LLMEngine(model, num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    assert engine.generate(prompts, params) == reference(model, prompts, params)
    assert engine.num_preemptions > 0 and engine.block_manager.num_free_blocks == 16
