"""The log under the failures a field device meets: the daemon killed mid-write, a
full disk, a database another process holds. Real daemons, real SQLite files."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import signal
import sqlite3
import threading
import time

import pytest

from outpost.runtime.errors import DaemonUnreachable, LogLocked, ModelNotPulled, OutpostError
from outpost.runtime.logs import schema
from outpost.runtime.logs import store as logstore
from outpost.runtime.logs.records import RequestRecord
from outpost.runtime.cli import main

from .conftest import SMOLLM2, TINY, ServeProcess, make_data_dir, start_daemon

KILLS = 50


def committed(path, ids: list[int]) -> tuple[set[int], str]:
    db = sqlite3.connect(path)
    try:
        found = {r[0] for r in db.execute(
            f"select id from requests where id in ({','.join('?' * len(ids))})", ids)} if ids else set()
        return found, db.execute("pragma integrity_check").fetchone()[0]
    finally:
        db.close()


@pytest.mark.slow  # 50 daemons killed under load: two minutes and a half, half the fast loop
def test_sigkill_under_load_loses_no_row_that_a_reply_named(tmp_path):
    """50 times: 4 clients send requests as fast as they can, the daemon's whole process
    group gets SIGKILL at a random moment; every log_id any reply carried is on disk.

    The requests name a catalog model that is not pulled: each is answered at once
    with a logged `model_not_pulled` error (its log_id in the error's data), and
    half of the answered ids get feedback, so the writer is never idle and no worker
    start dilutes the load.
    """
    data = make_data_dir(tmp_path)
    rng = random.Random(7)
    named: list[int] = []
    for round_ in range(KILLS):
        d = ServeProcess(data, 'preload = []\n', f"kill{round_ % 2}", new_session=True)
        got: list[int] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(seed: int) -> None:
            with d.client(timeout_s=1.0) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        c.chat([{"role": "user", "content": f"client {seed} request {i}"}], model=SMOLLM2)
                    except ModelNotPulled as exc:
                        with lock:
                            got.append(exc.log_id)
                        if i % 2:
                            try:
                                c.feedback(exc.log_id, "good")
                            except (DaemonUnreachable, OutpostError):
                                return
                    except DaemonUnreachable:
                        return

        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
        d.stop()
        named.extend(got)
        found, integrity = committed(data / "logs.db", got)
        assert integrity == "ok", f"round {round_}: {integrity}"
        assert found == set(got), f"round {round_}: lost {sorted(set(got) - found)[:5]}"
    assert len(named) >= KILLS * 5  # the kills really fell under load
    print(f"\n{KILLS} kills, {len(named)} replied log_ids, all on disk")


def _fsize_limit(limit: int):
    def apply() -> None:
        # SIGXFSZ would kill the process; ignored, a write past the limit fails with
        # EFBIG instead, as a write to a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_answers_marked_log_failed_and_keeps_serving(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    schema.open_db(data / "logs.db").conn.close()  # created (and migrated) without the limit
    limit = os.path.getsize(data / "logs.db") + (256 << 10)
    padding = "lorem ipsum dolor sit amet " * 50
    ok, failed = [], 0
    cfg = f'default_model = "{TINY}"\nmanifest_dirs = ["{data / "manifests"}"]\npreload = ["{TINY}"]\n'
    with ServeProcess(data, cfg, "full", preexec_fn=_fsize_limit(limit)) as d, d.client() as c:
        for i in range(200):
            reply = c.chat([{"role": "user", "content": f"{i} {padding}"}], max_tokens=2)
            assert reply["choices"][0]["message"] is not None  # answered either way
            if reply["outpost"]["log_failed"]:
                assert reply["outpost"]["log_id"] is None
                failed += 1
                if failed >= 3:
                    break
            else:
                ok.append(reply["outpost"]["log_id"])
        assert failed >= 3 and ok, (failed, len(ok))
        assert c.ping()["pong"]  # still serving
        assert "could not write the log row" in d.output()
    found, integrity = committed(data / "logs.db", ok)
    assert integrity == "ok" and found == set(ok)


BARE = RequestRecord(method="chat", model_requested=None, model="m", model_version="1", task=None,
                     policy=None, messages=[], tools=None, tool_choice=None, params={})


def test_a_locked_log_is_a_typed_error_not_a_hang(tmp_path, tiny_gguf, capsys):
    data = make_data_dir(tmp_path, tiny_gguf)
    store = logstore.LogStore(data / "logs.db", busy_timeout_s=0.3)
    holder = sqlite3.connect(data / "logs.db", isolation_level=None)
    holder.execute("begin exclusive")  # WAL: readers go on, writers wait
    holder.execute("insert into tools (hash, tools, created_at) values ('x', '[]', 0)")
    try:
        t = time.monotonic()
        with pytest.raises(LogLocked) as err:
            asyncio.run(store.record(BARE, []))
        assert time.monotonic() - t < 5 and err.value.code == "log_locked"
        # The CLI: reading goes on beside the writer (WAL); an export, which records
        # itself and its watermark, exits 1 with the code after the configured wait.
        (data / "cfg.toml").write_text("[logs]\nbusy_timeout_s = 0.3\n")
        args = ["--data-dir", str(data), "--config", str(data / "cfg.toml")]
        assert main(["logs", "stats", *args]) == 0
        code = main(["logs", "export", "--out", str(tmp_path / "x.jsonl"), *args])
        assert code == 1 and "[log_locked]" in capsys.readouterr().err
    finally:
        holder.execute("rollback")
        holder.close()
        store.close()
    # Released: the same store writes again.
    store = logstore.LogStore(data / "logs.db")
    assert asyncio.run(store.record(BARE, [])) >= 1
    store.close()


def test_a_locked_log_through_the_daemon(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    with start_daemon(data, TINY, logs={"busy_timeout_s": 0.3}) as d, d.client() as c:
        first = c.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        holder = sqlite3.connect(data / "logs.db", isolation_level=None)
        holder.execute("begin exclusive")
        try:
            reply = c.chat([{"role": "user", "content": "hi"}], max_tokens=2)
            assert reply["outpost"]["log_failed"] is True and reply["outpost"]["log_id"] is None
            with pytest.raises(LogLocked):
                c.feedback(first["outpost"]["log_id"], "good")
        finally:
            holder.execute("rollback")
            holder.close()
        assert c.feedback(first["outpost"]["log_id"], "good")["outcome"] == "good"
