"""Do r1kit.interpret's attributions mean something? Checks on nano's held-out 2-digit additions, each able to fail.

    python benchmarks/bench_interpret.py [--json runs/bench_interpret.json] [--n 100] [--ig-steps 16]

Problems: `--n` held-out add2 problems (r1kit.train.data, split "val") with both operands of two digits, so
that every chat prompt has the same token layout. nano answers in the R1 format and starts its <think> trace with
the ones digits: "7+5=12, ...". The first answer digit is the token after that "=" (the first digit of the ones
sum); its prompt is the chat prompt, its target the greedy trace up to and including that digit.

1. Attribution: for each method, is each operand's ones digit (in the question) among the top-3 prompt tokens of
   the answer digit's row? Ranked over the question's tokens ("What is 37+45?": 9 tokens; a random top-3 holds
   both with probability 6 / (9 * 8) = 8.3%), and over all prompt tokens (chat markers included) as well. Each
   method directly (the prompt columns of the answer digit's row) and "_chained": the shares its row gives the
   trace's own copies ("7", "+", "5", "=") passed on to the prompt tokens those came from
   (`attribution.chain_through_generation`). integrated_gradients_abs ranks |IG|.
2. Activation patching: the operand digit positions' residual stream (resid_pre of layer L) from a corrupted
   problem (another held-out pair), then greedy decoding: how often the final answer becomes the corrupted
   problem's sum, per layer L.
3. Head ablation: heads ranked by zero-ablation on the first half of the problems (summed target log-prob of the
   whole greedy completion); on the other half, the loss increase per token of the top-ranked head against the
   median-ranked head (ratio reported).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from r1kit.api import R1Model
from r1kit.interpret import ablation, attribution
from r1kit.interpret.counterfactual import patch_resid
from r1kit.interpret.explain import prompt_ids
from r1kit.train.data import parse_answer, sample_problem

METHODS = ("rollout", "flow", "grad_x_attention", "integrated_gradients")


def problems(n: int, seed: int) -> list:
    """n distinct held-out add2 problems with two-digit operands."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        p = sample_problem(rng, "add2", split="val")
        if p.a >= 10 and p.b >= 10 and (p.a, p.b) not in seen:
            seen.add((p.a, p.b))
            out.append(p)
    return out


@torch.no_grad()
def greedy(net, prompts: torch.Tensor, max_new: int, hooks=()) -> torch.Tensor:
    """prompts (B, P) of equal length -> (B, max_new) greedy tokens; hooks apply to the prefill only."""
    cache = net.new_cache(prompts.shape[0], prompts.shape[1] + max_new)
    logits = net.run_with_hooks(prompts, hooks=list(hooks), cache=cache, last_only=True)
    out = []
    for _ in range(max_new):
        nxt = logits[:, -1].argmax(-1)  # (B,)
        out.append(nxt)
        logits = net(nxt[:, None], cache)
    return torch.stack(out, 1)


def digit_positions(tok, p_ids: list[int], a: int, b: int) -> tuple[list[int], int, int]:
    """(question positions, position of a's ones digit, of b's ones digit) in the chat prompt."""
    texts = [tok.decode([i]) for i in p_ids]
    start = texts.index("What")
    end = start + texts[start:].index("?") + 1
    digits = [i for i in range(start, end) if texts[i].isdigit()]  # a's two digits, then b's
    assert "".join(texts[i] for i in digits) == f"{a}{b}", (texts, a, b)
    return list(range(start, end)), digits[1], digits[3]


def attribution_check(model: R1Model, probs: list, max_new: int, ig_steps: int) -> dict:
    """Rates of top-3 containing both ones digits, per method, over the question and over the whole prompt."""
    tok, net = model.tokenizer, model.model
    names = [*METHODS, "integrated_gradients_abs"]
    hits = {m: {"question": 0, "prompt": 0} for m in names + [f"{m}_chained" for m in names]}
    used, skipped = 0, []
    for p in tqdm(probs, desc="attribution", unit="problem"):
        p_ids = prompt_ids(model, p.question, chat=True)
        gen = greedy(net, torch.tensor([p_ids]), max_new)[0].tolist()
        text = [tok.decode([t]) for t in gen]
        if "=" not in text[:6]:
            skipped.append(p.question)
            continue
        g_ids = gen[:text.index("=") + 2]  # the trace up to the first answer digit
        ids = torch.tensor([p_ids + g_ids])
        P = len(p_ids)
        question, ones_a, ones_b = digit_positions(tok, p_ids, p.a, p.b)
        patterns = attribution.attention_patterns(net, ids)
        full = {"rollout": attribution.attention_rollout(patterns, P, full=True),
                "flow": attribution.attention_flow(patterns, P, full=True),
                "grad_x_attention": attribution.grad_x_attention(net, ids, P, full=True),
                "integrated_gradients": attribution.integrated_gradients(net, ids, P, ig_steps, full=True)}
        full["integrated_gradients_abs"] = full["integrated_gradients"].abs()
        rows = {}
        for m, f in full.items():
            rows[m], rows[f"{m}_chained"] = f[-1, :P], attribution.chain_through_generation(f, P)[-1]
        for m, row in rows.items():
            for scope, cols in (("question", question), ("prompt", list(range(P)))):
                top = [cols[i] for i in row[cols].topk(3).indices.tolist()]
                hits[m][scope] += ones_a in top and ones_b in top
        used += 1
    return {"problems": used, "skipped_no_trace": skipped,
            "rate": {m: {s: round(v / max(used, 1), 4) for s, v in h.items()} for m, h in hits.items()}}


