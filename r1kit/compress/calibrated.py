"""Calibrated int4: GPTQ's error correction and AWQ's activation-aware scales, both written in r1kit's int4 format.

    calibrate_int4(model, "gptq", group_size=64, ids=calibration_ids(...))   # then the model holds Int4Linear etc.

Both start from one forward pass of the fp32 model over calibration token ids (training-side text, never the
held-out files) and end with the modules ``quantize_model(model, "int4")`` makes (Int4Linear, QuantizedExperts),
so the result loads, serves and runs the same kernels as plain round-to-nearest (RTN) int4.

GPTQ (Frantar et al. 2023): for each quantized weight W (N, K) with the Hessian H = sum_x x x^T of its inputs,
quantize one input column at a time and spread that column's error over the columns not yet quantized with
the optimal-brain-surgeon update  W[:, F] -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_i,F  (F: the remaining
columns), computed from the upper Cholesky factor of H^-1 as in the paper, in blocks. A group's scale and zero
are taken (by the format's own int4_params) from the group's weights as updated when its first column is
reached. Routed experts get one Hessian per expert from the tokens routed to it. Modules the calibration pass
does not reach (the MTP layers) are rounded to nearest.

AWQ (Lin et al. 2024): for each set of quantized weights reading the same activation x (K inputs), a
per-input scale s = mean|x|^alpha (normalised), with alpha picked on a grid to minimise the calibration output
error sum ||x W^T - x (RTN(W diag(s)) diag(1/s))^T||^2 (alpha = 0 is plain RTN, so the search never does worse
on its own data). s is multiplied into the weights' columns and its inverse folded into what produces x: the
RMSNorm weight before attention and MLP (the MoE router's columns scaled too, so routing is unchanged), the
q_a_layernorm before MLA's q_b_proj, the up_proj rows before a down_proj, the final norm (and each MTP head's
norm) before an untied lm_head. Not scaled (RTN): o_proj and the routed experts' down projections (their
inputs come from no single foldable weight). The error of a stacked expert weight is measured on every
calibration token (not only its routed ones): a proxy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.attention import RMSNorm
from r1kit.model.moe import MLP, Experts, MoE, Router
from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.formats import dequantize_int4, int4_codes, int4_params, pack_int4, quantize_int4
from r1kit.quant.linear import Int4Linear
from r1kit.quant.model import quantize_model
from r1kit.quant.qat import qat_plan

log = logging.getLogger("r1kit.compress")
CALIBRATIONS = ("gptq", "awq")


# ---------------------------------------------------------------------------------------------------- GPTQ


@torch.no_grad()
def gptq(w: torch.Tensor, h: torch.Tensor, group_size: int, damp: float = 0.01,
         scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight. w (N, K), h (K, K) = sum of x x^T over calibration inputs x (K,).

    Returns codes (N, K) fp32 in [0, 15], scale and zero (N, K / group_size) in scale_dtype: r1kit's int4 format
    (w ~ (codes - 8) * scale + zero per group). damp adds damp * mean(diag h) to the diagonal (as the paper)."""
    W = w.detach().double().clone()
    N, K = W.shape
    H = h.detach().double().clone()
    dead = H.diagonal() == 0  # inputs the calibration never excited: independent, plain rounding
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U
    codes = torch.zeros(N, K, dtype=torch.float32)
    scale = torch.zeros(N, K // group_size, dtype=scale_dtype)
    zero = torch.zeros_like(scale)
    block = group_size * max(1, 128 // group_size)  # whole groups per block: a group's params see its updates
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1, E1 = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, dtype=torch.float64)  # (N, B) weights, scaled errors
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                s, z = int4_params(W1[:, i:i + group_size].float(), scale_dtype)  # (N,), (N,)
                scale[:, col // group_size], zero[:, col // group_size] = s, z
                s64, z64 = s.double(), z.double()
            q = int4_codes(W1[:, i], s64, z64)  # (N,)
            codes[:, col] = q.float()
            err = (W1[:, i] - ((q - 8) * s64 + z64)) / U[col, col]  # (N,)
            W1[:, i:] -= err[:, None] * U[col, col:b1][None]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the block's errors spread over the later columns at once
    return codes, scale, zero


def int4_error(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the calibration output error sum_x ||(W - Q) x||^2 of a quantized weight."""
    q = dequantize_int4(pack_int4(codes), scale, zero).double()
    d = w.double() - q
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


# ---------------------------------------------------------------------------------------------------- AWQ


def rtn_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w (..., K) -> its plain round-to-nearest int4 round trip (fp32)."""
    return dequantize_int4(*quantize_int4(w, group_size))


@torch.no_grad()
def awq_search(x: torch.Tensor, weights: list[tuple[torch.Tensor, int]], grid: int = 20
               ) -> tuple[torch.Tensor, dict]:
    """AWQ's scale search. x (T, K) calibration inputs; weights: (W (..., K), group size) pairs that all read x.

    Returns s (K,) and {"alpha", "error_rtn", "error_awq"}: the summed output errors of plain RTN and of the
    scaled quantization sum ||x W^T - x (RTN(W diag(s)) / s)^T||^2 at the chosen alpha."""
    x = x.float()
    a = x.abs().mean(0).clamp(min=1e-5)  # (K,)

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for w, g in weights:
            w2 = w.float().reshape(-1, w.shape[-1])  # (N, K)
            d = w2 - rtn_int4(w2 * s, g) / s
            total += float((x @ d.T).pow(2).sum())
        return total

    best = (error(torch.ones_like(a)), 0.0, torch.ones_like(a))
    rtn = best[0]
    for i in range(1, grid):
        s = a.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1: neither the weights nor the norm blow up
        e = error(s)
        if e < best[0]:
            best = (e, i / grid, s)
    return best[2], {"alpha": best[1], "error_rtn": rtn, "error_awq": best[0]}


@dataclass
class ScaleGroup:
    """Weights reading one activation: `source`'s input (B, T, K); `prevs` produce it (dim 0 indexes K: a norm
    weight, up_proj rows) and absorb 1/s; `consumers` (..., K) are scaled by s; `quantized` name them in the plan."""

    name: str
    source: nn.Module
    prevs: list[torch.Tensor]
    consumers: list[tuple[str, torch.Tensor]]
    rows: list[torch.Tensor] = field(default_factory=list)


def _mlp_groups(name: str, mlp: nn.Module, norm: RMSNorm) -> list[ScaleGroup]:
    consumers: list[tuple[str, torch.Tensor]] = []
    groups, group_name = [], f"{name}.in"
    dense = mlp.shared_experts if isinstance(mlp, MoE) else mlp
    if isinstance(mlp, MoE):
        consumers += [(f"{name}.gate", mlp.gate.weight)] if isinstance(mlp.gate, Router) else []
        if isinstance(mlp.experts, Experts):
            consumers.append((f"{name}.experts", mlp.experts.gate_up_proj))
        name = f"{name}.shared_experts"
    if isinstance(dense, MLP):
        consumers += [(f"{name}.gate_proj", dense.gate_proj.weight), (f"{name}.up_proj", dense.up_proj.weight)]
        groups.append(ScaleGroup(f"{name}.down_proj", dense.down_proj, [dense.up_proj.weight],
                                 [(f"{name}.down_proj", dense.down_proj.weight)]))
    return [ScaleGroup(group_name, mlp, [norm.weight], consumers), *groups]


def scale_groups(model: nn.Module) -> list[ScaleGroup]:
    """The foldable AWQ groups of a Transformer (main blocks and an untied lm_head; not the MTP blocks)."""
    groups: list[ScaleGroup] = []
    for i, block in enumerate(model.layers):
        attn, pre = block.self_attn, f"layers.{i}"
        ins = [n for n in ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")
               if isinstance(getattr(attn, n, None), nn.Linear)]
        groups.append(ScaleGroup(f"{pre}.self_attn.in", attn, [block.input_layernorm.weight],
                                 [(f"{pre}.self_attn.{n}", getattr(attn, n).weight) for n in ins]))
        if isinstance(getattr(attn, "q_a_layernorm", None), RMSNorm):
            groups.append(ScaleGroup(f"{pre}.self_attn.q_b_proj", attn.q_b_proj, [attn.q_a_layernorm.weight],
                                     [(f"{pre}.self_attn.q_b_proj", attn.q_b_proj.weight)]))
        groups += _mlp_groups(f"{pre}.mlp", block.mlp, block.post_attention_layernorm)
    if model.lm_head.weight is not model.embed_tokens.weight:
        prevs = [model.norm.weight, *(m.shared_head_norm.weight for m in model.mtp)]
        groups.append(ScaleGroup("lm_head", model.lm_head, prevs, [("lm_head", model.lm_head.weight)]))
    return groups


@torch.no_grad()
def apply_awq(model: nn.Module, groups: list[ScaleGroup], plan: dict[str, int], grid: int = 20) -> dict:
    """Search each group's scales on its sampled rows and fold them in (exact before quantization)."""
    done = {}
    for grp in groups:
        quantized = [(t, plan[n]) for n, t in grp.consumers if n in plan]
        if not grp.rows or not quantized:
            continue
        s, info = awq_search(torch.cat(grp.rows), quantized, grid)  # (K,)
        for p in grp.prevs:
            p.div_(s.view(-1, *[1] * (p.dim() - 1)).to(p.dtype))
        for _, t in grp.consumers:
            t.mul_(s.to(t.dtype))
        done[grp.name] = info
    return done


# ---------------------------------------------------------------------------------------------------- calibration


class _Collector:
    """Forward pre-hooks that gather, during the calibration pass, Hessians (GPTQ) or input rows (AWQ)."""

    def __init__(self, max_rows: int = 4096, seed: int = 0):
        self.hessians: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.max_rows, self.gen = max_rows, torch.Generator().manual_seed(seed)

    def add_hessian(self, name: str, module: nn.Module) -> None:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (T, K)
            self.hessians[name] = self.hessians.get(name, 0) + x.T @ x
        self.handles.append(module.register_forward_pre_hook(hook))

    def add_experts(self, name: str, ex: Experts) -> None:
        def hook(_m: nn.Module, args: tuple) -> None:
            x, _, idx = args  # (N, C), (N, k), (N, k)
            for e in range(ex.n_experts):
                xe = x[(idx == e).any(-1)].double()  # (R, C)
                gate, up = F.linear(xe, ex.gate_up_proj[e].double()).split(ex.hidden, dim=-1)
                he = F.silu(gate) * up  # (R, I)
                for key, v in ((f"{name}.gate_up_proj.{e}", xe), (f"{name}.down_proj.{e}", he)):
                    self.hessians[key] = self.hessians.get(key, 0) + v.T @ v
        self.handles.append(ex.register_forward_pre_hook(hook))

    def add_rows(self, group: ScaleGroup) -> None:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (T, K)
            keep = torch.randperm(x.shape[0], generator=self.gen)[: self.max_rows // 8]
            if sum(r.shape[0] for r in group.rows) < self.max_rows:
                group.rows.append(x[keep])
        self.handles.append(group.source.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _calibration_pass(model: nn.Module, ids: torch.Tensor, batch: int = 16) -> None:
    """ids (B, T): the fp32 model run over them, batch rows at a time (the hooks collect)."""
    from tqdm import tqdm

    model.eval()
    for b in tqdm(range(0, ids.shape[0], batch), desc="calibration", leave=False):
        model(ids[b:b + batch])


def _set_gptq(model: nn.Module, plan: dict[str, int], hessians: dict[str, torch.Tensor], group_size: int
              ) -> tuple[int, int]:
    """Quantize (RTN) with quantize_model, then overwrite each calibrated weight's codes, scales and zeros with
    GPTQ's, computed from the fp32 weights kept aside. Returns (GPTQ-quantized tensors, RTN ones)."""
    originals = {n: model.get_submodule(n) for n in plan}
    weights = {n: ((m.gate_up_proj.detach().clone(), m.down_proj.detach().clone()) if isinstance(m, Experts)
                   else (m.weight.detach().clone(),)) for n, m in originals.items()}
    quantize_model(model, "int4", group_size=group_size)
    done = rtn = 0
    for name in plan:
        mod = model.get_submodule(name)
        if isinstance(mod, QuantizedExperts):
            for t, w in zip(("gate_up_proj", "down_proj"), weights[name], strict=True):
                if f"{name}.{t}.0" not in hessians and not any(k.startswith(f"{name}.{t}.") for k in hessians):
                    rtn += 1  # never reached by the calibration pass (an MTP block)
                    continue
                zero_h = torch.zeros(w.shape[-1], w.shape[-1], dtype=torch.float64)  # an expert never routed: RTN
                hs = [hessians.get(f"{name}.{t}.{e}", zero_h) for e in range(w.shape[0])]
                parts = [gptq(w[e], hs[e], mod.group_size) for e in range(w.shape[0])]
                codes, scale, zero = (torch.stack(p) for p in zip(*parts, strict=True))
                mod._buffers[t], mod._buffers[t + "_scale"], mod._buffers[t + "_zero"] = pack_int4(codes), scale, zero
                mod._int4_cache, done = {}, done + 1
        elif isinstance(mod, Int4Linear) and name in hessians:
            codes, mod.weight_scale, mod.weight_zero = gptq(weights[name][0], hessians[name], mod.group_size)
            mod.weight, mod._cache, done = pack_int4(codes), {}, done + 1
        else:
            rtn += 1
    return done, rtn


def calibrate_int4(model: nn.Module, method: str, group_size: int, ids: torch.Tensor) -> dict:
    """int4-quantize `model` (fp32 Transformer) in place with GPTQ or AWQ calibrated on ids (B, T).

    Leaves the modules quantize_model(model, "int4", group_size=...) leaves; returns the stats."""
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {method!r}")
    plan = qat_plan(model, "int4", group_size)  # module name -> its int4 group (as quantize_model picks)
    col = _Collector()
    groups = scale_groups(model) if method == "awq" else []
    for name in plan if method == "gptq" else ():
        mod = model.get_submodule(name)
        col.add_experts(name, mod) if isinstance(mod, Experts) else col.add_hessian(name, mod)
    for grp in groups:
        col.add_rows(grp)
    try:
        _calibration_pass(model, ids)
    finally:
        col.remove()
    if method == "gptq":
        done, rtn = _set_gptq(model, plan, col.hessians, group_size)
        return {"calibration": "gptq", "gptq_modules": done, "rtn_modules": rtn, "tokens": ids.numel()}
    scaled = apply_awq(model, groups, plan)
    stats = quantize_model(model, "int4", group_size=group_size)
    return {"calibration": "awq", "scaled_groups": len(scaled), "swapped": stats["swapped"], "tokens": ids.numel(),
            "error_rtn": sum(v["error_rtn"] for v in scaled.values()),
            "error_awq": sum(v["error_awq"] for v in scaled.values()),
            "alphas": {k: v["alpha"] for k, v in scaled.items()}}
