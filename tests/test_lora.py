"""LoRA / QLoRA (r1kit.lora, r1kit.quant.nf4): grouped expert adapters against the per-token loop, merge/unmerge,
named adapters, targets, adapter files for MoE models, quantized bases, NF4 against its published table, and
an adapter served by the engine (equal to the merged model)."""

from __future__ import annotations

import pytest
import torch

from r1kit.generate import SamplingParams
from r1kit.lora import (
    LoRAConfig,
    LoRAError,
    LoRAExperts,
    adapter_names,
    inject_lora,
    load_adapter,
    lora_modules,
    lora_param_count,
    mark_only_lora_trainable,
    merge_lora,
    quantize_base,
    save_adapter,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from r1kit.model.moe import Experts
from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.nf4 import NF4_LEVELS, NF4Linear, dequantize_nf4, nf4_levels, quantize_nf4

# The NF4 code book as printed in the QLoRA paper (Dettmers et al. 2023, appendix E), 4 decimals.
PAPER_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def _ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _nonzero_b(model, name: str = "default", std: float = 0.1, seed: int = 0) -> None:
    """Draw every B of adapter `name` (they start at zero) so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        if name in m.lora_B:
            for p in m.lora_B[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _set_moe_reference(model, on: bool) -> None:
    for m in model.modules():
        if type(m).__name__ == "MoE":
            m.reference = on


# ---------------------------------------------------------------------------------------------------- NF4


def test_nf4_levels_are_the_published_ones():
    """The table equals the paper's (4 decimals) and the normal-quantile construction (fp32 rounding)."""
    torch.testing.assert_close(NF4_LEVELS, torch.tensor(PAPER_NF4), atol=5e-5, rtol=0)
    torch.testing.assert_close(nf4_levels(), NF4_LEVELS, atol=1e-6, rtol=0)
    assert NF4_LEVELS[7] == 0 and len(set(NF4_LEVELS.tolist())) == 16


def test_nf4_round_trip_and_double_quant():
    """Each weight goes to its nearest level times its block's absmax (checked against a brute-force search);
    double quantization changes the absmax by at most its int8 step and stores fewer bytes."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(w)
    deq = dequantize_nf4(q["weight"], q["absmax"])
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(-1, keepdim=True)
    nearest = NF4_LEVELS[(blocks / absmax)[..., None].sub(NF4_LEVELS).abs().argmin(-1)] * absmax  # brute force
    torch.testing.assert_close(deq, nearest.reshape(16, 128), atol=1e-6, rtol=0)
    lin = torch.nn.Linear(128, 16)
    plain, dq = NF4Linear.from_linear(lin), NF4Linear.from_linear(lin, double_quant=True)
    step = (dq.block_absmax() - plain.block_absmax()).abs().max()
    assert step <= (plain.block_absmax() - plain.block_absmax().mean()).abs().max() / 127 / 2 + 1e-7
    assert dq.weight_bytes() < plain.weight_bytes() < lin.weight.numel() * 4 / 6
    x = torch.randn(3, 128, requires_grad=True)
    plain(x).sum().backward()  # gradients flow through the dequantized weight into x
    torch.testing.assert_close(x.grad, plain.dequantize().sum(0).expand(3, -1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_grouped_expert_adapters_match_the_loop(quant):
    """LoRAExperts' grouped dispatch (base + per-expert adapters) equals the per-token loop over each expert's
    W + s * B @ A, outputs and gradients, on plain and quantized experts."""
    torch.manual_seed(0)
    E, C, hidden = 6, 64, 32
    base = Experts(E, C, hidden)
    torch.nn.init.normal_(base.gate_up_proj, std=0.1)
    torch.nn.init.normal_(base.down_proj, std=0.1)
    if quant:
        base = QuantizedExperts.from_experts(base, quant, group_size=32)
    lora = LoRAExperts(base)
    lora.add_adapter("default", LoRAConfig(r=4, alpha=8))
    lora.active = "default"
    for p in lora.lora_B["default"].values():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(10, C)
    idx = torch.randint(0, E, (10, 2))
    weights = torch.rand(10, 2)
    fast, ref = lora(x, weights, idx), lora.forward_reference(x, weights, idx)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert (fast - base(x, weights, idx)).abs().max() > 1e-3
    params = list(lora.lora_A["default"].values()) + list(lora.lora_B["default"].values())
    g_fast = torch.autograd.grad(fast.pow(2).sum(), params)
    g_ref = torch.autograd.grad(lora.forward_reference(x, weights, idx).pow(2).sum(), params)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_merge_unmerge_exact_on_moe(make_model):
    """On the MLA + MoE tiny model (attention low-rank projections, dense MLP, shared and routed experts):
    merged logits equal the unmerged adapter's, unmerge restores every weight bit for bit, the adapter changes
    the output, and a merged-then-unloaded model is a plain Transformer giving the same logits."""
    model = make_model("tiny-moe")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(model.config.vocab_size)
    base = model(ids)
    adapted = inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert any(n.endswith("mlp.experts") for n in adapted) and any("shared_experts" in n for n in adapted)
    assert any(n.endswith("kv_a_proj_with_mqa") for n in adapted) and any(n.endswith("layers.0.mlp.up_proj")
                                                                          for n in adapted)
    _nonzero_b(model)
    with_adapter = model(ids)
    assert (with_adapter - base).abs().max() > 1e-2
    _set_moe_reference(model, True)
    torch.testing.assert_close(model(ids), with_adapter, atol=1e-4, rtol=0)
    _set_moe_reference(model, False)
    assert merge_lora(model) == len(adapted)
    torch.testing.assert_close(model(ids), with_adapter, atol=1e-4, rtol=0)
    assert unmerge_lora(model) == len(adapted)
    for name, m in lora_modules(model):
        key = name + (".weight" if not isinstance(m, LoRAExperts) else ".gate_up_proj")
        assert torch.equal(m.base_layer.state_dict()[key.rsplit(".", 1)[1]], original[key]), name
    torch.testing.assert_close(model(ids), with_adapter, atol=0, rtol=0)
    merge_lora(model, keep_original=False)
    plain = unload_lora(model)
    assert not list(lora_modules(plain)) and set(plain.state_dict()) == set(original)
    torch.testing.assert_close(plain(ids), with_adapter, atol=1e-4, rtol=0)


@torch.no_grad()
def test_named_adapters_switch_without_reloading(make_model):
    """Two adapters on one base: each gives its own output, None gives the base exactly, an unknown name is an
    error naming the adapters there are."""
    model = make_model("tiny-dense")
    ids = _ids(model.config.vocab_size)
    base = model(ids)
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name="a")
    inject_lora(model, LoRAConfig(r=4, target_modules=r"mlp\.down_proj$"), name="b")
    _nonzero_b(model, "a", seed=1)
    _nonzero_b(model, "b", seed=2)
    set_adapter(model, "a")
    out_a = model(ids)
    set_adapter(model, "b")
    out_b = model(ids)
    set_adapter(model, None)
    assert torch.equal(model(ids), base)
    assert (out_a - out_b).abs().max() > 1e-3 and (out_a - base).abs().max() > 1e-3
    assert adapter_names(model) == ["a", "b"]
    with pytest.raises(LoRAError, match=r"no adapter named 'c'.*\['a', 'b'\]"):
        set_adapter(model, "c")


def test_targets_regex_list_and_errors(make_model):
    """A pattern that matches nothing is an error listing the module names it could have matched."""
    model = make_model("tiny-moe")
    with pytest.raises(LoRAError, match=r"'wq' matches no module.*q_a_proj.*mlp\.experts"):
        inject_lora(model, LoRAConfig(target_modules=["o_proj", "wq"]))
    with pytest.raises(LoRAError, match="matches no module"):
        inject_lora(model, LoRAConfig(target_modules=r"attn\.nothing"))
    with pytest.raises(LoRAError, match="not a valid regular expression"):
        inject_lora(model, LoRAConfig(target_modules="(q_proj"))
    assert inject_lora(model, LoRAConfig(target_modules=["layers.1.mlp.experts"])) == ["layers.1.mlp.experts"]


@torch.no_grad()
def test_moe_adapter_file_round_trip(make_model, tmp_path):
    """An adapter on experts and MLA projections saves with r1kit's expert keys and loads into a fresh model
    with the same logits; a file for another shape is an error naming the tensor."""
    model = make_model("tiny-moe")
    ids = _ids(model.config.vocab_size)
    inject_lora(model, LoRAConfig(r=3, alpha=6, dropout=0.5, target_modules=["experts", "q_b_proj"]))  # eval: off
    _nonzero_b(model)
    expected = model(ids)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.1.mlp.experts.lora_A.gate_up_proj"].shape == (8, 3, 64)
    fresh = make_model("tiny-moe")
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), expected, atol=1e-5, rtol=0)
    other = make_model("tiny-moe", moe_intermediate_size=48)
    with pytest.raises(LoRAError, match=r"layers\.1\.mlp\.experts: lora_A\.down_proj has shape \(8, 3, 32\)"):
        load_adapter(other, tmp_path)
    assert adapter_names(other) == []  # all or nothing


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_qlora_trains_adapters_through_quantized_base(make_model, method):
    """QLoRA: the base quantized (linears and experts), adapters fp32; only adapters get gradients, and the output
    equals the same adapter on the dequantized base (the reference paths)."""
    model = make_model("tiny-moe")
    counts = quantize_base(model, method)
    assert counts["linear"] > 0 and counts["experts"] > 0
    inject_lora(model, LoRAConfig(r=4))
    params = mark_only_lora_trainable(model)
    _nonzero_b(model)
    ids = _ids(model.config.vocab_size)
    model.train()
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n]
    model.eval()
    with torch.no_grad():
        fast = model(ids)
        _set_moe_reference(model, True)
        torch.testing.assert_close(model(ids), fast, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_kv_b_proj_adapter_in_absorbed_mla(make_model):
    """An adapter on MLA's kv_b_proj is seen by the absorbed decode path (it reads the matrix): KV-cache decode
    with absorb equals naive."""
    model = make_model("tiny-moe")
    inject_lora(model, LoRAConfig(r=4, target_modules=["kv_b_proj"]))
    _nonzero_b(model)
    ids = _ids(model.config.vocab_size, batch=1, length=8)
    outs = []
    for impl in ("naive", "absorb"):
        model.set_mla_impl(impl)
        cache = model.new_cache(1, 8)
        outs.append(torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                                   for t in range(4, 8)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_param_count_on_meta(make_model):
    """lora_param_count = r * (in + out) per adapted linear, r * (C + 2I) + r * (I + C) per expert."""
    model = make_model("tiny-dense")
    inject_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "down_proj"]))
    cfg = model.config
    q_out = model.layers[0].self_attn.q_proj.out_features
    expected = cfg.num_layers * 8 * ((cfg.hidden_size + q_out) + (cfg.intermediate_size + cfg.hidden_size))
    assert lora_param_count(model) == expected


# ---------------------------------------------------------------------------------------------------- serving


@torch.no_grad()
def test_engine_serves_the_adapter_like_the_merged_model(make_model, tmp_path):
    """The paged engine on a model with an adapter gives the merged model's greedy tokens, not the base's; through
    R1Model.from_pretrained(BASE, adapter=DIR) too, with set_adapter(None) back to the base."""
    from r1kit.api import R1Model
    from r1kit.checkpoint import save_model
    from r1kit.engine import LLMEngine

    def greedy(model, prompt):
        engine = LLMEngine(model, block_size=4)
        engine.add_request("r", prompt, SamplingParams(max_new_tokens=8, temperature=0))
        out = []
        while engine.has_unfinished():
            out += [o.token for o in engine.step() if o.token is not None]
        return out

    base_model = make_model("tiny-moe", num_mtp_layers=0)
    save_model(base_model, tmp_path / "base")
    prompt = _ids(base_model.config.vocab_size, batch=1, length=6)[0].tolist()
    base_tokens = greedy(base_model, prompt)
    inject_lora(base_model, LoRAConfig(r=4, alpha=32))
    _nonzero_b(base_model, std=0.3)
    save_adapter(base_model, tmp_path / "adapter")
    adapter_tokens = greedy(base_model, prompt)
    merge_lora(base_model, keep_original=False)
    merged_tokens = greedy(unload_lora(base_model), prompt)
    assert adapter_tokens == merged_tokens != base_tokens
    r1 = R1Model.from_pretrained(tmp_path / "base", device="cpu", dtype="fp32", adapter=tmp_path / "adapter")
    as_text = "".join  # no tokenizer: generate() shows each token id as <id>
    assert r1.generate(input_ids=prompt, max_new_tokens=8, temperature=0) == as_text(f"<{t}>" for t in adapter_tokens)
    r1.set_adapter(None)
    assert r1.generate(input_ids=prompt, max_new_tokens=8, temperature=0) == as_text(f"<{t}>" for t in base_tokens)
