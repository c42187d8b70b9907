"""Knowledge replay: a task-balanced reservoir of earlier tasks' training rows, mixed into each new batch.

    buf = ReplayBuffer(max_examples=2048, max_bytes=64 << 20)
    buf.begin_task("arith"); [buf.offer(row) for row in rows_of_arith]   # reservoir sampling (Vitter's algorithm R)
    data = ReplayData(new_task_batches, buf, ratio=0.25)                 # 25% of every batch's rows are replayed
    save_replay(buf, run / "final" / "continual" / "replay.safetensors", identity)

Every task keeps a uniform sample of the rows it offered, of at most `quota` = capacity / number of tasks rows,
where capacity = min(max_examples, max_bytes // bytes per row); when a task begins, the others shrink to the new
quota by a uniform subsample (a uniform subsample of a uniform sample is uniform). A replayed batch takes its
`round(ratio * rows)` replayed rows evenly from the earlier tasks (round-robin from a random start), each row
uniformly within its task; the current task's rows are offered to the buffer as they are trained on. Rows are tuples
of tensors (x, y, mask[, doc_ids] of one sequence), stored int32 / uint8 to save bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from r1kit.fileio import atomic_write
from r1kit.train.continual.importance import ContinualError, read_safetensors

FORMAT = "r1kit-continual-replay/1"
Row = tuple[torch.Tensor, ...]


def _pack(row: Sequence[torch.Tensor]) -> Row:
    """Store a row compactly: integer tensors as int32, 0/1 float masks as uint8 (unpacked by _unpack)."""
    out = []
    for t in row:
        if t.is_floating_point():
            out.append(t.to(torch.uint8) if bool(((t == 0) | (t == 1)).all()) else t.float())
        else:
            out.append(t.to(torch.int32))
    return tuple(t.detach().cpu().clone() for t in out)


def _unpack(row: Row, like: Sequence[torch.Tensor]) -> Row:
    return tuple(t.to(ref.dtype) for t, ref in zip(row, like[:len(row)], strict=False))  # _fit: the layout


def _fit(row: Row, like: Sequence[torch.Tensor]) -> Row:
    """A replayed row in the fresh rows' layout: packed chat rows carry document ids (x, y, mask, doc_ids) and
    plain rows do not; a plain row replayed among packed ones is one document, a packed one among plain rows loses
    its document boundaries (as in pretraining)."""
    if len(row) == len(like):
        return row
    if len(row) == 3 and len(like) == 4:
        return (*row, torch.zeros_like(like[3]))
    return row[:len(like)]


def row_bytes(row: Row) -> int:
    return sum(t.numel() * t.element_size() for t in row)


class ReplayBuffer:
    """Task-balanced reservoir of rows, bounded in rows (`max_examples`) and bytes (`max_bytes`)."""

    def __init__(self, max_examples: int, max_bytes: int, seed: int = 0):
        if max_examples < 1 or max_bytes < 1:
            raise ContinualError(f"continual.replay_examples / replay_bytes = {max_examples} / {max_bytes}: "
                                 "must be >= 1")
        self.max_examples, self.max_bytes = max_examples, max_bytes
        self.rows: dict[str, list[Row]] = {}  # task -> its reservoir
        self.seen: dict[str, int] = {}  # task -> rows offered so far
        self.current: str | None = None
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)  # the reservoir's keep/replace draws (one per offered row: cheap)
        self._row_bytes: int | None = None

    def quota(self) -> int:
        """Rows each task may keep now."""
        cap = self.max_examples if self._row_bytes is None else min(self.max_examples,
                                                                    self.max_bytes // self._row_bytes)
        return cap // max(1, len(self.rows))

    def begin_task(self, task: str) -> None:
        """Make `task` the one whose rows are offered; the other tasks shrink to the new quota."""
        if task not in self.rows:
            self.rows[task], self.seen[task] = [], 0
        self.current = task
        self._shrink()

    def _shrink(self) -> None:
        q = self.quota()
        for task, rows in self.rows.items():
            if len(rows) > q:
                keep = torch.randperm(len(rows), generator=self.gen)[:q].sort().values
                self.rows[task] = [rows[i] for i in keep.tolist()]

    def offer(self, row: Sequence[torch.Tensor]) -> None:
        """Algorithm R: the n-th row offered to the current task is kept with probability quota / n."""
        if self.current is None:
            raise ContinualError("ReplayBuffer.offer: no task begun (call begin_task first)")
        if self._row_bytes is None:
            self._row_bytes = row_bytes(_pack(row))
            if self._row_bytes > self.max_bytes:
                raise ContinualError(f"continual.replay_bytes = {self.max_bytes}: smaller than one row "
                                     f"({self._row_bytes} bytes)")
            self._shrink()
        rows, q = self.rows[self.current], self.quota()
        self.seen[self.current] += 1
        if len(rows) < q:
            rows.append(_pack(row))
            return
        j = self.rng.randrange(self.seen[self.current])
        if j < q:
            rows[j] = _pack(row)

    def previous_tasks(self) -> list[str]:
        return [t for t, rows in self.rows.items() if t != self.current and rows]

    def sample(self, n: int, like: Sequence[torch.Tensor]) -> list[Row]:
        """`n` rows from the earlier tasks, spread evenly over them; dtypes as in `like` (a fresh row)."""
        tasks = self.previous_tasks()
        if not tasks or n <= 0:
            return []
        start = int(torch.randint(len(tasks), (1,), generator=self.gen))
        out = []
        for i in range(n):
            rows = self.rows[tasks[(start + i) % len(tasks)]]
            out.append(_unpack(rows[int(torch.randint(len(rows), (1,), generator=self.gen))], like))
        return out

    @property
    def nbytes(self) -> int:
        return sum(row_bytes(r) for rows in self.rows.values() for r in rows)

    def state_dict(self) -> dict[str, Any]:
        """Everything as tensors, ints and strings (for a training checkpoint loaded with weights_only)."""
        return {"tasks": list(self.rows), "seen": dict(self.seen), "current": self.current or "",
                "generator": self.gen.get_state(), "rng": torch.tensor(self.rng.getstate()[1]),
                "rows": {t: _stack(r) for t, r in self.rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = {t: _unstack(state["rows"][t]) for t in state["tasks"]}
        self.seen = {t: int(state["seen"][t]) for t in state["tasks"]}
        self.current = state["current"] or None
        self.gen.set_state(state["generator"].clone())
        self.rng.setstate((3, tuple(state["rng"].tolist()), None))
        first = next((r[0] for r in self.rows.values() if r), None)
        self._row_bytes = row_bytes(first) if first is not None else None


def _stack(rows: list[Row]) -> list[torch.Tensor]:
    return [torch.stack(parts) for parts in zip(*rows, strict=True)] if rows else []


def _unstack(parts: list[torch.Tensor]) -> list[Row]:
    return [tuple(p[i] for p in parts) for i in range(parts[0].shape[0])] if parts else []


def save_replay(buf: ReplayBuffer, file: str | Path, identity: dict[str, str]) -> Path:
    """Write the buffer as safetensors (atomically); the header names the model/tokenizer (`identity`) and tasks."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"task{i}.{k}": t.contiguous() for i, rows in enumerate(buf.rows.values())
               for k, t in enumerate(_stack(rows))}
    meta = {"format": FORMAT, "tasks": json.dumps(list(buf.rows)), "seen": json.dumps(buf.seen),
            "max_examples": str(buf.max_examples), "max_bytes": str(buf.max_bytes), **identity}
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return file


