"""Named hook points: read or replace any activation the model computes, by TransformerLens's names.

Every block, attention and MoE module holds `HookPoint`s, identities until a function is attached:

    blocks.{L}.hook_resid_pre     (B, T, C)  the block's input
    blocks.{L}.hook_attn_out      (B, T, C)  the attention's output (after o_proj)
    blocks.{L}.hook_resid_mid     (B, T, C)  resid_pre + attn_out
    blocks.{L}.hook_mlp_out       (B, T, C)  the MLP's or MoE's output (shared experts included)
    blocks.{L}.hook_resid_post    (B, T, C)  resid_mid + mlp_out
    blocks.{L}.attn.hook_pattern  (B, H, T, S) softmax probabilities (S = cached + new keys)
    blocks.{L}.attn.hook_z        (B, T, H, Dv) each head's output before o_proj
    blocks.{L}.attn.hook_kv_latent (B, T, kv_lora_rank + qk_rope_head_dim)  MLA only: the cached entry
    blocks.{L}.moe.hook_router_scores  (N, E) fp32 affinities, N = B * T        MoE layers only
    blocks.{L}.moe.hook_topk_experts   (N, k) the chosen expert ids             MoE layers only
    blocks.{L}.moe.hook_expert_weights (N, k) fp32 weights of the chosen experts MoE layers only
    hook_embed                    (B, T, C)  the token embeddings

A hook function is ``fn(tensor, hook) -> tensor | None``: a returned tensor replaces the activation, None keeps
it. Unused points cost one attribute test per call (``if not self.fns``). The attention pattern is not
materialised by the fused SDPA path, so while ``hook_pattern`` has a function the attention runs the explicit
softmax(QK^T)V instead (same math). Patterns are captured on the ``forward`` path (KV cache or not, MLA naive
or absorbed); the engine's paged path and the sparse attention layers expose the resid/mlp/MoE points only.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint:
    """An identity on one activation; functions attached to it may read or replace the tensor.

    A plain object, not an nn.Module: it adds nothing to the module tree, the state dict or module swaps.
    """

    __slots__ = ("fns", "name")

    def __init__(self) -> None:
        self.fns: list[HookFn] = []
        self.name = ""  # set by `hook_points`

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fns:
            return x
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook on {self.name} returned shape {tuple(out.shape)}, "
                                     f"expected {tuple(x.shape)}")
                x = out
        return x

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, {len(self.fns)} fns)"


class UnknownHookError(KeyError):
    """A hook name the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def hook_points(model: torch.nn.Module) -> dict[str, HookPoint]:
    """Every hook point of a Transformer by its TransformerLens-style name (see the module docstring)."""
    points = {"hook_embed": model.hook_embed}
    for i, block in enumerate(model.layers):
        prefix = f"blocks.{i}."
        for sub, module in (("", block), ("attn.", block.self_attn), ("moe.", block.mlp)):
            for attr, value in vars(module).items():
                if isinstance(value, HookPoint):
                    points[prefix + sub + attr] = value
    for name, point in points.items():
        point.name = name
    return points


def resolve(points: dict[str, HookPoint], name: str) -> HookPoint:
    """points[name], or UnknownHookError naming the closest valid names."""
    if name in points:
        return points[name]
    near = difflib.get_close_matches(name, list(points), n=6, cutoff=0.6)
    hint = f"close valid names: {', '.join(near)}" if near else f"valid names include: {', '.join(list(points)[:8])}"
    raise UnknownHookError(f"no hook point {name!r} in this model; {hint} ({len(points)} points in all, "
                           f"see r1kit.model.hooks)")


def select(points: dict[str, HookPoint], names: str | Iterable[str] | Callable[[str], bool] | None) -> list[str]:
    """The names a `names` argument means: None = all, a callable = a filter, else one name or a list of names."""
    if names is None:
        return list(points)
    if callable(names):
        return [n for n in points if names(n)]
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        resolve(points, n)
    return names


@contextmanager
def attached(points: dict[str, HookPoint], hooks: Iterable[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach (name, fn) pairs for the duration of the block; removed afterwards even on error."""
    added = []
    try:
        for name, fn in hooks:
            point = resolve(points, name)
            point.fns.append(fn)
            added.append((point, fn))
        yield
    finally:
        for point, fn in added:
            point.fns.remove(fn)


def run_with_hooks(model: torch.nn.Module, ids: torch.Tensor, hooks: Iterable[tuple[str, HookFn]], **kwargs
                   ) -> torch.Tensor:
    """model(ids, **kwargs) with the (name, fn) hooks attached for this call only."""
    with attached(hook_points(model), hooks):
        return model(ids, **kwargs)


def run_with_cache(model: torch.nn.Module, ids: torch.Tensor,
                   names: str | Iterable[str] | Callable[[str], bool] | None = None, detach: bool = True,
                   **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(model(ids, **kwargs), {name: activation}) for the chosen hook points (None: all of them).

    With detach=False the cached tensors stay in the autograd graph (gradient x activation methods).
    """
    points = hook_points(model)
    cache: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: HookPoint) -> None:
        cache[hook.name] = x.detach() if detach else x

    with attached(points, [(n, keep) for n in select(points, names)]):
        logits = model(ids, **kwargs)
    return logits, cache


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                       hook: HookPoint) -> torch.Tensor:
    """softmax(q k^T * scale) v with the probabilities passed through `hook` (the pattern hook point).

    q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None (causal over the last T keys) or bool
    (B|1, 1, T, S) -> (B, H, T, Dv). Computed in fp32, like the fused path's softmax.
    """
    H, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    pattern = hook(scores.softmax(-1))  # (B, H, T, S)
    return torch.matmul(pattern, v.float()).to(q.dtype)
