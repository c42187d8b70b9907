"""Multimodal inputs: image (ViT) and audio (log-mel) encoders, the LLaVA projector, the modality gate, CLIP's
contrastive loss, media loading (image / WAV / DICOM) and the VisionAudioLM that merges them into a language
model's input at placeholder tokens."""

from r1kit.multimodal.config import AudioEncoderConfig, GateConfig, ImageEncoderConfig, MultimodalConfig
from r1kit.multimodal.contrastive import ContrastiveLoss
from r1kit.multimodal.encoders import AudioEncoder, LogMel, ViTEncoder
from r1kit.multimodal.model import Media, MediaError, MissingEncoderError, PlaceholderMismatchError, VisionAudioLM
from r1kit.multimodal.projector import ModalityGate, Projector

__all__ = ["AudioEncoder", "AudioEncoderConfig", "ContrastiveLoss", "GateConfig", "ImageEncoderConfig", "LogMel",
           "Media", "MediaError", "MissingEncoderError", "ModalityGate", "MultimodalConfig",
           "PlaceholderMismatchError", "Projector", "ViTEncoder", "VisionAudioLM"]
