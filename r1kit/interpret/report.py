"""PNGs (matplotlib, Agg) and one self-contained report.html for an `explain` result.

    write_report(result, Path("out"))  ->  out/report.html, out/attention_layer{L}.png, out/attribution.png,
        out/attribution_bars.png, out/expert_routes.png (MoE models), out/ablation.png, out/patching.png

The HTML has no external reference (no network): the PNGs are inlined as data URIs, the result as JSON, and a
few lines of script colour the prompt by the chosen method's attribution of the generated token under the
pointer (or the one clicked).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from r1kit.fileio import atomic_write
from r1kit.interpret.explain import to_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> Path:
    fig.tight_layout()  # margins for the labels (cheaper than bbox_inches="tight", which draws the figure twice)
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    _plt().close(fig)
    return png


def _labels(tokens: list[str]) -> list[str]:
    """Tick labels: newlines and blanks visible; DeepSeek's fullwidth bar and U+2581 as DejaVu Sans has them."""
    plain = [t.replace("\uff5c", "|").replace("\u2581", "_") for t in tokens]
    return [t.replace("\n", "\\n") if t.strip() else repr(t) for t in plain]


def plot_attention(patterns: torch.Tensor, tokens: list[str], out: Path) -> list[Path]:
    """One PNG per layer, one heatmap per head: patterns (L, H, N, N)."""
    plt, (L, H, N, _) = _plt(), patterns.shape
    labels = _labels(tokens)
    pngs = []
    for layer in range(L):
        fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.6), squeeze=False)
        for h, ax in enumerate(axes[0]):
            ax.imshow(patterns[layer, h].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if N <= 40:  # tokens on the first head's axes only (text is most of the drawing time)
            axes[0][0].set_xticks(range(N), labels, rotation=90, fontsize=5)
            axes[0][0].set_yticks(range(N), labels, fontsize=5)
        pngs.append(_save(fig, out / f"attention_layer{layer}.png"))
    return pngs


def plot_attribution(result: dict, out: Path) -> list[Path]:
    """attribution.png: per method a heatmap (generated x prompt tokens); attribution_bars.png: each method's mean
    over the generated tokens as bars over the prompt (scaled to its largest magnitude)."""
    plt = _plt()
    methods = list(result["attributions"])
    px, gy = _labels(result["prompt_tokens"]), _labels(result["generated_tokens"])
    height = 1.6 + max(0.16 * len(gy), 0.45) * len(methods)  # 1.6 in for the token labels below
    fig, axes = plt.subplots(len(methods), 1, figsize=(0.3 * len(px) + 3, height), squeeze=False, sharex=True)
    for ax, m in zip(axes[:, 0], methods, strict=True):
        a = torch.tensor(result["attributions"][m])  # (G, P)
        signed, top = bool((a < 0).any()), float(a.abs().max().clamp_min(1e-12))
        ax.imshow(a.numpy(), cmap="RdBu_r" if signed else "Reds", vmin=-top if signed else 0, vmax=top, aspect="auto")
        ax.set_ylabel(m, fontsize=6, rotation=0, ha="right")
        ax.set_yticks(range(len(gy)), gy, fontsize=5)
    axes[-1, 0].set_xticks(range(len(px)), px, rotation=90, fontsize=6)
    heat = _save(fig, out / "attribution.png")
    fig, ax = plt.subplots(figsize=(0.3 * len(px) + 3, 3))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        mean = torch.tensor(result["attributions"][m]).mean(0)
        ax.bar(torch.arange(len(px)) + i * width, (mean / mean.abs().max().clamp_min(1e-12)).numpy(), width, label=m)
    ax.set_xticks(torch.arange(len(px)) + 0.4 - width / 2, px, rotation=90, fontsize=6)
    ax.legend(fontsize=5, ncol=2)
    ax.set_title("mean attribution over the generated tokens (each method scaled to its largest)", fontsize=8)
    return [heat, _save(fig, out / "attribution_bars.png")]


def plot_routes(result: dict, out: Path) -> Path | None:
    """Expert-route diagram: token x MoE layer, coloured by the top expert, annotated with the chosen ids."""
    routes = result["expert_routes"]
    if not routes or not routes[0]:
        return None
    plt = _plt()
    tokens = _labels(result["prompt_tokens"] + result["generated_tokens"])
    layers = [r["layer"] for r in routes[0]]
    top = torch.tensor([[r["experts"][0] for r in t] for t in routes])  # (N, L_moe)
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(layers), 1 + 0.28 * len(tokens)))
    ax.imshow(top.numpy(), cmap="tab10", aspect="auto", vmin=0, vmax=max(9, int(top.max())))
    for i, t in enumerate(routes):
        for j, r in enumerate(t):
            ax.text(j, i, ",".join(map(str, r["experts"])), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(layers)), [f"layer {L}" for L in layers], fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    ax.axhline(len(result["prompt_tokens"]) - 0.5, color="black", lw=1)
    ax.set_title("experts chosen per token (colour: highest weight)", fontsize=9)
    return _save(fig, out / "expert_routes.png")


