"""Attribution from generated tokens back to prompt tokens, on one sequence ids = prompt + generated.

Generated token i (at position P + i) is predicted at position q = P + i - 1; every method returns a matrix
(G, P): one row per generated token, one column per prompt token.

- `attention_rollout` (Abnar & Zuidema 2020): per layer A = 0.5 * mean_h(pattern) + 0.5 * I (the residual),
  multiplied through the layers.
- `attention_flow` (Abnar & Zuidema 2020): the max-flow from the output node to each input node of the layered
  graph whose edge capacities are the rollout's per-layer matrices (scipy's integer max-flow, capacities scaled
  by 1e6).
- `grad_x_attention` (Chefer et al. 2021): per layer mean_h(grad * pattern)^+, accumulated as R <- R + A R,
  with the gradient of the target token's logit (its log-probability saturates when the model is sure).
- `integrated_gradients` (Sundararajan et al. 2017) on the token embeddings (through the hook_embed point):
  straight line from a zero baseline, midpoint Riemann sum of `steps` points; attribution = (x - x0) . mean grad.
- `chain_through_generation`: any of these over all input positions, with the share given to earlier generated
  tokens passed on to the prompt tokens those came from.
- `top_paths`: the best chains prompt token -> layer/head -> ... -> output by the product of the rollout's edge
  weights (beam search), each hop labelled with the head that attends most along it (or "residual").

The quadratic methods refuse sequences longer than a stated limit (QuadraticLimitError).
"""

from __future__ import annotations

import numpy as np
import torch

from r1kit.model.transformer import Transformer


class QuadraticLimitError(ValueError):
    """A sequence is too long for a method whose cost grows with its square."""


def check_length(n: int, limit: int, what: str) -> None:
    """QuadraticLimitError when n tokens exceed `limit` for method `what`."""
    if n > limit:
        raise QuadraticLimitError(f"{what}: {n} tokens exceed the limit of {limit} for quadratic methods "
                                  f"(max_quadratic_tokens); shorten the prompt/target or raise the limit")


def pattern_names(model: Transformer) -> list[str]:
    """The attention-pattern hook names of every layer, in order."""
    return [f"blocks.{i}.attn.hook_pattern" for i in range(model.config.num_layers)]


