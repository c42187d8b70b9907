"""GRPOConfig: one validated recipe for `r1kit rl` (GRPO and rejection sampling), read from YAML like TrainConfig.

    cfg = GRPOConfig.from_yaml("configs/grpo-nano.yaml", out_dir="runs/x")

The GRPO names are TRL's `GRPOConfig` names where the idea is the same (num_generations, generation_batch_size,
per_device_train_batch_size, max_completion_length, temperature, top_p, top_k, beta, epsilon, epsilon_high,
scale_rewards, loss_type, num_iterations, reward_weights, max_grad_norm); the schedule, precision and run keys are
TrainConfig's (learning_rate, warmup_steps, schedule, min_lr_ratio, weight_decay, betas, moe_balance_rate, seed,
threads, out_dir, checkpoint_interval, keep_checkpoints), so the training loop's pieces (lr_at, make_optimizer,
checkpoints) take either. Defaults are DeepSeek-R1's where published (16 completions per prompt, temperature 1,
beta 0.001, learning rate 3e-6), TRL's otherwise (epsilon 0.2, loss_type dapo, scale_rewards group). DAPO's
dynamic sampling is verl's `filter_groups` section (enable, metric, max_num_gen_batches), off by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.train.config import LoRASection, TrainConfigError, build_dataclass, read_recipe

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")  # token-level, sequence-level, Dr. GRPO's constant normaliser
SCALE_REWARDS = ("group", "none")


@dataclass
class FilterGroupsSection:
    """DAPO's dynamic sampling, as verl's ``algorithm.filter_groups``: a step keeps only the groups whose `metric`
    varies (a group of equal rewards has zero advantage: no signal), generating more rounds of
    generation_batch_size completions until it holds prompts_per_step such groups or max_num_gen_batches rounds
    are spent (then it trains on the groups it has; verl stops the run instead)."""

    enable: bool = False
    metric: str = "reward"  # what must vary within a group: "reward" (the weighted total) or a reward_funcs name
    max_num_gen_batches: int = 10  # generation rounds per step at most (verl's DAPO recipe uses 10)


@dataclass
class GRPOConfig:
    init_from: str = "r1kit/nano"  # the model folder RL starts from (weights + tokenizer)
    task: str = "arithmetic"  # "arithmetic" (built in) or a JSONL file of {"prompt": ..., "answer": ...}
    arithmetic_kinds: dict[str, float] = field(default_factory=lambda: {"add2": 1.0, "sub2": 1.0, "add3": 1.0,
                                                                         "sub3": 1.0, "mul2x1": 1.0, "mul2x2": 1.0})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])  # names or module:function
    reward_weights: list[float] | None = None  # one per reward (None: all 1)
    # generation
    num_generations: int = 16  # completions per prompt: the group its advantages are relative to
    generation_batch_size: int = 64  # completions per step (a multiple of num_generations)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # objective
    beta: float = 0.001  # KL coefficient (0: no reference model is kept)
    epsilon: float = 0.2  # lower clip range of the importance ratio
    epsilon_high: float | None = None  # upper clip range (DAPO's clip-higher); None: epsilon
    scale_rewards: str = "group"  # "group": advantages divided by the group's std; "none": not scaled (Dr. GRPO)
    loss_type: str = "dapo"  # "dapo": mean over all tokens; "grpo": per sequence then over sequences; "dr_grpo"
    num_iterations: int = 1  # optimizer steps on each batch of rollouts (> 1: importance ratio to the old policy)
    filter_groups: FilterGroupsSection = field(default_factory=FilterGroupsSection)  # DAPO's dynamic sampling
    # optimisation
    per_device_train_batch_size: int = 16  # completions per forward/backward micro-batch
    learning_rate: float = 3e-6
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "cosine" | "linear" | "constant"
    max_steps: int = 100  # rollout steps (each makes num_iterations optimizer steps)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # "fp32" | "bf16" (autocast of the training forwards; rollouts run the fp32 weights)
    moe_balance_rate: float = 0.001  # DeepSeek-V3's bias balancing stays on during RL
    lora: LoRASection = field(default_factory=LoRASection)  # adapters only (r >= 1) or, r = 0, every weight
    # rejection sampling (--mode rejection-sampling)
    rs_prompts: int = 512  # prompts sampled num_generations times each
    rs_keep_shortest: bool = True  # keep only the shortest correct completion of each prompt
    # run
    seed: int = 0
    threads: int | None = None
    out_dir: str = "runs/grpo"
    checkpoint_interval: int = 25
    keep_checkpoints: int = 2
    log_interval: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.filter_groups, dict):  # GRPOConfig(filter_groups={...}) as from_dict builds it
            self.filter_groups = build_dataclass(FilterGroupsSection, self.filter_groups, "filter_groups")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name} = {getattr(self, name, None)!r}: {why}")

        need(self.num_generations >= 2, "num_generations", "must be >= 2: a group needs two completions to compare")
        need(self.generation_batch_size >= 1 and self.generation_batch_size % self.num_generations == 0,
             "generation_batch_size", f"must be a positive multiple of num_generations ({self.num_generations})")
        for name in ("max_completion_length", "per_device_train_batch_size", "num_iterations", "max_steps",
                     "rs_prompts", "checkpoint_interval", "keep_checkpoints", "log_interval"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (RL samples; 0 would be greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        need(self.beta >= 0, "beta", "must be >= 0 (0 = no KL term)")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0, or None for epsilon")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards", f"must be one of {SCALE_REWARDS}")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {LOSS_TYPES}")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.schedule in ("cosine", "linear", "constant"), "schedule", "must be cosine, linear or constant")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = off)")
        need(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")
        need(self.moe_balance_rate >= 0, "moe_balance_rate", "must be >= 0")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1, or None for torch's default")
        need(bool(self.reward_funcs), "reward_funcs", "needs at least one reward")
        need(self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs), "reward_weights",
             f"needs one weight per reward ({len(self.reward_funcs)}: {self.reward_funcs})")
        fg = self.filter_groups
        if fg.metric not in ("reward", *self.reward_funcs):
            raise TrainConfigError(f"filter_groups.metric = {fg.metric!r}: must be 'reward' or one of reward_funcs "
                                   f"{self.reward_funcs}")
        if fg.max_num_gen_batches < 1:
            raise TrainConfigError(f"filter_groups.max_num_gen_batches = {fg.max_num_gen_batches}: must be >= 1 (the "
                                   "cap on generation rounds per step)")
        need(self.task == "arithmetic" or self.task.endswith(".jsonl"), "task",
             "must be 'arithmetic' or a .jsonl file of {prompt, answer} lines")

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward_funcs)

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (lr_at's schedule runs over these)."""
        return self.max_steps * self.num_iterations

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> GRPOConfig:
        return build_dataclass(cls, d, where)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> GRPOConfig:
        """Read a YAML recipe; keyword overrides (top-level keys) win over the file."""
        return read_recipe(cls, path, overrides)
