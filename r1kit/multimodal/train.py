"""Staged training of a vision-audio-language model, as LLaVA does, from a YAML recipe:

    r1kit train-vl --config configs/nano-vl.yaml [--resume]

Stage "vision" (match_weight): each training image's pooled embedding against the 10 digit captions' with
cross-entropy (CLIP's zero-shot classifier as a loss), many images per step, the language model frozen. Stage
"align": the CLIP contrastive loss between pooled media embeddings (image, audio) and their captions'
text embeddings, plus captioning (the language model writes the caption after the placeholders). Stage
"instruct": mixed chat (image, audio, image + audio, text-only questions) with the loss on the assistant turns.
Each stage names what trains (encoders, projectors, gate, contrastive, lm). The loop's pieces are the text
loop's (lr_at, masked_ce, atomic checkpoints, metrics.jsonl and its PNG); a killed run resumes from its last
checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1kit.checkpoint import save_model
from r1kit.fileio import atomic_write
from r1kit.model.transformer import Transformer
from r1kit.multimodal import data as D
from r1kit.multimodal.config import MultimodalConfig
from r1kit.multimodal.model import Media, VisionAudioLM
from r1kit.multimodal.prompt import PLACEHOLDER_TOKENS, add_media_tokens, insert_placeholders, placeholder_ids
from r1kit.tokenizer import DEEPSEEK_SPECIAL_TOKENS, Tokenizer, train_bpe_tokenizer
from r1kit.train.chat_data import encode_conversation
from r1kit.train.config import ModelSection, TrainConfig, TrainConfigError, build_dataclass, read_yaml_mapping
from r1kit.train.loop import latest_usable_checkpoint, load_training_checkpoint, lr_at, masked_ce
from r1kit.train.plots import plot_metrics

log = logging.getLogger("r1kit")
PARTS = ("encoders", "projectors", "gate", "contrastive", "lm")  # also "encoders.image", "projectors.audio", ...
MEDIA_PARTS = tuple(f"{p}.{k}" for p in ("encoders", "projectors") for k in ("image", "audio"))
AUGMENTATIONS = ("shift", "affine")  # data.augment_images, data.jitter_images
CHAT_MIX = {"image": 0.4, "audio": 0.35, "same": 0.15, "text": 0.1}


@dataclass
class StageSection:
    """One training stage; the schedule fields mean what they mean in TrainConfig (r1kit.train.loop.lr_at)."""

    name: str = "align"
    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0  # AdamW's
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"
    contrastive_weight: float = 1.0
    caption_weight: float = 1.0
    chat_weight: float = 0.0
    train: list[str] = field(default_factory=lambda: list(PARTS))
    # the chat examples' kinds and their shares: image / audio questions, image + audio "same digit?", text only
    chat_mix: dict[str, float] = field(default_factory=lambda: dict(CHAT_MIX))
    augment_images: bool = True  # augment the training digits, with:
    augmentation: str = "shift"  # 1-pixel shifts + contrast jitter, or "affine": sub-pixel shift, rotation, zoom
    match_weight: float = 0.0  # images vs the 10 digit captions, cross-entropy over batch_size images (match_loss)

    def __post_init__(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise TrainConfigError(f"augmentation must be one of {list(AUGMENTATIONS)}, not {self.augmentation!r}")
        bad = [p for p in self.train if p not in PARTS + MEDIA_PARTS]
        if bad:
            raise TrainConfigError(f"train: unknown part(s) {bad}; parts: {list(PARTS + MEDIA_PARTS)}")
        bad = sorted(set(self.chat_mix) - set(CHAT_MIX))
        if bad or sum(self.chat_mix.values()) <= 0:
            raise TrainConfigError(f"chat_mix: kinds must be among {list(CHAT_MIX)} with a positive total, got "
                                   f"{self.chat_mix}")

    @property
    def total_steps(self) -> int:
        return self.steps


@dataclass
class VLRecipe:
    """A vision-audio-language training recipe (configs/nano-vl.yaml)."""

    tokenizer: str | None = None  # a model folder whose tokenizer is used (placeholders added); None: train one
    # a model folder (an earlier recipe's final/) whose weights and tokenizer start this recipe; weights under the
    # init_fresh prefixes, or whose shape differs from this recipe's model, start fresh (logged)
    init_from: str | None = None
    init_fresh: list[str] = field(default_factory=list)
    tokenizer_vocab: int = 512  # byte-level BPE trained on the recipe's own texts (when tokenizer is None)
    model: ModelSection = field(default_factory=ModelSection)
    multimodal: dict[str, Any] = field(default_factory=dict)  # MultimodalConfig fields
    stages: list[dict[str, Any]] = field(default_factory=list)  # StageSection fields each
    speech_train: int = 3000  # synthesised training clips
    speech_test: int = 500  # clips of the held-out voices
    seed: int = 0
    threads: int = 2
    out_dir: str = "runs/nano-vl"
    log_interval: int = 10
    checkpoint_interval: int = 100

    def stage_list(self) -> list[StageSection]:
        return [build_dataclass(StageSection, s, f"stages[{i}]") for i, s in enumerate(self.stages)]

    def multimodal_config(self) -> MultimodalConfig:
        return MultimodalConfig.from_dict(self.multimodal, "multimodal")

    @classmethod
    def from_yaml(cls, path: str | Path) -> VLRecipe:
        recipe = build_dataclass(cls, read_yaml_mapping(path), str(path))
        recipe.stage_list(), recipe.multimodal_config()  # every nested key checked now, not mid-run
        return recipe


# ---------------------------------------------------------------------------------------------------- data


class VLData:
    """Training media in memory and the examples drawn from them (seeded)."""

    def __init__(self, recipe: VLRecipe, tokenizer: Tokenizer, model: VisionAudioLM):
        self.tokenizer, self.model = tokenizer, model
        self.images, self.labels = D.digit_images("train")
        clips = D.speech_clips("train", recipe.speech_train, recipe.seed, Path(recipe.out_dir) / "data")
        self.waves = [torch.from_numpy(c.wave) for c in clips]
        self.words = [c.text for c in clips]
        self.by_word = {w: [i for i, t in enumerate(self.words) if t == w] for w in set(self.words)}
        self.by_label = {d: (self.labels == d).nonzero().flatten().tolist() for d in range(10)}
        self.rng, self.gen = random.Random(recipe.seed), torch.Generator().manual_seed(recipe.seed)
        self.augment: str | None = "shift"  # set per stage (StageSection.augment_images, augmentation)

    def image_tensor(self, index: list[int]) -> torch.Tensor:
        """Training images (n, 1, 8, 8), augmented as the stage says."""
        x = self.images[index]
        if self.augment == "shift":
            return D.augment_images(x, self.gen)
        return D.jitter_images(x, self.gen) if self.augment == "affine" else x

    def image(self, i: int) -> Media:
        return Media("image", self.image_tensor([i])[0], f"digit image {i}")

    def image_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct training images, augmented (n, 1, 8, 8), and their labels (n,)."""
        index = self.rng.sample(range(len(self.labels)), min(n, len(self.labels)))
        return self.image_tensor(index), self.labels[index]

    def audio(self, i: int) -> Media:
        return Media("audio", self.waves[i], f"clip {i}")

    def encode(self, messages: list[dict[str, str]], kinds: list[str]) -> tuple[list[int], list[int]]:
        ex = encode_conversation(messages, self.tokenizer)
        n = {k: self.model.num_tokens(k) for k in set(kinds)}
        return insert_placeholders(ex.ids, ex.loss_mask, [kinds], self.tokenizer, n)

    def caption_example(self) -> tuple[list[int], list[int], list[Media]]:
        """bos, placeholders, caption, eos (loss on the caption)."""
        tok = self.tokenizer
        if self.rng.random() < 0.5:
            i = self.rng.randrange(len(self.labels))
            media, text = self.image(i), D.image_caption(int(self.labels[i]))
        else:
            i = self.rng.randrange(len(self.words))
            media, text = self.audio(i), D.audio_caption(self.words[i])
        slot = placeholder_ids(tok)[media.kind]
        head = [tok.bos_id] + [slot] * self.model.num_tokens(media.kind)
        ids = head + tok.encode_plain(text) + [tok.eos_id]
        return ids, [0] * len(head) + [1] * (len(ids) - len(head)), [media]

    def chat_example(self, mix: dict[str, float]) -> tuple[list[int], list[int], list[Media]]:
        """One chat example of a kind drawn with the shares of mix (image, audio, same, text)."""
        r = self.rng.random() * sum(mix.values())
        edges = dict(zip(mix, itertools.accumulate(mix.values()), strict=True))
        kind = next((k for k, e in edges.items() if r < e), list(mix)[-1])
        if kind == "image":
            i = self.rng.randrange(len(self.labels))
            (q, a), media = D.image_turn(int(self.labels[i]), self.rng), [self.image(i)]
        elif kind == "audio":
            i = self.rng.randrange(len(self.words))
            (q, a), media = D.audio_turn(self.words[i], self.rng), [self.audio(i)]
        elif kind == "same":
            i = self.rng.randrange(len(self.labels))
            label = int(self.labels[i])
            word = D.DIGIT_WORDS[label] if self.rng.random() < 0.5 else self.rng.choice(D.DIGIT_WORDS)
            j = self.rng.choice(self.by_word[word])
            (q, a), media = D.same_turn(label, word, self.rng), [self.image(i), self.audio(j)]
        else:
            (q, a), media = D.text_turn(self.rng), []
        ids, mask = self.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                [m.kind for m in media])
        return ids, mask, media

    def contrastive_batch(self) -> tuple[list[Media], list[str], list[Media], list[str]]:
        """One image per digit and one clip per word (no two rows share a caption), with captions."""
        images = [self.image(self.rng.choice(self.by_label[d])) for d in range(10)]
        words = sorted(self.by_word)
        clips = [self.audio(self.rng.choice(self.by_word[w])) for w in words]
        return (images, [D.image_caption(d) for d in range(10)], clips, [D.audio_caption(w) for w in words])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])


