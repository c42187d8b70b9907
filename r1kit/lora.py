"""LoRA adapters as module swaps: linear layers (full-precision or quantized) and grouped MoE experts.

    from r1kit.lora import LoRAConfig, inject_lora, save_adapter, load_adapter, set_adapter, merge_lora
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))   # adapter "default"
    save_adapter(model, "out/")          # adapter_config.json + adapter_model.safetensors, PEFT's layout
    load_adapter(model, "other/", name="math"); set_adapter(model, "math")   # several adapters, one base

A targeted module is replaced by a wrapper that keeps the original as ``base_layer`` and adds, per named
adapter, y = base(x) + (alpha / r) * B(A(dropout(x))) with A (r, in), B (out, r) (B starts at zero, A
Kaiming-uniform, as PEFT initialises them). Only the active adapter runs; ``set_adapter(model, None)`` runs the
base alone. The base stays whatever it was: ``nn.Linear``, or one of r1kit's quantized modules (QLoRA: the
gradient flows through the dequantized base into the adapters; the base has no trainable tensors).

Routed experts (``Experts`` / ``QuantizedExperts``) get per-expert adapters on their stacked weights:
A (E, r, C) and B (E, 2I, r) on gate_up_proj, A (E, r, I) and B (E, C, r) on down_proj. They run in the same
sorted grouped dispatch as the experts (``torch._grouped_mm`` over the (token, expert) pairs sorted by expert:
two extra grouped matmuls per projection, no per-expert Python loop); ``forward_reference`` is the per-token loop.

Targets (``target_modules``): a string is a regular expression searched in each module name (r1kit's names,
e.g. ``layers.3.self_attn.q_proj``, ``layers.1.mlp.experts``); a list names modules by their last parts
(``"q_proj"`` matches every ``...q_proj``; ``"self_attn.q_proj"`` too). Candidates are linear layers and
routed experts; a pattern that matches none is an error listing the names it could have matched.

Adapter files (``save_adapter``/``load_adapter``) follow PEFT: ``adapter_config.json`` (peft_type LORA, r,
lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<HF module name>.lora_A.weight`` / ``.lora_B.weight`` (the HF name is r1kit's with
``model.`` in front, except ``lm_head``), so an adapter for a Qwen2/Llama checkpoint loads in
``peft.PeftModel.from_pretrained`` and back. Routed experts, which PEFT has no convention for, use r1kit's keys
``base_model.model.model.layers.N.mlp.experts.lora_A.gate_up_proj`` (E, r, C), ``...lora_B.gate_up_proj``
(E, 2I, r), ``...lora_A.down_proj`` (E, r, I), ``...lora_B.down_proj`` (E, C, r).

Merging (``merge_lora``) adds (alpha / r) * B @ A into full-precision base weights and keeps the original weight
so that ``unmerge_lora`` restores it bit for bit; ``merge_lora(..., keep_original=False)`` followed by
``unload_lora`` leaves a plain model (what ``r1kit merge`` saves). Quantized bases are not merged into (that
would re-quantize): merge into the full-precision checkpoint instead.

Model-level code: nothing here imports training.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from r1kit.fileio import atomic_write
from r1kit.model.moe import Experts, experts_loop
from r1kit.quant.experts import QuantizedExperts
from r1kit.quant.linear import QuantizedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = (r"^layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                   r"|kv_b_proj)|mlp\.(gate_proj|up_proj|down_proj|shared_experts\.(gate|up|down)_proj|experts))$")


class LoRAError(ValueError):
    """An adapter does not fit the model, its files are wrong, or a target matches nothing. Names what is wrong."""


@dataclass
class LoRAConfig:
    """One adapter's shape: rank r, scaling alpha / r (alpha / sqrt(r) with use_rslora), dropout, targets."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: DEFAULT_TARGETS)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"lora r = {self.r!r}: must be an integer >= 1")
        if not 0 <= self.dropout < 1:
            raise LoRAError(f"lora dropout = {self.dropout!r}: must be in [0, 1)")
        if not self.target_modules:
            raise LoRAError("lora target_modules is empty: give a regular expression or a list of module names")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# ---------------------------------------------------------------------------------------------------- modules