def patching_check(model: R1Model, probs: list, max_new: int, seed: int) -> dict:
    """Per layer: the share of problems whose answer becomes the corrupted one's when the operand digits'
    resid_pre comes from the corrupted run."""
    tok, net = model.tokenizer, model.model
    rng = random.Random(seed + 1)
    corrupt = []
    for p in probs:  # a corrupted pair with a different sum
        while True:
            c = sample_problem(rng, "add2", split="val")
            if c.a >= 10 and c.b >= 10 and c.a + c.b != p.a + p.b:
                corrupt.append(c)
                break
    clean_ids = torch.tensor([prompt_ids(model, p.question, True) for p in probs])  # (B, P)
    corr_ids = torch.tensor([prompt_ids(model, c.question, True) for c in corrupt])
    _, ones_a, ones_b = digit_positions(tok, clean_ids[0].tolist(), probs[0].a, probs[0].b)
    positions = [ones_a - 1, ones_a, ones_b - 1, ones_b]  # both operands' two digits

    def answers(tokens: torch.Tensor) -> list:
        return [parse_answer(tok.decode(row.tolist(), skip_special_tokens=True)) for row in tokens]

    clean = answers(greedy(net, clean_ids, max_new))
    corr = answers(greedy(net, corr_ids, max_new))
    out = {"clean_accuracy": sum(a == p.a + p.b for a, p in zip(clean, probs, strict=True)) / len(probs),
           "corrupted_accuracy": sum(a == c.a + c.b for a, c in zip(corr, corrupt, strict=True)) / len(probs),
           "positions": positions, "flip_to_corrupted": {}, "still_clean": {}}
    for layer in tqdm(range(net.config.num_layers), desc="patching", unit="layer"):
        name = f"blocks.{layer}.hook_resid_pre"
        _, cache = net.run_with_cache(corr_ids, names=[name])
        got = answers(greedy(net, clean_ids, max_new, [(name, patch_resid(cache, layer, positions))]))
        out["flip_to_corrupted"][layer] = sum(g == c.a + c.b for g, c in zip(got, corrupt, strict=True)) / len(probs)
        out["still_clean"][layer] = sum(g == p.a + p.b for g, p in zip(got, probs, strict=True)) / len(probs)
    return out


def ablation_check(model: R1Model, probs: list, max_new: int) -> dict:
    """Rank heads on the first half; on the second half, loss increase of the top vs the median head."""
    net, half = model.model, len(probs) // 2
    stop = set(model.stop_ids())

    def sequences(ps: list) -> list[tuple[torch.Tensor, int]]:  # (prompt + greedy completion to its stop, P)
        prompts = [prompt_ids(model, p.question, True) for p in ps]  # all of one length (two-digit operands)
        seqs = []
        for p_ids, gen in zip(prompts, greedy(net, torch.tensor(prompts), max_new).tolist(), strict=True):
            gen = gen[:next((i + 1 for i, t in enumerate(gen) if t in stop), len(gen))]
            seqs.append((torch.tensor([p_ids + gen]), len(p_ids)))
        return seqs

    def deltas(seqs) -> dict[tuple[int, int], float]:  # (layer, head) -> summed log-prob change per target token
        total: dict[tuple[int, int], float] = {}
        for ids, P in tqdm(seqs, desc="ablation", unit="problem"):
            for r in ablation.ablate_heads(net, ids, P, "zero"):
                key = (r["layer"], r["head"])
                total[key] = total.get(key, 0.0) + r["delta"] / (ids.shape[1] - P)
        return {k: v / len(seqs) for k, v in total.items()}

    rank = sorted(deltas(sequences(probs[:half])).items(), key=lambda kv: kv[1])
    top, median = rank[0][0], rank[len(rank) // 2][0]
    held = deltas(sequences(probs[half:]))
    loss_top, loss_median = -held[top], -held[median]
    return {"ranked_on": half, "evaluated_on": len(probs) - half, "top_head": list(top), "median_head": list(median),
            "loss_increase_top": round(loss_top, 5), "loss_increase_median": round(loss_median, 5),
            "ratio": round(loss_top / loss_median, 2) if loss_median > 0 else None,
            "median_of_all_heads_heldout": round(-statistics.median(held.values()), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="attribution,patching,ablation")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = R1Model.from_pretrained("r1kit/nano", device="cpu", dtype="fp32")
    probs = problems(a.n, a.seed)
    result: dict = {"model": "r1kit/nano", "n": a.n, "seed": a.seed, "ig_steps": a.ig_steps}
    t0 = time.time()
    parts = a.parts.split(",")
    if "attribution" in parts:
        result["attribution"] = attribution_check(model, probs, 8, a.ig_steps)
    if "patching" in parts:
        result["patching"] = patching_check(model, probs, 100, a.seed)
    if "ablation" in parts:
        result["ablation"] = ablation_check(model, probs, 100)
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
