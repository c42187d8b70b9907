"""GRPO (r1kit.train.grpo, rollout, rl_config): advantages, the clipped objective, k3 KL, the importance ratio
and the loss types against hand computations and a naive per-token loop; rollouts through the engine; a tiny
run killed and resumed continues the same curve."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from r1kit.train.config import TrainConfig, TrainConfigError
from r1kit.train.grpo import group_advantages, grpo_loss, micro_batches, train_grpo
from r1kit.train.rewards import Prompt
from r1kit.train.rl_config import GRPOConfig
from r1kit.train.rollout import Rollout, completion_logprobs, pad_batch


def cfg_(**kw) -> GRPOConfig:
    base = {"num_generations": 2, "generation_batch_size": 4, "init_from": "unused", "beta": 0.0}
    return GRPOConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(rewards, 4, "group").tolist() == pytest.approx(want, rel=1e-6)
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # groups of 2: (1, 0) and (0, 1) ...
    assert group_advantages(rewards[:4], 2, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # a group of equal rewards whose float mean is not exact (8 * 1.2) still gets exactly 0
    assert group_advantages(torch.full((8,), 1.0) + 0.2, 8).tolist() == [0.0] * 8


# ---------------------------------------------------------------------------------------------------- the loss


def naive_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """The objective token by token in plain Python floats."""
    per_seq, total, count = [], 0.0, 0
    for i in range(len(adv)):
        terms = []
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logps[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            term = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        per_seq.append(sum(terms) / max(len(terms), 1))
        total, count = total + sum(terms), count + len(terms)
    if loss_type == "grpo":
        return sum(per_seq) / len(adv)
    if loss_type == "dapo":
        return total / count
    return total / (len(adv) * max_len)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps_high", [(0.0, None), (0.04, 0.28)])
def test_loss_matches_naive_token_loop(loss_type, beta, eps_high):
    torch.manual_seed(0)
    logps = -torch.rand(3, 5) * 2
    old = logps + torch.randn(3, 5) * 0.4  # ratios well outside [0.8, 1.28] for some tokens
    ref = logps + torch.randn(3, 5) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.4])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    cfg = cfg_(beta=beta, epsilon=0.2, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=6)
    loss, stats = grpo_loss(logps, old, ref, adv, mask, cfg, num_sequences=3, num_tokens=int(mask.sum()))
    want = naive_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2,
                      eps_high or 0.2, beta, loss_type, 6)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    ratio = (logps - old).exp()
    hi = eps_high or 0.2
    clipped = sum(1 for i in range(3) for t in range(5) if mask[i, t] and (
        (ratio[i, t] < 0.8 and adv[i] < 0) or (ratio[i, t] > 1 + hi and adv[i] > 0)))
    assert stats["clipped"] == clipped and clipped > 0
    if beta:
        d = (ref - logps)[mask]
        assert stats["kl_sum"] == pytest.approx(float((d.exp() - d - 1).sum()), rel=1e-5)


def test_importance_ratio_by_hand():
    # one token, advantage +1: ratio exp(-0.1 - (-0.5)) = e^0.4 = 1.4918 > 1 + 0.2, so the clipped term wins:
    # loss = -min(1.4918 * 1, 1.2 * 1) = -1.2 and no gradient flows (the clip is constant)
    logps = torch.tensor([[-0.1]], requires_grad=True)
    loss, stats = grpo_loss(logps, torch.tensor([[-0.5]]), None, torch.tensor([1.0]), torch.tensor([[True]]),
                            cfg_(beta=0.0), 1, 1)
    assert float(loss.detach()) == pytest.approx(-1.2) and stats["clipped"] == 1
    loss.backward()
    assert float(logps.grad) == 0.0
    # ratio e^0.1 = 1.10517 inside the range: loss = -1.10517, d loss / d logp = -ratio
    logps = torch.tensor([[-0.4]], requires_grad=True)
    loss, _ = grpo_loss(logps, torch.tensor([[-0.5]]), None, torch.tensor([1.0]), torch.tensor([[True]]), cfg_(), 1, 1)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-math.exp(0.1)) and float(logps.grad) == pytest.approx(-math.exp(0.1))
    # negative advantage, ratio e^-0.4 = 0.67 < 0.8: -min(0.67 * -1, 0.8 * -1) = 0.8 (clipped, no gradient)
    loss, stats = grpo_loss(torch.tensor([[-0.9]]), torch.tensor([[-0.5]]), None, torch.tensor([-1.0]),
                            torch.tensor([[True]]), cfg_(), 1, 1)
    assert float(loss.detach()) == pytest.approx(0.8) and stats["clipped"] == 1


def test_on_policy_gradient_is_the_policy_gradient():
    # num_iterations = 1: old = logp detached, ratio 1, d loss / d logp_t = -A_i / num_tokens (dapo)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    loss, _ = grpo_loss(logps, None, None, adv, torch.ones(2, 2, dtype=torch.bool), cfg_(), 2, 4)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-(0.5 * 2 - 2.0 * 2) / 4)
    assert logps.grad.flatten().tolist() == pytest.approx([-0.125, -0.125, 0.5, 0.5])


def test_k3_kl_by_hand():
    # ref - logp = 0.5: k3 = e^0.5 - 0.5 - 1 = 0.148721; zero advantage leaves only beta * k3
    loss, stats = grpo_loss(torch.tensor([[-1.0]]), None, torch.tensor([[-0.5]]), torch.tensor([0.0]),
                            torch.tensor([[True]]), cfg_(beta=0.1), 1, 1)
    assert stats["kl_sum"] == pytest.approx(math.exp(0.5) - 1.5)
    assert float(loss.detach()) == pytest.approx(0.1 * (math.exp(0.5) - 1.5))


# ---------------------------------------------------------------------------------------------------- config


def test_config_validation_and_recipe():
    with pytest.raises(TrainConfigError, match="num_generations = 1: must be >= 2"):
        cfg_(num_generations=1)
    with pytest.raises(TrainConfigError, match="generation_batch_size = 6: must be a positive multiple of num_gen"):
        cfg_(num_generations=4, generation_batch_size=6)
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['num_generation'\]"):
        GRPOConfig.from_dict({"num_generation": 8})
    with pytest.raises(TrainConfigError, match="loss_type = 'bnpo'"):
        cfg_(loss_type="bnpo")
    with pytest.raises(TrainConfigError, match="reward_weights"):
        cfg_(reward_weights=[1.0])
    cfg = GRPOConfig.from_yaml("configs/grpo-nano.yaml")
    assert cfg.prompts_per_step * cfg.num_generations == cfg.generation_batch_size
    assert cfg.reward_funcs == ["accuracy", "format"]
    rs = GRPOConfig.from_yaml("configs/rs-nano.yaml")
    sft = TrainConfig.from_yaml("configs/rs-nano-sft.yaml")
    assert sft.data.chat_jsonl == f"{rs.out_dir}/samples.jsonl" and sft.init_from == rs.init_from


# ---------------------------------------------------------------------------------------------------- rollouts


def test_pad_batch_and_logprobs_against_naive(make_model):
    model = make_model("tiny-moe", seed=1).eval()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    ids, mask = pad_batch(prompts, completions)
    assert ids.tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 13, 14]]
    assert mask.tolist() == [[False, False, True, True], [False, True, True, True]]
    logps = completion_logprobs(model, ids, temperature=0.7)
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.tensor([p + c])
        for j, token in enumerate(c):
            logits = model(seq[:, :len(p) + j])[0, -1] / 0.7
            want = float(torch.log_softmax(logits.detach().float(), -1)[token])
            assert float(logps[row, len(p) - 1 + j].detach()) == pytest.approx(want, abs=1e-4)


def test_skipping_zero_advantage_rows_keeps_the_gradient(make_model):
    # beta = 0: a zero-advantage row adds 0 to the loss; micro_batches drops it, the normalisers still count it
    model = make_model("tiny-moe", seed=2)
    rows = [Prompt("q", "1")] * 4
    rollout = Rollout(rows, [[3, 4], [3, 4], [5, 6, 7], [5, 6, 7]], [[8, 9, 1], [10, 1], [11, 12], [13, 1]],
                      ["", "", "", ""], [False] * 4, 0.0)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    cfg = cfg_(num_generations=2, generation_batch_size=4, per_device_train_batch_size=1)
    kept = micro_batches(rollout, adv, cfg)
    assert sum(len(mb.advantages) for mb in kept) == 2
    grads = []
    for batches in (kept, micro_batches(rollout, adv, cfg_(num_generations=2, generation_batch_size=4, beta=1e-9))):
        model.zero_grad()
        for mb in batches:
            loss, _ = grpo_loss(completion_logprobs(model, mb.ids), None, None, mb.advantages, mb.mask, cfg, 4, 10)
            loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------- a tiny run


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    from r1kit.api import random_checkpoint
    from r1kit.tokenizer import Tokenizer

    folder = random_checkpoint(tmp_path / "tiny", "tiny-moe", seed=0, tokenizer=Tokenizer.from_dir("r1kit/nano"))
    (tmp_path / "grpo_test_rewards.py").write_text(textwrap.dedent("""
        def digits(completion):
            return sum(c.isdigit() for c in completion) / 10
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "answer": i + 1}) + "\n"
                                              for i in range(5)))

    def make(out: str, **kw) -> GRPOConfig:
        base = dict(init_from=str(folder), task=str(tmp_path / "p.jsonl"), num_generations=4,
                    reward_funcs=["accuracy", "grpo_test_rewards:digits"], generation_batch_size=8,
                    max_completion_length=12, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                    checkpoint_interval=1, threads=1, out_dir=str(tmp_path / out), beta=0.05, num_iterations=2)
        return GRPOConfig(**{**base, **kw})

    return make


