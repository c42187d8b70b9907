"""Parity with Hugging Face transformers: same checkpoint, same logits, same greedy continuation.

Each case builds a tiny random model with transformers' own config and model classes, re-randomises
its weights (norms, biases and DeepSeek-V3's e_score_correction_bias included, so that routing decisions
vary), saves it with `save_pretrained` (fp32 safetensors) and loads the folder with `r1kit.load_model`.
"""

from __future__ import annotations

import pytest
import torch

from r1kit.checkpoint import load_model

transformers = pytest.importorskip("transformers")

VOCAB = 256
HIDDEN = 64
NEW_TOKENS = 32
ATOL = 1e-4

_MLA_DIMS = dict(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, first_k_dense_replace=1)
_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
               max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=0)
_YARN = {"type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _v3(**kw):
    return transformers.DeepseekV3Config(**_COMMON, **_MLA_DIMS, n_shared_experts=1, n_group=4, topk_group=2,
                                         norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                                         num_mtp_layers=0, **kw)


# name -> (config factory, r1kit config fields the checkpoint must produce)
CASES = {
    # DeepSeek-V3: sigmoid + bias-corrected group routing, low-rank q, YaRN (mscale = mscale_all_dim).
    "deepseek_v3-yarn": (lambda: _v3(q_lora_rank=48, rope_parameters=dict(_YARN)),
                         dict(arch="deepseek_v3", attention="mla", q_lora_rank=48, n_group=4, topk_group=2,
                              topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True)),
    # YaRN with mscale != mscale_all_dim: attention_factor != 1 scales cos/sin, mscale_all_dim the softmax.
    "deepseek_v3-yarn-mscale": (lambda: _v3(q_lora_rank=48, rope_parameters={**_YARN, "mscale": 0.707}),
                                dict(arch="deepseek_v3", q_lora_rank=48)),
    # Full-rank q_proj (V2-Lite-shaped attention), YaRN without mscale: attention_factor from factor only.
    "deepseek_v3-nolora": (lambda: _v3(q_lora_rank=None, rope_parameters={
        "type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32}),
                           dict(arch="deepseek_v3", q_lora_rank=None)),
    # DeepSeek-V2: softmax scores, group-limited greedy, no renormalisation (HF V2 ignores norm_topk_prob).
    "deepseek_v2-group": (lambda: transformers.DeepseekV2Config(
        **_COMMON, **_MLA_DIMS, q_lora_rank=48, n_shared_experts=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                          dict(arch="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                               n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5)),
    "qwen2": (lambda: transformers.Qwen2Config(
        **_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
              dict(arch="qwen2", attention="gqa", attention_bias=True, num_kv_heads=2, tie_word_embeddings=False)),
    "qwen2-tied": (lambda: transformers.Qwen2Config(
        **_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                   dict(arch="qwen2", tie_word_embeddings=True)),
    # Llama-3 RoPE: with head_dim 16, theta 1e4 and an original context of 64 the frequencies fall in all
    # three bands (kept, smoothed, divided by factor).
    "llama-llama3": (lambda: transformers.LlamaConfig(
        **_COMMON, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                     dict(arch="llama", attention="gqa", num_kv_heads=1, attention_bias=False)),
}
MLA_CASES = [c for c in CASES if c.startswith("deepseek")]
PARAMS = [pytest.param(c, impl, id=f"{c}-{impl}") for c in CASES
          for impl in (("naive", "absorb") if c in MLA_CASES else (None,))]


class Case:
    def __init__(self, name, path, hf, ours):
        self.name, self.path, self.hf, self.ours = name, path, hf, ours


@pytest.fixture(scope="session")
def case(request, tmp_path_factory, randomize_weights) -> Case:
    """Build, randomise and save one HF model once per session; load it with r1kit."""
    name = request.param
    make_config, _ = CASES[name]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="eager")
    randomize_weights(hf, seed=1, std=0.15)
    hf.eval()
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)  # safetensors, fp32
    return Case(name, path, hf, load_model(path))


def _ids(seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def r1kit_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with r1kit's KV cache: one prefill, then one token per forward."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n)
    logits = model(prompt, cache=cache, last_only=True)
    out = []
    for i in range(n):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
        if i + 1 < n:
            logits = model(tok, cache=cache)
    assert cache.pos == prompt.shape[1] + n - 1
    return torch.cat(out, dim=1)


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                      min_new_tokens=n, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + n, "HF stopped early"
    return out[:, prompt.shape[1]:]


def _set_impl(model, impl):
    if impl is not None:
        model.set_mla_impl(impl)


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_config_translated(case):
    """config.json (rope_parameters and all) becomes the ModelConfig the case expects."""
    cfg = case.ours.config
    for field, value in CASES[case.name][1].items():
        assert getattr(cfg, field) == value, field
    assert cfg.num_layers == 3 and cfg.hidden_size == HIDDEN and cfg.vocab_size == VOCAB
    assert case.ours.num_params() == case.hf.num_parameters()
    assert case.ours.num_params() == cfg.num_params()


@pytest.mark.parametrize("case, impl", PARAMS, indirect=["case"])
@torch.no_grad()
def test_logits_match(case, impl):
    _set_impl(case.ours, impl)
    ids = _ids(0)
    ref = case.hf(ids).logits
    ours = case.ours(ids)
    assert ours.shape == ref.shape == (2, 24, VOCAB)
    assert ref.std() > 0.3, "degenerate reference logits: the test would prove nothing"
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, impl", PARAMS, indirect=["case"])
@torch.no_grad()
def test_greedy_generation_matches(case, impl):
    _set_impl(case.ours, impl)
    prompt = _ids(1, batch=1)
    ref = hf_greedy(case.hf, prompt, NEW_TOKENS)
    ours = r1kit_greedy(case.ours, prompt, NEW_TOKENS)
    assert ours.tolist() == ref.tolist()
    assert len(set(ref[0].tolist())) > 1, "degenerate continuation: the test would prove nothing"


@pytest.mark.parametrize("case", MLA_CASES[:1] + ["deepseek_v2-group"], indirect=True)
@torch.no_grad()
def test_routing_is_exercised(case):
    """The checks above are only meaningful if routing matters: other experts give other logits."""
    ids = _ids(0)
    base = case.ours(ids)
    moe = case.ours.layers[1].mlp
    saved = moe.gate.weight.detach().clone()
    try:
        moe.gate.weight.copy_(saved.roll(1, dims=0))  # expert e now scores as e - 1 did
        assert (case.ours(ids) - base).abs().max() > 1e-2
    finally:
        moe.gate.weight.copy_(saved)
    if moe.gate.e_score_correction_bias is not None:  # the V3 bias was loaded and changes the choice
        bias = moe.gate.e_score_correction_bias.clone()
        assert bias.abs().max() > 0.1
        try:
            moe.gate.e_score_correction_bias.zero_()
            assert (case.ours(ids) - base).abs().max() > 1e-2
        finally:
            moe.gate.e_score_correction_bias.copy_(bias)


@pytest.mark.parametrize("case", ["qwen2", "deepseek_v3-yarn", "deepseek_v2-group"], indirect=True)
@torch.no_grad()
def test_left_padded_batch_generation_matches(case):
    """A left-padded batch: HF with an attention mask, r1kit with the cache's pad counts."""
    _set_impl(case.ours, "auto")
    lengths = (7, 15, 11)
    width, n = max(lengths), 12
    prompts = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(prompts)
    for i, length in enumerate(lengths):
        prompts[i, width - length:] = _ids(30 + i, batch=1, length=length)[0]
        mask[i, width - length:] = 1
    ref = case.hf.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0)[:, width:]
    cache = case.ours.new_cache(len(lengths), width + n, pad=torch.tensor([width - x for x in lengths]))
    logits = case.ours(prompts, cache=cache, last_only=True)
    out = []
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = case.ours(out[-1], cache=cache)
    assert torch.cat(out, dim=1).tolist() == ref.tolist()


@pytest.mark.parametrize("case", list(CASES), indirect=True)
@torch.no_grad()
def test_r1kit_saved_checkpoint_loads_in_transformers(case, tmp_path):
    """The other direction: what r1kit writes (config.json included) is a checkpoint transformers reads."""
    from r1kit.checkpoint import save_model

    save_model(case.ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids(2)
    torch.testing.assert_close(hf(ids).logits, case.hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(num_mtp_layers=1),  # transformers ignores the MTP layer r1kit writes as layers.<num_layers>
    dict(arch="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
         num_mtp_layers=0),
], ids=["deepseek_v3-mtp", "deepseek_v2"])
@torch.no_grad()
def test_r1kit_native_model_loads_in_transformers(make_model, tmp_path, overrides):
    """A model r1kit made from a preset (no Hugging Face config behind it) saves as a valid HF checkpoint."""
    from r1kit.checkpoint import save_model

    model = make_model("tiny-moe", max_position_embeddings=256, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1, mscale=0.707,
        mscale_all_dim=1.0), **overrides)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(2, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=ATOL, rtol=0)
