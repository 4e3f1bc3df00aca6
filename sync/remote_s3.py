"""An S3-compatible hub (AWS S3, MinIO, Cloudflare R2, SeaweedFS…) through boto3.

Why boto3: it is the reference client every S3-compatible store tests against, it is pure
Python (one wheel for a Jetson's aarch64 and a laptop alike, on urllib3, which python-tuf
already brings), and it has each feature this layer needs as a documented parameter:
Range GET, conditional PUT (`IfNoneMatch="*"`, so a retried log batch is never a
duplicate), managed multipart uploads (s3transfer), a per-read socket timeout (the stall
timeout), and the credential chain operators already use (environment, profile, instance
role). It costs ~35 MB installed. minio-py (~0.1 MB, plus pycryptodome ~3 MB) rewrites
unknown PUT headers into user metadata, so `If-None-Match` needs its private API;
obstore (5.6 MB, native) has a whole-request timeout but no stall timeout in its
synchronous API.

boto3's own retries are off: transfer.py resumes a cut read from where it stopped, which
a blind retry would not, and push.py owns its backoff.

Uploads go without `Expect: 100-continue`, which botocore adds to every PUT. Waiting for
that interim answer costs a round trip, and saves only the body of a PUT the hub would
refuse (a log batch is small; a duplicate is refused after the body, by `If-None-Match`,
either way). And in botocore (1.44) a link closed after `HTTP/1.1 100` but before the
blank line that ends the interim answer leaves `_consume_headers` reading `b''` from the
ended socket for ever: no timeout fires, because an ended socket is always readable.
Without the header no interim answer is awaited. (The deadline in deadline.py ends that
loop too, should a later botocore bring it back some other way.)

What this module must not do: verify anything, or retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import boto3
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore import exceptions as boto_errors
from botocore import handlers as boto_handlers
from botocore.config import Config
from tuf.api import exceptions as tuf_errors

from .errors import SyncError
from .remotes import CHUNK, RemoteOptions

MULTIPART_FROM = 64 << 20  # files this large go up in parts (s3transfer), resumable per part


class S3Remote:
    writable = True

    def __init__(self, url: str, options: RemoteOptions) -> None:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise SyncError(f"hub {url!r}: expected s3://bucket/prefix", hub=url)
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        session = boto3.session.Session()
        config = Config(
            connect_timeout=options.connect_timeout_s, read_timeout=options.stall_timeout_s,
            retries={"total_max_attempts": 1}, tcp_keepalive=True,
            # Self-hosted stores (MinIO, SeaweedFS, R2's account endpoint) take path-style
            # addressing; virtual hosts need DNS names per bucket that a LAN rarely has.
            s3={"addressing_style": "path" if options.s3_endpoint else "auto"},
            # No credentials anywhere: read anonymously (a public-read hub).
            signature_version=UNSIGNED if session.get_credentials() is None else None)
        self.client = session.client("s3", endpoint_url=options.s3_endpoint, config=config,
                                     region_name=session.region_name or "us-east-1")
        # Each client has its own copy of the handlers: this one sends no `Expect` (above).
        self.client.meta.events.unregister("before-call.s3", boto_handlers.add_expect_header)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str, offset: int = 0) -> Iterator[bytes]:
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        with _download_errors(self.url, name):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **extra)["Body"]
        return self._stream(body, name)

    def _stream(self, body, name: str) -> Iterator[bytes]:
        try:
            with _download_errors(self.url, name):
                yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def write(self, name: str, data: bytes | Path, *, exclusive: bool) -> bool:
        try:
            if isinstance(data, Path) and data.stat().st_size >= MULTIPART_FROM:
                # Only content-addressed files are this large: a second copy is the same bytes.
                # On this thread: a deadline (a signal, delivered to the main thread) must
                # end the parts' requests, not leave them running on s3transfer's threads.
                self.client.upload_file(str(data), self.bucket, self.key(name),
                                        Config=TransferConfig(use_threads=False))
                return True
            body = data.read_bytes() if isinstance(data, Path) else data
            extra = {"IfNoneMatch": "*"} if exclusive else {}
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body, **extra)
            return True
        except boto_errors.ClientError as exc:
            if exclusive and _status(exc) == 412:  # PreconditionFailed: already there
                return False
            raise SyncError(f"cannot write {name} to {self.url}: {exc}", hub=self.url,
                            name=name, status=_status(exc)) from exc
        except (boto_errors.BotoCoreError, OSError) as exc:
            raise SyncError(f"cannot write {name} to {self.url}: {exc}", hub=self.url,
                            name=name) from exc

    def list(self, prefix: str) -> list[str]:
        names = []
        strip = len(self.key(""))
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key(prefix))
            for page in pages:
                names += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except (boto_errors.ClientError, boto_errors.BotoCoreError) as exc:
            raise SyncError(f"cannot list {prefix} on {self.url}: {exc}", hub=self.url) from exc
        return sorted(names)


def _status(exc: boto_errors.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class _download_errors:
    """boto3's errors as the download errors ngclient and transfer.py understand."""

    def __init__(self, url: str, name: str) -> None:
        self.where = f"{url}/{name}"

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, GeneratorExit):
            return False
        if isinstance(exc, boto_errors.ClientError):
            raise tuf_errors.DownloadHTTPError(f"{self.where}: {exc}", _status(exc)) from exc
        if isinstance(exc, (boto_errors.ReadTimeoutError, boto_errors.ConnectTimeoutError)):
            raise tuf_errors.SlowRetrievalError(f"{self.where}: {exc}") from exc
        if isinstance(exc, (boto_errors.BotoCoreError, urllib3.exceptions.HTTPError, OSError)):
            raise tuf_errors.DownloadError(f"{self.where}: {exc}") from exc
        return False
