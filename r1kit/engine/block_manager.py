"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a prefix cache.

The model's paged KV cache holds ``num_blocks`` blocks of ``block_size`` token slots per layer; a sequence's
``block_table`` lists the physical blocks holding its tokens in order, so token ``p`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``. This module only decides which blocks;
it never touches a tensor.

Prefix caching (as in vLLM and nano-vllm): a full block whose KV has been written gets a content hash,
sha256(parent block's hash + its token ids), so the hash names the whole prefix up to the end of the
block and the same tokens after a different prefix hash differently. sha256 makes a collision (two
prefixes sharing KV) practically impossible and is stable across processes. A new sequence whose leading
full blocks hash to cached blocks takes those blocks (reference count + 1) instead of computing them.

Freed blocks go back to the free pool but keep their hash and stay findable until the pool hands them
out again, like vLLM's evictor: a hit on such a block revives it. The pool hands out, first, blocks that
cache nothing, then the least recently freed cached ones. A sequence's blocks are freed tail first, so a
shared prefix outlives the suffixes that hang off it.

Speculative decoding (`r1kit.engine.spec_decode`): a decode step may reserve lookahead slots for draft tokens
after the last token; ``rollback`` frees the tail blocks that only rejected drafts used. A block is hashed
only once all its tokens are accepted. A speculative sequence takes no prefix-cache hits: its MTP drafter
needs the main model's hidden state at every position, so it computes its whole prompt.

Prompt embeddings (a request with media, `Sequence.prompt_embeds`): the KV of a block depends on the embeddings,
not only on the token ids (every image has the same placeholder ids, and the modality gate scales the text
around them too). Such a sequence's ``cache_salt`` (sha256 of its embeddings' bytes) is the parent of its first
block, so its blocks are shared only with requests whose prompt embeddings are bit-identical (the same media),
never with a text-only prompt or other media.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from r1kit.engine.sequence import Sequence


class BlockManagerError(ValueError):
    """Invalid block operation: double free, unknown sequence, or not enough free blocks."""


def hash_block(parent: bytes | None, token_ids: Iterable[int]) -> bytes:
    """Content hash of a full block: sha256 of the parent block's hash (none for the first block) and the
    block's token ids as little-endian int64."""
    ids = list(token_ids)
    return hashlib.sha256((parent or b"") + struct.pack(f"<{len(ids)}q", *ids)).digest()


@dataclass
class Block:
    """One physical KV block. ``hash`` is set once the block is full and its KV written."""

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    """Allocates KV blocks to sequences, sharing full prefix blocks between them.

    Life of a sequence: ``allocate`` when it is admitted (blocks for all its current tokens, cached
    prefix blocks reused), ``append_slot`` before each decode step (a new block when the token to compute
    starts one, or its drafts need one), ``rollback`` and ``cache_full_blocks`` after each step (rejected
    drafts' blocks freed; its full, written blocks become findable), ``free`` when it finishes or is
    preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise BlockManagerError(f"num_blocks = {num_blocks}, block_size = {block_size}: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching  # False: no block is ever found by its prefix
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out = first in line
        self._cached: dict[bytes, int] = {}  # hash -> block id holding that prefix's KV (in use or free)
        self._num_hashed: dict[str, int] = {}  # request id -> how many leading blocks of its table have a hash

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused when needed)."""
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat KV slot of each token position in [start, end) of seq (block id * block_size + offset)."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    # ------------------------------------------------------------------------------------------ allocation
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether allocate(seq) would succeed now."""
        return self._shortfall(seq, self._prefix_hits(seq)) <= 0

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached blocks for its leading full blocks.

        Sets ``num_cached_tokens`` and ``num_computed_tokens`` to the tokens found in the cache. The block
        holding the last token is never taken from the cache, even when full: the last token must be
        computed to have logits to sample from, and a shared block is never written.
        """
        if seq.request_id in self._num_hashed:
            raise BlockManagerError(f"allocate: request {seq.request_id!r} already holds KV blocks")
        hits = self._prefix_hits(seq)
        short = self._shortfall(seq, hits)
        if short > 0:
            raise BlockManagerError(f"allocate: request {seq.request_id!r} needs {short} more free KV blocks "
                                    f"than the {self.num_free_blocks} available")
        for block_id in hits:
            self._take(block_id)
        fresh = [self._take_fresh() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self._num_hashed[seq.request_id] = len(hits)

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Whether append_slot(seq, lookahead) would succeed now."""
        self._check_allocated(seq, "can_append")
        return self._blocks_missing(seq, lookahead) <= self.num_free_blocks

    def append_slot(self, seq: Sequence, lookahead: int = 0) -> None:
        """Make room for seq's last token (the one the next decode step computes) and ``lookahead`` draft tokens
        after it: new blocks where they start ones."""
        self._check_allocated(seq, "append_slot")
        missing = self._blocks_missing(seq, lookahead)
        if missing > self.num_free_blocks:
            raise BlockManagerError(f"append_slot: no free KV block for request {seq.request_id!r} ({missing} "
                                    f"needed, {self.num_free_blocks} free)")
        seq.block_table += [self._take_fresh() for _ in range(missing)]

    def rollback(self, seq: Sequence) -> None:
        """Free seq's tail blocks that hold none of its tokens: after a speculative step, the blocks only its
        rejected drafts used (never hashed: they hold no accepted token). They are handed out first."""
        self._check_allocated(seq, "rollback")
        while len(seq.block_table) > self.blocks_needed(seq.num_tokens):
            block_id = seq.block_table.pop()
            self.blocks[block_id].ref_count -= 1
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash seq's full blocks whose KV is written (all their tokens below num_computed_tokens) and make
        them findable by later sequences. Call after the step that wrote them.

        A block whose prefix is already cached in another block keeps its hash (the next block's hash
        chains on it) but is not registered: the first copy stays the one that is shared.
        """
        self._check_allocated(seq, "cache_full_blocks")
        bs, done = self.block_size, self._num_hashed[seq.request_id]
        full = seq.num_computed_tokens // bs
        if full <= done:
            return
        tokens = seq.all_token_ids
        parent = self.blocks[seq.block_table[done - 1]].hash if done else seq.cache_salt
        for i in range(done, full):
            block = self.blocks[seq.block_table[i]]
            block.hash = hash_block(parent, tokens[i * bs:(i + 1) * bs])
            if self.enable_prefix_caching:
                self._cached.setdefault(block.hash, block.block_id)
            parent = block.hash
        self._num_hashed[seq.request_id] = full

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (tail first); a block returns to the free pool when no sequence holds it."""
        self._check_allocated(seq, "free")
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if not self._is_cached(block):
                    self._free.move_to_end(block_id, last=False)  # holds nothing reusable: hand it out first
        seq.block_table = []
        del self._num_hashed[seq.request_id]

    # ------------------------------------------------------------------------------------------ internals
    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached block ids for seq's leading full blocks, up to the first miss, never the last token's block;
        none for a speculative sequence (it computes every position, see the module doc) or one that wants its
        prompt's log-probabilities (they come from the logits of every prompt position)."""
        bs, tokens = self.block_size, seq.all_token_ids
        hits: list[int] = []
        if seq.num_speculative_tokens or seq.prompt_logprobs is not None:
            return hits
        parent = seq.cache_salt
        for i in range((len(tokens) - 1) // bs):
            parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _shortfall(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks missing to allocate seq with these cache hits (<= 0: enough)."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # cached but free: they leave the pool
        return self.blocks_needed(seq.num_tokens) - len(hits) + revived - self.num_free_blocks

    def _blocks_missing(self, seq: Sequence, lookahead: int) -> int:
        """New blocks seq needs to hold its tokens and lookahead more."""
        return max(0, self.blocks_needed(seq.num_tokens + lookahead) - len(seq.block_table))

    def _is_cached(self, block: Block) -> bool:
        return block.hash is not None and self._cached.get(block.hash) == block.block_id

    def _take(self, block_id: int) -> None:
        """One more holder of a cached block (reviving it from the free pool if nobody held it)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """Hand out the next free block, forgetting what it cached."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self._is_cached(block):
            del self._cached[block.hash]
        block.hash = None
        block.ref_count = 1
        return block_id

    def _check_allocated(self, seq: Sequence, op: str) -> None:
        if seq.request_id not in self._num_hashed:
            raise BlockManagerError(f"{op}: request {seq.request_id!r} holds no KV blocks "
                                    f"(never allocated, or already freed)")