def _kaiming_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's (and PEFT's lora_A's) default init: uniform(+-1/sqrt(fan_in)) = kaiming_uniform(a=sqrt(5))."""
    bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or a QuantizedLinear, kept as ``base_layer``) plus named low-rank adapters.

    x (..., in) -> base(x) + scaling * lora_B(lora_A(dropout(x))) for the active adapter, (..., out).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()  # adapter name -> nn.Linear(in, r)
        self.lora_B = nn.ModuleDict()  # adapter name -> nn.Linear(r, out)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter currently added into base_layer.weight
        self._original: torch.Tensor | None = None  # base weight before merging (unmerge restores it exactly)

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        """A new adapter `name`: A Kaiming-uniform, B zero (the layer's output is unchanged until B trains)."""
        ref = _base_tensor(self.base_layer)
        a = nn.Linear(self.in_features, cfg.r, bias=False, device=ref.device, dtype=torch.float32)
        b = nn.Linear(cfg.r, self.out_features, bias=False, device=ref.device, dtype=torch.float32)
        if ref.device.type != "meta":
            _kaiming_(a.weight, self.in_features)
            nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name], self.dropout[name], self.configs[name] = cfg.scaling, cfg.dropout, cfg

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A (out, in), fp32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies (base + the active adapter), for code that reads a matrix
        (MLA's absorbed decode reads kv_b_proj.weight)."""
        base = self.base_layer
        w = base.dequantize(torch.float32) if isinstance(base, QuantizedLinear) else base.weight
        if self.active is None or self.merged == self.active:
            return w
        return (w.float() + self.delta_weight(self.active)).to(w.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        name = self.active
        if name is None or self.merged == name:
            return y
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        h = F.dropout(x, self.dropout[name], self.training) if self.dropout[name] else x
        return y + (F.linear(F.linear(h.to(a.dtype), a), b) * self.scaling[name]).to(y.dtype)

    def extra_repr(self) -> str:
        ranks = {n: m.out_features for n, m in self.lora_A.items()}
        return f"adapters={ranks}, active={self.active!r}, merged={self.merged!r}"


class LoRAExperts(nn.Module):
    """Routed experts (Experts or QuantizedExperts, kept as ``base_layer``) plus per-expert low-rank adapters
    on gate_up_proj and down_proj, run in the grouped dispatch. Same call as Experts:
    x (N, C), weights (N, k), idx (N, k) -> (N, C)."""

    PROJECTIONS = ("gate_up_proj", "down_proj")

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base
        self.n_experts, self.hidden = base.n_experts, base.hidden
        ref = _base_tensor(base)
        self.dim = base.dim if isinstance(base, QuantizedExperts) else ref.shape[2]
        self.lora_A = nn.ModuleDict()  # adapter name -> ParameterDict {gate_up_proj (E, r, C), down_proj (E, r, I)}
        self.lora_B = nn.ModuleDict()  # adapter name -> ParameterDict {gate_up_proj (E, 2I, r), down_proj (E, C, r)}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self._original: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def reference(self) -> bool:
        return getattr(self.base_layer, "reference", False)

    def add_adapter(self, name: str, cfg: LoRAConfig) -> None:
        """Per-expert adapters `name`: A Kaiming-uniform, B zero, for every expert."""
        E, C, hidden, r = self.n_experts, self.dim, self.hidden, cfg.r
        device = _base_tensor(self.base_layer).device
        shapes_a = {"gate_up_proj": (E, r, C), "down_proj": (E, r, hidden)}
        shapes_b = {"gate_up_proj": (E, 2 * hidden, r), "down_proj": (E, C, r)}
        a = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, device=device)) for k, s in shapes_a.items()})
        b = nn.ParameterDict({k: nn.Parameter(torch.zeros(s, device=device)) for k, s in shapes_b.items()})
        if device.type != "meta":
            _kaiming_(a["gate_up_proj"], C)
            _kaiming_(a["down_proj"], hidden)
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name], self.dropout[name], self.configs[name] = cfg.scaling, cfg.dropout, cfg

    def delta_weight(self, name: str, proj: str) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert e: (E, 2I, C) for gate_up_proj, (E, C, I) for down_proj; fp32."""
        return self.scaling[name] * torch.bmm(self.lora_B[name][proj].float(), self.lora_A[name][proj].float())

    def _base_project(self, proj: str, xs: torch.Tensor, ends: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """The base experts' projection `proj` of the sorted pairs, grouped: xs (P, in) -> (P, out). A quantized
        base is dequantized (int4) or converted (int8/fp8, per-row scales applied to the output) per call, and
        again in the backward rather than kept (_FrozenGroupedMM)."""
        base, dt = self.base_layer, xs.dtype
        if not isinstance(base, QuantizedExperts):
            return torch._grouped_mm(xs, getattr(base, proj).to(dt).transpose(1, 2), offs=ends)

        def weight(dtype: torch.dtype) -> torch.Tensor:  # (E, out, in)
            return (base._dequantize_one(proj, dtype, None) if base.method == "int4"
                    else base._buffers[proj].to(dtype))

        if torch.is_grad_enabled() and xs.requires_grad:
            y = _FrozenGroupedMM.apply(xs, ends, weight)
        else:
            y = torch._grouped_mm(xs, weight(dt).transpose(1, 2), offs=ends)
        return y if base.method == "int4" else y * base._buffers[proj + "_scale"].to(dt)[expert]

    def _low_rank(self, name: str, proj: str, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """scaling * B_e A_e x for each sorted pair, grouped: xs (P, in) -> (P, out)."""
        a, b = self.lora_A[name][proj], self.lora_B[name][proj]
        if self.dropout[name]:
            xs = F.dropout(xs, self.dropout[name], self.training)
        pad = (-a.shape[1]) % (16 // xs.element_size())  # grouped_mm needs 16-byte strides: zero-pad the rank
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        h = torch._grouped_mm(xs, a.to(xs.dtype).transpose(1, 2), offs=ends)  # (P, r)
        return torch._grouped_mm(h, b.to(xs.dtype).transpose(1, 2), offs=ends) * self.scaling[name]  # (P, out)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Grouped dispatch of base + adapter. x (N, C), weights/idx (N, k) -> (N, C)."""
        name = self.active
        if name is None or self.merged == name or idx.shape[0] == 0:
            return self.base_layer(x, weights, idx)
        if self.reference:
            return self.forward_reference(x, weights, idx)
        N, k = idx.shape
        dt = x.dtype
        flat = idx.flatten()  # (N*k,) expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token, expert = order // k, flat[order]  # (N*k,) source token and expert of each sorted pair
        ends = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)  # (E,) group ends
        xs = x[token]  # (N*k, C)
        h = self._base_project("gate_up_proj", xs, ends, expert) + self._low_rank(name, "gate_up_proj", xs, ends)
        gate, up = h.split(self.hidden, dim=-1)  # (N*k, I) each
        act = F.silu(gate) * up  # (N*k, I)
        ys = self._base_project("down_proj", act, ends, expert) + self._low_rank(name, "down_proj", act, ends)
        ys = ys * weights.flatten()[order, None].to(dt)  # (N*k, C)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The per-token loop with each expert's weight + its adapter's B @ A (no dropout)."""
        base = self.base_layer
        if isinstance(base, QuantizedExperts):
            gu, dn = base.dequantize(torch.float32)
        else:
            gu, dn = base.gate_up_proj.float(), base.down_proj.float()
        if self.active is not None and self.merged != self.active:
            gu = gu + self.delta_weight(self.active, "gate_up_proj")
            dn = dn + self.delta_weight(self.active, "down_proj")
        gu, dn = gu.to(x.dtype), dn.to(x.dtype)
        return experts_loop(x, weights, idx, gu, dn, self.hidden)

    def extra_repr(self) -> str:
        ranks = {n: p["gate_up_proj"].shape[1] for n, p in self.lora_A.items()}
        return f"n_experts={self.n_experts}, adapters={ranks}, active={self.active!r}, merged={self.merged!r}"


