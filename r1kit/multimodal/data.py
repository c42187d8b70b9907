"""Offline multimodal data: scikit-learn's handwritten digits, spoken digits and words synthesised with
espeak-ng (many voices, speeds, pitches, with noise), captions and chat examples about them.

Splits: digit images 0..1499 train, 1500..1796 (297 images) held out, never trained on. Speech: the voices in
HELDOUT_VARIANTS (espeak-ng voice variants) and the accent HELDOUT_ACCENT are never synthesised for training.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r1kit.fileio import atomic_write

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EXTRA_WORDS = ("yes", "no", "hello", "stop", "go")  # short words beyond the digits
TRAIN_IMAGES = 1500  # sklearn digits: first 1500 train, the last 297 are the held-out test set

TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                 "en-us-nyc")
HELDOUT_ACCENT = "en-029"
HELDOUT_VARIANTS = ("f4", "m3", "klatt2", "Andy", "belinda")  # espeak-ng voices never trained on
SPEECH_RATE = 16000


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed; the message says how to install it (scripts/install_espeak.sh)."""


# ---------------------------------------------------------------------------------------------------- images


def digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as (N, 1, 8, 8) float in [0, 1] (white digit on black) and labels (N,).

    split "train": the first 1500; "test": the last 297 (never trained on)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "train":
        return x[:TRAIN_IMAGES], y[:TRAIN_IMAGES]
    if split == "test":
        return x[TRAIN_IMAGES:], y[TRAIN_IMAGES:]
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def augment_images(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel and contrast jitter of (B, 1, 8, 8) images (training only)."""
    B = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (B,), generator=gen), torch.randint(0, 3, (B,), generator=gen)
    out = torch.stack([padded[b, :, dy[b]:dy[b] + 8, dx[b]:dx[b] + 8] for b in range(B)])
    gain = 0.7 + 0.3 * torch.rand(B, 1, 1, 1, generator=gen)
    return (out * gain).clamp(0, 1)


def jitter_images(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.5, max_degrees: float = 8.6,
                  max_zoom: float = 0.1) -> torch.Tensor:
    """Small random affine warps of (B, 1, S, S) images (training only): a sub-pixel shift of up to max_shift
    pixels each way, a rotation of up to max_degrees and a zoom of up to max_zoom, bilinear, zeros outside.
    Gentler than augment_images' whole-pixel shifts, which move an 8x8 digit by 12% of its width."""
    B, S = x.shape[0], x.shape[-1]
    angle = (torch.rand(B, generator=gen) * 2 - 1) * max_degrees * torch.pi / 180  # (B,)
    zoom = 1 + (torch.rand(B, generator=gen) * 2 - 1) * max_zoom
    shift = (torch.rand(B, 2, generator=gen) * 2 - 1) * max_shift * 2 / S  # in [-1, 1] grid units
    theta = torch.stack([torch.stack([zoom * angle.cos(), -zoom * angle.sin(), shift[:, 0]], 1),
                         torch.stack([zoom * angle.sin(), zoom * angle.cos(), shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- speech


def espeak_binary() -> str | None:
    """Path of espeak-ng, or None."""
    return shutil.which("espeak-ng")


def espeak_voices(variants_dir: Path | None = None) -> list[str]:
    """espeak-ng's voice variants (the !v folder), sorted."""
    roots = [variants_dir] if variants_dir else [Path(p) / "voices" / "!v" for p in (
        "/usr/lib/x86_64-linux-gnu/espeak-ng-data", "/usr/lib/aarch64-linux-gnu/espeak-ng-data",
        "/usr/share/espeak-ng-data", "/usr/local/share/espeak-ng-data")]
    for root in roots:
        if root and root.is_dir():
            return sorted(p.name for p in root.iterdir() if p.is_file())
    return []


def train_variants() -> list[str]:
    """Voice variants used for training: every installed one except HELDOUT_VARIANTS (and a few that whisper
    or are unintelligible)."""
    skip = set(HELDOUT_VARIANTS) | {"whisper", "whisperf", "croak", "Demonic"}
    return [v for v in espeak_voices() if v not in skip]


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's audio of text, resampled to 16 kHz float32 in [-1, 1]. voice: "en-us+f3"."""
    from scipy.signal import resample_poly

    exe = espeak_binary()
    if exe is None:
        raise SpeechSynthesisError("espeak-ng is not installed (sh scripts/install_espeak.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "a.wav"
        run = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text],
                             capture_output=True, timeout=30)
        if run.returncode or not out.is_file():
            raise SpeechSynthesisError(f"espeak-ng -v {voice} failed: {run.stderr.decode(errors='replace')}")
        with wave.open(io.BytesIO(out.read_bytes())) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    g = np.gcd(rate, SPEECH_RATE)
    return resample_poly(pcm, SPEECH_RATE // g, rate // g).astype(np.float32)


def add_noise(wave_: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random gain, random leading silence (0-0.2 s) and white noise at 10-40 dB SNR."""
    lead = np.zeros(int(rng.uniform(0, 0.2) * SPEECH_RATE), dtype=np.float32)
    x = np.concatenate([lead, wave_]) * rng.uniform(0.3, 1.0)
    power = float(np.mean(x ** 2)) + 1e-12
    snr = rng.uniform(10, 40)
    noise = rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), x.shape)
    return np.clip(x + noise, -1, 1).astype(np.float32)


@dataclass
class SpeechClip:
    wave: np.ndarray  # (L,) float32 at 16 kHz
    text: str  # the word spoken
    voice: str  # "en-us+f3"


def speech_plan(split: str, n: int, seed: int) -> list[tuple[str, str, int, int]]:
    """(word, voice, speed, pitch) of n clips. train: training accents x training variants, digits and
    EXTRA_WORDS; test: the held-out variants with every accent (the held-out one included), digits only."""
    rng = random.Random(seed)
    if split == "train":
        accents, variants, words = TRAIN_ACCENTS, train_variants(), DIGIT_WORDS + EXTRA_WORDS
    elif split == "test":
        accents, variants, words = (*TRAIN_ACCENTS, HELDOUT_ACCENT), HELDOUT_VARIANTS, DIGIT_WORDS
    else:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if not variants:
        raise SpeechSynthesisError("no espeak-ng voice variants found (sh scripts/install_espeak.sh)")
    return [(words[i % len(words)] if split == "test" else rng.choice(words),
             f"{rng.choice(accents)}+{rng.choice(variants) if split == 'train' else variants[i % len(variants)]}",
             rng.randint(110, 230), rng.randint(15, 85)) for i in range(n)]


CHUNK = 250  # clips per cache file: a plan's first k chunks are the same for every n >= k * CHUNK


def speech_clips(split: str, n: int, seed: int = 0, cache: Path | None = None) -> list[SpeechClip]:
    """n synthesised clips of a split (noise seeded per chunk), cached per chunk as .npz in `cache` when given
    (an interrupted synthesis keeps its finished chunks)."""
    from tqdm import tqdm

    plan = speech_plan(split, n, seed)
    clips: list[SpeechClip] = []
    bar = tqdm(total=n, desc=f"espeak-ng {split}", leave=False)
    for start in range(0, n, CHUNK):
        part = plan[start:start + CHUNK]
        file = cache / f"speech_{split}_{seed}_{start // CHUNK}_{len(part)}.npz" if cache else None
        if file is not None and file.is_file():
            z = np.load(file, allow_pickle=False)
            cuts = np.cumsum(z["lengths"])[:-1]
            clips += [SpeechClip(w, str(t), str(v))
                      for w, t, v in zip(np.split(z["audio"], cuts), z["text"], z["voice"], strict=True)]
            bar.update(len(part))
            continue
        rng = np.random.default_rng([seed, start // CHUNK])
        new = []
        for word, voice, speed, pitch in part:
            new.append(SpeechClip(add_noise(synthesize(word, voice, speed, pitch), rng), word, voice))
            bar.update(1)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            arrays = {"audio": np.concatenate([c.wave for c in new]), "lengths": np.array([len(c.wave) for c in new]),
                      "text": np.array([c.text for c in new]), "voice": np.array([c.voice for c in new])}
            atomic_write(file, lambda p, a=arrays: np.savez(p.open("wb"), **a))
        clips += new
    bar.close()
    return clips


# ---------------------------------------------------------------------------------------------------- text


IMAGE_QUESTIONS = ("What digit is this?", "Which digit is shown?", "What number is in the image?",
                   "Read the digit in this picture.")
AUDIO_QUESTIONS = ("What did the speaker say?", "Which word was spoken?", "Transcribe the clip.",
                   "What digit did you hear?")
SAME_QUESTIONS = ("Is this image the same digit as the spoken one?", "Do the picture and the audio show the same "
                  "digit?")


def word_answer(word: str) -> str:
    """The answer for a spoken word: the digit itself for digit words, else the word."""
    return str(DIGIT_WORDS.index(word)) if word in DIGIT_WORDS else word


def image_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]} ({label})"


def audio_caption(word: str) -> str:
    return f"a voice saying {word}" + (f" ({DIGIT_WORDS.index(word)})" if word in DIGIT_WORDS else "")


def image_turn(label: int, rng: random.Random) -> tuple[str, str]:
    """(question, assistant reply with reasoning) about one digit image."""
    reply = f"<think>\nThe image shows a handwritten {DIGIT_WORDS[label]}.\n</think>\n\n{label}"
    return rng.choice(IMAGE_QUESTIONS), reply


def audio_turn(word: str, rng: random.Random) -> tuple[str, str]:
    return rng.choice(AUDIO_QUESTIONS), f"<think>\nThe speaker says {word}.\n</think>\n\n{word_answer(word)}"


def same_turn(label: int, word: str, rng: random.Random) -> tuple[str, str]:
    same = DIGIT_WORDS[label] == word
    return rng.choice(SAME_QUESTIONS), (f"<think>\nThe image shows {DIGIT_WORDS[label]} and the speaker says {word}."
                                        f"\n</think>\n\n{'yes' if same else 'no'}")


def text_turn(rng: random.Random) -> tuple[str, str]:
    """A text-only question about digits (the mixed chat data's text part)."""
    n = rng.randrange(10)
    if rng.random() < 0.5:
        return f"How do you write {DIGIT_WORDS[n]} as a digit?", f"<think>\n{DIGIT_WORDS[n]} is {n}.\n</think>\n\n{n}"
    m = (n + 1) % 10
    return f"What digit comes after {n}?", f"<think>\nAfter {n} comes {m}.\n</think>\n\n{m}"


def corpus_texts(seed: int, n: int = 3000) -> list[str]:
    """Texts a small tokenizer is trained on: every question, reply and caption form, over all digits/words."""
    rng = random.Random(seed)
    words = DIGIT_WORDS + EXTRA_WORDS
    texts = []
    for _ in range(n):
        label, word = rng.randrange(10), rng.choice(words)
        for q, a in (image_turn(label, rng), audio_turn(word, rng), same_turn(label, rng.choice(DIGIT_WORDS), rng),
                     text_turn(rng)):
            texts.append(f"{q} {a}")
        texts += [image_caption(label), audio_caption(word)]
    return texts
