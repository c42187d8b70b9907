"""Held-out measurements of a vision-audio-language model: digit images (the 297 never trained on), spoken
digits from the held-out espeak-ng voices, image + audio "same digit?", cross-modal retrieval recall@1, and the
modality-gate ablation (the same model with its gate fixed to equal weights)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from r1kit.generate import SamplingParams
from r1kit.multimodal import data as D
from r1kit.multimodal.chat import MediaPrompt, generate_with_media
from r1kit.multimodal.model import Media, VisionAudioLM
from r1kit.multimodal.prompt import insert_placeholders
from r1kit.tokenizer import Tokenizer


def final_answer(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text after the reasoning, stripped."""
    return tokenizer.split_reasoning(tokenizer.decode(ids, skip_special_tokens=True))[1].strip()


def ask(vl: VisionAudioLM, tokenizer: Tokenizer, question: str, media_rows: list[list[Media]],
        batch: int = 64, max_new_tokens: int = 40) -> tuple[list[str], torch.Tensor]:
    """Greedy answers to one question about each row's media -> (answers, gate weights (N, M))."""
    base = tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    answers, weights = [], []
    for start in range(0, len(media_rows), batch):
        prompts = []
        for row in media_rows[start:start + batch]:
            counts = {k: vl.num_tokens(k) for k in {m.kind for m in row}}
            ids, _ = insert_placeholders(base, [0] * len(base), [[m.kind for m in row]], tokenizer, counts)
            prompts.append(MediaPrompt(ids, row))
        rows, w = generate_with_media(vl, prompts, params, tokenizer.stop_ids)
        answers += [final_answer(tokenizer, r) for r in rows]
        weights.append(w)
    return answers, torch.cat(weights)


def accuracy(answers: Sequence[str], expected: Sequence[str]) -> float:
    return sum(a == e for a, e in zip(answers, expected, strict=True)) / max(1, len(expected))


def digit_image_accuracy(vl: VisionAudioLM, tokenizer: Tokenizer) -> dict[str, Any]:
    """"What digit is this?" on the 297 held-out sklearn digits."""
    x, y = D.digit_images("test")
    answers, w = ask(vl, tokenizer, "What digit is this?", [[Media("image", img)] for img in x])
    return {"accuracy": accuracy(answers, [str(int(v)) for v in y]), "n": len(y),
            "mean_weights": w.mean(0).tolist()}


def spoken_digit_accuracy(vl: VisionAudioLM, tokenizer: Tokenizer, clips: Sequence[D.SpeechClip]
                          ) -> dict[str, Any]:
    """"What did the speaker say?" on clips of the held-out voices; also per voice variant."""
    rows = [[Media("audio", torch.from_numpy(c.wave))] for c in clips]
    answers, w = ask(vl, tokenizer, "What did the speaker say?", rows)
    expected = [D.word_answer(c.text) for c in clips]
    per_voice: dict[str, list[bool]] = {}
    for c, a, e in zip(clips, answers, expected, strict=True):
        per_voice.setdefault(c.voice.split("+")[1], []).append(a == e)
    return {"accuracy": accuracy(answers, expected), "n": len(clips),
            "per_voice": {v: sum(r) / len(r) for v, r in sorted(per_voice.items())},
            "mean_weights": w.mean(0).tolist()}


def same_digit_accuracy(vl: VisionAudioLM, tokenizer: Tokenizer, clips: Sequence[D.SpeechClip], n: int = 200,
                        seed: int = 0) -> dict[str, Any]:
    """"Is this image the same digit as the spoken one?" on held-out images x held-out-voice clips, half same."""
    x, y = D.digit_images("test")
    rng = random.Random(seed)
    rows, expected = [], []
    for i in range(n):
        k = rng.randrange(len(y))
        label = int(y[k])
        others = [w for w in D.DIGIT_WORDS if w != D.DIGIT_WORDS[label]]
        want = D.DIGIT_WORDS[label] if i % 2 == 0 else rng.choice(others)
        clip = rng.choice([c for c in clips if c.text == want])
        rows.append([Media("image", x[k]), Media("audio", torch.from_numpy(clip.wave))])
        expected.append("yes" if i % 2 == 0 else "no")
    answers, w = ask(vl, tokenizer, D.SAME_QUESTIONS[0], rows)
    return {"accuracy": accuracy(answers, expected), "n": n, "mean_weights": w.mean(0).tolist()}


@torch.inference_mode()
def retrieval_recall_at_1(vl: VisionAudioLM, tokenizer: Tokenizer, clips: Sequence[D.SpeechClip]
                          ) -> dict[str, float]:
    """Recall@1 in the shared embedding space (cosine of pooled embeddings): each held-out image / clip against
    the 10 digit captions (modality -> text), and each caption against all images / clips (text -> modality:
    a hit when the nearest item shows that digit)."""
    x, y = D.digit_images("test")
    audio = [c for c in clips if c.text in D.DIGIT_WORDS]
    targets = {"image": (y.tolist(), lambda: vl.encode("image", list(x)).mean(1)),
               "audio": ([D.DIGIT_WORDS.index(c.text) for c in audio],
                         lambda: torch.cat([vl.encode("audio", [torch.from_numpy(c.wave) for c in audio[i:i + 64]])
                                            .mean(1) for i in range(0, len(audio), 64)]))}
    out = {}
    for kind, (labels, pooled_fn) in targets.items():
        caps = [D.image_caption(d) if kind == "image" else D.audio_caption(D.DIGIT_WORDS[d]) for d in range(10)]
        sim = vl.contrastive.logits(pooled_fn(), vl.caption_embeddings([tokenizer.encode_plain(c) for c in caps]))
        # (N, 10)
        labels_t = torch.tensor(labels)
        out[f"{kind}_to_text"] = float((sim.argmax(1) == labels_t).float().mean())
        out[f"text_to_{kind}"] = float((labels_t[sim.argmax(0)] == torch.arange(10)).float().mean())
    return out


@contextlib.contextmanager
def gate_mode(vl: VisionAudioLM, mode: str) -> Iterator[None]:
    """Temporarily evaluate with the gate in another mode ("fixed": equal weights over the present ones)."""
    old = vl.gate.config.mode
    vl.gate.config.mode = mode
    try:
        yield
    finally:
        vl.gate.config.mode = old


def evaluate_all(vl: VisionAudioLM, tokenizer: Tokenizer, clips: Sequence[D.SpeechClip],
                 ablation: bool = True) -> dict[str, Any]:
    """Every held-out measurement; with ablation, the three accuracies again with the gate fixed."""
    vl.eval()
    res = {"digit_images": digit_image_accuracy(vl, tokenizer),
           "spoken_digits": spoken_digit_accuracy(vl, tokenizer, clips),
           "same_digit": same_digit_accuracy(vl, tokenizer, clips),
           "recall_at_1": retrieval_recall_at_1(vl, tokenizer, clips)}
    if ablation:
        with gate_mode(vl, "fixed"):
            res["gate_fixed"] = {"digit_images": digit_image_accuracy(vl, tokenizer)["accuracy"],
                                 "spoken_digits": spoken_digit_accuracy(vl, tokenizer, clips)["accuracy"],
                                 "same_digit": same_digit_accuracy(vl, tokenizer, clips)["accuracy"]}
    return res
