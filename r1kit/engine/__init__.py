"""Inference engine core: sequences, the paged KV block manager and the continuous-batching scheduler.

Pure Python, token ids only; the model runner that executes a `SchedulerOutput` on a paged KV cache plugs
in on top (see `r1kit.engine.scheduler` for the step protocol).
"""

from r1kit.engine.block_manager import Block, BlockManager, BlockManagerError, hash_block
from r1kit.engine.scheduler import PrefillChunk, Scheduler, SchedulerError, SchedulerOutput
from r1kit.engine.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "Block", "BlockManager", "BlockManagerError", "hash_block", "PrefillChunk", "Scheduler", "SchedulerError",
    "SchedulerOutput", "FinishReason", "Sequence", "SequenceStatus",
]
