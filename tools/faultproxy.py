"""A loopback TCP proxy that breaks links on purpose, between a device and a real hub.

Each new connection takes the next planned fault, or the default one when none is left
(None: it passes through):

    Fault("cut", after=N)       forward N bytes, then close both ends
    Fault("stall", after=N)     forward N bytes, then go silent (until `stall_s` or close())
    Fault("status", status=S)   answer the request itself with HTTP S (500, 503) and close
    Fault("interim", after=N)   answer a request's head with the first N bytes of
                                "HTTP/1.1 100 Continue\r\n\r\n" (25), then close; the hub
                                never sees that request. `exchange=i`: the i-th request on
                                the connection (those before pass through)

`side` says whose bytes `after` counts: "down", the server's answer (headers included,
over the whole connection, as a link that drops sees them), or "up", the client's
request (its head and body). `how` says how a cut or an interim ends: "fin", a normal
close, or "rst", a reset (SO_LINGER 0). An interim answer is legal unasked (a client
must parse any 1xx before the final answer; RFC 9110 §15.2), so it reaches clients that
send no `Expect: 100-continue` as well as those that do.

It works below TLS and HTTP, so an HTTPS mirror and an S3 gateway are broken alike, and
the client under test runs unpatched.

What this module must not do: parse or change the traffic it forwards (an interim fault
reads the head it answers, and forwards nothing).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal, Self


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class Fault:
    kind: Literal["cut", "stall", "status", "interim"]
    after: int = 0
    status: int = 503
    stall_s: float = 3600.0
    side: Literal["down", "up"] = "down"
    how: Literal["fin", "rst"] = "fin"
    exchange: int = 0  # interim only: which request on the connection it answers (0: the first)

    def __post_init__(self) -> None:
        if self.kind == "interim" and not 0 <= self.after <= len(INTERIM):
            raise ValueError(f"an interim answer is {len(INTERIM)} bytes; after={self.after}")


def random_cut(rng: random.Random, answer_bytes: int, request_bytes: int, exchanges: int = 1) -> Fault:
    """A link drop drawn from every place one can fall: any byte of the answers, any
    byte of the requests (bodies included), or inside an interim answer to any of the
    connection's first `exchanges` requests; ended by FIN or by RST, evenly."""
    how = rng.choice(("fin", "rst"))
    where = rng.choice(("answer", "request", "interim"))
    if where == "answer":
        return Fault("cut", after=rng.randint(0, answer_bytes), how=how)
    if where == "request":
        return Fault("cut", side="up", after=rng.randint(0, request_bytes), how=how)
    return Fault("interim", after=rng.randint(0, len(INTERIM)), how=how, exchange=rng.randrange(exchanges))


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
        up = fault if fault is not None and (fault.side == "up" or fault.kind == "interim") else None
        turn = _Turn()
        threading.Thread(target=self._pump_up, args=(client, upstream, up, turn), daemon=True).start()
        self._pump_down(upstream, client, fault if up is None else None, turn)

    def _pump_up(self, client: socket.socket, upstream: socket.socket, fault: Fault | None,
                 turn: _Turn) -> None:
        budget = fault.after if fault is not None and fault.kind != "interim" else None
        exchange = -1
        try:
            while data := client.recv(65536):
                if turn.answered:  # the client speaks after the server did: its next request
                    turn.answered = False
                    exchange += 1
                    if fault is not None and fault.kind == "interim" and exchange == fault.exchange:
                        self._interim(client, upstream, data, fault)
                        return
                if budget is not None and len(data) >= budget:
                    upstream.sendall(data[:budget])
                    if fault.kind == "stall":
                        self._closed.wait(fault.stall_s)
                    self._forget(client, how=fault.how)
                    self._forget(upstream)  # the hub sees a request cut short
                    return
                upstream.sendall(data)
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _interim(self, client: socket.socket, upstream: socket.socket, head: bytes, fault: Fault) -> None:
        """Answer the request whose first bytes are `head` with part of an interim answer,
        then cut: the hub gets none of it."""
        try:
            client.settimeout(5)
            while b"\r\n\r\n" not in head and (data := client.recv(65536)):
                head += data
            client.sendall(INTERIM[:fault.after])
        except OSError:
            pass
        self._forget(client, how=fault.how)
        self._forget(upstream)

    def _pump_down(self, upstream: socket.socket, client: socket.socket, fault: Fault | None,
                   turn: _Turn) -> None:
        budget = fault.after if fault is not None else None
        start, sent = time.monotonic(), 0
        how = "fin"
        try:
            while data := upstream.recv(16384 if self.rate else 65536):
                if self.rate:
                    sent += len(data)
                    ahead = sent / self.rate - (time.monotonic() - start)
                    if ahead > 0 and self._closed.wait(ahead):
                        break
                turn.answered = True  # before the client can have it: its next bytes are a new request
                if budget is not None and len(data) >= budget:
                    client.sendall(data[:budget])
                    self._count(budget)
                    if fault.kind == "stall":
                        self._closed.wait(fault.stall_s)
                    how = fault.how
                    break
                client.sendall(data)
                self._count(len(data))
                if budget is not None:
                    budget -= len(data)
        except OSError:
            pass
        self._forget(client, how=how)
        self._forget(upstream)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_down += n

    def _forget(self, *sockets: socket.socket, how: str = "fin") -> None:
        with self._lock:
            for s in sockets:
                self._open.discard(s)
                _close(s, how)


class _Turn:
    """Whose turn it is on one connection: a request starts when the client sends after
    the server did (HTTP/1.1 without pipelining, as every client here). Bytes are not
    parsed, so a server's own `100 Continue` ends a turn too: with a client that sends
    `Expect`, a request's body is an exchange of its own."""

    answered = True  # the first bytes from the client start exchange 0


def _close(s: socket.socket, how: str = "fin") -> None:
    if how == "rst":
        try:  # a close with lingering off and a zero timeout sends RST, not FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wakes a thread blocked reading it (so the close below is the last one) and
            # sends nothing, where SHUT_RDWR would send a FIN first.
            s.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        s.close()
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
