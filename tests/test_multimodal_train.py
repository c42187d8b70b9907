"""The nano-vl recipe end to end on its smoke config (a few steps): staged training, resume, the saved folder,
R1Model.chat with image / audio / DICOM content parts (reply.modality_weights), errors naming the part, and
`r1kit chat --image/--audio/--dicom`."""

from __future__ import annotations

import io
import os
import shutil
import wave

import numpy as np
import pytest

from r1kit.multimodal import data as D

pytestmark = pytest.mark.skipif(D.espeak_binary() is None and not os.environ.get("R1KIT_REQUIRE_ESPEAK"),
                                reason="espeak-ng is not installed (sh scripts/install_espeak.sh)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from r1kit.multimodal.train import VLRecipe, train_vl

    out = tmp_path_factory.mktemp("nano-vl-smoke")
    recipe = VLRecipe.from_yaml("configs/nano-vl-smoke.yaml")
    recipe.out_dir = str(out)
    return recipe, train_vl(recipe)


@pytest.fixture(scope="module")
def model(run):
    from r1kit.api import R1Model

    return R1Model.from_pretrained(run[1], device="cpu", dtype="fp32")


def test_staged_run_logs_resumes_and_saves(run):
    from r1kit.multimodal.train import VLRecipe, train_vl
    from r1kit.train.config import TrainConfigError

    recipe, final = run
    rows = (final.parent / "metrics.jsonl").read_text().splitlines()
    assert [r.split('"stage": "')[1].split('"')[0] for r in rows] == ["align"] * 2 + ["instruct"] * 2
    assert '"match": ' in rows[0] and '"match": ' not in rows[-1]  # the image-caption match loss where asked
    assert (final / "multimodal" / "encoders.safetensors").is_file() and (final / "loss.png").is_file()
    before = (final / "model.safetensors").read_bytes()
    assert train_vl(recipe, resume=True) == final  # everything done: only re-finalised
    assert (final / "model.safetensors").read_bytes() == before
    with pytest.raises(TrainConfigError, match=r"stages\[0\]: unknown key\(s\) \['stepz'\]"):
        from r1kit.train.config import build_dataclass

        build_dataclass(VLRecipe, {"stages": [{"stepz": 3}]}, "x").stage_list()


def test_init_from_loads_matching_weights_and_leaves_the_rest_fresh(run):
    """A second recipe starting from the first's model: same-shaped weights loaded (language model, audio
    encoder), the init_fresh prefixes and a changed image encoder (conv stem) left as initialised."""
    import torch

    from r1kit.multimodal.model import VisionAudioLM
    from r1kit.multimodal.train import build, init_weights

    recipe, final = run
    base = VisionAudioLM.from_pretrained(final)
    recipe2 = type(recipe)(**{**vars(recipe), "init_from": str(final), "init_fresh": ["projectors.image"]})
    recipe2.multimodal = {**recipe.multimodal, "image": {**recipe.multimodal["image"], "stem": "conv"}}
    vl, tokenizer = build(recipe2)
    assert tokenizer.vocab_size == base.lm.config.vocab_size  # the base model's tokenizer
    fresh = init_weights(vl, final, recipe2.init_fresh)
    assert "encoders.image.stem.0.weight" in fresh and "encoders.image.patch_embed.weight" in fresh
    assert "projectors.image.fc1.weight" in fresh and not any(k.startswith(("lm.", "encoders.audio")) for k in fresh)
    torch.testing.assert_close(vl.lm.embed_tokens.weight, base.lm.embed_tokens.weight)
    torch.testing.assert_close(vl.encoders["audio"].frame_embed.weight, base.encoders["audio"].frame_embed.weight)
    assert not torch.equal(vl.projectors["image"].fc1.weight, base.projectors["image"].fc1.weight)


def test_chat_with_image_audio_and_dicom_parts(model):
    from pydicom.data import get_testdata_file

    digit = np.zeros((8, 8), np.uint8)
    digit[2:6, 3:5] = 255
    reply = model.chat([{"role": "user", "content": [{"type": "image", "image": digit},
                                                     {"type": "audio", "audio": np.zeros(8000, np.float32),
                                                      "sample_rate": 16000},
                                                     {"type": "text", "text": "Same digit?"}]}],
                       max_new_tokens=4, temperature=0)
    w = reply.modality_weights
    assert set(w) == {"text", "image", "audio"} and sum(w.values()) == pytest.approx(1.0, abs=1e-3)
    assert reply.completion_tokens <= 4 and isinstance(reply.content, str)
    dicom = model.chat([{"role": "user", "content": [{"type": "dicom", "path": get_testdata_file("CT_small.dcm")},
                                                     {"type": "text", "text": "What is this?"}]}],
                       max_new_tokens=2, temperature=0)
    assert dicom.modality_weights["audio"] == 0.0 and dicom.modality_weights["image"] > 0


def test_bad_parts_are_named(model):
    from r1kit.multimodal import MediaError

    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[1\]: not an image format"):
        model.chat([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image", "image": b"not a png"}]}], max_new_tokens=2)
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[0\]: unknown content part type 'video'"):
        model.chat([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}], max_new_tokens=2)
    with pytest.raises(MediaError, match="only user messages may carry media"):
        model.chat([{"role": "assistant", "content": [{"type": "image", "image": np.zeros((8, 8))}]}])


def test_cli_chat_with_attachments(run, tmp_path, monkeypatch, capsys):
    from r1kit.__main__ import main

    wav = tmp_path / "clip.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
        w.writeframes((np.sin(np.arange(11025) / 5) * 8000).astype("<i2").tobytes())
    from PIL import Image

    png = tmp_path / "digit.png"
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(png)
    monkeypatch.setattr("sys.stdin", io.StringIO("What did the speaker say?\n"))
    assert main(["chat", str(run[1]), "--device", "cpu", "--image", str(png), "--audio", str(wav),
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert "[modality weights: {'text':" in capsys.readouterr().out
    text_only = tmp_path / "text-only"
    shutil.copytree(run[1], text_only, ignore=shutil.ignore_patterns("multimodal"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(text_only), "--device", "cpu", "--image", str(png), "--max-new-tokens", "2"]) == 2
    assert "is text-only: it has no image or audio encoder" in capsys.readouterr().err
