"""Sizing a distributed training job: per-GPU memory and communication per step under DDP, FSDP and FSDP + expert
parallelism, from parameter counts alone (no model is built).

    r1kit plan --preset r1-175b --gpus 64 --gpu-memory 80

Memory per GPU (GB = 1e9 bytes), the way r1kit trains: fp32 master weights (4 B/parameter), fp32 gradients
(4 B), AdamW's two fp32 moments (8 B): 16 B per parameter, ZeRO's 2 + 2 + 12 in total. DDP holds all of them on
every GPU; FSDP (ZeRO-3) divides all three by the GPUs; FSDP + EP splits the routed experts across `ep` GPUs and
FSDP-shards them across the N/ep replicas, the rest across all N: the same memory as FSDP; what changes is the
communication (tokens travel instead of expert weights).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2 with
FlashAttention, which removes the 5as/h term): 34 * s * b * h bytes per layer for a micro-batch of b sequences
of s tokens, or 2 * s * b * h per layer (the layer inputs, bf16) plus one layer's 34 * s * b * h with full
activation checkpointing; plus the logits, s * b * V * 6 bytes (bf16 and the fp32 copy the loss reads).

Communication per GPU per step (bytes sent, ring algorithms, one micro-batch):
- DDP: an all-reduce of the fp32 gradients, 2 (N-1)/N * P * 4.
- FSDP: all-gather of the bf16 parameters in the forward and again in the backward, 2 * (N-1)/N * P * 2, and a
  reduce-scatter of the fp32 gradients, (N-1)/N * P * 4.
- FSDP + EP: the same for the non-expert parameters over N GPUs and for the experts over their N/ep replicas;
  and per MoE layer four all_to_all (dispatch and combine, forward and backward) of the s * b * k routed token
  copies in bf16, of which the fraction (ep-1)/ep leaves the GPU: 4 * s * b * k * h * 2 * (ep-1)/ep.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from r1kit.model.config import ModelConfig

GB = 1e9
MASTER, GRAD, OPTIMIZER = 4, 4, 8  # bytes per parameter: fp32 weights, fp32 gradients, AdamW's fp32 m and v
COMPUTE = 2  # bf16: the gathered parameters, activations and exchanged tokens


class PlanError(ValueError):
    """A plan input is out of range (GPUs, memory, batch, expert-parallel degree). The message names it."""


@dataclasses.dataclass
class Counts:
    """What the arithmetic needs of a model: parameters split into routed experts and the rest, and shapes."""

    params: int  # all trained parameters (with the MTP layers)
    expert_params: int  # of which routed experts
    hidden: int
    layers: int  # transformer blocks (with the MTP depths)
    moe_layers: int  # of which MoE blocks
    vocab: int
    top_k: int = 0
    experts: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig) -> Counts:
        """The counts of a ModelConfig (ModelConfig.num_params with MTP; experts from the MoE shapes)."""
        moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        mtp_moe = cfg.num_mtp_layers if cfg.n_routed_experts else 0
        per_layer = cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
        return cls(cfg.num_params(include_mtp=True), (moe + mtp_moe) * per_layer, cfg.hidden_size,
                   cfg.num_layers + cfg.num_mtp_layers, moe + mtp_moe, cfg.vocab_size, cfg.num_experts_per_tok,
                   cfg.n_routed_experts)


@dataclasses.dataclass
class Plan:
    """Per-GPU memory (GB) and communication per step (GB sent) of one strategy."""

    strategy: str
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    all_reduce_gb: float = 0.0
    all_gather_gb: float = 0.0
    reduce_scatter_gb: float = 0.0
    all_to_all_gb: float = 0.0

    @property
    def states_gb(self) -> float:
        """Parameters, gradients and optimizer state (ZeRO's "model states")."""
        return self.params_gb + self.grads_gb + self.optimizer_gb

    @property
    def total_gb(self) -> float:
        return self.states_gb + self.activations_gb

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "states_gb": self.states_gb, "total_gb": self.total_gb}


def activation_bytes(c: Counts, seq_len: int, micro_batch: int, checkpointing: bool) -> float:
    """Activation memory of one micro-batch on one GPU (see the module docstring)."""
    sbh = seq_len * micro_batch * c.hidden
    per_layer = 34 * sbh
    blocks = c.layers * 2 * sbh + per_layer if checkpointing else c.layers * per_layer
    return blocks + seq_len * micro_batch * c.vocab * (COMPUTE + 4)