def test_killed_run_resumes_the_same_curve(tiny_run):
    straight = train_grpo(tiny_run("a"), progress=False)
    a = [json.loads(line) for line in open(tiny_run("a").out_dir + "/metrics.jsonl")]
    assert straight["steps"] == 4 and len(a) == 4
    assert any(r["trained_rows"] for r in a) and any(r["kl"] > 0 for r in a)
    assert {"reward", "accuracy", "rewards/grpo_test_rewards:digits/mean", "zero_std_groups", "clip_fraction",
            "rollout_tok_s", "completion_length", "kl"} <= set(a[0])
    train_grpo(tiny_run("b"), progress=False, stop_after=2)  # "killed" after step 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_grpo(tiny_run("b"), progress=False)
    train_grpo(tiny_run("b"), resume=True, progress=False)
    b = [json.loads(line) for line in open(tiny_run("b").out_dir + "/metrics.jsonl")]
    keys = ("step", "reward", "loss", "kl", "grad_norm", "completion_length")
    assert [[r[k] for k in keys] for r in b] == [[r[k] for k in keys] for r in a]
    final = Path(tiny_run("a").out_dir) / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()


def test_raising_reward_names_itself_in_a_run(tiny_run, tmp_path):
    (tmp_path / "grpo_bad_reward.py").write_text("def bad(completion):\n    raise ValueError('broken')\n")
    with pytest.raises(ValueError, match=r"reward 'grpo_bad_reward:bad' raised ValueError: broken\n  on completion"):
        train_grpo(tiny_run("c", reward_funcs=["grpo_bad_reward:bad"]), progress=False)


