"""Continual learning (r1kit.train.continual) against hand computations: the diagonal Fisher of a tiny model
(empirical exactly, sampled-label in expectation), the EWC penalty and its online accumulation, reservoir sampling's
uniformity (chi-square), frozen weights bit for bit after AdamW steps and scaled updates, the files' header checks,
and one continual run through the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from r1kit.train.config import TrainConfig, TrainConfigError
from r1kit.train.continual.freezing import UpdateScaler, importance_scales, importance_units
from r1kit.train.continual.importance import (
    ContinualError,
    Importance,
    ewc_penalty,
    fisher_diagonal,
    lm_log_likelihood,
    load_importance,
    save_importance,
)
from r1kit.train.continual.replay import ReplayBuffer, ReplayData, load_replay, save_replay

ROOT = Path(__file__).resolve().parents[1]


def classifier_ll(model, row, labels, gen):
    logp = torch.log_softmax(model(row[0]), dim=-1)
    y = torch.multinomial(logp.exp().detach(), 1, generator=gen)[:, 0] if labels == "sampled" else row[1]
    return logp.gather(1, y[:, None]).sum()


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 3, 1, 1, 2])
    return model, x, y


def test_fisher_of_a_linear_softmax_by_hand(tiny_classifier):
    """d log softmax(Wx + b)_y / dW = (onehot(y) - p) x^T, / db = onehot(y) - p; the Fisher is the mean square.
    Sampled labels: in expectation sum_k p_k (e_k - p)^2 (x^2), checked over many draws."""
    model, x, y = tiny_classifier
    with torch.no_grad():
        p = torch.softmax(model(x), -1)  # (N, K)
    e = torch.nn.functional.one_hot(y, 4).float()
    want_w = (((e - p)[:, :, None] * x[:, None, :]) ** 2).mean(0)  # (K, 3)
    want_b = ((e - p) ** 2).mean(0)
    got = fisher_diagonal(model, [(x[i:i + 1], y[i:i + 1]) for i in range(5)], classifier_ll)
    torch.testing.assert_close(got["weight"], want_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["bias"], want_b, rtol=1e-5, atol=1e-7)
    rows = [(x[i:i + 1], y[i:i + 1]) for i in range(5)]
    gen = torch.Generator().manual_seed(1)  # the labels fisher_diagonal draws, drawn again in the same order
    drawn = torch.cat([torch.multinomial(p[i:i + 1], 1, generator=gen)[:, 0] for i in range(5)])
    e = torch.nn.functional.one_hot(drawn, 4).float()
    sampled = fisher_diagonal(model, rows, classifier_ll, labels="sampled", seed=1)
    torch.testing.assert_close(sampled["bias"], ((e - p) ** 2).mean(0), rtol=1e-5, atol=1e-7)
    eye = torch.eye(4)  # in expectation: the true Fisher sum_k p_k (e_k - p)^2
    true_b = torch.stack([(p[i][:, None] * (eye - p[i]) ** 2).sum(0) for i in range(5)]).mean(0)
    many = fisher_diagonal(model, rows * 100, classifier_ll, labels="sampled", seed=2)
    torch.testing.assert_close(many["bias"], true_b, rtol=0.2, atol=5e-3)
    assert model.weight.grad is None  # gradients left as they were
    with pytest.raises(ContinualError, match="fisher"):
        fisher_diagonal(model, rows[:1], classifier_ll, labels="observed")


def test_lm_fisher_matches_the_loops_masked_loss(make_model):
    """On a tiny MLA + MoE model: each row's gradient of the loop's masked cross-entropy, squared, averaged."""
    from r1kit.train.loop import masked_ce

    model = make_model("tiny-moe", num_layers=2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (1, 9), generator=g)
        mask = (torch.arange(8) >= 3).float()[None]
        rows.append((x[:, :-1], x[:, 1:], mask))
    got = fisher_diagonal(model, rows, lm_log_likelihood)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y, m in rows:
        model.zero_grad()
        masked_ce(model(x), y, m).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                want[n] += p.grad ** 2 / len(rows)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-12)


def test_ewc_penalty_and_online_accumulation_by_hand():
    """penalty = lambda/2 * sum F (theta - theta*)^2; online EWC: F <- decay F_old + F_new, anchor moves."""
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    fisher = {"weight": torch.tensor([[0.5, 2.0]]), "bias": torch.tensor([4.0])}
    imp = Importance.start(model, fisher, "a")
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))
        model.bias.fill_(1.5)
    pen = ewc_penalty(model, imp, 3.0)
    assert float(pen.detach()) == pytest.approx(1.5 * (0.5 * 1 + 2.0 * 4 + 4.0 * 1))  # 3/2 * 12.5 = 18.75
    pen.backward()
    torch.testing.assert_close(model.weight.grad, torch.tensor([[3 * 0.5 * 1.0, 3 * 2.0 * -2.0]]))
    new = {"weight": torch.tensor([[1.0, 1.0]]), "bias": torch.tensor([0.0])}
    acc = imp.add_task(model, new, 0.5, "b")
    torch.testing.assert_close(acc.fisher["weight"], torch.tensor([[1.25, 2.0]]))
    torch.testing.assert_close(acc.fisher["bias"], torch.tensor([2.0]))
    torch.testing.assert_close(acc.anchor["weight"], torch.tensor([[2.0, 0.0]]))
    assert acc.tasks == ["a", "b"] and float(ewc_penalty(model, acc, 3.0).detach()) == 0.0


def test_importance_file_round_trip_and_refusals(tmp_path, make_model):
    """The header names the model: another model's file is refused naming the difference; damage names the file."""
    model = make_model("tiny-moe", num_layers=2)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    file = save_importance(Importance.start(model, fisher, "t0"), tmp_path / "importance.safetensors")
    back = load_importance(file, model)
    assert back.tasks == ["t0"] and torch.equal(back.fisher["embed_tokens.weight"], fisher["embed_tokens.weight"])
    other = make_model("tiny-moe", num_layers=2, hidden_size=32)
    with pytest.raises(ContinualError, match=r"importance.safetensors: made for another model \(.*hidden_size"):
        load_importance(file, other)
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(ContinualError, match="importance.safetensors: damaged"):
        load_importance(file, model)


