"""The output shield: each PII type with its checksum (valid numbers redacted, near-misses kept), policies,
corrections, and the streaming redactor against the whole-text one on random splits."""

from __future__ import annotations

import random

import pytest

from r1kit.safety import Redactor, SafetyConfig, StreamRedactor, redact
from r1kit.safety.output import cn_id_ok, iban_ok, luhn_ok


def luhn_reference(number: str) -> bool:
    """Luhn by its definition: double every second digit from the right, sum the digits of the results."""
    digits = [int(c) for c in number][::-1]
    return sum(d if i % 2 == 0 else sum(divmod(2 * d, 10)) for i, d in enumerate(digits)) % 10 == 0


def test_checksums_against_references_and_published_examples():
    rng = random.Random(0)
    for _ in range(2000):
        n = "".join(rng.choice("0123456789") for _ in range(rng.randint(13, 19)))
        assert luhn_ok(n) == luhn_reference(n)
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")  # ECBS examples
    assert not iban_ok("GB82WEST12345698765433") and not iban_ok("DE88370400440532013000")
    assert cn_id_ok("11010519491231002X") and not cn_id_ok("110105194912310021")  # GB 11643 example


@pytest.mark.parametrize("text, expected", [
    ("write to ann.lee+x@mail.example.co.uk today", "write to [EMAIL] today"),
    ("call +1 415-555-0132 or +44 20 7946 0958.", "call [PHONE] or [PHONE]."),
    ("请拨打13812345678联系我，或者138 1234 5678", "请拨打[PHONE]联系我，或者[PHONE]"),
    ("office (415) 555-0132", "office [PHONE]"),
    ("card 4111 1111 1111 1111, not 4111 1111 1111 1112", "card [CARD], not 4111 1111 1111 1112"),
    ("pay GB82 WEST 1234 5698 7654 32 NOW, not GB82 WEST 1234 5698 7654 33", "pay [IBAN] NOW, not GB82 WEST 1234 "
     "5698 7654 33"),
    ("身份证号11010519491231002X，错误的110105194912310021", "身份证号[CN_ID]，错误的110105194912310021"),
    ("SSN 078-05-1120; never issued: 000-12-3456, 666-12-3456, 912-12-3456", "SSN [SSN]; never issued: "
     "000-12-3456, 666-12-3456, 912-12-3456"),
    ("server 10.0.0.255 and 2001:db8::8a2e:370:7334; not 300.1.2.3 or 12:30:45", "server [IP] and [IP]; not "
     "300.1.2.3 or 12:30:45"),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz0123", "OPENAI_API_KEY=[API_KEY]"),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "aws [API_KEY] ok"),
    ("no PII here: version 3.11, 42 apples, ISO 8601", "no PII here: version 3.11, 42 apples, ISO 8601"),
])
def test_each_type_redacted_and_near_misses_kept(text, expected):
    assert redact(text) == expected


def test_policies_mask_block_off_and_corrections():
    cfg = SafetyConfig.from_dict({"output": {"policy": {"card": "mask", "email": "mask", "ssn": "block", "ip": "off"},
                                             "corrections": {"chairman": "chair"}}})
    assert redact("4111-1111-1111-1111 ann@x.org 10.0.0.1 The Chairman", cfg) == \
        "****-****-****-1111 a**@x.org 10.0.0.1 The chair"
    assert redact("my ssn is 078-05-1120", cfg) == "[response withheld: it contained ssn]"
    custom = SafetyConfig.from_dict({"output": {"patterns": {"ticket": r"\bTKT-\d{4}\b"}}})
    assert redact("see TKT-1234", custom) == "see [TICKET]"
    assert redact("ann@x.org", SafetyConfig.from_dict({"output": {"enabled": False}})) == "ann@x.org"


CORPUS = ("Hello! Reach Ann at ann.lee@example.com or +1 415-555-0132; her card 4111 1111 1111 1111 was charged. "
          "转账到账户 GB82 WEST 1234 5698 7654 32，联系人手机13812345678，身份证11010519491231002X。 "
          "Logs show 192.168.10.20 and key ghp_" + "Ab1" * 12 + " plus SSN 078-05-1120. " * 2
          + "Near misses: 4111 1111 1111 1112, 000-12-3456, 110105194912310021. " + "filler text " * 12)


@pytest.mark.parametrize("seed", range(12))
def test_streaming_equals_whole_text_on_random_splits(seed):
    redactor, rng = Redactor(), random.Random(seed)
    stream, out, i = StreamRedactor(redactor), [], 0
    while i < len(CORPUS):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13])
        piece, blocked = stream.push(CORPUS[i:i + n])
        assert not blocked
        out.append(piece)
        i += n
    out.append(stream.push("", final=True)[0])
    assert "".join(out) == redactor.apply(CORPUS).text
    assert "4111 1111 1111 1111" not in "".join(out) and "13812345678" not in "".join(out)
    assert stream.counts() == redactor.apply(CORPUS).counts()


def test_streaming_block_stops_before_the_item_is_released():
    cfg = SafetyConfig.from_dict({"output": {"policy": {"card": "block"}}})
    stream = StreamRedactor(Redactor(cfg))
    text = "ok " * 40 + "card 4111 1111 1111 1111 and more text " * 3
    released = "".join(stream.push(c)[0] for c in text)
    assert stream.blocked and "4111" not in released and released.startswith("ok ok")
    assert stream.push("more", final=True) == ("", True)
