"""The requests being handled, for `cancel`: each one's task, and whether it has a
worker yet. `handling` names the request the running task handles (the chat path marks
it generating once it holds a worker; from then on a cancel lets it finish).

What this module must not do: decide what a cancel means for a request (server.py).
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any


class InFlight:
    """A request being handled, for `cancel`: its task, and whether it has a worker yet."""

    def __init__(self, task: asyncio.Task[Any] | None = None) -> None:
        self.task = task
        self.generating = False

    def abandon(self) -> bool:
        """Its agent gave up: cancel it if it is still queued (not once it generates)."""
        if self.task is None or self.task.done() or self.generating:
            return False
        self.task.cancel()
        return True


handling: contextvars.ContextVar[InFlight | None] = contextvars.ContextVar("outpost_request", default=None)
