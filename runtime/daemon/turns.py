"""Whose turn it is on a worker: one request at a time, grouped by task adapter.

A worker generates one request at a time. Waiting requests are served in arrival
order, except that a request for the adapter the worker applied last goes ahead of
older requests for other adapters: a switch clears the prompt cache, so alternating
adapters would pay a full prefill on every request. A run of such jumps is capped
(`max_run`), so a request for another adapter waits for at most that many others
it did not arrive before.

What this module must not do: know what an adapter is (a key is any hashable), or
time anything out (the caller wraps `acquire` in `asyncio.wait_for`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable

MAX_RUN = 8  # consecutive turns for one adapter while others wait


class Turns:
    def __init__(self, max_run: int = MAX_RUN) -> None:
        self.max_run = max_run
        self._waiting: deque[tuple[Hashable, asyncio.Future[None]]] = deque()
        self._held = False
        self._last: Hashable = None  # the key of the turn given last
        self._run = 0  # turns given in a row to `_last` while others waited
        self.jumps = 0  # turns given out of arrival order (for `outpost ps`)

    def locked(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, key: Hashable) -> None:
        if not self._held and not self._waiting:
            self._grant(key, jumped=False)
            return
        future = asyncio.get_running_loop().create_future()
        entry = (key, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the turn came as we were cancelled: pass it on
            elif entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def release(self) -> None:
        self._held = False
        # A waiter cancelled a moment ago is still queued until its task runs: skip it.
        self._waiting = deque(e for e in self._waiting if not e[1].done())
        if not self._waiting:
            self._run = 0
            return
        index = 0
        if self._run < self.max_run:
            index = next((i for i, (k, _) in enumerate(self._waiting) if k == self._last), 0)
        key, future = self._waiting[index]
        del self._waiting[index]
        self._grant(key, jumped=index > 0)
        future.set_result(None)

    def _grant(self, key: Hashable, jumped: bool) -> None:
        self._held = True
        self.jumps += jumped
        # A run counts only turns taken while someone else waited for theirs.
        self._run = self._run + 1 if key == self._last and self._waiting else 0
        self._last = key