class _FrozenGroupedMM(torch.autograd.Function):
    """torch._grouped_mm(xs, weight(dtype).transpose(1, 2), offs=ends) for frozen stacked weights (E, out, in)
    that weight() makes on demand (dequantized experts): the backward, xs's gradient only, makes them again
    instead of autograd keeping them from forward to backward (QLoRA on quantized experts)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, ends: torch.Tensor, weight: Any) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(ends)
        ctx.weight, ctx.x_dtype = weight, xs.dtype
        return torch._grouped_mm(xs, weight(xs.dtype).transpose(1, 2), offs=ends)  # (P, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (ends,) = ctx.saved_tensors
        w = ctx.weight(grad.dtype)  # (E, out, in)
        return torch._grouped_mm(grad.contiguous(), w, offs=ends).to(ctx.x_dtype), None, None


LORA_MODULES = (LoRALinear, LoRAExperts)


def _base_tensor(module: nn.Module) -> torch.Tensor:
    """A tensor of the module, for its device."""
    return next(iter([*module.parameters(), *module.buffers()]))


# ---------------------------------------------------------------------------------------------------- targets


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear, Experts, QuantizedExperts))


def candidate_modules(model: nn.Module) -> list[str]:
    """Names of the modules that can take an adapter: linear layers (plain or quantized) and routed experts.
    An lm_head tied to the embedding is left out (an adapter on it would also change the embedding's role)."""
    tied = getattr(getattr(model, "embed_tokens", None), "weight", None)
    names = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LORA_MODULES) or (_adaptable(child) and getattr(child, "weight", None) is not tied):
                names.append(name)  # not descended into: a wrapper's base and adapters are not candidates
            elif not _adaptable(child):
                walk(name, child)

    walk("", model)
    return names


