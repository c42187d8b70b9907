"""DeepSeekMoE: the SwiGLU MLP, the router, grouped routed experts, shared experts, and how their outputs combine.

Routing (per token): scores = softmax or sigmoid of the router logits; optionally restrict the choice to
the `topk_group` best of `n_group` expert groups; pick the top-k experts (DeepSeek-V3 picks with
`scores + e_score_correction_bias`, the auxiliary-loss-free balancing bias, but weights with the raw
scores); optionally renormalise the k weights; multiply by `routed_scaling_factor`.

Dispatch: the (token, expert) pairs are sorted by expert so that each expert's tokens are one contiguous
slice, and all experts run as one grouped matmul (`torch._grouped_mm`) — no Python loop over tokens or
experts. `Experts.forward_reference` is the plain per-token loop it is tested against.

Balancing aids, both training-only and off by default (set on each MoE by the training loop from TrainConfig):

- `aux_loss_alpha`: DeepSeek-V3's sequence-wise balance loss (eq. 17-20), `sequence_aux_loss`, kept in
  `MoE.aux_loss` for the loop to add to the objective.
- `capacity_factor`: each expert takes at most ceil(factor * N * k / E) of the N * k (token, expert) pairs of
  a forward, earlier tokens first (`capacity_keep`); a dropped pair contributes zero (the token keeps its
  other experts, the shared expert and the residual). Inference never drops: the output of a token must not
  depend on which other tokens share its batch.

Combiners (`ModelConfig.moe_combiner`): "weighted_sum" (DeepSeekMoE: sum of router weight x expert output) or
"cross_expert_attention" (CEAP, `CrossExpertAttention`: each token attends over its k experts' outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1kit import kernels
from r1kit.model.config import ModelConfig
from r1kit.model.hooks import HookPoint


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
        return self.route(self.score(x))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) -> affinity scores (N, E) fp32 (softmax or sigmoid of the router logits)."""
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32, also under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        return logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (N, E) -> weights (N, k) fp32, expert ids (N, k)."""
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


def dispatch_active(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, n_experts: int,
                    run_expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Decode-sized batches (fewer (token, expert) pairs than experts): sort the pairs by expert and run only the
    experts that received tokens, each once on its rows, ``run_expert(e, rows (R, C)) -> (R, C)``; the outputs
    are weighted and summed back per token. x (N, C), weights/idx (N, k) -> (N, C)."""
    k = idx.shape[1]
    flat = idx.flatten()  # (N*k,)
    order = flat.argsort(stable=True)  # pairs sorted by expert
    token = order // k  # (N*k,) source token of each sorted pair
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    used = counts.nonzero().flatten()  # the experts that received tokens, in id order (= the sorted order)
    rows = x[token].split(counts[used].tolist())
    ys = torch.cat([run_expert(e, r) for e, r in zip(used.tolist(), rows, strict=True)])  # (N*k, C)
    ys = ys * weights.flatten()[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


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
        if x.device.type == "cpu" and N * k < self.n_experts:  # decode-sized: CPU's grouped_mm runs every group
            return dispatch_active(x, weights, idx, self.n_experts, self._expert)
        flat = idx.flatten()  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // k  # (N*k,) source token of each sorted pair
        ends = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)  # (E,) group ends
        xs = x[token]  # (N*k, C)
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=ends)  # (N*k, 2I)
        gate, up = h.split(self.hidden, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=ends)  # (N*k, C)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows xs (R, C) -> (R, C), through r1kit's decode kernels where they apply."""
        gate, up = kernels.linear(xs, self.gate_up_proj[e]).split(self.hidden, dim=-1)
        return kernels.linear(F.silu(gate) * up, self.down_proj[e])

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The plain loop over tokens and their k experts (the definition the fast path must match)."""
        return experts_loop(x, weights, idx, self.gate_up_proj, self.down_proj, self.hidden)


class ExpertParallelExperts(nn.Module):
    """Expert parallelism: this rank holds routed experts [rank * E/W, (rank + 1) * E/W) of the E, and a forward
    exchanges tokens with the other ranks (all_to_all_single: dispatch, then combine) so that every (token, expert)
    pair runs on the rank that holds its expert, through the same grouped matmul as `Experts`. Every rank of the
    process group must call forward together. Outputs and gradients equal `Experts` on one process; an expert
    weight's gradient sums the contributions of the tokens of all ranks. Swapped in for `MoE.experts` by
    r1kit.train.distributed; `n_experts` stays E (the router and the loads count all experts). With a device
    `mesh` the weights are DTensors sharded on dim 0 (torch.distributed.checkpoint then saves and reshards them as
    the E experts, under the names of `Experts`); without one, plain tensors holding this rank's experts."""

    def __init__(self, experts: Experts, rank: int, world: int, group: object = None, mesh: object = None):
        super().__init__()
        if experts.n_experts % world:
            raise ValueError(f"expert parallelism: {experts.n_experts} experts do not divide across {world} ranks")
        self.n_experts, self.hidden = experts.n_experts, experts.hidden
        self.rank, self.world, self.group = rank, world, group
        self.local = experts.n_experts // world
        own = slice(rank * self.local, (rank + 1) * self.local)
        gate_up = experts.gate_up_proj.detach()[own].clone()  # (E/W, 2I, C)
        down = experts.down_proj.detach()[own].clone()  # (E/W, C, I)
        if mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            gate_up, down = (DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for t in (gate_up, down))
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up), nn.Parameter(down)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, C), weights/idx (N, k) with global expert ids -> (N, C)."""
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_to_all_single

        k = idx.shape[1]
        flat = idx.flatten()  # (N*k,)
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by the rank that holds it
        token = order // k
        send = torch.bincount(flat[order] // self.local, minlength=self.world)  # (W,) pairs for each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_n, recv_n = send.tolist(), recv.tolist()
        rows = all_to_all_single(x.new_empty(sum(recv_n), x.shape[1]), x[token], recv_n, send_n, self.group)
        experts = flat.new_empty(sum(recv_n))  # the local expert of each received row
        dist.all_to_all_single(experts, flat[order] % self.local, recv_n, send_n, group=self.group)
        ys = self._grouped(rows, experts)  # (R, C)
        back = all_to_all_single(x.new_empty(flat.numel(), x.shape[1]), ys, send_n, recv_n, self.group)  # (N*k, C)
        back = back * weights.flatten()[order, None].to(back.dtype)
        return torch.zeros_like(x).index_add_(0, token, back)

    def _grouped(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The local experts on the received rows (R, C), each row's expert in `experts` (R,) -> (R, C)."""
        if not rows.shape[0]:
            return rows
        gate_up, down = (getattr(w, "to_local", lambda w=w: w)() for w in (self.gate_up_proj, self.down_proj))
        order = experts.argsort(stable=True)
        ends = torch.bincount(experts, minlength=self.local).cumsum(0).to(torch.int32)  # (E/W,)
        h = torch._grouped_mm(rows[order], gate_up.transpose(1, 2), offs=ends)  # (R, 2I)
        gate, up = h.split(self.hidden, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=ends)  # (R, C)
        return torch.empty_like(ys).index_copy_(0, order, ys)


