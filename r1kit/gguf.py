"""GGUF import: llama.cpp / Ollama model files read with the ``gguf`` package (llama.cpp's own reader) and written
as a Hugging Face-format folder that r1kit's checkpoint loader reads.

    r1kit convert model.gguf OUT                       # OUT: config.json, model.safetensors, tokenizer files
    R1Model.from_pretrained("model.gguf")              # converted once into a cache folder (gguf_folder), loaded

What is read:
  architecture  ``general.architecture`` llama, qwen2 (the dense GQA families) or deepseek2 (llama.cpp's name for
                DeepSeek-V2/V3/R1: MLA and MoE), written as the Hugging Face family r1kit loads; others are refused
                with the list of the supported ones
  config        the ``{arch}.*`` hyper-parameters (layers, widths, heads, rope base, norm epsilon, context); for
                deepseek2 also the MLA ranks and head widths (``attention.q_lora_rank``, ``kv_lora_rank``,
                ``key_length_mla``/``value_length_mla``, or ``key_length``/``value_length`` in older files), the
                experts (``expert_count``, ``expert_used_count``, ``expert_shared_count``,
                ``expert_feed_forward_length``, ``leading_dense_block_count``, ``expert_group_count``,
                ``expert_group_used_count``, ``expert_gating_func``, ``expert_weights_norm``,
                ``expert_weights_scale``) and YaRN (``rope.scaling.*``: factor, original context, yarn_log_multiplier
                = 0.1 * mscale_all_dim)
  tensors       llama.cpp's names mapped back to Hugging Face's; F32/F16/BF16 as they are, Q4_0, Q4_1, Q5_0, Q5_1,
                Q8_0 and the K-quants (Q2_K..Q6_K) dequantized by ``gguf.quants`` (numpy) to float32, then stored in
                ``dtype``; llama's Q/K rows un-permuted (llama.cpp's converter permutes them for its rope); deepseek2's
                stacked experts (``ffn_*_exps``) split per expert, ``attn_k_b``/``attn_v_b`` (the converter's split
                and transposed ``kv_b_proj``) joined back (or ``attn_kv_b`` as older files hold it), ``exp_probs_b``
                as the routing bias ``e_score_correction_bias``; a tensor of another type or an unknown name:
                GGUFError naming the tensor
  tokenizer     ``tokenizer.ggml.*`` of a byte-level BPE (model "gpt2": Qwen2, Llama-3) rebuilt as tokenizer.json
                with the pre-tokenizer regex(es) of ``tokenizer.ggml.pre`` (qwen2, llama-bpe, deepseek-v3; another
                one: GPT-2's byte-level split); control tokens special; bos/eos ids; the
                ``tokenizer.chat_template`` into tokenizer_config.json. SentencePiece vocabularies ("llama" model)
                are refused (the weights can still be converted with ``tokenizer=False``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCHITECTURES = ("llama", "qwen2", "deepseek2")
# llama.cpp's per-layer tensor names -> Hugging Face's (the suffix .weight / .bias is kept)
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
# deepseek2 (MLA attention, MoE feed-forward): the per-layer names besides the norms, o_proj and the dense MLP's;
# ffn_*_exps hold every routed expert (split per expert), attn_k_b / attn_v_b are joined into kv_b_proj
_DEEPSEEK2_NAMES = {**{k: v for k, v in _LAYER_NAMES.items() if k not in ("attn_k", "attn_v")},
                    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
                    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
                    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
                    "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate.e_score_correction",
                    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                    "ffn_down_shexp": "mlp.shared_experts.down_proj", "ffn_gate_exps": "mlp.experts.gate_proj",
                    "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
                    "attn_k_b": "self_attn.k_b_proj", "attn_v_b": "self_attn.v_b_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# tokenizer.ggml.pre -> the pre-tokenizer split regex(es), applied in order (as llama.cpp's llama-vocab and the HF
# tokenizers use)
_PRE_REGEX: dict[str, str | tuple[str, ...]] = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "deepseek-v3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
                    r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


class GGUFError(ValueError):
    """A GGUF file r1kit cannot read: the message names the file and the field or tensor."""


def _reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'r1kit[gguf]'") from None
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _fields(reader: Any) -> dict[str, Any]:
    """The metadata as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------- config
def hf_config(meta: dict[str, Any], vocab_size: int, tied: bool, source: str,
              tensor_names: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The Hugging Face config.json of a GGUF file's metadata (`tensor_names`: the file's tensors, which tell
    DeepSeek-V3's bias-corrected routing from V2's); GGUFError naming a missing field."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{source}: general.architecture = {arch!r}; r1kit reads {', '.join(ARCHITECTURES)} "
                        "GGUF files")

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise GGUFError(f"{source}: metadata {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    config = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
              "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
              "max_position_embeddings": int(need("context_length")),
              "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
              "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")), "tie_word_embeddings": tied,
              "hidden_act": "silu", "torch_dtype": "float32"}
    if arch == "deepseek2":
        config.update(_deepseek2_config(meta, need, heads, tensor_names, source))
    else:
        config.update({"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
                       "model_type": arch,
                       "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                       "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads))})
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            config[name] = int(meta[key])
    return config


