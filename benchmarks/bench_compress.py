"""Every compression method on the bundled r1kit/nano against the bf16 checkpoint, and the ONNX Runtime export,
in one run.

    python benchmarks/bench_compress.py [--json out.json] [--reuse DIR] [--max-tokens 10000] [--n 8] [--threads 2]

Each method goes through the user's path (``r1kit.compress.compress``, i.e. ``r1kit compress r1kit/nano OUT
--method M``) and is loaded back with ``R1Model.from_pretrained(OUT)`` in the dtype r1kit picks for this machine
(fp32 on a CPU without native bf16). For each: bytes of safetensors on disk, bytes of weights in memory (every
parameter and buffer, shared ones once), batch-1 greedy decode tokens/s (a 16-token prompt, 48 new tokens, through
the model's KV cache), held-out perplexity (r1kit.eval's definition; --max-tokens scored tokens, fewer than the
model card's 50,000 to fit the CPU budget) and greedy accuracy on --n held-out arithmetic problems per kind.
QAT rows and the fine-tune control (the same fine-tune without fake quantization, then post-training int4:
what QAT must beat, separating QAT's gain from the fine-tune's own effect) need a fine-tune (minutes per step
count on a CPU): they are read from --reuse DIR/qat-int8, DIR/qat-int4, DIR/finetune when there (``r1kit compress
r1kit/nano DIR/qat-int4 --method qat-int4 --max-steps 100``), else run with --qat-steps (0 = skip them).
int4 gptq / int4 awq are int4 with --calibration (r1kit.compress.calibrated). The ONNX row: export to model.onnx
(fp32), ORT logits against r1kit's, ORT's greedy continuation against r1kit's, and ORT decode tokens/s (no cache:
every step runs the prefix) with and without ORT's int8 quantization.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from r1kit.api import R1Model, resolve_model_path
from r1kit.compress import compress
from r1kit.eval import eval_arithmetic, heldout_ids, perplexity
from r1kit.tokenizer import Tokenizer
from r1kit.train.data import KINDS

KD_DATA = Path(__file__).resolve().parents[1] / "configs" / "compress-kd.yaml"  # half code, half arithmetic
ROWS: dict[str, tuple[str, dict]] = {  # row -> (method, options), the most telling first (a cut-short run keeps them)
    "int8": ("int8", {}),
    "int4": ("int4", {}),
    "int4 gptq": ("int4", {"calibration": "gptq"}),
    "int4 awq": ("int4", {"calibration": "awq"}),
    "qat-int8": ("qat-int8", {}),
    "qat-int4": ("qat-int4", {}),
    "qat-int4 + kd": ("qat-int4", {"kd": True}),  # QAT on the divergence to the original (r1kit.train.distill)
    "qat-int4 + kd (code+arith data)": ("qat-int4", {"kd": True, "data": str(KD_DATA)}),
    "fine-tune (control)": ("prune-unstructured", {"sparsity": 0.0}),  # QAT's fine-tune without quantization
    "fine-tune + int4 (control)": ("int4", {}),  # ... then post-training int4: what QAT must beat
    "prune-2:4": ("prune-2:4", {}),
    "prune-2:4 + recovery": ("prune-2:4", {}),  # with --qat-steps of recovery fine-tune (masked gradients)
    "prune-structured": ("prune-structured", {"heads": 3, "mlp_keep": 0.75, "experts": 6}),
    "experts 8->6 dropped": ("prune-structured", {"experts": 6}),
    "experts 8->6 merged": ("prune-structured", {"experts": 6, "expert_reduce": "merge"}),
    "low-rank 0.95": ("low-rank", {"energy": 0.95}),
    "cluster 16": ("cluster", {"clusters": 16}),
    "prune-unstructured 50%": ("prune-unstructured", {"sparsity": 0.5}),
    "fp8": ("fp8", {}),
}
COMBINED = "prune-structured + int4"
REF = "bf16 (reference)"
ROWS[COMBINED] = ("int4", {})
ROWS["prune-2:4 + distill"] = ("distill", {})  # recovered from the original as teacher (logit KD)
ROWS["prune-structured + distill"] = ("distill", {})
ROWS["prune-structured + distill + int4 gptq"] = ("int4", {"calibration": "gptq"})
# rows that fine-tune --qat-steps steps (the same recipe)
TRAINS = ("qat-int8", "qat-int4", "qat-int4 + kd", "qat-int4 + kd (code+arith data)", "fine-tune (control)",
          "prune-2:4 + recovery", "prune-2:4 + distill", "prune-structured + distill")
CHAINED = {COMBINED: "prune-structured", "fine-tune + int4 (control)": "fine-tune (control)",  # row -> its source row
           "prune-2:4 + distill": "prune-2:4", "prune-structured + distill": "prune-structured",
           "prune-structured + distill + int4 gptq": "prune-structured + distill"}
FOLDERS = {"int4 gptq": "int4-gptq", "int4 awq": "int4-awq", "fine-tune (control)": "finetune",
           "experts 8->6 dropped": "experts6-drop", "experts 8->6 merged": "experts6-merge",
           "prune-2:4 + recovery": "prune24-ft", "qat-int4 + kd": "qat-int4-kd",
           "qat-int4 + kd (code+arith data)": "qat-int4-kd-mix", "prune-2:4 + distill": "prune24-kd",
           "prune-structured + distill": "structured-kd",
           "prune-structured + distill + int4 gptq": "structured-kd-gptq",
           "fine-tune + int4 (control)": "finetune-int4", COMBINED: "structured-int4"}
PROMPT, NEW = 16, 48


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


@torch.no_grad()
def decode_tok_s(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[float, list[int]]:
    """Batch-1 greedy decode through the KV cache: (new tokens per second after the prefill, the tokens)."""
    cache = model.new_cache(1, PROMPT + NEW)
    logits = model(prompt, cache, last_only=True)
    out: list[int] = []
    start = time.perf_counter()
    for _ in range(NEW):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(nxt))
        logits = model(nxt, cache)
    return NEW / (time.perf_counter() - start), out


def measure(folder: Path, ids: torch.Tensor, prompt: torch.Tensor, a: argparse.Namespace) -> dict:
    model = R1Model.from_pretrained(folder, device="cpu")
    ppl = perplexity(model.model, ids, max_tokens=a.max_tokens)
    tok_s, greedy = decode_tok_s(model.model, prompt)
    arith = eval_arithmetic(model, a.kinds, n=a.n, progress=False)
    return {"perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "decode_tok_s": tok_s, "greedy": greedy,
            "arithmetic_accuracy": arith["accuracy"],
            "arithmetic_mean": sum(arith["accuracy"].values()) / len(arith["accuracy"]),
            "model_bytes": model_bytes(model.model),
            "disk_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            "dtype": str(next(model.model.parameters()).dtype).removeprefix("torch.")}


def build(row: str, src: Path, root: Path, a: argparse.Namespace) -> Path | None:
    """The row's checkpoint: reused from --reuse (or this run), or written now (None: a row that fine-tunes
    without --qat-steps). A chained row compresses its source row's checkpoint further."""
    method, options = ROWS[row]
    name = FOLDERS.get(row, row.split()[0])
    for folder in ([Path(a.reuse) / name] if a.reuse else []) + [root / name]:
        if (folder / "config.json").is_file():
            return folder
    if row in TRAINS:
        if not a.qat_steps:
            return None
        options = {**options, "max_steps": a.qat_steps, "batch_size": 4, "work_dir": str(root / f"{name}-run")}
    if row in CHAINED:
        src = build(CHAINED[row], src, root, a)
        if src is None:
            return None
    compress(src, root / name, method, options)
    return root / name