def collate(examples: list[tuple[list[int], list[int], list[Media]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[Media]]]:
    """Right-padded x, y (next token), loss mask (B, T - 1) and each row's media."""
    T = max(len(ids) for ids, _, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, (i, m, _) in enumerate(examples):
        ids[b, :len(i)], mask[b, :len(m)] = torch.tensor(i), torch.tensor(m)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:], [media for _, _, media in examples]


# ---------------------------------------------------------------------------------------------------- losses


def contrastive_loss(vl: VisionAudioLM, data: VLData) -> torch.Tensor:
    """InfoNCE(image, caption) + InfoNCE(audio, caption), pooled in the language model's embedding space."""
    images, image_caps, clips, audio_caps = data.contrastive_batch()
    total = torch.zeros(())
    for kind, media, caps in (("image", images, image_caps), ("audio", clips, audio_caps)):
        if kind not in vl.encoders:
            continue
        pooled = vl.encode(kind, [m.data for m in media]).mean(1)  # (n, C)
        total = total + vl.contrastive(pooled, vl.caption_embeddings([data.tokenizer.encode_plain(c) for c in caps]))
    return total


def match_loss(vl: VisionAudioLM, data: VLData, n: int) -> torch.Tensor:
    """Cross-entropy of n training images' pooled embeddings (n, C) against the 10 digit captions' (10, C), with
    the contrastive head's scaled cosine logits (n, 10): CLIP's zero-shot classifier, trained."""
    x, labels = data.image_batch(n)
    pooled = vl.encode("image", list(x)).mean(1)  # (n, C)
    captions = vl.caption_embeddings([data.tokenizer.encode_plain(D.image_caption(d)) for d in range(10)])
    return torch.nn.functional.cross_entropy(vl.contrastive.logits(pooled, captions), labels)


def lm_loss(vl: VisionAudioLM, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[Media]]]
            ) -> torch.Tensor:
    x, y, mask, media = batch
    embeds, _ = vl.embed(x, media)
    return masked_ce(vl.lm(x, inputs_embeds=embeds), y, mask)


