"""PII redaction for data that leaves the device: exports now, log sync later.

Each kind is a pattern plus, where a pattern alone would hit innocent text, a check
on the match: a card number must pass the Luhn checksum, an IPv6 address must parse.
A match is replaced by its kind in brackets (`[EMAIL]`), so a fine-tuned model
learns the shape of a conversation, not the secret, and every replacement is
counted per kind.

Kinds run in order, most specific first: an API key can contain digit runs that
look like a phone number, an email's domain can look like a host name.

What is not caught: names, postal addresses and free-form identifiers. Plain digit
runs without separators or a leading `+` are not taken for phone numbers (order
numbers and quantities look the same); configure a pattern for your own formats.

What this module must not do: decide what is exported (export.py); it only rewrites
strings.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def luhn_ok(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if double:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        double = not double
    return total % 10 == 0


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _ipv6(match: re.Match[str]) -> bool:
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return False
    return True


def _opaque_token(match: re.Match[str]) -> bool:
    # A long run of letters and digits mixing cases and digits reads as a secret; a
    # hex digest or a long word does not.
    s = match.group()
    return (any(c.isdigit() for c in s) and any(c.isupper() for c in s)
            and any(c.islower() for c in s))


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# (kind, pattern, check): the check, when given, must accept the match.
BUILTIN: list[tuple[str, str, Callable[[re.Match[str]], bool] | None]] = [
    ("api_key", r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{30,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
                r"|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})", None),
    ("api_key", r"\b[A-Za-z0-9_\-]{32,}\b", _opaque_token),
    ("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b", None),
    ("card", r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])", _card),
    ("ip", rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])", None),
    ("ip", r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])", _ipv6),
    ("phone", r"(?<![\w.+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}[\s.-]?\d{2,4}(?:[\s.-]?\d{2,4})?"
              r"|\(\d{2,4}\)[\s.-]?\d{3,4}[\s.-]?\d{3,4}"
              r"|\d{3}[.-]\d{3}[.-]\d{4}|\d{2,4}[ ]\d{3,4}[ ]\d{3,4})(?!\w|[.-]\d)", None),
]


@dataclass
class Redactor:
    """Redacts strings and every string inside a JSON value; counts per kind."""

    extra: dict[str, str] = field(default_factory=dict)  # name -> regex, from config
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        rules = [(kind, re.compile(p), check) for kind, p, check in BUILTIN]
        # Configured patterns first: an operator's own format beats a generic guess.
        self._rules = [(name, re.compile(p), None) for name, p in self.extra.items()] + rules

    def text(self, s: str) -> str:
        for kind, pattern, check in self._rules:
            def swap(m: re.Match[str], kind: str = kind, check: Any = check) -> str:
                if check is not None and not check(m):
                    return m.group()
                self.counts[kind] += 1
                return f"[{kind.upper()}]"
            s = pattern.sub(swap, s)
        return s

    def value(self, obj: Any) -> Any:
        """Redact every string in a JSON value (keys are schema, not data: kept)."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, dict):
            return {k: self.value(v) for k, v in obj.items()}
        return obj
