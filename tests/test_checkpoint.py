"""Checkpoints: save/load round trips, sharding, bf16, FP8 dequantisation, and errors that name the culprit."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import r1kit.checkpoint as ckpt
from r1kit.checkpoint import (
    FP32_TENSORS,
    CheckpointError,
    load_model,
    read_config,
    save_model,
)
from r1kit.fp8 import dequantize_blocks, quantize_blocks
from r1kit.model.config import ConfigError, ModelConfig, preset
from r1kit.model.transformer import Transformer

F8 = torch.float8_e4m3fn
F8_MAX = torch.finfo(F8).max  # 448


def _ids(shape, seed=0):
    return torch.randint(2, 512, shape, generator=torch.Generator().manual_seed(seed))


def _cfg_dict(cfg: ModelConfig) -> dict:
    d = cfg.to_dict()
    d.pop("extra")
    return d


def assert_same_model(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name], sb[name]), name
    assert _cfg_dict(a.config) == _cfg_dict(b.config)


def _no_temp_files(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name, overrides", [
    ("tiny-moe", dict(num_mtp_layers=1)),
    ("tiny-moe", dict(num_mtp_layers=2, q_lora_rank=None, moe_layer_freq=2, num_layers=4)),
    ("tiny-dense", {}),
    ("tiny-dense", dict(tie_word_embeddings=True, arch="qwen2", attention_bias=True)),
], ids=["moe-mtp", "moe-mtp2-fullq", "dense", "qwen2-tied"])
@pytest.mark.parametrize("shard", [None, 48 * 1024], ids=["single", "sharded"])
@torch.no_grad()
def test_round_trip_is_bit_exact(make_model, tmp_path, name, overrides, shard):
    model = make_model(name, **overrides)
    save_model(model, tmp_path, **({} if shard is None else dict(max_shard_bytes=shard)))
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted(["config.json", "model.safetensors.index.json", *shards])
        for f in shards:  # a shard only exceeds the limit when it holds a single tensor
            with safe_open(str(tmp_path / f), "pt") as sf:
                assert (tmp_path / f).stat().st_size < shard + 4096 or len(list(sf.keys())) == 1
    assert _no_temp_files(tmp_path) == []
    loaded = load_model(tmp_path)
    assert_same_model(model, loaded)
    assert len(loaded.mtp) == model.config.num_mtp_layers
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = _ids((2, 9))
    assert torch.equal(loaded(ids), model(ids))


def test_round_trip_keeps_routing_bias_and_config(make_model, tmp_path):
    model = make_model("tiny-moe", routed_scaling_factor=1.75, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
        mscale=0.707, mscale_all_dim=1.0))
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0.1  # randomised by make_model
    save_model(model, tmp_path)
    cfg = read_config(tmp_path)
    assert _cfg_dict(cfg) == _cfg_dict(model.config)
    assert torch.equal(load_model(tmp_path).layers[1].mlp.gate.e_score_correction_bias, bias)


@torch.no_grad()
def test_save_bf16_then_load(make_model, tmp_path):
    model = make_model("tiny-moe")
    save_model(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            want = torch.float32 if FP32_TENSORS.search(k) else torch.bfloat16
            assert f.get_tensor(k).dtype == want, k
    original = model.state_dict()
    as_fp32 = load_model(tmp_path).state_dict()
    as_bf16 = load_model(tmp_path, dtype=torch.bfloat16).state_dict()
    for name, t in original.items():
        if FP32_TENSORS.search(name):  # the router stays fp32 all the way
            assert torch.equal(as_fp32[name], t) and torch.equal(as_bf16[name], t), name
        else:
            assert torch.equal(as_fp32[name], t.bfloat16().float()), name
            assert as_bf16[name].dtype == torch.bfloat16 and torch.equal(as_bf16[name], t.bfloat16()), name
    bf16_model = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16_model(_ids((1, 6))).dtype == torch.bfloat16


@torch.no_grad()
def test_resave_over_sharded_checkpoint_loads_new_weights(make_model, tmp_path):
    old, new = make_model("tiny-dense", seed=0), make_model("tiny-dense", seed=1)
    save_model(old, tmp_path, max_shard_bytes=48 * 1024)
    save_model(new, tmp_path)
    assert_same_model(new, load_model(tmp_path))


# ---------------------------------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_old_checkpoint_and_no_temp_files(make_model, tmp_path, monkeypatch):
    old = make_model("tiny-dense", seed=0)
    save_model(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a half-written file under the temporary name ...
        written.append(Path(filename).name)
        raise OSError("disk full")  # ... then the writer dies

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model("tiny-dense", seed=1), tmp_path)
    assert written and all(w != "model.safetensors" for w in written), "must write to a temporary name"
    assert _no_temp_files(tmp_path) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert_same_model(old, load_model(tmp_path))


# ---------------------------------------------------------------------------------------------------- FP8


def ref_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent block quantiser: one scale per 128x128 block (edge blocks partial), scale = amax / 448 (1 for an
    all-zero block), q = w / scale in e4m3."""
    o, i = w.shape
    scales = torch.empty(math.ceil(o / block), math.ceil(i / block))
    q = torch.empty(o, i, dtype=F8)
    for a in range(scales.shape[0]):
        for b in range(scales.shape[1]):
            blk = w[a * block:(a + 1) * block, b * block:(b + 1) * block].float()
            amax = blk.abs().max().item()
            s = amax / F8_MAX if amax > 0 else 1.0
            scales[a, b] = s
            q[a * block:(a + 1) * block, b * block:(b + 1) * block] = (blk / s).to(F8)
    return q, scales


