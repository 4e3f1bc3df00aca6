"""Workers fail alone: a worker killed mid-generation (SIGKILL, as the OOM killer sends;
SIGSEGV, as a crash in native code ends) fails only its request with `worker_crashed`,
leaves the budget at once, and the next request reloads it; a request queued behind the
crash is served by the reloaded worker. A version that fails to load again and again is
quarantined with backoff instead of being reloaded in a loop. Real daemon, real workers,
real signals."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import psutil
import pytest

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore
from outpost.runtime.errors import ModelLoadFailed, ModelQuarantined, WorkerCrashed
from tests.conftest import TINY, add_tiny, make_data_dir, start_daemon
from tests.helpers import gguf_corpus
from tests.test_model_files import _manifest

# A call the grammar keeps open for the whole context (600 integers at least): about a
# second of decoding even for the tiny model, long enough to see the worker busy and kill it.
FILL = [{"type": "function", "function": {"name": "fill", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 600}},
    "required": ["xs"]}}}]


# Long enough that a busy CI machine still asks inside the backoff; short enough to wait out.
QUARANTINE_S = 3.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_gguf):
    data = make_data_dir(tmp_path_factory.mktemp("faults"), tiny_gguf)
    store = ModelStore(data / "models")
    # One file Outpost's reader refuses, one llama.cpp refuses after the reader passed it.
    base = gguf_corpus.read(tiny_gguf)
    bad = {"bad-magic": b"GGML" + gguf_corpus.pack(base)[4:]}
    base.kv("tokenizer.ggml.token_type").value[1][1:] = []  # fewer types than tokens
    bad["short-token-types"] = gguf_corpus.pack(base)
    for name, blob in bad.items():
        path = data / f"{name}.gguf"
        path.write_bytes(blob)
        text = _manifest(gguf_corpus.Case(name, blob, ""), path)
        (data / "manifests" / f"bad-{name}.toml").write_text(text)
        store.pull(Catalog.load(store, [data / "manifests"], TINY).get(f"bad-{name}"), text)
    add_tiny(data, "tiny-b", seed=7)  # for crashes while loading
    running = start_daemon(data, TINY, preload=[], pool={"quarantine_after": 2, "quarantine_s": QUARANTINE_S})
    yield running
    running.stop()


def _worker(client) -> dict | None:
    return next((w for w in client.status()["loaded"] if w["model"] == TINY), None)


def _long_chat(daemon, out: dict) -> threading.Thread:
    def run() -> None:
        with daemon.client(60) as c:
            try:
                out["reply"] = c.chat([{"role": "user", "content": "go"}], tools=FILL,
                                      tool_choice="required", max_tokens=4000, temperature=1.0, seed=1)
            except Exception as exc:  # noqa: BLE001 (the test inspects it)
                out["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    return t


def _busy_pid(client, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        w = _worker(client)
        if w and w["state"] == "busy":
            return w["pid"]
        time.sleep(0.01)
    raise AssertionError("the worker never became busy")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_mid_generation_fails_its_request_alone(daemon, sig):
    with daemon.client(60) as c:
        c.chat([{"role": "user", "content": "warm"}], max_tokens=2)
        first, queued = {}, {}
        t1 = _long_chat(daemon, first)
        pid = _busy_pid(c)
        t2 = _long_chat(daemon, queued)  # waits behind the first
        while not c.status()["budget"]["queued"].get(TINY):
            time.sleep(0.005)
        os.kill(pid, sig)
        t1.join(60)
        t2.join(60)
        assert isinstance(first.get("error"), WorkerCrashed), first
        assert first["error"].data["exitcode"] in (-sig, None)
        # The request queued behind it was served by a reloaded worker.
        assert "reply" in queued, queued
        w = _worker(c)
        assert w is not None and w["pid"] != pid
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2)["outpost"]["model"] == TINY


def test_a_crashed_worker_leaves_the_budget_at_once(daemon):
    with daemon.client(60) as c:
        c.chat([{"role": "user", "content": "warm"}], max_tokens=2)
        out = {}
        t = _long_chat(daemon, out)
        pid = _busy_pid(c)
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert isinstance(out.get("error"), WorkerCrashed)
        # Right after the error reply, before any other request: no worker is charged.
        assert _worker(c) is None
        assert c.status()["budget"]["used_bytes"] < c.status()["budget"]["ram_bytes"]


@pytest.mark.parametrize("model, code", [("bad-bad-magic", "model_invalid"),
                                         ("bad-short-token-types", "model_load_failed")])
def test_repeated_load_failures_are_quarantined_with_backoff(daemon, model, code):
    with daemon.client(30) as c:
        for _ in range(2):  # quarantine_after = 2
            with pytest.raises(ModelLoadFailed) as failed:
                c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=2)
            assert failed.value.code == code
        loads = c.status()["budget"]["loading"]
        with pytest.raises(ModelQuarantined) as quarantined:  # refused before any load starts
            c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=2)
        assert model not in loads and model not in c.status()["budget"]["loading"]
        assert quarantined.value.data["failures"] == 2 and code in quarantined.value.data["last_error"]
        assert model in [q["model"] for q in c.status()["budget"]["quarantined"]]
        # After the backoff one load is tried again; its failure doubles the wait.
        time.sleep(quarantined.value.data["retry_in_s"] + 0.1)
        with pytest.raises(ModelLoadFailed):
            c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=2)
        with pytest.raises(ModelQuarantined) as again:
            c.chat([{"role": "user", "content": "hi"}], model=model, max_tokens=2)
        assert again.value.data["failures"] == 3 and again.value.data["retry_in_s"] > QUARANTINE_S
        # Everything else is served meanwhile.
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2)["outpost"]["model"] == TINY


def kill_if_still_loading(c, pid: int) -> None:
    """Stop the worker, and kill it if the daemon still has it loading once any `ready`
    it sent has had time to arrive; else let it go on. A signal the worker handles (xgrammar's
    library installs a SIGSEGV handler that prints a backtrace first) would leave its
    loading thread time to finish, so the death is a SIGKILL, on a stopped process."""
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.3)  # the daemon reads a `ready` already sent within this
    w = next((w for w in c.status()["loaded"] if w["pid"] == pid), None)
    os.kill(pid, signal.SIGKILL if w and w["state"] == "loading" else signal.SIGCONT)


def new_worker(before: set[int]) -> int | None:
    """A process the daemon (running in this one) forked since `before`: the worker it
    spawns, caught as it starts: the tiny model loads faster than a status round trip."""
    kids = {p.pid for p in psutil.Process().children(recursive=True)}
    return next(iter(kids - before), None)


def test_a_worker_that_crashes_while_loading_is_quarantined(daemon):
    """The worker dies while it loads (the shape of a file that crashes llama.cpp), twice
    in a row: the requests get `model_load_failed`, then the version is quarantined.
    The test catches the worker as it is forked, stops it, and kills it if status still
    says `loading`; a load that finishes first is killed once ready and tried again. A successful load clears the strikes, so the
    count starts over after one (CI saw crash, success, crash: no quarantine, rightly)."""
    crashes, tries = 0, 0
    with daemon.client(30) as c:
        while crashes < 2:
            tries += 1
            assert tries < 200, "never caught the worker loading"
            out: dict = {}

            def ask() -> None:
                try:
                    out["reply"] = c2.chat([{"role": "user", "content": "hi"}], model="tiny-b", max_tokens=2)
                except Exception as exc:  # noqa: BLE001
                    out["error"] = exc

            with daemon.client(30) as c2:
                before = {p.pid for p in psutil.Process().children(recursive=True)}
                t = threading.Thread(target=ask)
                t.start()
                while t.is_alive():
                    if (pid := new_worker(before)) is not None:
                        kill_if_still_loading(c, pid)
                        break
                t.join(30)
            if isinstance(out.get("error"), ModelLoadFailed):
                assert "died while loading" in out["error"].message
                crashes += 1
            else:  # it loaded first: take it away so the next try loads again
                crashes = 0
                w = next((w for w in c.status()["loaded"] if w["model"] == "tiny-b"), None)
                if w:
                    os.kill(w["pid"], signal.SIGKILL)
                    while any(w["model"] == "tiny-b" for w in c.status()["loaded"]):
                        time.sleep(0.05)
        with pytest.raises(ModelQuarantined) as quarantined:
            c.chat([{"role": "user", "content": "hi"}], model="tiny-b", max_tokens=2)
        assert "died while loading" in quarantined.value.data["last_error"]


def test_quarantine_is_in_the_pool_log(daemon):
    with daemon.client(30) as c:
        for _ in range(3):
            with pytest.raises((ModelLoadFailed, ModelQuarantined)):
                c.chat([{"role": "user", "content": "hi"}], model="bad-bad-magic", max_tokens=2)
    deadline = time.monotonic() + 10  # pool events are written off the request's path
    while time.monotonic() < deadline:
        with sqlite3.connect(daemon.settings.log_path) as db:
            rows = db.execute("SELECT reason FROM pool_events WHERE kind = 'quarantine' "
                              "AND model = 'bad-bad-magic'").fetchall()
        if rows:
            assert "bad magic" in rows[0][0]
            return
        time.sleep(0.2)
    raise AssertionError("no quarantine event in the pool log")
