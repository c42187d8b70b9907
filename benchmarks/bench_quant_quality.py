"""Quality and size of the quantized checkpoints of the bundled r1kit/nano, against bf16 and fp32, in one run.

    python benchmarks/bench_quant_quality.py [--json out.json] [--max-tokens 50000] [--n 32] [--threads 1]

Each format goes through the user's path: fp32 and bf16 are ``save_model`` copies, int8 / int4 / fp8 are written
by ``r1kit quantize r1kit/nano --to METHOD OUT`` and loaded back with ``R1Model.from_pretrained(OUT)`` (bf16
activations; fp32 runs in fp32). For each: held-out perplexity (r1kit.eval's one definition: ``heldout_ids`` and
``perplexity``, --max-tokens tokens scored in windows spread evenly over the held-out standard-library text; the
default budget is the model card's, so the fp32 row reproduces its figure) and its change relative to bf16, greedy
accuracy on --n held-out arithmetic problems per kind (``r1kit.eval.eval_arithmetic``), and the bytes of the
weights that quantization replaces (linear layers and MoE experts; kv_b_proj, embeddings, norms and the router
are never quantized), of the whole model in memory, and of the safetensors on disk.
Targets (issue 4): int8 perplexity within 1% of bf16, fp8 within 2%, int4 reported. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from r1kit.__main__ import main as cli
from r1kit.api import R1Model, resolve_model_path
from r1kit.checkpoint import load_model, save_model
from r1kit.eval import PERPLEXITY_TOKENS, eval_arithmetic, heldout_ids, perplexity
from r1kit.model.moe import Experts
from r1kit.quant import QuantizedExperts, QuantizedLinear
from r1kit.tokenizer import Tokenizer

FORMATS = ("fp32", "bf16", "int8", "int4", "fp8")
TARGETS = {"int8": 0.01, "fp8": 0.02}  # largest relative perplexity change against bf16


def replaced_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights quantization replaces: every linear layer and expert stack but MLA's kv_b_proj and
    a head tied to the embedding (quantize_model keeps those), in whatever format they are now."""
    tied = model.embed_tokens.weight
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedExperts)):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear) and not name.endswith("kv_b_proj") and m.weight is not tied:
            total += m.weight.nbytes
        elif isinstance(m, Experts):
            total += m.gate_up_proj.nbytes + m.down_proj.nbytes
    return total


def model_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


def write_checkpoints(src: Path, root: Path) -> dict[str, Path]:
    """One folder per format: full-precision copies by save_model, quantized ones by `r1kit quantize`."""
    folders = {}
    for fmt in FORMATS:
        out = root / fmt
        if fmt in ("fp32", "bf16"):
            save_model(load_model(src), out, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (out / name).write_bytes((src / name).read_bytes())
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                if cli(["quantize", str(src), str(out), "--to", fmt]) != 0:
                    raise RuntimeError(f"r1kit quantize --to {fmt} failed")
        folders[fmt] = out
    return folders


def measure(folder: Path, fmt: str, ids: torch.Tensor, max_tokens: int, kinds: list[str], n: int) -> dict:
    model = R1Model.from_pretrained(folder, device="cpu", dtype="fp32" if fmt == "fp32" else "bf16")
    start = time.perf_counter()
    ppl = perplexity(model.model, ids, max_tokens=max_tokens)
    ppl_s = time.perf_counter() - start
    start = time.perf_counter()
    arith = eval_arithmetic(model, kinds, n=n, progress=False)
    return {**{k: ppl[k] for k in ("perplexity", "nll_per_token", "tokens", "of_tokens", "windows", "window")},
            "perplexity_seconds": ppl_s, "arithmetic_accuracy": arith["accuracy"], "arithmetic_n": n,
            "arithmetic_seconds": time.perf_counter() - start,
            "replaced_weight_bytes": replaced_weight_bytes(model.model), "model_bytes": model_bytes(model.model),
            "disk_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="r1kit/nano")
    p.add_argument("--max-tokens", type=int, default=PERPLEXITY_TOKENS, help="held-out tokens scored for perplexity")
    p.add_argument("--n", type=int, default=32, help="arithmetic problems per kind (one batch of 32)")
    p.add_argument("--kinds", default="add3,sub3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kinds = a.kinds.split(",")
    src = resolve_model_path(a.model)
    ids = heldout_ids(Tokenizer.from_dir(src))  # every format has this tokenizer
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="r1kit-quant-quality-") as tmp:
        for fmt, folder in write_checkpoints(src, Path(tmp)).items():
            rows[fmt] = measure(folder, fmt, ids, a.max_tokens, kinds, a.n)
    base, fp32 = rows["bf16"], rows["fp32"]
    for fmt, r in rows.items():
        r["perplexity_change_vs_bf16"] = r["perplexity"] / base["perplexity"] - 1
        r["replaced_weight_fraction_of_fp32"] = r["replaced_weight_bytes"] / fp32["replaced_weight_bytes"]
        if fmt in TARGETS:
            r["target_perplexity_change"] = TARGETS[fmt]
            r["target_met"] = abs(r["perplexity_change_vs_bf16"]) <= TARGETS[fmt]

    print(f"{a.model}: held-out stdlib perplexity over {base['tokens']} of {base['of_tokens']} tokens "
          f"({base['windows']} windows of {base['window']}), arithmetic n={a.n} per kind (greedy), "
          f"{a.threads} thread(s)")
    head = ("| format | perplexity | vs bf16 | target | replaced weights MiB (% fp32) | model MiB | disk MiB | "
            + " | ".join(kinds) + " |")
    print(head)
    print("|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(kinds))
    for fmt, r in rows.items():
        target = ("" if fmt not in TARGETS else
                  f"<= {TARGETS[fmt]:.0%}: {'met' if r['target_met'] else 'MISSED'}")
        acc = " | ".join(f"{r['arithmetic_accuracy'][k]:.0%}" for k in kinds)
        print(f"| {fmt} | {r['perplexity']:.3f} | {r['perplexity_change_vs_bf16']:+.3%} | {target} | "
              f"{r['replaced_weight_bytes'] / 2**20:.2f} ({r['replaced_weight_fraction_of_fp32']:.1%}) | "
              f"{r['model_bytes'] / 2**20:.2f} | {r['disk_bytes'] / 2**20:.2f} | {acc} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "threads": a.threads, "kinds": kinds,
                                            "formats": rows}, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
