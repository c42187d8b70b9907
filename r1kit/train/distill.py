"""Distillation of a teacher into a student: sequence-level (the R1-Distill recipe) and logit-level (GKD).

    distill(DistillConfig.from_yaml("configs/distill-nano.yaml"))     # or: r1kit distill --config ... [--resume]

1. Traces: the teacher (r1kit's engine, batched) answers `traces.prompts` training problems (never held-out
   ones); only verified completions are kept (r1kit.train.traces), written as chat JSONL (`traces.jsonl`).
   Without a teacher (`teacher: null`) the problems' own reference traces are written instead: the baseline
   student, trained on the same prompts without the teacher.
2. The student trains on them, packed as r1kit.train.chat_data packs any chat JSONL, with
   ``loss = kd_weight * D(teacher || student) + ce_weight * CE(traces)``. D is GKD's generalised Jensen-Shannon
   divergence with `beta` (0: forward KL, 1: reverse KL) at `temperature`; with probability `lmbda` a
   micro-batch is on-policy: the student samples completions of training prompts and the teacher scores them
   (CE does not apply there). Names and defaults are TRL's GKDConfig's (beta 0.5, temperature 0.9, lmbda 0.5).

The student may have another architecture than the teacher (a dense Qwen2 from a DeepSeek-V3 MoE), but the
tokenizers must be identical: the divergence compares distributions id by id (checked, a clear error
otherwise). Optimizer, schedule, checkpoints (atomic, resumable), validation and the final save are the
training loop's (r1kit.train.loop); metrics go to metrics.jsonl, the loss curve to final/loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer
from r1kit.train.config import DataSection, TrainConfig, TrainConfigError, read_recipe
from r1kit.train.traces import TraceSection

log = logging.getLogger("r1kit")


class DistillError(ValueError):
    """Distillation cannot run as configured (tokenizer mismatch, vocabulary sizes, a changed recipe on resume)."""


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class LossSection:
    """The distillation loss; names and defaults as TRL's GKDConfig."""

    beta: float = 0.5  # generalised JSD interpolation: 0 = forward KL(teacher || student), 1 = reverse KL
    temperature: float = 0.9  # both models' logits are divided by it (and on-policy sampling uses it)
    lmbda: float = 0.5  # fraction of micro-batches on student-generated completions (on-policy)
    kd_weight: float = 1.0  # weight of the divergence to the teacher
    ce_weight: float = 0.0  # weight of the cross-entropy on the trace tokens (sequence-level SFT)


