"""LoRA adapters against the real `peft` package: an r1kit adapter loads in PEFT with the same logits, and a PEFT
adapter loads in r1kit with the same logits (tiny random Qwen2 and Llama checkpoints written by transformers)."""

from __future__ import annotations

import json

import pytest
import torch

from r1kit.checkpoint import load_model
from r1kit.lora import LoRAConfig, inject_lora, load_adapter, lora_modules, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
ATOL = 1e-4
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0,
               num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "llama": lambda: transformers.LlamaConfig(**_COMMON, rms_norm_eps=1e-5),
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory, randomize_weights):
    """(architecture, folder) of a tiny random HF checkpoint."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), attn_implementation="eager")
    randomize_weights(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, path


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_r1kit_adapter_loads_in_peft(checkpoint, tmp_path):
    """r1kit writes the adapter (nonzero B, rank 4, alpha 8, a subset of layers by regex); PEFT applies it to the
    transformers model and gives r1kit's logits; the keys are PEFT's."""
    _, path = checkpoint
    ours = load_model(path)
    base = ours(_ids())
    torch.manual_seed(1)
    adapted = inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=r"layers\.1\.(self_attn|mlp)\.\w+_proj$"))
    adapted += inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="second")
    for _, m in lora_modules(ours):
        for p in m.lora_B.parameters():
            p.normal_(0, 0.2)
    ours_logits = ours(_ids())  # adapter "second" is the active one; save "default"
    from r1kit.lora import set_adapter

    set_adapter(ours, "default")
    ours_logits = ours(_ids())
    assert (ours_logits - base).abs().max() > 1e-2  # the adapter changes the output: the test can fail
    save_adapter(ours, tmp_path, base_model=str(path))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert not any("layers.0." in k for k in keys) and len(keys) == 2 * 7
    peft_model = peft.PeftModel.from_pretrained(_hf(path), tmp_path).eval()
    theirs = peft_model(_ids()).logits
    torch.testing.assert_close(theirs, ours_logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_peft_adapter_loads_in_r1kit(checkpoint, tmp_path):
    """PEFT writes adapters (random A and B; a list of targets, and rsLoRA with a rank pattern on lm_head included);
    r1kit loads them and gives PEFT's logits."""
    arch, path = checkpoint
    cases = {
        "list": dict(r=4, lora_alpha=16, target_modules=ALL),
        "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj", "lm_head"],
                       rank_pattern={"lm_head": 2}, alpha_pattern={"down_proj": 3}),
    }
    for name, kwargs in cases.items():
        torch.manual_seed(2)
        peft_model = peft.get_peft_model(_hf(path), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
        folder = tmp_path / name
        peft_model.save_pretrained(folder)
        theirs = peft_model(_ids()).logits
        ours = load_model(path)
        modules = load_adapter(ours, folder)
        assert len(modules) == {"list": 14, "rslora": 5}[name]
        torch.testing.assert_close(ours(_ids()), theirs, atol=ATOL, rtol=0, msg=f"{arch} {name}")


def test_adapter_config_is_peft_readable(checkpoint, tmp_path):
    """The adapter_config.json r1kit writes is a valid peft.LoraConfig with the right fields."""
    _, path = checkpoint
    ours = load_model(path)
    inject_lora(ours, LoRAConfig(r=2, alpha=4, dropout=0.1, target_modules=["o_proj"]))
    save_adapter(ours, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert (cfg.peft_type, cfg.r, cfg.lora_alpha, cfg.lora_dropout) == ("LORA", 2, 4, 0.1)
    assert set(cfg.target_modules) == {"o_proj"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