# ---------------------------------------------------------------------------------------------------- the loop


def trainable(vl: VisionAudioLM, parts: list[str]) -> list[torch.nn.Parameter]:
    """Set requires_grad by part ("encoders", or one modality's: "encoders.image"); the parameters that train."""
    modules = {"encoders": vl.encoders, "projectors": vl.projectors, "gate": vl.gate, "contrastive": vl.contrastive,
               "lm": vl.lm}
    for name, module in modules.items():
        module.requires_grad_(name in parts)
    for part in parts:
        group, _, kind = part.partition(".")
        if kind and kind in modules[group]:
            modules[group][kind].requires_grad_(True)
    return [p for p in vl.parameters() if p.requires_grad]


def build(recipe: VLRecipe) -> tuple[VisionAudioLM, Tokenizer]:
    """A fresh model: the recipe's language model (vocabulary = the tokenizer's, placeholders included)."""
    if (source := recipe.tokenizer or recipe.init_from) is not None:
        tokenizer = add_media_tokens(Tokenizer.from_dir(source))
    else:
        tokenizer = train_bpe_tokenizer(D.corpus_texts(recipe.seed), recipe.tokenizer_vocab,
                                        DEEPSEEK_SPECIAL_TOKENS + list(PLACEHOLDER_TOKENS.values()), split_digits=True)
    mcfg = TrainConfig(model=recipe.model).model_config().replace(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    lm = Transformer(mcfg).init_weights(recipe.seed)
    torch.manual_seed(recipe.seed)
    return VisionAudioLM(lm, recipe.multimodal_config(), placeholder_ids(tokenizer)), tokenizer


def init_weights(vl: VisionAudioLM, folder: str | Path, fresh: list[str]) -> list[str]:
    """Load a model folder's weights (language model and multimodal files) into vl where name and shape match,
    except under the `fresh` prefixes; returns (and logs) the names left as initialised."""
    from safetensors.torch import load_file

    from r1kit.checkpoint import load_model
    from r1kit.multimodal.model import WEIGHTS_FILE

    source = {f"lm.{k}": v for k, v in load_model(folder, dtype=torch.float32).state_dict().items()}
    source.update({k: v.float() for k, v in load_file(str(Path(folder) / WEIGHTS_FILE)).items()})
    own = vl.state_dict()
    usable = {k: v for k, v in source.items()
              if k in own and v.shape == own[k].shape and not any(k.startswith(p) for p in fresh)}
    vl.load_state_dict(usable, strict=False)
    left = [k for k in own if k not in usable]
    log.info("init_from %s: %d tensors loaded; fresh: %s", folder, len(usable), ", ".join(left) or "none")
    return left


def run_stage(vl: VisionAudioLM, data: VLData, stage: StageSection, out: Path, start: int, metrics: Any,
              save: Any) -> None:
    """Train one stage from step `start`; save(step, opt) is called at checkpoints and at the end."""
    from tqdm import tqdm

    params = trainable(vl, stage.train)
    data.augment = stage.augmentation if stage.augment_images else None
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay)
    if start and (state := save.optimizer_state) is not None:
        opt.load_state_dict(state)
    vl.train()
    bar = tqdm(total=stage.steps, initial=start, desc=stage.name, dynamic_ncols=True)
    t0 = time.time()
    for step in range(start, stage.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, stage)  # type: ignore[arg-type]
        parts = {}
        if stage.match_weight:
            parts["match"] = stage.match_weight * match_loss(vl, data, stage.batch_size)
        if stage.contrastive_weight:
            parts["contrastive"] = stage.contrastive_weight * contrastive_loss(vl, data)
        if stage.caption_weight:
            batch = collate([data.caption_example() for _ in range(stage.batch_size)], data.tokenizer.pad_id)
            parts["caption"] = stage.caption_weight * lm_loss(vl, batch)
        if stage.chat_weight:
            batch = collate([data.chat_example(stage.chat_mix) for _ in range(stage.batch_size)],
                            data.tokenizer.pad_id)
            parts["chat"] = stage.chat_weight * lm_loss(vl, batch)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        if (step + 1) % save.log_interval == 0 or step + 1 == stage.steps:
            rec = {"stage": stage.name, "step": step + 1, "tokens": save.global_step + step + 1,
                   "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                   "logit_scale": vl.contrastive.scale.item(), "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(time.time() - t0, 1)}
            metrics(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if (step + 1) % save.checkpoint_interval == 0 or step + 1 == stage.steps:
            save(step + 1, opt)
    bar.close()


class Checkpointer:
    """Atomic, resumable checkpoints of a staged run: out/checkpoints/step_*.pt (stage index and step)."""

    def __init__(self, out: Path, vl: VisionAudioLM, data: VLData, recipe: VLRecipe):
        self.out, self.vl, self.data = out, vl, data
        self.log_interval, self.checkpoint_interval = recipe.log_interval, recipe.checkpoint_interval
        self.stage_index, self.global_step, self.optimizer_state = 0, 0, None

    def __call__(self, step: int, opt: torch.optim.Optimizer) -> None:
        n = self.global_step + step
        file = self.out / "checkpoints" / f"step_{n:08d}.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.vl.state_dict(), "optimizer": opt.state_dict(), "step": step, "tokens": n,
                 "stage": self.stage_index, "data": self.data.state_dict(), "rng": torch.get_rng_state()}
        atomic_write(file, lambda tmp: torch.save(state, tmp))
        for old in sorted((self.out / "checkpoints").glob("step_*.pt"))[:-2]:
            old.unlink(missing_ok=True)


