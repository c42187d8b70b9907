"""r1kit.multimodal media loading and data: images (arrays, PNG, corrupt/truncated/too large), WAV (PCM widths,
truncated, too long), DICOM from pydicom's bundled files (rescale, window, multi-frame, RLE, a codec without a
handler, truncated, no pixel data, de-identification), the digit split and the espeak-ng voices held out."""

from __future__ import annotations

import io
import logging
import os
import wave

import numpy as np
import pytest
import torch

from r1kit.multimodal import data as D
from r1kit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig
from r1kit.multimodal.media import (
    MediaError,
    MediaTooLargeError,
    decode_wav,
    dicom_pixels,
    load_audio,
    load_dicom,
    load_image,
    read_dicom,
    window,
)

IMG = ImageEncoderConfig(max_pixels=200 * 200)
AUD = AudioEncoderConfig(max_seconds=2.0)


def dicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return str(path)


def wav_bytes(x: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
        pcm = np.round(x * scale).astype({1: np.int16, 2: "<i2", 4: "<i4"}[width])
        w.writeframes((pcm + 128).astype(np.uint8).tobytes() if width == 1 else pcm.tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- images


def test_image_arrays_png_and_inversion():
    digit = np.zeros((8, 8), np.uint8)
    digit[2:6, 3:5] = 255
    a = load_image(digit, IMG)
    assert a.shape == (1, 8, 8) and a.max() == 1.0 and a[0, 0, 0] == 0.0
    torch.testing.assert_close(load_image(digit.astype(np.float32) / 255, IMG), a)
    torch.testing.assert_close(load_image(np.repeat(digit[..., None], 3, 2), IMG), a, atol=1e-2, rtol=0)
    torch.testing.assert_close(load_image(255 - digit, IMG), a)  # dark on light is inverted like training data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.kron(digit, np.ones((4, 4), np.uint8))).save(buf, "PNG")  # 32 x 32: area-resized to 8 x 8
    torch.testing.assert_close(load_image(buf.getvalue(), IMG), a)


def test_bad_images_name_the_part(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    with pytest.raises(MediaError, match=r"part 1: corrupt or truncated PNG"):
        load_image(png[:60], IMG, "part 1")
    with pytest.raises(MediaError, match="not an image format"):
        load_image(b"hello world", IMG, "x")
    big = io.BytesIO()
    Image.new("L", (300, 300)).save(big, "PNG")
    with pytest.raises(MediaTooLargeError, match="300 x 300 pixels"):
        load_image(big.getvalue(), IMG)
    with pytest.raises(MediaTooLargeError, match="bytes"):
        load_image(png, ImageEncoderConfig(max_bytes=10))
    with pytest.raises(MediaError, match=r"in \[0, 1\]"):
        load_image(np.full((8, 8), 3.0), IMG)
    with pytest.raises(MediaError, match="2-D"):
        load_image(np.zeros((2, 8, 8, 1)), IMG)
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.png", IMG)


# ---------------------------------------------------------------------------------------------------- audio


def test_wav_decoding_widths_channels_resampling():
    t = np.arange(8000) / 8000
    x = 0.5 * np.sin(2 * np.pi * 300 * t)
    for width in (1, 2, 4):
        y, rate = decode_wav(wav_bytes(x, 8000, width), "clip")
        assert rate == 8000 and np.abs(y - x).max() < 2.0 / (2 ** (8 * width - 1)) + 1e-6
    stereo, _ = decode_wav(wav_bytes(np.repeat(x, 2), 8000, 2, channels=2), "clip")
    np.testing.assert_allclose(stereo, x, atol=1e-4)
    up = load_audio(wav_bytes(x, 8000), AUD)
    assert up.shape == (16000,)  # 1 s at 16 kHz
    same = load_audio(x.astype(np.float32), AUD, sample_rate=16000)
    assert same.shape == (8000,)


def test_bad_audio_names_the_part():
    x = np.zeros(16000)
    data = wav_bytes(x)
    with pytest.raises(MediaError, match=r"part 2: truncated WAV: the header announces 16000 frames"):
        load_audio(data[:-1000], AUD, name="part 2")
    with pytest.raises(MediaError, match="not a PCM WAV"):
        load_audio(b"RIFF....WAVEjunk", AUD)
    with pytest.raises(MediaTooLargeError, match=r"3.0 s of audio, over the limit of 2 s"):
        load_audio(wav_bytes(np.zeros(48000)), AUD)
    with pytest.raises(MediaError, match="sample_rate"):
        load_audio(x, AUD)
    with pytest.raises(MediaError, match="NaN"):
        load_audio(np.full(100, np.nan), AUD, sample_rate=16000)


# ---------------------------------------------------------------------------------------------------- DICOM


def test_dicom_rescale_window_and_deidentification(caplog):
    import pydicom

    raw = pydicom.dcmread(dicom_file("CT_small.dcm"))
    assert "PatientName" in raw
    ds = read_dicom(dicom_file("CT_small.dcm"))
    assert "PatientName" not in ds and "PatientID" not in ds
    hu = dicom_pixels(ds, "ct", None)
    np.testing.assert_array_equal(hu, raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept))
    mr = read_dicom(dicom_file("MR_small.dcm"))
    c, w = float(mr.WindowCenter), float(mr.WindowWidth)
    v = dicom_pixels(mr, "mr", None)
    np.testing.assert_allclose(window(v, mr), np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1), rtol=1e-6)
    with caplog.at_level(logging.INFO, logger="r1kit"):
        image, summary = load_dicom(dicom_file("CT_small.dcm"), IMG)
    assert image.shape == (1, 8, 8) and summary["modality"] == "CT" and summary["rescale"] == [1.0, -1024.0]
    assert str(raw.PatientName) not in caplog.text + str(summary)


def test_dicom_multiframe_compressed_and_errors():
    import pydicom

    rle, plain = load_dicom(dicom_file("MR_small_RLE.dcm"), IMG)[0], load_dicom(dicom_file("MR_small.dcm"), IMG)[0]
    torch.testing.assert_close(rle, plain)  # RLE Lossless decodes to the same pixels
    multi = read_dicom(dicom_file("rtdose_rle.dcm"))
    frames = int(multi.NumberOfFrames)
    np.testing.assert_array_equal(dicom_pixels(multi, "dose", None),
                                  pydicom.dcmread(dicom_file("rtdose_rle.dcm")).pixel_array[frames // 2]
                                  * float(multi.get("RescaleSlope", 1)) + float(multi.get("RescaleIntercept", 0)))
    with pytest.raises(MediaError, match="frame 99 out of range"):
        load_dicom(dicom_file("rtdose_rle.dcm"), IMG, frame=99)
    with pytest.raises(MediaError, match="no decoder for the DICOM compressed transfer syntax JPEG Extended"):
        load_dicom(dicom_file("JPEG-lossy.dcm"), ImageEncoderConfig(), "scan")
    with pytest.raises(MediaError, match="corrupt or truncated DICOM"):
        load_dicom(dicom_file("MR_truncated.dcm"), IMG)
    with pytest.raises(MediaError, match="not a DICOM file"):
        load_dicom(b"\0" * 200, IMG)
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(MediaError, match="no pixel data"):
        load_dicom(buf.getvalue(), IMG)


# ---------------------------------------------------------------------------------------------------- data


def test_digit_split_never_trains_on_the_last_297():
    x_train, y_train = D.digit_images("train")
    x_test, _ = D.digit_images("test")
    assert len(x_train) == 1500 and len(x_test) == 297 and x_train.max() <= 1.0
    assert D.augment_images(x_train[:4], torch.Generator().manual_seed(0)).shape == (4, 1, 8, 8)


needs_espeak = pytest.mark.skipif(D.espeak_binary() is None and not os.environ.get("R1KIT_REQUIRE_ESPEAK"),
                                  reason="espeak-ng is not installed (sh scripts/install_espeak.sh)")


@needs_espeak
def test_espeak_voices_held_out_of_training():
    assert len(D.HELDOUT_VARIANTS) >= 4
    variants = D.train_variants()
    assert len(variants) >= 20 and not set(D.HELDOUT_VARIANTS) & set(variants)
    for _, voice, _, _ in D.speech_plan("train", 200, 0):
        accent, variant = voice.split("+")
        assert variant not in D.HELDOUT_VARIANTS and accent != D.HELDOUT_ACCENT
    test_voices = {v.split("+")[1] for _, v, _, _ in D.speech_plan("test", 50, 0)}
    assert test_voices == set(D.HELDOUT_VARIANTS)
    clip = D.synthesize("seven", "en-us+f3", 170, 50)
    assert clip.dtype == np.float32 and 0.2 * 16000 < len(clip) < 2 * 16000 and np.abs(clip).max() > 0.05