def experts_loop(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, hidden: int) -> torch.Tensor:
    """The reference SwiGLU experts: x (N, C), weights/idx (N, k), gate_up (E, 2H, C), down (E, C, H) -> (N, C),
    one token and one expert at a time. Every grouped/quantized/adapted expert path is tested against it."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            gate, up = F.linear(x[n], gate_up[e]).split(hidden)
            out[n] += weights[n, j].to(x.dtype) * F.linear(F.silu(gate) * up, down[e])
    return out


# ---------------------------------------------------------------------------------------------------- balancing aids


def sequence_aux_loss(scores: torch.Tensor, idx: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (eq. 17-20) without its weight alpha, averaged over sequences.

    Per sequence of T tokens: f_i = E / (k T) * #(tokens that chose expert i) (a constant: no gradient),
    P_i = mean over the T tokens of s_i / sum_j s_j (the normalised affinities), loss = sum_i f_i P_i.
    A perfectly balanced router scores 1. scores (N, E) raw affinities, idx (N, k) the chosen experts;
    the N = n_seqs * T rows are the sequences one after another.
    """
    N, E = scores.shape
    k = idx.shape[1]
    T = N // n_seqs
    counts = torch.zeros(n_seqs, E, device=scores.device).scatter_add_(
        1, idx.reshape(n_seqs, T * k), torch.ones(n_seqs, T * k, device=scores.device))  # (B, E)
    f = counts * (E / (k * T))  # (B, E)
    p = (scores / scores.sum(-1, keepdim=True)).view(n_seqs, T, E).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Pairs one expert may take in a forward of n_tokens tokens: ceil(factor * n_tokens * k / n_experts)."""
    return max(1, math.ceil(factor * n_tokens * k / n_experts))


def capacity_keep(idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which (token, slot) pairs fit when each expert takes at most `capacity` pairs, earlier tokens first.

    idx (N, k) expert ids -> keep (N, k) bool. An expert's pairs are ranked in token order (the stable sort
    used by the grouped dispatch); those ranked `capacity` or later are dropped.
    """
    flat = idx.flatten()  # (N*k,)
    order = flat.argsort(stable=True)  # pairs sorted by expert, token order within an expert
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=idx.device) - starts[flat[order]]  # position within its expert
    return (rank < capacity).view_as(idx)


