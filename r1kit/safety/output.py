"""The output shield: PII and secret redaction (checksums where the format has one), correction rules, and the
streaming form that holds text back just long enough to catch an item split across tokens.

    redact("mail me at ann@example.com")                     # 'mail me at [EMAIL]'
    stream = StreamRedactor(Redactor(config))
    out, blocked = stream.push(piece)                       # per generated piece; push("", final=True) at the end

Types: api_key (provider formats, see r1kit.safety.patterns), email, iban (mod-97), cn_id (Chinese resident ID,
ISO 7064 MOD 11-2 check digit), card (13-19 digits, Luhn), ssn (US, with the SSA's never-issued ranges excluded),
phone (E.164, North American, Chinese mobile, national numbers with a trunk 0), ip (IPv4, IPv6). Policy per type:
``mask`` (all but the last 4 characters starred; an email keeps its first letter and domain), ``placeholder``
(``[EMAIL]``), ``block`` (the whole response is withheld; streamed: it stops with finish_reason content_filter)
or ``off``. Where two items overlap, the type earlier in that list wins.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from r1kit.safety.config import PII_TYPES, SafetyConfig, load_config
from r1kit.safety.patterns import ASSIGNED_SECRET, SECRET_PATTERNS


@dataclass(frozen=True)
class Span:
    """One item found in the text: its type, where it is, and what replaces it (None: the policy blocks)."""

    kind: str
    start: int
    end: int
    replacement: str | None


@dataclass
class RedactionResult:
    text: str
    spans: list[Span]
    blocked: bool

    def counts(self) -> dict[str, int]:
        """Items redacted (or blocking) per type."""
        out: dict[str, int] = {}
        for s in self.spans:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out


# ---------------------------------------------------------------------------------------------------- checksums
def luhn_ok(digits: str) -> bool:
    """The Luhn check of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country code and check digits moved to the end, letters as 10..35, mod 97 == 1."""
    s = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}", s):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def cn_id_ok(number: str) -> bool:
    """GB 11643-1999: the 18th character is the ISO 7064 MOD 11-2 check of the first 17 digits."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(c) * w for c, w in zip(number[:17], weights, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


def _ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# IBAN lengths of the countries whose accounts are most often seen (others: any length whose checksum holds)
_IBAN_LENGTH = {"AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20,
                "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27,
                "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
                "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "TR": 26, "AE": 23, "BR": 29, "IL": 23}


def _iban_end(text: str, m: re.Match[str]) -> int | None:
    """Where the valid IBAN starting at m.start() ends (the candidate may have swallowed a following word)."""
    compact_pos = [i for i in range(m.start(), m.end()) if text[i] != " "]
    lengths = [_IBAN_LENGTH[m.group(0)[:2]]] if m.group(0)[:2] in _IBAN_LENGTH else range(len(compact_pos), 14, -1)
    for n in lengths:
        if n <= len(compact_pos) and iban_ok("".join(text[i] for i in compact_pos[:n])):
            end = compact_pos[n - 1] + 1
            if end == len(text) or not (text[end].isascii() and text[end].isalnum()):
                return end
    return None


# ---------------------------------------------------------------------------------------------------- detectors
_D = "(?<![0-9+])(?<![0-9][ .-])"  # not inside a longer number (a group of it, or after a +)
_ND = "(?![0-9])"
Check = Callable[[str], bool]

# (type, regex, check of the matched text or None)
DETECTORS: list[tuple[str, re.Pattern[str], Check | None]] = [
    ("email", re.compile(r"(?<![A-Za-z0-9_.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}"
                         r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}"
                         r"(?![A-Za-z0-9-])"), None),
    ("iban", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![a-z0-9])"), None),  # see _iban_end
    ("cn_id", re.compile(_D + r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}"
                         r"[0-9Xx](?![0-9A-Za-z])"), cn_id_ok),
    ("card", re.compile(_D + r"[2-6](?:[ -]?[0-9]){12,18}" + _ND),  # issuer ranges 2-6
     lambda t: len(set(re.sub(r"[0-9]", "", t))) <= 1 and luhn_ok(re.sub(r"[ -]", "", t))),
    ("ssn", re.compile(_D + r"(?!000|666|9[0-9]{2})[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}" + _ND), None),
    ("phone", re.compile(r"(?<![A-Za-z0-9_+])\+[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6}" + _ND),
     lambda t: 8 <= len(re.sub(r"[^0-9]", "", t)) <= 15),
    ("phone", re.compile(_D + r"(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[-. ])[2-9][0-9]{2}[-. ][0-9]{4}" + _ND), None),
    ("phone", re.compile(_D + r"1[3-9][0-9](?:[ -]?[0-9]{4}){2}" + _ND), None),  # Chinese mobile
    ("phone", re.compile(_D + r"0[1-9][0-9]{1,3}[ -][0-9]{3,4}[ -]?[0-9]{3,4}" + _ND), None),  # national, trunk 0
    ("ip", re.compile(r"(?<![0-9.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
                      r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?![0-9]|\.[0-9])"), None),
    ("ip", re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){1,7}:?(?::?[0-9A-Fa-f]{1,4}){1,7}(?![0-9A-Fa-f:])|"
                      r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){1,7}:(?![0-9A-Fa-f:])"), _ip_ok),
]
_RANK = {kind: i for i, kind in enumerate(PII_TYPES)}


