"""Server-side chat sessions: a conversation kept under a ``session_id``, so that a client sends only its new
messages each turn (the customer-service scenario).

    store = SessionStore(SessionConfig(policy="truncate", max_turns=32))
    messages = store.history("s1") + new_messages              # what the model sees this turn
    messages, dropped = store.fit(messages, count_tokens, budget)   # bounded by the declared policy
    ... generate the reply ...
    store.record("s1", messages, {"role": "assistant", "content": reply})

A history is bounded twice: at most ``max_turns`` turns are kept (a turn: a user message and what follows it up
to the next one), and the prompt must fit ``budget`` tokens (the context less the reply's room). Over either
bound the oldest turns go, by the declared ``policy``:

  truncate   they are dropped (system messages stay)
  summarize  they are replaced by one system message, "Summary of the earlier conversation: ...", written by
             ``summarizer(dropped_messages) -> str``; the default one is extractive (each dropped message's
             first words, by role), so it needs no model call
  refuse     the request is refused (SessionError: the client should start a new session)

The newest turn is never dropped: when it alone does not fit, SessionError. Sessions unused for ``ttl_s``
seconds expire, and beyond ``max_sessions`` the least recently used one goes. The engine's prefix cache does the
rest: the history's tokens are the previous turn's prompt, so their KV blocks are reused (benchmarks/
bench_sessions.py measures the second turn's time to first token against a cold prompt of the same length).
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POLICIES = ("truncate", "summarize", "refuse")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class SessionError(ValueError):
    """A bad session id, or a conversation its policy cannot fit (``param`` names the request field)."""

    def __init__(self, message: str, param: str = "session_id"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are kept: the overflow ``policy`` (see the module doc), the most turns a history keeps, the
    most sessions held at once, the idle time after which one expires, and a summary's length in characters."""

    policy: str = "truncate"
    max_turns: int = 32
    max_sessions: int = 1024
    ttl_s: float = 3600.0
    summary_chars: int = 600

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"sessions policy = {self.policy!r}: expected one of {', '.join(POLICIES)}")
        for name in ("max_turns", "max_sessions", "ttl_s", "summary_chars"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sessions {name} = {getattr(self, name)!r}: must be positive")


def extractive_summary(messages: Sequence[Mapping[str, Any]], max_chars: int = 600) -> str:
    """The default summarizer: each message's role and first words (tool calls by name), at most ``max_chars``."""
    parts = []
    for m in messages:
        text = m.get("content") or ", ".join(f"called {c['function']['name']}" for c in m.get("tool_calls") or [])
        words = " ".join(str(text).split()[:12])
        parts.append(f"{m.get('role', '?')}: {words}")
    summary = "; ".join(parts)
    return summary if len(summary) <= max_chars else summary[:max_chars - 3] + "..."


def split_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[list[dict]]]:
    """(the leading system messages, the turns): a turn starts at a user message; what precedes the first user
    message (other than system messages) joins the first turn."""
    system, turns = [], []
    for m in messages:
        if m.get("role") == "system" and not turns:
            system.append(dict(m))
        elif m.get("role") == "user" or not turns:
            turns.append([dict(m)])
        else:
            turns[-1].append(dict(m))
    return system, turns


@dataclass
class _Session:
    messages: list[dict]
    used: float


