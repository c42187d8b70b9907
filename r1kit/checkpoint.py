"""Hugging Face-format checkpoints: config.json <-> ModelConfig, safetensors in and out, FP8 dequantisation.

Loading builds the model on the meta device, then reads each tensor through a memory-mapped
`safe_open`, converts it to the target dtype/device and assigns it, so a load needs about one copy of the
weights. DeepSeek's released FP8 weights (float8_e4m3fn with a `weight_scale_inv` per 128x128 block) are
dequantised on the way in. Saving writes the same layout back (sharded with an index past the shard
size), every file through a temporary name and an atomic rename (r1kit.fileio). The FP8 block format itself
is r1kit.fp8's.

Pickle checkpoints (.bin/.pt) are refused unless `allow_pickle=True`, and even then are read with
`torch.load(weights_only=True)`, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1kit.fileio import CheckpointError, atomic_write, read_config_json
from r1kit.fp8 import BLOCK, FP8_DTYPES, dequantize_blocks, quantize_blocks
from r1kit.model.attention import RotaryEmbedding
from r1kit.model.config import ConfigError, ModelConfig, rope_type
from r1kit.model.transformer import FP32_TENSORS, Transformer
from r1kit.quant import checkpoint as quant_checkpoint
from r1kit.quant import quantize_model
from r1kit.quant.compressed import swap_structure

log = logging.getLogger("r1kit")

HF_ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
# Present in some checkpoints, derived or shared in r1kit.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_LAYER = re.compile(r"model\.layers\.(\d+)\.([^.]+)")
_MTP_ONLY = {"eh_proj", "enorm", "hnorm", "shared_head", "embed_tokens"}  # what makes layer N an MTP layer


# ---------------------------------------------------------------------------------------------------- config

# ModelConfig fields whose config.json name differs (errors name the config.json field)
_HF_FIELD = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "num_mtp_layers": "num_nextn_predict_layers"}


def _hf_arch(hf: dict[str, Any], source: str) -> str:
    """The r1kit architecture of a config.json; CheckpointError for one r1kit does not load."""
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in HF_ARCHITECTURES), None)
    if arch is None:
        arch = hf.get("model_type") if hf.get("model_type") in _ARCH_TO_HF else None  # model_type == arch name
    if arch is None:
        raise CheckpointError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                              f"r1kit loads {sorted(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias = true is not supported")
    if arch == "llama" and hf.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias = true is not supported for llama")
    return arch


def _rope_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_theta and rope_scaling, from rope_parameters (newer transformers) or rope_scaling + rope_theta."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: {key} = {rope!r}: expected an object or null", key)
    rope = dict(rope)
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    rope.pop("partial_rotary_factor", None)
    return {"rope_theta": theta, "rope_scaling": rope if rope_type(rope) != "default" else None}


def _or(hf: dict[str, Any], key: str, default: Any) -> Any:
    """hf[key], or `default` when it is absent or null."""
    value = hf.get(key)
    return default if value is None else value


def _attention_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if arch in ("qwen2", "llama"):
        return dict(attention="gqa", num_kv_heads=_or(hf, "num_key_value_heads", hf["num_attention_heads"]),
                    head_dim=hf.get("head_dim"), attention_bias=arch == "qwen2", rope_interleave=False)
    v3 = arch == "deepseek_v3"
    return dict(
        attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        n_routed_experts=_or(hf, "n_routed_experts", 0), n_shared_experts=_or(hf, "n_shared_experts", 0),
        num_experts_per_tok=_or(hf, "num_experts_per_tok", 0),
        moe_intermediate_size=_or(hf, "moe_intermediate_size", 0),
        first_k_dense_replace=_or(hf, "first_k_dense_replace", 0), moe_layer_freq=_or(hf, "moe_layer_freq", 1),
        scoring_func=hf.get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=hf.get("topk_method", "noaux_tc" if v3 else "greedy"), n_group=_or(hf, "n_group", 1),
        topk_group=_or(hf, "topk_group", 1), norm_topk_prob=hf.get("norm_topk_prob", v3),
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0), rope_interleave=hf.get("rope_interleave", True),
        num_mtp_layers=_or(hf, "num_nextn_predict_layers", 0),
        **{key: hf[key] for key in _COMBINER_KEYS if key in hf},  # r1kit's CEAP; absent: the weighted sum
    )


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig.

    ConfigError naming `source` and the config.json field for a missing field, a value of the wrong type (with
    the type expected) or out of range; CheckpointError for an architecture or feature r1kit does not load.
    """
    arch = _hf_arch(hf, source)
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    if arch.startswith("deepseek"):
        required += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}", missing[0])
    fields: dict[str, Any] = dict(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        intermediate_size=hf.get("intermediate_size", 0), num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=_or(hf, "tie_word_embeddings", False), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), initializer_range=hf.get("initializer_range", 0.02),
        **_rope_fields(hf, source), **_attention_fields(hf, arch),
        **{key: hf[key] for key in _SPARSE_KEYS if key in hf},  # r1kit's sparse attention; absent: dense
    )
    try:
        return ModelConfig(**fields, extra={"hf_config": hf})
    except ConfigError as e:
        if e.field is None:
            raise ConfigError(f"{source}: {e}") from None
        name = _HF_FIELD.get(e.field, e.field)
        raise ConfigError(f"{source}: {name} {e.problem}", name, e.problem) from None


