"""The pool under a memory budget, with real daemons (`outpost serve` processes, and one
in-process daemon where a test must reach inside) and tiny models whose 128k-token KV
caches make their footprints real (about 90 MiB each)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from outpost.runtime.errors import BudgetExceeded, Overloaded, Timeout
from outpost.runtime.config import Settings
from outpost.runtime.embedded import EmbeddedDaemon

from .conftest import ServeProcess, add_tiny, free_port, make_data_dir
from .test_metrics import scrape, value

MODELS = ["tiny-a", "tiny-b", "tiny-c"]
HI = [{"role": "user", "content": "hi"}]
MIB = 1 << 20


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A data dir with three tiny models whose footprints are measured and stored,
    and the daemon's own memory (base) with nothing loaded."""
    data = make_data_dir(tmp_path_factory.mktemp("pool"))
    for seed, model in enumerate(MODELS):
        add_tiny(data, model, seed, memory_estimate="80MiB", context_length=131072)
    with ServeProcess(data, 'default_model = "tiny-a"\npreload = []\n[budget]\nram = "8GiB"\n',
                      "calib") as d:
        with d.client() as c:
            base = c.status()["budget"]["used_bytes"]
            for model in MODELS:
                c.chat(HI, model=model, max_tokens=2)
            fp = {w["model"]: w["ram_bytes"] for w in c.status()["loaded"]}
    return data, base, fp


def config(ram: int, extra: str = "") -> str:
    return f'default_model = "tiny-a"\npreload = ["tiny-a"]\n[budget]\nram = {ram}\nmargin = "8MiB"\n{extra}'


def two_fit(base: int, fp: dict[str, int]) -> int:
    # Room for the two largest plus half the smallest: never all three.
    sizes = sorted(fp.values())
    return base + sizes[-1] + sizes[-2] + sizes[0] // 2 + 8 * MIB


def loaded(c) -> set[str]:
    return {w["model"] for w in c.status()["loaded"]}


def events(data) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(data / "logs.db")
    rows = conn.execute("select kind, model, reason from pool_events order by id").fetchall()
    conn.close()
    return rows


def test_footprints_are_measured_and_remembered(calibrated):
    data, base, fp = calibrated
    assert all(64 * MIB < v < 400 * MIB for v in fp.values()), fp  # the KV cache is resident
    conn = sqlite3.connect(data / "logs.db")
    stored = dict(conn.execute("select model, ram_bytes from footprints").fetchall())
    conn.close()
    assert set(stored) >= set(MODELS)
    assert all(stored[m] >= fp[m] * 0.9 for m in MODELS)


def test_the_daemon_maps_no_inference_library(calibrated):
    """Inference lives in the workers: the daemon's base memory is budgeted, and llama_cpp,
    xgrammar and the torch under it once cost it ~250 MiB (a CLI plugin imported them)."""
    data, _, _ = calibrated
    with ServeProcess(data, config(8 << 30), "lean") as d, d.client() as c:
        c.chat(HI, max_tokens=2)  # a worker is up and serving
        maps = Path(f"/proc/{d.pid}/maps").read_text()
    heavy = {lib for lib in ("libtorch", "libllama", "xgrammar", "libggml") if lib in maps}
    assert not heavy, heavy


def test_third_model_evicts_the_least_valuable_idle_one(calibrated):
    data, base, fp = calibrated
    with ServeProcess(data, config(two_fit(base, fp)), "evict") as d, d.client() as c:
        c.chat(HI, model="tiny-b", max_tokens=2)
        time.sleep(1.5)
        c.chat(HI, model="tiny-a", max_tokens=2)  # same size and reload cost: tiny-b idles longer
        assert loaded(c) == {"tiny-a", "tiny-b"}
        reply = c.chat(HI, model="tiny-c", max_tokens=2)
        assert reply["outpost"]["timings_ms"]["load"] > 0
        assert loaded(c) == {"tiny-a", "tiny-c"}
        status = c.status()
        assert status["budget"]["used_bytes"] <= status["budget"]["ram_bytes"]
        assert status["budget"]["evictions"] == 1
    kinds = [(k, m) for k, m, _ in events(data) if k == "evict"]
    assert kinds[-1] == ("evict", "tiny-b")
    assert "make room for tiny-c" in [r for k, m, r in events(data) if k == "evict"][-1]


