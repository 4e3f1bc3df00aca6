"""Sample the summed PSS of a process tree from outside, as fast as asked.

    python -m tests.helpers.pss_sampler PID HZ OUT.json

Runs until SIGTERM, then writes {"samples": n, "seconds": s, "peak": bytes, "rate_hz": r,
"at": {"t": seconds into the run, "parts": {pid: [comm, pss, state]}}}: what made the
peak, for the failure message.
Reads /proc directly (children files and smaps_rollup): psutil's process scan is too
slow for 20 Hz on two busy cores. Runs at raised priority when allowed, so the
measurement keeps its rate while the models saturate the CPU.

smaps_rollup walks a process's page tables (about 85 ns a resident page in this VM): a
500 MiB worker takes ~15 ms, so one thread reading four processes in turn manages barely
20 samples a second. The processes are read in parallel (the reads release the GIL, and
each walks its own mm), which gives ~35 Hz on two cores with two models loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Sampler:
    """This module in its own process, sampling PID's tree: no GIL shared with the
    clients whose load it measures. `stop()` returns the JSON document."""

    def __init__(self, pid: int, out: Path, hz: float = 25.0) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.pss_sampler",
                                      str(pid), str(hz), str(out)], cwd=REPO)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return json.loads(self.out.read_text())


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass  # exited meanwhile
    return out


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def name(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return "?"


def state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def main() -> None:
    pid, hz, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    try:
        os.nice(-10)
    except OSError:
        pass
    stop = False

    def halt(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, halt)
    # Created after os.nice: its threads inherit the raised priority.
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    period, peak, n, start = 1.0 / hz, 0, 0, time.monotonic()
    at = None
    due = start
    while not stop:
        pids = tree(pid)
        parts = dict(zip(pids, pool.map(pss, pids)))
        total = sum(parts.values())
        if total > peak:
            peak = total
            at = {"t": round(time.monotonic() - start, 3),
                  "parts": {p: (name(p), v, state(p)) for p, v in parts.items()}}
        n += 1
        # Paced by a schedule, not by a sleep after each sample: a sample that ran long
        # (the CPU was busy) is made up by the next ones, so the rate is the one asked
        # whenever the average sample fits its period. Behind by more than a second,
        # the schedule restarts rather than bursting.
        due += period
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0:
            due = now
    seconds = time.monotonic() - start
    with open(out, "w") as fh:
        json.dump({"samples": n, "seconds": seconds, "peak": peak, "rate_hz": n / seconds, "at": at}, fh)


if __name__ == "__main__":
    main()
