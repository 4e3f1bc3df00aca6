"""A wall-clock deadline on each network operation with the hub, that no peer can defeat.

The stall timeout (a socket read timeout) bounds one quiet read, and that is all: a
peer that trickles a byte before each timeout resets it, and a client that spins on a
socket already closed never waits at all (botocore's `100 Continue` loop reads `b''`
for ever from a socket in CLOSE-WAIT, which is always readable). A deadline must
therefore interrupt Python wherever it is, and SIGALRM does: its handler runs between
bytecodes, so a spinning loop is stopped at its next step, and a blocked `recv` returns
EINTR into it.

The handler raises `DeadlineExceeded`, a BaseException, so that no `except Exception` in
boto3, urllib3 or python-tuf on the way up turns it into a retryable download error.
The entry points (`ModelPuller.pull`, `LogPusher.push`, `FleetHub.publish_to`,
`collect`) turn it into `SyncDeadline`, a `sync_failed` naming the step; the lock each
holds is released as the error leaves its `with` block.

Several deadlines may be open at once (a read's stream stays open while its consumer
works), in any order: one timer is armed for the earliest. A raise that something
swallowed is raised again after `REPEAT_S`, for as long as the operation stays open.

Signals reach the main thread only, where the sync commands run; opened on another
thread, a deadline is not enforced (the commands never do that; a library caller on a
thread keeps the stall timeout alone) and says so once in the log. A call that no signal
interrupts (an fsync to a dying USB stick) is beyond it; the schedule's run_timeout_s is
the backstop there. While a deadline is open it owns ITIMER_REAL.

What this module must not do: know about any remote, or retry.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import SyncError

log = logging.getLogger("outpost.sync")
REPEAT_S = 2.0  # a raise swallowed on the way up is raised again this much later


class DeadlineExceeded(BaseException):  # noqa: N818 (a signal, like KeyboardInterrupt; SyncDeadline is the error)
    """An operation ran past its deadline (raised from the SIGALRM handler)."""

    def __init__(self, step: str, seconds: float) -> None:
        super().__init__(f"{step} took over {seconds:.0f} s")
        self.step, self.seconds = step, seconds


class SyncDeadline(SyncError):
    """A transfer with the hub ran past its wall-clock deadline and was ended; the
    next run resumes or retries it."""

    def __init__(self, command: str, exc: DeadlineExceeded) -> None:
        super().__init__(f"{command}: {exc.step} took over {exc.seconds:.0f} s and was ended "
                         "([sync] deadline_s, plus the bytes at [sync] min_rate); the next run retries it",
                         step=exc.step, deadline_s=round(exc.seconds, 1))


class Clock:
    """One open operation: its step, and when it is due. `allow` moves the due time on
    (a read earns time per byte that arrives, at the floor rate)."""

    def __init__(self, step: str, seconds: float) -> None:
        self.step = step
        self.seconds = seconds
        self.due = time.monotonic() + seconds

    def allow(self, seconds: float) -> None:
        self.seconds += seconds
        self.due += seconds  # the armed timer is not moved: on firing it finds this and re-arms


_open: list[Clock] = []
_previous: object = None
_warned = False
_changing = False


@contextmanager
def deadline(step: str, seconds: float) -> Iterator[Clock]:
    """Run the block within `seconds` of wall-clock time, or raise DeadlineExceeded in it."""
    global _warned
    clock = Clock(step, seconds)
    if threading.current_thread() is not threading.main_thread():
        if not _warned:
            _warned = True
            log.warning("sync on a thread other than the main one: its transfers have no deadline")
        yield clock
        return
    try:
        _enter(clock)
        yield clock
    finally:
        _leave(clock)


@contextmanager
def _quiet() -> Iterator[None]:
    """No raise while the open clocks change: one in the middle would leave a clock open
    (and the handler installed) for good. The handler finds `_changing` set and does
    nothing; the timer is armed afresh on the way out, so an alarm it dropped comes
    again at once. (Blocking the signal would not do: the kernel hands a process's
    signal to any thread that does not block it, and Python then runs the handler on
    the main thread wherever it is.)"""
    global _changing
    _changing = True
    try:
        yield
    finally:
        _changing = False
        if _open:
            _arm()


def _enter(clock: Clock) -> None:
    global _previous
    with _quiet():
        if not _open:
            _previous = signal.signal(signal.SIGALRM, _on_alarm)
        _open.append(clock)
        _arm()


def _leave(*clocks: Clock) -> None:
    with _quiet():
        for clock in clocks:
            if clock in _open:
                _open.remove(clock)
        _arm()
        if not _open:
            signal.signal(signal.SIGALRM, _previous if _previous is not None else signal.SIG_DFL)


def _arm() -> None:
    if not _open:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    due = min(c.due for c in _open)
    signal.setitimer(signal.ITIMER_REAL, max(due - time.monotonic(), 0.001))


def _on_alarm(signum: int, frame: object) -> None:
    if _changing:
        return  # _quiet re-arms on its way out
    now = time.monotonic()
    late = [c for c in _open if c.due <= now]
    if late:
        clock = min(late, key=lambda c: c.due)
        clock.due = now + REPEAT_S  # raised again if the operation is still open then
        _arm()
        raise DeadlineExceeded(clock.step, clock.seconds)
    _arm()  # a clock was allowed more time since the timer was set


@contextmanager
def as_sync_error(command: str) -> Iterator[None]:
    """A deadline that passed inside the block, as the `sync_failed` error it is. The
    clocks opened inside are closed on the way out, whatever still holds their streams."""
    before = list(_open)
    try:
        yield
    except DeadlineExceeded as exc:
        raise SyncDeadline(command, exc) from None
    finally:
        if left := [c for c in _open if c not in before]:
            _leave(*left)