@dataclass
class DistillConfig:
    teacher: str | None = "r1kit/nano"  # a model folder or r1kit/<bundled>; None: no teacher (the baseline)
    tokenizer: str | None = None  # without a teacher: the tokenizer's folder; with one: must equal the teacher's
    traces: TraceSection = field(default_factory=TraceSection)
    loss: LossSection = field(default_factory=LossSection)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(data=DataSection(mixture={"arithmetic": 1.0})))
    # the student's recipe as `r1kit train` reads it; data.arithmetic_kinds weighs the problems of the traces

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, value: Any, why: str) -> None:
            if not ok:
                raise TrainConfigError(f"{name} = {value!r}: {why}")

        lo, tr = self.loss, self.traces
        need(0 <= lo.beta <= 1, "loss.beta", lo.beta, "must be in [0, 1] (0 forward KL, 1 reverse KL)")
        need(lo.temperature > 0, "loss.temperature", lo.temperature, "must be > 0")
        need(0 <= lo.lmbda <= 1, "loss.lmbda", lo.lmbda, "must be in [0, 1]")
        need(lo.kd_weight >= 0 and lo.ce_weight >= 0 and lo.kd_weight + lo.ce_weight > 0, "loss.kd_weight",
             lo.kd_weight, f"kd_weight and ce_weight ({lo.ce_weight}) must be >= 0 with a sum > 0")
        for name in ("prompts", "samples", "max_new_tokens", "batch_size"):
            need(getattr(tr, name) >= 1, f"traces.{name}", getattr(tr, name), "must be >= 1")
        need(tr.temperature >= 0, "traces.temperature", tr.temperature, "must be >= 0 (0: greedy)")
        need(0 < tr.top_p <= 1, "traces.top_p", tr.top_p, "must be in (0, 1]")
        if self.teacher is None:
            need(lo.kd_weight == 0 and lo.lmbda == 0, "loss.kd_weight", lo.kd_weight,
                 f"teacher is null, so there is no divergence to weigh: set kd_weight and lmbda ({lo.lmbda}) to 0")
            need(self.tokenizer is not None or self.student.init_from is not None, "tokenizer", self.tokenizer,
                 "teacher is null: name the tokenizer's folder (tokenizer: DIR) or start from student.init_from")
        mixture = self.student.data.mixture
        need(set(mixture) == {"arithmetic"}, "student.data.mixture", mixture,
             "distillation trains on arithmetic traces only: use {arithmetic: 1.0} (data.arithmetic_kinds picks "
             "the problems)")
        need(self.student.data.chat_jsonl is None, "student.data.chat_jsonl", self.student.data.chat_jsonl,
             "distillation writes its own traces.jsonl; leave it unset")

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "tokenizer": self.tokenizer, "traces": dataclasses.asdict(self.traces),
                "loss": dataclasses.asdict(self.loss), "student": self.student.to_dict()}

    @classmethod
    def from_yaml(cls, path: str | Path, out_dir: str | None = None, max_steps: int | None = None) -> DistillConfig:
        """Read a distillation recipe (every key checked, as TrainConfig's); `out_dir` and `max_steps` override the
        student's (max_steps replaces a token_budget)."""
        cfg = read_recipe(cls, path, {})
        if out_dir is not None:
            cfg.student.out_dir = out_dir
        if max_steps is not None:
            cfg.student.max_steps, cfg.student.token_budget = max_steps, None
            cfg.student.validate()
        return cfg


# ---------------------------------------------------------------------------------------------------- divergences


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) values over the positions where mask (B, T) is set."""
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V), fp32


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape or mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"divergence: student logits {tuple(student_logits.shape)}, teacher logits "
                         f"{tuple(teacher_logits.shape)} and mask {tuple(mask.shape)} must be (B, T, V), (B, T, V) "
                         f"and (B, T)")


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) = sum_v p_t (log p_t - log p_s) per position, averaged over the masked positions.
    Logits (B, T, V), mask (B, T); both distributions at `temperature`."""
    _check_shapes(student_logits, teacher_logits, mask)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    return _masked_mean((t.exp() * (t - s)).sum(-1), mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher), as forward_kl with the roles swapped (mode-seeking)."""
    return forward_kl(teacher_logits, student_logits, mask, temperature)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024; TRL's generalized_jsd_loss):
    beta * KL(T || M) + (1 - beta) * KL(S || M) with M = beta * T + (1 - beta) * S, per position, averaged over
    the masked positions. beta = 0 is forward_kl and beta = 1 reverse_kl (as TRL defines the end points; the
    mixture formula itself vanishes there, divided by beta resp. 1 - beta it tends to them)."""
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    _check_shapes(student_logits, teacher_logits, mask)
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    m = torch.logsumexp(torch.stack([s + torch.tensor(1 - beta).log(), t + torch.tensor(beta).log()]), dim=0)
    kl_t = (t.exp() * (t - m)).sum(-1)  # (B, T)
    kl_s = (s.exp() * (s - m)).sum(-1)
    return _masked_mean(beta * kl_t + (1 - beta) * kl_s, mask)


# ---------------------------------------------------------------------------------------------------- models


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    """DistillError unless `a` and `b` map every token to the same id and share bos/eos/pad."""
    va, vb = a._backend.get_vocab(with_added_tokens=True), b._backend.get_vocab(with_added_tokens=True)
    specials = [(f, getattr(a, f), getattr(b, f)) for f in ("bos_token", "eos_token", "pad_token")]
    if va == vb and all(x == y for _, x, y in specials):
        return
    why = [f"{f} {x!r} vs {y!r}" for f, x, y in specials if x != y]
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:1]
        example = f"; e.g. {diff[0][0]!r}: id {va.get(diff[0][0])} vs {vb.get(diff[0][0])}" if diff else ""
        why.insert(0, f"vocabularies of {len(va)} and {len(vb)} tokens differ{example}")
    raise DistillError(f"the tokenizers of {a_name} and {b_name} differ ({'; '.join(why)}): distillation compares "
                       "the two models' next-token distributions id by id, so the student must use the teacher's "
                       "tokenizer")


