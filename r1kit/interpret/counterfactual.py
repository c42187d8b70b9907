"""Counterfactuals: activation patching between a clean and a corrupted prompt, and single-token substitutions.

Activation patching (Meng et al. 2022; Wang et al. 2022): run the corrupted prompt, then the clean one with the
residual stream (blocks.{L}.hook_resid_pre) at one position replaced by the corrupted run's. The metric is the
logit difference at the last prompt position between the clean run's next token and the corrupted run's; the
effect of a patch is normalised, 0 = as clean, 1 = as corrupted. All positions of a layer run as one batch.

Token substitution: each prompt position is replaced by each of its nearest tokens in the input-embedding
space (cosine); the edits that change the greedy next token are the counterfactuals, with the drop in the
original token's log-probability as their output delta.
"""

from __future__ import annotations

import torch

from r1kit.model.transformer import Transformer


def patch_resid(corrupted_cache: dict[str, torch.Tensor], layer: int, positions: list[int]):
    """A hook (for blocks.{layer}.hook_resid_pre) writing the corrupted run's residual at `positions`, every row."""
    source = corrupted_cache[f"blocks.{layer}.hook_resid_pre"]  # (1, N, C)

    def hook(x: torch.Tensor, _hook) -> torch.Tensor:
        if x.shape[1] < max(positions) + 1:  # a decode step after the prompt: nothing of the prompt to patch
            return x
        x = x.clone()
        x[:, positions] = source[:, positions].to(x.dtype)
        return x

    return hook


@torch.no_grad()
def activation_patching(model: Transformer, clean: torch.Tensor, corrupted: torch.Tensor) -> dict:
    """clean, corrupted (1, P) of equal length -> {"clean_token", "corrupted_token", "logit_diff_clean",
    "logit_diff_corrupted", "effect": (L, P) list of normalised effects of patching resid_pre at (layer, position)}.
    """
    if clean.shape != corrupted.shape:
        raise ValueError(f"activation patching needs prompts of equal token length: clean has {clean.shape[1]} "
                         f"tokens, corrupted {corrupted.shape[1]}; pick a corruption that keeps the tokenization")
    L, P = model.config.num_layers, clean.shape[1]
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    logits_clean = model(clean)[0, -1].float()
    logits_corr, cache = model.run_with_cache(corrupted, names=names)
    a, b = int(logits_clean.argmax()), int(logits_corr[0, -1].argmax())
    diff_clean = float(logits_clean[a] - logits_clean[b])
    diff_corr = float(logits_corr[0, -1, a] - logits_corr[0, -1, b])
    span = diff_corr - diff_clean
    effect = []
    for layer in range(L):
        source = cache[names[layer]]  # (1, P, C)

        def patch(x: torch.Tensor, _hook, source=source) -> torch.Tensor:  # copy p gets position p patched
            x = x.clone()
            rows = torch.arange(P)
            x[rows, rows] = source[0, rows].to(x.dtype)
            return x

        out = model.run_with_hooks(clean.expand(P, -1), hooks=[(names[layer], patch)], last_only=True)[:, -1].float()
        diff = out[:, a] - out[:, b]  # (P,)
        effect.append([round(float(v), 4) for v in ((diff - diff_clean) / span if abs(span) > 1e-6 else diff * 0)])
    return {"clean_token": a, "corrupted_token": b, "logit_diff_clean": diff_clean, "logit_diff_corrupted": diff_corr,
            "effect": effect}


@torch.no_grad()
def token_substitutions(model: Transformer, ids: torch.Tensor, positions: list[int], candidates: int = 8,
                        batch: int = 64) -> list[dict]:
    """ids (1, P) prompt -> the single-token edits at `positions` that change the greedy next token:
    [{"position", "from", "to", "new_token", "logprob_before", "logprob_after"}], by largest drop first.
    Candidates per position: its `candidates` nearest tokens by input-embedding cosine."""
    emb = model.embed_tokens.weight.float()
    unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (V, C)
    base = model(ids, last_only=True)[0, -1].float().log_softmax(-1)
    orig = int(base.argmax())
    edits = []
    for p in positions:
        sims = unit @ unit[ids[0, p]]  # (V,)
        sims[ids[0, p]] = -2
        edits += [(p, int(t)) for t in sims.topk(candidates).indices]
    found = []
    for start in range(0, len(edits), batch):
        chunk = edits[start:start + batch]
        rows = ids.repeat(len(chunk), 1)
        for r, (p, t) in enumerate(chunk):
            rows[r, p] = t
        lp = model(rows, last_only=True)[:, -1].float().log_softmax(-1)  # (b, V)
        for r, (p, t) in enumerate(chunk):
            new = int(lp[r].argmax())
            if new != orig:
                found.append({"position": p, "from": int(ids[0, p]), "to": t, "new_token": new,
                              "logprob_before": round(float(base[orig]), 4),
                              "logprob_after": round(float(lp[r, orig]), 4)})
    return sorted(found, key=lambda e: e["logprob_after"])
