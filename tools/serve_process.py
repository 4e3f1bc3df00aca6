"""`outpost serve` as a child process, for benchmarks and tests that must measure the
daemon's memory and timings apart from their own; and a peer's HTTP server (llama.cpp's,
llama-cpp-python's) as one, on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx

from outpost.runtime.client import OutpostClient


class ServeProcess:
    def __init__(self, data: Path, config: str = "", name: str = "serve",
                 cwd: Path | None = None, start_timeout_s: float = 120.0,
                 preexec_fn: Any = None, new_session: bool = False) -> None:
        self.data = data
        self.endpoint = f"ipc://{data}/{name}.sock"
        self.config = data / f"{name}.toml"
        self.config.write_text(config)
        self.log_path = data / f"{name}.log"
        env = {**os.environ, "OUTPOST_DATA_DIR": str(data), "OUTPOST_ENDPOINT": self.endpoint}
        env.pop("OUTPOST_CONFIG", None)
        exe = str(Path(sys.executable).with_name("outpost"))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([exe, "serve", "--config", str(self.config),
                                      "--log-level", "INFO"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=preexec_fn,
                                     start_new_session=new_session)
        deadline = time.monotonic() + start_timeout_s
        while "outpost call" not in self.output():  # the banner's last line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"outpost serve did not start:\n{self.output()}")
            time.sleep(0.1)
        self.pid = self.proc.pid

    def client(self, timeout_s: float = 120.0) -> OutpostClient:
        return OutpostClient(self.endpoint, timeout_s=timeout_s)

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(command: list[str], health: str, name: str, timeout_s: float = 180.0,
                output: IO[Any] | int = subprocess.DEVNULL) -> Iterator[str]:
    """`command` with `--port <free port>` added, until `health` answers 200: its base URL.
    Ended (terminated, then waited for) on leaving."""
    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}{health}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
