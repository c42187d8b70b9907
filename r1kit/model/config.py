"""ModelConfig: one dataclass for every model r1kit runs, and the presets as data.

One config covers the dense families (Llama, Qwen2: SwiGLU MLP + GQA) and the DeepSeek family
(MLA attention + DeepSeekMoE + multi-token prediction). A family's differences live here and in the
checkpoint name map (`r1kit/checkpoint.py`), never in `if family == ...` branches inside the model.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")


class ConfigError(ValueError):
    """A config field is missing, unknown, of the wrong type or out of range. The message names the field.

    ``field`` is that field's name and ``problem`` what is wrong with it ("= 'abc': expected a number, not str"),
    so that a reader of a file can name the field as the file spells it (see r1kit.checkpoint.config_from_hf).
    """

    def __init__(self, message: str, field: str | None = None, problem: str = ""):
        super().__init__(message)
        self.field, self.problem = field, problem


@dataclass
class ModelConfig:
    """Hyper-parameters of one model. Field names follow the Hugging Face config.json names where one exists."""

    arch: str = "deepseek_v3"  # checkpoint family: decides the tensor name map, see ARCHITECTURES
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    intermediate_size: int = 1408  # width of the dense SwiGLU MLP
    num_heads: int = 8

    # attention: "gqa" (Llama, Qwen2) or "mla" (DeepSeek multi-head latent attention)
    attention: str = "mla"
    num_kv_heads: int = 8  # GQA only
    head_dim: int | None = None  # GQA only; None -> hidden_size // num_heads
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    q_lora_rank: int | None = None  # MLA: None -> full-rank q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64

    # DeepSeekMoE; n_routed_experts == 0 means every layer is dense
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1  # every n-th layer after those is MoE
    scoring_func: str = "sigmoid"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "noaux_tc"  # "greedy", "group_limited_greedy" (V2), "noaux_tc" (V3: bias-corrected)
    n_group: int = 1  # group-limited routing: experts split in n_group groups ...
    topk_group: int = 1  # ... and each token picks experts from its topk_group best groups only
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # how a token's k expert outputs combine: "weighted_sum" (DeepSeekMoE) or "cross_expert_attention" (CEAP:
    # the token attends over its experts' outputs; r1kit.model.moe.CrossExpertAttention), with these heads
    moe_combiner: str = "weighted_sum"
    moe_combiner_heads: int = 4  # CEAP only; must divide hidden_size (each head mixes hidden_size / heads channels)
    moe_combiner_head_dim: int = 16  # CEAP only; query/key width per head

    # positions
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn" | "llama3" | "linear", ...} as in config.json
    rope_interleave: bool = False  # DeepSeek rotates adjacent pairs (x0,x1),(x2,x3)..; Llama/Qwen rotate halves

    # sparse attention (r1kit/model/sparse_attention.py documents the rules); None: dense everywhere
    sparse_attention: str | None = None  # None | "local_global" | "topk"
    sparse_layers: list[int] | None = None  # indices of the sparse layers; None: every layer
    sparse_block_size: int = 64  # B: block-local attention, and the top-k selection unit
    sparse_global_tokens: int = 4  # local_global: learned global tokens per layer
    sparse_window_base: int = 64  # local_global: keys within this distance are always visible
    sparse_window_max: int = 256  # local_global: the widest window an important position gets
    sparse_importance: str = "key"  # local_global: "key" | "query" (whose score widens the window) | "none"
    sparse_topk_blocks: int = 4  # topk: earlier key blocks each query selects (plus its own block)

    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_mtp_layers: int = 0  # DeepSeek-V3 multi-token prediction depth (num_nextn_predict_layers)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # config.json fields kept only for the round trip

    def __post_init__(self) -> None:
        self.validate()
        for f in dataclasses.fields(self):  # an integer given for a float field (rope_theta: 10000) becomes a float
            if _FIELD_TYPES[f.name] is float:
                setattr(self, f.name, float(getattr(self, f.name)))

    # ---------------------------------------------------------------- derived sizes
    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        """Number of channels per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.gqa_head_dim

    def is_sparse_layer(self, i: int) -> bool:
        return self.sparse_attention is not None and (self.sparse_layers is None or i in self.sparse_layers)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field of the wrong type, or else the first one out of range."""
        self._check_types()
        self._check_shapes()
        self._check_moe()
        self._check_sparse()
        self._check_positions()

    def _need(self, ok: bool, name: str, why: str) -> None:
        if not ok:
            problem = f"= {getattr(self, name)!r}: {why}"
            raise ConfigError(f"ModelConfig.{name} {problem}", name, problem)

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), _FIELD_TYPES[f.name]
            self._need(_has_type(value, expected), f.name,
                       f"expected {_describe(expected)}, not {type(value).__name__}")

    def _check_shapes(self) -> None:
        need = self._need
        need(self.arch in ARCHITECTURES, "arch", f"must be one of {ARCHITECTURES}")
        need(self.attention in ("gqa", "mla"), "attention", "must be 'gqa' or 'mla'")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            need(getattr(self, name) > 0, name, "must be a positive int")
        need(self.intermediate_size > 0 or self.n_routed_experts > 0, "intermediate_size", "must be > 0")
        if self.attention == "gqa":
            need(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads = {self.num_heads}")
            need(self.head_dim is not None or self.hidden_size % self.num_heads == 0, "head_dim",
                 "is None but hidden_size is not divisible by num_heads")
            need(self.gqa_head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        else:
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0")
            need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or > 0")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "must be a positive even number")
            need(self.qk_nope_head_dim >= 0 and self.v_head_dim > 0, "v_head_dim", "must be > 0")

    def _check_moe(self) -> None:
        need = self._need
        if self.n_routed_experts:
            need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be in 1..n_routed_experts ({self.n_routed_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0 for a MoE model")
            need(self.scoring_func in ("softmax", "sigmoid"), "scoring_func", "must be 'softmax' or 'sigmoid'")
            need(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"), "topk_method",
                 "must be 'greedy', 'group_limited_greedy' or 'noaux_tc'")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in 1..n_group ({self.n_group})")
            need(self.topk_group * self.n_routed_experts // self.n_group >= self.num_experts_per_tok, "topk_group",
                 "selects fewer experts than num_experts_per_tok")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2, "n_group", "noaux_tc needs >= 2 experts per group")
            need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.moe_combiner in ("weighted_sum", "cross_expert_attention"), "moe_combiner",
             "must be 'weighted_sum' or 'cross_expert_attention'")
        if self.moe_combiner == "cross_expert_attention":
            need(self.moe_combiner_heads > 0 and self.hidden_size % self.moe_combiner_heads == 0,
                 "moe_combiner_heads", f"must be > 0 and divide hidden_size ({self.hidden_size})")
            need(self.moe_combiner_head_dim > 0, "moe_combiner_head_dim", "must be > 0")

    def _check_sparse(self) -> None:
        need = self._need
        need(self.sparse_attention in (None, "local_global", "topk"), "sparse_attention",
             "must be null, 'local_global' or 'topk'")
        if self.sparse_attention is None:
            return
        need(self.sparse_layers is None or all(0 <= i < self.num_layers for i in self.sparse_layers), "sparse_layers",
             f"must be null or a list of layer indices in 0..{self.num_layers - 1}")
        for name in ("sparse_block_size", "sparse_topk_blocks"):
            need(getattr(self, name) >= 1, name, "must be an int >= 1")
        need(self.sparse_global_tokens >= 0, "sparse_global_tokens", "must be >= 0")
        need(self.sparse_window_base >= 0, "sparse_window_base", "must be >= 0")
        need(self.sparse_window_max >= self.sparse_window_base, "sparse_window_max",
             f"must be >= sparse_window_base ({self.sparse_window_base})")
        need(self.sparse_importance in ("key", "query", "none"), "sparse_importance",
             "must be 'key', 'query' or 'none'")

    def _check_positions(self) -> None:
        need = self._need
        need(self.num_mtp_layers >= 0, "num_mtp_layers", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.rope_scaling is not None:
            kind = rope_type(self.rope_scaling)
            need(kind in ("default", "yarn", "llama3", "linear"), "rope_scaling",
                 "type must be 'yarn', 'llama3', 'linear' or 'default'")
            if kind != "default":
                factor = self.rope_scaling.get("factor", 0)
                need(_has_type(factor, float) and factor >= 1.0, "rope_scaling", "factor must be a number >= 1")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict of ModelConfig fields; an unknown key is an error that names it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **overrides})

    # ---------------------------------------------------------------- parameter counts
    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """Parameter count; with ``active=True`` only those one token touches (its top-k routed experts).

        The main model alone by default (DeepSeek-V3/R1: 671B); ``include_mtp=True`` adds what the MTP layers hold
        beyond the embedding and head they share with it (the parameters of the model r1kit builds).
        """
        h = self.hidden_size
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_layers))
        total = emb + head + h + n_moe * self._block_params(True, active)
        total += (self.num_layers - n_moe) * self._block_params(False, active)
        total += sum(self.is_sparse_layer(i) for i in range(self.num_layers)) * self._sparse_params()
        if include_mtp:
            total += self.num_mtp_layers * self._mtp_layer_params(active)
        return total

    def num_mtp_params(self) -> int:
        """Parameters of the multi-token-prediction module as DeepSeek counts them ("671B main model + 14B MTP"):
        each depth as its checkpoint stores it, with its own copy of the embedding and the output head (the model
        shares one, so ``num_params(include_mtp=True)`` counts them once)."""
        return self.num_mtp_layers * (self._mtp_layer_params(False) + 2 * self.vocab_size * self.hidden_size)

    def _mtp_layer_params(self, active: bool) -> int:
        """One MTP depth without the shared embedding and head: enorm, hnorm, eh_proj, its block, the head's norm."""
        h = self.hidden_size
        return 2 * h + 2 * h * h + self._block_params(self.n_routed_experts > 0, active) + h

    def _block_params(self, moe: bool, active: bool) -> int:
        """One decoder block: attention, the dense MLP or the MoE, two norms."""
        h = self.hidden_size
        return self._attn_params() + (self._moe_params(active) if moe else 3 * h * self.intermediate_size) + 2 * h

    def _attn_params(self) -> int:
        h, nh = self.hidden_size, self.num_heads
        if self.attention == "gqa":
            d, kv = self.gqa_head_dim, self.num_kv_heads
            bias = (nh + 2 * kv) * d if self.attention_bias else 0
            return h * nh * d + 2 * h * kv * d + nh * d * h + bias
        q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
             if self.q_lora_rank else h * nh * self.qk_head_dim)
        kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim))
        return q + kv + nh * self.v_head_dim * h

    def _sparse_params(self) -> int:
        """Extra parameters of one local_global layer: the importance scorer and the global tokens."""
        if self.sparse_attention != "local_global":
            return 0
        kv = self.num_kv_heads if self.attention == "gqa" else self.num_heads
        scorer = 0 if self.sparse_importance == "none" else (self.hidden_size + 1) * kv
        return scorer + self.sparse_global_tokens * self.hidden_size

    def _moe_params(self, active: bool) -> int:
        h, i = self.hidden_size, self.moe_intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        combiner = (2 * self.moe_combiner_heads * self.moe_combiner_head_dim * h
                    if self.moe_combiner == "cross_expert_attention" else 0)  # CEAP's query and key projections
        return self.n_routed_experts * h + (routed + self.n_shared_experts) * 3 * h * i + combiner


