"""TrainConfig: one validated dataclass per training recipe, read from YAML (configs/*.yaml).

Every key is checked: an unknown or mistyped key is an error that names it and lists the known ones, and
out-of-range values name their field. Sections `model` and `data` are nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r1kit.model.config import PRESETS, ModelConfig, preset


class TrainConfigError(ValueError):
    """A training config key is unknown, mistyped or out of range. The message names it."""


@dataclass
class ModelSection:
    preset: str = "tiny-moe"  # a name from r1kit.model.config.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change
    from_init: bool = False  # the model is init_from's own (its config.json, shapes and compression structure)


@dataclass
class DataSection:
    mixture: dict[str, float] = field(default_factory=lambda: {"stdlib": 0.5, "arithmetic": 0.5})
    arithmetic_kinds: dict[str, float] = field(default_factory=lambda: {"add2": 1.0, "sub2": 1.0})
    arithmetic_examples: int = 20000  # distinct training problems generated
    tool_kinds: dict[str, float] = field(default_factory=dict)  # mixture source "tools" (r1kit.train.tool_data)
    tool_examples: int = 20000  # calculator-tool conversations generated for the "tools" source
    max_files: int | None = None  # cap on standard-library files read per side (None: all)
    max_chars: int | None = None  # cap on standard-library characters read per side (None: all)
    tokenizer_vocab: int = 4096  # byte-level BPE trained on the training data (digits split)
    tokenizer_chars: int = 4_000_000  # characters of text the tokenizer is trained on
    chat_jsonl: str | None = None  # fine-tune on this chat JSONL (r1kit.train.chat_data) instead of the mixture
    validation_jsonl: str | None = None  # validation conversations; None: validation_fraction of chat_jsonl
    validation_fraction: float = 0.05  # held out of chat_jsonl for validation (when no validation_jsonl)
    skip_invalid: bool = False  # chat_jsonl: count and skip bad lines instead of stopping at the first


@dataclass
class AugmentSection:
    """Augmentation of chat_jsonl's training side (r1kit.train.augment); off unless ops or translator is set."""

    ops: dict[str, float] = field(default_factory=dict)  # EDA operation -> rate alpha, e.g. {synonym: 0.1}
    n_aug: int | None = None  # augmented copies per example; None: Wei & Zou's choice for the data size
    translator: str | None = None  # back-translation: an r1kit model folder or an OpenAI-compatible URL
    translator_model: str | None = None  # the model name sent to an OpenAI-compatible translator
    languages: tuple[str, str] = ("French", "German")  # back-translation's pivot languages, one copy each
    wordnet: str | None = None  # WordNet dict folder; None: Debian's wordnet-base (scripts/install_wordnet.sh)
    seed: int = 0


@dataclass
class LoRASection:
    """LoRA / QLoRA fine-tuning (r1kit.lora): on when r >= 1; the frozen base is init_from (its own architecture)."""

    r: int = 0  # adapter rank; 0: no adapters (the whole model trains)
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0
    target_modules: Any = None  # a regex (str) or a list of module names; None: r1kit.lora.DEFAULT_TARGETS
    qlora: str | None = None  # hold the frozen base as "int8" | "int4" | "nf4"; None: full precision
    use_rslora: bool = False  # scaling = alpha / sqrt(r)


