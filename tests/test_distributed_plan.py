"""r1kit plan (r1kit.train.plan): its arithmetic against hand computations and ZeRO's published configuration."""

from __future__ import annotations

import pytest

from r1kit.model.config import preset
from r1kit.train.plan import GB, Counts, PlanError, activation_bytes, plan


def test_zero_paper_7_5b_on_64_gpus():
    """Rajbhandari et al. 2020 (ZeRO), figure 1: a 7.5B model with Adam in mixed precision on 64 GPUs holds
    16 bytes per parameter: 120 GB per GPU replicated (DDP), 1.9 GB fully sharded (ZeRO-3 = FSDP)."""
    c = Counts(params=int(7.5e9), expert_params=0, hidden=4096, layers=32, moe_layers=0, vocab=32000)
    ddp, fsdp = plan(c, gpus=64)
    assert ddp.states_gb == pytest.approx(120.0)
    assert fsdp.states_gb == pytest.approx(1.875)


def test_communication_by_hand():
    c = Counts(params=1000, expert_params=800, hidden=8, layers=2, moe_layers=1, vocab=10, top_k=2, experts=4)
    ddp, fsdp, ep = plan(c, gpus=4, seq_len=16, micro_batch=1, ep=4)
    assert ddp.all_reduce_gb * GB == pytest.approx(2 * 3 / 4 * 1000 * 4)  # ring all-reduce of fp32 gradients
    assert fsdp.all_gather_gb * GB == pytest.approx(2 * 3 / 4 * 1000 * 2)  # bf16 parameters, forward + backward
    assert fsdp.reduce_scatter_gb * GB == pytest.approx(3 / 4 * 1000 * 4)
    assert ep.strategy == "fsdp+ep4" and ep.states_gb == pytest.approx(fsdp.states_gb)
    assert ep.all_gather_gb * GB == pytest.approx(2 * 3 / 4 * 200 * 2)  # experts are not gathered: 1 replica each
    assert ep.all_to_all_gb * GB == pytest.approx(4 * 1 * (16 * 2 * 8 * 2) * 3 / 4)  # 4 exchanges of k copies
    assert ddp.params_gb * GB == 4000 and ddp.optimizer_gb * GB == 8000 and fsdp.grads_gb * GB == 1000


def test_activations_by_hand():
    c = Counts(params=1, expert_params=0, hidden=8, layers=3, moe_layers=0, vocab=10)
    sbh = 16 * 2 * 8
    assert activation_bytes(c, 16, 2, checkpointing=False) == 3 * 34 * sbh + 16 * 2 * 10 * 6
    assert activation_bytes(c, 16, 2, checkpointing=True) == 3 * 2 * sbh + 34 * sbh + 16 * 2 * 10 * 6


def test_preset_counts_split_experts():
    cfg = preset("r1-175b")
    c = Counts.of(cfg)
    assert c.params == cfg.num_params(include_mtp=True)
    moe_blocks = cfg.num_layers - cfg.first_k_dense_replace + cfg.num_mtp_layers
    assert c.expert_params == moe_blocks * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert [p.strategy for p in plan(c, 64)] == ["ddp", "fsdp", "fsdp+ep64"]
    assert len(plan(Counts.of(preset("tiny-dense")), 2)) == 2  # no experts: no expert-parallel plan


def test_bad_expert_parallel_degree_names_it():
    c = Counts.of(preset("tiny-moe"))  # 8 experts
    with pytest.raises(PlanError, match="ep = 3"):
        plan(c, gpus=6, ep=3)
