"""Evaluation on held-out data: arithmetic accuracy (greedy chat answers) and perplexity on held-out text, here;
HumanEval pass@k in `r1kit.eval.humaneval`, its code run by `r1kit.eval.sandbox`.

    r1kit eval r1kit/nano --task arithmetic [--kinds add2,sub2] [--n 200]
    r1kit eval r1kit/nano --task perplexity [--max-tokens 50000]

Arithmetic problems come from the held-out side of the hash split (never seen in training); the answer
is the integer after </think>.

Perplexity has one definition, used by the CLI, the model card (scripts/package_nano.py) and
benchmarks/bench_quant_quality.py: `heldout_texts` (the validation files of the standard-library split, in
path order) encoded as training encodes text (each text then EOS, no BOS: `r1kit.train.data.text_stream`),
cut into windows of `PERPLEXITY_WINDOW` tokens (the training sequence length) stepped by `stride` (default:
the window, so each window is a fresh context as in training), each token after the first scored once, and
`exp(mean NLL)` over the scored tokens. With a token budget an evenly spaced subset of those windows is
scored, so a budget samples the whole held-out text rather than reading its first files: the held-out files
differ a lot (two codec tables score ~10, the pydoc topics prose ~350), and a prefix measures whichever
files sort first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from r1kit.api import R1Model
from r1kit.generate import SamplingParams, generate_tokens
from r1kit.model.transformer import Transformer
from r1kit.tokenizer import Tokenizer, split_reasoning

PERPLEXITY_WINDOW = 256  # tokens per forward: the sequence length the bundled model was trained at
PERPLEXITY_TOKENS = 50_000  # default budget of scored tokens (held-out total: ~530K for nano's tokenizer)


class EvalError(ValueError):
    """An evaluation argument is out of range or unknown. The message names it."""


def _need_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EvalError(f"{name} = {value!r}: must be an integer >= 1")


# ---------------------------------------------------------------------------------------------------- arithmetic


def _check_kinds(kinds: Sequence[str]) -> None:
    from r1kit.train.data import ALL_KINDS

    unknown = [k for k in kinds if k not in ALL_KINDS]
    if not kinds or unknown:
        raise EvalError(f"kinds {list(kinds)}: unknown kind(s) {unknown}; kinds: {', '.join(ALL_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise EvalError(f"kinds {list(kinds)}: a kind is listed twice")


def eval_arithmetic(model: R1Model, kinds: list[str], n: int = 200, seed: int = 1234, batch_size: int = 32,
                    max_new_tokens: int = 256, progress: bool = True) -> dict[str, Any]:
    """Greedy accuracy on n held-out problems per kind; also returns a few worked examples."""
    from r1kit.train.data import parse_answer, sample_problem

    _check_kinds(kinds)
    for name, value in (("n", n), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        _need_positive(name, value)
    tok = model._tok()
    rng = random.Random(seed)
    results: dict[str, Any] = {"accuracy": {}, "n": n, "examples": []}
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n * len(kinds), desc="eval arithmetic", unit="problem", dynamic_ncols=True)
    for kind in kinds:
        problems = [sample_problem(rng, kind, split="val") for _ in range(n)]
        correct = 0
        for start in range(0, n, batch_size):
            chunk = problems[start:start + batch_size]
            prompts = [tok.encode_chat([{"role": "user", "content": p.question}]) for p in chunk]
            outs: list[list[int]] = [[] for _ in chunk]
            stop = model.stop_ids()
            for step in generate_tokens(model.model, prompts, params, stop):
                for row, t in enumerate(step):
                    if t is not None and t not in stop:
                        outs[row].append(t)
            for p, ids in zip(chunk, outs, strict=True):
                text = tok.decode(ids, skip_special_tokens=True)
                ok = parse_answer(text) == p.answer
                correct += ok
                if start == 0 and sum(e["kind"] == kind for e in results["examples"]) < 3:
                    reasoning, answer = split_reasoning("<think>" + text)
                    results["examples"].append({"kind": kind, "question": p.question, "reasoning": reasoning,
                                                "answer": answer, "expected": p.answer, "correct": ok})
            if bar is not None:
                bar.update(len(chunk))
        results["accuracy"][kind] = correct / n
    if bar is not None:
        bar.close()
    return results


# ---------------------------------------------------------------------------------------------------- perplexity


def heldout_texts() -> list[str]:
    """The held-out standard-library files (validation side of `r1kit.train.data.split_files`), in path order;
    files that are not UTF-8 are skipped, as training skips them."""
    from r1kit.train.data import read_texts, split_files, stdlib_files

    return read_texts(split_files(stdlib_files())[1])


def perplexity_windows(n: int, window: int, stride: int, max_tokens: int | None = None
                       ) -> list[tuple[int, int, int]]:
    """(start, end, scored) of each forward over n token ids: input ids[start:end - 1], targets
    ids[start + 1:end], of which the last `scored` count.

    Chunk c scores the targets at [1 + c * stride, 1 + (c + 1) * stride) (cut at n), each given the up to
    `window` tokens before the chunk's last target, so every target from 1 to n - 1 is scored once. With
    max_tokens below n - 1: an evenly spaced subset of the chunks, at most max_tokens targets.
    """
    chunks = [(a, min(a + stride, n)) for a in range(1, n, stride)]
    if max_tokens is not None and n - 1 > max_tokens:
        keep = max(1, max_tokens // stride)
        chunks = [chunks[i * len(chunks) // keep] for i in range(keep)]
    return [(max(0, end - 1 - window), end, end - a) for a, end in chunks]


@torch.inference_mode()
def perplexity(model: Transformer, ids: Sequence[int] | torch.Tensor, window: int = PERPLEXITY_WINDOW,
               stride: int | None = None, max_tokens: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """exp(mean next-token NLL) of ids[1:] under `model`, in windows (see `perplexity_windows`).

    Windows of the same length run batch_size at a time. Returns perplexity, nll_per_token, tokens (scored),
    windows, and the definition (window, stride, of_tokens: the targets available before a budget).
    """
    stride = window if stride is None else stride
    _need_positive("window", window)
    _need_positive("stride", stride)
    _need_positive("batch_size", batch_size)
    if max_tokens is not None:
        _need_positive("max_tokens", max_tokens)
    if stride > window:
        raise EvalError(f"stride = {stride}: must be <= window ({window}), or tokens would go unscored")
    if window > model.config.max_position_embeddings:
        raise EvalError(f"window = {window}: longer than the model's context ({model.config.max_position_embeddings})")
    device = model.embed_tokens.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long).flatten().to(device)
    if len(ids) < 2:
        raise EvalError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    spans = perplexity_windows(len(ids), window, stride, max_tokens)
    nll, count = 0.0, 0
    for batch in _same_length_batches(spans, batch_size):
        blocks = torch.stack([ids[start:end] for start, end, _ in batch])  # (B, L + 1)
        logits = model(blocks[:, :-1]).float()  # (B, L, V)
        ce = F.cross_entropy(logits.transpose(1, 2), blocks[:, 1:], reduction="none")  # (B, L)
        for row, (_, _, scored) in enumerate(batch):
            nll += float(ce[row, -scored:].sum())
            count += scored
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count,
            "windows": len(spans), "window": window, "stride": stride, "of_tokens": len(ids) - 1}


def _same_length_batches(spans: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Spans grouped into batches of at most `size`, each batch of one length."""
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    return [group[i:i + size] for group in by_length.values() for i in range(0, len(group), size)]


def heldout_ids(tokenizer: Tokenizer, texts: Sequence[str] | None = None) -> torch.Tensor:
    """texts (default: `heldout_texts()`) as training reads text: each encoded, then EOS, no BOS; (N,) int32."""
    from r1kit.train.data import text_stream

    texts = heldout_texts() if texts is None else texts
    if not texts:
        raise EvalError("perplexity: no texts to evaluate")
    return text_stream(texts, tokenizer, "perplexity").tokens


def eval_perplexity(model: R1Model, texts: Sequence[str] | None = None, max_tokens: int | None = PERPLEXITY_TOKENS,
                    window: int = PERPLEXITY_WINDOW, stride: int | None = None) -> dict[str, Any]:
    """Perplexity of `model` on texts (default: the held-out standard-library files): `heldout_ids`, then
    `perplexity`. See the module docstring for the one definition."""
    if max_tokens is not None:
        _need_positive("max_tokens", max_tokens)
    return perplexity(model.model, heldout_ids(model._tok(), texts), window, stride, max_tokens)
