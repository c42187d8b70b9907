"""Model compression: every method writes a checkpoint that loads and serves like any other.

    r1kit compress r1kit/nano nano-24 --method prune-2:4
    from r1kit.compress import compress
    compress("r1kit/nano", "nano-lr", "low-rank", {"energy": 0.9})

Methods (``METHODS``; options in ``r1kit.compress.driver``): int8, int4, fp8 (post-training, r1kit.quant),
qat-int8, qat-int4 (r1kit.quant.qat, fine-tuned then converted), prune-unstructured, prune-2:4 (masks,
``prune``), prune-structured (heads, channels, experts removed, ``structured``), low-rank (SVD) and cluster
(4-bit palettes), both in ``lowrank``; distill (any of these but the quantized ones, recovered by logit
distillation from the original model as teacher; qat-* take the same teacher with ``kd``). Their modules live
in ``r1kit.quant.compressed``, below checkpoint I/O: config.json's ``"compression"`` record says what was done
(and, through ``previous``, the whole chain), and the loader rebuilds low-rank and clustered layers from it
(``swap_structure``) without importing this package or training.
"""

from r1kit.compress.driver import METHODS, CompressError, compress, parse_options

__all__ = ["METHODS", "CompressError", "compress", "parse_options"]
