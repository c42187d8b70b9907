"""QAT: the fake-quantized forward equals r1kit's real int8/int4 modules; the gradient passes straight through;
the module plan is quantize_model's; `r1kit compress --method qat-int8` fine-tunes and converts in one call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r1kit.quant import Int4Linear, Int8Linear, QuantizedExperts, quantize_model, set_reference
from r1kit.quant.qat import FakeQuantize, convert_qat, prepare_qat, qat_plan

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"


@pytest.mark.parametrize("method, cls, opts", [("int8", Int8Linear, {}), ("int4", Int4Linear, {"group_size": 32})])
def test_fake_quant_linear_equals_the_real_module(method, cls, opts):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    fake = nn.Linear(64, 48)
    fake.load_state_dict(lin.state_dict())
    fq = FakeQuantize(method, opts.get("group_size", 64))
    torch.nn.utils.parametrize.register_parametrization(fake, "weight", fq)
    real = cls.from_linear(lin, **opts)
    x = torch.randn(5, 64)
    real.reference = True
    assert torch.equal(fake(x), real(x))  # the same weights, bit for bit, through the same F.linear
    real.reference = False
    xb = x.bfloat16()
    with torch.autocast("cpu", torch.bfloat16):  # as in a bf16 fine-tune
        torch.testing.assert_close(fake(xb), real(xb), rtol=2e-2, atol=2e-2)  # the fast kernel (bf16 rounding)


def test_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(4, 32)
    fq = FakeQuantize("int4", 32)
    F.linear(x, fq(w)).square().sum().backward()
    wq = fq.round_trip(w.detach()).requires_grad_(True)  # reference: the gradient at the quantized weight
    F.linear(x, wq).square().sum().backward()
    assert torch.equal(w.grad, wq.grad)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prepared_model_equals_converted_model(make_model, method):
    model = make_model("tiny-moe", num_mtp_layers=1)
    plan = prepare_qat(model, method, group_size=32)
    shadow = make_model("tiny-moe", num_mtp_layers=1)
    assert set(plan) == set(quantize_model(shadow, method, group_size=32)["modules"])  # one rule for both
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = model(ids)
        stats = convert_qat(model)
        set_reference(model)
        real = model(ids)
    assert stats["swapped"] == len(plan)
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())
    torch.testing.assert_close(fake, real, rtol=1e-5, atol=1e-5)  # the experts' dispatch order differs


def test_plan_skips_what_quantize_model_skips(make_model):
    model = make_model("tiny-moe")
    plan = qat_plan(model, "int8")
    assert not any(n.endswith("kv_b_proj") for n in plan) and "lm_head" in plan


def test_compress_qat_int8_finetunes_and_converts(tmp_path, randomize_weights):
    """One fine-tune step through r1kit.train.loop (a tiny recipe), then the real int8 checkpoint."""
    from r1kit.checkpoint import load_model, save_model
    from r1kit.compress import compress
    from r1kit.model.config import preset
    from r1kit.model.transformer import Transformer

    src = tmp_path / "src"
    save_model(randomize_weights(Transformer(preset("tiny-moe", vocab_size=4096)).init_weights(0), 0, 0.15), src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(NANO / name, src / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny-moe}\ndata: {mixture: {arithmetic: 1.0}, arithmetic_examples: 64}\n"
                      "eval_batches: 1\n")
    record = compress(src, tmp_path / "out", "qat-int8",
                      {"max_steps": 2, "batch_size": 2, "seq_len": 32, "data": str(recipe),
                       "work_dir": str(tmp_path / "run")})
    assert record["stats"]["finetune"]["steps"] == 2
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["quantization_config"]["method"] == "int8" and hf["compression"]["method"] == "qat-int8"
    model = load_model(tmp_path / "out")
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    before = load_model(src)
    assert not torch.equal(model.lm_head.dequantize(), Int8Linear.from_linear(before.lm_head).dequantize())  # trained