def states(params: float, shards: float) -> tuple[float, float, float]:
    """Parameter, gradient and optimizer bytes on one GPU of `params` parameters divided into `shards`."""
    return params * MASTER / shards, params * GRAD / shards, params * OPTIMIZER / shards


def plan(c: Counts, gpus: int, seq_len: int = 4096, micro_batch: int = 1, ep: int | None = None,
         checkpointing: bool = False) -> list[Plan]:
    """DDP, FSDP and (for a MoE) FSDP + EP on `gpus` GPUs. `ep`: the expert-parallel degree (default: the largest
    divisor of both the GPUs and the experts)."""
    if gpus < 1 or seq_len < 1 or micro_batch < 1:
        raise PlanError(f"gpus, seq_len and micro_batch must be >= 1 (got {gpus}, {seq_len}, {micro_batch})")
    n, p = gpus, c.params
    ring = (n - 1) / n
    act = activation_bytes(c, seq_len, micro_batch, checkpointing) / GB
    ddp = Plan("ddp", *(x / GB for x in states(p, 1)), act, all_reduce_gb=2 * ring * p * GRAD / GB)
    fsdp = Plan("fsdp", *(x / GB for x in states(p, n)), act,
                all_gather_gb=2 * ring * p * COMPUTE / GB, reduce_scatter_gb=ring * p * GRAD / GB)
    plans = [ddp, fsdp]
    if c.experts:
        plans.append(expert_parallel_plan(c, gpus, seq_len, micro_batch, ep, act))
    return plans


def expert_parallel_plan(c: Counts, gpus: int, seq_len: int, micro_batch: int, ep: int | None, act: float) -> Plan:
    """FSDP for the non-expert parameters over all GPUs; experts split across `ep` GPUs, FSDP over the gpus/ep
    replicas; tokens exchanged by all_to_all."""
    if ep is None:
        ep = max(d for d in range(1, gpus + 1) if gpus % d == 0 and c.experts % d == 0)
    if ep < 1 or gpus % ep or c.experts % ep:
        raise PlanError(f"ep = {ep}: the expert-parallel degree must divide both the GPUs ({gpus}) and the routed "
                        f"experts ({c.experts})")
    dense, experts, replicas = c.params - c.expert_params, c.expert_params, gpus // ep
    memory = [d / GB + e / GB for d, e in zip(states(dense, gpus), states(experts, gpus), strict=True)]
    ring_d, ring_e = (gpus - 1) / gpus, (replicas - 1) / replicas
    routed = seq_len * micro_batch * c.top_k * c.hidden * COMPUTE  # bytes of one layer's routed token copies
    return Plan(f"fsdp+ep{ep}", *memory, act,
                all_gather_gb=2 * (ring_d * dense + ring_e * experts / ep) * COMPUTE / GB,
                reduce_scatter_gb=(ring_d * dense + ring_e * experts / ep) * GRAD / GB,
                all_to_all_gb=4 * c.moe_layers * routed * (ep - 1) / ep / GB)


def format_plan(plans: list[Plan], gpu_memory: float, title: str) -> str:
    """The plans as a table: memory per GPU and whether it fits in `gpu_memory` GB, then GB sent per step."""
    rows = [title, "", "| strategy | params | grads | optimizer | activations | total | fits | all-reduce | "
            "all-gather | reduce-scatter | all-to-all |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for pl in plans:
        fits = "yes" if pl.total_gb <= gpu_memory else "no"
        rows.append(f"| {pl.strategy} | {pl.params_gb:.2f} | {pl.grads_gb:.2f} | {pl.optimizer_gb:.2f} | "
                    f"{pl.activations_gb:.2f} | {pl.total_gb:.2f} | {fits} | {pl.all_reduce_gb:.2f} | "
                    f"{pl.all_gather_gb:.2f} | {pl.reduce_scatter_gb:.2f} | {pl.all_to_all_gb:.2f} |")
    rows.append(f"\nGB per GPU (1 GB = 1e9 bytes; fits: total <= {gpu_memory:g} GB); communication: GB sent per GPU "
                "per micro-batch step")
    return "\n".join(rows)
