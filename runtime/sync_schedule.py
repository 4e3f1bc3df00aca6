"""`[sync] interval_s`: `outpost serve` syncs with the fleet on a schedule.

Every interval (jittered ±20%, so a fleet does not arrive at its hub together) the
serving process runs `outpost sync pull`, then `outpost sync push`, each as a child
process at a lower CPU priority. A pull activates what it staged through this daemon's
socket (the smoke test runs in a worker under the budget); a push reads the log
through SQLite's WAL, so neither blocks a request. After a failed round the wait
doubles, up to 8 intervals, and returns to one after a good round; each failure is
logged, and `outpost status` shows the last error (the sync layer records it).

A child gets `[sync] run_timeout_s`. Its transfers have deadlines of their own, but a
child stuck anywhere (a hub that answers forever, a bug) must not stop the schedule:
one that overruns is killed by its process id, its action's error is recorded for
`status` and `sync status`, and the schedule goes on.

This module runs the commands as programs, so runtime never imports the sync layer;
without the `fleet` extra the commands say so, and that is logged.

What this module must not do: pull, push or verify anything itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

from . import sync_state
from .config import Settings

log = logging.getLogger("outpost.sync")
MAX_BACKOFF = 8  # intervals


class SyncSchedule:
    def __init__(self, settings: Settings, config_file: Path | None, command: list[str] | None = None) -> None:
        assert settings.sync.interval_s and settings.sync.hub, "only for a configured schedule"
        self.interval_s = settings.sync.interval_s
        self.run_timeout_s = settings.sync.run_timeout_s
        self.trust_dir = settings.trust_dir
        # The program run with "pull" or "push" after it (another only in tests).
        self.command = command or [sys.executable, "-m", "outpost.runtime.cli", "sync"]
        push_hub = settings.sync.push_hub or settings.sync.hub
        self.push = not push_hub.startswith(("https://", "http://"))  # mirrors are read-only
        self.env = {**os.environ, "OUTPOST_DATA_DIR": str(settings.data_dir),
                    "OUTPOST_ENDPOINT": settings.endpoint}
        if config_file is not None:
            self.env["OUTPOST_CONFIG"] = str(config_file)
        self.failures = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="outpost-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()  # a pull or push resumes where it stopped, next time
        self._thread.join(10)

    def delay(self) -> float:
        return self.interval_s * min(2 ** self.failures, MAX_BACKOFF) * random.uniform(0.8, 1.2)

    def _loop(self) -> None:
        # The first round soon after start (a device that was offline catches up), still jittered.
        wait = min(self.interval_s, 30.0) * random.uniform(0.5, 1.0)
        while not self._stop.wait(wait):
            ok = self._run("pull")
            if self.push and not self._stop.is_set():
                ok = self._run("push") and ok
            self.rounds += 1
            self.failures = 0 if ok else self.failures + 1
            wait = self.delay()

    def _run(self, action: str) -> bool:
        child = self._child = subprocess.Popen([*self.command, action], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with contextlib.suppress(OSError):  # after the start: preexec_fn is unsafe with threads
            os.setpriority(os.PRIO_PROCESS, child.pid, 10)
        try:
            _, err = child.communicate(timeout=self.run_timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()  # SIGKILL to its pid: a stuck child may not heed SIGTERM; a pull resumes
            with contextlib.suppress(subprocess.TimeoutExpired):  # dead; a pipe left open is not waited for
                child.communicate(timeout=10)
            self._child = None
            message = (f"sync {action} ran past its {self.run_timeout_s:g} s limit ([sync] run_timeout_s) "
                       f"and was ended (pid {child.pid})")
            try:
                sync_state.record_failure(self.trust_dir, action, "sync_failed", message)
            except OSError as exc:  # a full or read-only disk must not end the schedule
                log.warning("cannot record the sync state in %s: %s", self.trust_dir, exc)
            log.warning("%s; next try in about %.0f s", message,
                        self.interval_s * min(2 ** (self.failures + 1), MAX_BACKOFF))
            return False
        code, self._child = child.returncode, None
        if code != 0 and not self._stop.is_set():
            last = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            log.warning("sync %s failed (exit %s): %s; next try in about %.0f s", action, code, last[0],
                        self.interval_s * min(2 ** (self.failures + 1), MAX_BACKOFF))
        return code == 0
