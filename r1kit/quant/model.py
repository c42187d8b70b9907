"""quantize_model: swap a model's linear layers (and MoE experts) for quantized ones, in place."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from r1kit.model.attention import MLAttention
from r1kit.model.moe import Experts
from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.formats import INT4_GROUP_SIZES
from r1kit.quant.linear import Float8WeightLinear, Int4Linear, Int8Linear, QuantizedLinear

METHODS = ("int8", "int4", "fp8")
LINEAR_CLASSES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Float8WeightLinear}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {', '.join(map(repr, METHODS))}")
    return method


def _int4_group(k: int, group_size: int) -> int | None:
    """`group_size`, or the largest smaller supported group that divides k (None: no group fits)."""
    return next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if g <= group_size and k % g == 0), None)


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, skip: Iterable[str] = (), *, group_size: int = 64,
                   fp8_block: tuple[int, int] | None = None, experts: bool = True,
                   structure_only: bool = False) -> dict[str, Any]:
    """Replace every nn.Linear (and every MoE ``Experts``) of `model` by its quantized version, in place.

    method: "int8" (Int8Linear), "int4" (Int4Linear, groups of `group_size` inputs; a layer whose input size
        the group does not divide gets the largest smaller group in 32/64/128/256 that does, or is skipped),
        "fp8" (Float8WeightLinear, per-row scales, or per block with `fp8_block=(128, 128)`).
    skip: regular expressions; a module whose qualified name matches one (``re.search``) is kept as it is,
        e.g. ``skip=["lm_head"]`` keeps the output head in full precision (by default it is quantized: in
        small models it is most of the bytes).
    Always kept: ``kv_b_proj`` of MLA attention (its absorbed decode path reads ``kv_b_proj.weight`` as a
        matrix; it is small: kv_lora_rank x heads * (nope + v)), an ``lm_head`` tied to the embedding
        (quantizing it would store the matrix twice), embeddings, norms and the MoE router (``mlp.gate`` is
        not an nn.Linear; routing stays fp32).
    experts: also quantize the routed MoE experts (``QuantizedExperts``, same method).
    structure_only: swap in empty quantized modules of the right shapes without reading the weights: the
        model is then ready for ``load_state_dict`` of a quantized state_dict written with the same options
        (``stats["config"]`` holds them).

    The options and the skipped modules are also recorded on ``model.quantization``, so that
    ``r1kit.save_model`` writes a quantized checkpoint (see ``r1kit.quant.checkpoint``).

    Returns stats: method, swapped (count), modules (name -> class), skipped (name -> reason),
    weight_bytes_before/after (the swapped modules' weights: quantized values + scales, biases excluded),
    model_bytes_before/after (every parameter and buffer, shared ones once), config (the keyword arguments
    that rebuild the same structure).
    """
    check_method(method)
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, not {group_size}")
    patterns = [re.compile(p) for p in skip]
    linear_cls = LINEAR_CLASSES[method]
    stats: dict[str, Any] = {"method": method, "swapped": 0, "modules": {}, "skipped": {},
                             "weight_bytes_before": 0, "weight_bytes_after": 0,
                             "model_bytes_before": _tensor_bytes(model)}
    tied_head = getattr(getattr(model, "embed_tokens", None), "weight", None)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, (nn.Linear, Experts)) or (isinstance(child, Experts) and not experts):
                continue
            if any(p.search(name) for p in patterns):
                stats["skipped"][name] = "matches skip"
                continue
            if isinstance(child, Experts):
                new, before = _quantize_experts(child, method, group_size, structure_only, stats, name)
            else:
                if isinstance(parent, MLAttention) and child_name == "kv_b_proj":
                    stats["skipped"][name] = "MLA's absorbed path reads kv_b_proj.weight"
                    continue
                if tied_head is not None and child.weight is tied_head:
                    stats["skipped"][name] = "tied to the embedding"
                    continue
                new, before = _quantize_linear(child, method, linear_cls, group_size, fp8_block, structure_only,
                                               stats, name)
            if new is None:
                continue
            setattr(parent, child_name, new)
            stats["swapped"] += 1
            stats["modules"][name] = type(new).__name__
            stats["weight_bytes_before"] += before
            stats["weight_bytes_after"] += new.weight_bytes()
    stats["model_bytes_after"] = _tensor_bytes(model)
    stats["config"] = {"method": method, "skip": [p.pattern for p in patterns], "group_size": group_size,
                       "fp8_block": list(fp8_block) if fp8_block else None, "experts": experts}
    model.quantization = {"config": stats["config"], "skipped": dict(stats["skipped"])}  # what save_model writes
    return stats


def _quantize_linear(linear: nn.Linear, method: str, cls: type[QuantizedLinear], group_size: int,
                     fp8_block: tuple[int, int] | None, structure_only: bool, stats: dict, name: str
                     ) -> tuple[QuantizedLinear | None, int]:
    w = linear.weight
    opts: dict[str, Any] = {}
    if method == "int4":
        g = _int4_group(linear.in_features, group_size)
        if g is None:
            stats["skipped"][name] = f"in_features {linear.in_features} not divisible by an int4 group size"
            return None, 0
        opts["group_size"] = g
    elif method == "fp8":
        opts["block_size"] = fp8_block
    if structure_only:
        bias = linear.bias
        new = cls(linear.in_features, linear.out_features, bias is not None, w.device,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, **opts)
    else:
        new = cls.from_linear(linear, **opts)
    return new, w.numel() * w.element_size()


def _quantize_experts(ex: Experts, method: str, group_size: int, structure_only: bool, stats: dict, name: str
                      ) -> tuple[QuantizedExperts | None, int]:
    before = sum(p.numel() * p.element_size() for p in (ex.gate_up_proj, ex.down_proj))
    dim = ex.gate_up_proj.shape[2]
    if method == "int4":
        g = _int4_group(min(dim, ex.hidden), group_size)
        if g is None or dim % g or ex.hidden % g:
            stats["skipped"][name] = f"hidden sizes {dim}, {ex.hidden} not divisible by an int4 group size"
            return None, 0
        group_size = g
    if structure_only:
        return QuantizedExperts(ex.n_experts, dim, ex.hidden, method, group_size, ex.gate_up_proj.device), before
    return QuantizedExperts.from_experts(ex, method, group_size), before


def set_reference(model: nn.Module, reference: bool = True) -> None:
    """Route every quantized module of `model` through its reference path (or back to the fast one)."""
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedExperts)):
            m.reference = reference
