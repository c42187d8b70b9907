"""ONNX export: ONNX Runtime's logits within 1e-4 (relative) of r1kit's fp32 logits and its greedy decode equal to
r1kit's, for MLA + MoE (DeepSeek), Llama and Qwen2 shapes; the exportable MoE dispatch equals the grouped one; the
--with-cache graph (the MLA + MoE case) step by step against r1kit's KVCache decoding (logits and the cache entries
themselves; a GQA cache was checked the same way by hand, not in CI for the export time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from r1kit.export import ExportError, OrtGreedy, export_onnx  # noqa: E402
from r1kit.export.onnx import ExportableExperts  # noqa: E402
from r1kit.model.moe import Experts  # noqa: E402


def _eager_greedy(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    """r1kit's greedy continuation, through its KV cache (an independent path from the exported full forward)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    out = ids
    with torch.no_grad():
        logits = model(ids, cache)
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out = torch.cat((out, nxt), 1)
            logits = model(nxt, cache)
    return out.tolist()


@pytest.mark.parametrize("name, overrides, with_cache", [  # one export each; the MLA + MoE one with its KV cache
    ("tiny-moe", {"num_layers": 1, "first_k_dense_replace": 0, "num_mtp_layers": 0}, True),
    ("tiny-dense", {"num_layers": 1}, False),
    ("tiny-dense", {"num_layers": 1, "arch": "qwen2", "attention_bias": True}, False),
])
def test_ort_matches_r1kit(make_model, tmp_path, name, overrides, with_cache):
    model = make_model(name, std=0.08, **overrides)
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).numpy()
    file = export_onnx(model, tmp_path, with_cache=with_cache)
    ort = OrtGreedy(file, threads=1)
    assert ort.cached == with_cache
    got = ort.logits(ids.numpy())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    fresh = make_model(name, std=0.08, **overrides)  # not made exportable: the model as r1kit runs it
    assert ort.generate(ids.numpy(), 6) == _eager_greedy(fresh, ids, 6)
    if with_cache:
        _check_steps(ort, fresh)


def _check_steps(ort: OrtGreedy, model) -> None:
    """The cached graph step by step against r1kit's KVCache decoding: a 5-token prompt (past length 0), then one
    token at a time; the logits and the returned cache entries (MLA latents, (B, S, width)) against r1kit's."""
    assert [i.name for i in ort.session.get_inputs()][:2] == ["input_ids", "past.0.latent"]
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    cache, past = model.new_cache(2, 9), ort.empty_cache(2)
    for step in range(4):
        with torch.no_grad():
            ref = model(ids, cache).numpy()
        got, past = ort.step(ids.numpy(), past)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), step
        for mine, theirs in zip(past, [t for layer in cache.layers for t in layer], strict=True):
            assert mine.shape[1] == cache.pos
            np.testing.assert_allclose(mine, theirs[:, :cache.pos].numpy(), atol=1e-5)
        ids = torch.from_numpy(got[:, -1:].argmax(-1))  # (2, 1) greedy


def test_exportable_experts_equal_grouped_dispatch():
    torch.manual_seed(0)
    ex = Experts(6, 16, 8)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    x = torch.randn(20, 16)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(20)])
    w = torch.rand(20, 2)
    dense = ExportableExperts.from_experts(ex)
    torch.testing.assert_close(dense(x, w, idx), ex(x, w, idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(x, w, idx), ex.forward_reference(x, w, idx), rtol=1e-5, atol=1e-5)
    assert dense.gate_up_proj is ex.gate_up_proj  # shares the parameters


def test_untraceable_model_names_the_module(make_model, tmp_path):
    from r1kit.quant import quantize_model

    model = make_model("tiny-moe", num_layers=2, num_mtp_layers=0)
    quantize_model(model, "int8")
    with pytest.raises(ExportError, match=r"layers\.1\.mlp\.experts \(QuantizedExperts\)"):
        export_onnx(model, tmp_path)

