"""Logs up: a real log (written by the daemon's LogStore into SQLite) pushed in redacted,
compressed, immutable batches to a folder hub and to a real S3 store (SeaweedFS), with
faults from a loopback proxy and pushers SIGKILLed mid-push; then collected by the
operator into one training file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from botocore import handlers as boto_handlers

from outpost.runtime.cli import main
from outpost.runtime.logs import retention, schema
from outpost.runtime.logs import store as logstore
from outpost.runtime.logs.export import export, val_path_for
from outpost.sync.deadline import SyncDeadline
from outpost.sync.errors import SyncError
from outpost.sync.push import LogPusher, pending, sync_watermark
from outpost.sync.remotes import RemoteOptions, open_remote
from outpost.tools.faultproxy import Fault, FaultProxy, random_cut
from outpost.tools.fleet_collect import collect
from outpost.tools.hubs import SeaweedS3

from .test_curation import WEATHER, call, log


@pytest.fixture
def logged(tmp_path):
    """A device's log with `n` requests (some carrying personal data)."""
    store = logstore.LogStore(tmp_path / "data" / "logs.db")

    def add(n: int, start: int = 0) -> list[int]:
        return [log(store, f"Weather in city {i}? mail me at user{i}@example.com", WEATHER,
                    [call("get_weather", {"city": f"c{i}"})]) for i in range(start, start + n)]
    yield add
    store.close()


def pusher(tmp_path: Path, hub: str, options: RemoteOptions | None = None, rows: int = 10,
           device: str = "jetson-7") -> LogPusher:
    db = schema.open_db(tmp_path / "data" / "logs.db")
    return LogPusher(db, open_remote(hub, options), device, tmp_path / "data" / "sync" / "outbox",
                     batch_rows=rows, sleep=lambda s: None)


def on_hub(remote, prefix: str = "logs/") -> list[dict]:
    """Every record on the hub, in key order."""
    out = []
    for name in remote.list(prefix):
        text = zstandard.ZstdDecompressor().decompress(b"".join(remote.read(name))).decode()
        out += [json.loads(line) for line in text.splitlines() if line]
    return out


def test_batches_reach_a_folder_hub_redacted_once_each_and_the_watermark_follows(tmp_path, logged):
    ids = logged(25)
    hub = f"file://{tmp_path}/hub"
    p = pusher(tmp_path, hub)
    assert pending(p.db)[0] == 25
    first = p.push()
    assert (first.batches, first.rows, first.withheld, first.watermark) == (3, 25, 0, ids[-1])
    names = p.remote.list("logs/")
    assert names == sorted(names) and all(n.startswith("logs/jetson-7/") for n in names)
    records = on_hub(p.remote)
    assert [r["request"]["id"] for r in records] == ids
    assert all("example.com" not in json.dumps(r) for r in records)  # redacted before it left
    assert "[EMAIL]" in records[0]["request"]["messages"][0]["content"]
    assert pending(p.db) == (0, 0) and retention.watermark(p.db) == ids[-1]
    assert p.push().batches == 0  # nothing new: nothing sent
    more = logged(4, start=25)
    again = p.push()
    assert (again.batches, again.rows, again.watermark) == (1, 4, more[-1])
    assert len(on_hub(p.remote)) == 29


def test_young_requests_wait_so_their_feedback_goes_up_with_them(tmp_path, logged):
    ids = logged(4)
    p = pusher(tmp_path, f"file://{tmp_path}/hub")
    p.min_age_s = 300
    assert p.push().batches == 0 and pending(p.db)[0] == 4  # all still settling
    db = schema.open_db(tmp_path / "data" / "logs.db")
    db.execute("update requests set created_at = created_at - 600 where id in (?, ?)", [ids[0], ids[2]])
    db.execute("insert into feedback (request_id, created_at, outcome, note) values (?, ?, 'good', 'ok')",
               [ids[0], time.time()])
    db.conn.commit()
    pushed = p.push()
    # ids[1] is young: ids[2], though old enough, waits behind it (the watermark never skips a row).
    assert (pushed.rows, pushed.watermark) == (1, ids[0])
    [record] = on_hub(p.remote)
    assert [f["outcome"] for f in record["feedback"]] == ["good"]


