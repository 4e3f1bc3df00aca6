"""Batching through the daemon: a worker with four slots serves concurrent agents
together, each answer the one it gets alone; a crash mid-batch fails the requests in
it and nothing else; a request that times out leaves the batch. Real daemon, real
workers, the tiny model, real sockets and the real log."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import pytest

from outpost.manifests.schema import Manifest
from outpost.runtime.daemon import memory
from outpost.runtime.daemon.ledger import AUTO_SLOTS_GPU, WORKER_OVERHEAD, MemoryLedger, context_bytes
from outpost.runtime.daemon.settings import BudgetSettings, LlamaSettings
from outpost.runtime.errors import Timeout, WorkerCrashed
from outpost.runtime.logs.records import Footprint
from outpost.tools.tiny_gguf import tiny_manifest_toml

from .conftest import REPO, TINY, add_tiny, make_data_dir, start_daemon

WEATHER = json.loads((REPO / "examples" / "weather_tool.json").read_text())
FLIGHT = [{"type": "function", "function": {"name": "book_flight", "parameters": {
    "type": "object", "properties": {"to": {"type": "string", "enum": ["OSL", "LIS", "NRT"]},
                                     "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["to", "seats"], "additionalProperties": False}}}]
# A call the grammar keeps open for thousands of tokens: seconds of decoding even for
# the tiny model, long enough to catch it in a batch.
FILL = [{"type": "function", "function": {"name": "fill", "parameters": {
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1500}},
    "required": ["xs"]}}}]
LONG = "tiny-long"  # the tiny model with a 4096-token context, for FILL


def ask(i: int) -> dict:
    """Eight kinds of request: free text, each tool_choice mode, two schemas."""
    tools, choice = [(None, None), (WEATHER, "required"), (FLIGHT, {"type": "function", "function": {
        "name": "book_flight"}}), (WEATHER + FLIGHT, "auto"), (FLIGHT, "required"), (None, None),
        (WEATHER, "none"), (WEATHER + FLIGHT, "required")][i]
    return {"messages": [{"role": "user", "content": f"request {i}: " + "go " * i}], "tools": tools,
            "tool_choice": choice, "max_tokens": 60, "temperature": 0.0}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_gguf):
    data = make_data_dir(tmp_path_factory.mktemp("batching"), tiny_gguf)
    add_tiny(data, LONG, seed=3, context_length=4096)
    running = start_daemon(data, TINY, preload=[TINY], llama={"n_parallel": 4})
    yield running
    running.stop()


def together(daemon, requests: list[dict]) -> list[dict | Exception]:
    """Send every request at once, each from its own client; the replies in order."""
    out: list[dict | Exception] = [None] * len(requests)  # type: ignore[list-item]

    def one(i: int) -> None:
        with daemon.client(60) as c:
            try:
                out[i] = c.chat(**requests[i])
            except Exception as exc:  # noqa: BLE001 (the test inspects it)
                out[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def answer(reply: dict) -> tuple:
    message = reply["choices"][0]["message"]
    calls = [c["function"] for c in message.get("tool_calls") or []]
    return message.get("content"), calls, [v["valid"] for v in reply["outpost"].get("validation") or []]


def batch_sizes(daemon, replies: list[dict]) -> list[float]:
    ids = [r["outpost"]["log_id"] for r in replies]
    with sqlite3.connect(daemon.settings.log_path) as db:
        rows = dict(db.execute(f"SELECT request_id, batch_size FROM attempts WHERE kind = 'local' "
                               f"AND request_id IN ({','.join('?' * len(ids))})", ids).fetchall())
    return [rows[i] for i in ids]


def test_eight_concurrent_tool_calls_answer_as_they_do_alone(daemon):
    with daemon.client(60) as c:
        alone = [c.chat(**ask(i)) for i in range(8)]
    assert set(batch_sizes(daemon, alone)) == {1.0}
    concurrent = together(daemon, [ask(i) for i in range(8)])
    assert [answer(r) for r in concurrent] == [answer(r) for r in alone]
    # They decoded together (four slots), and the log says so.
    assert max(batch_sizes(daemon, concurrent)) > 1.0
    with daemon.client() as c:
        worker = next(w for w in c.status()["loaded"] if w["model"] == TINY)
    assert worker["slots"] == 4 and worker["generating"] == 0 and worker["served"] >= 16


def _long(i: int) -> dict:
    return {"model": LONG, "messages": [{"role": "user", "content": f"fill {i}"}], "tools": FILL,
            "tool_choice": "required", "max_tokens": 4000, "temperature": 1.0, "seed": i}


def test_a_crash_mid_batch_fails_the_requests_in_it_and_nothing_else(daemon):
    with daemon.client(60) as c:
        c.chat([{"role": "user", "content": "warm"}], model=LONG, max_tokens=2)
        out: list = []
        runner = threading.Thread(target=lambda: out.extend(together(daemon, [_long(i) for i in range(3)])))
        runner.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            worker = next(w for w in c.status()["loaded"] if w["model"] == LONG)
            if worker["generating"] == 3:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the three requests never decoded together")
        os.kill(worker["pid"], signal.SIGKILL)
        runner.join(60)
        assert [type(r) for r in out] == [WorkerCrashed] * 3, out
        # The other model's worker never noticed; this one is reloaded on demand.
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2)["outpost"]["model"] == TINY
        assert c.chat([{"role": "user", "content": "hi"}], model=LONG, max_tokens=2)["outpost"]["model"] == LONG


def test_a_request_that_times_out_leaves_the_batch(tmp_path, tiny_gguf):
    data = make_data_dir(tmp_path, tiny_gguf)
    add_tiny(data, LONG, seed=3, context_length=4096)
    running = start_daemon(data, LONG, preload=[LONG], llama={"n_parallel": 2},
                           server={"request_timeout_s": 1.0})
    try:
        with running.client(60) as c:
            with pytest.raises(Timeout) as timed_out:
                c.chat(**_long(1))
            assert timed_out.value.data["stage"] == "the generation"
            # Cancelled in the worker: the next request decodes alone, not beside it.
            reply = c.chat([{"role": "user", "content": "hi"}], max_tokens=4)
            assert batch_sizes(running, [reply]) == [1.0]
            worker = c.status()["loaded"][0]
            assert worker["generating"] == 0 and worker["state"] == "ready"
    finally:
        running.stop()


class OneGpu(memory.Gpus):
    """One GPU with `free` bytes that no worker uses yet: NVML's answers, held still."""

    def __init__(self, free: int) -> None:
        self.count, self._free = 1, free

    def free(self) -> list[int]:
        return [self._free]

    def used_by(self, pids: set[int]) -> dict[int, int]:
        return {}


