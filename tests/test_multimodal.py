"""r1kit.multimodal's model pieces against independent references: log-mel vs numpy, the ViT patch embedding vs
unfolded patches, the projector vs transformers' LLaVA projector, InfoNCE vs a float64 hand computation, the
gate's weights, exact placeholder expansion and merging, and the text-only path unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from r1kit.model.config import preset
from r1kit.model.transformer import Transformer
from r1kit.multimodal import (
    AudioEncoderConfig,
    ContrastiveLoss,
    GateConfig,
    ImageEncoderConfig,
    LogMel,
    Media,
    MissingEncoderError,
    ModalityGate,
    MultimodalConfig,
    PlaceholderMismatchError,
    Projector,
    VisionAudioLM,
    ViTEncoder,
)
from r1kit.multimodal.prompt import add_media_tokens, insert_placeholders, placeholder_ids
from r1kit.tokenizer import USER_TAG, Tokenizer
from r1kit.train.config import TrainConfigError

IMAGE = ImageEncoderConfig(image_size=8, patch_size=4, dim=16, layers=1, heads=2)
AUDIO = AudioEncoderConfig(n_mels=16, frames_per_token=8, dim=16, layers=1, heads=2, num_tokens=3)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return add_media_tokens(Tokenizer.from_dir("r1kit/nano"))


def tiny_vl(tokenizer: Tokenizer, image=IMAGE, audio=AUDIO, gate: str = "learned") -> VisionAudioLM:
    torch.manual_seed(0)
    lm = Transformer(preset("tiny-dense", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1,
                            intermediate_size=64, num_heads=2, num_kv_heads=1)).init_weights(0)
    vl = VisionAudioLM(lm, MultimodalConfig(image=image, audio=audio, gate=GateConfig(mode=gate)),
                       placeholder_ids(tokenizer)).eval()
    with torch.no_grad():  # a gate that is not uniform
        vl.gate.score.weight.normal_(0, 1.0)
        vl.gate.bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
    return vl


# ---------------------------------------------------------------------------------------------------- encoders


def numpy_logmel(x: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """Hand log-mel: reflect padding, periodic Hann frames, |rfft|^2, HTK triangular filters, log(+1e-6)."""
    pad = np.pad(x, n_fft // 2, mode="reflect")
    frames = np.stack([pad[i:i + n_fft] for i in range(0, len(pad) - n_fft + 1, hop)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (F, n_fft/2 + 1)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(0), mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m:m + 3]
        for k, f in enumerate(freqs):
            if lo <= f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f <= hi:
                fb[k, m] = (hi - f) / (hi - c)
    return np.log(power @ fb + 1e-6)


def test_logmel_matches_numpy():
    cfg = AudioEncoderConfig(n_fft=256, hop_length=80, n_mels=20, sample_rate=8000)
    t = np.arange(2000) / 8000
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.random.default_rng(0).standard_normal(2000)).astype(np.float32)
    ours = LogMel(cfg)(torch.from_numpy(x)[None])[0].double().numpy()
    ref = numpy_logmel(x.astype(np.float64), 8000, 256, 80, 20)
    assert ours.shape == ref.shape == (2000 // 80 + 1, 20)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)


def test_vit_patch_embedding_is_a_linear_map_of_each_patch():
    enc = ViTEncoder(IMAGE)
    x = torch.rand(2, 1, 8, 8)
    p = IMAGE.patch_size
    patches = x.unfold(2, p, p).unfold(3, p, p).reshape(2, -1, p * p)  # (B, N, p*p), row-major patches
    ref = patches @ enc.patch_embed.weight.reshape(IMAGE.dim, -1).T + enc.patch_embed.bias
    torch.testing.assert_close(enc.patchify(x), ref, atol=1e-5, rtol=1e-5)
    assert enc(x).shape == (2, IMAGE.num_tokens, IMAGE.dim)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        enc(torch.rand(2, 1, 7, 8))


def test_projector_equals_transformers_llava_projector():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    hf_cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, num_attention_heads=2),
                         text_config=LlamaConfig(hidden_size=24, num_attention_heads=2),
                         projector_hidden_act="gelu", vision_feature_layer=-1)
    ref = LlavaMultiModalProjector(hf_cfg)
    ours = Projector(16, 24)
    ours.fc1.load_state_dict(ref.linear_1.state_dict())
    ours.fc2.load_state_dict(ref.linear_2.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), ref(x))


def test_audio_encoder_pads_and_pools_to_num_tokens():
    from r1kit.multimodal import AudioEncoder

    enc = AudioEncoder(AUDIO).eval()
    long, short = torch.randn(16000), torch.randn(3000)
    both = enc([long, short])
    assert both.shape == (2, AUDIO.num_tokens, AUDIO.dim)
    torch.testing.assert_close(both[1], enc([short])[0], atol=1e-4, rtol=1e-4)  # padding does not leak in
    torch.testing.assert_close(enc([0.1 * short])[0], enc([short])[0], atol=1e-3, rtol=1e-3)  # loudness-invariant


# ---------------------------------------------------------------------------------------------------- loss, gate


def test_infonce_matches_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    loss_fn = ContrastiveLoss()
    assert float(loss_fn.scale) == pytest.approx(1 / 0.07, rel=1e-5)
    A, B = a.double().numpy(), b.double().numpy()
    A, B = A / np.linalg.norm(A, axis=1, keepdims=True), B / np.linalg.norm(B, axis=1, keepdims=True)
    s = 1 / 0.07
    rows = [-(s * A[i] @ B[i]) + math.log(sum(math.exp(s * A[i] @ B[j]) for j in range(4))) for i in range(4)]
    cols = [-(s * A[j] @ B[j]) + math.log(sum(math.exp(s * A[i] @ B[j]) for i in range(4))) for j in range(4)]
    assert float(loss_fn(a, b)) == pytest.approx((np.mean(rows) + np.mean(cols)) / 2, rel=1e-5)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    assert float(loss_fn.scale) == pytest.approx(100.0)  # clamped
    loss_fn(a, b).backward()
    assert loss_fn.logit_scale.grad == 0  # at the clamp: no push beyond it
    with pytest.raises(ValueError, match="shape"):
        loss_fn(a, b[:3])


def test_gate_weights_sum_to_one_and_fixed_and_ablate():
    torch.manual_seed(0)
    pooled = torch.randn(3, 3, 8)
    present = torch.tensor([[True, True, True], [True, False, True], [True, False, False]])
    gate = ModalityGate(8, GateConfig())
    with torch.no_grad():
        gate.score.weight.normal_()
    w = gate(pooled, present)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w[~present] == 0).all() and w[2, 0] == 1.0
    assert not torch.allclose(w[0], torch.full((3,), 1 / 3))
    fixed = ModalityGate(8, GateConfig(mode="fixed"))(pooled, present)
    torch.testing.assert_close(fixed[0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(fixed[1], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(gate.scales(fixed, present), present.float())  # equal weights: embeddings unchanged
    ablated = ModalityGate(8, GateConfig(mode="fixed", ablate=["audio"]))(pooled, present)
    torch.testing.assert_close(ablated[1], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(TrainConfigError, match="gate.ablate"):
        GateConfig(ablate=["smell"])
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['layerz'\]"):
        MultimodalConfig.from_dict({"image": {"layerz": 2}})


# ---------------------------------------------------------------------------------------------------- placeholders


def test_placeholder_expansion_and_merge_are_exact(tokenizer):
    vl = tiny_vl(tokenizer)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Same digit?"}], add_generation_prompt=True)
    ids2, mask = insert_placeholders(ids, [0] * len(ids), [["image", "audio"]], tokenizer,
                                     {"image": vl.num_tokens("image"), "audio": vl.num_tokens("audio")})
    n_img, n_aud = IMAGE.num_tokens, AUDIO.num_tokens
    tag = ids.index(tokenizer.token_to_id(USER_TAG))
    slots = placeholder_ids(tokenizer)
    assert ids2 == ids[:tag + 1] + [slots["image"]] * n_img + [slots["audio"]] * n_aud + ids[tag + 1:]
    assert mask == [0] * len(ids2)
    image, wave = torch.rand(1, 8, 8), torch.randn(4000)
    x = torch.tensor([ids2])
    embeds, weights = vl.embed(x, [[Media("image", image), Media("audio", wave)]])
    scale = vl.gate.scales(weights, torch.ones(1, 3, dtype=torch.bool))[0]  # (M,)
    start = tag + 1
    with torch.no_grad():
        img_tokens, aud_tokens = vl.encode("image", [image])[0], vl.encode("audio", [wave])[0]
        text = vl.lm.embed_tokens(x)[0]
    torch.testing.assert_close(embeds[0, start:start + n_img], img_tokens * scale[1])
    torch.testing.assert_close(embeds[0, start + n_img:start + n_img + n_aud], aud_tokens * scale[2])
    torch.testing.assert_close(embeds[0, :start], text[:start] * scale[0])
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_text_only_path_is_unchanged(tokenizer):
    vl = tiny_vl(tokenizer)
    x = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)])
    embeds, weights = vl.embed(x, [[]])
    assert torch.equal(embeds, vl.lm.embed_tokens(x)) and weights[0].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(vl.lm(x, inputs_embeds=embeds), vl.lm(x))


def test_count_mismatch_and_missing_encoder_name_the_part(tokenizer):
    vl = tiny_vl(tokenizer)
    slot = placeholder_ids(tokenizer)["image"]
    x = torch.tensor([[0, slot, slot, 5]])  # 2 placeholders, an image needs 4
    with pytest.raises(PlaceholderMismatchError, match=r"1 image attachment\(s\) need 4 image placeholder tokens"):
        vl.embed(x, [[Media("image", torch.rand(1, 8, 8))]])
    with pytest.raises(PlaceholderMismatchError, match="0 image attachment"):
        vl.embed(x, [[]])
    no_audio = tiny_vl(tokenizer, audio=None)
    with pytest.raises(MissingEncoderError, match="no audio encoder"):
        no_audio.embed(torch.tensor([[0, 5]]), [[Media("audio", torch.randn(100))]])


def test_bundled_nano_vl_reads_held_out_digits():
    from r1kit.api import R1Model
    from r1kit.multimodal.data import digit_images

    m = R1Model.from_pretrained("r1kit/nano-vl", device="cpu", dtype="fp32")
    x, y = digit_images("test")
    hits = 0
    for i in range(4):  # the bundle reads 93.9% of all 297 (README); these four are among those it gets right
        reply = m.chat([{"role": "user", "content": [{"type": "image", "image": x[i, 0].numpy()},
                                                     {"type": "text", "text": "What digit is this?"}]}],
                       temperature=0, max_new_tokens=24)
        hits += reply.content == str(int(y[i]))
        assert sum(reply.modality_weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert hits == 4


# ---------------------------------------------------------------------------------------------------- per-token gate


def test_per_token_gate_weighs_every_position(tokenizer):
    """per_token: each position's weights sum to one over the present modalities, starts as the fixed gate, and
    scales every position by its own modality's weight x the number present (hand computation); a text-only row
    is untouched; fixed and ablate keep their per-sample behaviour."""
    torch.manual_seed(0)
    x, present = torch.randn(2, 5, 8), torch.tensor([[True, True, False], [True, False, False]])
    gate = ModalityGate(8, GateConfig(mode="per_token"))
    torch.testing.assert_close(gate.token_weights(x, present)[0], torch.tensor([[0.5, 0.5, 0.0]] * 5))  # at init
    with torch.no_grad():
        gate.token_score.weight.normal_()
    w = gate.token_weights(x, present)  # (B, T, M)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    assert (w[0, :, 2] == 0).all() and (w[1, :, 0] == 1).all() and w[0, :, 0].std() > 0.01  # varies by position
    ref = torch.softmax(nn_layer_norm(x[0]) @ gate.token_score.weight[:2].T + gate.token_score.bias[:2], -1)
    torch.testing.assert_close(w[0, :, :2], ref, atol=1e-5, rtol=1e-5)
    ablated = ModalityGate(8, GateConfig(mode="per_token", ablate=["image"]))
    assert (ablated.token_weights(x, present)[0] == torch.tensor([1.0, 0.0, 0.0])).all()

    vl = tiny_vl(tokenizer, gate="per_token")
    with torch.no_grad():
        vl.gate.token_score.weight.normal_(0, 1.0)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Which digit?"}], add_generation_prompt=True)
    ids, _ = insert_placeholders(ids, [0] * len(ids), [["image"]], tokenizer, {"image": vl.num_tokens("image")})
    image, x_ids = torch.rand(1, 8, 8), torch.tensor([ids])
    embeds, weights = vl.embed(x_ids, [[Media("image", image)]])
    with torch.no_grad():
        raw = vl.lm.embed_tokens(x_ids)[0]
        slots = x_ids[0] == placeholder_ids(tokenizer)["image"]
        raw[slots] = vl.encode("image", [image])[0]
        tw = torch.softmax(nn_layer_norm(raw, vl.gate.norm) @ vl.gate.token_score.weight[:2].T
                           + vl.gate.token_score.bias[:2] + vl.gate.bias[:2], -1)  # (T, 2): text, image
    own = torch.where(slots, tw[:, 1], tw[:, 0])  # each position's own modality's weight
    torch.testing.assert_close(embeds[0], raw * (2 * own)[:, None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights[0], torch.cat([tw.mean(0), torch.zeros(1)]), atol=1e-5, rtol=1e-5)
    text = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)])
    assert torch.equal(vl.embed(text, [[]])[0], vl.lm.embed_tokens(text))
    with pytest.raises(TrainConfigError, match="gate.mode"):
        GateConfig(mode="per_pixel")


def nn_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """Hand LayerNorm over the last dimension (eps 1e-5), with norm's affine parameters when given."""
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return y if norm is None else y * norm.weight + norm.bias


