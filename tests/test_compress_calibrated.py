"""Calibrated int4 (r1kit.compress.calibrated): GPTQ against a literal optimal-brain-surgeon loop (an explicit
inverse of the remaining columns' Hessian at every step), GPTQ with an identity Hessian equal to plain rounding,
AWQ's scale search lowering the calibration error of a layer with outlier input channels (recomputed here by
hand), AWQ's folding leaving the unquantized model's logits (and MTP logits) unchanged, and both methods through
`compress` into checkpoints that load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1kit.checkpoint import load_model
from r1kit.compress import CompressError, compress
from r1kit.compress.calibrated import (
    _calibration_pass,
    _Collector,
    apply_awq,
    awq_search,
    gptq,
    int4_error,
    scale_groups,
)
from r1kit.quant.formats import dequantize_int4, int4_codes, int4_params, pack_int4, quantize_int4
from r1kit.quant.qat import qat_plan

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"


def _correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    return torch.randn(t, k, generator=g, dtype=torch.float64) @ mix  # (T, K) with correlated inputs


def _naive_obs(w: torch.Tensor, h: torch.Tensor, group: int, damp: float = 0.01) -> tuple[torch.Tensor, ...]:
    """The OBS update written out: quantize column i, then W[:, F] -= (w_i - q_i) / [H_F^-1]_00 [H_F^-1]_0,:
    with H_F^-1 the inverse of the remaining columns' (damped) Hessian, inverted afresh at every step."""
    W = w.double().clone()
    H = h.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    codes, scales, zeros = torch.zeros(W.shape), [], []
    for i in range(W.shape[1]):
        if i % group == 0:
            s, z = int4_params(W[:, i:i + group].float())
            scales.append(s)
            zeros.append(z)
        hinv = torch.linalg.inv(H[i:, i:])  # (K - i, K - i)
        q = int4_codes(W[:, i], s.double(), z.double())
        wq = (q - 8) * s.double() + z.double()
        W[:, i:] -= ((W[:, i] - wq) / hinv[0, 0])[:, None] * hinv[0][None]
        codes[:, i] = q.float()
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def test_gptq_equals_the_literal_obs_update():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = _correlated_inputs(200, 64, 1)
    h = x.T @ x
    codes, scale, zero = gptq(w, h, 32)
    ref_codes, ref_scale, ref_zero = _naive_obs(w, h, 32)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert int4_error(w, codes, scale, zero, h) < 0.8 * int4_error(w, *_rtn_parts(w, 32), h)


def _rtn_parts(w: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    from r1kit.quant.formats import unpack_int4

    packed, scale, zero = quantize_int4(w, group)
    return unpack_int4(packed).float(), scale, zero


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    codes, scale, zero = gptq(w, torch.eye(128), 64)
    packed, ref_scale, ref_zero = quantize_int4(w, 64)
    assert torch.equal(pack_int4(codes), packed) and torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


def test_awq_search_lowers_the_calibration_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 20  # a few salient input channels, as in LLM activations
    w1, w2 = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    s, info = awq_search(x, [(w1, 32), (w2, 32)])

    def error(scale: torch.Tensor) -> float:  # recomputed here: sum ||x W^T - x (RTN(W s) / s)^T||^2
        total = 0.0
        for w in (w1, w2):
            q = dequantize_int4(*quantize_int4(w * scale, 32)) / scale
            total += float(((x @ w.T) - (x @ q.T)).pow(2).sum())
        return total

    assert info["alpha"] > 0 and info["error_awq"] < 0.9 * info["error_rtn"]
    assert info["error_rtn"] == pytest.approx(error(torch.ones(64)), rel=1e-5)
    assert info["error_awq"] == pytest.approx(error(s), rel=1e-5)


def test_awq_folding_keeps_the_unquantized_model(make_model):
    model = make_model("tiny-moe", seed=0, vocab_size=512).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, hidden = model(ids, return_hidden=True)
        ref_mtp = model.mtp_logits(hidden, ids)
    groups, col = scale_groups(model), _Collector(max_rows=256)
    for grp in groups:
        col.add_rows(grp)
    _calibration_pass(model, ids)
    col.remove()
    done = apply_awq(model, groups, qat_plan(model, "int4", 32))
    assert len(done) == len(groups) and any(v["alpha"] > 0 for v in done.values())
    with torch.no_grad():
        got, hidden = model(ids, return_hidden=True)
        got_mtp = model.mtp_logits(hidden, ids)
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 1e-4
    assert all((a - b).abs().max() / scale < 1e-4 for a, b in zip(got_mtp, ref_mtp, strict=True))


@pytest.mark.parametrize("calibration", ["gptq", "awq"])
def test_calibrated_int4_checkpoint_loads(tiny_src, tmp_path, calibration):
    out = tmp_path / calibration
    record = compress(tiny_src, out, "int4", {"calibration": calibration, "calibration_tokens": 1024,
                                              "group_size": 32})
    assert json.loads((out / "config.json").read_text())["compression"]["options"]["calibration"] == calibration
    if calibration == "gptq":
        assert record["stats"]["gptq_modules"] > 0 and record["stats"]["rtn_modules"] > 0  # MTP: rounded
    else:
        assert record["stats"]["error_awq"] < record["stats"]["error_rtn"]
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = load_model(out, "cpu", torch.float32)(ids)
    assert torch.isfinite(y).all()


def test_calibration_options_are_checked(tiny_src, tmp_path):
    with pytest.raises(CompressError, match="calibration must be one of gptq, awq"):
        compress(tiny_src, tmp_path / "x", "int4", {"calibration": "smoothquant"})
    with pytest.raises(CompressError, match="calibration_tokens"):
        compress(tiny_src, tmp_path / "y", "int4", {"calibration": "gptq", "calibration_tokens": 10})
