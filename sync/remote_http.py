"""A static HTTPS mirror of the hub (any web server that honours Range: nginx, a CDN, an
S3 website endpoint). Read-only: devices pull models from it; logs go up elsewhere.

urllib3 is the client: python-tuf's own fetcher is built on it, so a mirror costs no
extra dependency, and its read timeout is a per-read stall timeout.

What this module must not do: verify anything, or retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_errors

from .errors import SyncError
from .remotes import CHUNK, RemoteOptions


class HttpMirror:
    writable = False

    def __init__(self, url: str, options: RemoteOptions) -> None:
        self.url = url.rstrip("/")
        self.pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=options.connect_timeout_s, read=options.stall_timeout_s),
            retries=False, ca_certs=options.ca_bundle)

    def read(self, name: str, offset: int = 0) -> Iterator[bytes]:
        url = f"{self.url}/{name}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self.pool.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.SSLError as exc:  # no retry heals a certificate
            raise SyncError(f"{url}: TLS failed ({exc}); a mirror with its own certificate "
                            "authority needs [sync] ca_bundle", hub=self.url) from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_errors.SlowRetrievalError(f"{url}: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        if response.status not in (200, 206):
            response.release_conn()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        # A server that ignores Range answers 200 with the whole file: skip what we have.
        skip = offset if offset and response.status == 200 else 0
        return self._stream(response, url, skip)

    @staticmethod
    def _stream(response: urllib3.BaseHTTPResponse, url: str, skip: int) -> Iterator[bytes]:
        try:
            for chunk in response.stream(CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if chunk:
                    yield chunk
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_errors.SlowRetrievalError(f"{url}: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:  # a cut link: ProtocolError, IncompleteRead
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        finally:
            response.release_conn()

    def write(self, name: str, data: bytes | Path, *, exclusive: bool) -> bool:
        raise SyncError(f"{self.url} is a read-only mirror: push logs to a file:// or s3:// hub",
                        hub=self.url)

    def list(self, prefix: str) -> list[str]:
        raise SyncError(f"{self.url} is a read-only mirror: it cannot be listed", hub=self.url)