_COMBINER_KEYS = ("moe_combiner", "moe_combiner_heads", "moe_combiner_head_dim")  # ModelConfig = config.json names
_SPARSE_KEYS = ("sparse_attention", "sparse_layers", "sparse_block_size", "sparse_global_tokens", "sparse_window_base",
                "sparse_window_max", "sparse_importance", "sparse_topk_blocks")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> config.json dict (starting from the original config.json when there was one)."""
    hf = dict(cfg.extra.get("hf_config") or {})
    hf.update(architectures=[_ARCH_TO_HF[cfg.arch]], model_type=cfg.arch, vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
              bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, hidden_act="silu",
              initializer_range=cfg.initializer_range, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
    hf.pop("rope_parameters", None)
    hf.pop("quantization_config", None)  # save_model adds it back when it writes FP8 weights
    if cfg.attention == "gqa":
        hf.update(num_key_value_heads=cfg.num_kv_heads)
        if cfg.head_dim is not None:
            hf["head_dim"] = cfg.head_dim
    else:
        hf.update(num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                  qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                  v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts or None,
                  n_shared_experts=cfg.n_shared_experts or None, num_experts_per_tok=cfg.num_experts_per_tok or None,
                  moe_intermediate_size=cfg.moe_intermediate_size, first_k_dense_replace=cfg.first_k_dense_replace,
                  moe_layer_freq=cfg.moe_layer_freq, scoring_func=cfg.scoring_func, topk_method=cfg.topk_method,
                  n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                  routed_scaling_factor=cfg.routed_scaling_factor, rope_interleave=cfg.rope_interleave,
                  num_nextn_predict_layers=cfg.num_mtp_layers)
    for key in _COMBINER_KEYS:  # written for CEAP only: a weighted-sum MoE's config.json stays DeepSeek's
        hf.pop(key, None)
        if cfg.moe_combiner != "weighted_sum":
            hf[key] = getattr(cfg, key)
    for key in _SPARSE_KEYS:  # written for sparse models only: a dense model's config.json stays the original's
        hf.pop(key, None)
        if cfg.sparse_attention is not None:
            hf[key] = getattr(cfg, key)
    return hf


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a checkpoint folder, from its config.json (errors name the file and the field)."""
    return config_from_hf(read_config_json(path), str(Path(path) / "config.json"))


# ---------------------------------------------------------------------------------------------------- names


def _hf_names(name: str, cfg: ModelConfig) -> str | list[str] | None:
    """r1kit parameter name -> its checkpoint name(s). Stacked experts map to a list (one per expert).

    A quantized module's scales and zeros (``X.weight_scale``, ``experts.gate_up_proj_zero``) are named after its
    weight's checkpoint name(s) plus the same suffix (see r1kit.quant.checkpoint).
    """
    m = re.match(r"(.+)(_scale|_zero)$", name)
    if m:
        hf = _hf_names(m.group(1), cfg)
        return hf + m.group(2) if isinstance(hf, str) else None if hf is None else [h + m.group(2) for h in hf]
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else name
    m = re.match(r"mtp\.(\d+)\.(.+)$", name)
    if m:  # DeepSeek stores MTP depth d as decoder layer num_layers + d
        rest = m.group(2).removeprefix("block.").replace("shared_head_norm", "shared_head.norm")
        name = f"layers.{cfg.num_layers + int(m.group(1))}.{rest}"
    m = re.match(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)$", name)
    if m:
        prefix = f"model.{m.group(1)}"
        if m.group(2) == "down_proj":
            return [f"{prefix}.{e}.down_proj.weight" for e in range(cfg.n_routed_experts)]
        return [f"{prefix}.{e}.{p}.weight" for e in range(cfg.n_routed_experts) for p in ("gate_proj", "up_proj")]
    return f"model.{name}"


