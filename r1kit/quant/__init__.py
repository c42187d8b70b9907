"""Weight-only quantization for inference, as module swaps with a reference path.

    from r1kit.quant import quantize_model
    stats = quantize_model(model, "int8")          # or "int4", "fp8"; skip=["lm_head"] keeps the head
    print(stats["weight_bytes_before"], stats["weight_bytes_after"])

Modules (each has ``from_linear``/``from_experts``, ``dequantize()``, ``weight_bytes()``, ``forward`` = the
fast path, ``reference_forward``/``forward_reference`` = dequantize + the plain computation, and
``.reference = True`` to make ``forward`` use the reference):

* ``Int8Linear``          int8 weight, symmetric per output row (fp32 scale = amax / 127).
* ``Int4Linear``          int4 weight, asymmetric per group of 32/64/128/256 inputs (bf16 scale and zero,
                          ``w = (q - 8) * scale + zero``), two nibbles per byte.
* ``Float8WeightLinear``  float8_e4m3fn weight, fp32 scale per output row or per 128x128 block.
* ``QuantizedExperts``    replaces ``r1kit.model.moe.Experts``; int8/int4/fp8 stacked weights; each call only
                          converts the experts that received tokens, then runs the grouped dispatch.

Checkpoints: ``r1kit quantize MODEL --to int8 OUT`` (or ``quantize_model`` then ``r1kit.save_model``) writes the
quantized tensors and a ``quantization_config``; ``R1Model.from_pretrained(OUT)`` / ``r1kit.load_model(OUT)`` load
them straight into these modules (format and checks in ``r1kit.quant.checkpoint``).

The state_dict layouts are in ``r1kit.quant.linear`` and ``r1kit.quant.experts``; the formats (and their error
bounds) in ``r1kit.quant.formats``. Activations stay bf16/fp32: nothing here quantizes activations.
MLA's ``kv_b_proj`` is never quantized (the absorbed decode path reads its ``.weight`` as a matrix).
"""

from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.formats import (
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from r1kit.quant.linear import Float8WeightLinear, Int4Linear, Int8Linear, QuantizedLinear
from r1kit.quant.model import METHODS, quantize_model, set_reference

__all__ = [
    "METHODS",
    "Float8WeightLinear",
    "Int4Linear",
    "Int8Linear",
    "QuantizedExperts",
    "QuantizedLinear",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "set_reference",
    "unpack_int4",
]