def test_reservoir_is_uniform_chi_square():
    """Each of N offered rows ends in a size-k reservoir with probability k/N: chi-square over 200 trials."""
    from scipy.stats import chisquare

    n, k, trials = 100, 10, 200
    counts = torch.zeros(n)
    for t in range(trials):
        buf = ReplayBuffer(k, 1 << 20, seed=t)
        buf.begin_task("a")
        for i in range(n):
            buf.offer((torch.tensor([i]),))
        assert len(buf.rows["a"]) == k and buf.seen["a"] == n
        for row in buf.rows["a"]:
            counts[int(row[0])] += 1
    assert chisquare(counts.numpy()).pvalue > 1e-3
    assert counts.sum() == k * trials


def test_replay_is_task_balanced_bounded_and_saved(tmp_path):
    """Quota = capacity / tasks (bytes bound included); a batch replays round(ratio * rows) rows from the earlier
    tasks only, evenly; the file round-trips and a file for another tokenizer, or a damaged one, is refused."""
    buf = ReplayBuffer(max_examples=1000, max_bytes=40 * 12, seed=0)  # a row: 3 int32 (12 bytes) -> 40 rows
    for task in ("a", "b"):
        buf.begin_task(task)
        for i in range(100):
            buf.offer((torch.tensor([i, i, i]),))
    assert {t: len(r) for t, r in buf.rows.items()} == {"a": 20, "b": 20} and buf.nbytes <= 40 * 12

    class Source:
        def next_batch(self):
            return torch.full((8, 4), 7), torch.full((8, 4), 7), torch.ones(8, 4)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    buf = ReplayBuffer(64, 1 << 20, seed=0)
    for task in ("a", "b"):
        buf.begin_task(task)
        for _ in range(40):
            buf.offer((torch.full((4,), ord(task)), torch.full((4,), ord(task)), torch.zeros(4)))
    buf.begin_task("c")
    x, _, mask = ReplayData(Source(), buf, 0.5).next_batch()
    assert (x[:4] == 7).all() and sorted(x[4:, 0].tolist()) == [97, 97, 98, 98] and (mask[4:] == 0).all()
    assert len(buf.rows["c"]) == 4  # the fresh rows trained on were offered
    file = save_replay(buf, tmp_path / "replay.safetensors", {"tokenizer": "abc"})
    back = load_replay(file, 64, 1 << 20, identity={"tokenizer": "abc"})
    assert {t: len(r) for t, r in back.rows.items()} == {t: len(r) for t, r in buf.rows.items()}
    with pytest.raises(ContinualError, match=r"replay.safetensors: made for another tokenizer"):
        load_replay(file, 64, 1 << 20, identity={"tokenizer": "xyz"})
    file.write_bytes(b"\x00" * 50)
    with pytest.raises(ContinualError, match="replay.safetensors: damaged"):
        load_replay(file, 64, 1 << 20)