def test_lora_rl_trains_adapters_and_merges(tiny_run):
    from r1kit.checkpoint import load_model

    cfg = tiny_run("lora", max_steps=2, lora={"r": 4}, num_iterations=1)  # beta > 0: every row trains
    train_grpo(GRPOConfig.from_dict(cfg.to_dict()), progress=False)
    merged = load_model(Path(cfg.out_dir) / "final").state_dict()  # saved bf16
    base = {n: t.to(torch.bfloat16).float() for n, t in load_model(cfg.init_from).state_dict().items()}
    changed = [n for n, t in merged.items() if not torch.equal(t.float(), base[n])]
    assert changed and not [n for n in changed if "embed" in n or "norm" in n or "lm_head" in n], changed


# ------------------------------------------------------------------------------------------------ rejection sampling


def test_rejection_sampling_keeps_verified_shortest_and_writes_sft_format():
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.chat_data import encode_conversation
    from r1kit.train.data import Problem, chat_example, reasoning
    from r1kit.train.traces import keep_verified, trace_record

    problem = Problem(47, "-", 8)
    right = f"{reasoning(problem)}\n</think>\n\n39"
    rows = [Prompt(problem.question, "39")] * 3 + [Prompt("What is 1+1?", "2")] * 3
    texts = [right + " ", right, "wrong\n</think>\n\n38", "1+1=2</think>3", "no close 2", "x</think>2</think>2"]
    rollout = Rollout(rows, [[1]] * 6, [[1] * 9, [1] * 8, [1] * 3, [1], [1], [1]], texts, [False] * 6, 0.0)
    assert keep_verified(rollout, 3, "shortest") == [1]
    assert keep_verified(rollout, 3, "distinct") == [0, 1]
    assert keep_verified(rollout, 3, "first") == [0]
    tok = Tokenizer.from_dir("r1kit/nano")
    example = encode_conversation(trace_record(rows[1], right)["messages"], tok)
    ids, mask = chat_example(problem, tok)  # the SFT stage's own encoding of this problem
    assert list(example.ids) == ids and [int(m) for m in example.loss_mask] == mask


