"""`r1kit compress MODEL OUT --method M`: one table of methods, each with its options dataclass and its step.

Every method loads MODEL, changes it, and writes OUT as a checkpoint ``R1Model.from_pretrained(OUT)`` loads (and
the engine serves), with config.json's ``"compression"`` record: method, options, source model, what was done
(stats), and, for low-rank and clustered layers, the module structure the loader rebuilds. Options are checked
by TrainConfig's mechanism: a key a method does not take is an error naming it and listing the ones it takes.

Methods that train (qat-*, distill, and prune-* with max_steps > 0) fine-tune through r1kit.train.loop.train with
its `prepare` hook (the recipe `data`, default configs/nano-sft.yaml, starting from MODEL's weights), then finish
in the same call (QAT converts to the real int8/int4 modules; pruning keeps its zeros: masked gradients). With
`kd` (always for distill) the loop's objective is r1kit.train.distill's divergence to a frozen teacher, by default
the original model at the root of MODEL's compression chain: distill recovers a compressed MODEL in its own shapes
and structure (`model.from_init`), qat-* --kd is QAT that learns the original's outputs rather than the data.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1kit.checkpoint import load_model, read_config, save_model
from r1kit.compress import calibrated, lowrank, prune, structured
from r1kit.fileio import atomic_folder
from r1kit.model.transformer import Transformer
from r1kit.quant import quantize_model
from r1kit.quant.qat import convert_qat, prepare_qat
from r1kit.train.config import build_dataclass

log = logging.getLogger("r1kit.compress")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "nano-sft.yaml"
CALIBRATION_SEQ_LEN = 128  # GPTQ/AWQ: 32768 tokens = 256 sequences
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


class CompressError(ValueError):
    """A compression method or option is unknown or out of range, or the source cannot be compressed so."""


# ---------------------------------------------------------------------------------------------------- options


@dataclass
class NoOptions:
    """int8 (per output row), fp8 (e4m3, per row): nothing to choose."""


@dataclass
class Int4Options:
    group_size: int = 64  # inputs per scale/zero: 32, 64, 128, 256
    calibration: str | None = None  # None (round to nearest), "gptq" or "awq" (r1kit.compress.calibrated)
    calibration_tokens: int = 32768  # training-side tokens, in sequences of 128, that GPTQ/AWQ calibrate on

    def __post_init__(self) -> None:
        if self.calibration is not None and self.calibration not in calibrated.CALIBRATIONS:
            raise CompressError(f"calibration must be one of {', '.join(calibrated.CALIBRATIONS)}, "
                                f"got {self.calibration!r}")
        if self.calibration_tokens < 128:
            raise CompressError(f"calibration_tokens must be >= 128 (one sequence), got {self.calibration_tokens}")


@dataclass
class TrainOptions:
    """A short fine-tune through r1kit.train.loop (recipe `data`, from MODEL's weights)."""

    max_steps: int = 0
    learning_rate: float = 1e-4
    batch_size: int = 8
    seq_len: int = 256
    data: str | None = None  # a YAML recipe (default configs/nano-sft.yaml); its model must match MODEL
    work_dir: str | None = None  # where the fine-tune's run goes (default runs/compress/<OUT name>)
    precision: str = "fp32"  # the loop's autocast: fp32 (on CPUs without native bf16, ~4x faster) or bf16
    device: str = "cpu"  # where the fine-tune runs (cpu, cuda, ...); the result is saved from the CPU
    kd: bool = False  # train on the divergence to a teacher (r1kit.train.distill's loss), not the data's CE
    teacher: str | None = None  # kd's teacher (default: the original model: MODEL, or its compression source)
    beta: float = 0.0  # kd: 0 forward KL(teacher || student), 1 reverse KL, between: GKD's generalised JSD
    temperature: float = 1.0  # kd: both models' logits divided by it
    ce_weight: float = 0.0  # kd: plus this weight of the data's cross-entropy

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "seq_len"):
            if getattr(self, name) < (0 if name == "max_steps" else 1):
                raise CompressError(f"{name} must be {'>= 0' if name == 'max_steps' else '>= 1'}, "
                                    f"got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise CompressError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (0 <= self.beta <= 1 and self.temperature > 0 and self.ce_weight >= 0):
            raise CompressError(f"beta must be in [0, 1], temperature > 0 and ce_weight >= 0; got beta {self.beta}, "
                                f"temperature {self.temperature}, ce_weight {self.ce_weight}")
        if self.teacher is not None and not self.kd:
            raise CompressError(f"teacher {self.teacher!r} is only used with kd (--kd)")


@dataclass
class QATOptions(TrainOptions):
    max_steps: int = 100
    group_size: int = 64  # qat-int4 only


@dataclass
class DistillOptions(TrainOptions):
    """Recovery of a compressed MODEL by logit distillation from the original (always kd)."""

    max_steps: int = 100
    kd: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kd or not self.max_steps:
            raise CompressError(f"distill trains with kd for max_steps >= 1 steps; got kd {self.kd}, "
                                f"max_steps {self.max_steps}")


@dataclass
class PruneOptions(TrainOptions):
    sparsity: float = 0.5
    scope: str = "global"  # "global" (one magnitude cut over all the pruned weights) or "layer" (per tensor)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            prune.check_sparsity(self.sparsity)
        except ValueError as e:
            raise CompressError(str(e)) from None
        if self.scope not in ("global", "layer"):
            raise CompressError(f"scope must be 'global' or 'layer', got {self.scope!r}")


@dataclass
class TwoFourOptions(TrainOptions):
    pass


@dataclass
class StructuredOptions:
    heads: int | None = None  # attention heads kept per layer
    mlp_keep: float | None = None  # fraction of MLP / expert channels kept
    experts: int | None = None  # routed experts kept per MoE layer
    expert_score: str = "frequency"  # "frequency" or "norm" (routing weight x output norm)
    expert_reduce: str = "drop"  # "drop" the other experts, or "merge" them into the most similar kept ones
    calibration_tokens: int = 8192  # training-side tokens the experts are ranked on

    def __post_init__(self) -> None:
        if self.heads is None and self.mlp_keep is None and self.experts is None:
            raise CompressError("prune-structured needs at least one of heads, mlp_keep, experts")
        if self.expert_score not in ("frequency", "norm"):
            raise CompressError(f"expert_score must be 'frequency' or 'norm', got {self.expert_score!r}")
        if self.expert_reduce not in ("drop", "merge"):
            raise CompressError(f"expert_reduce must be 'drop' or 'merge', got {self.expert_reduce!r}")


@dataclass
class LowRankOptions:
    energy: float | None = None  # keep this fraction of sum s_i^2 (default 0.9 when neither rank nor target)
    rank: int | None = None  # one rank for every layer
    target: float | None = None  # factors take at most this fraction of each layer's numbers

    def __post_init__(self) -> None:
        given = [n for n in ("energy", "rank", "target") if getattr(self, n) is not None]
        if len(given) > 1:
            raise CompressError(f"give one of energy, rank, target, not {' and '.join(given)}")
        for name in ("energy", "target"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise CompressError(f"{name} must be in (0, 1), got {value}")
        if self.rank is not None and self.rank < 1:
            raise CompressError(f"rank must be >= 1, got {self.rank}")


@dataclass
class ClusterOptions:
    clusters: int = 16  # centroids per codebook (2..16; indices are 4-bit)
    group: int | None = None  # inputs per codebook (default: the whole row)
    iters: int = 15  # Lloyd iterations

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= 16:
            raise CompressError(f"clusters must be in [2, 16] (4-bit indices), got {self.clusters}")
        if self.group is not None and (self.group < 2 or self.group % 2):
            raise CompressError(f"group must be an even number of inputs >= 2, got {self.group}")
        if self.iters < 1:
            raise CompressError(f"iters must be >= 1, got {self.iters}")


# ---------------------------------------------------------------------------------------------------- methods


@dataclass
class Job:
    """What a method step sees: the source folder, its options, and where a fine-tune may write."""

    src: Path
    out: Path
    method: str
    options: Any


def _quantize(job: Job, model: Transformer) -> tuple[Transformer, dict]:
    group = getattr(job.options, "group_size", 64)
    if getattr(job.options, "calibration", None):
        ids = calibration_ids(job.src, job.options.calibration_tokens, seq_len=CALIBRATION_SEQ_LEN)
        return model, calibrated.calibrate_int4(model, job.options.calibration, group, ids)
    stats = quantize_model(model, job.method, group_size=group)
    return model, {"swapped": stats["swapped"], "weight_bytes_before": stats["weight_bytes_before"],
                   "weight_bytes_after": stats["weight_bytes_after"]}


def _qat(job: Job, _model: Transformer | None) -> tuple[Transformer, dict]:
    method = job.method.removeprefix("qat-")
    model, fit = finetune(job, lambda m: prepare_qat(m, method, job.options.group_size))
    stats = convert_qat(model)
    return model, {"swapped": stats["swapped"], "weight_bytes_after": stats["weight_bytes_after"], "finetune": fit}


def _prune(job: Job, model: Transformer | None) -> tuple[Transformer, dict]:
    def mask(m: Transformer) -> None:
        weights = prune.prunable(m)
        masks = (prune.two_four_masks(weights) if job.method == "prune-2:4"
                 else prune.magnitude_masks(weights, job.options.sparsity, job.options.scope))
        prune.apply_masks(weights, masks)
        prune.keep_masked(weights, masks)

    fit = None
    if job.options.max_steps:
        model, fit = finetune(job, mask)
    else:
        mask(model)
    weights = prune.prunable(model)
    stats: dict[str, Any] = {"sparsity": prune.sparsity_of(weights), "finetune": fit}
    if job.method == "prune-2:4":
        stats["two_four"] = all(prune.is_two_four(w) for w in weights.values())
    return model, stats


def _structured(job: Job, model: Transformer) -> tuple[Transformer, dict]:
    o = job.options
    ids = calibration_ids(job.src, o.calibration_tokens) if o.experts is not None else None
    return structured.prune_structured(model, o.heads, o.mlp_keep, o.experts, o.expert_score, ids, o.expert_reduce)


def _low_rank(job: Job, model: Transformer) -> tuple[Transformer, dict]:
    o = job.options
    energy = 0.9 if o.energy is None and o.rank is None and o.target is None else o.energy
    done = lowrank.low_rank(model, o.rank, energy, o.target)
    return model, {"layers": done, "structure": {"low_rank": {n: d["rank"] for n, d in done.items()}}}


def _cluster(job: Job, model: Transformer) -> tuple[Transformer, dict]:
    o = job.options
    done = lowrank.cluster(model, o.clusters, o.group, o.iters)
    return model, {"layers": done, "structure": {"cluster": {n: d["group"] for n, d in done.items()}}}


def _distill(job: Job, _model: Transformer | None) -> tuple[Transformer, dict]:
    """MODEL (compressed, in its own shapes and structure) fine-tuned on the divergence to the original; the
    zeros of an unstructured or 2:4 pruning stay zero (masked gradients)."""
    previous = read_config(job.src).extra["hf_config"].get("compression")
    if previous is None and job.options.teacher is None:
        raise CompressError(f"{job.src} is not compressed, so it has no original to learn from: distill recovers a "
                            "compressed model (r1kit compress ... OUT, then distill OUT); or name a --teacher")
    chain = methods_of(previous)
    masked = [n for n in chain if n in ("prune-unstructured", "prune-2:4")]

    def keep_zeros(m: Transformer) -> None:
        if masked:
            weights = prune.prunable(m)
            prune.keep_masked(weights, {n: w.detach() != 0 for n, w in weights.items()})

    model, fit = finetune(job, keep_zeros, from_init=True)
    stats: dict[str, Any] = {"chain": [*reversed(chain), "distill"], "finetune": fit,
                             "structure": (previous or {}).get("structure")}
    if masked:
        weights = prune.prunable(model)
        stats["sparsity"] = prune.sparsity_of(weights)
        if "prune-2:4" in masked:
            stats["two_four"] = all(prune.is_two_four(w) for w in weights.values())
    return model, stats


Step = Callable[[Job, Any], tuple[Transformer, dict]]
# name -> (options dataclass, step, whether the step loads MODEL itself (fine-tunes do))
METHODS: dict[str, tuple[type, Step, bool]] = {
    "int8": (NoOptions, _quantize, False),
    "int4": (Int4Options, _quantize, False),
    "fp8": (NoOptions, _quantize, False),
    "qat-int8": (QATOptions, _qat, True),
    "qat-int4": (QATOptions, _qat, True),
    "prune-unstructured": (PruneOptions, _prune, False),
    "prune-2:4": (TwoFourOptions, _prune, False),
    "prune-structured": (StructuredOptions, _structured, False),
    "low-rank": (LowRankOptions, _low_rank, False),
    "cluster": (ClusterOptions, _cluster, False),
    "distill": (DistillOptions, _distill, True),
}
QUANT_METHODS = ("int8", "int4", "fp8")
# methods whose output is a plain checkpoint that another method may compress further (e.g. prune, then int4)
CHAINABLE = ("prune-unstructured", "prune-2:4", "prune-structured")


def parse_options(method: str, options: dict[str, Any]) -> Any:
    """The method's options dataclass from a dict; unknown methods and keys are errors that list the known ones."""
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    cls = METHODS[method][0]
    try:
        return build_dataclass(cls, options, f"--method {method} options")
    except CompressError as e:
        raise CompressError(f"--method {method}: {e}") from None
    except ValueError as e:
        raise CompressError(str(e)) from None


def option_types() -> dict[str, type]:
    """Every option any method takes -> its basic type (int, float, str): the flags of `r1kit compress`."""
    import typing

    out: dict[str, type] = {}
    for cls, _, _ in METHODS.values():
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            out[name] = args[0] if args else hint
    return out


# ---------------------------------------------------------------------------------------------------- helpers


def calibration_ids(src: Path, tokens: int, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """(B, seq_len) token ids from the training side: standard-library code and arithmetic conversations."""
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.data import KINDS, chat_example, read_texts, sample_problem, split_files, stdlib_files

    tok = Tokenizer.from_dir(src)
    train_files, _ = split_files(stdlib_files())
    random.Random(seed).shuffle(train_files)
    ids: list[int] = []
    for text in read_texts(train_files[:40], tokens * 3):
        ids += tok.encode(text)
    rng = random.Random(seed)
    while len(ids) < 2 * tokens:
        ids += chat_example(sample_problem(rng, rng.choice(list(KINDS))), tok)[0]
    half = tokens // 2 // seq_len * seq_len  # half code, half arithmetic
    code, arith = ids[:half], ids[-half:]
    return torch.tensor(code + arith).view(-1, seq_len)


def methods_of(record: dict[str, Any] | None) -> list[str]:
    """The methods of a compression record's chain, the latest first (e.g. ["distill", "prune-structured"])."""
    out = []
    while record is not None:
        out.append(record.get("method"))
        record = record.get("previous")
    return out


def original_model(src: Path) -> Path:
    """The uncompressed model `src` was made from: the source of the first record of its compression chain."""
    record = read_config(src).extra["hf_config"].get("compression")
    while record is not None:
        src, record = Path(record["source"]), record.get("previous")
    return src


def kd_objective(job: Job, device: str) -> tuple[Any, Path]:
    """The loop's objective for options.kd: r1kit.train.distill's LogitDistillation with the frozen teacher
    (options.teacher, else MODEL's original), whose tokenizer must be MODEL's; returns it and the teacher's path."""
    from r1kit.api import resolve_model_path
    from r1kit.tokenizer import Tokenizer
    from r1kit.train.distill import LogitDistillation, LossSection, check_same_tokenizer, load_teacher

    o = job.options
    path = resolve_model_path(o.teacher) if o.teacher else original_model(job.src)
    check_same_tokenizer(Tokenizer.from_dir(path), Tokenizer.from_dir(job.src), f"teacher {path}", str(job.src))
    teacher = load_teacher(path, read_config(job.src).vocab_size, torch.device(device))
    loss = LossSection(beta=o.beta, temperature=o.temperature, lmbda=0.0, kd_weight=1.0, ce_weight=o.ce_weight)
    return LogitDistillation(teacher, loss), path


def finetune(job: Job, prepare: Callable[[Transformer], None], from_init: bool = False) -> tuple[Transformer, dict]:
    """Fine-tune MODEL for options.max_steps through r1kit.train.loop.train, `prepare` applied to the model
    before the optimizer is built; returns the trained model (eval mode) and the loop's summary. `from_init`:
    the model is MODEL in its own architecture (compressed shapes and structure), not the recipe's; options.kd:
    the loss is the divergence to the teacher (kd_objective), not the cross-entropy, and the recipe's MTP loss and
    expert re-balancing are off (the routing bias stays the teacher's: balancing on the training data's loads moved
    nano's arithmetic experts)."""
    from r1kit.train.config import TrainConfig
    from r1kit.train.loop import train

    o = job.options
    work = Path(o.work_dir or Path("runs") / "compress" / job.out.name)
    if work.exists():
        shutil.rmtree(work)
    recipe = Path(o.data) if o.data else DEFAULT_RECIPE
    cfg = TrainConfig.from_yaml(
        recipe, init_from=str(job.src), out_dir=str(work), max_steps=o.max_steps, token_budget=None,
        learning_rate=o.learning_rate, warmup_steps=min(10, o.max_steps), batch_size=o.batch_size,
        seq_len=o.seq_len, eval_interval=o.max_steps, checkpoint_interval=o.max_steps,
        log_interval=max(1, o.max_steps // 10), threads=torch.get_num_threads(), precision=o.precision,
        **({"mtp_loss_weight": 0.0, "moe_balance_rate": 0.0} if o.kd else {}))
    cfg.model.from_init = from_init
    objective, teacher = kd_objective(job, o.device) if o.kd else (None, None)
    cfg.data.arithmetic_examples = min(cfg.data.arithmetic_examples, 20_000)  # a short run needs little data
    cfg.data.max_chars = min(cfg.data.max_chars or 1_000_000, 1_000_000)
    held: list[Transformer] = []

    def hook(model: Transformer) -> None:
        prepare(model)
        held.append(model)

    summary = train(cfg, progress=True, device=o.device, prepare=hook, objective=objective)
    fit = {k: summary[k] for k in ("steps", "tokens", "elapsed_s")}
    return held[0].cpu().eval(), fit if teacher is None else {**fit, "teacher": str(teacher)}


def _check_source(src: Path, method: str) -> dict[str, Any]:
    """The source's config.json; refuses sources this method cannot compress (already quantized, compressed)."""
    hf = read_config(src).extra["hf_config"]
    previous = hf.get("compression")
    if (hf.get("quantization_config") or {}).get("quant_method") == "r1kit":
        if method == "distill":
            raise CompressError(f"{src} is quantized ({hf['quantization_config'].get('method')}): distill trains "
                                "float weights; recover a quantized model with --method qat-int4 --kd (or qat-int8) "
                                "from the original, or distill before quantizing")
        raise CompressError(f"{src} is already quantized ({hf['quantization_config'].get('method')}); "
                            "compress the original model")
    if previous is not None and method != "distill":  # distill may follow any method
        done = previous.get("method")
        plain = done in CHAINABLE or (done == "distill" and not previous.get("structure"))  # no low-rank, cluster
        if not plain or method not in QUANT_METHODS:
            raise CompressError(f"{src} is already compressed ({done}); only {', '.join(QUANT_METHODS)} may follow "
                                f"{', '.join(CHAINABLE)} (or a distill of them): compress the original model")
    return hf


def compress(src: str | Path, out: str | Path, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compress checkpoint `src` with `method` into the new folder `out`; returns the compression record."""
    from r1kit.api import resolve_model_path

    opts = parse_options(method, options or {})
    src, out = resolve_model_path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"{out} already exists and is not an empty folder; choose a new OUT")
    hf = _check_source(src, method)
    stored = getattr(torch, str(hf.get("torch_dtype", "float32")), torch.float32)
    stored = stored if stored in (torch.float32, torch.bfloat16) else torch.float32
    _, step, trains = METHODS[method]
    job = Job(src, out, method, opts)
    model = None if trains or getattr(opts, "max_steps", 0) else load_model(src, "cpu", torch.float32)
    model, stats = step(job, model)
    record = {"method": method, "options": dataclasses.asdict(opts), "source": str(src),
              "structure": stats.pop("structure", None), "stats": stats}
    if hf.get("compression") is not None:
        record["previous"] = hf["compression"]
    model.config.extra.setdefault("hf_config", {})["compression"] = record
    with atomic_folder(out) as tmp:  # written whole, then renamed: never half a checkpoint
        save_model(model, tmp, dtype=stored)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return record
