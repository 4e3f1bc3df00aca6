"""How the CLI prints: JSON for scripts, numbers for people.

Nothing here talks to the daemon or reads the log: it only formats.
"""

from __future__ import annotations

import json
import time
from typing import Any


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def share(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def ago(at: float | None) -> str:
    """A past unix time as 'never', '42 s ago', '5 min ago', '3 h ago', '2 days ago'."""
    if not at:
        return "never"
    s = max(0.0, time.time() - at)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"