@pytest.mark.parametrize("granularity", ["expert", "head", "layer", "weight"])
def test_frozen_weights_bit_identical_after_adamw_steps(make_model, granularity):
    """Frozen units stay bit for bit through AdamW with weight decay; the rest moves; a scale s gives s times the
    unscaled update."""
    model = make_model("tiny-moe", num_layers=2).train()
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    units = importance_units(model, fisher, granularity) if granularity != "weight" else []
    assert all(a.score >= b.score for a, b in zip(units, units[1:], strict=False))
    scaler = UpdateScaler.by_importance(model, fisher, granularity, 0.5)
    assert 0 < scaler.frozen_fraction < 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(3):
        model(x).float().pow(2).mean().backward()
        scaler.before_step(model)
        opt.step()
        opt.zero_grad()
        scaler.after_step(model)
    params = dict(model.named_parameters())
    for n, s in scaler.scales.items():
        assert torch.equal(params[n][s == 0], before[n][s == 0]), n
    free = torch.cat([(params[n] != before[n])[scaler.scales[n] != 0] if n in scaler.scales
                      else (params[n] != before[n]).flatten() for n in params])
    assert free.float().mean() > 0.5  # the weights left free did train


def test_lr_scale_scales_the_update(make_model):
    model = make_model("tiny-moe", num_layers=2).train()
    plain = make_model("tiny-moe", num_layers=2).train()
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    scales = importance_scales(model, fisher, "expert", 0.5, lr_scale=0.25)
    scaler = UpdateScaler(model, scales)
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, sc in ((model, scaler), (plain, None)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(x).float().pow(2).mean().backward()
        if sc:
            sc.before_step(m)
        opt.step()
        if sc:
            sc.after_step(m)
    for n, s in scales.items():
        want = start[n] + s * (dict(plain.named_parameters())[n].detach() - start[n])
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), want)


def test_config_refuses_bad_ratios_and_keys():
    for key, value in (("replay_ratio", 1.5), ("freeze_fraction", -0.1), ("ewc_decay", 2.0)):
        with pytest.raises(TrainConfigError, match=f"continual.{key} = {value}: must be in \\[0, 1\\]"):
            TrainConfig.from_dict({"continual": {key: value}})
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['ewc_lamda'\]"):
        TrainConfig.from_dict({"continual": {"ewc_lamda": 1.0}})
    with pytest.raises(TrainConfigError, match="continual.freeze = 'neuron'"):
        TrainConfig.from_dict({"continual": {"freeze": "neuron"}})