def _deepseek2_config(meta: dict[str, Any], need: Any, heads: int, tensor_names: frozenset[str], source: str
                      ) -> dict[str, Any]:
    """DeepSeek-V2/V3's config.json fields from deepseek2 metadata, as llama.cpp's converter writes them: MLA is
    stored as MQA (head_count_kv 1, key_length = kv_lora_rank + rope) with the per-head widths in *_mla keys
    (older files: key_length / value_length are the per-head widths)."""
    def get(key: str, default: Any) -> Any:
        return meta.get(f"deepseek2.{key}", default)

    rope = int(need("rope.dimension_count"))
    mla = "deepseek2.attention.key_length_mla" in meta
    qk_dim = int(need("attention.key_length_mla" if mla else "attention.key_length"))
    v_dim = int(need("attention.value_length_mla" if mla else "attention.value_length"))
    gating = {1: "softmax", 2: "sigmoid"}.get(int(get("expert_gating_func", 1)))  # absent: softmax (V2)
    if gating is None:
        raise GGUFError(f"{source}: deepseek2.expert_gating_func = {get('expert_gating_func', None)!r}: r1kit "
                        "reads 1 (softmax) or 2 (sigmoid)")
    v3 = any(name.endswith(".exp_probs_b.bias") for name in tensor_names)  # the routing bias: V3's noaux_tc
    groups = int(get("expert_group_count", 1))
    q_rank = int(get("attention.q_lora_rank", 0))
    return {"architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v3" if v3 else "deepseek_v2", "num_key_value_heads": heads,
            "q_lora_rank": q_rank or None, "kv_lora_rank": int(need("attention.kv_lora_rank")),
            "qk_nope_head_dim": qk_dim - rope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
            "n_routed_experts": int(get("expert_count", 0)) or None,
            "n_shared_experts": int(get("expert_shared_count", 0)) or None,
            "num_experts_per_tok": int(get("expert_used_count", 0)) or None,
            "moe_intermediate_size": int(get("expert_feed_forward_length", 0)),
            "first_k_dense_replace": int(get("leading_dense_block_count", 0)), "moe_layer_freq": 1,
            "scoring_func": gating, "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if groups > 1 else
            "greedy", "n_group": groups, "topk_group": int(get("expert_group_used_count", 1)),
            "norm_topk_prob": bool(get("expert_weights_norm", False)),
            "routed_scaling_factor": float(get("expert_weights_scale", 1.0)), "rope_interleave": True,
            "num_nextn_predict_layers": 0, "rope_scaling": _deepseek2_rope_scaling(meta, need, source)}


def _deepseek2_rope_scaling(meta: dict[str, Any], need: Any, source: str) -> dict[str, Any] | None:
    """YaRN as llama.cpp applies it to deepseek2: cos/sin unscaled (attention_factor 1) and the softmax scale
    times mscale(factor, mscale_all_dim)^2, mscale_all_dim = yarn_log_multiplier / 0.1 (the converter's
    0.1 * mscale_all_dim)."""
    kind = meta.get("deepseek2.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise GGUFError(f"{source}: deepseek2.rope.scaling.type = {kind!r}: r1kit reads yarn or none")
    return {"rope_type": "yarn", "factor": float(need("rope.scaling.factor")),
            "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
            "beta_fast": float(meta.get("deepseek2.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(meta.get("deepseek2.rope.scaling.yarn_beta_slow", 1.0)), "attention_factor": 1.0,
            "mscale_all_dim": float(meta.get("deepseek2.rope.scaling.yarn_log_multiplier", 0.0)) / 0.1}


# ---------------------------------------------------------------------------------------------------- tensors
def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A GGUF tensor's values as float32 in PyTorch order (``shape``: GGUF's, innermost first); GGUFError naming
    the tensor for a type the gguf package cannot dequantize."""
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.BF16:
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        try:
            values = quants.dequantize(data, qtype)
        except NotImplementedError:
            raise GGUFError(f"tensor {name!r}: type {getattr(qtype, 'name', qtype)} cannot be dequantized "
                            "(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants can)") from None
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(reversed(shape))))  # a writable copy


def hf_name(name: str, arch: str = "llama") -> str:
    """The Hugging Face name of a llama.cpp tensor name of architecture `arch`; GGUFError for one r1kit does not
    map. deepseek2's stacked experts and k_b / v_b come back as their stacked names (``mlp.experts.gate_proj``,
    ``self_attn.k_b_proj``), which ``read_tensors`` splits and joins."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    table = _DEEPSEEK2_NAMES if arch == "deepseek2" else _LAYER_NAMES
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}".replace("correction.bias", "correction_bias")
    raise GGUFError(f"tensor {name!r}: not a {arch} tensor r1kit maps (rope_freqs: llama-3 rope scaling, "
                    "is not supported)")


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rope permutation of llama's q/k rows: (heads * 2 * half, C) back to Hugging Face's order."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def join_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """kv_b_proj back from llama.cpp's split: k_b (H, kv_lora_rank, nope) and v_b (H, v_head_dim, kv_lora_rank)
    -> (H * (nope + v_head_dim), kv_lora_rank), each head's nope rows then its value rows."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])  # (H, nope + v, rank) flat


