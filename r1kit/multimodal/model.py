"""VisionAudioLM: a language model (r1kit.model.Transformer) with image and audio encoders whose projected
embeddings replace placeholder tokens in the input sequence, weighed by the modality gate.

    vl = VisionAudioLM.from_pretrained("r1kit/nano-vl")
    embeds, weights = vl.embed(ids, [[Media("image", img)]])   # ids hold num_tokens image placeholders
    logits = vl.lm(ids, inputs_embeds=embeds)

Shapes: B batch, T tokens, C hidden size, N embeddings per item, M modalities (text, image, audio).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1kit.fileio import atomic_write
from r1kit.model.transformer import Transformer
from r1kit.multimodal.config import MODALITIES, MultimodalConfig
from r1kit.multimodal.contrastive import ContrastiveLoss
from r1kit.multimodal.encoders import AudioEncoder, ViTEncoder
from r1kit.multimodal.projector import ModalityGate, Projector

# beside the language model's files, in a subfolder (the language model's loader reads every *.safetensors)
CONFIG_FILE = "multimodal/multimodal.json"
WEIGHTS_FILE = "multimodal/encoders.safetensors"
MEDIA_KINDS = ("image", "audio")


class MediaError(ValueError):
    """A media attachment cannot be used; the message names the part (and the file, field or tensor)."""


class MissingEncoderError(MediaError):
    """The model has no encoder for this modality."""


class PlaceholderMismatchError(MediaError):
    """The number of media placeholders and the number of attachments differ."""


@dataclass
class Media:
    """One decoded attachment. image: (1, S, S) float in [0, 1]; audio: (L,) float at the encoder's rate."""

    kind: str
    data: torch.Tensor
    name: str = "attachment"  # where it came from, for error messages ("messages[0].content[1]", a file)


