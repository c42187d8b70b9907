"""Expert merging: fold the least important routed experts of a MoE layer into the most similar kept ones.

Used by prune-structured with ``expert_reduce="merge"`` (``r1kit compress ... --experts 6 --expert-reduce merge``)
instead of dropping them. Per MoE layer, on the calibration tokens that reach it:

1. the `keep` most important experts (r1kit.compress.structured.expert_importance) are the anchors;
2. every other expert joins the anchor whose outputs on those tokens are most similar (mean cosine similarity of
   the two experts' outputs, each expert run on every sampled token);
3. a group's SwiGLU experts are averaged, weighted by importance, after each member's hidden channels are
   permuted onto the anchor's (a channel is its (gate row, up row, down column); matched by the Hungarian
   algorithm on their cosine similarity: two experts' channels have no common order otherwise);
4. the router is re-mapped: the merged expert's router row and balancing bias are the group's importance-weighted
   average, so tokens that used to pick a merged-away expert now score its group's expert higher.

The result has `keep` experts in anchor order, like dropping; only the surviving weights differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_outputs(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: x (N, C), gate_up (E, 2I, C), down (E, C, I) -> (E, N, C)."""
    h = torch.einsum("nc,eic->eni", x, gate_up)  # (E, N, 2I)
    gate, up = h.chunk(2, dim=-1)
    return torch.einsum("eni,eci->enc", F.silu(gate) * up, down)


def assign_groups(outputs: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """outputs (E, N, C), anchors (K,) expert ids -> (E,) the anchor index (0..K-1) each expert joins."""
    y = F.normalize(outputs.float(), dim=-1)  # (E, N, C)
    sim = torch.einsum("enc,knc->ekn", y, y[anchors]).mean(-1)  # (E, K) mean cosine similarity over tokens
    group = sim.argmax(-1)
    group[anchors] = torch.arange(anchors.numel())  # an anchor is its own group
    return group


def align_channels(gu_a: torch.Tensor, dn_a: torch.Tensor, gu_b: torch.Tensor, dn_b: torch.Tensor
                   ) -> torch.Tensor:
    """The permutation (I,) of expert b's hidden channels that best matches expert a's: gate_up (2I, C), down
    (C, I). perm[i] is b's channel put at a's position i."""
    def features(gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        gate, up = gu.float().chunk(2, dim=0)  # (I, C) each
        return F.normalize(torch.cat((gate, up, dn.float().T), dim=1), dim=1)  # (I, 3C)

    try:
        from scipy.optimize import linear_sum_assignment  # Hungarian matching; only merging needs scipy
    except ImportError as e:
        raise ImportError("expert_reduce='merge' needs scipy: pip install 'r1kit[interpret]' (or scipy)") from e

    cost = -(features(gu_a, dn_a) @ features(gu_b, dn_b).T)  # (I, I)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def permute_expert(gu: torch.Tensor, dn: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function with hidden channels reordered: gate_up (2I, C), down (C, I)."""
    hidden = dn.shape[1]
    return torch.cat((gu[perm], gu[hidden + perm])), dn[:, perm]


@torch.no_grad()
def merge_experts(sd: dict[str, torch.Tensor], p: str, importance: torch.Tensor, keep: int, x: torch.Tensor
                  ) -> dict[str, list[int]]:
    """Merge the experts of the MoE whose state_dict prefix is `p` (in `sd`, in place) down to `keep`.

    importance (E,); x (N, C) calibration inputs of the layer. Returns {anchor id: [member ids]}."""
    gu, dn = sd[p + "experts.gate_up_proj"].float(), sd[p + "experts.down_proj"].float()  # (E, 2I, C), (E, C, I)
    anchors = importance.topk(keep).indices.sort().values  # (K,)
    group = assign_groups(expert_outputs(x.float(), gu, dn), anchors)  # (E,)
    imp = importance.float() + 1e-6  # an expert never routed still counts a little (no 0 / 0)
    new_gu, new_dn, rows, biases, members = [], [], [], [], {}
    router, bias = sd[p + "gate.weight"].float(), sd.get(p + "gate.e_score_correction_bias")
    for k, a in enumerate(anchors.tolist()):
        ids = (group == k).nonzero().flatten().tolist()
        w = imp[ids] / imp[ids].sum()  # (M,) importance weights of the group
        acc_gu, acc_dn = torch.zeros_like(gu[a]), torch.zeros_like(dn[a])
        for wi, e in zip(w.tolist(), ids, strict=True):
            perm = torch.arange(dn.shape[2]) if e == a else align_channels(gu[a], dn[a], gu[e], dn[e])  # (I,)
            g, d = permute_expert(gu[e], dn[e], perm)
            acc_gu += wi * g
            acc_dn += wi * d
        new_gu.append(acc_gu)
        new_dn.append(acc_dn)
        rows.append(w @ router[ids])
        if bias is not None:
            biases.append(w @ bias.float()[ids])
        members[a] = [e for e in ids if e != a]
    dtype = sd[p + "experts.gate_up_proj"].dtype
    sd[p + "experts.gate_up_proj"] = torch.stack(new_gu).to(dtype)
    sd[p + "experts.down_proj"] = torch.stack(new_dn).to(dtype)
    sd[p + "gate.weight"] = torch.stack(rows).to(sd[p + "gate.weight"].dtype)
    if bias is not None:
        sd[p + "gate.e_score_correction_bias"] = torch.stack(biases).to(bias.dtype)
    return members