class SessionStore:
    """The sessions of one server (thread-safe). ``summarizer`` replaces the extractive default of the
    summarize policy."""

    def __init__(self, config: SessionConfig | None = None,
                 summarizer: Callable[[Sequence[Mapping[str, Any]]], str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config or SessionConfig()
        self.summarizer = summarizer or (lambda ms: extractive_summary(ms, self.config.summary_chars))
        self._clock, self._lock = clock, threading.Lock()
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()  # least recent first

    @staticmethod
    def check_id(session_id: Any) -> str:
        """``session_id`` if it is 1-128 characters of [A-Za-z0-9_.:-], else SessionError."""
        if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise SessionError(f"session_id = {session_id!r:.60}: expected 1-128 characters of A-Z a-z 0-9 _ . : -")
        return session_id

    def history(self, session_id: str) -> list[dict]:
        """The session's kept messages ([] for a new or expired one)."""
        self.check_id(session_id)
        with self._lock:
            self._expire()
            session = self._sessions.get(session_id)
            return [dict(m) for m in session.messages] if session is not None else []

    def record(self, session_id: str, messages: Sequence[Mapping[str, Any]], reply: Mapping[str, Any]) -> None:
        """Keep ``messages`` (this turn's prompt, as fitted) and the assistant's ``reply`` as the session, cut to
        ``max_turns`` turns by the policy (refuse: the turns beyond are dropped, the next request is refused)."""
        kept = self._bound_turns([*messages, dict(reply)])
        with self._lock:
            self._sessions[self.check_id(session_id)] = _Session(kept, self._clock())
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.config.max_sessions:
                self._sessions.popitem(last=False)

    def delete(self, session_id: str) -> bool:
        """Forget a session; whether it existed."""
        with self._lock:
            return self._sessions.pop(self.check_id(session_id), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def fit(self, messages: Sequence[Mapping[str, Any]], count_tokens: Callable[[list[dict]], int],
            budget: int) -> tuple[list[dict], list[dict]]:
        """(the messages to send, the dropped ones): the oldest turns dropped or summarized until
        ``count_tokens(messages) <= budget`` and at most ``max_turns`` turns remain; SessionError when the policy
        is refuse and something would go, or when the newest turn alone does not fit."""
        system, dropped, turns = _parts(messages)
        while True:
            candidate = self._with_summary(system, dropped) + [m for turn in turns for m in turn]
            if len(turns) <= self.config.max_turns and count_tokens(candidate) <= budget:
                return candidate, dropped
            if len(turns) <= 1:
                raise SessionError(f"the newest turn does not fit the context ({count_tokens(candidate)} tokens "
                                   f"with the kept summary, budget {budget}): send a shorter message",
                                   "messages")
            if self.config.policy == "refuse":
                raise SessionError(f"the session's conversation no longer fits ({len(turns)} turns, budget "
                                   f"{budget} tokens) and its policy is refuse: start a new session")
            dropped += turns.pop(0)

    # ------------------------------------------------------------------------------------------ steps
    def _with_summary(self, system: list[dict], dropped: list[dict]) -> list[dict]:
        """The system messages, then (summarize policy, turns dropped) the summary of the dropped ones."""
        if not dropped or self.config.policy != "summarize":
            return list(system)
        earlier = [m for m in dropped if not _is_summary(m)]
        previous = [m["content"].removeprefix(_SUMMARY) for m in dropped if _is_summary(m)]
        text = " ".join([*previous, self.summarizer(earlier)] if earlier else previous)
        return [*system, {"role": "system", "content": _SUMMARY + text}]

    def _bound_turns(self, messages: list[dict]) -> list[dict]:
        """At most max_turns turns, the older ones dropped by the policy (refuse keeps them: fit refuses)."""
        system, dropped, turns = _parts(messages)
        if len(turns) <= self.config.max_turns or self.config.policy == "refuse":
            return messages
        cut = len(turns) - self.config.max_turns
        dropped += [m for turn in turns[:cut] for m in turn]
        return self._with_summary(system, dropped) + [m for turn in turns[cut:] for m in turn]

    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if now - s.used > self.config.ttl_s]:
            del self._sessions[sid]


_SUMMARY = "Summary of the earlier conversation: "


def _is_summary(message: Mapping[str, Any]) -> bool:
    return message.get("role") == "system" and str(message.get("content", "")).startswith(_SUMMARY)


def _parts(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict], list[list[dict]]]:
    """(system messages, an earlier summary as the first "dropped" message, turns)."""
    system, turns = split_turns(messages)
    return [m for m in system if not _is_summary(m)], [m for m in system if _is_summary(m)], turns
