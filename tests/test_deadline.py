"""The wall-clock deadline (sync/deadline.py) on its own: what it interrupts, in what
order, and what it leaves behind."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from outpost.sync import deadline as dl
from outpost.sync.deadline import DeadlineExceeded, SyncDeadline, as_sync_error, deadline
from outpost.sync.remotes import open_remote


def test_a_spinning_loop_is_interrupted():
    a, b = socket.socketpair()
    b.close()  # the peer is gone: every read returns b'' at once, as after a FIN
    spins = 0
    with pytest.raises(DeadlineExceeded) as err, deadline("read the interim answer", 0.3):
        while True:  # botocore's _consume_headers, in effect
            a.recv(1)
            spins += 1
    a.close()
    assert spins > 100 and err.value.step == "read the interim answer"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)


def test_a_blocked_read_is_interrupted():
    a, b = socket.socketpair()
    with pytest.raises(DeadlineExceeded), deadline("wait for the hub", 0.3):
        a.recv(1)  # nothing ever comes, and no socket timeout is set
    a.close()
    b.close()


def test_the_earliest_of_open_deadlines_fires_and_the_others_stay_armed():
    with deadline("outer", 1.0):
        with pytest.raises(DeadlineExceeded) as err, deadline("inner", 0.2):
            time.sleep(5)
        assert err.value.step == "inner"
        with pytest.raises(DeadlineExceeded) as err:
            time.sleep(5)
        assert err.value.step == "outer"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_time_allowed_as_bytes_arrive_moves_the_deadline_on():
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as err, deadline("read a blob", 0.3) as clock:
        for _ in range(4):
            time.sleep(0.2)
            clock.allow(0.2)  # a chunk arrived: its bytes at the floor rate
        time.sleep(5)
    assert time.monotonic() - start >= 1.0 and err.value.seconds == pytest.approx(1.1)


def test_a_swallowed_deadline_is_raised_again(monkeypatch):
    monkeypatch.setattr(dl, "REPEAT_S", 0.2)
    swallowed = 0
    with pytest.raises(DeadlineExceeded), deadline("a stubborn library", 0.2):
        while True:
            try:
                time.sleep(5)
            except BaseException:  # noqa: BLE001 (what a careless library does)
                swallowed += 1
                if swallowed == 1:
                    continue
                raise
    assert swallowed == 2


def test_off_the_main_thread_a_deadline_is_not_enforced_and_says_so(caplog, monkeypatch):
    monkeypatch.setattr(dl, "_warned", False)
    done: list[str] = []

    def work() -> None:
        with deadline("a thread's read", 0.05):
            time.sleep(0.3)
        done.append("finished")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert done == ["finished"] and "have no deadline" in caplog.text
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_passed_deadline_is_a_sync_failed_naming_the_command_and_step():
    with pytest.raises(SyncDeadline) as err, as_sync_error("push"), deadline("write logs/x to s3://b/p", 0.1):
        time.sleep(5)
    assert err.value.code == "sync_failed" and err.value.data["step"] == "write logs/x to s3://b/p"
    assert str(err.value).startswith("push: write logs/x to s3://b/p took over 0 s")


def test_every_operation_of_a_remote_has_a_deadline(tmp_path):
    remote = open_remote(f"file://{tmp_path}/hub")
    assert remote.write("a/x", b"x" * 1000, exclusive=True)
    assert remote.list("a/") == ["a/x"] and b"".join(remote.read("a/x")) == b"x" * 1000
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # each one's clock is gone with it
    stream = remote.read("a/x")
    next(stream)
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # a stream's clock runs while it is open
    stream.close()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_failed_command_closes_the_clocks_it_left_open(tmp_path):
    remote = open_remote(f"file://{tmp_path}/hub")
    remote.write("a/x", b"x" * 1000, exclusive=True)
    held = []
    with pytest.raises(SyncDeadline), as_sync_error("pull"):
        stream = remote.read("a/x")
        next(stream)
        held.append(stream)  # something keeps the stream (a traceback's frame, say)
        with deadline("a slow step", 0.1):
            time.sleep(5)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and not dl._open
    held[0].close()