def test_the_gpu_offload_is_planned_for_every_slots_context(tiny_gguf):
    manifest = Manifest.from_toml(tiny_manifest_toml(tiny_gguf, memory_estimate="64MiB"))
    weights, kv, overhead = manifest.weights.size, context_bytes(manifest), 256 << 20
    vram = weights + 2 * kv + overhead  # the whole model with two contexts, not four
    ledger = MemoryLedger(BudgetSettings(ram=1 << 30, margin=0, vram=vram), LlamaSettings(), {},
                          gpus=OneGpu(8 << 30))
    assert ledger.gpu_layers(manifest, []) == -1  # one context: all of it fits
    layers, slots = ledger.plan(manifest, "auto", [])
    assert slots == AUTO_SLOTS_GPU
    assert layers == memory.plan_gpu_layers(32, weights, AUTO_SLOTS_GPU * kv, vram) and 0 <= layers < 32
    assert ledger.plan(manifest, 2, []) == (-1, 2)
    # Room for a layer with one context only: "auto" takes fewer slots to keep the model
    # on the GPU; a configured number of slots is kept, on the CPU.
    per_layer = weights / 33 + kv / 32
    ledger.vram = [overhead + int(1.5 * per_layer)]
    assert ledger.plan(manifest, "auto", []) == (1, 1)
    assert ledger.plan(manifest, 4, []) == (0, 4)
    # Configured layers are kept whatever the slots.
    ledger.llama = LlamaSettings(n_gpu_layers=7)
    assert ledger.plan(manifest, "auto", []) == (7, AUTO_SLOTS_GPU)


def test_the_budget_charges_a_context_per_slot_and_a_short_budget_gets_fewer_slots(tiny_gguf):
    manifest = Manifest.from_toml(tiny_manifest_toml(tiny_gguf, memory_estimate="64MiB"))
    kv = context_bytes(manifest)
    assert kv == (64 << 20) - manifest.weights.size
    ledger = MemoryLedger(BudgetSettings(ram=1 << 30, margin=0), LlamaSettings(), {})
    alone = ledger.estimate(manifest)
    assert alone == (64 << 20) + WORKER_OVERHEAD and ledger.estimate(manifest, 4) == alone + 3 * kv
    # "auto": one slot on a CPU; a number is kept while the budget holds it...
    assert ledger.slots(manifest, "auto", 0) == 1 and ledger.slots(manifest, 4, 0) == 4
    # ...and cut to what it holds when it does not (a model short of memory runs fewer).
    ledger.ram = alone + 2 * kv
    assert ledger.slots(manifest, 8, 0) == 3
    # A footprint measured with 2 slots: 2 more slots cost 2 more contexts.
    ledger.footprints[(manifest.id, manifest.version)] = Footprint(
        model=manifest.id, version=manifest.version, ram_bytes=100 << 20, n_slots=2)
    assert ledger.estimate(manifest, 4) == (100 << 20) + 2 * kv
