"""Inference engine: sequences, the paged KV block manager, the continuous-batching scheduler (pure Python,
token ids only), the model runner that executes a `SchedulerOutput` on the paged KV pools, and `LLMEngine`
on top (see `r1kit.engine.scheduler` for the step protocol).
"""

from r1kit.engine.block_manager import Block, BlockManager, BlockManagerError, hash_block
from r1kit.engine.llm_engine import LLMEngine, StepOutput
from r1kit.engine.model_runner import ModelRunner
from r1kit.engine.scheduler import PrefillChunk, Scheduler, SchedulerError, SchedulerOutput
from r1kit.engine.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "Block", "BlockManager", "BlockManagerError", "hash_block", "PrefillChunk", "Scheduler", "SchedulerError",
    "SchedulerOutput", "FinishReason", "Sequence", "SequenceStatus", "LLMEngine", "StepOutput", "ModelRunner",
]