def test_a_model_larger_than_the_budget_is_refused_and_others_keep_serving(calibrated):
    data, base, fp = calibrated
    add_tiny(data, "tiny-huge", 9, memory_estimate="64GiB")
    with ServeProcess(data, config(two_fit(base, fp)), "huge") as d, d.client() as c:
        with pytest.raises(BudgetExceeded) as info:
            c.chat(HI, model="tiny-huge", max_tokens=2)
        assert info.value.needed > 60 * 1024 * MIB and info.value.available < info.value.needed
        assert c.chat(HI, model="tiny-a", max_tokens=2)["outpost"]["model"] == "tiny-a"
        assert "tiny-a" in loaded(c)


def test_a_pinned_model_is_never_evicted(calibrated):
    data, base, fp = calibrated
    extra = '[models.tiny-a]\npin = true\n'
    with ServeProcess(data, config(two_fit(base, fp), extra), "pin") as d, d.client() as c:
        for model in ["tiny-b", "tiny-c", "tiny-b", "tiny-c"]:
            c.chat(HI, model=model, max_tokens=2)
            assert "tiny-a" in loaded(c)
        assert [w["pinned"] for w in c.status()["loaded"] if w["model"] == "tiny-a"] == [True]


def test_idle_ttl_unloads(calibrated):
    data, base, fp = calibrated
    port = free_port()
    extra = f'[models.tiny-b]\nidle_ttl_s = 0.5\n[metrics]\nport = {port}\n'
    with ServeProcess(data, config(8 << 30, extra), "ttl") as d, d.client() as c:
        c.chat(HI, model="tiny-b", max_tokens=2)
        assert "tiny-b" in loaded(c)
        time.sleep(2.5)
        assert loaded(c) == {"tiny-a"}  # the default pool TTL (900 s) keeps tiny-a
        scraped = scrape(port)
    assert ("unload", "tiny-b") in [(k, m) for k, m, _ in events(data)]
    # How long the unload took, in the log and in the metrics.
    conn = sqlite3.connect(data / "logs.db")
    stop_ms = conn.execute("select stop_ms from pool_events where kind = 'unload' and model = 'tiny-b' "
                           "order by id desc").fetchone()[0]
    conn.close()
    assert stop_ms is not None and stop_ms >= 0
    assert value(scraped, "outpost_model_unload_seconds_count", model="tiny-b", reason="unload") == 1


def test_a_model_serving_a_request_is_not_evicted_mid_request(calibrated):
    """Budget for one model: a request for another must wait for the lease to end."""
    data, base, fp = calibrated
    one = base + max(fp.values()) + min(fp.values()) // 2 + 8 * MIB
    with ServeProcess(data, config(one), "lease") as d:
        results: dict[str, dict] = {}

        def long_request() -> None:
            with d.client() as c:
                # Greedy decoding of random weights never picks EOS: a long, sure request.
                results["a"] = c.chat(HI, model="tiny-a", max_tokens=8000)
                results["a_done"] = time.monotonic()

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)  # tiny-a is generating now
        with d.client() as c:
            results["b"] = c.chat(HI, model="tiny-b", max_tokens=2)
            results["b_done"] = time.monotonic()
        t.join()
    assert results["a"]["usage"]["completion_tokens"] == 8000  # it ran to its end
    assert results["b"]["outpost"]["timings_ms"]["load"] > 0
    assert results["a_done"] <= results["b_done"]


def test_concurrent_requests_for_a_cold_model_load_it_once(calibrated):
    data, base, fp = calibrated
    with ServeProcess(data, config(8 << 30), "dedupe") as d:
        replies, errors = [], []

        def one() -> None:
            try:
                with d.client() as c:
                    replies.append(c.chat(HI, model="tiny-c", max_tokens=2))
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(replies) == 6
    log = (data / "dedupe.log").read_text()
    assert log.count("loaded tiny-c ") == 1, log  # six requests, one load


