"""GRPO with verifiable rewards (DeepSeekMath / DeepSeek-R1), written out as a loop.

    train_grpo(GRPOConfig.from_yaml("configs/grpo-nano.yaml"))       # or: r1kit rl --config ... [--resume]

One step: take the step's prompts (a pure function of seed and step), sample `num_generations` completions of
each with r1kit's engine (`r1kit.train.rollout`), score them with the configured rewards
(`r1kit.train.rewards`), turn the weighted sum into group-relative advantages, then make `num_iterations`
optimizer steps on that batch with the clipped surrogate plus `beta` times the k3 KL to the frozen starting
model (kept only when beta > 0). After each optimizer step the MoE routing biases are balanced as in
pretraining. Metrics go to metrics.jsonl (a PNG at the end), checkpoints are the training loop's (atomic,
resumable to the same curve: rollouts are seeded by step).

The objective per completion token t of completion i (TRL's notation):
    ratio = exp(logp - old_logp)     (old_logp = logp detached when num_iterations = 1: ratio 1, same gradient)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * k3
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1
averaged per `loss_type`: "dapo" over all completion tokens of the batch, "grpo" over each completion's tokens and
then over completions, "dr_grpo" summed and divided by completions * max_completion_length.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1kit.generate import SamplingParams
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer
from r1kit.train.config import TrainConfigError
from r1kit.train.loop import (
    RunState,
    autocast,
    balance_experts,
    lr_at,
    make_optimizer,
    moe_layers,
    open_run_dir,
    progress_bar,
    restore_run,
    save_training_checkpoint,
)
from r1kit.train.rewards import Prompt, PromptSource, Scored, accuracy_reward, load_jsonl_prompts, reward_names, score
from r1kit.train.rl_config import GRPOConfig
from r1kit.train.rollout import Rollout, completion_logprobs, generate_rollouts, pad_batch

log = logging.getLogger("r1kit")


# ---------------------------------------------------------------------------------------------------- the math


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's std (+1e-4) with scale_rewards="group"; exactly 0 in
    a group whose rewards are all equal. rewards (N,), prompt-major groups of num_generations; returns (N,)."""
    if rewards.numel() == 0:  # a step whose dynamic sampling found no informative group
        return rewards.float()
    grouped = rewards.float().view(-1, num_generations)  # (N / G, G)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-4)
    same = (grouped == grouped[:, :1]).all(1, keepdim=True)  # exactly 0, not the mean's rounding error / 1e-4
    return advantages.masked_fill(same, 0.0).flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig, num_sequences: int, num_tokens: int
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the batch loss (see the module doc), and its sums for the metrics.

    logps, old_logps, ref_logps, mask: (B, T); advantages: (B,). num_sequences and num_tokens count the whole
    batch (all micro-batches), so the shares add up to the batch loss. old_logps None: logps detached.
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)  # (B, T)
    low, high = cfg.epsilon, cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    adv = advantages[:, None].to(logps.dtype)  # (B, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
    m = mask.to(logps.dtype)
    kl_sum = 0.0
    if cfg.beta > 0 and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3, >= 0
        per_token = per_token + cfg.beta * kl
        kl_sum = float((kl.detach() * m).sum())
    if cfg.loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / num_sequences
    elif cfg.loss_type == "dapo":
        loss = (per_token * m).sum() / max(num_tokens, 1)
    else:  # dr_grpo
        loss = (per_token * m).sum() / (num_sequences * cfg.max_completion_length)
    clipped = ((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return loss, {"kl_sum": kl_sum, "clipped": float((clipped & mask).sum()), "tokens": float(mask.sum())}


# ---------------------------------------------------------------------------------------------------- rewards


def score_rollout(rollout: Rollout, rewards: dict[str, Any], cfg: GRPOConfig) -> torch.Tensor:
    """Every reward of every completion: (N, R), in the order of cfg.reward_funcs."""
    table = [[score(fn, name, Scored(p.prompt, text, p.answer, len(ids)), cfg.max_completion_length)
              for name, fn in rewards.items()]
             for p, text, ids in zip(rollout.prompts, rollout.texts, rollout.completion_ids, strict=True)]
    return torch.tensor(table, dtype=torch.float32)


def rollout_metrics(rollout: Rollout, table: torch.Tensor, total: torch.Tensor, cfg: GRPOConfig) -> dict[str, Any]:
    """Reward mean/std per reward and in total, accuracy (overall and per kind), completion length, truncation,
    the fraction of groups whose rewards do not vary (no learning signal), rollout tokens/s."""
    acc = [accuracy_reward(t, p.answer) for t, p in zip(rollout.texts, rollout.prompts, strict=True)]
    kinds: dict[str, list[float]] = {}
    for a, p in zip(acc, rollout.prompts, strict=True):
        kinds.setdefault(p.kind, []).append(a)
    grouped = total.view(-1, cfg.num_generations)
    record: dict[str, Any] = {
        "reward": float(total.mean()), "reward_std": float(total.std()) if len(total) > 1 else 0.0,
        "accuracy": sum(acc) / len(acc), "accuracy_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        "completion_length": rollout.num_tokens / len(acc), "truncated": sum(rollout.truncated) / len(acc),
        "zero_std_groups": float((grouped.std(1) == 0).float().mean()),
        "rollout_tok_s": rollout.num_tokens / max(rollout.seconds, 1e-9), "rollout_s": rollout.seconds}
    for j, name in enumerate(cfg.reward_funcs):
        record[f"rewards/{name}/mean"] = float(table[:, j].mean())
        record[f"rewards/{name}/std"] = float(table[:, j].std()) if len(table) > 1 else 0.0
    return record


# ---------------------------------------------------------------------------------------------------- one step


@dataclass
class Policy:
    """What a GRPO run trains and samples with."""

    model: Transformer
    tokenizer: Tokenizer
    stop_ids: list[int]
    optimizer: torch.optim.Optimizer
    ref: Transformer | None = None  # the frozen starting model (beta > 0 only)
    layers: list = field(default_factory=list)  # the MoE layers the policy's forward runs, for bias balancing


@dataclass
class MicroBatch:
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T - 1) completion targets
    advantages: torch.Tensor  # (B,)
    old_logps: torch.Tensor | None = None  # (B, T - 1), num_iterations > 1
    ref_logps: torch.Tensor | None = None  # (B, T - 1), beta > 0


def micro_batches(rollout: Rollout, advantages: torch.Tensor, cfg: GRPOConfig) -> list[MicroBatch]:
    """The rows that carry gradient, by length, in micro-batches of per_device_train_batch_size. A row with
    zero advantage adds nothing to the loss when beta = 0 (its surrogate is 0), so it is not run at all; the
    loss normalisers still count it (see grpo_loss)."""
    rows = [i for i in range(len(advantages)) if cfg.beta > 0 or advantages[i] != 0]
    rows.sort(key=lambda i: len(rollout.prompt_ids[i]) + len(rollout.completion_ids[i]))
    out = []
    for start in range(0, len(rows), cfg.per_device_train_batch_size):
        chunk = rows[start:start + cfg.per_device_train_batch_size]
        ids, mask = pad_batch([rollout.prompt_ids[i] for i in chunk], [rollout.completion_ids[i] for i in chunk])
        out.append(MicroBatch(ids, mask, advantages[chunk]))
    return out


@torch.no_grad()
def fill_fixed_logprobs(policy: Policy, batches: list[MicroBatch], cfg: GRPOConfig) -> None:
    """Old-policy log-probs (num_iterations > 1) and reference log-probs (beta > 0), before any update."""
    for mb in batches:
        if cfg.num_iterations > 1:
            with autocast(cfg.precision, mb.ids.device):
                mb.old_logps = completion_logprobs(policy.model, mb.ids, cfg.temperature)
        if policy.ref is not None:
            with autocast(cfg.precision, mb.ids.device):
                mb.ref_logps = completion_logprobs(policy.ref, mb.ids, cfg.temperature)


def optimize(policy: Policy, batches: list[MicroBatch], cfg: GRPOConfig, lr: float, num_sequences: int,
             num_tokens: int) -> dict[str, float]:
    """One optimizer step over all micro-batches (gradients accumulated), then the routing-bias balancing."""
    model, opt = policy.model, policy.optimizer
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    loads = [torch.zeros(m.experts.n_experts, dtype=torch.long) for m in policy.layers]
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0.0, "tokens": 0.0}
    for mb in batches:
        with autocast(cfg.precision, mb.ids.device):
            logps = completion_logprobs(model, mb.ids, cfg.temperature)
            loss, stats = grpo_loss(logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.mask, cfg, num_sequences,
                                    num_tokens)
        loss.backward()
        sums["loss"] += float(loss.detach())
        for key in ("kl_sum", "clipped", "tokens"):
            sums[key] += stats[key]
        for i, m in enumerate(policy.layers):
            loads[i] += m.load.cpu()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf")))
    if batches:
        opt.step()
    opt.zero_grad(set_to_none=True)
    rate = 0.0 if cfg.lora.r else cfg.moe_balance_rate  # LoRA: the base (routing biases included) stays frozen
    maxvio = balance_experts(policy.layers, loads, rate) if batches else []
    tokens = max(sums["tokens"], 1.0)
    return {"loss": sums["loss"], "kl": sums["kl_sum"] / tokens, "clip_fraction": sums["clipped"] / tokens,
            "grad_norm": grad_norm, "trained_rows": sum(len(mb.advantages) for mb in batches), "maxvio": maxvio}


