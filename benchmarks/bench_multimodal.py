"""nano-vl on held-out data, beside classical peers on the same splits, and the encoders' throughput.

    nice -n 10 python benchmarks/bench_multimodal.py [--model r1kit/nano-vl] [--json runs/bench_multimodal.json]

Measured (greedy answers after </think>, r1kit.multimodal.evaluate):
- digit images: "What digit is this?" on sklearn digits 1500..1796 (297 images never trained on);
- spoken digits: "What did the speaker say?" on espeak-ng clips of the held-out voices (data.HELDOUT_VARIANTS, with
  every accent including the held-out data.HELDOUT_ACCENT), per voice too;
- "Is this image the same digit as the spoken one?" on held-out image x held-out-voice pairs (half the same);
- recall@1 in the shared embedding space (image/audio <-> the 10 digit captions);
- the gate ablation: the same three accuracies with the gate fixed to equal weights;
- encoder throughput (items/s, encoder + projector, batch 64, this machine's threads).
Peers (not language models; what a classifier on the same split reaches): scikit-learn's SVC (RBF, gamma 0.001) on
the digit pixels, and logistic regression on time-pooled log-mel statistics of the same training/held-out clips.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from r1kit.api import resolve_model_path
from r1kit.multimodal import data as D
from r1kit.multimodal.evaluate import evaluate_all
from r1kit.multimodal.model import VisionAudioLM
from r1kit.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def throughput(vl: VisionAudioLM, clips: list[D.SpeechClip], repeats: int = 3) -> dict[str, float]:
    """Items per second through encoder + projector, batch 64."""
    x, _ = D.digit_images("test")
    waves = [torch.from_numpy(c.wave) for c in clips[:64]]
    out = {}
    with torch.inference_mode():
        for kind, items in (("image", list(x[:64])), ("audio", waves)):
            vl.encode(kind, items)  # warm-up
            t = time.perf_counter()
            for _ in range(repeats):
                vl.encode(kind, items)
            out[f"{kind}_items_per_s"] = round(repeats * len(items) / (time.perf_counter() - t), 1)
    out["audio_seconds_per_clip"] = round(float(np.mean([len(c.wave) / D.SPEECH_RATE for c in clips[:64]])), 3)
    return out


def logmel_stats(vl: VisionAudioLM, clips: list[D.SpeechClip]) -> np.ndarray:
    """Per clip: mean and std over time of the normalised log-mel (2 x n_mels features)."""
    enc = vl.encoders["audio"]
    with torch.inference_mode():
        feats = [enc.features([torch.from_numpy(c.wave)])[0][0] for c in clips]
    return np.stack([np.concatenate([f.mean(0).numpy(), f.std(0).numpy()]) for f in feats])


def peers(vl: VisionAudioLM, train_clips: list[D.SpeechClip], test_clips: list[D.SpeechClip]) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    xtr, ytr = D.digit_images("train")
    xte, yte = D.digit_images("test")
    svc = SVC(gamma=0.001 * 256).fit(xtr.flatten(1).numpy(), ytr.numpy())  # pixels in [0, 1]: gamma rescaled
    digits = [c for c in train_clips if c.text in D.DIGIT_WORDS]
    lr = LogisticRegression(max_iter=2000).fit(logmel_stats(vl, digits), [c.text for c in digits])
    return {"svc_digit_images": float((svc.predict(xte.flatten(1).numpy()) == yte.numpy()).mean()),
            "logreg_spoken_digits": float((lr.predict(logmel_stats(vl, test_clips)) == [c.text for c in test_clips])
                                          .mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="r1kit/nano-vl")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--speech-cache", default="runs/nano-vl/data", help="where synthesised clips are cached")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_model_path(a.model)
    vl, tok = VisionAudioLM.from_pretrained(path), Tokenizer.from_dir(path)
    cache = Path(a.speech_cache)
    test_clips = D.speech_clips("test", 500, 1, cache)
    train_clips = D.speech_clips("train", 3000, 0, cache)
    t = time.time()
    res = {"model": str(a.model), "heldout_voices": list(D.HELDOUT_VARIANTS), "heldout_accent": D.HELDOUT_ACCENT,
           **evaluate_all(vl, tok, test_clips), "throughput": throughput(vl, test_clips),
           "peers": peers(vl, train_clips, test_clips), "machine": f"{platform.machine()}, {a.threads} threads",
           "eval_s": 0.0}
    res["eval_s"] = round(time.time() - t, 1)
    rows = [("digit images (297 held out)", res["digit_images"]["accuracy"], res["gate_fixed"]["digit_images"],
             res["peers"]["svc_digit_images"], "SVC on pixels"),
            ("spoken digits (held-out voices)", res["spoken_digits"]["accuracy"],
             res["gate_fixed"]["spoken_digits"], res["peers"]["logreg_spoken_digits"], "logreg on log-mel stats"),
            ("image = spoken digit?", res["same_digit"]["accuracy"], res["gate_fixed"]["same_digit"], None, "")]
    print(f"{'task':34} {'nano-vl':>8} {'gate fixed':>10} {'peer':>7}")
    for name, ours, fixed, peer, what in rows:
        print(f"{name:34} {ours:8.1%} {fixed:10.1%} {'' if peer is None else f'{peer:7.1%}'} {what}")
    print("recall@1:", {k: round(v, 3) for k, v in res["recall_at_1"].items()})
    print("per held-out voice:", {k: round(v, 3) for k, v in res["spoken_digits"]["per_voice"].items()})
    print("throughput:", res["throughput"])
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
