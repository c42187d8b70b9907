"""Quantized checkpoints: the ``quantization_config`` entry of config.json and the checks on the tensors.

    r1kit quantize r1kit/nano --to int8 nano-int8        # or: quantize_model(model, "int8"); save_model(model, out)
    R1Model.from_pretrained("nano-int8")                 # loads straight into Int8Linear / QuantizedExperts

A quantized checkpoint is a Hugging Face-style folder whose safetensors hold each quantized module's tensors
under the module's checkpoint name (``model.layers.0.self_attn.q_a_proj``), with the suffixes of the module's
state_dict (see ``r1kit.quant.linear`` / ``r1kit.quant.experts``); stacked MoE experts are split per expert as
in DeepSeek's checkpoints (``...mlp.experts.3.gate_proj``):

    int8   X.weight int8 (N, K)                       X.weight_scale fp32 (N,)
    int4   X.weight uint8 (N, K/2), two nibbles/byte  X.weight_scale bf16 (N, K/G)   X.weight_zero bf16 (N, K/G)
    fp8    X.weight float8_e4m3fn (N, K)              X.weight_scale fp32 (N,) or per (bo x bi) block

The int4 nibbles are the portable layout: the CPU kernel's own (arch-specific) layout is built from them when a
layer first runs. Every other tensor (embeddings, norms, the router, layers kept unquantized) is stored as in
an ordinary checkpoint. config.json carries

    "quantization_config": {"quant_method": "r1kit", "format_version": 1, "method": "int8", "group_size": 64,
                            "fp8_block": null, "experts": true, "skip": [],
                            "not_quantized": {"layers.0.self_attn.kv_b_proj": "MLA's absorbed path ...", ...},
                            "always_kept": "embeddings, norms, MoE router (fp32)"}

Loading builds the model on the meta device, swaps in empty quantized modules from these options
(``quantize_model(..., structure_only=True)``) and assigns the stored tensors as they are: nothing is
dequantized, and no full-precision copy of a quantized weight is ever made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1kit.fileio import CheckpointError, read_config_json
from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.linear import QuantizedLinear
from r1kit.quant.model import METHODS

QUANT_METHOD = "r1kit"  # quantization_config.quant_method of r1kit's own format (DeepSeek's FP8 says "fp8")
FORMAT_VERSION = 1
ALWAYS_KEPT = "embeddings, norms, MoE router (fp32)"


def is_r1kit_quantized(hf_config: dict[str, Any]) -> bool:
    """Whether a config.json dict describes a checkpoint in r1kit's quantized format."""
    qc = hf_config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def config_entry(model: nn.Module) -> dict[str, Any] | None:
    """The quantization_config to write for `model` (None when quantize_model never ran on it)."""
    q = getattr(model, "quantization", None)
    if q is None:
        return None
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **q["config"],
            "not_quantized": dict(q["skipped"]), "always_kept": ALWAYS_KEPT}


def parse_config_entry(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
    """quantization_config -> the keyword arguments of ``quantize_model`` that rebuild the saved structure.

    Raises CheckpointError naming the field when one is missing, unknown or of the wrong type.
    """
    qc = hf_config["quantization_config"]
    where = f"{source}: quantization_config"
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}.format_version is {version!r}; this r1kit reads version "
                              f"{FORMAT_VERSION} (a newer r1kit wrote it?)")
    method = qc.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{where}.method is {method!r}; expected one of {list(METHODS)}")
    group_size, skip, block, experts = qc.get("group_size"), qc.get("skip", []), qc.get("fp8_block"), qc.get(
        "experts", True)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise CheckpointError(f"{where}.group_size must be an integer, got {group_size!r}")
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise CheckpointError(f"{where}.skip must be a list of regular expressions, got {skip!r}")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int)
                                                                                       for b in block)):
        raise CheckpointError(f"{where}.fp8_block must be null or [rows, cols], got {block!r}")
    if not isinstance(experts, bool):
        raise CheckpointError(f"{where}.experts must be true or false, got {experts!r}")
    return {"method": method, "skip": skip, "group_size": group_size,
            "fp8_block": tuple(block) if block else None, "experts": experts}


def quantized_tensors(model: nn.Module) -> dict[str, torch.dtype]:
    """state_dict name -> dtype of every quantized tensor (values, scales, zeros) of `model`'s quantized modules.

    These keep their stored dtype through saving and loading (the bias of a quantized linear is not one of them).
    """
    out: dict[str, torch.dtype] = {}
    for prefix, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedExperts)):
            names = m._quant_buffers if isinstance(m, QuantizedLinear) else m._buffer_names
            for n in names:
                out[f"{prefix}.{n}" if prefix else n] = m._buffers[n].dtype
    return out


def check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    """A stored quantized tensor has the dtype its module needs; a scale is finite and positive, a zero finite.

    Raises CheckpointError naming the tensor (its checkpoint name).
    """
    if t.dtype != dtype:
        raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, the quantization_config implies "
                              f"{dtype}")
    if name.endswith("_scale") and not bool((torch.isfinite(t) & (t > 0)).all()):
        raise CheckpointError(f"{source}: tensor {name!r} has non-finite or non-positive scales (corrupted?)")
    if name.endswith("_zero") and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{source}: tensor {name!r} has non-finite zero points (corrupted?)")


def stored_method(path: str | Path) -> str | None:
    """The method a checkpoint folder was quantized with in r1kit's format ("int8", ...), or None (reads
    config.json only)."""
    hf = read_config_json(path)
    return parse_config_entry(hf, str(Path(path) / "config.json"))["method"] if is_r1kit_quantized(hf) else None
