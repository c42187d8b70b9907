"""Bundle r1kit/nano-vl: the final model of configs/nano-vl.yaml plus a model card holding the measured table.

    r1kit train-vl --config configs/nano-vl.yaml                      # runs/nano-vl/final
    python benchmarks/bench_multimodal.py --model runs/nano-vl/final --json runs/bench_multimodal.json
    python scripts/package_nano_vl.py [--run runs/nano-vl] [--bench runs/bench_multimodal.json] [--out r1kit/nano-vl]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(bench: dict, summary: dict, metrics: list[dict]) -> str:
    """README.md of the bundle: what it is, how it was trained, the held-out table."""
    d, s, same, fixed, r, peers = (bench["digit_images"], bench["spoken_digits"], bench["same_digit"],
                                   bench["gate_fixed"], bench["recall_at_1"], bench["peers"])
    stages = ", ".join(f"{st['name']} {st['steps']} steps" for st in summary["stages"])
    train_s = sum(max(m["elapsed_s"] for m in metrics if m["stage"] == st["name"]) for st in summary["stages"])
    voices = ", ".join(f"{v} {pct(a)}" for v, a in s["per_voice"].items())
    rows = "\n".join(f"| {name} | {pct(ours)} | {pct(eq)} | {peer} |" for name, ours, eq, peer in (
        ('"What digit is this?" (297 images)', d["accuracy"], fixed["digit_images"],
         f"{pct(peers['svc_digit_images'])} (SVC on pixels)"),
        (f'"What did the speaker say?" ({s["n"]} clips, held-out voices)', s["accuracy"], fixed["spoken_digits"],
         f"{pct(peers['logreg_spoken_digits'])} (logistic regression on log-mel statistics)"),
        (f'"Is this image the same digit as the spoken one?" ({same["n"]} pairs)', same["accuracy"],
         fixed["same_digit"], "")))
    return f"""# r1kit/nano-vl

A vision-audio-language model in miniature, trained from scratch by `configs/nano-vl.yaml` (r1kit train-vl) on
a shared 2-core CPU in {train_s / 60:.0f} minutes of training steps ({stages}).

- Language model: Llama-style GQA transformer, {summary['params_lm'] / 1e6:.2f}M parameters, byte-level BPE
  tokenizer trained on the recipe's texts with `<｜image｜>` and `<｜audio｜>` placeholders.
- Encoders ({(summary['params_total'] - summary['params_lm']) / 1e6:.2f}M parameters with projectors and gate): a
  ViT over 8x8 grayscale images (2x2 patches, 16 embeddings), a log-mel transformer over 16 kHz audio (8 pooled
  embeddings), LLaVA-1.5 two-layer GELU projectors, a per-sample modality gate; CLIP InfoNCE alignment.
- Data (offline): scikit-learn's digits (first 1500 for training; the last 297 never trained on), espeak-ng
  speech (digits and yes/no/hello/stop/go) over the training voices with random speed, pitch, gain and noise.
  Held out entirely: the voices {', '.join(bench['heldout_voices'])} and the accent {bench['heldout_accent']}.

## Held-out evaluation (greedy; `benchmarks/bench_multimodal.py`)

| task | nano-vl | gate fixed to equal weights | classical peer |
|---|---:|---:|---:|
{rows}

Targets (#17): held-out digit images >= 95%: {'met' if d['accuracy'] >= 0.95 else 'missed'} ({pct(d['accuracy'])});
spoken digits on the held-out voices >= 90%: {'met' if s['accuracy'] >= 0.9 else 'missed'} ({pct(s['accuracy'])}).

Recall@1 against the 10 digit captions: image->text {pct(r['image_to_text'])}, text->image {pct(r['text_to_image'])},
audio->text {pct(r['audio_to_text'])}, text->audio {pct(r['text_to_audio'])}. Per held-out voice: {voices}.

## Use

```python
from r1kit import R1Model
m = R1Model.from_pretrained("r1kit/nano-vl")
reply = m.chat([{{"role": "user", "content": [{{"type": "image", "image": "digit.png"}},
                                              {{"type": "text", "text": "What digit is this?"}}]}}])
print(reply.content, reply.modality_weights)
```
`r1kit chat r1kit/nano-vl --image digit.png` / `--audio clip.wav` / `--dicom scan.dcm` in the shell.
It only knows digits and a few words: a DICOM scan is read and answered about, but not understood.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "runs/nano-vl"))
    p.add_argument("--bench", default=str(ROOT / "runs/bench_multimodal.json"))
    p.add_argument("--out", default=str(ROOT / "r1kit/nano-vl"))
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    bench = json.loads(Path(a.bench).read_text())
    summary = json.loads((run / "final" / "training_summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run / "final", out)
    (out / "README.md").write_text(model_card(bench, summary, metrics))
    (out / "evaluation.json").write_text(json.dumps(bench, indent=2) + "\n")
    print(f"bundled {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