def rl_step(policy: Policy, source: PromptSource, rewards: dict[str, Any], cfg: GRPOConfig, step: int
            ) -> dict[str, Any]:
    """Rollouts of step `step` (several rounds with filter_groups), their rewards and advantages, then
    num_iterations optimizer steps on them."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed * 1_000_003 + step)  # the step's draws, the same on a resumed run
    batch = collect_rollouts(policy, source, rewards, cfg, step)
    total = batch.table @ torch.tensor(cfg.weights)  # (N,)
    advantages = group_advantages(total, cfg.num_generations, cfg.scale_rewards)
    batches = micro_batches(batch.rollout, advantages, cfg)
    fill_fixed_logprobs(policy, batches, cfg)
    num_tokens = batch.rollout.num_tokens
    for it in range(cfg.num_iterations):
        lr = lr_at(step * cfg.num_iterations + it, cfg)
        opt_stats = optimize(policy, batches, cfg, lr, len(advantages), num_tokens)
    record = rollout_metrics(batch.sampled, batch.sampled_table, batch.sampled_table @ torch.tensor(cfg.weights),
                             cfg)
    record.update(batch.stats, informative_groups=int((advantages.view(-1, cfg.num_generations) != 0).any(1).sum()))
    record.update(opt_stats, lr=lr, tokens=batch.sampled.num_tokens, step_s=time.perf_counter() - t0)
    return record


# ---------------------------------------------------------------------------------------------------- dynamic sampling


@dataclass
class StepRollouts:
    """What a step trains on, and everything it generated (one round, or several with filter_groups)."""

    rollout: Rollout  # the rows trained on: prompts_per_step groups (fewer when the round cap was reached)
    table: torch.Tensor  # (N, R) their rewards
    sampled: Rollout  # every row generated this step, all rounds: the metrics' sample
    sampled_table: torch.Tensor  # (M, R)
    stats: dict[str, int] = field(default_factory=dict)  # filter_groups: rounds, groups kept / dropped


def collect_rollouts(policy: Policy, source: PromptSource, rewards: dict[str, Any], cfg: GRPOConfig, step: int
                     ) -> StepRollouts:
    """The step's rollouts and rewards. With filter_groups on (DAPO's dynamic sampling), rounds of
    generation_batch_size completions are generated (round r's prompts: ``round_prompts``) until prompts_per_step
    groups whose filter metric varies are in hand, or max_num_gen_batches rounds are spent; the constant groups
    are dropped and the first prompts_per_step informative ones kept."""
    params = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    fg, want, size = cfg.filter_groups, cfg.prompts_per_step, cfg.num_generations
    rounds, tables, keep = [], [], []  # keep: indices of the informative groups over all rounds
    for r in range(fg.max_num_gen_batches if fg.enable else 1):
        rollout = generate_rollouts(policy.model, policy.tokenizer, round_prompts(source, step, r, want), size,
                                    params, policy.stop_ids)
        rounds.append(rollout)
        tables.append(score_rollout(rollout, rewards, cfg))  # (N, R)
        keep += [r * want + g for g in informative_groups(filter_metric(tables[-1], cfg), size)]
        if len(keep) >= want:
            break
    sampled, sampled_table = concat_rollouts(rounds), torch.cat(tables)
    if not fg.enable:
        return StepRollouts(sampled, sampled_table, sampled, sampled_table)
    rows = [g * size + i for g in keep[:want] for i in range(size)]
    if len(keep) < want:
        log.info("step %d: %d of %d informative groups after %d generation rounds (filter_groups."
                 "max_num_gen_batches)", step, len(keep), want, len(rounds))
    stats = {"filter_rounds": len(rounds), "groups_kept": min(len(keep), want),
             "groups_dropped": len(rounds) * want - len(keep)}
    return StepRollouts(select_rows(sampled, rows), sampled_table[rows], sampled, sampled_table, stats)


def round_prompts(source: PromptSource, step: int, round_: int, n: int) -> list[Prompt]:
    """The prompts of generation round `round_` of step `step`: round 0's are the step's own (``source.take``);
    a later round draws from the source reseeded by the round, so it is the same on a resumed run."""
    if round_ == 0:
        return source.take(step, n)
    return PromptSource(source.prompts, source.kinds, seed=source.seed + round_ * 1_000_000_007).take(step, n)


def filter_metric(table: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """The per-completion value filter_groups.metric names: the weighted total reward, or one reward's column.
    table (N, R) -> (N,)."""
    if cfg.filter_groups.metric == "reward":
        return table @ torch.tensor(cfg.weights)
    return table[:, cfg.reward_funcs.index(cfg.filter_groups.metric)]


def informative_groups(values: torch.Tensor, num_generations: int) -> list[int]:
    """Indices of the groups (prompt-major, num_generations rows each) whose values are not all equal."""
    grouped = values.view(-1, num_generations)  # (N / G, G)
    return [int(g) for g in torch.nonzero((grouped != grouped[:, :1]).any(1)).flatten()]


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout of the rows of `parts`, in order (seconds added up)."""
    if len(parts) == 1:
        return parts[0]
    return Rollout(*([x for p in parts for x in getattr(p, name)]
                     for name in ("prompts", "prompt_ids", "completion_ids", "texts", "truncated")),
                   seconds=sum(p.seconds for p in parts))


def select_rows(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rollout of the given rows only."""
    return Rollout(*([getattr(rollout, name)[i] for i in rows]
                     for name in ("prompts", "prompt_ids", "completion_ids", "texts", "truncated")),
                   seconds=rollout.seconds)


# ---------------------------------------------------------------------------------------------------- the run


def prompt_source(cfg: GRPOConfig) -> PromptSource:
    """The configured task's prompts: built-in arithmetic or a JSONL file."""
    if cfg.task == "arithmetic":
        return PromptSource.arithmetic(cfg.arithmetic_kinds, seed=cfg.seed)
    return PromptSource(load_jsonl_prompts(cfg.task), seed=cfg.seed)


def load_policy(cfg: GRPOConfig) -> Policy:
    """The model to train (fp32 master weights) from init_from, its tokenizer and stop ids, the optimizer and,
    with beta > 0, a frozen copy as the reference."""
    from r1kit.api import R1Model

    start = R1Model.from_pretrained(cfg.init_from, device="cpu", dtype="fp32")
    model = start.model
    ref = None
    if cfg.beta > 0:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    model.requires_grad_(True)
    if cfg.lora.r:
        add_lora(model, cfg)
    in_mtp = {id(m) for m in moe_layers(model.mtp)} if model.mtp else set()  # RL trains the main head only
    layers = [m for m in moe_layers(model) if id(m) not in in_mtp]
    return Policy(model, start._tok(), start.stop_ids(), make_optimizer(model, cfg), ref, layers)


def add_lora(model: Transformer, cfg: GRPOConfig) -> None:
    """LoRA-only RL (lora.r >= 1): adapters on the lora section's targets, everything else frozen."""
    from r1kit.lora import LoRAConfig, inject_lora, mark_only_lora_trainable

    lo = cfg.lora
    if lo.qlora:
        raise TrainConfigError("lora.qlora: RL samples with the training model, which needs a full-precision base")
    targets = {"target_modules": lo.target_modules} if lo.target_modules is not None else {}
    inject_lora(model, LoRAConfig(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, use_rslora=lo.use_rslora, **targets))
    mark_only_lora_trainable(model)


def train_grpo(cfg: GRPOConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None
               ) -> dict[str, Any]:
    """Run (or resume) a GRPO recipe; returns a summary. `stop_after` ends early after that many steps."""
    out = Path(cfg.out_dir)
    state = open_run_dir(out, cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rewards = reward_names(cfg.reward_funcs)
    source = prompt_source(cfg)
    policy = load_policy(cfg)
    run = restore_run(state, out, policy.model, policy.optimizer, source, cfg)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, run.step + stop_after)
    bar = progress_bar(progress, cfg.max_steps, run.step)
    with open(out / "metrics.jsonl", "a") as file:
        while run.step < end:
            record = rl_step(policy, source, rewards, cfg, run.step)
            run.step, run.tokens = run.step + 1, run.tokens + record["tokens"]
            run.elapsed += record["step_s"]
            log_step(file, bar, run, record, cfg)
            if run.step % cfg.checkpoint_interval == 0 or run.step == end:
                save_training_checkpoint(out, cfg, policy.model, policy.optimizer, source, run.step, run.tokens,
                                         run.elapsed)
    if bar is not None:
        bar.close()
    summary = {"steps": run.step, "rollout_tokens": run.tokens, "elapsed_s": run.elapsed}
    if run.step == cfg.max_steps:
        summary.update(finalize_rl(out, policy))
    return summary


def log_step(file: Any, bar: Any, run: RunState, record: dict[str, Any], cfg: GRPOConfig) -> None:
    """Append the step's record to metrics.jsonl (every log_interval steps) and update the progress bar."""
    record = {"step": run.step, **record, "elapsed_s": run.elapsed}
    if run.step % cfg.log_interval == 0:
        file.write(json.dumps(record) + "\n")
        file.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.3f}",
                        len=f"{record['completion_length']:.0f}", kl=f"{record['kl']:.4f}")


def finalize_rl(out: Path, policy: Policy) -> dict[str, Any]:
    """Save the trained model (bf16, Hugging Face format) with its tokenizer and the RL curves PNG in out/final."""
    from r1kit.checkpoint import save_model
    from r1kit.lora import lora_modules, merge_lora, unload_lora
    from r1kit.train.plots import plot_rl_metrics

    final = out / "final"
    if any(True for _ in lora_modules(policy.model)):  # LoRA RL: the adapters merged into the weights
        merge_lora(policy.model, keep_original=False)
        unload_lora(policy.model)
    save_model(policy.model, final, dtype=torch.bfloat16)
    policy.tokenizer.save(final)
    plot = plot_rl_metrics(out / "metrics.jsonl", final / "rl.png")
    return {"final": str(final), "plot": str(plot) if plot else None}
