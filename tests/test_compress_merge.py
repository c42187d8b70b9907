"""Expert merging (r1kit.compress.merge): the channel alignment recovers a known permutation, an expert that is a
channel-permuted copy of a kept one is merged into it and leaves that expert's function unchanged (the router
row averaged by importance), and prune-structured --expert-reduce merge writes a smaller checkpoint that loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from r1kit.checkpoint import load_model, save_model
from r1kit.compress import compress
from r1kit.compress.merge import align_channels, expert_outputs, merge_experts, permute_expert

NANO = Path(__file__).resolve().parents[1] / "r1kit" / "nano"


def _experts(e: int, c: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, c, generator=g) / c**0.5, torch.randn(e, c, i, generator=g) / i**0.5


def test_alignment_recovers_a_permutation():
    gu, dn = _experts(1, 16, 24, 0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    gu_b, dn_b = permute_expert(gu[0], dn[0], perm)  # the same expert, channels shuffled
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(expert_outputs(x, gu_b[None], dn_b[None]), expert_outputs(x, gu, dn), atol=1e-5)
    back = align_channels(gu[0], dn[0], gu_b, dn_b)
    assert torch.equal(perm[back], torch.arange(24))


def test_a_permuted_duplicate_merges_into_its_original():
    gu, dn = _experts(4, 16, 24, 3)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(4))
    gu[3], dn[3] = permute_expert(gu[1], dn[1], perm)  # expert 3 = expert 1 with its channels shuffled
    router = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    sd = {"m.experts.gate_up_proj": gu.clone(), "m.experts.down_proj": dn.clone(), "m.gate.weight": router.clone(),
          "m.gate.e_score_correction_bias": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    importance = torch.tensor([5.0, 3.0, 4.0, 1.0])  # expert 3 is the least important
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    members = merge_experts(sd, "m.", importance, 3, x)
    assert members == {0: [], 1: [3], 2: []}
    assert sd["m.experts.gate_up_proj"].shape == (3, 48, 16)
    y = expert_outputs(x, sd["m.experts.gate_up_proj"], sd["m.experts.down_proj"])
    ref = expert_outputs(x, gu, dn)
    assert torch.allclose(y, ref[[0, 1, 2]], atol=1e-5)  # merged expert 1 computes what expert 1 (= 3) did
    w = torch.tensor([3.0, 1.0]) / 4  # importance weights of the group {1, 3}
    assert torch.allclose(sd["m.gate.weight"][1], w[0] * router[1] + w[1] * router[3], atol=1e-6)
    assert torch.allclose(sd["m.gate.e_score_correction_bias"], torch.tensor([0.1, 0.75 * 0.2 + 0.25 * 0.4, 0.3]))


def test_structured_merge_writes_a_smaller_checkpoint(tmp_path, randomize_weights):
    from r1kit.model.config import preset
    from r1kit.model.transformer import Transformer

    model = randomize_weights(Transformer(preset("tiny-moe", vocab_size=4096)).init_weights(0), 0, 0.15).eval()
    src = tmp_path / "tiny"
    save_model(model, src, dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(NANO / name, src / name)
    n = model.config.n_routed_experts
    compress(src, tmp_path / "m", "prune-structured",
             {"experts": n - 2, "expert_reduce": "merge", "calibration_tokens": 512})
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    merged = record["compression"]["stats"]["merged_experts"]
    assert record["n_routed_experts"] == n - 2 and len(merged) == len(model.layers) - 1 + len(model.mtp)
    assert all(sum(len(v) for v in layer.values()) == 2 for layer in merged.values())
    with torch.no_grad():
        y = load_model(tmp_path / "m", "cpu", torch.float32)(torch.randint(0, 4096, (1, 8)))
    assert torch.isfinite(y).all()
