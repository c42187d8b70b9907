"""Bundle r1kit/nano-vl: the final model of configs/nano-vl-vision.yaml (which starts from configs/nano-vl.yaml's)
plus a model card holding every stage and the measured table.

    r1kit train-vl --config configs/nano-vl.yaml                      # runs/nano-vl/final
    r1kit train-vl --config configs/nano-vl-vision.yaml               # runs/nano-vl-vision/final
    python benchmarks/bench_multimodal.py --model runs/nano-vl-vision/final --json runs/bench_multimodal.json
    # optional, the per-token gate beside it: configs/nano-vl-pertoken.yaml, then its bench JSON as --pertoken
    python scripts/package_nano_vl.py [--run runs/nano-vl-vision] [--bench runs/bench_multimodal.json]
        [--pertoken runs/bench_multimodal_pertoken.json] [--out r1kit/nano-vl]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stage_lines(summary: dict, metrics: list[dict]) -> tuple[str, float]:
    """Markdown bullets of every stage that made the model (training_summary.json's history, oldest first) and
    the total seconds of training steps."""
    history = summary.get("history") or [
        {"run": summary["recipe"], "name": st["name"], "steps": st["steps"],
         "elapsed_s": max(m["elapsed_s"] for m in metrics if m["stage"] == st["name"])} for st in summary["stages"]]
    lines = [f"- `{h['run']}` stage *{h['name']}*: {h['steps']} steps"
             + (f", {h['elapsed_s'] / 60:.1f} min" if h.get("elapsed_s") is not None else "") for h in history]
    return "\n".join(lines), sum(h.get("elapsed_s") or 0.0 for h in history)


def stage_note(bench: dict) -> str:
    """"stage gate: 150 steps" from the benchmarked model's training_summary.json, when it is there."""
    file = Path(bench["model"]) / "training_summary.json"
    if not file.is_file():
        return "one short stage"
    history = json.loads(file.read_text()).get("history", [])[-1:]
    return "; ".join(f"stage {h['name']}: {h['steps']} steps" for h in history) or "one short stage"


def gate_table(bench: dict, pertoken: dict | None) -> str:
    """The gate ablation: learned per-sample, fixed equal weights and (when measured) the per-token gate."""
    if pertoken is None:
        return ""
    rows = "\n".join(f"| {name} | {pct(bench[key]['accuracy'])} | {pct(pertoken[key]['accuracy'])} | "
                      f"{pct(bench['gate_fixed'][key])} |" for name, key in (
                          ("digit images", "digit_images"), ("spoken digits", "spoken_digits"),
                          ("image = spoken digit?", "same_digit")))
    return f"""
## The modality gate

Per-token: `configs/nano-vl-pertoken.yaml`, this model with the gate switched to `per_token` (a softmax over the
present modalities at every position, from that position's embedding) and only the gate trained
({stage_note(pertoken)}).

| task | learned, per sample (this model) | per token | fixed equal weights |
|---|---:|---:|---:|
{rows}
"""


def model_card(bench: dict, summary: dict, metrics: list[dict], mm: dict, pertoken: dict | None = None) -> str:
    """README.md of the bundle: what it is, how it was trained (every stage), the held-out tables."""
    d, s, same, fixed, r, peers = (bench["digit_images"], bench["spoken_digits"], bench["same_digit"],
                                   bench["gate_fixed"], bench["recall_at_1"], bench["peers"])
    stages, train_s = stage_lines(summary, metrics)
    img = mm["config"]["image"]
    stem = (f"{img.get('stem_layers', 1)} 3x3 convolutions ({img['stem_channels']} channels, GELU) then "
            if img.get("stem") == "conv" else "")
    voices = ", ".join(f"{v} {pct(a)}" for v, a in s["per_voice"].items())
    rows = "\n".join(f"| {name} | {pct(ours)} | {pct(eq)} | {peer} |" for name, ours, eq, peer in (
        ('"What digit is this?" (297 images)', d["accuracy"], fixed["digit_images"],
         f"{pct(peers['svc_digit_images'])} (SVC on pixels)"),
        (f'"What did the speaker say?" ({s["n"]} clips, held-out voices)', s["accuracy"], fixed["spoken_digits"],
         f"{pct(peers['logreg_spoken_digits'])} (logistic regression on log-mel statistics)"),
        (f'"Is this image the same digit as the spoken one?" ({same["n"]} pairs)', same["accuracy"],
         fixed["same_digit"], "")))
    return f"""# r1kit/nano-vl

A vision-audio-language model in miniature, trained from scratch on a shared 2-core CPU in {train_s / 60:.0f}
minutes of training steps by `r1kit train-vl`: `configs/nano-vl.yaml` (`runs/nano-vl`), then
`configs/nano-vl-vision.yaml` (`runs/nano-vl-vision`), which keeps the first model's language model and audio
encoder and replaces its image encoder:

{stages}

- Language model: Llama-style GQA transformer, {summary['params_lm'] / 1e6:.2f}M parameters, byte-level BPE
  tokenizer trained on the recipe's texts with `<｜image｜>` and `<｜audio｜>` placeholders.
- Encoders ({(summary['params_total'] - summary['params_lm']) / 1e6:.2f}M parameters with projectors and gate): a
  ViT over 8x8 grayscale images ({stem}{img['patch_size']}x{img['patch_size']} patches, {(8 // img['patch_size']) ** 2}
  embeddings), a log-mel transformer over 16 kHz audio (8 pooled
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
Encoder throughput (encoder + projector, batch 64, {bench['machine']}): {bench['throughput']['image_items_per_s']:.0f}
images/s, {bench['throughput']['audio_items_per_s']:.0f} clips/s.
{gate_table(bench, pertoken)}
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
    p.add_argument("--run", default=str(ROOT / "runs/nano-vl-vision"))
    p.add_argument("--bench", default=str(ROOT / "runs/bench_multimodal.json"))
    p.add_argument("--pertoken", default=None, help="bench JSON of the per-token-gate model (optional)")
    p.add_argument("--out", default=str(ROOT / "r1kit/nano-vl"))
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    bench = json.loads(Path(a.bench).read_text())
    summary = json.loads((run / "final" / "training_summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    mm = json.loads((run / "final" / "multimodal" / "multimodal.json").read_text())
    pertoken = json.loads(Path(a.pertoken).read_text()) if a.pertoken else None
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run / "final", out)
    (out / "README.md").write_text(model_card(bench, summary, metrics, mm, pertoken))
    (out / "evaluation.json").write_text(json.dumps({**bench, "per_token_gate": pertoken}, indent=2) + "\n")
    print(f"bundled {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