def train_vl(recipe: VLRecipe, resume: bool = False) -> Path:
    """Run every stage (resuming from the last checkpoint with resume); returns out/final (the model folder)."""
    torch.set_num_threads(recipe.threads)
    out = Path(recipe.out_dir)
    vl, tokenizer = build(recipe)
    data = VLData(recipe, tokenizer, vl)
    ckpt = Checkpointer(out, vl, data, recipe)
    stages = recipe.stage_list()
    first_stage, start = 0, 0
    if resume and (state := latest_usable_checkpoint(out)) is not None:
        vl.load_state_dict(state["model"])
        data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        first_stage, start, ckpt.optimizer_state = state["stage"], state["step"], state["optimizer"]
        if start >= stages[first_stage].steps:
            first_stage, start, ckpt.optimizer_state = first_stage + 1, 0, None
    elif recipe.init_from is not None:
        init_weights(vl, recipe.init_from, recipe.init_fresh)
    metrics_file = out / "metrics.jsonl"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    with metrics_file.open("a") as f:
        def write(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec) + "\n")
            f.flush()

        ckpt.global_step = sum(s.steps for s in stages[:first_stage])
        for i in range(first_stage, len(stages)):
            ckpt.stage_index = i
            run_stage(vl, data, stages[i], out, start if i == first_stage else 0, write, ckpt)
            ckpt.global_step += stages[i].steps
            ckpt.optimizer_state = None
    return finalize(vl, tokenizer, out, recipe)


