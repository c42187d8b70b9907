"""Engine core without a model: paged KV block allocation, prefix caching, continuous-batching scheduler.

The scheduler is driven by `FakeRunner`, a stand-in for the model runner that keeps a simulated paged KV
cache (slot -> token id): it writes every scheduled token through the block table and samples the next
token from the context it reads back. A wrong block table, a bad prefix-cache hit or a missed recompute
therefore changes the output, which is compared with a plain one-request-at-a-time loop. For speculative
sequences it also drafts (right most of the time), writes the drafts' KV, and verifies them as the model
runner does: a rejected draft left in a shared or hashed block would change a later request's output.
"""

from __future__ import annotations

import random

import pytest

from r1kit.engine import (
    BlockManager,
    BlockManagerError,
    FinishReason,
    Scheduler,
    SchedulerError,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
    hash_block,
)
from r1kit.generate import GenerationError, SamplingParams

VOCAB = 100


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context (order matters)."""
    h = 0
    for t in context:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], max_new: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """One request at a time, no cache: what every scheduled request must produce."""
    ids, out = list(prompt), []
    while len(out) < max_new:
        out.append(next_token(ids))
        ids.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


def make_seq(rid: str, prompt, max_new: int = 4, drafts: int = 0) -> Sequence:
    return Sequence(rid, list(prompt), SamplingParams(max_new_tokens=max_new, temperature=0),
                    num_speculative_tokens=drafts)


def guess(context: list[int]) -> int:
    """The fake draft model: the next token, wrong for about a third of the contexts."""
    return (next_token(context) + (sum(context) % 3 == 0)) % VOCAB


def mark_computed(bm: BlockManager, seq: Sequence) -> None:
    """Pretend the model wrote the KV of all of seq's tokens."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