def read_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor in ``dtype``) of each tensor of the file, dequantized and un-permuted; deepseek2's
    experts split, its k_b / v_b joined (ignored where the layer also holds attn_kv_b)."""
    llama, arch = config["model_type"] == "llama", "deepseek2" if config["model_type"].startswith("deepseek") else ""
    names = {t.name for t in reader.tensors}
    halves: dict[str, torch.Tensor] = {}  # k_b / v_b waiting for the other half, by kv_b_proj name
    for t in reader.tensors:
        name = hf_name(t.name, arch or config["model_type"])
        value = dequantize(t.data, t.tensor_type, tuple(int(d) for d in t.shape), t.name)
        if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute(value, config["num_attention_heads"])
        elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute(value, config["num_key_value_heads"])
        elif ".mlp.experts." in name:  # (E, out, in): one matrix per routed expert
            prefix, proj = name.split(".mlp.experts.")
            yield from ((f"{prefix}.mlp.experts.{e}.{proj}", value[e].to(dtype)) for e in range(value.shape[0]))
            continue
        elif ".attn_k_b." in t.name or ".attn_v_b." in t.name:
            joined = name.replace(".k_b_proj.", ".kv_b_proj.").replace(".v_b_proj.", ".kv_b_proj.")
            if t.name.replace("attn_k_b", "attn_kv_b").replace("attn_v_b", "attn_kv_b") in names:
                continue  # the file holds kv_b itself too (ik_llama.cpp's converter writes both)
            if joined not in halves:
                halves[joined] = value
                continue
            other = halves.pop(joined)
            name, value = joined, join_kv_b(*((value, other) if ".attn_k_b." in t.name else (other, value)))
        yield name, value.to(dtype)
    if halves:
        raise GGUFError(f"{', '.join(sorted(halves))}: attn_k_b without attn_v_b (or the reverse) in the file")


# ---------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_files(meta: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json) of a byte-level BPE vocabulary in the metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model = {kind!r}: r1kit rebuilds byte-level BPE ('gpt2', as "
                        "Qwen2 and Llama-3 use) vocabularies only")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_REGEX)
    regexes = _PRE_REGEX.get(pre, ())
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in ((regexes,) if isinstance(regexes, str) else regexes)]
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token":
                              bool(meta.get("tokenizer.ggml.add_bos_token", False))}
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return backend.to_str(), config


# ---------------------------------------------------------------------------------------------------- convert
def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 tokenizer: bool = True) -> Path:
    """Write the GGUF file ``path`` as a Hugging Face-format folder ``out`` (config.json, model.safetensors,
    tokenizer.json + tokenizer_config.json): what `r1kit convert model.gguf OUT` does. Returns ``out``."""
    from safetensors.torch import save_file

    from r1kit.fileio import atomic_write

    path, out = Path(path), Path(out)
    reader = _reader(path)
    meta = _fields(reader)
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    config = hf_config(meta, int(embed.shape[1]), "output.weight" not in names, str(path), frozenset(names))
    files = tokenizer_files(meta, str(path)) if tokenizer else None
    tensors = dict(read_tensors(reader, config, dtype))
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    atomic_write(out / "model.safetensors", lambda tmp: save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt", "source": "gguf"}))
    if files is not None:
        atomic_write(out / "tokenizer.json", lambda tmp: tmp.write_text(files[0], encoding="utf-8"))
        atomic_write(out / "tokenizer_config.json", lambda tmp: tmp.write_text(
            json.dumps(files[1], indent=2, ensure_ascii=False), encoding="utf-8"))
    return out


def gguf_folder(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The converted folder of a GGUF file, converting it on first use (weights stored in float32: the
    dequantized values exactly) into
    ``cache`` (default ``$R1KIT_CACHE/gguf`` or ``~/.cache/r1kit/gguf``) under a key of its path, size and time."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache or Path(os.environ.get("R1KIT_CACHE", "~/.cache/r1kit")).expanduser() / "gguf")
    folder = root / f"{path.stem}-{key}"
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder.with_name(folder.name + ".partial"), torch.float32)
        os.replace(folder.with_name(folder.name + ".partial"), folder)
    return folder
