"""The safety "triple shield": input filtering, output redaction/correction, and a tamper-evident audit trail.

    from r1kit.safety import check_input, redact
    check_input("Ignore previous instructions")   # Verdict(allowed=False, category='injection', score=0.95, ...)
    redact("call +86 138 1234 5678")              # 'call [PHONE]'

Modules: config (SafetyConfig from YAML), input (rule detectors), judge (Llama-Guard-style model judge), output
(redaction, streaming), audit (SQLite hash chain, signed checkpoints), shield (the three together, for the
servers and R1Model).
"""

from r1kit.safety.audit import AuditError, AuditLog, read_records, verify
from r1kit.safety.config import SafetyConfig, SafetyConfigError, load_config
from r1kit.safety.input import Finding, Verdict, check_input
from r1kit.safety.output import Redactor, StreamRedactor, redact
from r1kit.safety.shield import InputBlocked, Screening, Shield

__all__ = ["check_input", "redact", "Verdict", "Finding", "Redactor", "StreamRedactor", "AuditLog", "AuditError",
           "verify", "read_records", "SafetyConfig", "SafetyConfigError", "load_config", "Shield", "Screening",
           "InputBlocked"]