def plot_ablation(result: dict, out: Path, k: int = 15) -> Path:
    """Bars of the k most harmful head and expert ablations."""
    plt = _plt()
    parts = [("heads", "head"), ("experts", "expert")]
    parts = [(key, unit) for key, unit in parts if result["ablation"][key]]
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 3.5), squeeze=False)
    for ax, (key, unit) in zip(axes[0], parts, strict=True):
        rows = result["ablation"][key][:k]
        ax.barh(range(len(rows)), [r["delta"] for r in rows])
        ax.set_yticks(range(len(rows)), [f"L{r['layer']} {unit} {r[unit]}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("change in target log-prob when removed")
        ax.set_title(f"{key} ({result['ablation']['how'] if key == 'heads' else 'zero'} ablation)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "ablation.png")


def plot_patching(result: dict, out: Path) -> Path | None:
    """Heatmap layer x position of the normalised activation-patching effect."""
    p = result.get("patching")
    if not p:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1 + 0.4 * len(p["corrupted_tokens"]), 1 + 0.35 * len(p["effect"])))
    im = ax.imshow(torch.tensor(p["effect"]).numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["prompt_tokens"])), _labels(result["prompt_tokens"]), rotation=90, fontsize=6)
    ax.set_ylabel("layer (resid_pre)")
    ax.set_title(f"patching from {p['corrupted_prompt']!r}: 1 = answer as corrupted", fontsize=8)
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "patching.png")


HTML = """<!doctype html><html><head><meta charset="utf-8"><title>r1kit explain</title><style>
body{font-family:sans-serif;margin:1.5em;max-width:1100px}.tok{padding:2px 1px;margin:0 1px;border-radius:3px;
white-space:pre;font-family:monospace}.gen{cursor:pointer;border-bottom:2px solid #888}.gen.sel{background:#fd8}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}#sources{font-size:.9em;color:#333}</style></head><body>
<h1>r1kit explain</h1><p>Method <select id="method"></select> &mdash; hover (or click) a generated token to colour the
prompt by its sources.</p><h3>Prompt</h3><div id="prompt"></div><h3>Generated</h3><div id="generated"></div>
<p id="sources"></p>__IMAGES__<script id="data" type="application/json">__DATA__</script><script>
const $=id=>document.getElementById(id);const R=JSON.parse($('data').textContent);const sel=$('method');
for(const m of Object.keys(R.attributions)){const o=document.createElement('option');o.value=m;o.textContent=m;
sel.appendChild(o);}function span(t,cls){const s=document.createElement('span');s.className='tok '+cls;
s.textContent=t;return s;}const P=R.prompt_tokens.map(t=>span(t,'src'));P.forEach(s=>$('prompt').appendChild(s));
let cur=0;function show(g){cur=g;const row=R.attributions[sel.value][g];const mx=Math.max(1e-12,...row.map(Math.abs));
P.forEach((s,i)=>{const v=row[i]/mx;s.style.background=v>=0?`rgba(220,40,40,${v})`:`rgba(40,80,220,${-v})`;
s.title=`${sel.value}: ${row[i].toPrecision(3)}`;});G.forEach((s,i)=>s.classList.toggle('sel',i===g));
const top=row.map((v,i)=>[v,i]).sort((a,b)=>b[0]-a[0]).slice(0,3).map(([v,i])=>JSON.stringify(R.prompt_tokens[i]));
$('sources').textContent=`sources of ${JSON.stringify(R.generated_tokens[g])} (${sel.value}): ${top.join(', ')}`;}
const G=R.generated_tokens.map((t,g)=>{const s=span(t,'gen');s.dataset.g=g;s.onmouseenter=()=>show(g);
s.onclick=()=>show(g);$('generated').appendChild(s);return s;});sel.onchange=()=>show(cur);if(G.length)show(0);
</script></body></html>"""


def write_html(result: dict, pngs: list[Path], file: Path) -> Path:
    """report.html: the prompt, the generated tokens with hover-to-show sources, and the PNGs inlined."""
    images = "".join(f'<h3>{html.escape(p.stem)}</h3><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                      f'{base64.b64encode(p.read_bytes()).decode()}">' for p in pngs)
    data = json.dumps(to_json(result)).replace("</", "<\\/")  # no "</script>" inside the JSON
    text = HTML.replace("__IMAGES__", images).replace("__DATA__", data)
    atomic_write(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return file


def write_report(result: dict, out: Path) -> list[Path]:
    """All PNGs and report.html into folder `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = result["prompt_tokens"] + result["generated_tokens"]
    pngs = [*plot_attribution(result, out), *plot_attention(result["patterns"], tokens, out)]
    pngs += [p for p in (plot_routes(result, out), plot_ablation(result, out), plot_patching(result, out)) if p]
    return [*pngs, write_html(result, pngs, out / "report.html")]
