"""Decoding and validating attachments: images (PNG/JPEG/... via Pillow, or arrays), WAV audio, DICOM.

Every loader returns the tensor an encoder takes and raises MediaError naming the part (the ``name`` given:
a file, "messages[0].content[1]", ...) on a corrupt, truncated, unsupported, too large or too long input.
DICOM: patient-identifying tags are removed from the dataset before anything is read out of it for logging.
"""

from __future__ import annotations

import io
import logging
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from r1kit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig
from r1kit.multimodal.model import MediaError

log = logging.getLogger("r1kit")


class MediaTooLargeError(MediaError):
    """An attachment exceeds a size limit (bytes, pixels or seconds): HTTP 413."""


# Patient-identifying attributes (DICOM PS3.15 Annex E, the basic profile's patient and identity part).
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
            "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames",
            "OtherPatientIDsSequence", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
            "IssuerOfPatientID", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
            "PhysiciansOfRecord", "InstitutionName", "InstitutionAddress", "AccessionNumber", "StudyID",
            "MedicalRecordLocator", "PatientWeight", "PatientSize", "RequestingPhysician")


def read_source(src: Any, name: str, max_bytes: int) -> bytes:
    """Bytes of a path or bytes-like source, at most max_bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{name}: no such file {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise MediaTooLargeError(f"{name}: {path} is {size} bytes, over the limit of {max_bytes}")
        data = path.read_bytes()
    else:
        raise MediaError(f"{name}: expected a path, bytes or an array, got {type(src).__name__}")
    if len(data) > max_bytes:
        raise MediaTooLargeError(f"{name}: {len(data)} bytes, over the limit of {max_bytes}")
    if not data:
        raise MediaError(f"{name}: empty")
    return data


# ---------------------------------------------------------------------------------------------------- images


def image_array(arr: Any, name: str) -> np.ndarray:
    """A 2-D (grayscale) or H x W x 3 (RGB) array, uint8 0-255 or float in [0, 1] -> float32 gray (H, W)."""
    a = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3]
    elif a.ndim != 2:
        raise MediaError(f"{name}: image array must be 2-D (H, W) or H x W x 3, got shape {a.shape}")
    if a.size == 0:
        raise MediaError(f"{name}: image array is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise MediaError(f"{name}: a float image must hold finite values in [0, 1] "
                             f"(got min {np.nanmin(a):.3g}, max {np.nanmax(a):.3g})")
        a = a.astype(np.float32)
    else:
        raise MediaError(f"{name}: image dtype must be uint8 (0-255) or float (0-1), not {a.dtype}")
    if a.ndim == 3:
        a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as Pillow's "L"
    return a


def decode_image(data: bytes, name: str, cfg: ImageEncoderConfig) -> np.ndarray:
    """PNG/JPEG/... bytes -> float32 gray (H, W) in [0, 1]; corrupt, truncated or too many pixels -> error."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image format Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP ...)") from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise MediaTooLargeError(f"{name}: {w} x {h} pixels, over the limit of {cfg.max_pixels}")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{name}: corrupt or truncated {img.format} image ({e})") from None
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def to_encoder_image(gray: np.ndarray, cfg: ImageEncoderConfig) -> torch.Tensor:
    """Gray (H, W) in [0, 1] -> (1, S, S): light backgrounds inverted (digits are light on dark, as in training),
    resized by area averaging."""
    if np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).mean() > 0.5:
        gray = 1.0 - gray
    x = torch.from_numpy(np.ascontiguousarray(gray))[None, None]
    size = cfg.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area") if min(x.shape[-2:]) >= size else \
            F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0].clamp(0, 1)


