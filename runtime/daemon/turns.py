"""Whose turn it is on a worker: a slot per request, interactive before batch,
grouped by task adapter.

A worker generates `slots` requests at a time (its model's batch, models/batching.py;
1 where it does not batch). While its slots are taken, waiting requests get the next
free one in arrival order, with two exceptions:

- **Priority.** An `interactive` request (the default) goes ahead of every waiting
  `batch` one, so an agent in a conversation waits for at most the generation in
  progress however many batch jobs are queued. Batch requests are never starved:
  after `max_interactive_run` interactive turns in a row while batch requests waited,
  the oldest batch request gets the next turn.
- **Adapters.** Within a priority, a request for the adapter the worker applied last
  goes ahead of older requests for other adapters: a switch clears the prompt cache,
  so alternating adapters would pay a full prefill on every request. A run of such
  jumps is capped (`max_run`), so a request for another adapter waits for at most
  that many others it did not arrive before. A batch decodes under one adapter, so a
  request for another one also waits until the slots held now are all given back.

What this module must not do: know what an adapter is (a key is any hashable), or
time anything out (the caller wraps `acquire` in `asyncio.wait_for`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass, field

MAX_RUN = 8  # consecutive turns for one adapter while others wait
MAX_INTERACTIVE_RUN = 8  # consecutive interactive turns while batch requests wait


@dataclass(eq=False)
class _Waiter:
    key: Hashable
    batch: bool
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Turns:
    def __init__(self, max_run: int = MAX_RUN, max_interactive_run: int = MAX_INTERACTIVE_RUN) -> None:
        self.max_run = max_run
        self.max_interactive_run = max_interactive_run
        self._waiting: list[_Waiter] = []
        self.slots = 1  # turns held at once (the worker sets it once loaded)
        self._held = 0  # turns held now
        self._held_key: Hashable = None  # their adapter (one batch, one adapter)
        self._last: Hashable = None  # the key of the turn given last
        self._run = 0  # turns given in a row to `_last` while others waited
        self._interactive_run = 0  # interactive turns given in a row while batch waited
        self.jumps = 0  # turns given out of arrival order for an adapter (for `outpost ps`)
        self.batch_turns = 0  # turns given to batch requests
        self.overtaken = 0  # batch requests passed by an interactive one

    def locked(self) -> bool:
        return self._held >= self.slots

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, key: Hashable, batch: bool = False) -> None:
        if not self._waiting and self._fits(key):
            self._grant(key, batch, jumped=False, overtook=0)
            return
        waiter = _Waiter(key, batch)
        self._waiting.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # the turn came as we were cancelled: pass it on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise

    def release(self) -> None:
        self._held -= 1
        # A waiter cancelled a moment ago is still queued until its task runs: skip it.
        self._waiting = [w for w in self._waiting if not w.future.done()]
        if not self._waiting:
            self._run = self._interactive_run = 0
            return
        while self._waiting:
            index = self._next()
            waiter = self._waiting[index]
            if not self._fits(waiter.key):
                return  # it waits for the slots to drain (another adapter) or to free up
            ahead = self._waiting[:index]
            del self._waiting[index]
            self._grant(waiter.key, waiter.batch,
                        jumped=any(w.batch == waiter.batch for w in ahead),  # for its adapter
                        overtook=0 if waiter.batch else sum(w.batch for w in ahead))
            waiter.future.set_result(None)

    def _fits(self, key: Hashable) -> bool:
        return self._held == 0 or (self._held < self.slots and key == self._held_key)

    def _next(self) -> int:
        """The index of the waiter whose turn it is."""
        batch_waits = any(w.batch for w in self._waiting)
        interactive = [i for i, w in enumerate(self._waiting) if not w.batch]
        if interactive and not (batch_waits and self._interactive_run >= self.max_interactive_run):
            pool = interactive
        else:
            pool = [i for i, w in enumerate(self._waiting) if w.batch] or interactive
        if self._run < self.max_run:
            return next((i for i in pool if self._waiting[i].key == self._last), pool[0])
        return pool[0]

    def _grant(self, key: Hashable, batch: bool, jumped: bool, overtook: int) -> None:
        self._held += 1
        self._held_key = key
        self.jumps += jumped
        self.overtaken += overtook
        self.batch_turns += batch
        batch_waits = any(w.batch for w in self._waiting)
        self._interactive_run = self._interactive_run + 1 if not batch and batch_waits else 0
        # A run counts only turns taken while someone else waited for theirs.
        self._run = self._run + 1 if key == self._last and self._waiting else 0
        self._last = key