def match_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The candidate module names `target_modules` selects (see the module docstring); LoRAError when a pattern
    (or a list entry) matches nothing, listing what it could have matched."""
    names = candidate_modules(model)
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise LoRAError(f"target_modules {target_modules!r}: not a valid regular expression ({e})") from None
        chosen = [n for n in names if rx.search(n)]
        missing = [] if chosen else [target_modules]
    else:
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({re.sub(r"^(layers|mtp)\.\d+\.", "", n) for n in names})
        raise LoRAError(f"target_modules: {', '.join(map(repr, missing))} matches no module of this model; modules "
                        f"that can take an adapter: {', '.join(leaves)} (full names like {names[0]!r})")
    return chosen


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAExperts]]:
    """(name, module) of every LoRA wrapper in the model."""
    for name, m in model.named_modules():
        if isinstance(m, LORA_MODULES):
            yield name, m


def inject_lora(model: nn.Module, cfg: LoRAConfig, name: str = "default", targets: Sequence[str] | None = None,
                activate: bool = True) -> list[str]:
    """Add adapter `name` to the modules `cfg.target_modules` selects (or exactly `targets`), wrapping each once;
    with `activate`, make it the active adapter everywhere. Returns the adapted module names."""
    chosen = list(targets) if targets is not None else match_targets(model, cfg.target_modules)
    for target in chosen:
        m = model.get_submodule(target)
        if not isinstance(m, LORA_MODULES):
            if not _adaptable(m):
                raise LoRAError(f"{target}: a {type(m).__name__}, not a linear layer or routed experts")
            wrapper = LoRAExperts(m) if isinstance(m, (Experts, QuantizedExperts)) else LoRALinear(m)
            m = wrapper.train(m.training)  # an eval-mode model stays in eval mode (no adapter dropout)
            _set_child(model, target, m)
        if name in m.lora_A:
            raise LoRAError(f"{target} already has an adapter named {name!r}; pick another name or delete it")
        m.add_adapter(name, cfg)
    if activate:
        set_adapter(model, name)
    return chosen


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every LoRA module runs (None: the base model alone), without reloading.
    A module that has no adapter of that name runs its base."""
    mods = list(lora_modules(model))
    if name is not None and not any(name in m.lora_A for _, m in mods):
        names = sorted({n for _, m in mods for n in m.lora_A})
        raise LoRAError(f"no adapter named {name!r} in this model; adapters: {names or 'none'}")
    for _, m in mods:
        if m.merged is not None and m.merged != name:
            raise LoRAError(f"adapter {m.merged!r} is merged into the weights; unmerge_lora() before switching")
        m.active = name if name in m.lora_A else None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every module (the wrappers stay; with no adapter left they run the base)."""
    for _, m in lora_modules(model):
        if name in m.lora_A:
            if m.merged == name:
                raise LoRAError(f"adapter {name!r} is merged into the weights; unmerge_lora() before deleting it")
            del m.lora_A[name], m.lora_B[name]
            del m.scaling[name], m.dropout[name], m.configs[name]
            m.active = None if m.active == name else m.active


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters loaded into the model."""
    return sorted({n for _, m in lora_modules(model) for n in m.lora_A})


