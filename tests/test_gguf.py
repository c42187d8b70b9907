"""GGUF import: Q8_0 / Q4_0 blocks dequantized as a hand computation says; tiny Qwen2 and Llama models written
with gguf's own writer (as llama.cpp's converter writes them: llama's Q/K rows permuted, some tensors Q8_0) load
in r1kit with the logits transformers computes from the same file (its own GGUF loader), and the tokenizer rebuilt
from the metadata encodes as the source one; unsupported types and names are errors naming the tensor."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from r1kit.gguf import GGUFError, dequantize, hf_name  # noqa: E402


def test_q8_0_and_q4_0_blocks_by_hand() -> None:
    d = 0.5
    q8 = np.arange(-16, 16, dtype=np.int8)
    block = np.frombuffer(struct.pack("<e", d) + q8.tobytes(), dtype=np.uint8)[None]  # (1, 34)
    got = dequantize(block, gguf.GGMLQuantizationType.Q8_0, (32,), "t")
    assert torch.equal(got, torch.tensor([d * q for q in q8.tolist()], dtype=torch.float32))

    nibbles = bytes((lo | (hi << 4)) for lo, hi in zip(range(16), range(15, -1, -1), strict=True))
    block = np.frombuffer(struct.pack("<e", 0.25) + nibbles, dtype=np.uint8)[None]  # (1, 18)
    got = dequantize(block, gguf.GGMLQuantizationType.Q4_0, (32,), "t")
    expected = [(lo - 8) * 0.25 for lo in range(16)] + [(hi - 8) * 0.25 for hi in range(15, -1, -1)]
    assert got.tolist() == expected


def test_unsupported_type_and_name_are_named() -> None:
    with pytest.raises(GGUFError, match="tensor 'blk.0.x.weight': type I32"):
        dequantize(np.zeros((1, 4), np.uint8), gguf.GGMLQuantizationType.I32, (1,), "blk.0.x.weight")
    with pytest.raises(GGUFError, match="tensor 'rope_freqs.weight'"):
        hf_name("rope_freqs.weight")
    assert hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"


# ---------------------------------------------------------------------------------------------------- files
def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute of llama's q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(model, tokenizer, path, arch: str) -> None:
    """A GGUF of a transformers model as llama.cpp writes one: metadata, vocabulary, tensors (the MLP and the
    embedding in Q8_0, the rest F32)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer._backend
    data = __import__("json").loads(vocab.to_str())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    specials = {a["content"]: a["id"] for a in data["added_tokens"]}
    tokens += [t for t, _ in sorted(specials.items(), key=lambda kv: kv[1]) if t not in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, tensor in model.state_dict().items():
        value = tensor.float().numpy()
        if name == "lm_head.weight":
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_NAMES[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                value = _permute(value, cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads)
        if gname.startswith("blk.") and "ffn" in gname and gname.endswith("weight") or gname == "token_embd.weight":
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def base_tokenizer():
    from r1kit.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(["the cat sat on the mat and the dog ran far away"] * 8, 300,
                               special_tokens=["<|endoftext|>", "<|im_start|>"])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_logits_match_transformers_gguf_loading(arch, base_tokenizer, tmp_path, monkeypatch) -> None:
    import transformers

    from r1kit.api import R1Model

    torch.manual_seed(0)
    kind = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    cfg = kind(vocab_size=base_tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
               tie_word_embeddings=False, bos_token_id=base_tokenizer.token_to_id("<|endoftext|>"),
               eos_token_id=base_tokenizer.token_to_id("<|endoftext|>"))
    source = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(source, base_tokenizer, path, arch)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path / "cache"))
    ours = R1Model.from_pretrained(str(path), device="cpu", dtype="fp32")
    ids = base_tokenizer.encode("the cat sat on the mat")
    assert ours.tokenizer.encode("the cat sat on the mat") == ids
    assert ours.tokenizer.chat_template is not None
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
        got = ours.model(torch.tensor([ids]))[0].float()
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item() + 1e-5