def load_tokenizer(cfg: DistillConfig) -> tuple[Tokenizer, Path | None]:
    """The one tokenizer of the run (the teacher's) and the teacher's folder; every other named tokenizer
    (tokenizer:, student.init_from) must be identical to it."""
    from r1kit.api import resolve_model_path

    teacher = resolve_model_path(cfg.teacher) if cfg.teacher is not None else None
    named = [(str(p), resolve_model_path(p)) for p in (cfg.teacher, cfg.tokenizer, cfg.student.init_from) if p]
    first_name, first = named[0]
    tok = Tokenizer.from_dir(first)
    for name, path in named[1:]:
        check_same_tokenizer(tok, Tokenizer.from_dir(path), first_name, name)
    return tok, teacher


def load_teacher(path: Path, vocab_size: int, device: torch.device) -> Transformer:
    """The frozen teacher (fp32 master weights, eval mode, no gradients); its vocabulary must be the student's."""
    from r1kit.checkpoint import load_model

    teacher = load_model(path, device, torch.float32)
    if teacher.config.vocab_size != vocab_size:
        raise DistillError(f"teacher {path}: vocab_size {teacher.config.vocab_size}, the student's is {vocab_size}; "
                           "the logits must cover the same ids")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


# ---------------------------------------------------------------------------------------------------- data


def prepare_traces(cfg: DistillConfig, out: Path, teacher: Transformer | None, tok: Tokenizer,
                   progress: bool) -> Path:
    """out/traces.jsonl for this recipe: reused when out/traces.json says it was made by the same recipe, else
    written (by the teacher, verified; or the reference traces without a teacher). Returns its path."""
    from r1kit.train import traces as tr

    file, stamp_file = out / "traces.jsonl", out / "traces.json"
    d = cfg.student.data
    recipe = {"teacher": cfg.teacher, "traces": dataclasses.asdict(cfg.traces), "kinds": d.arithmetic_kinds,
              "seed": cfg.student.seed}
    if file.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()).get("recipe") == recipe:
        return file
    prompts = tr.training_prompts(d.arithmetic_kinds, cfg.traces.prompts, cfg.student.seed)
    if teacher is None:
        records = tr.reference_traces(prompts)
        stats = tr.trace_stats(prompts, records, 0, 0.0)
    else:
        from r1kit.api import R1Model

        records, stats = tr.teacher_traces(R1Model(teacher, tok), prompts, cfg.traces, progress)
    if not records:
        raise DistillError(f"the teacher {cfg.teacher} got none of the {len(prompts)} training problems right: "
                           "no verified trace to train on")
    tr.write_traces(records, file)
    stamp_file.write_text(json.dumps({"recipe": recipe, "stats": stats}, indent=2))
    log.info("traces: %s", stats)
    return file


