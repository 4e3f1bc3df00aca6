"""Resumable transfers of content-addressed blobs, checked against their signed length and hash.

A blob's bytes go into one partial file per sha256 (`<store>/tmp/resume/<hex>.partial`)
that outlives the process: a cut link or a killed puller leaves it, and the next pull
asks only for the rest (a read from that offset: a Range request on S3 and HTTPS). Only
content-addressed blobs are resumed: their name is their hash, so the bytes at an
offset can never have changed. Metadata is never resumed; python-tuf fetches it whole.

A finished partial is checked against the TUF-signed `TargetFile`: its length, and the
sha256 computed as the bytes were written (a resumed file's kept bytes are hashed once,
when the run starts), so the file is never read a second time.
If a resumed file fails, the partial is discarded and the blob fetched once more from
the start (a partial can be wrong if the disk lost a write); a second failure is the
hub's, and is refused.

What this module must not do: decide what to pull (pull.py) or install anything (the
model store does, from the verified file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile

from .remotes import Remote

log = logging.getLogger("outpost.sync")


def retryable(exc: tuf_errors.DownloadError) -> bool:
    """A cut, stalled or failing link is worth another try; a refusal by the hub (4xx)
    or more bytes than were signed is not."""
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return False
    return not (isinstance(exc, tuf_errors.DownloadHTTPError) and 400 <= exc.status_code < 500)


def backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Full jitter: devices that lost the hub together do not return together."""
    return random.uniform(0, min(max_s, base_s * 2 ** attempt))


class BlobTransfer:
    """Fetches blobs resumably. A transfer the link cuts is retried from where it stopped,
    `retries` times, after a delay that doubles from `backoff_s` (full jitter, at most
    `max_backoff_s`); a refusal by the hub (4xx) or more bytes than signed is not retried."""

    def __init__(self, resume_dir: Path, remote: Remote,
                 max_rate: float | None = None, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[int], None] | None = None) -> None:
        self.resume_dir = resume_dir
        self.remote = remote
        self.max_rate = max_rate  # bytes a second, None: as fast as the link goes
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep
        self.progress = progress  # called with each chunk's size (a progress bar's update)
        self.transferred = 0  # bytes read from the hub by this transfer object
        self.retried = 0  # cut transfers resumed by a retry

    def partial(self, info: TargetFile) -> Path:
        return self.resume_dir / f"{info.hashes['sha256']}.partial"

    def fetch(self, name: str, info: TargetFile) -> tuple[Path, str]:
        """The verified blob, as a local file (the partial, complete), and its sha256,
        computed as it was written: `ModelStore.adopt` moves it into the store."""
        path = self.partial(info)
        resumed = path.exists() and path.stat().st_size > 0
        digest = _Digest()
        try:
            self._fill_retrying(name, info, path, digest)
            self._verify(info, path, digest)
        except tuf_errors.LengthOrHashMismatchError:
            path.unlink(missing_ok=True)
            if not resumed:
                raise
            digest = _Digest()
            self._fill_retrying(name, info, path, digest)  # the kept bytes were bad: from the start
            self._verify(info, path, digest)
        return path, digest.hexdigest()

    def _fill_retrying(self, name: str, info: TargetFile, path: Path, digest: _Digest) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._fill(name, info, path, digest)
                return
            except tuf_errors.DownloadError as exc:
                if not retryable(exc) or attempt == self.retries:
                    raise
                delay = backoff(attempt, self.backoff_s, self.max_backoff_s)
                log.info("transfer of %s cut (%s); resuming in %.1f s", name, exc, delay)
                self.retried += 1
                self.sleep(delay)

    def _fill(self, name: str, info: TargetFile, path: Path, digest: _Digest) -> None:
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        have = path.stat().st_size if path.exists() else 0
        if have > info.length:  # more than was signed: nothing in it can be trusted
            path.unlink()
            have = 0
        digest.catch_up(path, have)  # bytes a killed run left: hashed once, here
        if have == info.length:
            return
        start = time.monotonic()
        got = 0
        # Writing and hashing run on a thread of their own, in order, while the next
        # chunk arrives (both release the GIL): the check costs no time of its own.
        with open(path, "ab") as out, ThreadPoolExecutor(1, "outpost-sink") as sink:
            pending: deque[Future[None]] = deque()
            for chunk in self.remote.read(name, have):
                if have + got + len(chunk) > info.length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{name} is longer than the {info.length} bytes signed")
                pending.append(sink.submit(_sink, out, digest, chunk))
                while len(pending) > 8 or (pending and pending[0].done()):
                    pending.popleft().result()  # a write error surfaces here
                got += len(chunk)
                self.transferred += len(chunk)
                if self.progress is not None:
                    self.progress(len(chunk))
                if self.max_rate:
                    # Never ahead of the cap: sleep off what this chunk ran ahead.
                    ahead = got / self.max_rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            for done in pending:
                done.result()
            out.flush()
            os.fsync(out.fileno())

    @staticmethod
    def _verify(info: TargetFile, path: Path, digest: _Digest) -> None:
        """Length and hashes against what was signed: the sha256 from the running digest
        (no second read of the file); any other algorithm the hub signed, by reading it."""
        size = path.stat().st_size
        if size != info.length:
            raise tuf_errors.LengthOrHashMismatchError(f"{size} bytes arrived, {info.length} signed")
        if info.hashes.get("sha256") != digest.hexdigest():
            raise tuf_errors.LengthOrHashMismatchError(f"its sha256 is {digest.hexdigest()}, "
                                                       f"{info.hashes.get('sha256')} signed")
        if set(info.hashes) - {"sha256"}:
            with open(path, "rb") as f:
                info.verify_length_and_hashes(f)


def _sink(out, digest: _Digest, chunk: bytes) -> None:
    out.write(chunk)
    out.flush()  # what arrived is kept, whenever the process dies
    digest.update(chunk)


class _Digest:
    """A sha256 of a partial file, kept as bytes are appended; `catch_up` hashes what
    the file holds beyond what was hashed (the bytes an earlier run left)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.hashed = 0

    def catch_up(self, path: Path, size: int) -> None:
        if size < self.hashed:  # the file was restarted
            self._h, self.hashed = hashlib.sha256(), 0
        if size == self.hashed:
            return
        with open(path, "rb") as f:
            f.seek(self.hashed)
            while self.hashed < size and (chunk := f.read(min(1 << 20, size - self.hashed))):
                self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.hashed += len(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
