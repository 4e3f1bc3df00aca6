"""Why a sync did not happen. python-tuf's exceptions are translated here, at the one
boundary where the sync layer calls it, into Outpost's tree (runtime/errors.py lists it).

What this module must not do: import anything above `outpost.manifests.errors`.
"""

from __future__ import annotations

from typing import Any

from outpost.manifests.errors import OutpostError


class SyncError(OutpostError):
    """The hub could not be reached or read; nothing installed changed."""

    code = "sync_failed"


class SyncUntrusted(SyncError):
    """The hub's metadata or files failed verification (a bad or missing signature, a
    rollback, expired or oversized metadata, a file that is not what was signed).
    Nothing installed changed, and nothing unverified was kept."""

    code = "sync_untrusted"

    def __init__(self, message: str, reason: str, **data: Any) -> None:
        super().__init__(message, reason=reason, **data)
        self.reason = reason
