"""EngineConfig: every setting of the inference engine, decided once.

`R1Model`, `LLMEngine`, `EngineService`, the CLI (`r1kit serve` flags) and both servers take one of these;
the defaults below are the only place they are written down.

    EngineConfig()                                       # the defaults
    EngineConfig(max_num_seqs=64, kv_cache_bytes=4 << 30)
    config.kv_blocks(model)                              # the KV pool a server allocates for this model
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from r1kit.generate import GenerationError, SamplingParams
from r1kit.model.config import ModelConfig


class EngineConfigError(ValueError):
    """An engine setting out of range, or a model the engine cannot run; the message names the field."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the paged-KV, continuous-batching engine.

    Attributes:
        block_size: token slots per KV block (the paging and prefix-sharing unit).
        kv_cache_bytes: cap on the KV pool. A server sizes its pool up front for ``max_num_seqs`` full-context
            requests, within this cap; `R1Model` grows its pool to what a call needs, within it. Either way the
            pool holds at least one request of the model's full context.
        num_blocks: an exact pool size in blocks, overriding the sizing above (None: sized as above).
        max_num_seqs: requests decoded together in one step (the running batch).
        max_num_batched_tokens: tokens computed in one step (decodes + prefill chunks).
        chunk_size: prompt tokens of one request per step (None: only the step budget limits a prefill chunk).
        enable_prefix_caching: share the KV of full prompt blocks between requests with the same prefix.
        num_speculative_tokens: MTP drafts verified per decode step of a speculative request (0: speculative
            decoding off; see `r1kit.engine.spec_decode`). A request's ``SamplingParams.speculative`` opts in or
            out; None follows this setting.
    """

    block_size: int = 16
    kv_cache_bytes: int = 2 << 30
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    chunk_size: int | None = None
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise EngineConfigError(f"EngineConfig.{name} = {getattr(self, name)!r}: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need("block_size", is_int(self.block_size) and self.block_size >= 1, "must be an int >= 1")
        need("kv_cache_bytes", is_int(self.kv_cache_bytes) and self.kv_cache_bytes >= 1, "must be an int >= 1")
        need("num_blocks", self.num_blocks is None or is_int(self.num_blocks) and self.num_blocks >= 1,
             "must be an int >= 1 (or None: sized from kv_cache_bytes)")
        need("max_num_seqs", is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "must be an int >= 1")
        need("max_num_batched_tokens", is_int(self.max_num_batched_tokens)
             and self.max_num_batched_tokens >= self.max_num_seqs,
             f"must be an int >= max_num_seqs ({self.max_num_seqs}), so that every running request decodes each step")
        need("chunk_size", self.chunk_size is None or is_int(self.chunk_size) and self.chunk_size >= 1,
             "must be an int >= 1 (or None: the step budget)")
        need("enable_prefix_caching", isinstance(self.enable_prefix_caching, bool), "must be a bool")
        need("num_speculative_tokens", is_int(self.num_speculative_tokens) and self.num_speculative_tokens >= 0,
             "must be an int >= 0 (0: no speculative decoding)")

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with some fields changed (None values are ignored, so CLI flags left unset keep the defaults)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise EngineConfigError(f"EngineConfig has no field {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line of the effective settings (servers print it at start)."""
        return "engine: " + ", ".join(f"{k}={v}" for k, v in self.as_dict().items())

    def drafts_for(self, params: SamplingParams, request: str | None = None) -> int:
        """MTP drafts per decode step of a request with these params: num_speculative_tokens, or 0 when the
        request opts out (``speculative=False``), asks for log-probabilities or a grammar. GenerationError when it
        opts in on an engine without drafts."""
        if params.speculative and not self.num_speculative_tokens:
            where = f"request {request!r}: " if request is not None else ""
            raise GenerationError(f"{where}speculative=True, but this engine runs without speculative decoding "
                                  "(EngineConfig.num_speculative_tokens = 0; `r1kit serve --speculative`)")
        per_token = params.logprobs is not None or params.prompt_logprobs is not None or params.structured is not None
        return 0 if params.speculative is False or per_token else self.num_speculative_tokens

    # ------------------------------------------------------------------------------------------ sizing
    def kv_blocks(self, model: Any, need_tokens: int | None = None) -> int:
        """KV blocks to allocate for ``model`` (a Transformer).

        ``need_tokens`` None: a server's pool, room for max_num_seqs full-context requests. Otherwise one
        call's total tokens, grown to a full context. Both are capped at kv_cache_bytes but never below one
        full-context request (a smaller pool could not run a request the model accepts).
        """
        if self.num_blocks is not None:
            return self.num_blocks
        per_request = math.ceil(model.config.max_position_embeddings / self.block_size)
        want = self.max_num_seqs * per_request if need_tokens is None else max(
            math.ceil(need_tokens / self.block_size), per_request)
        cap = self.kv_cache_bytes // bytes_per_block(model, self.block_size, self.num_speculative_tokens)
        return max(per_request, min(want, cap))