@torch.no_grad()
def attention_patterns(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """ids (1, N) -> patterns (L, H, N, N) fp32."""
    _, cache = model.run_with_cache(ids, names=pattern_names(model))
    return torch.stack([cache[n][0].float() for n in pattern_names(model)])


def residual_attention(patterns: torch.Tensor) -> torch.Tensor:
    """patterns (L, H, N, N) -> per-layer 0.5 * head-mean + 0.5 * I, rows summing to 1, (L, N, N)."""
    eye = torch.eye(patterns.shape[-1])
    return 0.5 * patterns.mean(1) + 0.5 * eye


def attention_rollout(patterns: torch.Tensor, n_prompt: int, full: bool = False) -> torch.Tensor:
    """patterns (L, H, N, N), n_prompt P -> (G, P) with G = N - P generated tokens; (G, N) with full (every input
    position, the earlier generated tokens included)."""
    A = residual_attention(patterns)
    R = torch.eye(A.shape[-1])
    for layer in A:
        R = layer @ R  # (N, N): output position <- input position
    return R[n_prompt - 1:-1, :None if full else n_prompt]


def attention_flow(patterns: torch.Tensor, n_prompt: int, full: bool = False) -> torch.Tensor:
    """patterns (L, H, N, N) -> (G, P): max-flow from each query node (top layer) to each prompt node (input);
    (G, N) with full (flows to later positions are 0)."""
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow
    except ImportError as e:
        raise ImportError("attention flow needs scipy's max-flow: pip install 'r1kit[interpret]' (or leave 'flow' "
                          "out of the methods)") from e

    A = residual_attention(patterns).numpy()  # (L, N, N)
    L, N, _ = A.shape
    # node (l, p) = l * N + p, l = 0 the inputs; an edge (l + 1, q) -> (l, j) of capacity A[l, q, j]
    rows, cols, caps = [], [], []
    for layer in range(L):
        q, j = np.nonzero(A[layer] > 1e-6)
        rows.append((layer + 1) * N + q)
        cols.append(layer * N + j)
        caps.append(np.round(A[layer, q, j] * 1e6).astype(np.int32))
    graph = csr_matrix((np.concatenate(caps), (np.concatenate(rows), np.concatenate(cols))),
                       shape=((L + 1) * N, (L + 1) * N))
    out = torch.zeros(N - n_prompt, N if full else n_prompt)
    for g, q in enumerate(range(n_prompt - 1, N - 1)):
        for j in range(q + 1 if full else n_prompt):
            out[g, j] = maximum_flow(graph, L * N + q, j, method="dinic").flow_value / 1e6
    return out


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """logits (B, N, V), ids (1, N) -> log-probs (B, G) of each generated token at its predicting position."""
    lp = logits[:, n_prompt - 1:-1].float().log_softmax(-1)  # (B, G, V)
    target = ids[0, n_prompt:]  # (G,)
    return lp.gather(-1, target[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]


def grad_x_attention(model: Transformer, ids: torch.Tensor, n_prompt: int, full: bool = False) -> torch.Tensor:
    """(G, P), or (G, N) with full: Chefer et al.'s gradient-weighted attention rollout, one backward per
    generated token."""
    names = pattern_names(model)
    with torch.enable_grad():
        logits, cache = model.run_with_cache(ids, names=names, detach=False)
        patterns = [cache[n] for n in names]  # L x (1, H, N, N)
        target = ids[0, n_prompt:]  # (G,)
        logit = logits[0, n_prompt - 1:-1].float().gather(-1, target[:, None])[:, 0]  # (G,) the target's logit
        N = ids.shape[1]
        rows = []
        for g in range(logit.shape[0]):
            grads = torch.autograd.grad(logit[g], patterns, retain_graph=g + 1 < logit.shape[0])
            R = torch.eye(N)
            for a, grad in zip(patterns, grads, strict=True):
                cam = (grad[0] * a[0]).detach().float().clamp(min=0).mean(0)  # (N, N)
                R = R + cam @ R
            rows.append(R[n_prompt - 1 + g, :None if full else n_prompt])
    return torch.stack(rows)


def integrated_gradients(model: Transformer, ids: torch.Tensor, n_prompt: int, steps: int = 32, full: bool = False
                         ) -> torch.Tensor:
    """(G, P), or (G, N) with full: integrated gradients of each generated token's log-prob on the embeddings
    (zero baseline), summed over the hidden channels. Midpoint Riemann sum of `steps` points, one forward."""
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # (m,)
    embed = model.embed_tokens(ids).detach()  # (1, N, C)
    scaled = (alphas[:, None, None] * embed.float()).to(embed.dtype).requires_grad_(True)  # (m, N, C)
    rows = []
    with torch.enable_grad():
        logits = model.run_with_hooks(ids.expand(steps, -1), hooks=[("hook_embed", lambda x, h: scaled)])
        logp = token_logprobs(logits, ids, n_prompt).sum(0)  # (G,) summed over the path points
        for g in range(logp.shape[0]):
            (grad,) = torch.autograd.grad(logp[g], scaled, retain_graph=g + 1 < logp.shape[0])
            attr = (embed[0].float() * grad.float().mean(0)).sum(-1)  # (N,)
            rows.append(attr[:None if full else n_prompt])
    return torch.stack(rows)


def chain_through_generation(full: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(G, N) attributions over every input position -> (G, P) over the prompt, crediting what each row gives
    an earlier generated token to the prompt tokens that token itself came from (its own chained row, scaled to
    unit L1 norm): c[g] = full[g, :P] + sum_{g' < g} full[g, P + g'] * c[g'] / |c[g']|_1.

    A reasoning model computes its answer from its own trace ("7+5=" copies the operands' digits); the direct
    (G, P) rows cannot see a prompt token that reaches the answer only through a generated copy."""
    G = full.shape[0]
    chained = torch.zeros(G, n_prompt)
    for g in range(G):
        chained[g] = full[g, :n_prompt]
        for h in range(g):
            norm = chained[h].abs().sum().clamp_min(1e-12)
            chained[g] += full[g, n_prompt + h] * chained[h] / norm
    return chained


def top_paths(patterns: torch.Tensor, n_prompt: int, k: int = 5) -> list[list[dict]]:
    """Per generated token, the k best paths prompt token -> ... -> its predicting position, by the product of
    residual-attention edge weights, found by beam search from the output down through the layers.

    Each path: {"score", "positions": [p_0 (prompt), p_1, ..., p_L (= the query)], "hops": [{"layer", "head",
    "from", "to", "weight"}]}; head None where the hop stays at its position (the residual, half of each row,
    outweighs any one head there)."""
    A = residual_attention(patterns)  # (L, N, N)
    L, N = A.shape[0], A.shape[-1]
    out = []
    for q in range(n_prompt - 1, N - 1):
        beams = [(1.0, [q])]  # (score, positions from the top layer down)
        for layer in range(L - 1, -1, -1):
            cand = []
            for score, path in beams:
                p = path[-1]
                w = A[layer, p, :p + 1]  # (p + 1,)
                top = w.topk(min(k, p + 1))
                cand += [(score * float(v), path + [int(j)]) for v, j in zip(top.values, top.indices, strict=True)]
            beams = sorted(cand, key=lambda c: -c[0])[:4 * k]
        done = sorted([b for b in beams if b[1][-1] < n_prompt], key=lambda c: -c[0])[:k]
        out.append([_describe_path(patterns, A, score, path[::-1]) for score, path in done])
    return out


def _describe_path(patterns: torch.Tensor, A: torch.Tensor, score: float, positions: list[int]) -> dict:
    """A path's hops with the head that carries each (patterns (L, H, N, N), A the residual attention)."""
    hops = []
    for layer, (src, dst) in enumerate(zip(positions[:-1], positions[1:], strict=True)):
        h = int(patterns[layer, :, dst, src].argmax())  # (H,) -> the head attending most along the hop
        hops.append({"layer": layer, "head": None if src == dst else h, "from": src, "to": dst,
                     "weight": round(float(A[layer, dst, src]), 5)})
    return {"score": score, "positions": positions, "hops": hops}


@torch.no_grad()
def expert_routes(model: Transformer, ids: torch.Tensor) -> list[list[dict]]:
    """Per token of ids (1, N), per MoE layer: {"layer", "experts": [ids], "weights": [...]} (empty for dense)."""
    moe_layers = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    names = [f"blocks.{i}.moe.hook_{w}" for i in moe_layers for w in ("topk_experts", "expert_weights")]
    if not names:
        return [[] for _ in range(ids.shape[1])]
    _, cache = model.run_with_cache(ids, names=names)
    routes = []
    for t in range(ids.shape[1]):
        per_layer = []
        for i in moe_layers:
            idx, w = cache[f"blocks.{i}.moe.hook_topk_experts"][t], cache[f"blocks.{i}.moe.hook_expert_weights"][t]
            order = w.argsort(descending=True)
            per_layer.append({"layer": i, "experts": idx[order].tolist(),
                              "weights": [round(float(x), 4) for x in w[order]]})
        routes.append(per_layer)
    return routes