def mark_only_lora_trainable(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Freeze everything but the adapters (adapter `name` only, when given); returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, m in lora_modules(model):
        for n in ([name] if name is not None else list(m.lora_A)):
            if n in m.lora_A:
                for p in [*m.lora_A[n].parameters(), *m.lora_B[n].parameters()]:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def lora_param_count(model: nn.Module, name: str | None = None) -> int:
    """Parameters of the adapters (of adapter `name` when given)."""
    total = 0
    for _, m in lora_modules(model):
        for n in ([name] if name is not None else list(m.lora_A)):
            if n in m.lora_A:
                total += sum(p.numel() for p in [*m.lora_A[n].parameters(), *m.lora_B[n].parameters()])
    return total


QLORA_METHODS = ("int8", "int4", "nf4")


@torch.no_grad()
def quantize_base(model: nn.Module, method: str, double_quant: bool = False) -> dict[str, int]:
    """QLoRA's frozen base: linear layers (not lm_head, not MLA's kv_b_proj) to int8 / int4 (r1kit.quant) or NF4
    (r1kit.quant.nf4), routed experts to int8 / int4 (NF4 has no grouped-expert format: int4 there).
    Do this before inject_lora. Returns {"linear": n, "experts": n} swapped."""
    from r1kit.quant import quantize_model
    from r1kit.quant.nf4 import nf4_model

    if method not in QLORA_METHODS:
        raise LoRAError(f"qlora = {method!r}: expected one of {', '.join(QLORA_METHODS)}")
    if method == "nf4":
        linear = nf4_model(model, skip=("lm_head",), double_quant=double_quant)
        has_experts = any(isinstance(m, Experts) for m in model.modules())
        stats = quantize_model(model, "int4", skip=[r"^(?!.*mlp\.experts$)"]) if has_experts else {"modules": {}}
    else:
        stats = quantize_model(model, method, skip=["lm_head"])
        linear = sum(v != "QuantizedExperts" for v in stats["modules"].values())
    return {"linear": linear, "experts": sum(v == "QuantizedExperts" for v in stats["modules"].values())}


def lora_budget(cfg: Any, r: int, target_modules: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Trainable parameters of a rank-r adapter on a ModelConfig, counted on a meta-device model (no memory, any
    size): {"lora_r", "lora_modules", "lora_params", "params_total", "lora_fraction"} (params_total: the main
    model, MTP excluded, as ModelConfig.num_params)."""
    from r1kit.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    targets = DEFAULT_TARGETS if target_modules is None else target_modules
    adapted = inject_lora(model, LoRAConfig(r=r, target_modules=targets))
    params, total = lora_param_count(model), cfg.num_params()
    return {"lora_r": r, "lora_modules": len(adapted), "lora_params": params, "params_total": total,
            "lora_fraction": params / total}


# ---------------------------------------------------------------------------------------------------- merge


@torch.no_grad()
def merge_lora(model: nn.Module, name: str | None = None, keep_original: bool = True) -> int:
    """Add adapter `name` (default: the active one) into the base weights; the modules then run the base alone.
    keep_original: keep each original weight so that unmerge_lora restores it exactly. Returns modules merged."""
    name = name or next((m.active for _, m in lora_modules(model) if m.active), None)
    if name is None:
        raise LoRAError("merge_lora: no active adapter to merge; set_adapter(model, NAME) first")
    count = 0
    for mod_name, m in lora_modules(model):
        if name not in m.lora_A or m.merged == name:
            continue
        if m.merged is not None:
            raise LoRAError(f"{mod_name}: adapter {m.merged!r} is already merged; unmerge_lora() first")
        if isinstance(m.base_layer, (QuantizedLinear, QuantizedExperts)):
            raise LoRAError(f"{mod_name}: the base is quantized ({type(m.base_layer).__name__}); merging would "
                            "re-quantize it. Merge into the full-precision checkpoint (r1kit merge BASE ADAPTER OUT)")
        if isinstance(m, LoRALinear):
            w = m.base_layer.weight
            m._original = w.detach().clone() if keep_original else None
            w.copy_((w.float() + m.delta_weight(name)).to(w.dtype))
        else:
            gu, dn = m.base_layer.gate_up_proj, m.base_layer.down_proj
            m._original = (gu.detach().clone(), dn.detach().clone()) if keep_original else None
            gu.copy_((gu.float() + m.delta_weight(name, "gate_up_proj")).to(gu.dtype))
            dn.copy_((dn.float() + m.delta_weight(name, "down_proj")).to(dn.dtype))
        m.merged, m.active = name, name
        count += 1
    return count


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> int:
    """Restore the weights saved by merge_lora (exactly); the adapter runs unmerged again. Returns modules restored."""
    count = 0
    for mod_name, m in lora_modules(model):
        if m.merged is None:
            continue
        if m._original is None:
            raise LoRAError(f"{mod_name}: merged with keep_original=False; its original weight is gone")
        if isinstance(m, LoRALinear):
            m.base_layer.weight.copy_(m._original)
        else:
            m.base_layer.gate_up_proj.copy_(m._original[0])
            m.base_layer.down_proj.copy_(m._original[1])
        m._original, m.merged = None, None
        count += 1
    return count


def unload_lora(model: nn.Module) -> nn.Module:
    """Put every base layer back in place of its wrapper (adapters dropped; merge first to keep their effect)."""
    for name, m in list(lora_modules(model)):
        _set_child(model, name, m.base_layer)
    return model


# ---------------------------------------------------------------------------------------------------- files


def _hf_module(name: str) -> str:
    """r1kit module name -> the Hugging Face one (``model.`` in front, except the head)."""
    return name if name == "lm_head" else f"model.{name}"


def _r1kit_module(hf_name: str, where: str) -> str:
    if hf_name == "lm_head":
        return hf_name
    if not hf_name.startswith("model."):
        raise LoRAError(f"{where}: key for module {hf_name!r} is not under 'model.' (not a causal-LM adapter?)")
    return hf_name.removeprefix("model.")


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` as PEFT's safetensors keys -> tensors (fp32 copies). Experts use r1kit's keys."""
    state = {}
    for mod_name, m in lora_modules(model):
        if name not in m.lora_A:
            continue
        prefix = PEFT_PREFIX + _hf_module(mod_name)
        if isinstance(m, LoRALinear):
            state[f"{prefix}.lora_A.weight"] = m.lora_A[name].weight
            state[f"{prefix}.lora_B.weight"] = m.lora_B[name].weight
        else:
            for proj in LoRAExperts.PROJECTIONS:
                state[f"{prefix}.lora_A.{proj}"] = m.lora_A[name][proj]
                state[f"{prefix}.lora_B.{proj}"] = m.lora_B[name][proj]
    if not state:
        raise LoRAError(f"no adapter named {name!r} in this model; adapters: {adapter_names(model) or 'none'}")
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}


def _target_spec(model: nn.Module, adapted: list[str]) -> str | list[str]:
    """PEFT's target_modules for exactly the adapted modules: the list of their last names when that selects
    no other candidate, else a regex that full-matches each HF module name."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same = [n for n in candidate_modules(model) if n.rsplit(".", 1)[-1] in leaves]
    if sorted(same) == sorted(adapted):
        return leaves
    return "^(" + "|".join(re.escape(_hf_module(n)) for n in adapted) + ")$"


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default", base_model: str | None = None) -> Path:
    """Write adapter `name` as adapter_config.json + adapter_model.safetensors (PEFT's layout), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model, name)
    mods = [(n, m) for n, m in lora_modules(model) if name in m.lora_A]
    cfg = mods[0][1].configs[name]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": _target_spec(model, [n for n, _ in mods]),
        "rank_pattern": _patterns(mods, name, "r"), "alpha_pattern": _patterns(mods, name, "alpha"),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None,
    }
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def _patterns(mods: list[tuple[str, nn.Module]], name: str, key: str) -> dict[str, Any]:
    """PEFT's rank_pattern / alpha_pattern: the modules whose rank or alpha differs from the first one's."""
    first = getattr(mods[0][1].configs[name], key)
    return {re.escape(_hf_module(n)): getattr(m.configs[name], key) for n, m in mods
            if getattr(m.configs[name], key) != first}


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked: a LoRA adapter r1kit can apply (LoRAError naming the file and field)."""
    file = Path(folder) / ADAPTER_CONFIG
    if not file.is_file():
        raise LoRAError(f"{file}: missing; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{file}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}: "
                        "only LORA adapters are supported")
    checks = {"r": lambda v: isinstance(v, int) and v >= 1, "lora_alpha": lambda v: isinstance(v, (int, float))}
    for key, ok in checks.items():
        if not ok(cfg.get(key)):
            raise LoRAError(f"{file}: field {key!r} = {cfg.get(key)!r} is missing or invalid")
    unsupported = {"fan_in_fan_out": True, "use_dora": True}
    for key, bad in unsupported.items():
        if cfg.get(key) == bad:
            raise LoRAError(f"{file}: {key} = {bad} is not supported by r1kit")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise LoRAError(f"{file}: bias / modules_to_save adapters (extra trained tensors) are not supported")
    return cfg


def _group_state(state: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """safetensors keys -> {r1kit module name: {"A"/"B" (+ ".proj" for experts): tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rx = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)(?:\.default)?\.(weight|gate_up_proj|down_proj)$")
    for key, t in state.items():
        if key.endswith(".base_layer.weight"):  # PEFT saves an adapted lm_head's base too: checked when loading
            modules.setdefault(_r1kit_module(key[len(PEFT_PREFIX):-len(".base_layer.weight")], key), {})["base"] = t
            continue
        m = rx.match(key)
        if m is None:
            raise LoRAError(f"{file}: tensor {key!r} is not a LoRA A/B weight r1kit knows "
                            f"(expected base_model.model.<module>.lora_A.weight)")
        module = _r1kit_module(m.group(1), f"{file}: {key}")
        part = m.group(2) if m.group(3) == "weight" else f"{m.group(2)}.{m.group(3)}"
        modules.setdefault(module, {})[part] = t
    return modules


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path, name: str = "default", activate: bool = True) -> list[str]:
    """Read a PEFT-layout adapter folder into the model as adapter `name` (wrapping the modules it covers);
    with `activate`, make it the active one. Returns the adapted module names. Shapes are checked per tensor."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        raise LoRAError(f"{file}: missing (adapter_model.bin pickles are not read; save with safetensors)")
    modules = _group_state(load_file(str(file)), file)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    names = candidate_modules(model)
    unknown = [_hf_module(m) for m in modules if m not in names]
    if unknown:
        raise LoRAError(f"{file}: adapter for {unknown[:3]}, which this model does not have (or cannot adapt); "
                        f"its adaptable modules are like {[_hf_module(n) for n in names[:3]]}")
    if name in adapter_names(model):
        raise LoRAError(f"the model already has an adapter named {name!r}; load this one under another name")
    try:
        for module, parts in modules.items():
            r = _pattern_value(rank_pattern, module, cfg["r"])
            alpha = _pattern_value(alpha_pattern, module, cfg["lora_alpha"])
            lcfg = LoRAConfig(r=r, alpha=float(alpha), dropout=float(cfg.get("lora_dropout") or 0.0),
                              target_modules=[module], use_rslora=bool(cfg.get("use_rslora", False)))
            inject_lora(model, lcfg, name, targets=[module], activate=False)
            _copy_parts(model.get_submodule(module), name, parts, f"{file}: {_hf_module(module)}")
    except LoRAError:
        delete_adapter(model, name)  # all or nothing
        raise
    if activate:
        set_adapter(model, name)
    return list(modules)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the module name's end."""
    hf = _hf_module(module)
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", hf):
            return value
    return default


def _copy_parts(m: nn.Module, name: str, parts: dict[str, torch.Tensor], where: str) -> None:
    base = parts.pop("base", None)
    if base is not None and not torch.equal(base.to(m.weight.dtype), m.base_layer.weight.detach().cpu()):
        raise LoRAError(f"{where}: the adapter carries a base weight that differs from the model's (trained or "
                        "another checkpoint); r1kit applies only the low-rank part")
    if isinstance(m, LoRALinear):
        pairs = [("A", m.lora_A[name].weight), ("B", m.lora_B[name].weight)]
    else:
        pairs = [(f"{ab}.{proj}", (m.lora_A if ab == "A" else m.lora_B)[name][proj])
                 for ab in ("A", "B") for proj in LoRAExperts.PROJECTIONS]
    expected = {k for k, _ in pairs}
    if set(parts) != expected:
        raise LoRAError(f"{where}: has {sorted(parts)}, expected {sorted(expected)}")
    for key, param in pairs:
        t = parts[key]
        if t.shape != param.shape:
            raise LoRAError(f"{where}: lora_{key} has shape {tuple(t.shape)}, the model needs {tuple(param.shape)} "
                            f"(rank or layer size mismatch)")
        param.copy_(t.to(param.dtype))


