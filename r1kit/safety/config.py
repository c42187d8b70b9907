"""SafetyConfig: the three shields' settings, one validated dataclass read from YAML (configs/safety.yaml).

Keys are checked as TrainConfig checks them (r1kit.train.config's builder): an unknown or mistyped key is an
error that names it and lists the known ones, and out-of-range values name their field.

    input:   {enabled, block_threshold, on_block: error|refuse, refusal, detectors, deny, max_chars, judge...}
    output:  {enabled, policy: {email: placeholder, card: mask, ...}, default_policy, corrections, patterns}
    audit:   {db, content: hash|full, key, checkpoint_every}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_DETECTORS = ("injection", "jailbreak", "extraction", "obfuscation", "unicode", "secrets", "length",
                   "repetition", "deny")
PII_TYPES = ("api_key", "email", "iban", "cn_id", "card", "ssn", "phone", "ip")
POLICIES = ("mask", "placeholder", "block", "off")


class SafetyConfigError(ValueError):
    """A safety config key is unknown, mistyped or out of range. The message names it."""


@dataclass
class InputSection:
    enabled: bool = True
    block_threshold: float = 0.5  # a finding scoring at least this blocks the request
    on_block: str = "error"  # "error": HTTP 400 / InputBlocked; "refuse": answer `refusal` without generating
    refusal: str = "I can't help with that request."
    detectors: list[str] = field(default_factory=lambda: list(INPUT_DETECTORS))
    deny: list[str] = field(default_factory=list)  # regular expressions (case-insensitive): category "deny"
    max_chars: int = 32000  # longer inputs: category "length"
    min_repeat_chars: int = 2000  # inputs at least this long are checked for repetition
    max_compression: float = 12.0  # zlib ratio above which a long input counts as repetitive
    judge: str | None = None  # a guard model folder (Llama-Guard-style), run after the rules
    judge_threshold: float = 0.5  # P("unsafe") at which the judge blocks


@dataclass
class OutputSection:
    enabled: bool = True
    default_policy: str = "placeholder"  # for PII types not in `policy`: mask | placeholder | block | off
    policy: dict[str, str] = field(default_factory=dict)  # PII type -> mask | placeholder | block | off
    corrections: dict[str, str] = field(default_factory=dict)  # whole word/phrase (case-insensitive) -> replacement
    patterns: dict[str, str] = field(default_factory=dict)  # extra types: name -> regular expression
    holdback_chars: int = 64  # streamed text held back so that an item split across tokens is still caught
    blocked_message: str = "[response withheld: it contained {types}]"


@dataclass
class AuditSection:
    db: str | None = None  # SQLite file; None: no audit trail
    content: str = "hash"  # "hash": SHA-256 of prompt and response only; "full": the texts too
    key: str | None = None  # Ed25519 key file (None: DB + ".key", created 0600 on first use)
    checkpoint_every: int = 100  # records between signed checkpoints


@dataclass
class SafetyConfig:
    input: InputSection = field(default_factory=InputSection)
    output: OutputSection = field(default_factory=OutputSection)
    audit: AuditSection = field(default_factory=AuditSection)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        i, o, a = self.input, self.output, self.audit
        _need(0 < i.block_threshold <= 1, "input.block_threshold", i.block_threshold, "must be in (0, 1]")
        _need(0 < i.judge_threshold <= 1, "input.judge_threshold", i.judge_threshold, "must be in (0, 1]")
        _need(i.on_block in ("error", "refuse"), "input.on_block", i.on_block, "must be error or refuse")
        _need(set(i.detectors) <= set(INPUT_DETECTORS), "input.detectors", i.detectors,
              f"unknown detector(s) {sorted(set(i.detectors) - set(INPUT_DETECTORS))}; known: {list(INPUT_DETECTORS)}")
        _need(i.max_chars >= 1, "input.max_chars", i.max_chars, "must be >= 1")
        _need(i.max_compression > 1, "input.max_compression", i.max_compression, "must be > 1")
        for n, rx in enumerate(i.deny):
            _regex(rx, f"input.deny[{n}]")
        known = set(PII_TYPES) | set(o.patterns)
        _need(o.default_policy in POLICIES, "output.default_policy", o.default_policy, f"must be one of {POLICIES}")
        for kind, policy in o.policy.items():
            _need(kind in known, f"output.policy.{kind}", policy, f"unknown type; types: {sorted(known)}")
            _need(policy in POLICIES, f"output.policy.{kind}", policy, f"must be one of {POLICIES}")
        for name, rx in o.patterns.items():
            _need(name not in PII_TYPES, f"output.patterns.{name}", rx, "a built-in type has this name")
            _regex(rx, f"output.patterns.{name}")
        for term, repl in o.corrections.items():
            _need(bool(str(term).strip()) and isinstance(repl, str), f"output.corrections.{term}", repl,
                  "needs a non-empty term and a replacement string")
        _need(o.holdback_chars >= 8, "output.holdback_chars", o.holdback_chars, "must be >= 8")
        _need(a.content in ("hash", "full"), "audit.content", a.content, "must be hash or full")
        _need(a.checkpoint_every >= 1, "audit.checkpoint_every", a.checkpoint_every, "must be >= 1")

    def policy_for(self, kind: str) -> str:
        """The output policy of one PII type."""
        return self.output.policy.get(kind, self.output.default_policy)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "safety config") -> SafetyConfig:
        from r1kit.train.config import TrainConfigError, build_dataclass  # the one key/type checker

        try:
            return build_dataclass(cls, d, where)
        except TrainConfigError as e:
            raise SafetyConfigError(str(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SafetyConfig:
        """Read a YAML file; SafetyConfigError naming the file and key for anything wrong."""
        from r1kit.train.config import TrainConfigError, read_yaml_mapping  # the one YAML reader

        try:
            d = read_yaml_mapping(path, allow_empty=True)
        except TrainConfigError as e:
            raise SafetyConfigError(str(e)) from None
        return cls.from_dict(d, str(path))


def load_config(spec: SafetyConfig | dict | str | Path | None) -> SafetyConfig:
    """A SafetyConfig from itself, a dict, a YAML path, or None (the defaults)."""
    if spec is None:
        return SafetyConfig()
    if isinstance(spec, SafetyConfig):
        return spec
    if isinstance(spec, dict):
        return SafetyConfig.from_dict(spec)
    return SafetyConfig.from_yaml(spec)


def _need(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise SafetyConfigError(f"{name} = {value!r}: {why}")


def _regex(rx: str, name: str) -> None:
    try:
        re.compile(rx)
    except re.error as e:
        raise SafetyConfigError(f"{name} = {rx!r}: not a valid regular expression ({e})") from None