@dataclass
class ContinualSection:
    """Continual learning (r1kit.train.continual): on when from_run is set (`r1kit train --continual-from RUN`)."""

    from_run: str | None = None  # the previous run (its final/ and final/continual/) or a model folder
    previous_recipe: str | None = None  # the previous task's recipe when from_run is not a run (e.g. r1kit/nano)
    previous_task: str | None = None  # its name (default: the folder's name), when from_run has no continual files
    task: str | None = None  # this task's name (default: the out_dir's name)
    fisher: str = "empirical"  # "empirical" (the data's labels) | "sampled" (labels drawn from the model)
    fisher_rows: int = 64  # rows (sequences) the diagonal Fisher is estimated on
    ewc_lambda: float = 0.0  # EWC penalty weight: lambda/2 * sum F (theta - theta*)^2 (0 = off)
    ewc_decay: float = 1.0  # online EWC: F <- ewc_decay * F_old + F_task at the end of each task
    freeze: str | None = None  # elastic freezing by importance: "layer" | "head" | "expert" | "weight"
    freeze_fraction: float = 0.0  # the top fraction of units (of single weights, for "weight") affected
    freeze_lr_scale: float = 0.0  # their update scale: 0 = frozen, (0, 1] = learning rate scaled
    replay_ratio: float = 0.0  # fraction of each batch's rows replayed from earlier tasks (0 = off)
    replay_examples: int = 2048  # replay buffer bound in rows (shared evenly by the tasks)
    replay_bytes: int = 64 * 2**20  # replay buffer bound in bytes
    generative_replay: int = 0  # problems the previous model answers; the verified answers join the buffer
    lwf_alpha: float = 0.0  # LwF distillation weight towards the previous model (0 = off)
    lwf_temperature: float = 2.0


