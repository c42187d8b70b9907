"""r1kit.compress: every method writes a checkpoint that loads (and generates), checked against references:
pruned weights really zero or really removed (equal to the masked original), the 2:4 pattern, SVD error as
predicted, the clustered decode path; and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1kit.checkpoint import load_model
from r1kit.compress import CompressError, compress, lowrank, prune, structured
from r1kit.quant.compressed import ClusteredLinear, LowRankLinear

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"


IDS = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder, "cpu", torch.float32)(IDS)


@pytest.mark.parametrize("method, options", [
    ("int8", {}), ("int4", {"group_size": 32}), ("fp8", {}), ("prune-unstructured", {"sparsity": 0.4}),
    ("prune-2:4", {}), ("low-rank", {"energy": 0.9}), ("cluster", {"clusters": 8}),
    ("prune-structured", {"heads": 3, "mlp_keep": 0.5, "experts": 6}),
])
def test_every_method_writes_a_loadable_checkpoint(tiny_src, tmp_path, method, options):
    out = tmp_path / "out"
    compress(tiny_src, out, method, options)
    record = json.loads((out / "config.json").read_text())["compression"]
    assert record["method"] == method and record["source"] == str(tiny_src)
    assert {k: record["options"][k] for k in options} == options
    y = _logits(out)
    assert y.shape == (2, 12, 4096) and torch.isfinite(y).all()


def test_unstructured_pruning_zeroes_the_smallest(tiny_src, tmp_path):
    compress(tiny_src, tmp_path / "g", "prune-unstructured", {"sparsity": 0.5, "scope": "layer"})
    before, after = load_model(tiny_src), load_model(tmp_path / "g")
    wb, wa = prune.prunable(before), prune.prunable(after)
    for name, w in wa.items():  # per tensor: half zero, and exactly where the original was smallest
        mags = wb[name].detach().abs().flatten()
        cut = mags.sort().values[int(0.5 * mags.numel()) - 1]
        expected = torch.where(wb[name].abs() > cut, wb[name], torch.zeros(()))
        torch.testing.assert_close(w.detach(), expected)
    assert abs(prune.sparsity_of(wa) - 0.5) < 0.01
    assert torch.equal(after.lm_head.weight, before.lm_head.weight)  # not pruned


def test_two_four_pattern_matches_a_naive_loop():
    w = torch.randn(6, 16)
    mask = prune.two_four_masks({"w": torch.nn.Parameter(w)})["w"]
    for r in range(6):
        for g in range(4):
            block = w[r, 4 * g:4 * g + 4].abs().tolist()
            keep = sorted(range(4), key=lambda i: -block[i])[:2]
            assert [bool(mask[r, 4 * g + i]) for i in range(4)] == [i in keep for i in range(4)]
    assert prune.is_two_four(w * mask) and not prune.is_two_four(w)


def test_structured_pruning_equals_the_masked_original(make_model):
    """Removing heads and channels computes what the original computes with them zeroed out."""
    model = make_model("tiny-moe", num_mtp_layers=0)
    pruned, report = structured.prune_structured(model, heads=2, mlp_keep=0.5)
    assert (pruned.config.num_heads, pruned.config.intermediate_size) == (2, 64)
    assert report["params_after"] < report["params_before"]
    masked = make_model("tiny-moe", num_mtp_layers=0)
    with torch.no_grad():
        for i, layer in enumerate(masked.layers):
            attn, kept_attn = layer.self_attn, pruned.layers[i].self_attn
            o = attn.o_proj.weight.view(64, 4, 16)
            kept_heads = [h for h in range(4) if any(torch.equal(o[:, h], kept_attn.o_proj.weight.view(64, 2, 16)[:, j])
                                                     for j in range(2))]
            assert len(kept_heads) == 2
            for h in set(range(4)) - set(kept_heads):
                o[:, h] = 0
            mlp = layer.mlp if i == 0 else layer.mlp.shared_experts
            kept_down = pruned.layers[i].mlp.down_proj.weight if i == 0 else None
            if kept_down is not None:
                cols = [c for c in range(128) if any(torch.equal(mlp.down_proj.weight[:, c], kept_down[:, j])
                                                     for j in range(64))]
                zero = torch.ones(128, dtype=torch.bool)
                zero[cols] = False
                mlp.down_proj.weight[:, zero] = 0
            else:  # experts: zero the channels each expert dropped
                ex, kex = layer.mlp.experts, pruned.layers[i].mlp.experts
                for e in range(ex.n_experts):
                    keep = [c for c in range(32) if any(torch.equal(ex.down_proj[e, :, c], kex.down_proj[e, :, j])
                                                        for j in range(kex.hidden))]
                    drop = torch.ones(32, dtype=torch.bool)
                    drop[keep] = False
                    ex.down_proj[e][:, drop] = 0
                sh, ksh = layer.mlp.shared_experts, pruned.layers[i].mlp.shared_experts
                keep = [c for c in range(32) if any(torch.equal(sh.down_proj.weight[:, c], ksh.down_proj.weight[:, j])
                                                    for j in range(ksh.down_proj.weight.shape[1]))]
                drop = torch.ones(32, dtype=torch.bool)
                drop[keep] = False
                sh.down_proj.weight[:, drop] = 0
        ids = IDS % 512
        torch.testing.assert_close(pruned(ids), masked(ids), rtol=1e-4, atol=1e-4)


def test_expert_pruning_keeps_the_most_used(make_model):
    model = make_model("tiny-moe", num_mtp_layers=0)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    counts = {}
    with torch.no_grad():  # naive frequency: route every layer's input by hand
        x = model.embed_tokens(ids)
        rope = model.rotary(torch.arange(32)[None], x.dtype)
        from r1kit.model.attention import attention_mask

        mask = attention_mask(4, 32, 0, None, ids.device)
        for i, layer in enumerate(model.layers):
            if i > 0:
                h = layer.post_attention_layernorm(x + layer.self_attn(layer.input_layernorm(x), rope, mask))
                _, idx = layer.mlp.gate.route(layer.mlp.gate.score(h.reshape(-1, 64)))
                counts[i] = torch.bincount(idx.flatten(), minlength=8)
            x = layer(x, rope, mask)
    pruned, report = structured.prune_structured(model, experts=5, calibration=ids)
    assert pruned.config.n_routed_experts == 5 and pruned.config.n_group == 1
    for i, c in counts.items():
        assert report["expert_importance"][f"layers.{i}.mlp."] == [float(v) for v in c]
        kept = sorted(c.argsort(descending=True, stable=True)[:5].tolist())
        torch.testing.assert_close(pruned.layers[i].mlp.gate.weight, model.layers[i].mlp.gate.weight[kept])


def test_low_rank_error_is_as_predicted(tiny_src, tmp_path):
    w = torch.randn(40, 24, dtype=torch.float64).float()
    b, a, predicted = lowrank.factorize(w, 5)
    assert abs(float(((w - b @ a) ** 2).sum()) - predicted) < 1e-3 * predicted
    s = torch.linalg.svdvals(w.double())
    assert abs(predicted - float((s[5:] ** 2).sum())) < 1e-6 * predicted
    compress(tiny_src, tmp_path / "lr", "low-rank", {"rank": 8})
    model = load_model(tmp_path / "lr")
    lr = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lr and all(m.rank == 8 for m in lr)
    x = torch.randn(3, lr[0].in_features)
    torch.testing.assert_close(lr[0](x), x @ (lr[0].weight_b @ lr[0].weight_a).T)


def test_cluster_codebook_and_decode(tiny_src, tmp_path):
    compress(tiny_src, tmp_path / "cl", "cluster", {"clusters": 4})
    model = load_model(tmp_path / "cl")
    cl = [m for m in model.modules() if isinstance(m, ClusteredLinear)]
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert cl and plain and all(n.endswith("kv_b_proj") for n in plain)  # MLA's absorbed path reads it
    m = cl[0]
    w = m.dequantize()
    idx = torch.stack((m.weight & 15, m.weight >> 4), -1).flatten(-2).long()  # naive unpack
    for r in range(3):
        assert len(set(w[r].tolist())) <= 4
        assert w[r].tolist() == [float(m.weight_codebook[r, 0, i]) for i in idx[r].tolist()]
    assert m.weight.dtype == torch.uint8 and m.weight.shape == (m.out_features, m.in_features // 2)


@pytest.mark.parametrize("method, options", [("low-rank", {"energy": 0.8}), ("cluster", {}),
                                             ("prune-structured", {"heads": 2, "experts": 4})])
def test_compressed_model_serves_on_the_engine(tiny_src, tmp_path, method, options):
    """The engine's paged path (R1Model.generate's default) gives the greedy tokens of the plain forward."""
    from r1kit.api import R1Model

    compress(tiny_src, tmp_path / "c", method, options)
    model = R1Model.from_pretrained(tmp_path / "c", device="cpu", dtype="fp32")
    assert model.use_engine
    ids = [0, 17, 42, 99]
    text = model.generate(input_ids=ids, max_new_tokens=5, temperature=0)
    plain = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(5):
            plain = torch.cat((plain, model.model(plain)[:, -1:].argmax(-1)), 1)
    new = plain[0, 4:].tolist()
    stops = set(model.stop_ids())
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert text == model.tokenizer.decode(new)


def test_bad_input_names_the_problem(tiny_src, tmp_path):
    cases = [("nope", {}, "methods: int8"), ("int8", {"rank": 2}, "unknown key(s) ['rank']"),
             ("prune-unstructured", {"sparsity": 1.0}, "sparsity must be in [0, 1)"),
             ("cluster", {"clusters": 1}, "clusters must be in [2, 16]"),
             ("low-rank", {"rank": 64}, "rank=64 must be in [1, 64)"),
             ("low-rank", {"rank": 4, "energy": 0.5}, "one of energy, rank, target"),
             ("prune-structured", {}, "at least one of heads"),
             ("prune-structured", {"experts": 1}, "experts=1 must be in [2")]
    for method, options, words in cases:
        with pytest.raises(ValueError) as e:  # CompressError is one
            compress(tiny_src, tmp_path / "x", method, options)
        assert words in str(e.value), (method, str(e.value))
    compress(tiny_src, tmp_path / "q", "int8")
    with pytest.raises(CompressError, match="already quantized"):
        compress(tmp_path / "q", tmp_path / "qq", "int4")
    compress(tiny_src, tmp_path / "lr", "low-rank", {"rank": 4})
    with pytest.raises(CompressError, match="already compressed"):
        compress(tmp_path / "lr", tmp_path / "lr2", "int8")
    compress(tiny_src, tmp_path / "p", "prune-2:4")
    compress(tmp_path / "p", tmp_path / "p8", "int8")  # pruning then quantizing is supported
    assert json.loads((tmp_path / "p8" / "config.json").read_text())["compression"]["previous"]["method"] == "prune-2:4"


def test_cli_errors_are_one_line(capsys):
    from r1kit.__main__ import main

    assert main(["compress", str(NANO), "/tmp/never", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'nope'" in err and "prune-2:4" in err
