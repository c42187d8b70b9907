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
    _write_vocab(w, tokenizer, cfg)
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
        _add_tensor(w, gname, value, gname.startswith("blk.") and "ffn" in gname and gname.endswith("weight")
                    or gname == "token_embd.weight")
    _finish(w)


def _write_vocab(w, tokenizer, cfg) -> None:
    """The byte-level BPE vocabulary as llama.cpp's _set_vocab_gpt2 writes it, and a chat template."""
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


def _add_tensor(w, name: str, value: np.ndarray, q8: bool) -> None:
    if q8:
        q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor(name, value)


def _finish(w) -> None:
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


# ---------------------------------------------------------------------------------------------------- deepseek2
_DS_NAMES = {**{k: v for k, v in _NAMES.items() if "self_attn.k_proj" != k != "self_attn.v_proj"},
             "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
             "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
             "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
             "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
             "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}


def _deepseek2_tensors(sd: dict, cfg, split_kv_b: bool):
    """(GGUF name, array, Q8_0?) as llama.cpp's DeepseekV2Model.modify_tensors makes them: the routed experts
    stacked (E, out, in), e_score_correction_bias as exp_probs_b.bias, kv_b_proj split into k_b (transposed) and
    v_b (or kept whole, as older converters did); expert and dense MLP weights in Q8_0 (``_q8``). `sd`: the
    checkpoint's tensors by name, one per expert as DeepSeek's safetensors hold them."""
    sd = {k: v.float().numpy() for k, v in sd.items()}
    for name in [n for n in sd if ".mlp.experts.0." in n]:
        layer, proj = name.removeprefix("model.layers.").split(".mlp.experts.0.")
        stacked = np.stack([sd.pop(name.replace(".experts.0.", f".experts.{e}."))
                            for e in range(cfg.n_routed_experts)])
        yield f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight", stacked, True
    for name, value in sd.items():
        if name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
            yield {"lm_head.weight": "output.weight", "model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight"}[name], value, False
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest == "mlp.gate.e_score_correction_bias":
            yield f"blk.{layer}.exp_probs_b.bias", value, False
        elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
            kv_b = value.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            yield f"blk.{layer}.attn_k_b.weight", kv_b[:, :cfg.qk_nope_head_dim].transpose(0, 2, 1).copy(), False
            yield f"blk.{layer}.attn_v_b.weight", kv_b[:, cfg.qk_nope_head_dim:].copy(), False
        else:
            module, kind = rest.rsplit(".", 1)
            yield f"blk.{layer}.{_DS_NAMES[module]}.{kind}", value, _q8(name)


def _q8(name: str) -> bool:
    """The checkpoint tensors the test's files hold in Q8_0: the MLPs' and experts' weights (not the router)."""
    return ".mlp." in name and ".mlp.gate." not in name and name.endswith("weight")


def write_deepseek2_gguf(sd: dict, cfg, tokenizer, path, split_kv_b: bool) -> None:
    """A deepseek2 GGUF of a transformers DeepSeek-V3 model, metadata as llama.cpp's converter writes it (MLA as
    MQA: head_count_kv 1, key_length kv_lora_rank + rope, the per-head widths in *_mla keys; YaRN's
    yarn_log_multiplier = 0.1 * mscale_all_dim)."""
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(str(path), "deepseek2")
    for method, value in (
            ("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
            ("block_count", cfg.num_hidden_layers), ("feed_forward_length", cfg.intermediate_size),
            ("head_count", cfg.num_attention_heads), ("head_count_kv", 1), ("rope_freq_base", rope["rope_theta"]),
            ("layer_norm_rms_eps", cfg.rms_norm_eps), ("expert_used_count", cfg.num_experts_per_tok),
            ("expert_group_count", cfg.n_group), ("expert_group_used_count", cfg.topk_group),
            ("leading_dense_block_count", cfg.first_k_dense_replace), ("vocab_size", cfg.vocab_size),
            ("q_lora_rank", cfg.q_lora_rank), ("kv_lora_rank", cfg.kv_lora_rank),
            ("key_length", cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("value_length", cfg.kv_lora_rank),
            ("key_length_mla", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), ("value_length_mla", cfg.v_head_dim),
            ("expert_feed_forward_length", cfg.moe_intermediate_size), ("expert_count", cfg.n_routed_experts),
            ("expert_shared_count", cfg.n_shared_experts), ("expert_weights_scale", cfg.routed_scaling_factor),
            ("expert_weights_norm", cfg.norm_topk_prob), ("expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID),
            ("rope_dimension_count", cfg.qk_rope_head_dim), ("rope_scaling_type", gguf.RopeScalingType.YARN),
            ("rope_scaling_factor", rope["factor"]), ("rope_scaling_orig_ctx_len",
                                                      rope["original_max_position_embeddings"]),
            ("rope_scaling_yarn_log_mul", 0.1 * rope["mscale_all_dim"])):
        getattr(w, f"add_{method}")(value)
    _write_vocab(w, tokenizer, cfg)
    for name, value, q8 in _deepseek2_tensors(sd, cfg, split_kv_b):
        _add_tensor(w, name, value, q8)
    _finish(w)


@pytest.mark.parametrize("split_kv_b", [True, False], ids=["k_b+v_b", "kv_b"])
def test_deepseek2_gguf_logits_match_transformers(split_kv_b, base_tokenizer, randomize_weights, tmp_path,
                                                  monkeypatch) -> None:
    # transformers has no deepseek2 GGUF loader (5.x: GGUF_SUPPORTED_ARCHITECTURES), so the reference is the
    # transformers model the file was written from, its Q8_0 weights rounded as the file holds them
    import transformers
    from safetensors.torch import load_file, save_file

    from r1kit.api import R1Model

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=base_tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 64, "beta_fast": 32,
                                                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    randomize_weights(transformers.AutoModelForCausalLM.from_config(cfg), seed=1, std=0.15).save_pretrained(
        tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")  # the checkpoint as llama.cpp's converter reads it
    path = tmp_path / "tiny-deepseek2.gguf"
    write_deepseek2_gguf(sd, cfg, base_tokenizer, path, split_kv_b)
    q8 = gguf.GGMLQuantizationType.Q8_0  # the reference holds the file's values: Q8_0 where the writer quantized
    save_file({k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q8), q8)) if _q8(k)
               else v for k, v in sd.items()}, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    source = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    monkeypatch.setenv("R1KIT_CACHE", str(tmp_path / "cache"))
    ours = R1Model.from_pretrained(str(path), device="cpu", dtype="fp32")
    c = ours.model.config
    assert (c.arch, c.attention, c.q_lora_rank, c.n_routed_experts, c.n_group, c.topk_method, c.scoring_func) == (
        "deepseek_v3", "mla", 48, 8, 4, "noaux_tc", "sigmoid")
    ids = torch.randint(2, base_tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = source(ids).logits
        got = ours.model(ids).float()
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item() + 1e-5


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    from r1kit.gguf import hf_config

    with pytest.raises(GGUFError, match=r"general.architecture = 'mamba'; r1kit reads llama, qwen2, deepseek2"):
        hf_config({"general.architecture": "mamba"}, 10, False, "m.gguf")


def test_deepseek_v3_pre_tokenizer_splits_as_llama_cpp() -> None:
    # tokenizer.ggml.pre "deepseek-v3": llama.cpp's three regexes in order (digits in threes, CJK runs, then words /
    # punctuation / newlines), then the byte-level map; the pieces below are the regexes applied by hand
    from tokenizers import Tokenizer, pre_tokenizers

    from r1kit.gguf import tokenizer_files

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.pre": "deepseek-v3"}
    tok = Tokenizer.from_str(tokenizer_files(meta, "t.gguf")[0])
    got = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("Hello, world! 1234567 你好世界 a.b\n\nx")]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    want = ["Hello", ",", " world", "!", " ", "123", "456", "7", " ", "你好世界", " a", ".b", "\n\n", "x"]
    assert got == [byte_level.pre_tokenize_str(w)[0][0] for w in want]