def test_bounded_queue_and_deadline(calibrated):
    data, base, fp = calibrated
    cfg = config(8 << 30, '[pool]\nmax_queue = 2\nqueue_timeout_s = 1.0\n')
    with ServeProcess(data, cfg, "queue") as d:
        outcomes: list[str] = []

        def one() -> None:
            try:
                with d.client() as c:
                    c.chat(HI, model="tiny-a", max_tokens=8000)  # greedy: about 2.5 s
                outcomes.append("ok")
            except (Overloaded, Timeout) as exc:
                outcomes.append(exc.code)

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        with d.client() as c:  # and it still serves
            assert c.chat(HI, model="tiny-a", max_tokens=2)["outpost"]["model"] == "tiny-a"
    # One runs; two queue and give up after 1 s; the rest find the queue full.
    assert sorted(outcomes) == ["ok", "overloaded", "overloaded", "timeout", "timeout"], outcomes


def test_killed_worker_frees_its_budget_and_reloads(calibrated):
    data, base, fp = calibrated
    with ServeProcess(data, config(two_fit(base, fp)), "kill") as d, d.client() as c:
        c.chat(HI, model="tiny-b", max_tokens=2)
        before = c.status()
        pid = next(w["pid"] for w in before["loaded"] if w["model"] == "tiny-b")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while "tiny-b" in loaded(c) and time.monotonic() < deadline:
            time.sleep(0.2)  # the reaper notices within a second
        after = c.status()
        assert "tiny-b" not in loaded(c)
        assert after["budget"]["used_bytes"] < before["budget"]["used_bytes"] - 50 * MIB
        reply = c.chat(HI, model="tiny-b", max_tokens=2)
        assert reply["outpost"]["timings_ms"]["load"] > 0
    assert ("crash", "tiny-b") in [(k, m) for k, m, _ in events(data)]


def test_ps_shows_memory_share_and_state(calibrated):
    data, base, fp = calibrated
    with ServeProcess(data, config(8 << 30), "ps") as d:
        env = {**os.environ, "OUTPOST_DATA_DIR": str(data), "OUTPOST_ENDPOINT": d.endpoint}
        exe = str(Path(sys.executable).with_name("outpost"))
        out = subprocess.run([exe, "ps", "--json"], env=env, capture_output=True, text=True, timeout=30)
        ps = json.loads(out.stdout)
        [row] = ps["models"]
        assert row["model"] == "tiny-a" and row["state"] == "ready"
        assert row["ram_bytes"] > 64 * MIB and 0 < row["budget_share"] < 1
        assert {"idle_s", "served", "load_ms", "pid"} <= set(row)
        human = subprocess.run([exe, "ps"], env=env, capture_output=True, text=True, timeout=30).stdout
        assert "tiny-a" in human and "MEMORY" in human


def settled_usage(c) -> int:
    """Outpost's usage once it stops moving: fresh workers go on copying pages they
    share with the forkserver (copy-on-write), which their PSS counts, for a moment
    after their first requests."""
    last = c.status()["budget"]["used_bytes"]
    for _ in range(20):
        time.sleep(0.25)
        now = c.status()["budget"]["used_bytes"]
        if abs(now - last) < 4 << 20:
            return now
        last = now
    return last


def test_growth_past_the_budget_evicts_idle_models(calibrated):
    """Workers can outgrow their charge after admission. The reaper notices within a
    second and evicts idle models until Outpost is back under its budget. (The budget
    is lowered under a running daemon here: the same state, made on purpose.)"""
    data, base, fp = calibrated
    settings = Settings.load(None, data_dir=data, endpoint=f"ipc://{data}/grow.sock",
                             default_model="tiny-a", preload=[], manifest_dirs=[data / "manifests"],
                             budget={"ram": 8 << 30})
    with EmbeddedDaemon(settings) as d, d.client() as c:
        for model in MODELS:
            c.chat(HI, model=model, max_tokens=2)
        assert loaded(c) == set(MODELS)
        used = settled_usage(c)
        pool = d.daemon.pool
        # One model too many, now. A quarter of a model over, not half: Outpost's own
        # PSS still moves by tens of MiB here (CI saw +48 MiB within the second before
        # the reaper looked, and rightly evicted a second model for the last 1 MiB).
        pool.ledger.ram = used - min(fp.values()) // 4
        deadline = time.monotonic() + 10
        while len(loaded(c)) == 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(loaded(c)) == 2
        assert c.status()["budget"]["used_bytes"] <= pool.ledger.ram
    assert ("evict", "over the memory budget") in [(k, r) for k, _, r in events(data)]
