"""`outpost fleet collect`: every device's pushed log batches, as one training file.

Each batch (sync/push.py) holds one redacted request per line with its attempts and
feedback; here each becomes the example `outpost logs export` would write for it (the
same target rules, the same formats: runtime/logs/export.py), with the device's id
added. Exact duplicates across devices are dropped; a batch that cannot be read is
counted and skipped, never half-read into the file.

What this module must not do: run on a device, or change anything on the hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from outpost.manifests.errors import BadRequest
from outpost.runtime.logs.export import FORMATS, choose_target, example
from outpost.sync.deadline import as_sync_error
from outpost.sync.errors import SyncError
from outpost.sync.remotes import Remote


@dataclass
class Collected:
    devices: set[str] = field(default_factory=set)
    batches: int = 0
    requests: int = 0
    examples: int = 0
    duplicates: int = 0
    unreadable: list[str] = field(default_factory=list)  # batch names
    skipped: Counter[str] = field(default_factory=Counter)  # why a request gave no example

    def to_dict(self) -> dict[str, Any]:
        return {"devices": sorted(self.devices), "batches": self.batches, "requests": self.requests,
                "examples": self.examples, "duplicates": self.duplicates,
                "unreadable": self.unreadable, "skipped": dict(self.skipped)}


def _last(attempts: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    found = [a for a in attempts if a.get("kind") == kind]
    return found[-1] if found else None


def record_example(record: dict[str, Any], fmt: str, min_confidence: float) -> tuple[dict[str, Any] | None, str]:
    """(the example for one pushed request, with its device) or (None, why not)."""
    request = record["request"]
    if request.get("error_code"):
        return None, "error"
    feedback = record.get("feedback") or []
    target, source = choose_target(_last(record["attempts"], "local"), _last(record["attempts"], "cloud"),
                                   feedback[-1]["outcome"] if feedback else None, min_confidence, False)
    if target is None:
        return None, source
    params = request.get("params") or {}
    ex = example(request["messages"], record.get("tools"), target, fmt,
                 bool(params.get("parallel_tool_calls", True)))
    return {**ex, "device": record["device"]}, source


def collect(remote: Remote, out: Path, fmt: str = "openai", min_confidence: float = 0.8,
            prefix: str = "logs", progress: Callable[[int], None] | None = None) -> Collected:
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format")
    with as_sync_error("collect"):
        return _collect(remote, out, fmt, min_confidence, prefix, progress)


def _collect(remote: Remote, out: Path, fmt: str, min_confidence: float, prefix: str,
             progress: Callable[[int], None] | None) -> Collected:
    report, seen = Collected(), set()
    tmp = out.with_name(out.name + ".part")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            for name in remote.list(f"{prefix}/"):
                if not name.endswith(".jsonl.zst"):
                    continue
                try:
                    text = zstandard.ZstdDecompressor().decompress(b"".join(remote.read(name))).decode()
                    records = [json.loads(line) for line in text.splitlines() if line]
                except (zstandard.ZstdError, ValueError, UnicodeDecodeError):
                    report.unreadable.append(name)
                    continue
                except Exception as exc:  # a download error: the hub, not the batch
                    raise SyncError(f"cannot read {name} from {remote.url}: {exc}", hub=remote.url) from exc
                report.batches += 1
                for record in records:
                    report.requests += 1
                    report.devices.add(record["device"])
                    ex, why = record_example(record, fmt, min_confidence)
                    if ex is None:
                        report.skipped[why] += 1
                        continue
                    line = json.dumps(ex, ensure_ascii=False, sort_keys=True)
                    digest = hashlib.sha256(json.dumps({k: v for k, v in ex.items() if k != "device"},
                                                       sort_keys=True).encode()).hexdigest()
                    if digest in seen:
                        report.duplicates += 1
                        continue
                    seen.add(digest)
                    f.write(line + "\n")
                    report.examples += 1
                if progress is not None:
                    progress(1)
        tmp.replace(out)
    except BaseException as exc:  # whatever ended it (the disk, the hub, a deadline): no half file stays
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(exc, OSError):
            raise
        raise BadRequest(f"cannot write {out}: {exc.strerror or exc}", field="out", path=str(out)) from None
    return report
