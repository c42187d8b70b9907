"""The bundled model r1kit/nano: it loads offline by name, still solves held-out arithmetic, and its card's
perplexity is r1kit.eval's one definition."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from r1kit import R1Model
from r1kit.api import BUNDLED_DIR
from r1kit.eval import PERPLEXITY_TOKENS, PERPLEXITY_WINDOW, eval_arithmetic, eval_perplexity, perplexity_windows
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


@torch.no_grad()
def test_perplexity_of_a_short_text_is_its_full_sequence_cross_entropy(nano):
    text = "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n"
    tok = nano._tok()
    ids = tok.encode(text) + [tok.eos_id]  # as training reads text: no BOS, EOS after each text
    x = torch.tensor([ids])
    nll = F.cross_entropy(nano.model(x[:, :-1])[0].float(), x[0, 1:])  # by hand: one forward, no windows
    got = eval_perplexity(nano, [text])
    assert got["tokens"] == len(ids) - 1 < PERPLEXITY_WINDOW
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_the_card_perplexity_follows_the_one_definition():
    card = json.loads((NANO / "training_summary.json").read_text())["eval"]
    assert card["perplexity_window"] == PERPLEXITY_WINDOW
    spans = perplexity_windows(card["perplexity_of_tokens"] + 1, PERPLEXITY_WINDOW, PERPLEXITY_WINDOW,
                               PERPLEXITY_TOKENS)
    assert (len(spans), sum(scored for *_, scored in spans)) == (card["perplexity_windows"], card["perplexity_tokens"])
    assert f"code: {card['stdlib_perplexity']} " in (NANO / "README.md").read_text()