class Redactor:
    """The output shield of one SafetyConfig: find(), apply(). Compiled once; thread-safe (no state)."""

    def __init__(self, config: SafetyConfig | None = None):
        self.config = cfg = config or SafetyConfig()
        self.policy = {kind: cfg.policy_for(kind) for kind in [*PII_TYPES, *cfg.output.patterns]}
        self.detectors = [(k, rx, check) for k, rx, check in DETECTORS if self.policy[k] != "off"]
        self.detectors += [(k, re.compile(rx), None) for k, rx in cfg.output.patterns.items()
                           if self.policy[k] != "off"]
        self.corrections = [(re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", re.I), repl)
                            for term, repl in cfg.output.corrections.items()]
        self.holdback = max(cfg.output.holdback_chars, *(len(t) + 1 for t in cfg.output.corrections), 8)
        self.enabled = cfg.output.enabled and bool(self.detectors or self.corrections)

    def find(self, text: str, pos: int = 0) -> list[Span]:
        """The items in text[pos:] (the text before pos is context for look-behinds), in order, not overlapping."""
        found: list[tuple[int, int, int, str]] = []  # (rank, start, end, kind)
        if self.policy["api_key"] != "off":
            found += [(0, m.start(), m.end(), "api_key") for _, rx in SECRET_PATTERNS for m in rx.finditer(text, pos)]
            found += [(0, m.start("value"), m.end("value"), "api_key") for m in ASSIGNED_SECRET.finditer(text, pos)]
        for kind, rx, check in self.detectors:
            for m in rx.finditer(text, pos):
                end = _iban_end(text, m) if kind == "iban" else m.end() if check is None or check(m.group(0)) else None
                if end is not None:
                    found.append((_RANK.get(kind, len(_RANK)), m.start(), end, kind))
        found += [(len(_RANK) + 1, m.start(), m.end(), "correction:" + repl) for rx, repl in self.corrections
                  for m in rx.finditer(text, pos)]
        return self._resolve(text, found)

    def _resolve(self, text: str, found: list[tuple[int, int, int, str]]) -> list[Span]:
        """Keep the best-ranked item where items overlap (then the longer, then the earlier); make replacements."""
        taken: list[Span] = []
        for _, start, end, kind in sorted(found, key=lambda f: (f[0], f[1] - f[2], f[1])):
            if all(end <= s.start or start >= s.end for s in taken):
                if kind.startswith("correction:"):
                    taken.append(Span("correction", start, end, kind.removeprefix("correction:")))
                else:
                    taken.append(Span(kind, start, end, self._replacement(kind, text[start:end])))
        return sorted(taken, key=lambda s: s.start)

    def _replacement(self, kind: str, item: str) -> str | None:
        policy = self.policy[kind]
        if policy == "block":
            return None
        if policy == "placeholder":
            return f"[{kind.upper()}]"
        return mask(item, kind)

    def apply(self, text: str) -> RedactionResult:
        """The whole text redacted; blocked: the text is the config's blocked_message naming the types."""
        if not self.enabled:
            return RedactionResult(text, [], False)
        spans = self.find(text)
        blocked = sorted({s.kind for s in spans if s.replacement is None})
        if blocked:
            return RedactionResult(self.config.output.blocked_message.format(types=", ".join(blocked)), spans, True)
        return RedactionResult(substitute(text, spans), spans, False)


def substitute(text: str, spans: list[Span], offset: int = 0) -> str:
    """text with each span (positions relative to ``offset``) replaced."""
    out, at = [], 0
    for s in spans:
        out += [text[at: s.start - offset], s.replacement or ""]
        at = s.end - offset
    out.append(text[at:])
    return "".join(out)


def mask(item: str, kind: str) -> str:
    """Letters and digits starred but the last 4 (an email: its first letter and its domain kept)."""
    if kind == "email":
        local, domain = item.split("@", 1)
        return local[0] + "*" * (len(local) - 1) + "@" + domain
    keep = 4 if sum(c.isalnum() for c in item) > 6 else 0
    out, seen = [], 0
    for c in reversed(item):
        if c.isalnum():
            seen += 1
            out.append(c if seen <= keep else "*")
        else:
            out.append(c)
    return "".join(reversed(out))


class StreamRedactor:
    """Redaction of text that arrives in pieces: each push releases the redacted text that can no longer be part
    of an item (all but the last ``holdback`` characters, and never part of an item found so far); the final
    push releases the rest. Once a blocking item is seen, nothing more is released (blocked stays True)."""

    CONTEXT = 16  # released characters kept for the look-behinds at the start of the held text
    RELEASE = 16  # text is released in pieces of at least this many characters: a scan per ~4 tokens, not per token

    def __init__(self, redactor: Redactor):
        self.redactor = redactor
        self.held = ""
        self.context = ""
        self.spans: list[Span] = []
        self.blocked = False

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(the text released now, blocked)."""
        if self.blocked:
            return "", True
        if not self.redactor.enabled:
            return text, False
        self.held += text
        s, pos = self.context + self.held, len(self.context)
        cut = len(s) if final else len(s) - self.redactor.holdback
        if cut <= pos or (not final and cut - pos < self.RELEASE):
            return "", False
        spans = self.redactor.find(s, pos)
        for sp in spans:
            if sp.start < cut < sp.end:
                cut = sp.start  # never release part of an item
        done = [sp for sp in spans if sp.end <= cut]
        self.spans += done
        if any(sp.replacement is None for sp in done):
            self.blocked, self.held = True, ""
            return "", True
        out = substitute(s[pos:cut], done, offset=pos)
        self.context, self.held = s[max(0, cut - self.CONTEXT): cut], s[cut:]
        return out, False

    def counts(self) -> dict[str, int]:
        return RedactionResult("", self.spans, self.blocked).counts()


_CACHE: dict[int, tuple[SafetyConfig, Redactor]] = {}


def redactor_for(config: SafetyConfig | dict | str | None = None) -> Redactor:
    """The Redactor of a config (compiled once per config object)."""
    cfg = load_config(config)
    hit = _CACHE.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        hit = _CACHE[id(cfg)] = (cfg, Redactor(cfg))
    return hit[1]


def redact(text: str, config: SafetyConfig | dict | str | None = None) -> str:
    """``text`` with PII, secrets and correction terms replaced as the config's output policy says (a blocking
    type: the config's blocked_message instead of the text)."""
    return redactor_for(config).apply(text).text