def test_conv_stem_vit_and_affine_jitter():
    """stem conv: a 3x3 convolution (checked against unfolded 3x3 windows), GELU, then the patch embedding; the
    affine jitter at zero strength is the identity and stays in [0, 1]."""
    from r1kit.multimodal.data import jitter_images

    cfg = ImageEncoderConfig(image_size=8, patch_size=2, dim=16, layers=1, heads=2, stem="conv", stem_channels=4)
    enc = ViTEncoder(cfg)
    x = torch.rand(2, 1, 8, 8)
    windows = torch.nn.functional.unfold(x, 3, padding=1)  # (B, 9, 64)
    conv = enc.stem[0].weight.reshape(4, 9) @ windows + enc.stem[0].bias[:, None]  # (B, 4, 64)
    feats = torch.nn.functional.gelu(conv).reshape(2, 4, 8, 8)
    patches = feats.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 16)  # (B, N, S*p*p)
    ref = patches @ enc.patch_embed.weight.reshape(16, -1).T + enc.patch_embed.bias
    torch.testing.assert_close(enc.patchify(x), ref, atol=1e-5, rtol=1e-5)
    assert enc(x).shape == (2, 16, 16)
    two = ViTEncoder(ImageEncoderConfig(**{**vars(cfg), "stem_layers": 2}))
    assert [type(m).__name__ for m in two.stem] == ["Conv2d", "GELU"] * 2 and two(x).shape == (2, 16, 16)
    with pytest.raises(TrainConfigError, match="image.stem"):
        ImageEncoderConfig(stem="resnet")
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(jitter_images(x, g, 0.0, 0.0, 0.0), x, atol=1e-6, rtol=0)
    j = jitter_images(x, g)
    assert j.shape == x.shape and 0 <= j.min() and j.max() <= 1 and not torch.allclose(j, x)