def load_replay(file: str | Path, max_examples: int, max_bytes: int, seed: int = 0,
                identity: dict[str, str] | None = None) -> ReplayBuffer:
    """Read a replay file into a buffer with the given bounds (shrunk to them); ContinualError naming the file when
    it is missing, damaged, or made with another tokenizer/model (`identity`, the differing key named)."""
    file = Path(file)
    meta, tensors = read_safetensors(file, FORMAT)
    for key, want in (identity or {}).items():
        if meta.get(key, want) != want:
            raise ContinualError(f"{file}: made for another {key.split('_')[0]} ({key} {meta.get(key)!r} vs "
                                 f"{want!r})")
    try:
        tasks, seen = json.loads(meta["tasks"]), json.loads(meta["seen"])
        buf = ReplayBuffer(max_examples, max_bytes, seed)
        for i, task in enumerate(tasks):
            parts = [tensors[f"task{i}.{k}"] for k in range(sum(n.startswith(f"task{i}.") for n in tensors))]
            buf.rows[task], buf.seen[task] = _unstack(parts), int(seen[task])
    except (KeyError, ValueError, IndexError) as e:
        raise ContinualError(f"{file}: damaged replay buffer ({type(e).__name__}: {e})") from None
    first = next((r[0] for r in buf.rows.values() if r), None)
    buf._row_bytes = row_bytes(first) if first is not None else None
    buf._shrink()
    return buf


class ReplayData:
    """A batch source (next_batch / state_dict / load_state_dict, like r1kit.train.data.Mixture) whose batches have
    `round(ratio * rows)` rows replayed from earlier tasks in place of fresh ones; the fresh rows trained on are
    offered to the buffer under the current task."""

    def __init__(self, inner: Any, buffer: ReplayBuffer, ratio: float):
        if not 0 <= ratio <= 1:
            raise ContinualError(f"continual.replay_ratio = {ratio!r}: must be in [0, 1]")
        self.inner, self.buffer, self.ratio = inner, buffer, ratio

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self.inner.next_batch()  # (x, y, mask[, doc_ids]), each (B, T)
        rows = batch[0].shape[0]
        like = tuple(t[0] for t in batch)
        replayed = self.buffer.sample(round(self.ratio * rows), like)
        fresh = rows - len(replayed)
        for i in range(fresh):
            self.buffer.offer(tuple(t[i] for t in batch))
        if not replayed:
            return batch
        if replayed[0][0].shape != like[0].shape:
            raise ContinualError(f"replay: stored rows of {tuple(replayed[0][0].shape)} tokens do not fit this data's "
                                 f"rows of {tuple(like[0].shape)}; use the earlier task's seq_len")
        replayed = [_fit(r, like) for r in replayed]
        return tuple(torch.cat([t[:fresh], torch.stack([r[k] for r in replayed])]) for k, t in enumerate(batch))

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "replay": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.buffer.load_state_dict(state["replay"])