def test_rejection_sampling_draws_as_before(monkeypatch, tmp_path):
    # the batches of prompts_per_step prompts, each seeded by (seed, batch), the keep rule, the file it writes
    from r1kit.train import rejection, traces
    from r1kit.train.grpo import prompt_source

    calls = []

    def generate(model, tok, prompts, samples, params, stop_ids, max_num_seqs):
        calls.append(([p.prompt for p in prompts], samples, params.temperature, torch.randint(1000, ())))
        rows = [p for p in prompts for _ in range(samples)]
        texts = [f"{j}\n</think>\n\n{p.answer}" for p in prompts for j in range(samples)]
        return Rollout(rows, [[1]] * len(rows), [[1] * (9 - j) for _ in prompts for j in range(samples)], texts,
                       [False] * len(rows), 0.1)

    class Model:
        model = None
        _tok = stop_ids = staticmethod(lambda: None)

    monkeypatch.setattr(traces, "generate_rollouts", generate)
    monkeypatch.setattr("r1kit.api.R1Model.from_pretrained", lambda *a, **k: Model())
    cfg = cfg_(num_generations=3, generation_batch_size=6, rs_prompts=5, out_dir=str(tmp_path), seed=2)
    summary = rejection.sample_and_keep(cfg, progress=False)
    source = prompt_source(cfg)
    want = [p.prompt for p in source.take(0, 2) + source.take(1, 2) + source.take(2, 2)][:5]
    assert [c[0] for c in calls] == [want[:2], want[2:4], want[4:]] and {c[1] for c in calls} == {3}
    torch.manual_seed(2 * 1_000_003 + 1)
    assert int(calls[1][3]) == int(torch.randint(1000, ()))  # call 1 drew from seed * 1_000_003 + 1
    lines = [json.loads(line) for line in open(summary["samples"])]
    assert [line["messages"][0]["content"] for line in lines] == want  # the shortest: completion 2 of each
    assert {line["messages"][1]["reasoning_content"] for line in lines} == {"2"}
    assert summary["kept"] == 5 and summary["sampled"] == 15


