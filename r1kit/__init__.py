"""r1kit: an open, hackable DeepSeek-R1-style reasoning LLM stack on PyTorch."""

from r1kit.api import ChatReply, ModelNotFoundError, R1Model, resolve_model_path
from r1kit.checkpoint import CheckpointError, load_model, save_model
from r1kit.engine.config import EngineConfig
from r1kit.generate import GenerationError, SamplingParams
from r1kit.hardware import HardwareError
from r1kit.model.config import PRESETS, ConfigError, ModelConfig, preset
from r1kit.model.transformer import ContextLengthError, Transformer
from r1kit.tokenizer import Tokenizer, TokenizerError

__version__ = "0.1.0"


def __getattr__(name: str):
    """TrainingError lives with the training loop: imported on first use, so that `import r1kit` (and checkpoint
    I/O, inference, serving) does not load the training package."""
    if name == "TrainingError":
        from r1kit.train.loop import TrainingError

        return TrainingError
    raise AttributeError(f"module 'r1kit' has no attribute {name!r}")


__all__ = [
    "R1Model", "ChatReply", "ModelNotFoundError", "resolve_model_path", "CheckpointError", "load_model", "save_model",
    "GenerationError", "SamplingParams", "PRESETS", "ConfigError", "ModelConfig", "preset", "ContextLengthError",
    "Transformer", "Tokenizer", "TokenizerError", "HardwareError", "TrainingError",
    "EngineConfig",
]
