"""TFLite / LiteRT export through Google's ``litert-torch`` converter, when it is installed (it is not part of any
r1kit extra: it pins its own torch and pulls TensorFlow).

    r1kit export r1kit/nano nano-tflite --format tflite

When the converter is missing, or fails on the model, the command says so in one line (see ``export_tflite``).
The model is made exportable exactly as for ONNX (``r1kit.export.onnx.make_exportable``) and converted for a
fixed input shape [1, sequence] (TFLite graphs are static); ``ai-edge-litert``'s interpreter checks the logits.
Tried here (litert-torch 0.10, ai-edge-litert 2.3.0): a dense Llama-shaped model converts and matches r1kit to
3e-7; an MoE model converts but the interpreter cannot load it (the router's top-k becomes STABLEHLO_SORT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1kit.export.onnx import ExportError, ExportGraph, make_exportable

TFLITE_SEQUENCE = 32  # the static sequence length of the converted graph


def export_tflite(src: str | Path, out: str | Path, sequence: int = TFLITE_SEQUENCE) -> dict[str, Any]:
    """Convert checkpoint `src` to `out`/model.tflite with litert-torch and compare its logits with r1kit's.

    Raises ExportError saying why when litert-torch (or the ai-edge-litert interpreter) is not installed or the
    conversion fails.
    """
    try:
        import litert_torch
    except ImportError as e:
        raise ExportError(f"--format tflite needs Google's litert-torch converter, which is not installed ({e}); "
                          "it pins its own torch and pulls TensorFlow, so install it in a separate environment: "
                          "pip install litert-torch ai-edge-litert") from None
    from r1kit.api import resolve_model_path
    from r1kit.checkpoint import load_model

    model = make_exportable(load_model(resolve_model_path(src), "cpu", torch.float32))
    ids = torch.randint(0, model.config.vocab_size, (1, sequence))
    try:
        edge = litert_torch.convert(ExportGraph(model).eval(), (ids,))
    except Exception as e:  # noqa: BLE001 - one line naming the failure, not the converter's trace
        raise ExportError(f"litert-torch could not convert the model: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "model.tflite"
    edge.export(str(file))
    with torch.no_grad():
        ref = model(ids).numpy()
    got = edge(ids.to(torch.int32))  # the converted graph takes int32 token ids (LiteRT has no int64 inputs here)
    err = float(abs(got - ref).max() / abs(ref).max())
    return {"tflite": str(file), "bytes": file.stat().st_size, "sequence": sequence, "max_rel_error": err}
