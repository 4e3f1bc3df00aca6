"""The daemon's handle on one worker process: its socket, its state, what it costs.

    WorkerHandle.spawn -> wait_ready -> generate ... -> stop

The child process itself is worker_process.py; this is the parent's side of the
conversation (one JSON frame per message over a private DEALER socket) and the
facts the pool decides with: the state, the leases, the memory it is charged. A
generation crosses the boundary as JSON and comes back a typed `Generation`.

What this module must not do: choose which worker to evict or when to load one
(pool.py, eviction.py), or keep the budget (ledger.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from outpost.manifests.errors import from_wire
from outpost.manifests.schema import Manifest
from outpost.models.backend import Generation, GenerationRequest, LoadOptions

from . import memory
from .errors import Timeout, WorkerCrashed
from .turns import Turns

log = logging.getLogger("outpost.pool")
Snapshot = dict[int, "memory.ProcessMemory | None"]  # pid -> one read of its memory
POLL_MS = 100  # how often a waiting request checks that its worker is still alive
# How long a worker may take to acknowledge a cancel: it reads between forward passes,
# and one pass (a prompt chunk of n_batch tokens) takes well under this on any CPU.
CANCEL_GRACE_S = 10.0


class WorkerState(StrEnum):
    LOADING = "loading"  # started, its model not loaded yet
    READY = "ready"  # loaded, generating nothing
    BUSY = "busy"  # generating
    STOPPING = "stopping"  # asked to exit, or being killed
    DEAD = "dead"  # exited, or declared gone (a crash, a timeout, an eviction)


LIVE = (WorkerState.READY, WorkerState.BUSY)  # a worker that can serve a lease


class Forkserver:
    """Where workers come from: a server process that has llama_cpp and xgrammar imported
    already, so a new worker costs a fork plus an mmap, not a Python start-up.

    The daemon itself never imports them (they would double Outpost's base memory).
    The CLI module is preloaded too: each child re-runs the `outpost` script as
    __mp_main__, and its imports would otherwise cost every swap.
    """

    PRELOAD = ["outpost.runtime.daemon.worker_process", __name__, "outpost.runtime.cli"]

    def __init__(self, zmq_ctx: zmq.asyncio.Context) -> None:
        self._zmq = zmq_ctx
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(self.PRELOAD)
        # Made at the first spawn: a daemon that never loads a model (a bad config, a
        # test) must not leave an empty folder in /tmp.
        self._sockdir: Path | None = None
        self._seq = itertools.count()

    async def start(self) -> None:
        """Start the server and wait for its preload (a few seconds): a trivial child is
        the only way to know it has finished."""
        probe = self._mp.Process(target=os.getpid, name="outpost-forkserver-probe")
        await asyncio.to_thread(lambda: (probe.start(), probe.join()))

    def spawn(self, manifest: Manifest, manifest_toml: str, store_root: str, options: LoadOptions,
              reserve: int, pinned: bool, idle_ttl_s: float | None) -> WorkerHandle:
        """Bind a private socket for the worker and fork its process; it loads on its own."""
        if self._sockdir is None:
            self._sockdir = Path(tempfile.mkdtemp(prefix="outpost-w-"))
        endpoint = f"ipc://{self._sockdir / f'w{next(self._seq)}.sock'}"
        sock = self._zmq.socket(zmq.DEALER)
        sock.linger = 0
        sock.bind(endpoint)
        process = self._mp.Process(target=_worker_main, name=f"outpost-worker-{manifest.id}",
                                   args=(endpoint, manifest_toml, store_root, os.getpid(), options),
                                   daemon=True)
        process.start()
        return WorkerHandle(manifest=manifest, process=process, socket=sock, reserve=reserve,
                            pinned=pinned, idle_ttl_s=idle_ttl_s)

    def close(self) -> None:
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None


@dataclass
class WorkerHandle:
    manifest: Manifest
    process: multiprocessing.process.BaseProcess
    socket: zmq.asyncio.Socket
    reserve: int  # bytes charged to the budget for this worker
    pinned: bool = False
    idle_ttl_s: float | None = None
    turns: Turns = field(default_factory=Turns)  # who gets a slot next (turns.py)
    state: WorkerState = WorkerState.LOADING
    pid: int | None = None
    load_ms: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    served: int = 0
    leases: int = 0  # requests holding this worker (queued or generating)
    draining: bool = False  # chosen for eviction: no new leases, current ones finish
    vram: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # sha256 -> "id version", charged
    adapter: str | None = None  # the adapter applied last ("id version")
    adapter_switches: int = 0
    last_used: float = field(default_factory=time.monotonic)
    generating: int = 0  # requests in the worker's batch now
    _ids: itertools.count = field(default_factory=itertools.count)
    _inbox: dict[int, asyncio.Queue[dict[str, Any]]] = field(default_factory=dict)  # id -> its replies
    _reader: asyncio.Task[None] | None = None


    # -- talking to the process ---------------------------------------------------
    async def _recv(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            if await self.socket.poll(POLL_MS):
                return await self.socket.recv_json()
            if not self.process.is_alive():
                self.state = WorkerState.DEAD
                raise WorkerCrashed(self.manifest.id, self.process.exitcode)
            if time.monotonic() > deadline:
                self.state = WorkerState.DEAD
                self.process.kill()
                raise WorkerCrashed(self.manifest.id, None)

    async def _send(self, msg: dict[str, Any]) -> None:
        # A DEALER with no connected peer blocks on send, forever: a worker that has
        # exited must show up as an error, not a hang.
        try:
            await self.socket.send_json(msg, flags=zmq.DONTWAIT)
        except zmq.Again:
            self.state = WorkerState.DEAD
            raise WorkerCrashed(self.manifest.id, self.process.exitcode) from None

    async def wait_ready(self, timeout_s: float) -> None:
        msg = await self._recv(timeout_s)
        if msg.get("type") == "failed":
            self.state = WorkerState.DEAD
            raise from_wire(msg["error"])
        self.pid, self.load_ms, self.info = msg["pid"], msg["load_ms"], msg["info"]
        self.turns.slots = int(self.info.get("n_slots", 1))
        self.state = WorkerState.READY
        self._reader = asyncio.create_task(self._read(), name=f"replies of {self.manifest.id}")

    async def _read(self) -> None:
        """Hand each reply to the request it answers, while the worker lives; when it
        dies, every request still waiting gets its exit code."""
        while True:
            if await self.socket.poll(POLL_MS):
                msg = await self.socket.recv_json()
                if (inbox := self._inbox.get(msg.get("id"))) is not None:
                    inbox.put_nowait(msg)  # else: for a request whose caller gave up
            elif not self.process.is_alive():
                self.state = WorkerState.DEAD
                self._fail_waiting()
                return

    def _fail_waiting(self) -> None:
        """Every request still waiting on this worker learns it is gone."""
        for inbox in self._inbox.values():
            inbox.put_nowait({"type": "crashed", "exitcode": self.process.exitcode})

    async def generate(self, request: GenerationRequest, timeout_s: float,
                       on_text: Callable[[str], Awaitable[None]] | None = None) -> Generation:
        """Send one generation; the caller holds one of the worker's slots (turns.py).
        `on_text` (streaming) is awaited with each piece of settled text the worker
        sends before its result.

        Past `timeout_s` the request is cancelled in the worker (its slot frees at the
        next pass) and fails with `timeout`; a worker that does not acknowledge the
        cancel is stuck, and is killed (its requests get `worker_crashed`)."""
        if self._reader is None or self._reader.done():  # it died before this request came
            self.state = WorkerState.DEAD
            raise WorkerCrashed(self.manifest.id, self.process.exitcode)
        msg_id = next(self._ids)
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inbox[msg_id] = inbox
        self.generating += 1
        self.state = WorkerState.BUSY
        deadline = time.monotonic() + timeout_s
        try:
            await self._send({"type": "generate", "id": msg_id, "request": request.to_dict(),
                              "stream": on_text is not None})
            while True:
                try:
                    reply = await asyncio.wait_for(inbox.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    await self._give_up(msg_id, inbox)
                    raise Timeout(self.manifest.id, timeout_s, "the generation") from None
                except asyncio.CancelledError:  # its caller went away (shutdown, a closed HTTP stream)
                    with contextlib.suppress(WorkerCrashed, zmq.ZMQError):
                        await self._send({"type": "cancel", "id": msg_id})  # its slot frees at once
                    raise
                if reply["type"] == "crashed":
                    raise WorkerCrashed(self.manifest.id, reply["exitcode"])
                if reply["type"] != "delta":
                    break
                if on_text is not None:
                    try:
                        await on_text(reply["text"])
                    except Exception:  # the stream broke: read on to the result regardless,
                        log.exception("streaming a delta failed; the answer comes whole")
                        on_text = None  # or its slot would be left generating unread
        finally:
            del self._inbox[msg_id]
            self.generating -= 1
            if self.state is WorkerState.BUSY and not self.generating:
                self.state = WorkerState.READY
            self.last_used = time.monotonic()
        if reply.get("exiting"):
            self.state = WorkerState.DEAD  # no lease after this one: the pool forgets it
        if "adapter_switches" in reply:
            self.adapter, self.adapter_switches = reply["adapter"], reply["adapter_switches"]
        if reply.get("type") == "error":
            raise from_wire(reply["error"])
        self.served += 1
        if "grammar_cache" in reply:
            self.info["grammar_cache"] = reply["grammar_cache"]
        return Generation.from_dict(reply["generation"])

    async def _give_up(self, msg_id: int, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        """Cancel a request in the worker; a worker that does not acknowledge within
        CANCEL_GRACE_S is stuck (the loop answers between forward passes), and is killed."""
        try:
            await self._send({"type": "cancel", "id": msg_id})
            deadline = time.monotonic() + CANCEL_GRACE_S
            while (await asyncio.wait_for(inbox.get(), deadline - time.monotonic()))["type"] not in (
                    "cancelled", "crashed"):
                pass  # a delta or the result, sent before the worker read the cancel
        except WorkerCrashed:
            pass  # gone meanwhile: the reader tells the others
        except TimeoutError:
            log.warning("worker for %s (pid %s) did not answer a cancel in %.0f s: killed",
                        self.manifest.id, self.pid, CANCEL_GRACE_S)
            self.state = WorkerState.DEAD
            self.process.kill()

    async def stop(self, grace_s: float = 5.0) -> None:
        self.state = WorkerState.STOPPING
        if self.process.is_alive() and grace_s <= 0:
            self.process.kill()
        elif self.process.is_alive():
            try:
                await self._send({"type": "shutdown"})
            except (WorkerCrashed, zmq.ZMQError):
                pass  # already gone or going: the wait below settles it
            deadline = time.monotonic() + grace_s
            while self.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if self.process.is_alive():
                self.process.kill()
        await self._exited(5.0)
        if self._reader is not None:
            # Wait for the reader to end before its socket closes: left to fail on a closed
            # socket, its unretrieved exception would hold this handle (and the process's
            # pipes) in a reference cycle until the garbage collector ran.
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, zmq.ZMQError):
                await self._reader
            self._reader = None
        self._fail_waiting()  # stopped under them (an eviction of a crashed worker)
        self.socket.close(linger=0)
        self.state = WorkerState.DEAD

    async def _exited(self, timeout_s: float) -> None:
        """Wait until the process has exited, and so given its memory back.

        A pidfd turns readable when the process exits, after the kernel has torn down
        its address space; that is sooner than a join, which waits for the forkserver
        to reap it and pass the exit status on (that part goes on in a thread).
        """
        pid = self.process.pid
        try:
            fd = os.pidfd_open(pid) if pid else None
        except OSError:  # already reaped, or a kernel without pidfds
            fd = None
        if fd is None:
            await asyncio.to_thread(self.process.join, timeout_s)
            return
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
        try:
            await asyncio.wait_for(gone, timeout_s)
        except TimeoutError:
            log.warning("worker %s (pid %s) did not exit in %.0f s", self.manifest.id, pid, timeout_s)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        asyncio.get_running_loop().run_in_executor(None, self.process.join, timeout_s)

    # -- memory ---------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Requests it decodes together (its model's batch)."""
        return self.turns.slots

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.DEAD and self.process.is_alive()

    def uss(self, snapshot: Snapshot | None = None) -> int:
        if snapshot is not None:
            mem = snapshot.get(self.process.pid)
        else:
            mem = memory.process_memory(self.process.pid) if self.process.pid else None
        return mem.uss if mem else 0

    def charge(self, snapshot: Snapshot | None = None) -> int:
        """What this worker costs the budget: its private memory or its reserve."""
        return max(self.uss(snapshot), self.reserve)

    def describe(self, budget: int, snapshot: Snapshot | None = None) -> dict[str, Any]:
        charge = self.charge(snapshot)
        return {"model": self.manifest.id, "version": self.manifest.version, "state": self.state,
                "pid": self.pid or self.process.pid, "ram_bytes": charge, "vram_bytes": self.vram,
                "budget_share": round(charge / budget, 3) if budget else None,
                "pinned": self.pinned, "leases": self.leases, "draining": self.draining,
                "slots": self.slots, "generating": self.generating,
                "load_ms": round(self.load_ms, 1), "served": self.served,
                "adapters": sorted(self.adapters.values()), "adapter": self.adapter,
                "adapter_switches": self.adapter_switches, "grouped": self.turns.jumps,
                "batch_turns": self.turns.batch_turns, "overtaken": self.turns.overtaken,
                "idle_s": round(time.monotonic() - self.last_used, 1),
                "backend": self.manifest.backend, "runs_on": self.runs_on(),
                **{k: v for k, v in self.info.items() if k in ("n_ctx", "n_gpu_layers", "grammar_cache", "provider")}}

    def runs_on(self) -> str:
        """Where its forward passes run: `cpu` or `gpu` (llama.cpp's offload), or the
        ONNX execution provider (`CPU`, `CUDA`, `Tensorrt`)."""
        if self.manifest.backend == "onnx":
            return str(self.info.get("provider", "?")).removesuffix("ExecutionProvider")
        return "gpu" if self.info.get("n_gpu_layers") else "cpu"


def _worker_main(*args: Any) -> None:
    """A worker's entry point. The import is here, not at the top, so that the daemon
    never loads llama.cpp and xgrammar (they would double its base memory); the
    forkserver has preloaded the module, so in the child it costs nothing."""
    from . import worker_process  # noqa: PLC0415

    worker_process.serve_model(*args)
