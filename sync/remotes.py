"""Where a fleet's hub lives, behind one small interface: read from an offset, write a
new object, list a prefix. Three kinds, chosen by the URL's scheme:

    file:///path          a folder (NFS, a USB stick carried between sites); both directions
    s3://bucket/prefix    any S3-compatible store (remote_s3.py); both directions
    https://host/path     a static mirror that honours Range (remote_http.py); models only

Names are relative to the hub's root ("metadata/timestamp.json", "targets/blobs/…",
"logs/<device>/…"). Reads raise python-tuf's download errors (a 404 as
`DownloadHTTPError`, a stalled link as `SlowRetrievalError`, a cut one as `DownloadError`)
because ngclient's fetcher must, and transfer.py retries by them; writes and listings
raise `SyncError`.

What this module must not do: verify anything (the callers check signatures and hashes),
or retry (transfer.py and push.py decide what is worth another try).
"""

from __future__ import annotations

import contextlib
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

from .errors import SyncError

CHUNK = 1 << 18  # 256 KiB: few Python steps per MB, and little lost to a kill


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach a hub; from `[sync]` (config.py)."""

    stall_timeout_s: float = 30.0  # a transfer that receives nothing this long is cut and retried
    connect_timeout_s: float = 10.0
    s3_endpoint: str | None = None  # None: boto3's own (AWS_ENDPOINT_URL, the profile, AWS)
    ca_bundle: str | None = None  # None: the system's CAs (an HTTPS mirror's certificate)

    @classmethod
    def from_settings(cls, sync: SyncSettings) -> RemoteOptions:
        return cls(stall_timeout_s=sync.stall_timeout_s, s3_endpoint=sync.s3_endpoint,
                   ca_bundle=str(sync.ca_bundle) if sync.ca_bundle else None)


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
    options = options or RemoteOptions()
    scheme = urlparse(url).scheme
    if scheme == "file":
        return FolderRemote(url)
    if scheme == "s3":
        from .remote_s3 import S3Remote  # noqa: PLC0415 (boto3 loads only for S3 hubs)

        return S3Remote(url, options)
    if scheme in ("https", "http"):
        from .remote_http import HttpMirror  # noqa: PLC0415

        return HttpMirror(url, options)
    raise SyncError(f"hub {url!r}: expected file:///path, s3://bucket/prefix or https://host/path",
                    hub=url)


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
