"""A loopback TCP proxy that breaks links on purpose, between a device and a real hub.

Each new connection takes the next planned fault, or the default one when none is left
(None: it passes through):

    Fault("cut", after=N)     forward N bytes of the server's answer, then close both ends
    Fault("stall", after=N)   forward N bytes, then go silent (until `stall_s` or close())
    Fault("status", status=S) answer the request itself with HTTP S (500, 503) and close

It works below TLS and HTTP, so an HTTPS mirror and an S3 gateway are broken alike, and
the client under test runs unpatched. `after` counts the bytes of the whole server side
of the connection (headers included), as a link that drops sees them.

What this module must not do: parse or change the traffic it forwards.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal, Self


@dataclass(frozen=True)
class Fault:
    kind: Literal["cut", "stall", "status"]
    after: int = 0
    status: int = 503
    stall_s: float = 3600.0


class FaultProxy:
    def __init__(self, upstream_port: int, faults: list[Fault] | None = None,
                 default: Fault | None = None, rate: float | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: deque[Fault] = deque(faults or [])
        self.default = default
        # The link's speed down, bytes a second per connection (None: loopback speed). A
        # slow link keeps the client's socket buffer near empty, as in the field, so a
        # killed client loses what was in flight, not megabytes queued on loopback.
        self.rate = rate
        self.connections = 0
        self.bytes_down = 0  # server-to-client bytes forwarded, all connections together
        self.fired: Counter[str] = Counter()  # faults that met a connection, by kind
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()

    def plan(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True, name="faultproxy").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in list(self._open):
                _close(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self.faults.popleft() if self.faults else self.default
                if fault is not None:
                    self.fired[fault.kind] += 1
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "status":
            try:
                client.settimeout(5)
                client.recv(65536)  # the request's head; the answer does not depend on it
                client.sendall(f"HTTP/1.1 {fault.status} Injected\r\nContent-Length: 0\r\n"
                               "Connection: close\r\n\r\n".encode())
            except OSError:
                pass
            self._forget(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
        except OSError:
            self._forget(client)
            return
        with self._lock:
            self._open.add(upstream)
        threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
        self._pump_down(upstream, client, fault)

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _pump_down(self, upstream: socket.socket, client: socket.socket, fault: Fault | None) -> None:
        budget = fault.after if fault is not None else None
        start, sent = time.monotonic(), 0
        try:
            while data := upstream.recv(16384 if self.rate else 65536):
                if self.rate:
                    sent += len(data)
                    ahead = sent / self.rate - (time.monotonic() - start)
                    if ahead > 0 and self._closed.wait(ahead):
                        break
                if budget is not None and len(data) >= budget:
                    client.sendall(data[:budget])
                    self._count(budget)
                    if fault.kind == "stall":
                        self._closed.wait(fault.stall_s)
                    break
                client.sendall(data)
                self._count(len(data))
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass
        self._forget(client, upstream)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            for s in sockets:
                self._open.discard(s)
                _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
