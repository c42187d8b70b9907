"""MultimodalConfig: the encoders, the gate and the contrastive head of a vision-audio-language model.

Validated with the training recipes' mechanism (r1kit.train.config.build_dataclass): unknown keys are refused
by name. Stored as ``multimodal/multimodal.json`` in the model folder, beside the language model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from r1kit.train.config import TrainConfigError, build_dataclass

MODALITIES = ("text", "image", "audio")  # the gate's order; DICOM goes through the image encoder
GATE_MODES = ("learned", "fixed", "per_token")
IMAGE_STEMS = ("patch", "conv")


class MultimodalConfigError(TrainConfigError):
    """A multimodal config field is missing, unknown or out of range; the message names it."""


@dataclass
class ImageEncoderConfig:
    """ViT over a grayscale image resized to image_size x image_size, cut into patch_size patches.

    stem "patch": each patch's linear embedding (a strided convolution), as in ViT; "conv": stem_layers 3x3
    convolutions (stem_channels, GELU) before that patch embedding, an early-convolution ViT (Xiao et al. 2021), which
    generalised far better on 1500 8x8 digits (README, Multimodal)."""

    image_size: int = 8
    patch_size: int = 2
    dim: int = 64
    layers: int = 2
    heads: int = 4
    stem: str = "patch"
    stem_channels: int = 32
    stem_layers: int = 1  # 3x3 convolutions (each + GELU) in the conv stem
    max_pixels: int = 4096 * 4096  # larger inputs are refused before decoding
    max_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise MultimodalConfigError(f"image.image_size {self.image_size} is not a multiple of "
                                        f"image.patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise MultimodalConfigError(f"image.dim {self.dim} is not a multiple of image.heads {self.heads}")
        if self.stem not in IMAGE_STEMS:
            raise MultimodalConfigError(f"image.stem must be one of {IMAGE_STEMS}, not {self.stem!r}")
        if self.stem_layers < 1 or self.stem_channels < 1:
            raise MultimodalConfigError(f"image.stem_layers {self.stem_layers} and image.stem_channels "
                                        f"{self.stem_channels} must be at least 1")

    @property
    def num_tokens(self) -> int:
        """Embeddings per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AudioEncoderConfig:
    """Log-mel features (torch.stft) -> frame patches -> transformer -> num_tokens pooled embeddings."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    frames_per_token: int = 4
    dim: int = 64
    layers: int = 2
    heads: int = 4
    num_tokens: int = 8
    max_seconds: float = 30.0
    max_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise MultimodalConfigError(f"audio.dim {self.dim} is not a multiple of audio.heads {self.heads}")
        if self.n_fft // 2 + 1 < self.n_mels:
            raise MultimodalConfigError(f"audio.n_mels {self.n_mels} exceeds the {self.n_fft // 2 + 1} FFT bins")


@dataclass
class GateConfig:
    """The modality gate. mode learned: a per-sample softmax over the modalities present; per_token: a softmax
    over the present modalities at every position, computed from that position's embedding (each token is scaled
    by its own modality's weight); fixed: equal weights (the gate does nothing). ablate: modalities whose weight
    is forced to 0 (their embeddings are zeroed)."""

    mode: str = "learned"
    ablate: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise MultimodalConfigError(f"gate.mode must be one of {GATE_MODES}, not {self.mode!r}")
        bad = [m for m in self.ablate if m not in MODALITIES]
        if bad:
            raise MultimodalConfigError(f"gate.ablate: unknown modality {bad}; known: {list(MODALITIES)}")


@dataclass
class MultimodalConfig:
    """Everything multimodal about a model; None for an encoder means the model has no such modality."""

    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    init_temperature: float = 0.07  # CLIP: logit scale initialised to 1/0.07 ...
    max_logit_scale: float = 100.0  # ... and clamped at 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "multimodal config") -> MultimodalConfig:
        """Build from a mapping, every key checked (an unknown one is named); nested sections likewise."""
        d = dict(d)
        sections = {"image": ImageEncoderConfig, "audio": AudioEncoderConfig}
        built = {k: None if d.get(k) is None else build_dataclass(c, d[k], f"{where}: {k}")
                 for k, c in sections.items() if k in d}
        rest = build_dataclass(cls, {k: v for k, v in d.items() if k not in sections}, where)
        for k, v in built.items():
            setattr(rest, k, v)
        return rest
