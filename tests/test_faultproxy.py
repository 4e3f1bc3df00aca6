"""The fault proxy itself: each fault does to the bytes what it says, on a real loopback
server, seen from a raw socket."""

from __future__ import annotations

import socket
import threading

import pytest

from outpost.tools.faultproxy import INTERIM, Fault, FaultProxy

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
REQUEST = b"PUT /x HTTP/1.1\r\nHost: hub\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000


class Upstream:
    """A server that reads a request (until the client stops sending or 1 s of quiet),
    records its bytes, and answers ANSWER."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[bytes] = []
        self.served = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                got = b""
                try:
                    while len(got) < len(REQUEST) and (data := conn.recv(65536)):
                        got += data
                    conn.sendall(ANSWER)
                except OSError:
                    pass
                self.received.append(got)
                self.served.release()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


def exchange(port: int) -> tuple[bytes, str]:
    """Send REQUEST, read to the end: the bytes that came back, and how the link ended."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        got = b""
        try:
            s.sendall(REQUEST)
            while data := s.recv(65536):
                got += data
        except ConnectionResetError:
            return got, "rst"
        except BrokenPipeError:
            return got, "rst"
        return got, "fin"


def test_a_link_without_a_fault_carries_both_ways(upstream):
    with FaultProxy(upstream.port) as proxy:
        assert exchange(proxy.port) == (ANSWER, "fin")
    assert upstream.served.acquire(timeout=10)
    assert upstream.received == [REQUEST] and proxy.bytes_down == len(ANSWER)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_cut_of_the_answer_forwards_that_many_bytes_and_ends_as_told(upstream, how):
    with FaultProxy(upstream.port, [Fault("cut", after=20, how=how)]) as proxy:
        assert exchange(proxy.port) == (ANSWER[:20], how)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_cut_of_the_request_body_reaches_the_hub_short(upstream, how):
    after = len(REQUEST) - 300
    with FaultProxy(upstream.port, [Fault("cut", after=after, side="up", how=how)]) as proxy:
        got, ended = exchange(proxy.port)
    assert got == b"" and ended == how
    assert upstream.served.acquire(timeout=10) and upstream.received == [REQUEST[:after]]


@pytest.mark.parametrize("after", [0, 12, 24, 25])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_an_interim_answer_is_cut_where_told_and_the_hub_never_sees_the_request(upstream, after, how):
    with FaultProxy(upstream.port, [Fault("interim", after=after, how=how)]) as proxy:
        assert exchange(proxy.port) == (INTERIM[:after], how)
    assert b"".join(upstream.received) == b""  # a connection, perhaps; no request


def test_an_interim_answer_waits_for_its_exchange_on_a_kept_alive_connection():
    """Two requests on one connection: the first passes, the second is answered 100 and cut."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                heads.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    with FaultProxy(listener.getsockname()[1], [Fault("interim", after=12, exchange=1)]) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"GET /a HTTP/1.1\r\nHost: hub\r\n\r\n")
        assert s.recv(65536) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        s.sendall(b"PUT /b HTTP/1.1\r\nHost: hub\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        got = b""
        while data := s.recv(65536):
            got += data
    listener.close()
    assert got == INTERIM[:12] and heads == [b"GET /a HTTP/1.1\r\nHost: hub\r\n\r\n"]


def test_an_interim_answer_longer_than_one_is_refused():
    with pytest.raises(ValueError):
        Fault("interim", after=26)
