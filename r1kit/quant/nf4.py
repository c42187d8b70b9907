"""NF4 (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA", section 3 and appendix E): the frozen base of QLoRA.

The 16 levels are quantiles of N(0, 1) scaled to [-1, 1], asymmetric so that 0 is exact: 8 positive levels from
the quantiles of probabilities linspace(offset, 0.5, 9)[:-1], 7 negative from linspace(offset, 0.5, 8)[:-1],
and 0, with offset = 0.9677 (the midpoint of 1 - 1/(2*15) and 1 - 1/(2*16), as the paper's reference code
chooses); ``nf4_levels()`` computes them, ``NF4_LEVELS`` holds the published table they must equal.

A weight (N, K) is cut into blocks of 64 consecutive values (row-major); each block keeps its absmax (fp32) and
each value the index of the nearest level of value / absmax, two 4-bit indices per byte (first value of a pair in
the low nibble). w = NF4_LEVELS[index] * absmax. Double quantization (optional) stores the absmax values as
int8 around their mean, one fp32 scale per 256 absmax values: the constants cost 8/64 + 32/(64*256) = 0.127 bits
per weight instead of 32/64 = 0.5 (the paper's figures).

``NF4Linear`` is a weight-only quantized linear layer like r1kit's int8/int4 ones (``r1kit.quant.linear``):
forward = dequantize (fp32, then the activation dtype) + F.linear, so gradients flow into the activations and
any adapter on top; there is no fast NF4 kernel (inference speed is not its point here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.quant.linear import QuantizedLinear

BLOCK = 64  # weights per absmax
DQ_BLOCK = 256  # absmax values per double-quantization scale
NF4_OFFSET = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))  # 0.9677083...

# The published table (QLoRA appendix E; bitsandbytes' NF4 code book).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels from the normal quantile function (fp32, ascending); equal to NF4_LEVELS."""
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive quantiles
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative quantiles
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """w (N, K), N*K a multiple of 64 -> {"weight": uint8 (N, K/2), "absmax": fp32 (N*K/64,)} or, with
    double_quant, {"weight", "absmax_q": int8 (blocks,), "absmax_scale": fp32 (ceil(blocks/256),),
    "absmax_mean": fp32 ()}."""
    N, K = w.shape
    if (N * K) % BLOCK or K % 2:
        raise ValueError(f"NF4 needs a weight whose size is a multiple of {BLOCK} and an even row, got {N}x{K}")
    blocks = w.detach().float().reshape(-1, BLOCK)  # (N*K/64, 64)
    absmax = blocks.abs().amax(-1).clamp(min=1e-12)  # (N*K/64,)
    levels = NF4_LEVELS.to(w.device)
    mids = (levels[1:] + levels[:-1]) / 2  # 15 decision boundaries
    idx = torch.bucketize(blocks / absmax[:, None], mids).to(torch.uint8).reshape(N, K)  # nearest level
    packed = idx[:, 0::2] | (idx[:, 1::2] << 4)  # (N, K/2)
    out = {"weight": packed}
    if not double_quant:
        out["absmax"] = absmax
        return out
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-centred.numel()) % DQ_BLOCK
    groups = F.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)  # (G, 256)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / 127  # (G,)
    q = (groups / scale[:, None]).round().clamp(-127, 127).to(torch.int8).flatten()[:centred.numel()]
    out.update(absmax_q=q, absmax_scale=scale, absmax_mean=mean)
    return out


def dequantize_absmax(absmax_q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Double-quantized absmax values back to fp32 (blocks,)."""
    n = absmax_q.numel()
    pad = (-n) % DQ_BLOCK
    q = F.pad(absmax_q.float(), (0, pad)).reshape(-1, DQ_BLOCK)
    return (q * scale[:, None]).flatten()[:n] + mean


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 (N, K/2), absmax fp32 (N*K/64,) -> w (N, K) in dtype."""
    N = packed.shape[0]
    idx = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(N, -1).long()  # (N, K)
    w = NF4_LEVELS.to(packed.device)[idx].reshape(-1, BLOCK) * absmax[:, None]
    return w.reshape(N, -1).to(dtype)


class NF4Linear(QuantizedLinear):
    """NF4 weight (4-bit NormalFloat, blocks of 64 with an fp32 absmax, or double-quantized absmax)."""

    method = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: torch.device | None = None,
                 bias_dtype: torch.dtype = torch.float32, double_quant: bool = False):
        super().__init__(in_features, out_features, bias, device, bias_dtype)
        self.double_quant = double_quant
        blocks = in_features * out_features // BLOCK
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self._quant_buffers = ("weight", "absmax_q", "absmax_scale", "absmax_mean")
            self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scale", torch.ones(-(-blocks // DQ_BLOCK), device=device))
            self.register_buffer("absmax_mean", torch.zeros((), device=device))
        else:
            self._quant_buffers = ("weight", "absmax")
            self.register_buffer("absmax", torch.ones(blocks, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, double_quant: bool = False) -> NF4Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, False, w.device, double_quant=double_quant)
        for name, t in quantize_nf4(w, double_quant).items():
            setattr(m, name, t)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block of 64 weights."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.weight, self.block_absmax(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, double_quant={self.double_quant}"


@torch.no_grad()
def nf4_model(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), double_quant: bool = False) -> int:
    """Swap every nn.Linear of `model` whose name contains none of `skip` (and whose size NF4 can block) for an
    NF4Linear, in place; MLA's kv_b_proj is kept (its absorbed path reads the matrix). Returns how many."""
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or any(s in name for s in skip):
                continue
            if child_name == "kv_b_proj" or (child.in_features * child.out_features) % BLOCK or child.in_features % 2:
                continue
            setattr(parent, child_name, NF4Linear.from_linear(child, double_quant))
            count += 1
    return count