class VisionAudioLM(nn.Module):
    """The language model plus encoders, projectors, gate and the contrastive head's temperature."""

    def __init__(self, lm: Transformer, cfg: MultimodalConfig, placeholder_ids: dict[str, int]):
        super().__init__()
        self.lm, self.config = lm, cfg
        self.placeholder_ids = dict(placeholder_ids)  # {"image": id, "audio": id}
        C = lm.config.hidden_size
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        if cfg.image is not None:
            self.encoders["image"], self.projectors["image"] = ViTEncoder(cfg.image), Projector(cfg.image.dim, C)
        if cfg.audio is not None:
            self.encoders["audio"], self.projectors["audio"] = AudioEncoder(cfg.audio), Projector(cfg.audio.dim, C)
        self.gate = ModalityGate(C, cfg.gate)
        self.contrastive = ContrastiveLoss(cfg.init_temperature, cfg.max_logit_scale)

    # ------------------------------------------------------------------------------------------ pieces
    def num_tokens(self, kind: str) -> int:
        """Embeddings (placeholder tokens) per attachment of this kind."""
        return self.encoder(kind).num_tokens

    def encoder(self, kind: str) -> nn.Module:
        if kind not in self.encoders:
            have = ", ".join(self.encoders) or "none"
            raise MissingEncoderError(f"this model has no {kind} encoder (it has: {have})")
        return self.encoders[kind]

    def encode(self, kind: str, items: list[torch.Tensor]) -> torch.Tensor:
        """Attachments of one kind -> projected embeddings (n, N, C) in the language model's space."""
        enc = self.encoder(kind)
        device = self.lm.embed_tokens.weight.device
        feats = enc(torch.stack(items).to(device)) if kind == "image" else enc([w.to(device) for w in items])
        return self.projectors[kind](feats).to(self.lm.embed_tokens.weight.dtype)

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled caption embeddings (B, C): the mean token embedding of ids (B, T) where mask (B, T) is set."""
        e = self.lm.embed_tokens(ids)  # (B, T, C)
        m = mask[..., None].to(e.dtype)
        return (e * m).sum(1) / m.sum(1).clamp(min=1)

    def caption_embeddings(self, rows: list[list[int]]) -> torch.Tensor:
        """Pooled embeddings (n, C) of n token-id rows of different lengths (text_embedding, padding masked)."""
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=self.lm.embed_tokens.weight.device)
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=ids.device)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
        return self.text_embedding(ids, mask)

    def placeholder_mask(self, ids: torch.Tensor, kind: str) -> torch.Tensor:
        return ids == self.placeholder_ids[kind]

    # ------------------------------------------------------------------------------------------ merge
    def check_counts(self, ids: torch.Tensor, media: list[list[Media]]) -> None:
        """Each row's placeholders of each kind = its attachments of that kind x num_tokens, else an error."""
        if len(media) != ids.shape[0]:
            raise PlaceholderMismatchError(f"{ids.shape[0]} rows of token ids but media for {len(media)} rows")
        for b, row in enumerate(media):
            for item in row:
                if item.kind not in MEDIA_KINDS:
                    raise MediaError(f"{item.name}: unknown media kind {item.kind!r} (known: {MEDIA_KINDS})")
            for kind in MEDIA_KINDS:
                n_items = sum(m.kind == kind for m in row)
                n_slots = int(self.placeholder_mask(ids[b], kind).sum())
                if n_items and kind not in self.encoders:
                    self.encoder(kind)
                per = self.num_tokens(kind) if kind in self.encoders else 1
                if n_slots != n_items * per:
                    where = f"row {b}: " if len(media) > 1 else ""
                    raise PlaceholderMismatchError(
                        f"{where}{n_items} {kind} attachment(s) need {n_items * per} {kind} placeholder tokens "
                        f"({per} each), the prompt has {n_slots}")

    def embed(self, ids: torch.Tensor, media: list[list[Media]]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) with expanded placeholders, media[b] = row b's attachments in prompt order ->
        (inputs_embeds (B, T, C), gate weights (B, M) over MODALITIES). A row without media keeps its token
        embeddings exactly (weight 1 on text)."""
        self.check_counts(ids, media)
        x = self.lm.embed_tokens(ids)  # (B, T, C)
        B, T, C = x.shape
        pooled = torch.zeros(B, len(MODALITIES), C, dtype=x.dtype, device=x.device)
        present = torch.zeros(B, len(MODALITIES), dtype=torch.bool, device=x.device)
        kind_of = torch.zeros(B, T, dtype=torch.long, device=x.device)  # index into MODALITIES per position
        for kind in MEDIA_KINDS:
            rows = [b for b, row in enumerate(media) for m in row if m.kind == kind]
            if not rows:
                continue
            tokens = self.encode(kind, [m.data for row in media for m in row if m.kind == kind])  # (n, N, C)
            mask = self.placeholder_mask(ids, kind)
            x = x.masked_scatter(mask[..., None], tokens.reshape(-1, C))
            k = MODALITIES.index(kind)
            kind_of = kind_of.masked_fill(mask, k)
            row_index = torch.tensor(rows, device=x.device)
            sums = torch.zeros(B, C, dtype=x.dtype, device=x.device).index_add(0, row_index, tokens.mean(1))
            counts = torch.zeros(B, device=x.device).index_add(0, row_index, torch.ones(len(rows), device=x.device))
            pooled[:, k] = sums / counts.clamp(min=1)[:, None].to(x.dtype)
            present[:, k] = counts > 0
        text = kind_of == 0
        pooled[:, 0] = self.text_embedding(ids, text)
        present[:, 0] = text.any(1)
        return self.apply_gate(x, pooled, present, kind_of)

    def apply_gate(self, x: torch.Tensor, pooled: torch.Tensor, present: torch.Tensor, kind_of: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale the merged embeddings x (B, T, C) by the gate: each position by its modality's (kind_of (B, T))
        weight x the number present (B, M). Per-sample modes weigh from the pooled embeddings (B, M, C); per_token
        weighs every position from its own embedding, reporting the positions' mean weights. -> (x, (B, M))."""
        if self.gate.config.mode == "per_token":
            token_w = self.gate.token_weights(x, present)  # (B, T, M)
            weights = token_w.mean(1)  # (B, M), still summing to one
            if present[:, 1:].any():
                n = present.sum(-1, keepdim=True).to(token_w.dtype)  # (B, 1)
                x = x * (token_w.gather(2, kind_of[..., None])[..., 0] * n).to(x.dtype)[..., None]
            return x, weights
        weights = self.gate(pooled, present)  # (B, M)
        if present[:, 1:].any():
            scale = self.gate.scales(weights, present).to(x.dtype)  # (B, M)
            x = x * scale.gather(1, kind_of)[..., None]
        return x, weights

    def forward(self, ids: torch.Tensor, media: list[list[Media]]) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V) with the media merged in."""
        embeds, _ = self.embed(ids, media)
        return self.lm(ids, inputs_embeds=embeds)

    # ------------------------------------------------------------------------------------------ files
    def multimodal_state(self) -> dict[str, torch.Tensor]:
        """Everything but the language model (encoders, projectors, gate, logit scale)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """CONFIG_FILE + WEIGHTS_FILE into folder (the language model is saved there by r1kit.checkpoint.save_model)."""
        folder = Path(folder)
        (folder / CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config.to_dict(), "placeholder_ids": self.placeholder_ids}
        atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in self.multimodal_state().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p)))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> VisionAudioLM:
        """Load a folder holding an r1kit language model plus CONFIG_FILE and WEIGHTS_FILE."""
        from r1kit.checkpoint import load_model

        return cls.attach(load_model(folder, device=device, dtype=dtype), folder)

    @classmethod
    def attach(cls, lm: Transformer, folder: str | Path) -> VisionAudioLM:
        """The encoders, projectors and gate of a model folder around its already loaded language model."""
        folder = Path(folder)
        meta = read_multimodal_json(folder)
        model = cls(lm, MultimodalConfig.from_dict(meta["config"], str(folder / CONFIG_FILE)),
                    meta["placeholder_ids"])
        device = lm.embed_tokens.weight.device
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("lm.")]
        if missing or unexpected:
            raise MediaError(f"{folder / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, module in model.named_children():
            if name != "lm":
                module.to(device)  # fp32: the encoders are small; their output is cast to the model's dtype
        return model.eval()


def read_multimodal_json(folder: Path) -> dict:
    """multimodal.json of a model folder; MediaError when it is missing or malformed."""
    file = folder / CONFIG_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingEncoderError(f"{folder} is a text-only model (no {CONFIG_FILE})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not {"config", "placeholder_ids"} <= set(meta):
        raise MediaError(f"{file}: needs the keys 'config' and 'placeholder_ids'")
    return meta


def is_multimodal(folder: str | Path) -> bool:
    """Whether a model folder carries encoders (multimodal.json)."""
    return (Path(folder) / CONFIG_FILE).is_file()
