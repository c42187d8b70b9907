"""MoE balancing aids and the CEAP combiner: the sequence-wise aux loss against a hand computation, capacity
dropping against a reference loop, balancing that lowers MaxVio, CEAP's batched path against its per-token loop,
parameter counts, the checkpoint round trip, config errors, and a 128-expert preset training a step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r1kit.checkpoint import load_model, save_model
from r1kit.model.config import ConfigError, preset
from r1kit.model.moe import CrossExpertAttention, MoE, capacity_keep, expert_capacity, sequence_aux_loss
from r1kit.model.transformer import Transformer
from r1kit.train.config import TrainConfig, TrainConfigError
from r1kit.train.loop import balance_experts, build_model, moe_layers

CEAP = dict(moe_combiner="cross_expert_attention", moe_combiner_heads=4, moe_combiner_head_dim=8)


def _moe(seed: int = 0, **overrides) -> MoE:
    """The first MoE layer of a randomised tiny-moe model (fp32, training mode)."""
    from conftest import randomize

    model = randomize(Transformer(preset("tiny-moe", num_layers=2, num_mtp_layers=0, **overrides)), seed)
    return next(m for m in model.modules() if isinstance(m, MoE)).train()


# ---------------------------------------------------------------------------------------------------- aux loss


def test_sequence_aux_loss_matches_hand_computation():
    # sequence 1: rows normalise to (.6 .3 .1) and (.2 .2 .6); token 0 -> expert 0, token 1 -> expert 2
    #   f = E/(kT) * counts = 3/2 * (1, 0, 1); P = (.4, .25, .35); sum f P = 1.5 * .4 + 1.5 * .35 = 1.125
    # sequence 2: uniform scores, both tokens -> expert 1: f = (0, 3, 0), P = 1/3 each; sum f P = 1
    scores = torch.tensor([[0.9, 0.45, 0.15], [0.1, 0.1, 0.3], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]], requires_grad=True)
    idx = torch.tensor([[0], [2], [1], [1]])
    loss = sequence_aux_loss(scores, idx, n_seqs=2)
    assert loss.item() == pytest.approx((1.125 + 1.0) / 2)
    loss.backward()  # the gradient flows through P only (f counts tokens): d/ds of f_i * s_i / sum(s) / T / B
    s0 = scores.detach()[0]
    f0 = torch.tensor([1.5, 0.0, 1.5])
    want = (f0 / s0.sum() - (f0 * s0).sum() / s0.sum() ** 2) / 2 / 2
    torch.testing.assert_close(scores.grad[0], want)


def test_aux_loss_in_the_layer_and_its_weight():
    moe = _moe()
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    moe(x)
    assert moe.aux_loss is None  # alpha = 0: off
    moe.aux_loss_alpha = 0.01
    moe(x)
    scores = moe.gate.score(x.reshape(-1, 64))
    _, idx = moe.gate.route(scores)
    torch.testing.assert_close(moe.aux_loss, 0.01 * sequence_aux_loss(scores, idx, 3))
    moe.eval()
    moe.aux_loss = None
    moe(x)
    assert moe.aux_loss is None  # not computed outside training


# ---------------------------------------------------------------------------------------------------- capacity


def _capacity_reference(idx: torch.Tensor, capacity: int) -> torch.Tensor:
    taken: dict[int, int] = {}
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for n in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            keep[n, j] = taken.get(e, 0) < capacity
            taken[e] = taken.get(e, 0) + 1
    return keep


@pytest.mark.parametrize("capacity", [1, 3, 7, 100])
def test_capacity_keep_matches_reference(capacity):
    gen = torch.Generator().manual_seed(capacity)
    logits = torch.randn(40, 8, generator=gen) + torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, -1])  # skewed
    idx = logits.topk(2, -1).indices
    keep = capacity_keep(idx, 8, capacity)
    assert torch.equal(keep, _capacity_reference(idx, capacity))
    assert (capacity == 100) == bool(keep.all())


def test_expert_capacity():
    assert expert_capacity(64, 2, 8, 1.0) == 16 and expert_capacity(64, 2, 8, 1.25) == 20
    assert expert_capacity(3, 1, 8, 1.0) == 1


@torch.no_grad()
@pytest.mark.parametrize("combiner", [{}, CEAP], ids=["weighted_sum", "ceap"])
def test_capacity_dropping_in_the_layer_matches_reference(combiner):
    moe = _moe(**combiner)
    moe.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 0.8, 0, 0, 0, 0, 0, 0]))  # skew: drops happen
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    flat = x.reshape(-1, 64)
    weights, idx = moe.gate(flat)
    keep = capacity_keep(idx, 8, expert_capacity(24, 2, 8, 1.0))
    assert 0 < (~keep).sum() < keep.numel()
    if combiner:  # per token: the reference combiner over the kept experts' outputs
        outs = torch.stack([torch.stack([moe.experts.forward_reference(flat[n:n + 1], torch.ones(1, 1),
                                                                        idx[n:n + 1, j:j + 1])[0]
                                         for j in range(2)]) for n in range(24)])
        routed = moe.combiner.forward_reference(flat, outs, weights, keep)
    else:  # a dropped pair contributes zero: the weighted sum with its weight zeroed
        routed = moe.experts.forward_reference(flat, weights * keep, idx)
    want = routed.view_as(x) + moe.shared_experts(x)
    moe.capacity_factor = 1.0
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    assert int(moe.dropped) == int((~keep).sum())
    moe.reference = True
    torch.testing.assert_close(moe(x), want, atol=1e-5, rtol=1e-5)
    moe.reference = False
    moe.eval()  # inference never drops: the same output as without a capacity
    no_cap = moe.experts.forward_reference(flat, weights, idx) if not combiner else None
    if no_cap is not None:
        torch.testing.assert_close(moe(x), no_cap.view_as(x) + moe.shared_experts(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- balancing


def _skewed_router_moe() -> tuple[MoE, torch.Tensor]:
    """A MoE whose router sends nearly every token to experts 0 and 1, and inputs that share one direction."""
    moe = _moe()
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(64, generator=gen)
    direction /= direction.norm()
    x = torch.randn(4, 32, 64, generator=gen) + 2 * direction
    with torch.no_grad():
        moe.gate.weight[:2] = direction
        moe.gate.e_score_correction_bias.zero_()
    return moe, x


def test_bias_balancing_reduces_maxvio_of_a_skewed_router():
    moe, x = _skewed_router_moe()
    vio = []
    for _ in range(20):
        moe(x)
        vio += balance_experts([moe], [moe.load], rate=0.02)
    assert vio[0] > 2.0, vio  # skewed: experts 0 and 1 take most of the 256 pairs
    assert sum(vio[-5:]) / 5 < 0.3 * vio[0], vio


def test_aux_loss_reduces_maxvio_of_a_skewed_router():
    moe, x = _skewed_router_moe()
    moe.aux_loss_alpha = 1.0
    opt = torch.optim.SGD([moe.gate.weight], lr=10.0)
    vio = []
    for _ in range(20):
        moe(x)
        vio += balance_experts([moe], [moe.load], rate=0.0)
        opt.zero_grad()
        moe.aux_loss.backward()
        opt.step()
    assert vio[0] > 2.0, vio
    assert sum(vio[-5:]) / 5 < 0.5 * vio[0], vio  # a blunter tool than the bias: about 0.35x here


def test_training_loop_wires_the_balancing_options(tmp_path):
    cfg = TrainConfig.from_dict({"model": {"preset": "tiny-moe", "overrides": {"num_layers": 2}},
                                 "moe_aux_loss_alpha": 0.003, "moe_capacity_factor": 1.25, "max_steps": 1,
                                 "out_dir": str(tmp_path)})
    model = build_model(cfg, 512, 0, 1, torch.device("cpu"))
    assert [(m.aux_loss_alpha, m.capacity_factor) for m in moe_layers(model)] == [(0.003, 1.25)] * 2  # + MTP's
    assert TrainConfig().moe_capacity_factor is None and TrainConfig().moe_aux_loss_alpha == 0.0


def test_run_checkpointed_before_the_balancing_keys_existed_resumes():
    from pathlib import Path

    from r1kit.train.loop import TrainingError, _check_same_recipe

    now = TrainConfig().to_dict()
    old = {k: v for k, v in now.items() if k not in ("moe_aux_loss_alpha", "moe_capacity_factor")}
    _check_same_recipe(old, now, Path("run"))  # missing keys ran with their defaults: the same recipe
    with pytest.raises(TrainingError, match="moe_capacity_factor"):
        _check_same_recipe(old, {**now, "moe_capacity_factor": 1.5}, Path("run"))


def test_aux_loss_gradients_with_gradient_checkpointing(make_model):
    x = torch.randint(0, 512, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = make_model("tiny-moe", num_mtp_layers=0).train()
        model.gradient_checkpointing = ckpt
        for m in moe_layers(model):
            m.aux_loss_alpha, m.capacity_factor = 0.1, 1.0
        loss = model.loss(x, torch.roll(x, -1, 1))
        loss = loss + sum(m.aux_loss for m in moe_layers(model))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


# ---------------------------------------------------------------------------------------------------- CEAP


@torch.no_grad()
def test_ceap_batched_matches_reference():
    gen = torch.Generator().manual_seed(4)
    ceap = CrossExpertAttention(32, heads=4, head_dim=8)
    ceap.q_proj.copy_(torch.randn(ceap.q_proj.shape, generator=gen) * 0.5)
    ceap.k_proj.copy_(torch.randn(ceap.k_proj.shape, generator=gen) * 0.5)
    h, outs = torch.randn(9, 32, generator=gen), torch.randn(9, 3, 32, generator=gen)
    weights = torch.rand(9, 3, generator=gen) + 0.05
    keep = torch.rand(9, 3, generator=gen) > 0.3
    keep[0] = False  # a token with every pair dropped gets zero
    fast, ref = ceap(h, outs, weights), ceap.forward_reference(h, outs, weights)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    weighted = (weights[..., None] * outs).sum(1)
    assert (fast - weighted).abs().max() > 0.05  # it is not the weighted sum
    fast, ref = ceap(h, outs, weights, keep), ceap.forward_reference(h, outs, weights, keep)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert fast[0].abs().max() == 0 and torch.isfinite(fast).all()


@torch.no_grad()
def test_ceap_in_the_model_matches_reference_and_starts_as_the_weighted_sum(make_model):
    model = make_model("tiny-moe", **CEAP)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    fast = model(ids)
    for m in moe_layers(model):
        m.reference = True
    torch.testing.assert_close(model(ids), fast, atol=1e-4, rtol=0)
    # r1kit's initialisation (Wq = 0) makes CEAP the weighted sum: same logits as the plain model
    plain = Transformer(preset("tiny-moe")).init_weights(7).eval()
    ceap = Transformer(preset("tiny-moe", **CEAP)).init_weights(7).eval()
    ceap.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(ceap(ids), plain(ids), atol=1e-5, rtol=0)


def test_ceap_parameters_are_counted_and_trained():
    cfg = preset("tiny-moe", **CEAP)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params(include_mtp=True)
    n_moe = len(moe_layers(model))  # 2 decoder layers + 1 MTP block
    extra = cfg.num_params(include_mtp=True) - preset("tiny-moe").num_params(include_mtp=True)
    assert extra == n_moe * 2 * 4 * 8 * 64 > 0
    assert cfg.num_params(active=True) - preset("tiny-moe").num_params(active=True) == 2 * 2 * 4 * 8 * 64
    model = Transformer(preset("tiny-moe", num_mtp_layers=0, **CEAP)).init_weights(0).train()
    x = torch.randint(0, 512, (2, 8))
    model.loss(x, torch.roll(x, -1, 1)).backward()
    assert all(m.combiner.q_proj.grad.abs().sum() > 0 for m in moe_layers(model))


def test_ceap_checkpoint_round_trip(make_model, tmp_path):
    model = make_model("tiny-moe", **CEAP)
    save_model(model, tmp_path / "ceap")
    hf = json.loads((tmp_path / "ceap" / "config.json").read_text())
    assert (hf["moe_combiner"], hf["moe_combiner_heads"], hf["moe_combiner_head_dim"]) == \
        ("cross_expert_attention", 4, 8)
    loaded = load_model(tmp_path / "ceap")
    assert loaded.config.moe_combiner == "cross_expert_attention"
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    save_model(make_model("tiny-moe"), tmp_path / "plain")  # a weighted-sum MoE's config.json stays DeepSeek's
    assert "moe_combiner" not in json.loads((tmp_path / "plain" / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, field", [
    (dict(moe_combiner="attention"), "moe_combiner"),
    (dict(moe_combiner="cross_expert_attention", moe_combiner_heads=3), "moe_combiner_heads"),
    (dict(moe_combiner="cross_expert_attention", moe_combiner_head_dim=0), "moe_combiner_head_dim"),
])
def test_model_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        preset("tiny-moe", **overrides)


@pytest.mark.parametrize("d, field", [
    ({"moe_capacity_factor": 0}, "moe_capacity_factor"),
    ({"moe_capacity_factor": "big"}, "moe_capacity_factor"),
    ({"moe_aux_loss_alpha": -0.1}, "moe_aux_loss_alpha"),
    ({"model": {"preset": "tiny-moe", "overrides": {"moe_combiner": "sum"}}}, "moe_combiner"),
])
def test_train_config_errors_name_the_field(d, field):
    with pytest.raises(TrainConfigError, match=field):
        TrainConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------- 128 experts


def test_128_expert_preset_trains_a_step_with_grouped_dispatch():
    """r1-70b's routing (128 routed experts + 1 shared, top-8 from 4 of 8 groups) at a tiny width."""
    cfg = preset("r1-70b", vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=16,
                 intermediate_size=64, num_mtp_layers=0)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group) == (128, 8, 8)
    model = Transformer(cfg).init_weights(0).train()
    x = torch.randint(0, 256, (2, 32))
    loss = model.loss(x, torch.roll(x, -1, 1))
    loss.backward()
    assert math.isfinite(loss.item())
    (moe,) = moe_layers(model)
    assert int(moe.load.sum()) == 64 * 8 and moe.experts.gate_up_proj.grad.abs().sum() > 0
    with torch.no_grad():
        fast = model(x)
        moe.reference = True
        torch.testing.assert_close(model(x), fast, atol=1e-4, rtol=0)
