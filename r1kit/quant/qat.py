"""Quantization-aware training: fake-quantized weights with a straight-through estimator, then the real modules.

    from r1kit.quant.qat import prepare_qat, convert_qat
    prepare_qat(model, "int4", group_size=64)   # each weight quantize_model would swap reads as its int4 round trip
    ... fine-tune (r1kit.train.loop.train(cfg, prepare=...)) ...
    convert_qat(model)                          # -> Int4Linear / QuantizedExperts, the same values as the fake ones

The fake quantization is a ``torch.nn.utils.parametrize`` parametrization of the weight (``nn.Linear.weight``,
``Experts.gate_up_proj`` / ``down_proj``): the forward sees ``dequantize(quantize(w))`` computed by the very
functions of ``r1kit.quant.formats`` that the real modules are built with, so a fake-quantized model and its
converted int8/int4 model compute the same weights bit for bit (the real modules' reference path; their fast
kernels match it to rounding). The backward passes the gradient straight through to the fp32 master weight.
Which modules get fake-quantized, and their int4 group sizes, are asked of ``quantize_model`` itself (on a
meta-device shadow of the model), so QAT and post-training quantization cannot disagree on the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from r1kit.model.moe import Experts
from r1kit.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from r1kit.quant.model import quantize_model

QAT_METHODS = ("int8", "int4")


class _StraightThrough(torch.autograd.Function):
    """forward: fn(w) (the quantize-dequantize round trip); backward: the identity."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(w).to(w.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class FakeQuantize(nn.Module):
    """Parametrization: w (..., K) -> dequantize(quantize(w)) in r1kit's int8 (per row) or int4 (per group) format."""

    def __init__(self, method: str, group_size: int = 64):
        super().__init__()
        if method not in QAT_METHODS:
            raise ValueError(f"QAT method {method!r}: expected one of {list(QAT_METHODS)}")
        self.method, self.group_size = method, group_size

    def round_trip(self, w: torch.Tensor) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(*quantize_int8(w))
        return dequantize_int4(*quantize_int4(w, self.group_size))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.round_trip)

    def extra_repr(self) -> str:
        return f"method={self.method}, group_size={self.group_size}"


def qat_plan(model: nn.Module, method: str, group_size: int = 64) -> dict[str, int]:
    """module name -> int4 group size (0 for int8) of every module ``quantize_model(model, method)`` would swap."""
    from r1kit.model.transformer import Transformer

    with torch.device("meta"):
        shadow = Transformer(model.config)
    stats = quantize_model(shadow, method, group_size=group_size, structure_only=True)
    return {name: getattr(shadow.get_submodule(name), "group_size", 0) for name in stats["modules"]}


def prepare_qat(model: nn.Module, method: str, group_size: int = 64) -> dict[str, int]:
    """Fake-quantize, in place, every weight that ``quantize_model(model, method, group_size=...)`` would quantize.

    Returns the plan (module name -> group size). The model trains as usual; ``convert_qat`` ends QAT.
    """
    FakeQuantize(method)  # checks the method
    plan = qat_plan(model, method, group_size)
    for name, group in plan.items():
        module = model.get_submodule(name)
        tensors = ("gate_up_proj", "down_proj") if isinstance(module, Experts) else ("weight",)
        for t in tensors:
            parametrize.register_parametrization(module, t, FakeQuantize(method, group or group_size))
    model.qat = {"method": method, "group_size": group_size, "modules": len(plan)}
    return plan


def convert_qat(model: nn.Module) -> dict[str, Any]:
    """End QAT: drop the fake quantization (keeping the trained fp32 master weights) and swap in r1kit's real
    int8/int4 modules with ``quantize_model``; returns its stats. Their weights equal the fake-quantized ones."""
    qat = getattr(model, "qat", None)
    if qat is None:
        raise ValueError("convert_qat: the model was not prepared with prepare_qat")
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for t in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, t, leave_parametrized=False)
    del model.qat
    return quantize_model(model, qat["method"], group_size=qat["group_size"])