_FIELD_TYPES = typing.get_type_hints(ModelConfig)
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
               dict: "an object", list: "a list"}


def _has_type(value: Any, expected: Any) -> bool:
    """Whether `value` fits a field annotation: int | None, list[int], dict[str, Any], ... (a bool is not a number,
    an int is a float)."""
    args = typing.get_args(expected)
    if isinstance(expected, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if expected is Any:
        return True
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    origin = typing.get_origin(expected) or expected
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, origin)


def _describe(expected: Any) -> str:
    """A field annotation in words: int | None -> "an integer or null", list[int] -> "a list of integers"."""
    if isinstance(expected, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected))
    origin = typing.get_origin(expected) or expected
    if origin is list:
        return f"a list of {_describe(typing.get_args(expected)[0]).removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_WORDS.get(origin, getattr(origin, "__name__", str(origin)))


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


# ---------------------------------------------------------------------------------------------------- presets
# Each preset: the source it was read from, its published total parameter count (None where there is no
# published figure), and the fields. Tests check num_params() against the published figure.

_DEEPSEEK_V3 = dict(
    arch="deepseek_v3", vocab_size=129280, hidden_size=7168, num_layers=61, intermediate_size=18432,
    num_heads=128, attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
    moe_intermediate_size=2048, first_k_dense_replace=3, scoring_func="sigmoid", topk_method="noaux_tc",
    n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=163840,
    rope_theta=10000.0, rope_interleave=True, num_mtp_layers=1, bos_token_id=0, eos_token_id=1,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, theta: float) -> dict:
    return dict(arch="qwen2", attention="gqa", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=kv, attention_bias=True, rope_theta=theta,
                max_position_embeddings=131072, bos_token_id=151646, eos_token_id=151643)