def test_trainable_parts_by_modality(tokenizer):
    """A stage may train one modality's encoder or projector ("projectors.image"); everything else is frozen."""
    from r1kit.multimodal.train import StageSection, trainable

    vl = tiny_vl(tokenizer)
    params = trainable(vl, ["projectors.image", "contrastive"])
    names = {n for n, p in vl.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in vl.named_parameters() if n.startswith("projectors.image.")} | {
        "contrastive.logit_scale"}
    assert len(params) == len(names)
    with pytest.raises(TrainConfigError, match=r"unknown part\(s\) \['projectors.smell'\]"):
        StageSection(train=["projectors.smell"])


def test_nano_vl_recipes_load_and_the_bundle_is_the_vision_recipes_model():
    """Every nano-vl recipe parses (nested keys checked); the bundled model's multimodal config is
    configs/nano-vl-vision.yaml's, which starts from configs/nano-vl.yaml's language model."""
    import json
    from pathlib import Path

    from r1kit.multimodal.train import VLRecipe

    recipes = {p.stem: VLRecipe.from_yaml(p) for p in sorted(Path("configs").glob("nano-vl*.yaml"))}
    assert {"nano-vl", "nano-vl-vision", "nano-vl-pertoken", "nano-vl-smoke"} <= set(recipes)
    vision = recipes["nano-vl-vision"]
    assert vision.init_from == recipes["nano-vl"].out_dir + "/final" and vision.model == recipes["nano-vl"].model
    bundled = json.loads(Path("r1kit/nano-vl/multimodal/multimodal.json").read_text())["config"]
    assert bundled == vision.multimodal_config().to_dict()
    assert recipes["nano-vl-pertoken"].multimodal_config().gate.mode == "per_token"