def finalize(vl: VisionAudioLM, tokenizer: Tokenizer, out: Path, recipe: VLRecipe) -> Path:
    """out/final: the language model (bf16 safetensors + config.json), tokenizer, multimodal files, loss PNG."""
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    vl.eval()
    save_model(vl.lm, final, dtype=torch.bfloat16)
    tokenizer.save(final)
    vl.save(final, dtype=torch.bfloat16)
    plot_metrics(out / "metrics.jsonl", final / "loss.png")
    summary = {"recipe": recipe.out_dir, "stages": recipe.stages, "params_lm": vl.lm.num_params(),
               "params_total": sum(p.numel() for p in vl.parameters()), "init_from": recipe.init_from,
               "history": stage_history(recipe, out / "metrics.jsonl")}
    atomic_write(final / "training_summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    return final


def load_checkpoint_model(recipe: VLRecipe, file: Path) -> tuple[VisionAudioLM, Tokenizer]:
    """The model of a training checkpoint (for evaluating a run in progress)."""
    vl, tokenizer = build(recipe)
    vl.load_state_dict(load_training_checkpoint(file)["model"])
    return vl.eval(), tokenizer


def stage_history(recipe: VLRecipe, metrics_file: Path) -> list[dict[str, Any]]:
    """Every stage that made this model, the init_from model's first: run, name, steps, seconds of steps (the
    largest elapsed_s logged for the stage; a resumed stage counts from its restart)."""
    history: list[dict[str, Any]] = []
    if recipe.init_from is not None and (base := Path(recipe.init_from) / "training_summary.json").is_file():
        summary = json.loads(base.read_text())
        history = summary.get("history") or [  # a summary from before history was kept: its run's metrics
            {"run": summary["recipe"], "name": st["name"], "steps": st["steps"],
             "elapsed_s": stage_seconds(Path(recipe.init_from).parent / "metrics.jsonl", st["name"])}
            for st in summary["stages"]]
    return history + [{"run": recipe.out_dir, "name": st.name, "steps": st.steps,
                       "elapsed_s": stage_seconds(metrics_file, st.name)} for st in recipe.stage_list()]


def stage_seconds(metrics_file: Path, stage: str) -> float | None:
    """The largest elapsed_s metrics_file logged for a stage; None without the file or the stage."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return max((r["elapsed_s"] for r in rows if r.get("stage") == stage), default=None)
