"""Per-agent limits: how many requests one client may have in flight at once.

An agent declares its name in each request (`client`); `[clients.<name>]` in the
config bounds its requests being handled (queued or generating), and
`[clients.default]` bounds requests that declare no name or one not listed, together. Beyond
the bound a request is refused at once with `overloaded` (`data.client`,
`data.in_flight`, `data.limit`), before it takes a place in any model's queue, so one
busy agent cannot fill the queue that others wait in.

What this module must not do: queue or order requests (turns.py, pool.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import ClientOverloaded
from .settings import ClientLimits

DEFAULT = "default"


class ClientGate:
    def __init__(self, limits: dict[str, ClientLimits]) -> None:
        self.limits = limits
        self.in_flight: dict[str, int] = {}  # by client name ("default" for the unnamed)

    @contextlib.contextmanager
    def hold(self, client: str | None) -> Iterator[None]:
        # A name not declared is counted as `default`: a fresh name on every request
        # neither escapes the default limit nor grows this table (or the metrics' labels).
        name = client if client in self.limits else DEFAULT
        limits = self.limits.get(name)
        busy = self.in_flight.get(name, 0)
        if limits is not None and limits.max_in_flight is not None and busy >= limits.max_in_flight:
            raise ClientOverloaded(name, busy, limits.max_in_flight)
        self.in_flight[name] = busy + 1
        try:
            yield
        finally:
            self.in_flight[name] -= 1
            if not self.in_flight[name]:
                del self.in_flight[name]