@dataclass
class DistributedSection:
    """Training on several processes under torchrun (r1kit.train.distributed); mode none: one process."""

    mode: str = "none"  # "none" | "ddp" | "fsdp"; `r1kit train --distributed` sets it
    backend: str | None = None  # None: by device (gloo on CPU, nccl on CUDA, hccl on Ascend NPUs)
    timeout_s: float = 120.0  # a collective waiting longer than this ends the job (a dead or stuck rank)
    cpu_offload: bool = False  # fsdp: keep the sharded parameters, gradients and optimizer state on the CPU
    expert_parallel: bool = False  # with ddp: routed experts split across ranks, tokens exchanged by all_to_all


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    lora: LoRASection = field(default_factory=LoRASection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    continual: ContinualSection = field(default_factory=ContinualSection)
    init_from: str | None = None  # start from this trained model folder (weights + tokenizer): a second stage
    seq_len: int = 256
    batch_size: int = 16
    gradient_accumulation: int = 1
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    max_steps: int | None = 1000
    token_budget: int | None = None  # alternative to max_steps: stop after this many training tokens
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "bf16"  # "fp32" | "bf16" | "fp8" (fp8 emulated on CPU, around the linear layers)
    gradient_checkpointing: bool = False
    moe_balance_rate: float = 0.001  # gamma of DeepSeek-V3's auxiliary-loss-free bias update (0 = off)
    moe_aux_loss_alpha: float = 0.0  # alpha of DeepSeek-V3's sequence-wise balance loss (eq. 17-20; 0 = off)
    moe_capacity_factor: float | None = None  # expert capacity = factor * tokens * k / experts; None = no dropping
    mtp_loss_weight: float = 0.3
    eval_interval: int = 200
    eval_batches: int = 8
    early_stopping_patience: int | None = None  # stop after this many validations without improvement
    early_stopping_min_delta: float = 0.0  # an improvement is a validation loss this much below the best
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    out_dir: str = "runs/train"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name} = {getattr(self, name, None)!r}: {why}")

        for name in ("seq_len", "batch_size", "gradient_accumulation", "eval_interval", "eval_batches",
                     "checkpoint_interval", "keep_checkpoints", "log_interval"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.schedule in ("cosine", "linear", "constant"), "schedule", "must be cosine, linear or constant")
        need(self.precision in ("fp32", "bf16", "fp8"), "precision", "must be fp32, bf16 or fp8")
        need((self.max_steps is None) != (self.token_budget is None), "max_steps",
             "give exactly one of max_steps and token_budget")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        need(self.token_budget is None or self.token_budget >= 1, "token_budget", "must be >= 1")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        need(self.moe_balance_rate >= 0, "moe_balance_rate", "must be >= 0")
        need(self.moe_aux_loss_alpha >= 0, "moe_aux_loss_alpha", "must be >= 0 (0 = off)")
        need(self.moe_capacity_factor is None or self.moe_capacity_factor > 0, "moe_capacity_factor",
             "must be > 0, or None for no token dropping")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1, or None for torch's default")
        if self.model.preset not in PRESETS:
            raise TrainConfigError(f"model.preset = {self.model.preset!r}: unknown; presets: {sorted(PRESETS)}")
        self.model_config()  # the overrides must form a valid ModelConfig
        if self.model.from_init and not self.init_from:
            raise TrainConfigError("model.from_init = True: takes init_from's architecture, but init_from is not set")
        need(self.early_stopping_patience is None or self.early_stopping_patience >= 1, "early_stopping_patience",
             "must be >= 1, or None for no early stopping")
        need(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", "must be >= 0")
        self._validate_data()
        self._validate_augment()
        self._validate_lora()
        self._validate_distributed()
        self._validate_continual()

    def _validate_distributed(self) -> None:
        d = self.distributed
        if d.mode not in ("none", "ddp", "fsdp"):
            raise TrainConfigError(f"distributed.mode = {d.mode!r}: must be none, ddp or fsdp")
        if d.backend not in (None, "gloo", "nccl", "hccl"):
            raise TrainConfigError(f"distributed.backend = {d.backend!r}: must be gloo, nccl, hccl or None")
        if d.timeout_s <= 0:
            raise TrainConfigError(f"distributed.timeout_s = {d.timeout_s!r}: must be > 0")
        if d.expert_parallel and d.mode == "fsdp":
            raise TrainConfigError("distributed.expert_parallel: runs with mode ddp (FSDP + EP is not implemented)")

    def _validate_lora(self) -> None:
        lo = self.lora
        if lo.r < 0:
            raise TrainConfigError(f"lora.r = {lo.r!r}: must be >= 1 (0: no adapters)")
        if not lo.r:
            return
        if not self.init_from:
            raise TrainConfigError("lora.r is set but init_from is not: LoRA adapts a trained base (init_from: DIR)")
        if not 0 <= lo.dropout < 1:
            raise TrainConfigError(f"lora.dropout = {lo.dropout!r}: must be in [0, 1)")
        if lo.qlora not in (None, "int8", "int4", "nf4"):
            raise TrainConfigError(f"lora.qlora = {lo.qlora!r}: must be int8, int4, nf4 or None")
        t = lo.target_modules
        if not (t is None or (isinstance(t, str) and t) or (isinstance(t, list) and t
                                                              and all(isinstance(x, str) for x in t))):
            raise TrainConfigError(f"lora.target_modules = {t!r}: a regular expression or a list of module names")

    def _validate_continual(self) -> None:
        c = self.continual
        for name in ("ewc_decay", "freeze_fraction", "freeze_lr_scale", "replay_ratio"):
            if not 0 <= getattr(c, name) <= 1:
                raise TrainConfigError(f"continual.{name} = {getattr(c, name)!r}: must be in [0, 1]")
        for name in ("ewc_lambda", "lwf_alpha", "generative_replay"):
            if getattr(c, name) < 0:
                raise TrainConfigError(f"continual.{name} = {getattr(c, name)!r}: must be >= 0 (0 = off)")
        for name in ("fisher_rows", "replay_examples", "replay_bytes"):
            if getattr(c, name) < 1:
                raise TrainConfigError(f"continual.{name} = {getattr(c, name)!r}: must be >= 1")
        if c.fisher not in ("empirical", "sampled"):
            raise TrainConfigError(f"continual.fisher = {c.fisher!r}: must be empirical or sampled")
        if c.freeze not in (None, "layer", "head", "expert", "weight"):
            raise TrainConfigError(f"continual.freeze = {c.freeze!r}: must be layer, head, expert, weight or None")
        if c.lwf_temperature <= 0:
            raise TrainConfigError(f"continual.lwf_temperature = {c.lwf_temperature!r}: must be > 0")
        if c.from_run and self.init_from is None:  # a continual run starts from the previous run's model
            root = Path(c.from_run)
            self.init_from = str(root) if (root / "tokenizer.json").is_file() else str(root / "final")  # model|run

    def _validate_data(self) -> None:
        d = self.data
        for name in ("arithmetic_examples", "tool_examples", "tokenizer_vocab", "tokenizer_chars", "max_files",
                     "max_chars"):
            value = getattr(d, name)
            if value is not None and value < 1:
                cap = ", or None for no cap" if name.startswith("max_") else ""
                raise TrainConfigError(f"data.{name} = {value!r}: must be >= 1{cap}")
        weights = [*d.mixture.values(), *d.arithmetic_kinds.values(), *d.tool_kinds.values()]
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise TrainConfigError(f"data: mixture and arithmetic_kinds weights must be numbers, got {weights}")
        if not d.mixture or any(w < 0 for w in d.mixture.values()) or sum(d.mixture.values()) <= 0:
            raise TrainConfigError(f"data.mixture = {d.mixture}: needs non-negative weights with a sum > 0")
        unknown = set(d.mixture) - {"stdlib", "arithmetic", "tools"}
        if unknown:
            raise TrainConfigError(f"data.mixture: unknown source(s) {sorted(unknown)}; known: arithmetic, stdlib, "
                                   "tools")
        from r1kit.train.data import ALL_KINDS, KINDS

        bad = set(d.arithmetic_kinds) - set(KINDS)
        if bad or not d.arithmetic_kinds:
            raise TrainConfigError(f"data.arithmetic_kinds: unknown kind(s) {sorted(bad)}; kinds: {list(KINDS)}")
        bad = set(d.tool_kinds) - set(ALL_KINDS)
        if bad or (d.mixture.get("tools", 0) > 0 and not d.tool_kinds):
            raise TrainConfigError(f"data.tool_kinds: unknown kind(s) {sorted(bad)} or none with mixture source "
                                   f"'tools'; kinds: {list(ALL_KINDS)}")
        if not 0 <= d.validation_fraction < 1:
            raise TrainConfigError(f"data.validation_fraction = {d.validation_fraction!r}: must be in [0, 1)")

    def _validate_augment(self) -> None:
        a = self.augment
        from r1kit.train.augment import AugmentError, check_augment

        try:
            check_augment(a)
        except AugmentError as e:
            raise TrainConfigError(f"augment.{e}") from None
        if (a.ops or a.translator) and not self.data.chat_jsonl:
            raise TrainConfigError("augment: applies to data.chat_jsonl, which is not set")

    def model_config(self) -> ModelConfig:
        try:
            return preset(self.model.preset, **self.model.overrides)
        except ValueError as e:
            raise TrainConfigError(f"model.overrides: {e}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.gradient_accumulation

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else -(-self.token_budget // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        return build_dataclass(cls, d, where)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML recipe; keyword overrides (top-level keys) win over the file."""
        return read_recipe(cls, path, overrides)


def read_yaml_mapping(path: str | Path, allow_empty: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML file; TrainConfigError naming the file if it is missing, unreadable, not a
    mapping, or (unless allow_empty) empty. The one reader of every r1kit YAML (recipes, fine-tune, safety)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: no such config file")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML ({e})") from None
    except UnicodeDecodeError:
        raise TrainConfigError(f"{path}: not a text file (not UTF-8)") from None
    if d is None or d == {}:
        if allow_empty:
            return {}
        raise TrainConfigError(f"{path}: the recipe is empty (no keys); see configs/*.yaml for a complete one")
    if not isinstance(d, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping of keys, got {type(d).__name__}")
    return d


def read_recipe(cls: type, path: str | Path, overrides: dict[str, Any]) -> Any:
    """Dataclass `cls` (TrainConfig, GRPOConfig, ...) from a YAML recipe, every key checked; `overrides`
    (top-level keys) win over the file."""
    return build_dataclass(cls, {**read_yaml_mapping(path), **overrides}, str(path))


def build_dataclass(cls: type, d: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a dict, checking every key and the basic type of every value."""
    if not isinstance(d, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(k) for k in set(d) - set(fields))  # YAML keys may be numbers
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, {} if value is None else value, f"{where}: {name}")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}: {name}")
    try:
        return cls(**kwargs)
    except TrainConfigError as e:
        raise TrainConfigError(f"{where}: {e}") from None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is list and isinstance(value, list):
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_check_type(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is Any:
        return value
    raise TrainConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
