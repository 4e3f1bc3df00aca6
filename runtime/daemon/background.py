"""Tasks that run beside the requests (a shadow-mode cloud call, a pool event's log write).

asyncio keeps only a weak reference to a task, and an exception nobody awaits is
reported, if at all, when the task is garbage-collected. So each one is held here
until it ends, and its failure is logged with what it was doing.

What this module must not do: retry or swallow a failure; it only keeps the task
and logs the exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))
        return task

    def _done(self, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s failed", what, exc_info=task.exception())

    async def drain(self) -> None:
        """Let the tasks in flight finish (their failures are logged, not raised)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
