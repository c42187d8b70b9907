"""The bundled model r1kit/nano: it loads offline by name and still solves held-out arithmetic."""

from __future__ import annotations

import json

import pytest

from r1kit import R1Model
from r1kit.api import BUNDLED_DIR
from r1kit.eval import eval_arithmetic
from r1kit.model.config import preset

NANO = BUNDLED_DIR / "nano"
pytestmark = pytest.mark.skipif(not (NANO / "config.json").is_file(), reason="r1kit/nano is not bundled")


@pytest.fixture(scope="module")
def nano() -> R1Model:
    return R1Model.from_pretrained("r1kit/nano", device="cpu")


def test_nano_is_the_documented_architecture(nano):
    want = preset("nano")
    cfg = nano.config
    assert (cfg.arch, cfg.attention, cfg.num_layers, cfg.hidden_size, cfg.n_routed_experts, cfg.num_mtp_layers) == (
        want.arch, want.attention, want.num_layers, want.hidden_size, want.n_routed_experts, want.num_mtp_layers)
    assert sum(f.stat().st_size for f in NANO.iterdir()) < 30 * 2**20  # ships inside the package
    card = json.loads((NANO / "training_summary.json").read_text())
    assert card["eval"]["arithmetic"]["add2"] >= 0.9  # what the model card claims ...


def test_nano_solves_held_out_two_digit_arithmetic(nano):
    # ... and what it still does now: greedy answers to problems it never saw in training
    res = eval_arithmetic(nano, ["add2", "sub2"], n=24, seed=99, progress=False)
    assert res["accuracy"]["add2"] >= 0.8 and res["accuracy"]["sub2"] >= 0.8, res["accuracy"]
    reply = nano.chat([{"role": "user", "content": "What is 47+38?"}], temperature=0, max_new_tokens=120)
    assert reply.content.strip() == "85" and "carry" in reply.reasoning