class FakeRunner:
    """Writes each step's tokens into a simulated paged KV cache and samples from what it reads back."""

    def __init__(self, bm: BlockManager, draft=guess):
        self.bm = bm
        self.draft = draft
        self.kv: dict[int, int] = {}  # slot -> token id
        self.cached_tokens = 0  # prompt tokens served by the prefix cache
        self.drafted = self.accepted = 0

    def run(self, out: SchedulerOutput) -> list[list[int]]:
        for chunk in out.prefills:
            if chunk.start == chunk.seq.num_cached_tokens:  # the first chunk after an admission
                self.cached_tokens += chunk.start
            self._write(chunk.seq, chunk.start, chunk.token_ids)
        drafts: dict[str, list[int]] = {}
        for seq in out.decodes:  # the last token and the drafts after it
            ids = seq.all_token_ids
            for _ in range(seq.num_scheduled_drafts):
                ids.append(self.draft(ids))
            drafts[seq.request_id] = ids[seq.num_tokens:]
            self._write(seq, seq.num_tokens - 1, ids[seq.num_tokens - 1:])
        return [self._verify(seq, drafts.get(seq.request_id, [])) for seq in out.sample_seqs]

    def _verify(self, seq: Sequence, drafts: list[int]) -> list[int]:
        """The drafts that equal the next token, then the next token; every context read back from the cache."""
        new: list[int] = []
        for j in range(len(drafts) + 1):
            want = seq.all_token_ids + drafts[:j]
            context = [self.kv.get(slot) for slot in self.bm.slots(seq, 0, len(want))]
            assert context == want, f"{seq.request_id}: the KV cache holds {context}"
            new.append(next_token(context))
            if j == len(drafts) or drafts[j] != new[-1]:
                break
        self.drafted += len(drafts)
        self.accepted += len(new) - 1
        return new

    def _write(self, seq: Sequence, start: int, token_ids: list[int]) -> None:
        for slot, token in zip(self.bm.slots(seq, start, start + len(token_ids)), token_ids, strict=True):
            assert self.bm.blocks[slot // self.bm.block_size].ref_count == 1, "wrote into a shared block"
            self.kv[slot] = token


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Limits and block accounting that must hold after every schedule()."""
    bm = sched.block_manager
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert all(chunk.length <= sched.chunk_size for chunk in out.prefills)
    assert len(sched.running) <= sched.max_num_seqs
    ids = [c.seq.request_id for c in out.prefills] + [s.request_id for s in out.decodes]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    assert sched.running or not sched.waiting or not out.is_empty, "no progress"
    assert sum(b.ref_count for b in bm.blocks) == sum(len(s.block_table) for s in sched.running)
    assert bm.num_free_blocks == sum(1 for b in bm.blocks if b.ref_count == 0)
    for victim in out.preempted:
        assert victim.status is SequenceStatus.PREEMPTED and not victim.block_table
        assert all(victim.arrival_order > s.arrival_order for s in sched.running), "preempted an older sequence"
    assert list(sched.waiting)[:len(out.preempted)] == sorted(out.preempted, key=lambda s: s.arrival_order)


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    out = sched.schedule()
    check_step(sched, out)
    sched.postprocess(out.sample_seqs, runner.run(out))
    bm = sched.block_manager
    for seq in sched.running:  # rejected drafts rolled back: no slot past the last token, no block beyond it
        assert seq.num_computed_tokens < seq.num_tokens
        assert len(seq.block_table) <= bm.blocks_needed(seq.num_tokens), seq.request_id
        assert all(bm.blocks[b].hash is None for b in seq.block_table[seq.num_computed_tokens // bm.block_size:])
    return out


def drive(sched: Scheduler, runner: FakeRunner, arrivals: dict[int, list[Sequence]]) -> list[SchedulerOutput]:
    """Add arrivals[i] before step i; run until every request is done."""
    outs: list[SchedulerOutput] = []
    while sched.has_unfinished() or len(outs) <= max(arrivals, default=-1):
        for seq in arrivals.get(len(outs), []):
            sched.add(seq)
        outs.append(step(sched, runner))
        assert len(outs) < 1000
    return outs


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.seq.request_id, c.start, c.length, c.sample) for c in out.prefills]


# ---------------------------------------------------------------------------------------------------- sequence


def test_sequence_basics():
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_length=10))
    assert seq.max_tokens == 7 and seq.num_tokens == 3 and seq.remaining_prefill == 3 and seq.last_token == 7
    seq.append_token(8)
    assert seq.all_token_ids == [5, 6, 7, 8] and seq.num_output_tokens == 1 and seq.last_token == 8
    seq.finish("stop")
    assert seq.is_finished and seq.finish_reason is FinishReason.STOP
    with pytest.raises(GenerationError, match="'empty'"):
        Sequence("empty", [])


# ---------------------------------------------------------------------------------------------------- blocks


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq("a", range(10)), make_seq("b", range(100, 105))
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2 and not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 3 and a.num_cached_tokens == 0 and a.num_computed_tokens == 0
    assert all(bm.blocks[i].ref_count == 1 for i in a.block_table + b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(block.ref_count == 0 for block in bm.blocks)
    assert a.block_table == [] and b.block_table == []


def test_shared_prefix_shares_physical_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    prefix = list(range(8))
    a = make_seq("a", prefix + [50, 51, 52])
    bm.allocate(a)
    early = make_seq("early", prefix + [70])
    bm.allocate(early)  # a's KV is not written yet: nothing to share
    assert early.num_cached_tokens == 0 and not set(early.block_table) & set(a.block_table)
    mark_computed(bm, a)
    b = make_seq("b", prefix + [60])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert b.num_cached_tokens == b.num_computed_tokens == 8 and b.remaining_prefill == 1
    for seq in (a, b, early):
        bm.free(seq)
    assert bm.num_free_blocks == 10


def test_prompt_that_fills_its_blocks_still_computes_its_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = make_seq("a", range(8)), make_seq("b", range(8))
    bm.allocate(a)
    mark_computed(bm, a)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.remaining_prefill == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    mark_computed(bm, b)  # b's copy of the second block is not registered: a's stays the shared one
    shared = a.block_table
    bm.free(a)
    bm.free(b)
    c = make_seq("c", list(range(8)) + [9])
    bm.allocate(c)
    assert c.block_table[:2] == shared and c.num_cached_tokens == 8


def test_hash_chains_on_the_prefix():
    second = [5, 6, 7, 8]
    assert hash_block(hash_block(None, [1, 2, 3, 4]), second) != hash_block(hash_block(None, [9] * 4), second)
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.allocate(a)
    mark_computed(bm, a)
    b = make_seq("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])  # same second block after a different first one
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    c = make_seq("c", [1, 2, 3, 4, 5, 6, 7, 8, 1])
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]


def test_freed_cached_blocks_are_revived_until_reused():
    bm = BlockManager(num_blocks=5, block_size=4)
    tokens = list(range(8)) + [99]
    a = make_seq("a", tokens)
    bm.allocate(a)
    mark_computed(bm, a)
    cached = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 5
    other = make_seq("other", range(50, 58))
    bm.allocate(other)  # blocks caching nothing are handed out first
    assert not set(other.block_table) & set(cached)
    b = make_seq("b", tokens)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_cached_tokens == 8 and bm.num_free_blocks == 0
    bm.free(b)
    bm.free(other)
    for n, hit in ((16, 4), (20, 0)):  # a sequence is freed tail first: its first block is reused last
        big = make_seq(f"big{n}", range(200, 200 + n))
        bm.allocate(big)
        bm.free(big)
        c = make_seq(f"c{n}", tokens)
        bm.allocate(c)
        assert c.num_cached_tokens == hit
        bm.free(c)


def test_append_slot_crosses_block_boundaries():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq("s", [1, 2, 3])
    bm.allocate(seq)
    tables = []
    for token in range(4, 13):  # decode: the new token gets its slot before the step computes it
        seq.append_token(token)
        assert bm.can_append(seq)
        bm.append_slot(seq)
        tables.append(len(seq.block_table))
    assert tables == [1, 2, 2, 2, 2, 3, 3, 3, 3]
    mark_computed(bm, seq)
    assert [bm.blocks[i].hash is not None for i in seq.block_table] == [True, True, True]
    seq.append_token(13)
    assert not bm.can_append(seq)
    with pytest.raises(BlockManagerError, match="no free KV block for request 's'"):
        bm.append_slot(seq)


def test_block_manager_errors():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = make_seq("a", range(5))
    bm.allocate(a)
    with pytest.raises(BlockManagerError, match="'a' already holds"):
        bm.allocate(a)
    bm.free(a)
    with pytest.raises(BlockManagerError, match="free: request 'a' holds no KV blocks"):
        bm.free(a)
    ghost = make_seq("ghost", [1])
    for op in (bm.free, bm.append_slot, bm.can_append):
        with pytest.raises(BlockManagerError, match="'ghost'"):
            op(ghost)
    big = make_seq("big", range(9))
    assert not bm.can_allocate(big)
    with pytest.raises(BlockManagerError, match="'big' needs 1 more"):
        bm.allocate(big)
    assert bm.num_free_blocks == 2
    with pytest.raises(BlockManagerError, match="num_blocks = 0"):
        BlockManager(num_blocks=0, block_size=4)


# ---------------------------------------------------------------------------------------------------- scheduler


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **kw) -> tuple[Scheduler, FakeRunner]:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, **kw), FakeRunner(bm)


def test_request_added_midway_joins_the_next_step():
    sched, runner = make_scheduler(max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq("a", range(5), max_new=6), make_seq("b", range(10, 13), max_new=3)
    sched.add(a)
    assert chunks(step(sched, runner)) == [("a", 0, 5, True)]
    sched.add(b)
    out = step(sched, runner)
    assert out.decodes == [a] and chunks(out) == [("b", 0, 3, True)]
    drive(sched, runner, {})
    assert a.output_token_ids == reference(a.prompt_token_ids, 6)
    assert b.output_token_ids == reference(b.prompt_token_ids, 3)
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 64


def test_chunked_prefill_splits_a_long_prompt_within_the_token_budget():
    sched, runner = make_scheduler(max_num_seqs=2, max_num_batched_tokens=8, chunk_size=6)
    a, b = make_seq("a", range(20), max_new=3), make_seq("b", range(30, 33), max_new=5)
    outs = drive(sched, runner, {0: [a, b]})
    assert chunks(outs[0]) == [("a", 0, 6, False), ("b", 0, 2, False)]
    assert chunks(outs[1]) == [("a", 6, 6, False), ("b", 2, 1, True)]
    assert chunks(outs[2]) == [("a", 12, 6, False)] and outs[2].decodes == [b]
    assert chunks(outs[3]) == [("a", 18, 2, True)] and outs[3].decodes == [b]
    assert [o.sample_seqs for o in outs[:4]] == [[], [b], [b], [a, b]]
    assert a.output_token_ids == reference(a.prompt_token_ids, 3)
    assert b.output_token_ids == reference(b.prompt_token_ids, 5)


def test_decode_batch_respects_max_num_seqs_first_come_first_served():
    sched, runner = make_scheduler(max_num_seqs=2, max_num_batched_tokens=16)
    seqs = [make_seq(f"r{i}", range(i, i + 3 + i), max_new=3 + i) for i in range(5)]
    outs = drive(sched, runner, {0: seqs})
    assert max(len(o.decodes) for o in outs) == 2
    admitted = [c.seq.request_id for o in outs for c in o.prefills if c.start == 0]
    assert admitted == [s.request_id for s in seqs]
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.max_tokens)


def test_preemption_under_a_tiny_block_pool_recomputes_to_the_same_result():
    sched, runner = make_scheduler(num_blocks=6, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    seqs = [make_seq(f"r{i}", [10 * i + 1, 10 * i + 2, 10 * i + 3], max_new=6) for i in range(3)]
    outs = drive(sched, runner, {0: seqs})
    preempted = [s.request_id for o in outs for s in o.preempted]
    assert preempted and preempted[0] == "r2"  # the most recently arrived running sequence goes first
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, 6) and s.finish_reason is FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 6 and not sched.has_unfinished()


def test_abort_frees_blocks_and_rejects_unknown_or_finished_requests():
    sched, runner = make_scheduler(num_blocks=16, max_num_seqs=2)
    a, b, c = (make_seq(r, range(i, i + 6), max_new=8) for i, r in enumerate("abc"))
    for seq in (a, b, c):
        sched.add(seq)
    step(sched, runner)
    step(sched, runner)
    assert c.status is SequenceStatus.WAITING and sched.block_manager.num_free_blocks < 16
    assert sched.abort("c") is c and c.finish_reason is FinishReason.ABORT
    out = sched.schedule()
    tokens = runner.run(out)
    assert sched.abort("a") is a and a.block_table == []  # aborted while its step ran: its token is dropped
    sched.postprocess(out.sample_seqs, tokens)
    assert a.num_output_tokens == 2 and sched.running == [b]
    for rid in ("a", "nope"):
        with pytest.raises(SchedulerError, match=f"'{rid}'"):
            sched.abort(rid)
    drive(sched, runner, {})
    assert b.finish_reason is FinishReason.LENGTH
    with pytest.raises(SchedulerError, match="'b'"):
        sched.abort("b")
    d = make_seq("d", range(9))
    sched.add(d)
    step(sched, runner)
    sched.abort("d")
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()


def test_stop_id_and_length_finish_sequences():
    prompt = [3, 1, 4, 1, 5]
    full = reference(prompt, 20)
    i = next(i for i in range(2, 20) if full[i] not in full[:i])
    sched, runner = make_scheduler(stop_ids=[full[i]])
    stopped = make_seq("stopped", prompt, max_new=20)
    capped = Sequence("capped", [2, 7], SamplingParams(max_length=6))
    drive(sched, runner, {0: [stopped, capped]})
    assert stopped.output_token_ids == full[:i + 1] and stopped.finish_reason is FinishReason.STOP
    assert capped.output_token_ids == reference([2, 7], 4) and capped.finish_reason is FinishReason.LENGTH


def test_random_workload_matches_one_request_at_a_time():
    rng = random.Random(0)
    prefixes = [[rng.randrange(VOCAB) for _ in range(8)] for _ in range(3)]
    stop_ids = frozenset({7, 11, 42, 63, 90})
    sched, runner = make_scheduler(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=10,
                                   chunk_size=5, stop_ids=stop_ids)
    arrivals: dict[int, list[Sequence]] = {}
    seqs = []
    for i in range(16):
        prompt = rng.choice(prefixes)[:rng.randint(0, 8)] + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        seqs.append(make_seq(f"r{i}", prompt, max_new=rng.randint(1, 12)))
        arrivals.setdefault(rng.randrange(12), []).append(seqs[-1])
    outs = drive(sched, runner, arrivals)
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.max_tokens, stop_ids), s.request_id
    assert sched.block_manager.num_free_blocks == 9
    # the workload exercises preemption, prefix-cache hits and both finish reasons
    assert any(o.preempted for o in outs) and runner.cached_tokens > 0
    assert {s.finish_reason for s in seqs} == {FinishReason.STOP, FinishReason.LENGTH}


def test_scheduler_errors():
    sched, _ = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=4, max_num_seqs=4)
    sched.add(make_seq("a", range(10)))
    with pytest.raises(SchedulerError, match="'a' is already queued"):
        sched.add(make_seq("a", range(3)))
    with pytest.raises(SchedulerError, match="'huge' may need 5 KV blocks"):
        sched.add(make_seq("huge", range(16), max_new=2))
    out = sched.schedule()
    assert chunks(out) == [("a", 0, 4, False)]
    with pytest.raises(SchedulerError, match="'a' was not scheduled to sample"):
        sched.postprocess([out.prefills[0].seq], [[1]])
    with pytest.raises(SchedulerError, match="1 sequences but 0 tokens"):
        sched.postprocess([out.prefills[0].seq], [])
    with pytest.raises(SchedulerError, match="max_num_batched_tokens = 2"):
        Scheduler(sched.block_manager, max_num_seqs=4, max_num_batched_tokens=2)


# ---------------------------------------------------------------------------------------------------- speculative


def test_lookahead_slots_and_rollback_free_only_the_rejected_drafts_blocks():
    bm = BlockManager(num_blocks=5, block_size=2)
    seq = make_seq("s", [1, 2, 3], drafts=3)
    bm.allocate(seq)
    seq.append_token(4)  # 4 tokens in 2 blocks; a decode computes position 3 and drafts at 4, 5, 6
    assert bm.can_append(seq, 3) and not bm.can_append(seq, 7)
    bm.append_slot(seq, 3)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 1
    seq.append_token(9)  # every draft rejected: one new token at position 4
    seq.num_computed_tokens = 4
    bm.rollback(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 2
    bm.cache_full_blocks(seq)
    assert [bm.blocks[b].hash is not None for b in seq.block_table] == [True, True, False]
    with pytest.raises(BlockManagerError, match="no free KV block for request 's' \\(3 needed, 2 free\\)"):
        bm.append_slot(seq, 6)
    bm.free(seq)
    assert bm.num_free_blocks == 5


def test_speculative_sequences_take_no_prefix_hits_but_leave_their_accepted_blocks():
    bm = BlockManager(num_blocks=12, block_size=4)
    plain = make_seq("plain", range(9))
    bm.allocate(plain)
    mark_computed(bm, plain)
    spec = make_seq("spec", range(9), drafts=2)
    bm.allocate(spec)  # its MTP drafter needs the hidden state of every position: no hit
    assert spec.num_cached_tokens == 0 and not set(spec.block_table) & set(plain.block_table)
    bm.free(plain)
    mark_computed(bm, spec)
    later = make_seq("later", range(9))
    bm.allocate(later)
    assert later.num_cached_tokens == 8  # what the speculative sequence wrote serves a plain one


def test_drafts_fill_the_budget_and_blocks_left_after_every_decode():
    sched, runner = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=3, max_num_batched_tokens=6)
    a, b, c = (make_seq(r, range(i * 10, i * 10 + 3), max_new=20, drafts=3) for i, r in enumerate("abc"))
    drive(sched, runner, {0: [a], 1: [b], 2: [c]})
    for seq in (a, b, c):
        assert seq.output_token_ids == reference(seq.prompt_token_ids, 20)
    assert 0 < runner.accepted < runner.drafted
    # three decodes take 3 of the 6 tokens: 3 drafts are left, the oldest sequence's first
    sched, runner = make_scheduler(num_blocks=64, block_size=4, max_num_seqs=3, max_num_batched_tokens=6)
    for seq in (make_seq(r, [i + 1], max_new=20, drafts=3) for i, r in enumerate("abc")):
        sched.add(seq)
    step(sched, runner)  # three prefills of one token, then decodes with drafts
    out = sched.schedule()
    assert [s.num_scheduled_drafts for s in out.decodes] == [3, 0, 0] and out.num_batched_tokens == 6
    sched.postprocess(out.sample_seqs, runner.run(out))
    # near the end of its budget a sequence drafts only what it can still emit
    seq = make_seq("end", [5, 6], max_new=3, drafts=3)
    assert seq.num_drafts_wanted == 2
    seq.append_token(1)
    seq.append_token(2)
    assert seq.num_drafts_wanted == 0


def test_speculative_workload_with_preemption_and_prefix_sharing_matches_one_request_at_a_time():
    """Speculative and plain requests, a pool so small that requests are preempted (drafts are shed first),
    prompts that share prefixes with the outputs of speculative ones: rejected drafts never leak into what a
    later request reads, and every block comes back."""
    rng = random.Random(3)
    stop_ids = frozenset({7, 42})
    sched, runner = make_scheduler(num_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=12,
                                   chunk_size=6, stop_ids=stop_ids)
    seqs, arrivals = [], {}
    for i in range(14):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
        if i >= 7 and rng.random() < 0.7:  # continue an earlier prompt with its reference output
            base = rng.choice(seqs[:7])
            prompt = base.prompt_token_ids + reference(base.prompt_token_ids, 6, stop_ids)[:rng.randint(1, 6)]
        seqs.append(make_seq(f"r{i}", prompt, max_new=rng.randint(1, 14), drafts=rng.choice([0, 1, 2, 3])))
        arrivals.setdefault(rng.randrange(10) if i >= 7 else 0, []).append(seqs[-1])
    outs = drive(sched, runner, arrivals)
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, s.max_tokens, stop_ids), s.request_id
    assert sched.block_manager.num_free_blocks == 10
    assert any(s.num_speculative_tokens for o in outs for s in o.preempted)
    assert runner.cached_tokens > 0 and 0 < runner.accepted < runner.drafted