class _Reader:
    """Tensor name -> file, over one safetensors file, a sharded index, or (opt-in) a pickle file."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path, self.files, self.where = path, {}, {}
        self.used: set[str] = set()  # names that `load` returned (or read as an FP8 weight's scale)
        index = path / "model.safetensors.index.json"
        single = sorted(path.glob("*.safetensors"))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name, file in weight_map.items():
                self.where[name] = path / file
        elif single:
            for file in single:
                for name in self._open(file).keys():
                    self.where[name] = file
        else:
            pickles = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
            if not pickles:
                raise CheckpointError(f"{path}: no *.safetensors weights found")
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: only pickle weights ({', '.join(p.name for p in pickles)}); r1kit refuses pickle "
                    "files, which can run code when loaded. Convert them to safetensors, or pass "
                    "allow_pickle=True to read them with torch.load(weights_only=True)")
            for file in pickles:
                try:
                    sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any failure is the file's fault
                    raise CheckpointError(f"{file}: cannot be read as a weights-only pickle ({e})") from None
                for name in sd:
                    self.where[name] = file
                self.files[file] = sd

    def _open(self, file: Path) -> Any:
        if file not in self.files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            try:
                self.files[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        return self.files[file]

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        file = self.where.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found in the checkpoint")
        f = self._open(file)
        try:
            return f[name] if isinstance(f, dict) else f.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{file}: cannot read tensor {name!r} (truncated file?): {e}") from None

    def load(self, name: str, shape: torch.Size, kept: torch.dtype | None, block: tuple[int, int]) -> torch.Tensor:
        """Tensor `name`, checked against the `shape` the config implies. `kept`: the dtype of a tensor in r1kit's
        quantized format, returned as stored once checked; otherwise DeepSeek's FP8 weights come back
        dequantized (fp32) with their weight_scale_inv per `block`."""
        t = self.get(name)
        if kept is None and t.dtype in FP8_DTYPES:
            t = self._dequantize(name, t, block)
        if tuple(t.shape) != tuple(shape):
            implied = "the config implies" if kept is None else "the config and its quantization_config imply"
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(t.shape)}, {implied} {tuple(shape)}")
        if kept is not None:
            quant_checkpoint.check_tensor(name, t, kept, str(self.path))
        self.used.add(name)
        return t

    def _dequantize(self, name: str, t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        scale_name = name.removesuffix("weight") + "weight_scale_inv"
        if scale_name not in self.where:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
        try:
            t = dequantize_blocks(t, self.get(scale_name), block)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: FP8 tensor {name!r}: {e}") from None
        self.used.add(scale_name)
        return t


# ---------------------------------------------------------------------------------------------------- load


def _layers_in_weights(reader: _Reader) -> tuple[set[int], set[int]]:
    """Indices of the decoder layers and of the MTP layers (those with eh_proj, enorm, ...) in the weight files."""
    decoder, mtp = set(), set()
    for name in reader.names():
        m = _LAYER.match(name)
        if m:
            (mtp if m.group(2) in _MTP_ONLY else decoder).add(int(m.group(1)))
    return decoder - mtp, mtp


def _match_layers(cfg: ModelConfig, reader: _Reader, path: Path) -> None:
    """Check num_hidden_layers against the weight files, and set cfg.num_mtp_layers to the MTP depth they hold.

    CheckpointError naming the field and the count found when the decoder layers disagree; fewer MTP layers than
    num_nextn_predict_layers (Hugging Face's DeepSeek-V3 ships none) only disable MTP beyond them.
    """
    decoder, mtp = _layers_in_weights(reader)
    if len(decoder) != cfg.num_layers:
        found = f"{len(decoder)} decoder layer(s)" + (f" (indices {min(decoder)}-{max(decoder)})" if decoder else "")
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers = {cfg.num_layers}, but the weight files "
                              f"hold {found}{f' and {len(mtp)} MTP layer(s)' if mtp else ''}")
    present = 0
    while cfg.num_layers + present in mtp:  # DeepSeek stores MTP depth d as decoder layer num_layers + d
        present += 1
    if present < cfg.num_mtp_layers:
        log.info("%s: config asks for %d MTP layer(s), checkpoint has %d; MTP disabled beyond that",
                 path, cfg.num_mtp_layers, present)
    cfg.num_mtp_layers = present


def _quantized_structure(model: Transformer, path: Path) -> tuple[dict[str, torch.dtype], dict[str, Any] | None]:
    """For a checkpoint in r1kit's quantized format: swap in the empty quantized modules it was saved from and
    return (name -> dtype of each quantized tensor, quantize_model's stats); ({}, None) otherwise."""
    hf = model.config.extra["hf_config"]
    if not quant_checkpoint.is_r1kit_quantized(hf):
        return {}, None
    options = quant_checkpoint.parse_config_entry(hf, str(path / "config.json"))
    stats = quantize_model(model, **options, structure_only=True)
    return quant_checkpoint.quantized_tensors(model), stats


def _compressed_structure(model: Transformer, path: Path) -> dict[str, torch.dtype]:
    """For a checkpoint whose config.json "compression" record lists low-rank or clustered layers (``r1kit
    compress``): swap in those empty modules and return name -> dtype of the tensors kept as stored."""
    record = model.config.extra["hf_config"].get("compression")
    if not isinstance(record, dict) or not record.get("structure"):
        return {}

    swap_structure(model, record, str(path / "config.json"))
    return quant_checkpoint.quantized_tensors(model)


def _read_state(model: Transformer, reader: _Reader, quantized: dict[str, torch.dtype], block: tuple[int, int],
                device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `model` (built on the meta device) read from the checkpoint, in its target dtype on
    `device`: quantized tensors as stored, the routing weights and integer buffers in their own dtype."""
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict(keep_vars=True).items():
        hf = _hf_names(name, model.config)
        if hf is None:
            continue
        kept = quantized.get(name)
        target = kept or (torch.float32 if FP32_TENSORS.search(name) or not meta.is_floating_point() else dtype)
        if isinstance(hf, str):
            state[name] = reader.load(hf, meta.shape, kept, block).to(device=device, dtype=target)
            continue
        out = torch.empty(meta.shape, dtype=target, device=device)  # stacked experts, filled slice by slice
        per = len(hf) // meta.shape[0]
        rows = meta.shape[1] // per
        for j, h in enumerate(hf):
            e, k = divmod(j, per)
            part = reader.load(h, torch.Size((rows, *meta.shape[2:])), kept, block)
            out[e, k * rows:(k + 1) * rows] = part.to(device)
        state[name] = out
    return state


def _assign(model: Transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    """Put the tensors read in place of the meta ones; the tied head and the rotary tables follow."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(model.config)  # built on the meta device; derived from the config, not loaded
    for n, b in model.named_buffers():
        if b.is_meta:
            raise CheckpointError(f"{path}: tensor {n!r} was not loaded")


def _check_all_read(reader: _Reader, cfg: ModelConfig, path: Path) -> None:
    """CheckpointError naming the tensors the config does not account for (DeepSeek's MTP layers' copies of the
    embedding and head, the rotary inv_freq and a tied lm_head are expected extras)."""
    depths = "|".join(str(cfg.num_layers + d) for d in range(cfg.num_mtp_layers))
    shared_mtp = re.compile(rf"model\.layers\.({depths})\.(embed_tokens|shared_head\.head)\.weight$")
    extra = sorted(n for n in reader.names() - reader.used
                   if not _IGNORED.search(n) and not (depths and shared_mtp.match(n))
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} tensor(s) the config does not account for, e.g. {extra[:5]}")


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False) -> Transformer:
    """Load a Hugging Face-format checkpoint folder into a Transformer on `device` in `dtype`.

    A checkpoint in r1kit's quantized format (``r1kit quantize``) loads into the quantized modules directly; its
    quantized tensors keep their stored dtypes and `dtype` applies to the rest.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    cfg = read_config(path)
    reader = _Reader(path, allow_pickle)
    _match_layers(cfg, reader, path)
    block = tuple((cfg.extra["hf_config"].get("quantization_config") or {}).get("weight_block_size", BLOCK))
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    quantized, stats = _quantized_structure(model, path)
    quantized.update(_compressed_structure(model, path))
    _assign(model, _read_state(model, reader, quantized, block, device, dtype), path)
    _check_all_read(reader, cfg, path)
    how = f"; {stats['swapped']} modules {stats['method']}" if stats else ""
    log.info("loaded %s (%s, %s parameters%s) on %s in %s", path, cfg.arch, f"{cfg.num_params(include_mtp=True):,}",
             how, device, dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- save


def _hf_state(model: Transformer, mtp_copies: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = model.config
    for name, t in model.state_dict().items():
        hf = _hf_names(name, cfg)
        if hf is None:
            continue
        if isinstance(hf, str):
            yield hf, t
            continue
        per = len(hf) // t.shape[0]
        for j, h in enumerate(hf):
            e, k = divmod(j, per)
            rows = t.shape[1] // per
            yield h, t[e, k * rows:(k + 1) * rows]
    for d in range(cfg.num_mtp_layers if mtp_copies else 0):  # DeepSeek's MTP layers copy the shared tensors
        yield f"model.layers.{cfg.num_layers + d}.embed_tokens.weight", model.embed_tokens.weight
        yield f"model.layers.{cfg.num_layers + d}.shared_head.head.weight", model.lm_head.weight


def _as_list(names: str | list[str] | None) -> list[str]:
    return [] if names is None else [names] if isinstance(names, str) else names


# 2-D weights that DeepSeek's FP8 checkpoints keep in high precision
_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|mlp\.gate)\.weight$")


def _to_fp8(name: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and name.endswith(".weight") and not _NOT_FP8.search(name)


def _to_saved(name: str, t: torch.Tensor, dtype: torch.dtype | None, fp8: bool
              ) -> list[tuple[str, torch.Tensor]]:
    """The tensor(s) written for one checkpoint entry: cast, or FP8 + its weight_scale_inv."""
    t = t.detach().to("cpu")
    if fp8 and _to_fp8(name, t):
        q, scale_inv = quantize_blocks(t, BLOCK)
        return [(name, q.contiguous()), (name.removesuffix("weight") + "weight_scale_inv", scale_inv)]
    if dtype is not None and t.is_floating_point() and not FP32_TENSORS.search(name):
        t = t.to(dtype)
    return [(name, t.contiguous().clone())]  # a copy: safetensors refuses tensors that share storage


def _plan_shards(model: Transformer, kept: set[str], dtype: torch.dtype | None, fp8: bool, max_shard_bytes: int,
                 mtp_copies: bool) -> list[list[tuple[str, torch.Tensor]]]:
    """The checkpoint entries grouped into shards of at most max_shard_bytes as written (one shard when they fit)."""
    itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else None
    plan: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in _hf_state(model, mtp_copies):
        nbytes = t.numel() * (t.element_size() if name in kept else 1 if fp8 and _to_fp8(name, t)
                              else itemsize or t.element_size())
        if size and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, t))
        size += nbytes
    return plan


def _write_shards(plan: list[list[tuple[str, torch.Tensor]]], path: Path, kept: set[str],
                  dtype: torch.dtype | None, fp8: bool) -> None:
    """Write each shard (and the index past one shard), each file atomically, then drop an earlier save's extra
    shards, which would otherwise be read back."""
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    weight_map, total = {}, 0
    for entries, file in zip(plan, names, strict=True):
        shard = dict(item for name, t in entries
                     for item in (_to_saved(name, t, None, False) if name in kept else _to_saved(name, t, dtype, fp8)))
        atomic_write(path / file, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
        del shard
    stale = [f for f in path.glob("model*.safetensors") if _WEIGHT_FILE.fullmatch(f.name) and f.name not in names]
    if len(plan) == 1:
        stale.append(path / "model.safetensors.index.json")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(path / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    for f in stale:
        f.unlink(missing_ok=True)


def save_model(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 5 * 2**30, fp8: bool = False) -> None:
    """Write config.json and safetensors (sharded with an index beyond max_shard_bytes), each file atomically.

    Shards are planned from the tensor sizes first and then written one at a time, so at most one shard is
    held in memory beyond the model. With ``fp8=True`` the linear weights are stored as DeepSeek ships them:
    float8_e4m3fn with a ``weight_scale_inv`` per 128x128 block (embeddings, head, norms and router stay in
    ``dtype``).

    A model quantized by ``r1kit.quant.quantize_model`` is written in r1kit's quantized format (see
    r1kit.quant.checkpoint): its quantized tensors as they are, `dtype` for the rest, and a quantization_config.
    """
    path = Path(path)
    qconfig = quant_checkpoint.config_entry(model)
    if qconfig is not None and fp8:
        raise CheckpointError(f"{path}: fp8=True writes DeepSeek's FP8 format from full-precision weights, but the "
                              f"model is already quantized ({qconfig['method']}); save it without fp8")
    kept = {h for n in quant_checkpoint.quantized_tensors(model) for h in _as_list(_hf_names(n, model.config))}
    path.mkdir(parents=True, exist_ok=True)
    # no MTP copies of the embedding and head for a quantized (or low-rank, clustered) head: no single tensor to copy
    plan = _plan_shards(model, kept, dtype, fp8, max_shard_bytes,
                        mtp_copies=qconfig is None and type(model.lm_head) is torch.nn.Linear)
    _write_shards(plan, path, kept, dtype, fp8)
    hf = config_to_hf(model.config)
    hf["torch_dtype"] = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    if fp8:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(BLOCK)}
    if qconfig is not None:
        hf["quantization_config"] = qconfig
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(hf, indent=2) + "\n"))