def build_batches(cfg: DistillConfig, traces: Path, tok: Tokenizer) -> tuple[Any, list[tuple[torch.Tensor, ...]],
                                                                             list[list[int]]]:
    """Training batches of the traces (packed as chat_data packs), fixed validation batches of held-out
    problems' reference traces (the same for every run, so runs compare), and the training prompts' ids."""
    from r1kit.train import traces as tr
    from r1kit.train.chat_data import PackedBatches, encode_record, read_chat_jsonl

    s = cfg.student
    examples = read_chat_jsonl(traces, tok, s.seq_len + 1, skip_invalid=True).examples  # too long: skipped, logged
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    train = PackedBatches(examples, s.seq_len, s.batch_size, s.seed, pad)
    n_val = max(1, s.eval_batches * s.batch_size // max(1, len(s.data.arithmetic_kinds)))
    held = [encode_record(r, tok, 1 << 30) for r in
            tr.reference_traces(tr.heldout_prompts(list(s.data.arithmetic_kinds), n_val, s.seed + 1))]
    val = PackedBatches([e for e in held if len(e.ids) <= s.seq_len + 1], s.seq_len, s.batch_size, s.seed + 1, pad,
                        shuffle=False)
    val_batches = [val.next_batch() for _ in range(s.eval_batches)]
    prompts = [e.ids[:e.loss_mask.index(1)] for e in examples]  # each conversation up to its first target
    return train, val_batches, prompts


@torch.no_grad()
def student_samples(student: Transformer, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                    stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """On-policy rows: the student's own completions of `prompts` (sampled at `temperature`), right-padded.
    Returns (x, y, mask, None): mask is 1 where y is a generated token."""
    from r1kit.generate import SamplingParams, generate_tokens

    was_training = student.training
    student.eval()
    outs: list[list[int]] = [[] for _ in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
    for step in generate_tokens(student, prompts, params, stop_ids):
        for row, token in enumerate(step):
            if token is not None:
                outs[row].append(token)
    student.train(was_training)
    rows = [p + o for p, o in zip(prompts, outs, strict=True)]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y, mask = x.clone(), torch.zeros(len(rows), T)
    for b, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        n = len(row) - 1
        x[b, :n], y[b, :n] = torch.tensor(row[:-1]), torch.tensor(row[1:])
        mask[b, len(prompt) - 1:n] = 1.0  # targets from the first generated token on
    return x, y, mask, None


def on_policy(cfg: DistillConfig, step: int, micro: int) -> bool:
    """Whether micro-batch `micro` of step `step` is on-policy: a pure function of (seed, step, micro), so a
    resumed run draws the same."""
    return cfg.loss.lmbda > 0 and random.Random(f"{cfg.student.seed}:{step}:{micro}").random() < cfg.loss.lmbda


def step_prompts(prompts: list[list[int]], cfg: DistillConfig, step: int, micro: int) -> list[list[int]]:
    """The training prompts an on-policy micro-batch completes (a pure function of seed, step and micro)."""
    rng = random.Random(f"{cfg.student.seed}:prompts:{step}:{micro}")
    return rng.sample(prompts, min(cfg.student.batch_size, len(prompts)))


# ---------------------------------------------------------------------------------------------------- one step


@dataclass
class DistillStep:
    """What one optimizer step measured (means over its micro-batches)."""

    loss: float
    kd_loss: float
    ce_loss: float
    on_policy: float  # fraction of its micro-batches that were on-policy
    grad_norm: float
    tokens: int
    seconds: float


def micro_losses(student: Transformer, teacher: Transformer | None, batch: tuple[Any, ...], cfg: DistillConfig,
                 on: bool, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """(total loss, kd, ce) of one micro-batch (x, y, mask, doc_ids): the divergence to the teacher on the
    masked positions, plus the cross-entropy of the trace tokens off-policy."""
    from r1kit.train.loop import autocast

    lo = cfg.loss
    x, y, mask, doc = (t.to(device) if t is not None else None for t in batch)
    with autocast(cfg.student.precision, device):
        logits = student(x, doc_ids=doc)  # (B, T, V)
        teacher_logits = None
        if teacher is not None and lo.kd_weight:
            with torch.no_grad():
                teacher_logits = teacher(x, doc_ids=doc)
        return distillation_loss(logits, teacher_logits, y, mask, lo, with_ce=not on)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, y: torch.Tensor, mask: torch.Tensor,
                      lo: LossSection, with_ce: bool = True) -> tuple[torch.Tensor, float, float]:
    """(total loss, kd, ce): kd_weight * generalized_jsd(student || teacher) on the masked positions (when there
    are teacher logits) + ce_weight * the cross-entropy of the targets y (with `with_ce`). Logits (B, T, V),
    y and mask (B, T)."""
    from r1kit.train.loop import masked_ce

    total, kd, ce = logits.new_zeros(()).float(), 0.0, 0.0
    if teacher_logits is not None and lo.kd_weight:
        div = generalized_jsd(logits, teacher_logits, mask, lo.beta, lo.temperature)
        total, kd = total + lo.kd_weight * div, float(div.detach())
    if lo.ce_weight and with_ce:
        loss = masked_ce(logits, y, mask)
        total, ce = total + lo.ce_weight * loss, float(loss.detach())
    return total, kd, ce


@dataclass
class LogitDistillation:
    """The off-policy logit distillation that r1kit.train.loop.train takes as its `objective`: each step's main
    loss becomes distillation_loss against the frozen `teacher`'s logits on the same tokens (the loop's own
    data). r1kit.compress trains compressed students with it (`--method distill`, `qat-* --kd`)."""

    teacher: Transformer
    loss: LossSection

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                 doc_ids: torch.Tensor | None) -> torch.Tensor:
        """logits (B, T, V) of the student on x (B, T) -> the scalar loss."""
        with torch.no_grad():
            teacher_logits = self.teacher(x, doc_ids=doc_ids)
        return distillation_loss(logits, teacher_logits, y, mask, self.loss)[0]


def distill_step(student: Transformer, teacher: Transformer | None, opt: torch.optim.Optimizer, data: Any,
                 prompts: list[list[int]], cfg: DistillConfig, step: int, lr: float, device: torch.device,
                 stop_ids: list[int], pad_id: int) -> DistillStep:
    """One optimizer step over gradient_accumulation micro-batches (each off- or on-policy), then clipping,
    AdamW at `lr` and, for a MoE student, the experts' bias balancing (as r1kit.train.loop.run_step)."""
    from r1kit.train.loop import balance_experts, moe_layers

    s = cfg.student
    for group in opt.param_groups:
        group["lr"] = lr
    layers = moe_layers(student)
    loads = [torch.zeros(m.experts.n_experts, dtype=torch.long) for m in layers]
    sums, n_on, tokens, t0 = [0.0, 0.0, 0.0], 0, 0, time.perf_counter()
    for micro in range(s.gradient_accumulation):
        on = on_policy(cfg, step, micro)
        batch = (student_samples(student, step_prompts(prompts, cfg, step, micro), cfg.loss.temperature,
                                 cfg.traces.max_new_tokens, stop_ids, pad_id) if on else data.next_batch())
        total, kd, ce = micro_losses(student, teacher, batch, cfg, on, device)
        (total / s.gradient_accumulation).backward()
        for i, value in enumerate((float(total.detach()), kd, ce)):
            sums[i] += value / s.gradient_accumulation
        for i, m in enumerate(layers):
            loads[i] += m.load.cpu()
        n_on, tokens = n_on + on, tokens + batch[0].numel()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip or float("inf")))
    opt.step()
    opt.zero_grad(set_to_none=True)
    balance_experts(layers, loads, s.moe_balance_rate)
    return DistillStep(*sums, n_on / s.gradient_accumulation, grad_norm, tokens, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- the run


def _check_same_distillation(out: Path, cfg: DistillConfig, resume: bool) -> None:
    """Write out/distill.json; a resumed run must have the teacher, tokenizer, traces and loss it started with
    (the student's recipe is checked by the training loop's open_run_dir)."""
    file = out / "distill.json"
    now = cfg.to_dict()
    if resume and file.is_file():
        saved = json.loads(file.read_text())
        changed = sorted(k for k in ("teacher", "tokenizer", "traces", "loss") if saved.get(k) != now[k])
        if changed:
            raise DistillError(f"{out}: cannot resume: the distillation differs from the checkpointed run in "
                               f"{changed}; use the original recipe (or start a new run in another out_dir)")
    file.write_text(json.dumps(now, indent=2))


def _log_step(file: Any, step: int, run: Any, r: DistillStep, lr: float) -> None:
    record = {"step": step, "loss": r.loss, "kd_loss": r.kd_loss, "ce_loss": r.ce_loss, "on_policy": r.on_policy,
              "lr": lr, "tokens": run.tokens, "grad_norm": r.grad_norm, "tok_s": r.tokens / max(r.seconds, 1e-9),
              "elapsed_s": run.elapsed}
    file.write(json.dumps(record) + "\n")
    file.flush()


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, device: str | torch.device = "cpu",
            stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) a distillation recipe; returns a summary. `stop_after` ends early after that many steps."""
    from r1kit.hardware import choose
    from r1kit.train import loop

    s = cfg.student
    out = Path(s.out_dir)
    state = loop.open_run_dir(out, s, resume)
    _check_same_distillation(out, cfg, resume)
    if s.threads:
        torch.set_num_threads(s.threads)
    device = choose(device, "fp32").device
    torch.manual_seed(s.seed)
    tok, teacher_path = load_tokenizer(cfg)
    teacher = load_teacher(teacher_path, tok.vocab_size, device) if teacher_path is not None else None
    traces = prepare_traces(cfg, out, teacher, tok, progress)
    if not cfg.loss.kd_weight:
        teacher = None  # sequence-level only: the teacher's job ended with the traces
    data, val_batches, prompts = build_batches(cfg, traces, tok)
    student = loop.build_model(s, tok.vocab_size, tok.bos_id, tok.eos_id, device)
    if s.init_from and state is None:
        loop.load_initial_weights(student, s.init_from, device)
    opt = loop.make_optimizer(student, s)
    run = loop.restore_run(state, out, student, opt, data)
    stop_ids = sorted(set(tok.stop_ids))
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    total = s.total_steps
    end = total if stop_after is None else min(total, run.step + stop_after)
    bar = loop.progress_bar(progress, total, run.step)
    student.train()
    with open(out / "metrics.jsonl", "a") as file:
        while run.step < end:
            lr = loop.lr_at(run.step, s)
            r = distill_step(student, teacher, opt, data, prompts, cfg, run.step, lr, device, stop_ids, pad)
            run.step, run.tokens, run.elapsed = run.step + 1, run.tokens + r.tokens, run.elapsed + r.seconds
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{r.loss:.3f}", kd=f"{r.kd_loss:.3f}", ce=f"{r.ce_loss:.3f}")
            if run.step % s.log_interval == 0 or run.step == end:
                _log_step(file, run.step, run, r, lr)
            if run.step % s.eval_interval == 0 or run.step == total:
                val = loop.evaluate(student, val_batches, s.precision)
                file.write(json.dumps({"step": run.step, "val_loss": val, "tokens": run.tokens}) + "\n")
                file.flush()
                if bar is not None:
                    bar.write(f"step {run.step}: val_loss {val:.4f}")
            if run.step % s.checkpoint_interval == 0 or run.step == end:
                loop.save_training_checkpoint(out, s, student, opt, data, run.step, run.tokens, run.elapsed)
    if bar is not None:
        bar.close()
    summary = {"steps": run.step, "tokens": run.tokens, "train_seconds": round(run.elapsed, 1),
               "trace_seconds": json.loads((out / "traces.json").read_text())["stats"].get("seconds"),  # on resume too
               "traces": str(traces)}
    if run.step == total:
        summary.update(loop.finalize(out, student, tok, s))
        pin_fast_tokenizer(out / "final")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def pin_fast_tokenizer(folder: Path) -> None:
    """Make transformers' AutoTokenizer load folder/tokenizer.json as it is.

    transformers 5 ignores tokenizer_config.json's ``tokenizer_class`` for some model types (qwen2 among them:
    MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) and builds Qwen2Tokenizer, whose own normalizer and pre-tokenizer
    split text differently from the teacher's tokenizer. An ``auto_map`` naming PreTrainedTokenizerFast skips that
    override (no remote code runs: the class is transformers' own), so the student encodes as r1kit does. Only
    for qwen2 students: elsewhere an auto_map is not needed.
    """
    if json.loads((folder / "config.json").read_text()).get("model_type") != "qwen2":
        return  # other model types keep tokenizer_config.json's tokenizer_class
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, "PreTrainedTokenizerFast"]}
    file.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
