"""Token-level generation: sampling parameters, the request checks, the sampler, and the KV-cached decode loop.

Token ids in, token ids out: nothing here knows about text. Stop strings, streaming text and chat
templates live in `r1kit.api`, on top of `generate_tokens`.

The request checks are the one validation layer every entry point calls (`generate_tokens`, `LLMEngine`,
`EngineService`, the HTTP and gRPC servers): `SamplingParams.validate` for the sampling fields and stop
strings, `check_prompt` for the token ids, `check_budget` for prompt + new tokens against the context, and
`default_max_new_tokens` for the default completion budgets. The messages are the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from r1kit.model.transformer import ContextLengthError, Transformer


class GenerationError(ValueError):
    """Invalid generation request (sampling parameter out of range, empty prompt...)."""


MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256  # as OpenAI's API: each stop string is searched for on every token
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)
# Default new-token budgets when a request gives no length (Python API, CLI, HTTP and gRPC alike), as far as the
# context allows. A completion gets 256 (OpenAI's /v1/completions default of 16 cuts most answers short); a chat
# gets 1024: room for the <think> phase and the answer.
DEFAULT_MAX_NEW_TOKENS = {"completion": 256, "chat": 1024}


@dataclass
class SamplingParams:
    """How to pick each next token.

    Length: ``max_new_tokens`` counts generated tokens; ``max_length`` counts prompt + generated tokens (as
    in the original seed API and `transformers`). When both are given, ``max_new_tokens`` wins. When neither
    is, 256 new tokens. ``temperature=0`` is greedy decoding. The defaults (0.6 / 0.95) are DeepSeek's
    recommendation for R1 models.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 0.6
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the sequence
    stop: list[str] = field(default_factory=list)  # stop strings (handled by the text layer)
    seed: int | None = None
    speculative: bool | None = None  # MTP speculative decoding in the engine; None: the engine's setting
    logprobs: int | None = None  # None: off; k: each generated token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # None: off; k: the same for every prompt token after the first
    structured: dict | None = None  # a grammar constraint (r1kit.structured): {"type": "json_object"}, json_schema...

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> GenerationError:
            value = repr(getattr(self, name))  # a hostile value may be huge: quote its start only
            value = value if len(value) <= 80 else f"{value[:80]}... ({len(value)} characters)"
            return GenerationError(f"{name} = {value}: {why}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: object) -> bool:  # finite: NaN passes every comparison below, inf breaks the sampler
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise bad("max_new_tokens", "must be an int >= 1")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            raise bad("max_length", "must be an int >= 1")
        if not is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an int >= 0 (0 = off)")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a finite number in (0, 1]")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an int (or None)")
        if self.speculative is not None and not isinstance(self.speculative, bool):
            raise bad("speculative", "must be True, False or None (None: the engine's setting)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None (off) or an int in [0, {MAX_LOGPROBS}]: the alternatives per token")
        if self.structured is not None:
            self._validate_structured(bad)
        if self.speculative and (self.logprobs is not None or self.prompt_logprobs is not None):
            raise bad("speculative", "speculative decoding does not report log-probabilities: turn off logprobs "
                                     "and prompt_logprobs, or speculative")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise bad("stop", f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters "
                              "(each is searched for on every token)")

    def _validate_structured(self, bad: Callable[[str, str], GenerationError]) -> None:
        """The shape of ``structured`` (what r1kit.structured compiles): one of its kinds with its field."""
        spec, kinds = self.structured, {"json_object": None, "json_schema": ("schema", dict), "regex": ("pattern", str),
                                        "choice": ("choices", list), "grammar": ("grammar", str)}
        if not isinstance(spec, dict) or spec.get("type") not in kinds:
            raise bad("structured", f"must be a dict whose 'type' is one of {', '.join(kinds)}")
        field_type = kinds[spec["type"]]
        if field_type is not None and not (isinstance(spec.get(field_type[0]), field_type[1]) and spec[field_type[0]]):
            raise bad("structured", f"type {spec['type']!r} needs a non-empty {field_type[0]!r} "
                                    f"({field_type[1].__name__})")
        if spec["type"] == "choice" and not all(isinstance(c, str) and c for c in spec["choices"]):
            raise bad("structured", "choices must be non-empty strings")
        if self.speculative:
            raise bad("speculative", "speculative decoding does not take a grammar constraint (structured)")

    def new_tokens_for(self, prompt_len: int) -> int:
        """Number of tokens to generate after a prompt of prompt_len tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            n = self.max_length - prompt_len
            if n < 1:
                raise GenerationError(f"max_length = {self.max_length} leaves no room after a prompt of "
                                      f"{prompt_len} tokens; raise max_length or pass max_new_tokens")
            return n
        return DEFAULT_MAX_NEW_TOKENS["completion"]


# ---------------------------------------------------------------------------------------------------- request checks
def check_prompt(prompt_ids: Sequence[int], vocab_size: int, request: str | None = None) -> list[int]:
    """The prompt as a list of token ids, or GenerationError naming the first bad one (empty prompt, a
    non-int, an id outside [0, vocab_size))."""
    where = f"request {request!r}: " if request is not None else ""
    prompt = list(prompt_ids)
    if not prompt:
        raise GenerationError(f"{where}the prompt must have at least one token")
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise GenerationError(f"{where}prompt token {i} = {t!r} is not a token id in [0, {vocab_size})")
    return prompt


def check_budget(prompt_len: int, params: SamplingParams, context_length: int, request: str | None = None) -> int:
    """New tokens a request may generate (``params.new_tokens_for``); ContextLengthError when the prompt plus
    that budget exceed the model's context."""
    where = f"request {request!r}: " if request is not None else ""
    budget = params.new_tokens_for(prompt_len)
    if prompt_len + budget > context_length:
        raise ContextLengthError(f"{where}{prompt_len} prompt tokens + {budget} new tokens = {prompt_len + budget} "
                                 f"exceeds the model's context of {context_length} tokens; shorten the prompt or "
                                 "generate fewer tokens")
    return budget


