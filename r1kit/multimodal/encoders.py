"""Media encoders: a ViT for images and a log-mel transformer for audio, each producing a fixed number of
embeddings; plus the log-mel front end (torch.stft, no torchaudio).

Shapes: B batch, N embeddings per item, D encoder width, F frames, M mel bands, L samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK mel filters (n_freqs, n_mels), unnormalised (torchaudio's melscale_fbanks defaults)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (n_freqs,)
    mels = torch.linspace(float(hz_to_mel(torch.tensor(f_min))), float(hz_to_mel(torch.tensor(f_max))), n_mels + 2,
                          dtype=torch.float64)
    edges = mel_to_hz(mels)  # (n_mels + 2,)
    lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])  # rising slope
    upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])  # falling slope
    return torch.clamp(torch.minimum(lower, upper), min=0.0).float()


class LogMel(nn.Module):
    """Waveform (B, L) -> log-mel features (B, F, M): Hann-windowed STFT (centred, reflect padding), power
    spectrum, mel filters, log(x + 1e-6). F = L // hop_length + 1."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.n_fft, self.hop_length = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)
        self.register_buffer("filters", mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate),
                             persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)  # (B, n_fft/2 + 1, F)
        power = spec.real ** 2 + spec.imag ** 2
        return torch.log(power.transpose(1, 2) @ self.filters + 1e-6)  # (B, F, M)


def encoder_layers(dim: int, heads: int, layers: int) -> nn.TransformerEncoder:
    """Pre-norm transformer layers (GELU MLP of 4 x dim), no dropout."""
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """(n, dim) sine/cosine position table, as in "Attention is all you need"."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table


class ViTEncoder(nn.Module):
    """Grayscale images (B, 1, H, W) in [0, 1], H = W = image_size -> patch embeddings (B, N, D), N = patches.

    Patch embedding (a strided convolution = a linear map of each flattened patch; with stem "conv", of the
    patch's features after stem_layers 3x3 convolutions), learned positions, pre-norm transformer layers, final
    LayerNorm."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.config = cfg
        channels = 1
        if cfg.stem == "conv":  # early convolutions (Xiao et al. 2021): (B, 1, H, W) -> (B, S, H, W)
            channels = cfg.stem_channels
            self.stem = nn.Sequential(*[m for i in range(cfg.stem_layers) for m in (
                nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.GELU())])
        self.patch_embed = nn.Conv2d(channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        self.layers = encoder_layers(cfg.dim, cfg.heads, cfg.layers)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, N, D): each patch's linear embedding, row-major patch order."""
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1:] != (1, size, size):
            raise ValueError(f"image tensor must be (B, 1, {size}, {size}), got {tuple(images.shape)}")
        if self.config.stem == "conv":
            images = self.stem(images)
        return self.patch_embed(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images) + self.pos_embed  # (B, N, D)
        return self.norm(self.layers(x))


class AudioEncoder(nn.Module):
    """Waveforms -> (B, num_tokens, D). Each clip: log-mel (F, M), normalised per clip (zero mean, unit
    variance: loudness-invariant), frames_per_token frames -> one embedding (a strided convolution),
    sinusoidal positions, transformer layers, LayerNorm, then average pooling over time to num_tokens."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.config = cfg
        self.logmel = LogMel(cfg)
        self.frame_embed = nn.Conv1d(cfg.n_mels, cfg.dim, cfg.frames_per_token, stride=cfg.frames_per_token)
        self.layers = encoder_layers(cfg.dim, cfg.heads, cfg.layers)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def features(self, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips (L_i,) -> normalised log-mel padded to the longest (B, F, M) and valid frame counts (B,)."""
        mels = [self.logmel(w[None])[0] for w in waves]  # (F_i, M) each: every clip's own edges (reflect)
        mels = [(m - m.mean()) / (m.std() + 1e-5) for m in mels]
        lengths = torch.tensor([m.shape[0] for m in mels], device=mels[0].device)
        return nn.utils.rnn.pad_sequence(mels, batch_first=True), lengths

    def forward(self, waves: list[torch.Tensor]) -> torch.Tensor:
        """waves: B clips (L_i,) at sample_rate -> (B, num_tokens, D)."""
        cfg = self.config
        mel, lengths = self.features(waves)  # (B, F, M), (B,)
        short = cfg.frames_per_token * cfg.num_tokens - mel.shape[1]
        if short > 0:  # a very short clip: pad so that every output token has frames
            mel = F.pad(mel, (0, 0, 0, short))
        x = self.frame_embed(mel.transpose(1, 2)).transpose(1, 2)  # (B, F', D)
        x = x + sinusoidal_positions(x.shape[1], cfg.dim).to(x)
        valid = torch.clamp(lengths // cfg.frames_per_token, min=cfg.num_tokens, max=x.shape[1])  # (B,) whole windows
        pad_mask = torch.arange(x.shape[1])[None] >= valid[:, None]  # (B, F') True = padding
        x = self.norm(self.layers(x, src_key_padding_mask=pad_mask))
        return torch.stack([F.adaptive_avg_pool1d(x[b, :int(n)].T[None], cfg.num_tokens)[0].T
                            for b, n in enumerate(valid)])  # (B, num_tokens, D)