def test_cli_rl_refuses_bad_recipes(tmp_path, capsys):
    from r1kit.__main__ import main

    for text, message in (("num_generation: 8\n", "unknown key(s) ['num_generation']"),
                          ("num_generations: 1\n", "num_generations = 1: must be >= 2"),
                          ("task: prompts.txt\n", "task = 'prompts.txt'")):
        (tmp_path / "r.yaml").write_text(text)
        assert main(["rl", "--config", str(tmp_path / "r.yaml")]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- dynamic sampling


def _fake_rounds(monkeypatch, rounds: list[list[str]]):
    """Round r of the step generates for the prompts rounds[r]; completion j of prompt "x" is "x/j"."""
    from r1kit.train import grpo

    def generate(model, tokenizer, prompts, num_generations, params, stop_ids):
        rows = [p for p in prompts for _ in range(num_generations)]
        texts = [f"{p.prompt}/{j}" for p in prompts for j in range(num_generations)]
        return Rollout(rows, [[1]] * len(rows), [[2, 3]] * len(rows), texts, [False] * len(rows), 0.5)

    monkeypatch.setattr(grpo, "generate_rollouts", generate)
    monkeypatch.setattr(grpo, "round_prompts", lambda source, step, r, n: [Prompt(q, "") for q in rounds[r]])


def _collect(cfg):
    from r1kit.train.grpo import Policy, collect_rollouts

    # a prompt in upper case gets the same reward on every completion (no signal); others 1 on completion 0 only
    rewards = {"mine": lambda prompt, completion: 1.0 if prompt.isupper() else float(completion.endswith("/0"))}
    return collect_rollouts(Policy(None, None, [], None), None, rewards, cfg, step=3)


def test_dynamic_sampling_drops_constant_groups_and_refills(monkeypatch):
    _fake_rounds(monkeypatch, [["A", "b", "C", "d"], ["e", "F", "g", "h"], ["i", "j", "k", "l"]])
    cfg = cfg_(num_generations=2, generation_batch_size=8, reward_funcs=["mine"],
               filter_groups={"enable": True, "max_num_gen_batches": 5})
    batch = _collect(cfg)
    # round 0 has 2 informative groups (b, d), round 1 three more (e, g, h): 2 rounds, the first 4 kept
    assert [p.prompt for p in batch.rollout.prompts] == ["b", "b", "d", "d", "e", "e", "g", "g"]
    assert batch.rollout.texts == ["b/0", "b/1", "d/0", "d/1", "e/0", "e/1", "g/0", "g/1"]
    assert batch.table.flatten().tolist() == [1, 0] * 4
    assert batch.stats == {"filter_rounds": 2, "groups_kept": 4, "groups_dropped": 3}  # A, C, F
    assert len(batch.sampled.texts) == 16 and batch.sampled.seconds == 1.0  # both rounds' cost
    # off: round 0 as generated, the constant groups included
    batch = _collect(cfg_(num_generations=2, generation_batch_size=8, reward_funcs=["mine"]))
    assert [p.prompt for p in batch.rollout.prompts[::2]] == ["A", "b", "C", "d"] and batch.stats == {}


def test_dynamic_sampling_respects_the_round_cap(monkeypatch):
    _fake_rounds(monkeypatch, [["A", "B", "c", "D"], ["E", "f", "G", "H"], ["i", "J", "K", "L"], ["m", "n", "o", "p"]])
    cfg = cfg_(num_generations=2, generation_batch_size=8, reward_funcs=["mine"],
               filter_groups={"enable": True, "max_num_gen_batches": 3, "metric": "mine"})
    batch = _collect(cfg)  # round 3 (all informative) is never generated
    assert [p.prompt for p in batch.rollout.prompts[::2]] == ["c", "f", "i"]
    assert batch.stats == {"filter_rounds": 3, "groups_kept": 3, "groups_dropped": 9}
    with pytest.raises(TrainConfigError, match=r"filter_groups.metric = 'acc': must be 'reward' or one of"):
        cfg_(filter_groups={"enable": True, "metric": "acc"})
    with pytest.raises(TrainConfigError, match=r"filter_groups: unknown key\(s\) \['enabled'\]"):
        GRPOConfig.from_dict({"filter_groups": {"enabled": True}})


def test_round_prompts_are_fixed_by_step_and_round():
    from r1kit.train.grpo import round_prompts
    from r1kit.train.rewards import PromptSource

    source = PromptSource.arithmetic({"add2": 1.0, "sub3": 1.0}, seed=4)
    assert round_prompts(source, 7, 0, 16) == source.take(7, 16)  # round 0: the step's own prompts, as before
    again = round_prompts(source, 7, 1, 16)
    assert again == round_prompts(PromptSource.arithmetic({"add2": 1.0, "sub3": 1.0}, seed=4), 7, 1, 16)
    others = {p.prompt for s in range(20) for p in source.take(s, 16)}
    assert not {p.prompt for p in again} <= others and again != round_prompts(source, 7, 2, 16)


def test_dynamic_sampling_in_a_run_logs_its_rounds(tiny_run):
    cfg = tiny_run("dapo", max_steps=2, num_iterations=1, beta=0.0,
                   filter_groups={"enable": True, "max_num_gen_batches": 3})
    train_grpo(cfg, progress=False, stop_after=1)  # one step; no final model
    for r in [json.loads(line) for line in open(cfg.out_dir + "/metrics.jsonl")]:
        assert 1 <= r["filter_rounds"] <= 3 and r["groups_kept"] <= 2
        assert r["informative_groups"] == r["groups_kept"] and r["trained_rows"] == 4 * r["groups_kept"]
        assert r["groups_dropped"] == round(r["zero_std_groups"] * 2 * r["filter_rounds"])


def test_a_checkpoint_from_before_filter_groups_resumes(tmp_path):
    # a key the checkpointed run did not have ran with its default: resumable; a changed one is refused by name
    from r1kit.train.loop import TrainingError, _check_same_recipe

    now = GRPOConfig().to_dict()
    old = {k: v for k, v in now.items() if k != "filter_groups"}
    _check_same_recipe(old, now, tmp_path, GRPOConfig)
    with pytest.raises(TrainingError, match=r"differs from the checkpointed run in \['filter_groups'\]"):
        _check_same_recipe(old, GRPOConfig(filter_groups={"enable": True}).to_dict(), tmp_path, GRPOConfig)