def default_max_new_tokens(prompt_len: int, context_length: int, kind: str = "completion",
                           limit: int | None = None) -> int:
    """The budget of a request that names no length: DEFAULT_MAX_NEW_TOKENS[kind] (at most ``limit``), as far as
    the context allows. ContextLengthError when the prompt leaves no room at all."""
    room = context_length - prompt_len
    if room < 1:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens: the model's context is {context_length} "
                                 "tokens, with none left to generate; shorten the prompt")
    return min(DEFAULT_MAX_NEW_TOKENS[kind], room, limit or room)


def penalize(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits (N, V) after the repetition penalty on the tokens marked in seen (N, V) bool (greedy decoding
    takes the argmax of these)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution `sample` draws from: logits (N, V) -> fp32 probabilities (N, V) after repetition
    penalty, temperature (> 0), top-k and top-p. Speculative decoding warps draft and target alike with it."""
    if params.temperature == 0:
        raise GenerationError("warp: temperature = 0 is greedy decoding, which has no distribution to warp")
    logits = penalize(logits, params, seen) / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (a log-softmax over its raw logits, before temperature, top-k,
    top-p and penalties, as OpenAI and vLLM report it) and the ``top`` most likely tokens as (id, logprob),
    most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Each row's token's log-probability and its ks[row] most likely tokens: logits (M, V), tokens (M,).
    One log-softmax and one top-k for all rows (the largest k)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = logp.gather(1, index[:, None]).squeeze(1).tolist()  # (M,)
    k = max(ks, default=0)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())  # (M, k)
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [TokenLogprob(t, lp, list(zip(ids[:n], lps[:n], strict=True)))
            for t, lp, ids, lps, n in zip(tokens, chosen, top_ids, top_lp, ks, strict=True)]


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits (B, V); seen (B, V) bool marks tokens already in each sequence."""
    if params.temperature == 0:
        return penalize(logits, params, seen).argmax(-1)
    return torch.multinomial(warp(logits, params, seen), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    stop_ids: Sequence[int] = (), embed_prompt: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts; yields, per step, the new token of each row (None once a row is done).

    A row is done after emitting a stop id (the stop id is yielded) or its token budget. Rows are left-padded
    into one KV cache of exactly the size needed. embed_prompt, when given, maps the padded prompt ids (B, T) to
    their input embeddings (B, T, C) for the prefill (media merged at placeholders: r1kit.multimodal).
    """
    if not prompts:
        raise GenerationError("generate_tokens: no prompts")
    params.validate()
    cfg = model.config
    prompts = [check_prompt(p, cfg.vocab_size, f"prompt {i}" if len(prompts) > 1 else None)
               for i, p in enumerate(prompts)]
    device = model.embed_tokens.weight.device
    lengths = [len(p) for p in prompts]
    budgets = [check_budget(n, params, cfg.max_position_embeddings, f"prompt {i}" if len(prompts) > 1 else None)
               for i, n in enumerate(lengths)]
    longest = max(lengths)
    total = longest + max(budgets)  # cache slots, left padding included (positions skip the padding)
    B = len(prompts)
    ids = torch.zeros(B, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(device)
    pad = torch.tensor([longest - n for n in lengths], device=device) if len(set(lengths)) > 1 else None
    cache = model.new_cache(B, total, pad=pad)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        if pad is not None:  # pad id 0 is not part of the text
            seen[:, 0] = torch.tensor([0 in p for p in prompts], device=device)
    stop = set(stop_ids)
    done = [False] * B
    extra = {"inputs_embeds": embed_prompt(ids)} if embed_prompt is not None else {}
    logits = model(ids, cache, last_only=True, **extra)[:, -1]
    for step in range(max(budgets)):
        token = sample(logits, params, seen, generator)  # (B,)
        out = token.tolist()  # the one host transfer per step
        yield [None if d else t for t, d in zip(out, done, strict=True)]
        done = [d or t in stop or budgets[b] <= step + 1 for b, (t, d) in enumerate(zip(out, done, strict=True))]
        if all(done):
            return
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = model(token[:, None], cache, last_only=True)[:, -1]
