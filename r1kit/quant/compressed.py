"""The modules a compressed checkpoint needs beyond r1kit's own: low-rank and clustered (palettised) linears.

    LowRankLinear    y = (x A^T) B^T (+ bias); A (r, K), B (N, r): r * (N + K) numbers instead of N * K.
    ClusteredLinear  4-bit indices into a 16-entry codebook per output row (or per group of `group` inputs):
                     w[n, k] = codebook[n, g(k), index[n, k]]; indices packed two per byte as r1kit's int4.

Both load straight from a checkpoint: the ``"compression"`` record in config.json lists the swapped modules and
their shapes (``structure``); ``swap_structure`` puts empty modules of those shapes in place before the tensors
are read. ClusteredLinear is a ``QuantizedLinear`` (its indices and codebook keep their stored dtypes through
saving, loading and casting, like int8/int4 weights). Checkpoint names: ``X.weight_a`` / ``X.weight_b`` (low-rank),
``X.weight`` (uint8 indices, (N, K/2)) / ``X.weight_codebook`` ((N, K/group, 16)) for a linear X.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.quant.formats import pack_int4, unpack_int4
from r1kit.quant.linear import QuantizedLinear

CLUSTER_LEVELS = 16  # 4-bit indices


class LowRankLinear(nn.Module):
    """A linear layer factorised as B @ A (rank r): two matmuls of r * (N + K) multiply-adds per row."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # (r, K)
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # (N, r)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight B @ A this module represents."""
        return (self.weight_b.float() @ self.weight_a.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class ClusteredLinear(QuantizedLinear):
    """Palettised weight: 4-bit indices (two per byte) into a codebook of 16 values per row and input group."""

    method = "cluster"
    _quant_buffers = ("weight", "weight_codebook")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | None = None,
                 bias_dtype: torch.dtype = torch.float32, group: int | None = None,
                 codebook_dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features, bias, device, bias_dtype)
        self.group = group or in_features
        if in_features % 2 or in_features % self.group:
            raise ValueError(f"ClusteredLinear: group {self.group} must divide the {in_features} (even) inputs")
        groups = in_features // self.group
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_codebook", torch.zeros(out_features, groups, CLUSTER_LEVELS,
                                                            dtype=codebook_dtype, device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decode path: look every index up in its row's (and group's) codebook -> (N, K)."""
        n, k = self.out_features, self.in_features
        idx = unpack_int4(self.weight).long().view(n, k // self.group, self.group)  # (N, G, group)
        return self.weight_codebook.float().gather(2, idx).view(n, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x)

    @classmethod
    def from_parts(cls, indices: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                   codebook_dtype: torch.dtype = torch.bfloat16) -> ClusteredLinear:
        """indices (N, K) in [0, 16), codebook (N, K/group, 16) -> the module."""
        n, k = indices.shape
        m = cls(k, n, bias is not None, indices.device, group=k // codebook.shape[1], codebook_dtype=codebook_dtype)
        m.weight = pack_int4(indices)
        m.weight_codebook = codebook.to(codebook_dtype).contiguous()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_structure(model: nn.Module, record: dict[str, Any], source: str) -> None:
    """Put empty LowRankLinear / ClusteredLinear modules where the checkpoint's compression record says, so that
    its tensors can be read into them. record["structure"]: {"low_rank": {name: rank}, "cluster": {name: group}}.

    Raises ValueError naming the module when the record does not fit the model.
    """
    structure = record.get("structure") or {}
    for kind, entries in structure.items():
        if kind not in ("low_rank", "cluster") or not isinstance(entries, dict):
            raise ValueError(f"{source}: compression.structure.{kind} is not a known module kind "
                             "(expected low_rank or cluster, each a mapping of module name -> size)")
        for name, size in entries.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{source}: compression.structure.{kind} names {name!r}, which the model lacks"
                                 ) from None
            if not isinstance(old, nn.Linear) or not isinstance(size, int):
                raise ValueError(f"{source}: compression.structure.{kind}.{name} must be a linear layer and an "
                                 f"integer, got {type(old).__name__} and {size!r}")
            has_bias = old.bias is not None
            if kind == "low_rank":
                new: nn.Module = LowRankLinear(old.in_features, old.out_features, size, has_bias, old.weight.device)
            else:
                new = ClusteredLinear(old.in_features, old.out_features, has_bias, old.weight.device, group=size)
            set_module(model, name, new)