def test_a_row_that_cannot_be_redacted_is_withheld_and_counted(tmp_path, logged):
    ids = logged(5)
    db = schema.open_db(tmp_path / "data" / "logs.db")
    db.execute("update requests set messages = '{not json' where id = ?", [ids[2]])
    db.conn.commit()
    p = pusher(tmp_path, f"file://{tmp_path}/hub")
    pushed = p.push()
    assert (pushed.rows, pushed.withheld, pushed.watermark) == (4, 1, ids[-1])
    assert [r["request"]["id"] for r in on_hub(p.remote)] == ids[:2] + ids[3:]


def test_a_batch_left_in_the_outbox_is_sent_as_it_was_made(tmp_path, logged):
    ids = logged(8)
    hub = f"file://{tmp_path}/hub"
    broken = pusher(tmp_path, f"file://{tmp_path}/hub-file")  # a "hub" that is a file: every write fails
    (tmp_path / "hub-file").write_text("not a folder")
    broken.retries = 1
    with pytest.raises(SyncError):
        broken.push()
    [made] = (tmp_path / "data" / "sync" / "outbox").glob("*.jsonl.zst")
    assert sync_watermark(broken.db) == 0  # not confirmed: not passed
    logged(3, start=8)  # rows that arrive meanwhile go in a later batch
    p = pusher(tmp_path, hub)
    pushed = p.push()
    assert pushed.rows == 11 and not made.exists()
    assert p.remote.list("logs/")[0].split("/")[-1].startswith(made.name.split("-")[0] + "-" + made.name.split("-")[1])
    assert [r["request"]["id"] for r in on_hub(p.remote)] == ids + [ids[-1] + 1, ids[-1] + 2, ids[-1] + 3]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket("fleet")
        yield server


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "device")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "device-secret")


def test_an_answer_lost_on_the_way_back_is_confirmed_by_the_retry_not_duplicated(tmp_path, logged, seaweed, credentials):
    ids = logged(12)
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    hub = f"s3://fleet/{tmp_path.name}"
    # The first PUT reaches the store, its answer never reaches the device (the cut falls
    # inside the status line); then a 503.
    with FaultProxy(port, [Fault("cut", after=5), Fault("status", status=503)]) as proxy:
        p = pusher(tmp_path, hub, RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}"), rows=5)
        pushed = p.push()
    assert (pushed.batches, pushed.rows, pushed.watermark) == (3, 12, ids[-1])
    assert pushed.bytes < sum(len(b"".join(p.remote.read(n))) for n in p.remote.list("logs/"))  # one batch was there already
    assert [r["request"]["id"] for r in on_hub(p.remote)] == ids


def test_an_answer_cut_in_its_headers_is_one_line_in_the_log(tmp_path, logged, seaweed, credentials, caplog):
    """The status line came (the hub stored the batch: the push is done), the headers
    were cut: urllib3's warning about them comes without its traceback."""
    ids = logged(3)
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    with FaultProxy(port, [Fault("cut", after=30)]) as proxy:
        p = pusher(tmp_path, f"s3://fleet/{tmp_path.name}", RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}"))
        pushed = p.push()
    assert (pushed.rows, pushed.watermark) == (3, ids[-1]) and proxy.fired["cut"] == 1
    [warning] = [r for r in caplog.records if r.name == "urllib3.connection"]
    assert "Failed to parse headers" in warning.getMessage() and warning.exc_info is None
    assert "Traceback" not in caplog.text


def test_a_collect_over_a_crawling_link_ends_at_its_deadline_and_leaves_no_half_file(
        tmp_path, logged, seaweed, credentials):
    logged(4)
    hub = f"s3://fleet/{tmp_path.name}"
    pusher(tmp_path, hub, RemoteOptions(s3_endpoint=seaweed.endpoint)).push()
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    with FaultProxy(port, rate=200) as proxy:  # a listing or a batch takes seconds; the deadline is 1 s
        remote = open_remote(hub, RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", deadline_s=1,
                                                min_rate=1 << 20))
        with pytest.raises(SyncDeadline) as err:
            collect(remote, tmp_path / "fleet.jsonl")
    assert err.value.code == "sync_failed" and str(err.value).startswith("collect: ")
    assert not list(tmp_path.glob("fleet.jsonl*"))
    report = collect(open_remote(hub, RemoteOptions(s3_endpoint=seaweed.endpoint)), tmp_path / "fleet.jsonl")
    assert report.examples == 4