def ref_dequantize(q: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for a in range(scales.shape[0]):
        for b in range(scales.shape[1]):
            sl = (slice(a * block, (a + 1) * block), slice(b * block, (b + 1) * block))
            out[sl] = q[sl].float() * scales[a, b]
    return out


# hidden 160 > 128: blocks at the edges are partial in one or both dimensions
FP8_TENSORS = {
    "model.layers.0.mlp.gate_proj.weight": (128, 160),  # dense MLP: 1x2 blocks
    "model.layers.0.self_attn.o_proj.weight": (160, 64),  # 2x1
    "model.layers.1.mlp.experts.3.down_proj.weight": (160, 32),  # one slice of a stacked expert tensor
    "model.layers.1.mlp.experts.5.up_proj.weight": (32, 160),  # the second half of a gate_up stack
    "lm_head.weight": (512, 160),  # 4x2
    "model.layers.3.eh_proj.weight": (160, 320),  # MTP layer: 2x3
}


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A tiny-moe checkpoint (hidden 160, MTP) in which FP8_TENSORS are float8 + weight_scale_inv."""
    model = Transformer(preset("tiny-moe", hidden_size=160)).init_weights(3)
    path = tmp_path_factory.mktemp("fp8")
    save_model(model, path)
    tensors = load_file(str(path / "model.safetensors"))
    expected = {}
    for name, shape in FP8_TENSORS.items():
        w = tensors[name]
        assert tuple(w.shape) == shape
        q, s = ref_quantize(w)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        expected[name] = ref_dequantize(q, s)
        assert not torch.equal(expected[name], w)  # quantisation really changed the weight
    save_file(tensors, str(path / "model.safetensors"))
    hf = json.loads((path / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(hf))
    return path, model, expected


def test_fp8_weights_are_dequantised_exactly(fp8_checkpoint):
    path, model, expected = fp8_checkpoint
    loaded = load_model(path)
    sd = loaded.state_dict()
    got = {
        "model.layers.0.mlp.gate_proj.weight": sd["layers.0.mlp.gate_proj.weight"],
        "model.layers.0.self_attn.o_proj.weight": sd["layers.0.self_attn.o_proj.weight"],
        "model.layers.1.mlp.experts.3.down_proj.weight": sd["layers.1.mlp.experts.down_proj"][3],
        "model.layers.1.mlp.experts.5.up_proj.weight": sd["layers.1.mlp.experts.gate_up_proj"][5, 32:],
        "lm_head.weight": sd["lm_head.weight"],
        "model.layers.3.eh_proj.weight": sd["mtp.0.eh_proj.weight"],
    }
    for name, want in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want), name
    # every other tensor is untouched, the other half of the gate_up stack included
    orig = model.state_dict()
    gate_up = "layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(sd[gate_up][5, :32], orig[gate_up][5, :32])
    assert torch.equal(sd[gate_up][:5], orig[gate_up][:5])
    assert torch.equal(sd["layers.0.self_attn.kv_b_proj.weight"], orig["layers.0.self_attn.kv_b_proj.weight"])
    assert loaded(_ids((1, 5))).isfinite().all()


def test_fp8_without_scale_names_the_tensor(fp8_checkpoint, tmp_path):
    path, _, _ = fp8_checkpoint
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.0.self_attn.o_proj.weight")):
        load_model(tmp_path)


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (64, 257)])
def test_quantize_fp8_round_trip(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, 0] = 3.0  # one outlier: its block gets a coarser scale
    q, s = quantize_blocks(w)
    assert q.dtype == F8 and q.shape == w.shape
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    back = dequantize_blocks(q, s)
    assert back.dtype == torch.float32 and back.shape == w.shape
    assert (back - w).norm() / w.norm() < 0.07
    # per element: 3 mantissa bits (relative step 1/16) above the subnormal range of each block
    step = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]] * 2.0**-9
    assert ((back - w).abs() <= w.abs() / 16 + step).all()
    # and it agrees with the independent quantiser
    rq, rs = ref_quantize(w)
    assert torch.equal(s.float(), rs) and torch.equal(q.float(), rq.float())
    assert torch.equal(back, ref_dequantize(rq, rs))


def test_fp8_scale_of_the_wrong_shape_names_the_tensor(fp8_checkpoint, tmp_path):
    q, _ = quantize_blocks(torch.randn(200, 130))
    with pytest.raises(ValueError, match=r"\(1, 2\).*200x130"):
        dequantize_blocks(q, torch.ones(1, 2))
    path, _, _ = fp8_checkpoint
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    name = "model.layers.0.mlp.gate_proj.weight"  # 128 x 160: 1 x 2 blocks
    _edit_tensors(tmp_path, lambda t: t.__setitem__(name + "_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*\(1, 1\).*128x160"):
        load_model(tmp_path)


@torch.no_grad()
def test_fp8_users_agree_with_the_hand_written_reference(tmp_path):
    """Checkpoint saving and loading (DeepSeek's format, `r1kit convert --dtype fp8`), `r1kit quantize --to fp8` with
    blocks and FP8 training all quantize a weight as `ref_quantize` does: same codes, scales and dequantized values."""
    from r1kit.quant import Float8WeightLinear
    from r1kit.train.fp8 import FP8Linear

    model = Transformer(preset("tiny-moe", hidden_size=160))
    linear = model.init_weights(1).layers[0].mlp.gate_proj  # (128, 160): one full and one partial block
    linear.weight.mul_(torch.logspace(-3, 1, 160))  # blocks of different ranges
    linear.weight[:, 128:] = 0  # and an all-zero one
    ref_q, ref_s = ref_quantize(linear.weight)
    ref_w = ref_dequantize(ref_q, ref_s)
    assert ref_s[0, 1] == 1.0 and not torch.equal(ref_w, linear.weight)

    save_model(model, tmp_path, fp8=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored_q = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
        stored_s = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
    assert torch.equal(stored_q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(stored_s, ref_s)
    assert torch.equal(load_model(tmp_path).layers[0].mlp.gate_proj.weight, ref_w)

    quantized = Float8WeightLinear.from_linear(linear, block_size=(128, 128))
    assert torch.equal(quantized.weight.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(quantized.weight_scale, ref_s) and torch.equal(quantized.dequantize(), ref_w)

    eye = torch.eye(160)  # one-hot rows pass through FP8 exactly, so FP8 training's forward returns its weight
    assert torch.equal(FP8Linear(linear)(eye).t(), ref_w)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory):
    """Saved tiny-dense and tiny-moe checkpoints that the bad-input tests copy and break."""
    out = {}
    for name in ("tiny-dense", "tiny-moe"):
        model = Transformer(preset(name)).init_weights(0)
        path = tmp_path_factory.mktemp(name)
        save_model(model, path)
        out[name] = (path, model)
    return out


@pytest.fixture
def broken(good_checkpoints, tmp_path):
    """broken(name) -> a fresh copy of a good checkpoint folder to damage."""

    def copy(name: str = "tiny-dense") -> Path:
        dst = tmp_path / name
        shutil.copytree(good_checkpoints[name][0], dst)
        return dst

    return copy


def _edit_config(path: Path, **changes) -> None:
    hf = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    (path / "config.json").write_text(json.dumps(hf))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_config(broken):
    path = broken()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
        load_model(path)


def test_config_not_json(broken):
    path = broken()
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(CheckpointError, match=r"config\.json.*not valid JSON"):
        load_model(path)


def test_config_not_an_object(broken):
    path = broken()
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(path)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(tmp_path / "nowhere")


def test_unknown_architecture(broken):
    path = broken()
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_model(path)


@pytest.mark.parametrize("changes, field", [
    (dict(num_key_value_heads=3), r"num_k(ey_value|v)_heads"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 0.5}), "rope_scaling"),
])
def test_config_field_out_of_range_is_named(broken, changes, field):
    path = broken()
    _edit_config(path, **changes)
    with pytest.raises((CheckpointError, ConfigError), match=field) as info:
        load_model(path)
    assert "config.json" in str(info.value)


def test_moe_config_field_out_of_range_is_named(broken):
    path = broken("tiny-moe")
    _edit_config(path, topk_group=7)
    with pytest.raises(ConfigError, match=r"config\.json: topk_group = 7: must be in 1\.\.n_group \(4\)"):
        load_model(path)


def test_missing_weights(broken):
    path = broken()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(path)


def test_truncated_safetensors(broken):
    path = broken()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(path)


def test_garbage_safetensors(broken):
    path = broken()
    (path / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


def test_wrong_shape_names_the_tensor(broken):
    path = broken()
    name = "model.layers.1.self_attn.o_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(name, torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*\(64, 32\)"):
        load_model(path)


@pytest.mark.parametrize("which, name", [
    ("tiny-dense", "model.layers.0.mlp.up_proj.weight"),
    ("tiny-dense", "lm_head.weight"),
    ("tiny-moe", "model.layers.1.mlp.experts.6.gate_proj.weight"),
    ("tiny-moe", "model.layers.2.mlp.gate.e_score_correction_bias"),
])
def test_missing_tensor_is_named(broken, which, name):
    path = broken(which)
    _edit_tensors(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_model(path)


@pytest.mark.parametrize("which, name", [
    ("tiny-dense", "model.layers.0.self_attn.rotary_extra.weight"),
    ("tiny-moe", "model.layers.1.mlp.experts.8.up_proj.weight"),  # one expert more than the config says
])
def test_unexpected_tensor_is_named(broken, which, name):
    path = broken(which)
    _edit_tensors(path, lambda t: t.__setitem__(name, torch.zeros(4, 4)))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_model(path)


def test_config_mtp_without_mtp_weights_disables_mtp(broken):
    """HF's DeepSeek-V3 writes num_nextn_predict_layers = 1 but no MTP weights: load the main model."""
    path = broken("tiny-moe")
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    _edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    model = load_model(path)
    assert model.config.num_mtp_layers == 0 and len(model.mtp) == 0
    assert model(_ids((1, 4))).isfinite().all()


def test_partial_mtp_layer_names_the_missing_tensor(broken):
    path = broken("tiny-moe")
    _edit_tensors(path, lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=re.escape("model.layers.3.eh_proj.weight")):
        load_model(path)


def test_missing_shard_is_named(good_checkpoints, tmp_path):
    _, model = good_checkpoints["tiny-dense"]
    save_model(model, tmp_path, max_shard_bytes=48 * 1024)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        load_model(tmp_path)


def test_bad_index_is_named(good_checkpoints, tmp_path):
    _, model = good_checkpoints["tiny-dense"]
    save_model(model, tmp_path, max_shard_bytes=48 * 1024)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------- pickle


def _pickle_checkpoint(good_checkpoints, dst: Path) -> Transformer:
    src, model = good_checkpoints["tiny-dense"]
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return model


def test_pickle_refused_by_default(good_checkpoints, tmp_path):
    path = tmp_path / "pickled"
    _pickle_checkpoint(good_checkpoints, path)
    with pytest.raises(CheckpointError, match="allow_pickle") as info:
        load_model(path)
    assert "pytorch_model.bin" in str(info.value)


def test_pickle_loaded_when_allowed(good_checkpoints, tmp_path):
    path = tmp_path / "pickled"
    model = _pickle_checkpoint(good_checkpoints, path)
    assert_same_model(model, load_model(path, allow_pickle=True))


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_weights_only_even_when_allowed(good_checkpoints, tmp_path):
    path = tmp_path / "evil"
    src, _ = good_checkpoints["tiny-dense"]
    path.mkdir()
    shutil.copy(src / "config.json", path / "config.json")
    marker = tmp_path / "pwned"
    state = load_file(str(src / "model.safetensors"))
    state["payload"] = _RunsCode(marker)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights-only"):
        load_model(path, allow_pickle=True)
    assert not marker.exists(), "the pickle ran code"


@torch.no_grad()
def test_save_fp8_round_trip(make_model, tmp_path):
    """save_model(fp8=True) writes DeepSeek's FP8 format; loading dequantises it back close to the original."""
    model = make_model("tiny-moe", hidden_size=160)
    save_model(model, tmp_path, fp8=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight")
        assert q.dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # kept in high precision
        scale = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv")
    back = load_model(tmp_path)
    w = back.state_dict()["layers.0.self_attn.q_a_proj.weight"]
    assert torch.equal(w, dequantize_blocks(q, scale))
    for name, t in model.state_dict().items():
        err = (back.state_dict()[name] - t).norm() / t.norm().clamp(min=1e-12)
        assert err < 0.07, (name, float(err))