def load_image(src: Any, cfg: ImageEncoderConfig, name: str = "image") -> torch.Tensor:
    """A path, bytes, PIL image or array -> (1, S, S) float in [0, 1] for the ViT."""
    if hasattr(src, "convert") and hasattr(src, "size"):  # a PIL image
        w, h = src.size
        if w * h > cfg.max_pixels:
            raise MediaTooLargeError(f"{name}: {w} x {h} pixels, over the limit of {cfg.max_pixels}")
        gray = np.asarray(src.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(src, (np.ndarray, torch.Tensor)):
        if np.prod(src.shape[:2]) > cfg.max_pixels:
            raise MediaTooLargeError(f"{name}: {src.shape[1]} x {src.shape[0]} pixels, over {cfg.max_pixels}")
        gray = image_array(src, name)
    else:
        gray = decode_image(read_source(src, name, cfg.max_bytes), name, cfg)
    return to_encoder_image(gray, cfg)


# ---------------------------------------------------------------------------------------------------- audio


def decode_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """PCM WAV bytes (8/16/24/32-bit, any channel count) -> mono float32 in [-1, 1] and its sample rate."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise MediaError(f"{name}: not a PCM WAV file ({e})") from None
    if rate <= 0 or channels <= 0:
        raise MediaError(f"{name}: WAV header has sample rate {rate} and {channels} channels")
    if len(raw) < frames * channels * width:
        raise MediaError(f"{name}: truncated WAV: the header announces {frames} frames, the data holds "
                         f"{len(raw) // (channels * width)}")
    if width == 1:
        pcm = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        pcm = np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        pcm = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2 ** 23
    else:
        raise MediaError(f"{name}: unsupported WAV sample width {width} bytes")
    return pcm.reshape(-1, channels).mean(1), rate


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly) from rate to target Hz."""
    if rate == target:
        return x.astype(np.float32)
    from scipy.signal import resample_poly

    g = np.gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def load_audio(src: Any, cfg: AudioEncoderConfig, sample_rate: int | None = None, name: str = "audio"
               ) -> torch.Tensor:
    """A WAV path / bytes, or a 1-D array with its sample_rate -> (L,) float32 at cfg.sample_rate."""
    if isinstance(src, (np.ndarray, torch.Tensor)):
        x = np.asarray(src.detach().cpu() if isinstance(src, torch.Tensor) else src)
        if sample_rate is None:
            raise MediaError(f"{name}: an audio array needs its sample_rate")
        if x.ndim == 2:
            x = x.mean(1) if x.shape[1] <= 8 else x.mean(0)
        if x.ndim != 1 or x.size == 0:
            raise MediaError(f"{name}: audio array must be 1-D samples (or samples x channels), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
        if not np.isfinite(x).all():
            raise MediaError(f"{name}: audio array holds NaN or infinite samples")
        rate = sample_rate
    else:
        x, rate = decode_wav(read_source(src, name, cfg.max_bytes), name)
    if not isinstance(rate, int) or rate < 1000:
        raise MediaError(f"{name}: sample rate must be an integer of at least 1000 Hz, got {rate!r}")
    seconds = x.size / rate
    if seconds > cfg.max_seconds:
        raise MediaTooLargeError(f"{name}: {seconds:.1f} s of audio, over the limit of {cfg.max_seconds:g} s")
    if x.size < rate // 100:
        raise MediaError(f"{name}: {x.size} samples is too short (under 10 ms)")
    return torch.from_numpy(resample(np.clip(x, -1, 1), rate, cfg.sample_rate))


# ---------------------------------------------------------------------------------------------------- DICOM


def deidentify(ds: Any) -> Any:
    """Remove the patient-identifying attributes (PHI_TAGS) and every private tag, in place."""
    for keyword in PHI_TAGS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.remove_private_tags()
    return ds


def dicom_summary(ds: Any) -> dict[str, Any]:
    """What may be logged about a de-identified dataset: modality, geometry, encoding, windowing."""
    def plain(v: Any) -> Any:
        return [float(x) for x in v] if hasattr(v, "__iter__") and not isinstance(v, str) else (
            float(v) if v is not None else None)

    return {"modality": str(ds.get("Modality", "")), "rows": int(ds.get("Rows", 0)),
            "columns": int(ds.get("Columns", 0)), "frames": int(ds.get("NumberOfFrames", 1) or 1),
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID.name) if "TransferSyntaxUID" in ds.file_meta else "",
            "rescale": [plain(ds.get("RescaleSlope", 1)), plain(ds.get("RescaleIntercept", 0))],
            "window": [plain(ds.get("WindowCenter")), plain(ds.get("WindowWidth"))]}


def _first(v: Any) -> float:
    return float(v[0]) if hasattr(v, "__iter__") and not isinstance(v, str) else float(v)


def dicom_pixels(ds: Any, name: str, frame: int | None) -> np.ndarray:
    """The (rescaled) pixel values of one frame (middle one by default), float64 (H, W)."""
    from pydicom.pixels import apply_rescale

    if "PixelData" not in ds:
        raise MediaError(f"{name}: the DICOM file has no pixel data (PixelData element missing)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for missing decoders / bad data
        if syntax is not None and syntax.is_compressed:
            raise MediaError(f"{name}: no decoder for the DICOM compressed transfer syntax {syntax.name} "
                             f"({type(e).__name__}: {e}); install a pydicom pixel handler for it (pylibjpeg and "
                             "its plugins)") from None
        raise MediaError(f"{name}: corrupt or truncated DICOM pixel data ({type(e).__name__}: {e})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        index = frames // 2 if frame is None else frame
        if not 0 <= index < frames:
            raise MediaError(f"{name}: frame {index} out of range (the file has {frames} frames)")
        arr = arr[index]
    if arr.ndim == 3:  # RGB
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    return apply_rescale(arr.astype(np.float64), ds)


def window(values: np.ndarray, ds: Any) -> np.ndarray:
    """DICOM linear VOI windowing (PS3.3 C.11.2.1.2) to [0, 1] with the file's first window centre/width, or the
    value range when it has none; MONOCHROME1 inverted."""
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        c, w = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        out = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    else:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 1 - out
    return out.astype(np.float32)


def read_dicom(src: Any, name: str = "dicom", max_bytes: int = 64 * 1024 * 1024) -> Any:
    """A de-identified pydicom dataset from a path or bytes; corrupt, truncated or not DICOM -> MediaError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = read_source(src, name, max_bytes)
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PixelData if "PixelData" in ds else None  # noqa: B018 - reading it reveals truncation now
    except InvalidDicomError as e:
        raise MediaError(f"{name}: not a DICOM file ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed elements raise assorted errors
        raise MediaError(f"{name}: corrupt or truncated DICOM file ({type(e).__name__}: {e})") from None
    return deidentify(ds)


def load_dicom(src: Any, cfg: ImageEncoderConfig, name: str = "dicom", frame: int | None = None
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """A DICOM path / bytes -> ((1, S, S) for the ViT, a de-identified summary). Rescale slope/intercept, the
    file's window, the middle frame of a multi-frame file (or `frame`)."""
    ds = read_dicom(src, name, max(cfg.max_bytes, 64 * 1024 * 1024))
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > cfg.max_pixels:
        raise MediaTooLargeError(f"{name}: {cols} x {rows} pixels, over the limit of {cfg.max_pixels}")
    pixels = window(dicom_pixels(ds, name, frame), ds)
    summary = dicom_summary(ds)
    log.info("%s: DICOM %s", name, summary)
    x = torch.from_numpy(np.ascontiguousarray(pixels))[None, None]
    x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="area")
    return x[0].clamp(0, 1), summary
