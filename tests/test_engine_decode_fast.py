"""The C decode attention over the paged pools (`r1kit.kernels.paged_attention`) against the torch reference
(contexts gathered into a padded batch, `_decode_sdpa`), and the engine with it against the engine without."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import randomize

from r1kit.engine import LLMEngine
from r1kit.generate import SamplingParams
from r1kit.kernels import paged_attention
from r1kit.model.attention import PagedBatch, _decode_sdpa
from r1kit.model.config import preset
from r1kit.model.transformer import Transformer

# CI sets R1KIT_REQUIRE_KERNELS=1: this kernel needs only a C compiler, so where there is one a build failure is
# then an error, not a skip
if (paged_attention.load() is None and os.environ.get("R1KIT_REQUIRE_KERNELS") == "1"
        and (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"))):
    raise RuntimeError(f"R1KIT_REQUIRE_KERNELS=1 but the paged attention kernel is off: {paged_attention.why_not()}")
pytestmark = pytest.mark.skipif(paged_attention.load() is None, reason=f"kernel off: {paged_attention.why_not()}")


def reference(q, k_pool, v_pool, slots, lens, scale):
    """Gather each context into a padded fp32 batch, mask the padding, softmax attention: (B, H, Dv)."""
    B, S = slots.shape
    Hkv = k_pool.shape[1]
    k = k_pool.float().index_select(0, slots.flatten()).view(B, S, Hkv, -1).transpose(1, 2)  # (B, Hkv, S, D)
    v = v_pool.float().index_select(0, slots.flatten()).view(B, S, Hkv, -1).transpose(1, 2)
    mask = (torch.arange(S)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return _decode_sdpa(q.float()[:, :, None], k, v, mask, scale)[:, :, 0]


def random_case(gen, dtype, B, H, Hkv, D, Dv, lens, num_slots=300):
    """Pools with random values; each sequence's context in random distinct slots, padded with slot 0."""
    k_pool = torch.randn(num_slots, Hkv, D, generator=gen).to(dtype)
    v_pool = torch.randn(num_slots, Hkv, Dv, generator=gen).to(dtype)
    q = torch.randn(B, H, D, generator=gen).to(dtype)
    S = max(lens)
    slots = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lens):
        slots[b, :n] = torch.randperm(num_slots, generator=gen)[:n]
    return q, k_pool, v_pool, slots, torch.tensor(lens)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("H,Hkv,D,Dv", [(4, 4, 16, 16), (12, 4, 64, 64), (6, 2, 24, 8)])
def test_kernel_equals_padded_reference(dtype, atol, H, Hkv, D, Dv):
    """Mixed context lengths (1 to 257, over block-sized and odd ones), GQA groups 1 and 3, Dv != D."""
    gen = torch.Generator().manual_seed(H * D + Dv)
    lens = [1, 17, 257, 64, 3, 200]
    q, k_pool, v_pool, slots, lens_t = random_case(gen, dtype, len(lens), H, Hkv, D, Dv, lens)
    got = paged_attention.decode_attention(q, k_pool, v_pool, slots, lens_t, D**-0.5)
    assert got.dtype == dtype and got.shape == (len(lens), H, Dv)
    want = reference(q, k_pool, v_pool, slots, lens_t, D**-0.5)  # fp32 from the same (rounded) inputs
    assert (got.float() - want).abs().max() <= atol
    assert (got[0].float() - v_pool[slots[0, 0]].float().repeat_interleave(H // Hkv, 0)).abs().max() <= atol


def test_threads_agree_and_bad_input_is_refused():
    """Two OpenMP threads give the one-thread result; lengths outside 1..S and slots outside the pool are
    errors naming them; other dtypes or autograd inputs get None (the caller's torch path)."""
    gen = torch.Generator().manual_seed(3)
    q, k_pool, v_pool, slots, lens = random_case(gen, torch.float32, 5, 8, 2, 32, 32, [5, 40, 1, 33, 16])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention.decode_attention(q, k_pool, v_pool, slots, lens, 0.2)
        torch.set_num_threads(2)
        two = paged_attention.decode_attention(q, k_pool, v_pool, slots, lens, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="context lengths"):
        paged_attention.decode_attention(q, k_pool, v_pool, slots, lens + 1, 0.2)
    with pytest.raises(IndexError, match="slots outside the pool of 300"):
        paged_attention.decode_attention(q, k_pool, v_pool, slots + 280, lens, 0.2)
    assert paged_attention.decode_attention(q.double(), k_pool.double(), v_pool.double(), slots, lens, 0.2) is None
    assert paged_attention.decode_attention(q.requires_grad_(), k_pool, v_pool, slots, lens, 0.2) is None


@pytest.fixture(scope="module")
def dense():
    return randomize(Transformer(preset("tiny-dense")).init_weights(0), 0, 0.15).eval()


def test_forward_paged_decode_equals_reference(dense, monkeypatch):
    """A decode step of sequences with mixed contexts over scattered blocks: the model's logits with the kernel
    equal those of the torch path (the kernel switched off)."""
    pool = dense.new_paged_cache(64 * 16)
    for k, v in pool:
        k.normal_(generator=torch.Generator().manual_seed(0))
        v.normal_(generator=torch.Generator().manual_seed(1))
    tables = [[5, 9, 2], [7], [30, 31, 1, 0, 40, 12], [3]]
    contexts = [(t, n, 1) for t, n in zip(tables, [35, 4, 90, 1], strict=True)]
    batch = PagedBatch.build(contexts, 16, logits_rows=[0, 1, 2, 3])
    ids = torch.tensor([3, 40, 7, 99])
    with torch.inference_mode():
        fast = dense.forward_paged(ids, batch, [(k.clone(), v.clone()) for k, v in pool])
        monkeypatch.setattr(paged_attention, "decode_attention", lambda *a: None)
        slow = dense.forward_paged(ids, batch, [(k.clone(), v.clone()) for k, v in pool])
    assert (fast - slow).abs().max() <= 2e-5


def test_engine_tokens_equal_without_kernel(dense, monkeypatch):
    """Greedy engine output on prompts of mixed lengths, batched decode through the kernel, equals the engine's
    on the torch path."""
    prompts = [list(range(2, 2 + n)) for n in (3, 40, 17, 90, 1)]
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def run():
        return LLMEngine(dense, block_size=16, num_blocks=64).generate(prompts, params)

    fast = run()
    monkeypatch.setattr(paged_attention, "decode_attention", lambda *a: None)
    assert fast == run()
