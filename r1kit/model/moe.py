"""DeepSeekMoE: the SwiGLU MLP, the router, grouped routed experts and shared experts.

Routing (per token): scores = softmax or sigmoid of the router logits; optionally restrict the choice to
the `topk_group` best of `n_group` expert groups; pick the top-k experts (DeepSeek-V3 picks with
`scores + e_score_correction_bias`, the auxiliary-loss-free balancing bias, but weights with the raw
scores); optionally renormalise the k weights; multiply by `routed_scaling_factor`.

Dispatch: the (token, expert) pairs are sorted by expert so that each expert's tokens are one contiguous
slice, and all experts run as one grouped matmul (`torch._grouped_mm`) — no Python loop over tokens or
experts. `Experts.forward_reference` is the plain per-token loop it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores experts per token and picks the top-k (group-limited when n_group > 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.method == "noaux_tc":  # the load-balancing bias (a buffer: set by balancing, not by gradients)
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> weights (N, k) fp32, expert ids (N, k)."""
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32, also under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.method != "greedy":
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            group_score = grouped.topk(2, -1).values.sum(-1) if self.method == "noaux_tc" else grouped.amax(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, -1, sorted=False).indices, True)
            keep = keep.unsqueeze(-1).expand_as(grouped).reshape(-1, self.n_experts)
            choice = choice.masked_fill(~keep, float("-inf") if self.method == "noaux_tc" else 0.0)
        idx = choice.topk(self.top_k, -1, sorted=False).indices  # (N, k)
        weights = scores.gather(1, idx)
        if self.norm_topk and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx


class Experts(nn.Module):
    """n routed SwiGLU experts stored stacked: gate_up (E, 2I, C), down (E, C, I)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch. x (N, C), weights/idx (N, k) -> (N, C)."""
        N, k = idx.shape
        flat = idx.flatten()  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // k  # (N*k,) source token of each sorted pair
        ends = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)  # (E,) group ends
        xs = x[token]  # (N*k, C)
        if x.device.type == "cpu" and N * k < self.n_experts:
            ys = self._active_experts(xs, ends)
        else:
            h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=ends)  # (N*k, 2I)
            gate, up = h.split(self.hidden, dim=-1)
            ys = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=ends)  # (N*k, C)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _active_experts(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Decode-sized batches on CPU: fewer (token, expert) pairs than experts, so run only the experts that
        received tokens, each on its contiguous slice (CPU's grouped_mm runs a matmul for every group, empty
        or not). xs (P, C) sorted by expert, ends (E,) -> (P, C)."""
        bounds = torch.cat((ends.new_zeros(1), ends)).tolist()
        parts = []
        for e in range(self.n_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                gate, up = F.linear(xs[lo:hi], self.gate_up_proj[e]).split(self.hidden, dim=-1)
                parts.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(parts)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The plain loop over tokens and their k experts (the definition the fast path must match)."""
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[n, j])
                gate, up = F.linear(x[n], self.gate_up_proj[e]).split(self.hidden)
                out[n] += weights[n, j].to(x.dtype) * F.linear(F.silu(gate) * up, self.down_proj[e])
        return out


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts (always on) + top-k routed experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.reference = False  # route through Experts.forward_reference (tests, debugging)
        self.load: torch.Tensor | None = None  # (E,) tokens routed to each expert by the last training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        weights, idx = self.gate(flat)
        if self.training:  # observed load, for auxiliary-loss-free balancing and the logs
            self.load = torch.bincount(idx.flatten(), minlength=self.experts.n_experts).detach()
        run = self.experts.forward_reference if self.reference else self.experts
        y = run(flat, weights, idx).view(shape)
        return y if self.shared_experts is None else y + self.shared_experts(x)