def expect_100(remote) -> None:
    """Put back botocore's default that Outpost takes out: `Expect: 100-continue` on PUTs."""
    remote.inner.client.meta.events.register("before-call.s3", boto_handlers.add_expect_header)


@pytest.mark.parametrize("expect", [False, True], ids=["as-sent", "expect-100"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_link_dropped_inside_100_continue_ends_the_push_in_time_and_the_next_one_completes(
        tmp_path, logged, seaweed, credentials, how, expect):
    """Every PUT meets a link that answers its head with part of `100 Continue` (12-24 of
    its 25 bytes: the status line is there, its blank line is not) and drops. As sent (no
    Expect) each try fails at once and the push ends with sync_failed; with botocore's
    Expect put back, a FIN left botocore reading the ended socket for ever, and the
    deadline ends it. Either way the lock is free, and the next push sends every row once."""
    ids = logged(6)
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    hub = f"s3://fleet/{tmp_path.name}"
    after = random.Random(f"{how}{expect}").randint(12, 24)
    with FaultProxy(port, default=Fault("interim", after=after, how=how)) as proxy:
        options = RemoteOptions(s3_endpoint=f"http://127.0.0.1:{proxy.port}", stall_timeout_s=2, deadline_s=3)
        p = pusher(tmp_path, hub, options, rows=4)
        if expect:
            expect_100(p.remote)
        start = time.monotonic()
        with pytest.raises(SyncError) as err:
            p.push()
        took = time.monotonic() - start
        assert err.value.code == "sync_failed" and proxy.fired["interim"] >= 1
        if expect and how == "fin":  # the spin: only the deadline ends it
            assert isinstance(err.value, SyncDeadline) and err.value.data["deadline_s"] < 4, err.value
            assert str(err.value).startswith("push: write logs/jetson-7/") and "took over 3 s" in str(err.value)
        assert took < 60, f"the push took {took:.0f} s"  # (in the field: for ever)
        proxy.default = None
        pushed = p.push()  # the lock is free; the outbox batch goes as it was made
    assert (pushed.rows, pushed.watermark) == (6, ids[-1])
    assert [r["request"]["id"] for r in on_hub(p.remote)] == ids


def test_collect_makes_the_export_of_every_device_with_its_id(tmp_path, logged):
    logged(6)
    hub = f"file://{tmp_path}/hub"
    pusher(tmp_path, hub, device="rover-1").push()
    db = schema.open_db(tmp_path / "data" / "logs.db")
    exported = export(db, tmp_path / "export.jsonl")
    report = collect(open_remote(hub), tmp_path / "collected.jsonl")
    got = [json.loads(line) for line in (tmp_path / "collected.jsonl").read_text().splitlines()]
    assert report.examples == exported.examples == 6 and {g.pop("device") for g in got} == {"rover-1"}
    want = [json.loads(line) for path in (tmp_path / "export.jsonl", val_path_for(tmp_path / "export.jsonl"))
            for line in path.read_text().splitlines()]
    key = lambda e: json.dumps(e, sort_keys=True)  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)  # the same examples `logs export` writes


def test_push_status_and_collect_from_the_command_line(tmp_path, logged, capsys, monkeypatch):
    monkeypatch.setenv("OUTPOST_SYNC__PUSH_DELAY_S", "0")  # the rows were logged just now
    logged(3)
    data, hub = tmp_path / "data", f"file://{tmp_path}/hub"
    assert main(["sync", "push", "--data-dir", str(data)]) == 2  # no hub
    assert main(["sync", "push", "--hub", "https://127.0.0.1:9/m", "--data-dir", str(data)]) == 1  # read-only
    assert main(["sync", "push", "--hub", hub, "--device", "bad/name", "--data-dir", str(data)]) == 2
    assert main(["sync", "push", "--hub", hub, "--data-dir", str(tmp_path / "empty")]) == 2  # no log
    capsys.readouterr()
    assert main(["sync", "push", "--hub", hub, "--device", "rover-2", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert main(["sync", "status", "--data-dir", str(data), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["pending"]["rows"] == 0 and status["push"]["error"] is None and status["push"]["rows"] == 3
    assert main(["sync", "status", "--data-dir", str(data)]) == 0
    assert "not pushed yet: 0 requests" in capsys.readouterr().out
    out = tmp_path / "fleet.jsonl"
    assert main(["fleet", "collect", "--from", hub, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == ["rover-2"]
    assert len(out.read_text().splitlines()) == 3


PUSHER = """
import sys
from outpost.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_thirty_pushes_cut_and_killed_leave_every_row_on_the_hub_exactly_once(tmp_path, logged, seaweed, credentials):
    """The acceptance run: rows arrive between pushes; each push goes through a link
    that cuts connections at random bytes (of an answer, of a batch on its way up, of
    an interim `100 Continue`; by FIN or RST) and fails with 503s, and half the pushers
    are SIGKILLed at a random moment. After each, every row at or below the watermark
    is on the hub; at the end every row is there exactly once, as it is in the log."""
    rng = random.Random(11)
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    hub = f"s3://fleet/{tmp_path.name}"
    data = tmp_path / "data"
    ids: list[int] = []
    killed = 0
    with FaultProxy(port) as proxy:
        env = {**os.environ, "OUTPOST_SYNC__S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
               "OUTPOST_SYNC__PUSH_BATCH_ROWS": "7", "OUTPOST_SYNC__STALL_TIMEOUT_S": "2",
               "OUTPOST_SYNC__DEADLINE_S": "10", "OUTPOST_SYNC__PUSH_DELAY_S": "0"}
        reader = open_remote(hub, RemoteOptions(s3_endpoint=seaweed.endpoint))
        for round_ in range(30):
            ids += logged(rng.randint(5, 25), start=len(ids))
            # Cuts anywhere (an answer, a batch on its way up, inside a `100 Continue`), and 503s.
            proxy.plan(*[rng.choice([random_cut(rng, 1500, 3000, exchanges=3), Fault("status", status=503)])
                         for _ in range(rng.randint(1, 4))])
            proc = subprocess.Popen([sys.executable, "-c", PUSHER, "sync", "push", "--hub", hub,
                                     "--device", "rover", "--data-dir", str(data)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.2, 1.5))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed += 1
            proc.wait(120)
            proxy.faults.clear()
            db = schema.open_db(data / "logs.db")
            mark = sync_watermark(db)
            db.conn.close()
            present = [r["request"]["id"] for r in on_hub(reader)]
            assert len(present) == len(set(present)), f"round {round_}: a duplicate on the hub"
            assert set(i for i in ids if i <= mark) <= set(present), f"round {round_}: watermark passed a row"
        assert killed >= 5
        assert sum(proxy.fired.values()) >= 20
        print(f"{len(ids)} rows, {killed} pushers killed, {proxy.connections} connections, "
              f"faults {dict(proxy.fired)}")
        # A last push on a clean link sends what is left.
        proc = subprocess.run([sys.executable, "-c", PUSHER, "sync", "push", "--hub", hub, "--device",
                               "rover", "--data-dir", str(data)], env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
    records = on_hub(reader)
    assert sorted(r["request"]["id"] for r in records) == ids  # every row, exactly once
    db = schema.open_db(data / "logs.db")
    fresh = pusher(tmp_path, hub, RemoteOptions(s3_endpoint=seaweed.endpoint), device="rover")
    for r in records:  # and as it is in the log (redacted the same way)
        row = db.query("select r.*, t.tools as tools_json from requests r left join tools t "
                       "on t.hash = r.tools_hash where r.id = ?", [r["request"]["id"]])
        assert fresh.record(next(row)) == r