def onnx_row(src: Path, root: Path, prompt: torch.Tensor, threads: int, with_cache: bool = False) -> dict:
    from r1kit.checkpoint import load_model
    from r1kit.export import OrtGreedy, export_onnx
    from r1kit.export.onnx import quantize_onnx_int8

    model = load_model(src, "cpu", torch.float32)
    check = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(check).numpy()
    r1_tok_s, r1_greedy = decode_tok_s(load_model(src, "cpu", torch.float32), prompt)  # fp32, as exported
    start = time.perf_counter()
    file = export_onnx(model, root / "onnx", with_cache=with_cache)
    export_s = time.perf_counter() - start
    row = {"export_seconds": export_s, "onnx_bytes": file.stat().st_size, "with_cache": with_cache,
           "r1kit_fp32_decode_tok_s": r1_tok_s}
    for name, f in (("fp32", file), ("int8", quantize_onnx_int8(file, root / "onnx" / "model.int8.onnx"))):
        ort = OrtGreedy(f, threads=threads)
        got = ort.logits(check.numpy())
        start = time.perf_counter()
        tokens = ort.generate(prompt.numpy(), NEW)[0][PROMPT:]
        row[name] = {"bytes": f.stat().st_size, "decode_tok_s": NEW / (time.perf_counter() - start),
                     "max_rel_logit_error": float(np.abs(got - ref).max() / np.abs(ref).max()),
                     "greedy_equal_to_r1kit": tokens == r1_greedy,
                     "greedy_agreement": float(np.mean([x == y for x, y in zip(tokens, r1_greedy, strict=True)]))}
    return row


