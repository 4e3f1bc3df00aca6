"""`[sync] interval_s`: the schedule outlives a child that never ends."""

from __future__ import annotations

import json
import sys
import time

import psutil

from outpost.runtime.cli import main
from outpost.runtime.config import Settings
from outpost.runtime.sync_schedule import SyncSchedule

# A stand-in for `outpost sync`: each pull hangs (as a push inside S3's "100 Continue"
# did) and says so first; each push ends at once. Both note that they ran.
STUCK = """
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{sys.argv[2]} {os.getpid()}\\n")
if sys.argv[2] == "pull":
    time.sleep(600)
"""


def test_a_child_that_never_ends_is_killed_reported_and_the_schedule_goes_on(tmp_path, capsys):
    ran = tmp_path / "ran.txt"
    settings = Settings(data_dir=tmp_path / "data", sync={"hub": f"file://{tmp_path}/hub", "interval_s": 1,
                                                          "run_timeout_s": 1})
    schedule = SyncSchedule(settings, None, command=[sys.executable, "-c", STUCK, str(ran)])
    schedule.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and schedule.rounds < 2:
            time.sleep(0.2)
    finally:
        schedule.stop()
    assert schedule.rounds >= 2, ran.read_text() if ran.exists() else "nothing ran"
    runs = [line.split() for line in ran.read_text().splitlines()]
    pulls = [int(pid) for action, pid in runs if action == "pull"]
    assert len(pulls) >= 2 and [a for a, _ in runs].count("push") >= 2  # the push ran after each stuck pull
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pulls)  # each was ended
    assert schedule.failures >= 1
    # Recorded where `sync status` and `outpost status` read it.
    assert main(["sync", "status", "--data-dir", str(settings.data_dir), "--json"]) == 0
    error = json.loads(capsys.readouterr().out)["pull"]["error"]
    assert error["code"] == "sync_failed"
    assert "ran past its 1 s limit" in error["message"] and any(f"(pid {p})" in error["message"] for p in pulls)
    assert main(["sync", "status", "--data-dir", str(settings.data_dir)]) == 0
    assert "sync_failed: sync pull ran past its 1 s limit" in capsys.readouterr().out