def _llama(hidden: int, inter: int, layers: int, heads: int) -> dict:
    return dict(arch="llama", attention="gqa", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))


def _r1kit_moe(hidden: int, layers: int, heads: int, experts: int, moe_inter: int, top_k: int,
               q_rank: int | None, kv_rank: int, groups: int) -> dict:
    """The r1kit family: DeepSeek-V3-shaped (MLA, shared + routed experts, sigmoid group routing, MTP)."""
    return dict(arch="deepseek_v3", vocab_size=129280, hidden_size=hidden, num_layers=layers,
                intermediate_size=moe_inter * (top_k + 1), num_heads=heads, attention="mla", q_lora_rank=q_rank,
                kv_lora_rank=kv_rank, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=top_k,
                moe_intermediate_size=moe_inter, first_k_dense_replace=1, scoring_func="sigmoid",
                topk_method="noaux_tc", n_group=groups, topk_group=max(1, groups // 2), norm_topk_prob=True,
                routed_scaling_factor=2.5, max_position_embeddings=32768, rope_interleave=True, num_mtp_layers=1,
                bos_token_id=0, eos_token_id=1)


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(source="huggingface.co/deepseek-ai/DeepSeek-V3 config.json; paper: 671B total, 37B active",
                        published_total=671e9, published_active=37e9, config=_DEEPSEEK_V3),
    "deepseek-r1": dict(source="huggingface.co/deepseek-ai/DeepSeek-R1 config.json (same architecture as V3)",
                        published_total=671e9, published_active=37e9, config=_DEEPSEEK_V3),
    "r1-distill-qwen-1.5b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json; 1.78B on the hub",
                                 published_total=1.78e9,
                                 config=_qwen2(1536, 8960, 28, 12, 2, 151936, 10000.0)),
    "r1-distill-qwen-7b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json; 7.62B on the hub",
                               published_total=7.62e9, config=_qwen2(3584, 18944, 28, 28, 4, 152064, 10000.0)),
    "r1-distill-qwen-14b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B config.json; 14.8B on the hub",
                                published_total=14.8e9, config=_qwen2(5120, 13824, 48, 40, 8, 152064, 1e6)),
    "r1-distill-qwen-32b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B config.json; 32.8B on the hub",
                                published_total=32.8e9, config=_qwen2(5120, 27648, 64, 40, 8, 152064, 1e6)),
    "r1-distill-llama-8b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Llama-8B config.json; 8.03B on the hub",
                                published_total=8.03e9, config=_llama(4096, 14336, 32, 32)),
    "r1-distill-llama-70b": dict(source="deepseek-ai/DeepSeek-R1-Distill-Llama-70B config.json; 70.6B on the hub",
                                 published_total=70.6e9, config=_llama(8192, 28672, 80, 64)),
    # The r1kit family: sized by r1kit so that the total matches the name; 128 routed experts at 175B.
    "r1-1b": dict(source="r1kit design (nominal 1B total)", published_total=1e9,
                  config=_r1kit_moe(1024, 16, 8, 32, 448, 4, None, 256, 4)),
    "r1-7b": dict(source="r1kit design (nominal 7B total)", published_total=7e9,
                  config=_r1kit_moe(2048, 24, 16, 64, 672, 6, 768, 512, 8)),
    "r1-13b": dict(source="r1kit design (nominal 13B total)", published_total=13e9,
                   config=_r1kit_moe(2560, 32, 20, 64, 760, 6, 1024, 512, 8)),
    "r1-70b": dict(source="r1kit design (nominal 70B total)", published_total=70e9,
                   config=_r1kit_moe(4096, 40, 32, 128, 1088, 8, 1536, 512, 8)),
    "r1-175b": dict(source="r1kit design (nominal 175B total; MoE with 128 routed experts)", published_total=175e9,
                    config=_r1kit_moe(5120, 48, 40, 128, 1832, 8, 1536, 512, 8)),
    # The bundled model r1kit/nano (trained by configs/nano.yaml): DeepSeek-V3 in miniature.
    "nano": dict(source="r1kit: the bundled r1kit/nano, trained by configs/nano.yaml", published_total=None,
                 config=dict(arch="deepseek_v3", vocab_size=4096, hidden_size=192, num_layers=6,
                             intermediate_size=512, num_heads=4, attention="mla", q_lora_rank=128,
                             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                             moe_intermediate_size=192, first_k_dense_replace=1, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, rope_interleave=True, num_mtp_layers=1,
                             max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)),
    # The bundled student r1kit/nano-distill-qwen2 (configs/distill-nano.yaml): a dense Qwen2 with nano's tokenizer.
    "nano-distill-qwen2": dict(source="r1kit: the bundled r1kit/nano-distill-qwen2, distilled from r1kit/nano by "
                               "configs/distill-nano.yaml", published_total=None,
                               config=dict(arch="qwen2", attention="gqa", vocab_size=4096, hidden_size=192,
                                           num_layers=4, intermediate_size=512, num_heads=6, num_kv_heads=2,
                                           attention_bias=True, tie_word_embeddings=True, rope_theta=10000.0,
                                           max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)),
    # Tiny models for tests and the random-weights demo.
    "tiny-moe": dict(source="r1kit tests", published_total=None,
                     config=dict(arch="deepseek_v3", vocab_size=512, hidden_size=64, num_layers=3,
                                 intermediate_size=128, num_heads=4, attention="mla", q_lora_rank=32,
                                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                 moe_intermediate_size=32, first_k_dense_replace=1, n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, rope_interleave=True, num_mtp_layers=1,
                                 max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)),
    "tiny-dense": dict(source="r1kit tests", published_total=None,
                       config=dict(arch="llama", attention="gqa", vocab_size=512, hidden_size=64, num_layers=2,
                                   intermediate_size=128, num_heads=4, num_kv_heads=2,
                                   max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with optional field overrides: ``preset("tiny-moe", num_layers=2)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name]["config"], **overrides})


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{max(0, 2 - int(math.log10(abs(n) / scale)))}f}{unit}"
    return str(int(n))