def bytes_per_block(model: Any, block_size: int, num_drafts: int = 0) -> int:
    """KV pool bytes one block takes over all layers of ``model`` (a Transformer), plus the MTP pools of
    ``num_drafts`` draft positions (speculative decoding: one MTP layer's pool per draft position)."""
    pools = model.new_paged_cache(block_size, device="meta")
    if num_drafts and model.mtp:
        attn = model.mtp[-1].block.self_attn
        pools += [attn.new_paged_cache(block_size, model.embed_tokens.weight.dtype, "meta")] * num_drafts
    return sum(t.numel() * t.element_size() for layer in pools for t in layer)


def check_speculative_supported(config: ModelConfig) -> None:
    """GenerationError when the engine cannot decode this model speculatively (the one place that says which):
    the drafts come from its MTP layers, and rejected drafts are rolled back out of every KV cache, which sparse
    attention's caches (rolling windows, block sums) do not allow."""
    if config.sparse_attention is not None:
        raise GenerationError(f"speculative decoding: {config.sparse_attention!r} sparse attention caches cannot be "
                              "rolled back past rejected drafts; run this model without speculative decoding")
    if config.num_mtp_layers == 0:
        raise GenerationError("speculative decoding drafts with the model's MTP layers, and this model has none "
                              "(config num_mtp_layers / num_nextn_predict_layers = 0); run it without speculation")


# ---------------------------------------------------------------------------------------------------- CLI flags
_FLAGS = [  # (flag, field, type, help); defaults are EngineConfig's
    ("--block-size", "block_size", int, "KV block size in tokens"),
    ("--kv-cache-gb", "kv_cache_bytes", float, "KV cache size cap in GiB (at least one full context)"),
    ("--num-blocks", "num_blocks", int, "exact KV pool size in blocks (overrides --kv-cache-gb)"),
    ("--max-num-seqs", "max_num_seqs", int, "requests decoded together (the running batch)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "tokens computed per engine step"),
    ("--chunk-size", "chunk_size", int, "prompt tokens of one request per step (default: the step budget)"),
    ("--speculative-tokens", "num_speculative_tokens", int, "MTP drafts verified per decode step (0: off)"),
]


def add_engine_args(parser: Any) -> None:
    """Add the engine's flags to an argparse parser (``r1kit serve``, the gRPC server); read them back with
    `engine_config_from_args`. Unset flags keep EngineConfig's defaults, which the help text shows."""
    defaults = EngineConfig()
    group = parser.add_argument_group("engine (EngineConfig)")
    for flag, name, type_, help_ in _FLAGS:
        default = getattr(defaults, name)
        shown = default / 2**30 if name == "kv_cache_bytes" else default
        group.add_argument(flag, type=type_, default=None, help=f"{help_} (default: {shown})")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not share KV between equal prefixes")
    group.add_argument("--speculative", action="store_true",
                       help="MTP speculative decoding, 1 draft per step (--speculative-tokens N for N)")


def engine_config_from_args(args: Any, base: EngineConfig | None = None) -> EngineConfig:
    """The EngineConfig the flags of `add_engine_args` describe (on top of ``base``)."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for flag, name, _, _ in _FLAGS}
    if values["kv_cache_bytes"] is not None:
        gib = values["kv_cache_bytes"]
        if not math.isfinite(gib) or gib <= 0:
            raise EngineConfigError(f"--kv-cache-gb = {gib}: must be a number > 0")
        values["kv_cache_bytes"] = int(gib * 2**30)
    if getattr(args, "no_prefix_caching", False):
        values["enable_prefix_caching"] = False
    if getattr(args, "speculative", False) and values["num_speculative_tokens"] is None:
        values["num_speculative_tokens"] = 1
    return (base or EngineConfig()).replace(**values)


def engine_flags(args: Any) -> list[str]:
    """The `add_engine_args` flags that were set, as a command line (to start more servers with them)."""
    out: list[str] = []
    for flag, _, _, _ in _FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out += [flag, str(value)]
    out += ["--no-prefix-caching"] if getattr(args, "no_prefix_caching", False) else []
    return out + (["--speculative"] if getattr(args, "speculative", False) else [])


__all__ = ["EngineConfig", "EngineConfigError", "bytes_per_block",
           "check_speculative_supported", "add_engine_args", "engine_config_from_args", "engine_flags"]