def print_table(rows: dict[str, dict], kinds: list[str]) -> None:
    base = rows["bf16 (reference)"]
    print("| method | disk MiB | weights in memory MiB | decode tok/s | perplexity (vs bf16) | arithmetic mean | "
          + " | ".join(kinds) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(kinds))
    for name, r in rows.items():
        if "skipped" in r:
            print(f"| {name} | {r['skipped']} |")
            continue
        acc = " | ".join(f"{r['arithmetic_accuracy'][k]:.0%}" for k in kinds)
        print(f"| {name} | {r['disk_bytes'] / 2**20:.2f} | {r['model_bytes'] / 2**20:.2f} | {r['decode_tok_s']:.1f} | "
              f"{r['perplexity']:.2f} ({r['perplexity'] / base['perplexity'] - 1:+.1%}) | "
              f"{r['arithmetic_mean']:.0%} | {acc} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="r1kit/nano")
    p.add_argument("--max-tokens", type=int, default=10_000, help="held-out tokens scored for perplexity")
    p.add_argument("--n", type=int, default=8, help="arithmetic problems per kind")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", default=None, help="folder of prebuilt checkpoints named by row (qat-int4, ...)")
    p.add_argument("--qat-steps", type=int, default=0, help="fine-tune steps for QAT rows not in --reuse (0: skip)")
    p.add_argument("--only", default=None, help="comma-separated rows to run (default: all)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--onnx-with-cache", action="store_true", help="export the graph with its KV cache inputs/outputs")
    p.add_argument("--reference-json", default=None,
                   help="take the bf16 reference row from this earlier --json output instead of measuring it again")
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.kinds = a.kinds.split(",")
    src = resolve_model_path(a.model)
    ids = heldout_ids(Tokenizer.from_dir(src))
    prompt = ids[:PROMPT][None]  # (1, 16) held-out code as the decode prompt
    only = set(a.only.split(",")) if a.only else None
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="r1kit-bench-compress-") as tmp:
        root = Path(tmp)
        onnx = None if a.no_onnx else onnx_row(src, root, prompt, a.threads, a.onnx_with_cache)  # first: the export
        write_json(a, rows, onnx)
        if a.reference_json:
            rows[REF] = {**json.loads(Path(a.reference_json).read_text())["rows"][REF], "from": a.reference_json}
        for name in ["bf16 (reference)", *ROWS]:
            if (only and name not in only and name != REF) or name in rows:
                continue
            start = time.perf_counter()
            folder = src if name == "bf16 (reference)" else build(name, src, root, a)
            if folder is None:
                rows[name] = {"skipped": "fine-tunes: pass --qat-steps or --reuse"}
                continue
            rows[name] = {**measure(folder, ids, prompt, a), "seconds": time.perf_counter() - start}
            print(f"{name}: {rows[name]['perplexity']:.2f} ppl, {rows[name]['seconds']:.0f} s", flush=True)
            write_json(a, rows, onnx)  # after every row: a run cut short keeps what it measured
            if name != "bf16 (reference)" and a.reuse:
                dest = Path(a.reuse) / folder.name
                if not dest.exists():
                    shutil.copytree(folder, dest)
    print(f"\n{a.model}: perplexity over {rows['bf16 (reference)']['tokens']} held-out tokens, arithmetic n={a.n} per "
          f"kind (greedy), batch-1 decode {NEW} tokens after {PROMPT}, {a.threads} thread(s), "
          f"{time.perf_counter() - t0:.0f} s in all")
    print_table(rows, a.kinds)
    if onnx:
        print(f"\nONNX (fp32 export, {onnx['export_seconds']:.0f} s, {onnx['onnx_bytes'] / 2**20:.1f} MiB): "
              f"r1kit fp32 cached decode {onnx['r1kit_fp32_decode_tok_s']:.1f} tok/s")
        for k in ("fp32", "int8"):
            o = onnx[k]
            cache = "with KV cache" if onnx["with_cache"] else "no cache"
            print(f"  ORT {k}: {o['bytes'] / 2**20:.1f} MiB, {o['decode_tok_s']:.1f} tok/s ({cache}), max |logit "
                  f"error| / max |logit| {o['max_rel_logit_error']:.2e}, greedy {NEW} tokens equal to r1kit's: "
                  f"{o['greedy_equal_to_r1kit']} ({o['greedy_agreement']:.0%})")
    write_json(a, rows, onnx)
    if a.json:
        print(f"wrote {a.json}")


def write_json(a: argparse.Namespace, rows: dict[str, dict], onnx: dict | None) -> None:
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "kinds": a.kinds, "n": a.n,
                                            "max_tokens": a.max_tokens, "rows": rows, "onnx": onnx}, indent=2))


if __name__ == "__main__":
    main()