# ---------------------------------------------------------------------------------------------------- CEAP


class CrossExpertAttention(nn.Module):
    """Cross-Expert Attention Propagation: each token attends over the outputs of its k selected experts.

    Per token (hidden state h, expert outputs o_1..o_k, router weights w_1..w_k) and per head j of H:
        q_j = Wq_j h,  key_{j,e} = Wk_j o_e                        (head_dim channels each)
        a_{j,e} = softmax_e( q_j . key_{j,e} / sqrt(head_dim) + log w_e )
        y[head j's C/H channels] = (sum_e w_e) * sum_e a_{j,e} o_e[head j's channels]
    Queries come from the token, keys and values from the expert outputs (the values are the outputs
    themselves, split into H channel groups: no value or output projection); the router weights enter as a
    log-prior. With Wq = 0 (its initialisation) the attention is w_e / sum w and y is exactly the weighted sum,
    so CEAP starts as DeepSeekMoE and learns where mixing by content helps. Parameters: Wq, Wk (H*head_dim, C).
    Dropped pairs (capacity) are masked out; a token with none left gets zero.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Parameter(torch.zeros(heads * head_dim, dim))
        self.k_proj = nn.Parameter(torch.empty(heads * head_dim, dim))

    @torch.no_grad()
    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """Wq = 0 (start as the weighted sum), Wk ~ N(0, std)."""
        self.q_proj.zero_()
        self.k_proj.copy_(torch.randn(self.k_proj.shape, generator=generator) * std)

    def forward(self, h: torch.Tensor, outs: torch.Tensor, weights: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Batched. h (N, C) token states, outs (N, k, C) expert outputs, weights (N, k), keep (N, k) -> (N, C)."""
        N, k, C = outs.shape
        H, D = self.heads, self.head_dim
        q = F.linear(h, self.q_proj).view(N, H, D).float()
        key = F.linear(outs, self.k_proj).view(N, k, H, D).float()
        logits = torch.einsum("nhd,nkhd->nhk", q, key) / math.sqrt(D) + weights.clamp_min(1e-30).log()[:, None]
        total = weights.sum(-1)  # (N,)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None], float("-inf"))
            any_kept = keep.any(-1)  # (N,)
            logits = logits.masked_fill(~any_kept[:, None, None], 0.0)  # avoid softmax over no keys at all
            total = (weights * keep).sum(-1) * any_kept
        attn = logits.softmax(-1) * total[:, None, None]  # (N, H, k) fp32, already scaled by sum w
        y = torch.einsum("nhk,nkhc->nhc", attn.to(outs.dtype), outs.view(N, k, H, C // H))  # (N, H, C/H)
        return y.reshape(N, C)

    def forward_reference(self, h: torch.Tensor, outs: torch.Tensor, weights: torch.Tensor,
                          keep: torch.Tensor | None = None) -> torch.Tensor:
        """The plain loop over tokens, heads and kept experts (the definition the batched path must match)."""
        N, k, C = outs.shape
        D, width = self.head_dim, C // self.heads
        out = torch.zeros_like(h)
        for n in range(N):
            kept = [e for e in range(k) if keep is None or bool(keep[n, e])]
            if not kept:
                continue
            total = sum(float(weights[n, e]) for e in kept)
            for j in range(self.heads):
                q = self.q_proj[j * D:(j + 1) * D].float() @ h[n].float()
                logits = torch.stack([q @ (self.k_proj[j * D:(j + 1) * D].float() @ outs[n, e].float()) / math.sqrt(D)
                                      + math.log(max(float(weights[n, e]), 1e-30)) for e in kept])
                attn = logits.softmax(0)
                ch = slice(j * width, (j + 1) * width)
                out[n, ch] = total * sum(a * outs[n, e, ch].float() for a, e in zip(attn, kept, strict=True))
        return out

    def flops_per_token(self, k: int) -> int:
        """Multiply-adds x 2 of one token's combine beyond the weighted sum: q, k projections and scores."""
        C = self.q_proj.shape[1]
        return 2 * self.heads * self.head_dim * C * (1 + k) + 2 * self.heads * self.head_dim * k


# ---------------------------------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts (always on) + top-k routed experts, combined by weighted sum or CEAP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.combiner = (CrossExpertAttention(cfg.hidden_size, cfg.moe_combiner_heads, cfg.moe_combiner_head_dim)
                         if cfg.moe_combiner == "cross_expert_attention" else None)
        self.reference = False  # route through the reference loops (tests, debugging)
        # training-only balancing aids, set by the training loop (see the module docstring)
        self.aux_loss_alpha = 0.0
        self.capacity_factor: float | None = None
        # observed by the last training forward, for balancing and the logs
        self.load: torch.Tensor | None = None  # (E,) tokens the router sent to each expert (before dropping)
        self.dropped: torch.Tensor | None = None  # () (token, expert) pairs dropped by the capacity limit
        self.aux_loss: torch.Tensor | None = None  # () alpha * sequence_aux_loss, None when alpha == 0
        # blocks.{L}.moe.* (r1kit.model.hooks): scores (N, E), chosen ids (N, k), their weights (N, k)
        self.hook_router_scores, self.hook_topk_experts = HookPoint(), HookPoint()
        self.hook_expert_weights = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        scores = self.hook_router_scores(self.gate.score(flat))  # (N, E)
        weights, idx = self.gate.route(scores)  # (N, k) each
        idx, weights = self.hook_topk_experts(idx), self.hook_expert_weights(weights)
        keep = None
        if self.training:
            self.load = torch.bincount(idx.flatten(), minlength=self.experts.n_experts).detach()
            self.aux_loss = (self.aux_loss_alpha * sequence_aux_loss(scores, idx, shape[0])
                             if self.aux_loss_alpha else None)
            if self.capacity_factor is not None:
                N, k = idx.shape
                keep = capacity_keep(idx, self.experts.n_experts,
                                     expert_capacity(N, k, self.experts.n_experts, self.capacity_factor))
            self.dropped = (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.long)
        run = self.experts.forward_reference if self.reference else self.experts
        if self.combiner is not None:
            combine = self.combiner.forward_reference if self.reference else self.combiner
            y = combine(flat, self.expert_outputs(flat, idx, keep, run), weights, keep)
        elif keep is not None:  # weighted sum over the kept pairs only
            tok, slot = keep.nonzero(as_tuple=True)  # (P,) each
            ys = run(flat[tok], weights[tok, slot, None], idx[tok, slot, None])  # (P, C)
            y = torch.zeros_like(flat).index_add_(0, tok, ys)
        else:
            y = run(flat, weights, idx)
        y = y.view(shape)
        return y if self.shared_experts is None else y + self.shared_experts(x)

    @staticmethod
    def expert_outputs(flat: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None,
                       run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Each token's k expert outputs, unweighted: flat (N, C), idx (N, k) -> (N, k, C); zero where dropped.

        Each kept (token, slot) pair is dispatched as a one-expert token of weight 1, through the same grouped
        experts (`run`), so quantized experts and the reference loop serve CEAP unchanged.
        """
        N, k = idx.shape
        if keep is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
        tok, slot = keep.nonzero(as_tuple=True)  # (P,) each
        ones = torch.ones(tok.numel(), 1, device=flat.device)
        ys = run(flat[tok], ones, idx[tok, slot, None])  # (P, C)
        outs = flat.new_zeros(N, k, flat.shape[-1])
        outs[tok, slot] = ys.to(outs.dtype)
        return outs
