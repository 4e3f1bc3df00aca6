"""Where a fleet's hub lives, behind one small interface: read from an offset, write a
new object, list a prefix. Three kinds, chosen by the URL's scheme:

    file:///path          a folder (NFS, a USB stick carried between sites); both directions
    s3://bucket/prefix    any S3-compatible store (remote_s3.py); both directions
    https://host/path     a static mirror that honours Range (remote_http.py); models only

Names are relative to the hub's root ("metadata/timestamp.json", "targets/blobs/…",
"logs/<device>/…"). Reads raise python-tuf's download errors (a 404 as
`DownloadHTTPError`, a stalled link as `SlowRetrievalError`, a cut one as `DownloadError`)
because ngclient's fetcher must, and transfer.py retries by them; writes and listings
raise `SyncError`. Every operation runs under a wall-clock deadline (`Bounded`,
deadline.py) besides the stall timeout: a link or hub that never ends an answer cannot
hold a device.

What this module must not do: verify anything (the callers check signatures and hashes),
or retry (transfer.py and push.py decide what is worth another try).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from tuf.api import exceptions as tuf_errors

from outpost.manifests.sources import fsync_dir
from outpost.runtime.config import SyncSettings

from .deadline import deadline
from .errors import SyncError

CHUNK = 1 << 18  # 256 KiB: few Python steps per MB, and little lost to a kill


class _OneLine(logging.Filter):
    """urllib3 logs an answer whose headers a cut link truncated with its whole traceback
    ("Failed to parse headers"); the sync layer retries or confirms that request, so the
    operator needs the one line, not a stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("urllib3.connection").addFilter(_OneLine())


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach a hub; from `[sync]` (config.py)."""

    stall_timeout_s: float = 30.0  # a transfer that receives nothing this long is cut and retried
    connect_timeout_s: float = 10.0
    s3_endpoint: str | None = None  # None: boto3's own (AWS_ENDPOINT_URL, the profile, AWS)
    ca_bundle: str | None = None  # None: the system's CAs (an HTTPS mirror's certificate)
    # Every operation's wall-clock deadline (deadline.py): this many seconds, plus its
    # bytes at `min_rate` (a write's size; a read earns it per byte as they arrive).
    deadline_s: float = 300.0
    min_rate: float = 8 * 1024

    @classmethod
    def from_settings(cls, sync: SyncSettings) -> RemoteOptions:
        # A capped transfer may not be held to a floor above its own cap.
        floor = min(sync.min_rate, sync.max_rate) if sync.max_rate else sync.min_rate
        return cls(stall_timeout_s=sync.stall_timeout_s, s3_endpoint=sync.s3_endpoint,
                   ca_bundle=str(sync.ca_bundle) if sync.ca_bundle else None,
                   deadline_s=sync.deadline_s, min_rate=floor)


class Remote(Protocol):
    url: str  # as given: file:///…, s3://…, https://…
    writable: bool

    def read(self, name: str, offset: int = 0) -> Iterator[bytes]:
        """The object's bytes from `offset` on (a Range request on the wire)."""
        ...

    def write(self, name: str, data: bytes | Path, *, exclusive: bool) -> bool:
        """Store `data` (bytes, or a local file's); with `exclusive`, only if nothing is there yet (S3's
        `If-None-Match: *`): False when something was, and it is left as it is."""
        ...

    def list(self, prefix: str) -> list[str]:
        """The names under `prefix`, sorted."""
        ...


def open_remote(url: str, options: RemoteOptions | None = None) -> Remote:
    """The hub at `url`, each of its operations under a deadline (`Bounded`)."""
    options = options or RemoteOptions()
    scheme = urlparse(url).scheme
    remote: Remote
    if scheme == "file":
        remote = FolderRemote(url)
    elif scheme == "s3":
        from .remote_s3 import S3Remote  # noqa: PLC0415 (boto3 loads only for S3 hubs)

        remote = S3Remote(url, options)
    elif scheme in ("https", "http"):
        from .remote_http import HttpMirror  # noqa: PLC0415

        remote = HttpMirror(url, options)
    else:
        raise SyncError(f"hub {url!r}: expected file:///path, s3://bucket/prefix or https://host/path",
                        hub=url)
    return Bounded(remote, options.deadline_s, options.min_rate)


class Bounded:
    """A remote whose every read, write and listing runs under a wall-clock deadline:
    `deadline_s`, plus the operation's bytes at `min_rate`. Here, at the one interface
    every caller goes through (python-tuf's fetcher, transfer.py, push.py, the fleet
    commands), no caller can leave one out. A passed deadline raises DeadlineExceeded
    in whatever runs then; the entry points turn it into SyncDeadline."""

    def __init__(self, inner: Remote, deadline_s: float, min_rate: float) -> None:
        self.inner = inner
        self.url, self.writable = inner.url, inner.writable
        self.deadline_s, self.min_rate = deadline_s, min_rate

    def read(self, name: str, offset: int = 0) -> Iterator[bytes]:
        # The clock runs from the request to the stream's end or close, the consumer's
        # work between chunks included (a capped rate is within the floor; see RemoteOptions).
        with deadline(f"read {name} from {self.url}", self.deadline_s) as clock:
            for chunk in self.inner.read(name, offset):
                clock.allow(len(chunk) / self.min_rate)
                yield chunk

    def write(self, name: str, data: bytes | Path, *, exclusive: bool) -> bool:
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        with deadline(f"write {name} to {self.url}", self.deadline_s + size / self.min_rate):
            return self.inner.write(name, data, exclusive=exclusive)

    def list(self, prefix: str) -> list[str]:
        with deadline(f"list {prefix} on {self.url}", self.deadline_s):
            return self.inner.list(prefix)


class FolderRemote:
    """A hub that is a folder. Writes go to a temp name, are fsynced, then renamed (or
    linked, for an exclusive write: link fails if the name exists, atomically)."""

    writable = True

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.root = Path(unquote(urlparse(url).path))

    def read(self, name: str, offset: int = 0) -> Iterator[bytes]:
        path = self.root / name
        if not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"{path} does not exist", 404)
        return _read_file(path, offset)

    def write(self, name: str, data: bytes | Path, *, exclusive: bool) -> bool:
        path = self.root / name
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        shutil.copyfileobj(src, f, CHUNK)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not exclusive:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic: fails if the name exists
                except FileExistsError:
                    return False
                except OSError:
                    # FAT and exFAT (most USB sticks) have no hard links. Exclusive writes
                    # name content by its hash, so two writers of one name write the same
                    # bytes, and check-then-rename is enough.
                    if path.exists():
                        return False
                    os.replace(tmp, path)
            fsync_dir(path.parent)  # the name survives a power cut, like its bytes
            return True
        except OSError as exc:
            raise SyncError(f"cannot write {path}: {exc}", hub=self.url, name=name) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))


def _read_file(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            yield chunk
