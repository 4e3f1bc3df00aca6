"""The requests being handled, for `cancel`: each one's task, and whether it has a
worker yet. `handling` names the request the running task handles (the chat path marks
it generating once it holds a worker, so a cancel can say where it stopped it and the
chat path knows to log it).

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
        self.abandoned = False  # its agent cancelled it (not a shutdown, not a timeout)

    def abandon(self) -> str | None:
        """Its agent gave up: stop it wherever it is. Where that was ("queued",
        "generating"), or None when it had finished already."""
        if self.task is None or self.task.done():
            return None
        self.abandoned = True
        self.task.cancel()  # a generation is cancelled in its worker (workers.py, generate)
        return "generating" if self.generating else "queued"


handling: contextvars.ContextVar[InFlight | None] = contextvars.ContextVar("outpost_request", default=None)
