"""Shield: the three layers for one configuration, as the servers and R1Model use them.

    shield = Shield.from_spec("configs/safety.yaml")
    screening = shield.screen(["user text"], request_id="chatcmpl-1", api_key=key, client="10.0.0.5", model=name)
    stream = screening.stream()                      # a StreamRedactor per choice
    screening.finish(text, stream.counts(), "stop")   # the audit record (written by a background thread)

``screen`` raises InputBlocked (with the verdict) when the input shield blocks and ``on_block`` is "error";
with "refuse" it returns a screening whose ``refusal`` is the text to answer instead. Counters by category for
/metrics: ``stats()``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from r1kit.safety.audit import AuditLog, key_id
from r1kit.safety.config import SafetyConfig, load_config
from r1kit.safety.input import Verdict, check_input
from r1kit.safety.output import Redactor, StreamRedactor

log = logging.getLogger("r1kit")


class InputBlocked(ValueError):
    """The input shield refused a request; ``verdict`` says why."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        super().__init__(f"input blocked by the safety shield: {verdict.category} (score {verdict.score:.2f}): "
                         f"{verdict.evidence[:80]!r}")


@dataclass
class Screening:
    """One request as the shield saw it: its verdict, the audit fields, and the refusal (None: generate)."""

    shield: Shield
    verdict: Verdict
    meta: dict[str, Any] = field(default_factory=dict)
    refusal: str | None = None

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self.shield.redactor)

    def shield_rows(self, pieces: Iterable[tuple[int, str]], rows: int) -> Iterator[tuple[int, str]]:
        """(row, text) pieces of a generation (R1Model's) redacted per row; a row whose output a blocking type
        reaches shows the config's blocked_message instead of the rest. Each row is audited at the end."""
        streams = [self.stream() for _ in range(rows)]
        texts = [""] * rows
        message = self.shield.config.output.blocked_message
        for row, piece in itertools.chain(pieces, ((r, None) for r in range(rows))):  # None: the end of each row
            was_blocked = streams[row].blocked
            out, blocked = streams[row].push(piece or "", final=piece is None)
            if blocked and not was_blocked:
                out = message.format(types=", ".join(sorted({s.kind for s in streams[row].spans
                                                             if s.replacement is None})))
            if out:
                texts[row] += out
                yield row, out
        for row, stream in enumerate(streams):
            self.finish(texts[row], stream.counts(), "content_filter" if stream.blocked else "stop",
                        str(row) if rows > 1 else None)

    def finish(self, response: str | None, redactions: dict[str, int], finish_reason: str | None,
               choice: int | None = None) -> None:
        """Count the redactions and queue the audit record of one choice's response."""
        self.shield.count_redactions(redactions)
        if self.shield.audit is not None:
            rid = self.meta.get("request_id")
            self.shield.record({**self.meta, "request_id": rid if choice is None else f"{rid}/{choice}",
                                "verdict": self.verdict.to_dict(), "redactions": redactions,
                                "finish_reason": finish_reason, "response": response})


class Shield:
    """Input shield (+ optional judge), output redactor and audit log of one SafetyConfig."""

    WRITE_DELAY = 0.2  # seconds the audit writer gathers records before one transaction

    def __init__(self, config: SafetyConfig | None = None, judge: Any = None):
        self.config = cfg = config or SafetyConfig()
        self.redactor = Redactor(cfg)
        self.judge = judge
        if judge is None and cfg.input.judge:
            from r1kit.api import R1Model
            from r1kit.safety.judge import Judge

            self.judge = Judge(R1Model.from_pretrained(cfg.input.judge), cfg.input.judge_threshold)
        self.audit = AuditLog(cfg.audit.db, cfg.audit.content, cfg.audit.key, cfg.audit.checkpoint_every) \
            if cfg.audit.db else None
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write, name="r1kit-audit", daemon=True) if self.audit else None
        if self._writer is not None:
            self._writer.start()

    @classmethod
    def from_spec(cls, spec: Shield | SafetyConfig | dict | str | None) -> Shield:
        return spec if isinstance(spec, Shield) else cls(load_config(spec))

    # ------------------------------------------------------------------------------------------ input
    def screen(self, texts: list[str], *, request_id: str | None = None, api_key: str | None = None,
               client: str | None = None, model: str | None = None, params: dict[str, Any] | None = None
               ) -> Screening:
        """Check a request's texts (joined); raises InputBlocked, or returns the screening (refusal set when
        the verdict blocks and on_block is "refuse"). A blocked request is audited at once."""
        text = "\n".join(texts)
        verdict = check_input(text, self.config)
        if verdict.allowed and self.judge is not None and self.config.input.enabled:
            verdict = self.judge.check(text)
        meta = {"request_id": request_id, "api_key_id": key_id(api_key), "client": client, "model": model,
                "params": params, "prompt": text}
        screening = Screening(self, verdict, meta)
        with self._lock:
            self._counts[f"input_{verdict.category or 'allowed'}"] += 1
            if not verdict.allowed:
                self._counts["input_blocked"] += 1
        if verdict.allowed:
            return screening
        if self.config.input.on_block == "refuse":
            screening.refusal = self.config.input.refusal
            screening.finish(screening.refusal, {}, "content_filter")
            return screening
        screening.finish(None, {}, "content_filter")
        raise InputBlocked(verdict)

    def unscreened(self, **meta: Any) -> Screening:
        """A screening for a request that did not pass the input shield (e.g. token ids only): output and audit."""
        return Screening(self, Verdict(True), {"request_id": None, **meta})

    # ------------------------------------------------------------------------------------------ output and audit
    def count_redactions(self, counts: dict[str, int]) -> None:
        if counts:
            with self._lock:
                for kind, n in counts.items():
                    self._counts[f"redacted_{kind}"] += n

    def record(self, row: dict[str, Any]) -> None:
        """Queue an audit record (the writer thread appends it)."""
        if self.audit is not None:
            self._queue.put(row)

    def _write(self) -> None:
        """The writer thread: what arrives within WRITE_DELAY of a record goes in the same transaction (one wake-up
        of this thread per batch: each one takes the GIL from the server's threads for a while)."""
        while True:
            rows = [self._queue.get()]
            if rows[0] is not None:
                time.sleep(self.WRITE_DELAY)
            while rows[-1] is not None and not self._queue.empty():
                rows.append(self._queue.get_nowait())
            batch = [r for r in rows if r is not None]
            try:
                if batch:
                    self.audit.append_many(batch)
            except Exception:  # noqa: BLE001 - a failed write must not stop the writer
                log.exception("audit: could not append %d record(s), first %s", len(batch), batch[0].get("request_id"))
            finally:
                for _ in rows:
                    self._queue.task_done()
            if rows[-1] is None:
                return

    def flush(self) -> None:
        """Wait until every queued audit record is written."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        """Write what is queued, sign a last checkpoint, close the database."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
            self.audit.close()

    def stats(self) -> dict[str, int]:
        """Counters: input_<category> (input_allowed), input_blocked, redacted_<type>."""
        with self._lock:
            return dict(self._counts)