@pytest.fixture(scope="module")
def no_plots():
    """The loop's PNGs are not what these runs check, and drawing them is most of a tiny run's time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("r1kit.train.loop.plot_metrics", lambda *a, **k: None)
        mp.setattr("r1kit.train.loop.plot_expert_load", lambda *a, **k: [])
        yield


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, no_plots):
    """A tiny plain run (MLA + MoE, 2 layers) on chat data: the previous task."""
    from r1kit.api import random_checkpoint
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.loop import train

    tmp = tmp_path_factory.mktemp("continual")
    base = random_checkpoint(tmp / "base", "tiny-moe", seed=0, tokenizer=Tokenizer.from_dir(ROOT / "r1kit" / "nano"),
                             num_layers=2, max_position_embeddings=128)
    data = tmp / "a.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n"
                            for a in range(6) for b in range(4)))
    recipe = {"model": {"preset": "tiny-moe", "overrides": {"num_layers": 2, "max_position_embeddings": 128}},
              "init_from": str(base), "data": {"chat_jsonl": str(data), "validation_fraction": 0.2},
              "seq_len": 32, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "eval_interval": 2,
              "eval_batches": 1, "checkpoint_interval": 2, "log_interval": 1, "precision": "fp32", "threads": 1}
    train(TrainConfig.from_dict({**recipe, "out_dir": str(tmp / "a")}), progress=False)
    return tmp, recipe, base


def test_continual_run_through_the_loop(first_run, no_plots):
    """EWC + freezing + replay continuing from a run: terms logged, frozen weights kept, files written, and the
    next stage reads them; a run from another model is refused naming the difference."""
    from r1kit.api import random_checkpoint
    from r1kit.checkpoint import load_model
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.loop import train

    tmp, recipe, _ = first_run
    cont = {"from_run": str(tmp / "a"), "ewc_lambda": 10.0, "freeze": "expert", "freeze_fraction": 0.5,
            "replay_ratio": 0.5, "replay_examples": 16, "fisher_rows": 2}
    out = tmp / "b"
    summary = train(TrainConfig.from_dict({**recipe, "init_from": None, "out_dir": str(out), "continual": cont}),
                    progress=False)
    files = summary["continual"]
    assert files["tasks"] == ["a", "b"] and Path(files["importance"]).is_file() and Path(files["replay"]).is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["ewc_loss"] >= 0 and 0 < step["frozen_fraction"] < 1
    assert load_importance(files["importance"]).tasks == ["a", "b"]
    before = dict(load_model(tmp / "a" / "final").named_parameters())
    after = dict(load_model(out / "final").named_parameters())
    kept = [torch.equal(p[e], after[n][e]) for n, p in before.items() if n.endswith("gate_up_proj")
            for e in range(p.shape[0])]
    assert any(kept) and not all(kept)  # the frozen experts bit for bit, the others trained
    c = train(TrainConfig.from_dict({**recipe, "init_from": None, "out_dir": str(tmp / "c"),
                                     "continual": {**cont, "from_run": str(out)}}), progress=False)
    assert c["continual"]["tasks"] == ["a", "b", "c"]  # online EWC read b's importance
    assert set(load_replay(c["continual"]["replay"], 16, 1 << 20).rows) == {"a", "b", "c"}
    other = random_checkpoint(tmp / "other", "tiny-moe", seed=1, tokenizer=Tokenizer.from_dir(ROOT / "r1kit" / "nano"),
                              num_layers=2, max_position_embeddings=128, qk_rope_head_dim=16)
    bad = {**recipe, "model": {"preset": "tiny-moe", "overrides": {"num_layers": 2, "max_position_embeddings": 128,
                                                                   "qk_rope_head_dim": 16}}, "init_from": str(other)}
    with pytest.raises(ContinualError, match=r"the model differs from the previous run's \(qk_rope_head_dim 8 vs 16"):
        train(TrainConfig.from_dict({**bad, "out_dir": str(tmp / "d"), "continual": cont}), progress=False)
