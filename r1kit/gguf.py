"""GGUF import: llama.cpp / Ollama model files read with the ``gguf`` package (llama.cpp's own reader) and written
as a Hugging Face-format folder that r1kit's checkpoint loader reads.

    r1kit convert model.gguf OUT                       # OUT: config.json, model.safetensors, tokenizer files
    R1Model.from_pretrained("model.gguf")              # converted once into a cache folder (gguf_folder), loaded

What is read:
  architecture  ``general.architecture`` llama or qwen2 (the dense GQA families r1kit loads from Hugging Face
                names); others (deepseek2's MLA and MoE included) are refused by name
  config        the ``{arch}.*`` hyper-parameters (layers, widths, heads, rope base, norm epsilon, context)
  tensors       llama.cpp's names mapped back to Hugging Face's; F32/F16/BF16 as they are, Q4_0, Q4_1, Q5_0, Q5_1,
                Q8_0 and the K-quants (Q2_K..Q6_K) dequantized by ``gguf.quants`` (numpy) to float32, then stored in
                ``dtype``; llama's Q/K rows un-permuted (llama.cpp's converter permutes them for its rope); a tensor
                of another type or an unknown name: GGUFError naming the tensor
  tokenizer     ``tokenizer.ggml.*`` of a byte-level BPE (model "gpt2": Qwen2, Llama-3) rebuilt as tokenizer.json
                with the pre-tokenizer regex of ``tokenizer.ggml.pre``; control tokens special; bos/eos ids; the
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

ARCHITECTURES = ("llama", "qwen2")
# llama.cpp's per-layer tensor names -> Hugging Face's (the suffix .weight / .bias is kept)
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# tokenizer.ggml.pre -> the pre-tokenizer split regex (as llama.cpp's llama-vocab and the HF tokenizers use)
_PRE_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
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
def hf_config(meta: dict[str, Any], vocab_size: int, tied: bool, source: str) -> dict[str, Any]:
    """The Hugging Face config.json of a GGUF file's metadata; GGUFError naming a missing field."""
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
    config = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
              "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
              "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
              "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
              "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
              "max_position_embeddings": int(need("context_length")),
              "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
              "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")), "tie_word_embeddings": tied,
              "hidden_act": "silu", "torch_dtype": "float32"}
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            config[name] = int(meta[key])
    return config


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


def hf_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name; GGUFError for one r1kit does not map."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFError(f"tensor {name!r}: not a llama/qwen2 tensor r1kit maps (rope_freqs: llama-3 rope scaling, "
                    "is not supported)")


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rope permutation of llama's q/k rows: (heads * 2 * half, C) back to Hugging Face's order."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_tensors(reader: Any, config: dict[str, Any], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor in ``dtype``) of each tensor of the file, dequantized and un-permuted."""
    llama = config["model_type"] == "llama"
    for t in reader.tensors:
        name = hf_name(t.name)
        value = dequantize(t.data, t.tensor_type, tuple(int(d) for d in t.shape), t.name)
        if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute(value, config["num_attention_heads"])
        elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute(value, config["num_key_value_heads"])
        yield name, value.to(dtype)


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
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), "isolated"), byte_level]) if pre in _PRE_REGEX else byte_level
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
    config = hf_config(meta, int(embed.shape[1]), "output.weight" not in names, str(path))
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
