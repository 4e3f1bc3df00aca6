"""The daemon inside another Python process: a real Daemon on its real socket, served
from a background thread. For tools (the BFCL harness's --in-process) and tests; an
agent talks to it with the same client as to `outpost serve`.

What this module must not do: start anything but the real daemon; tests and tools
that need a fake cloud pass an httpx transport, nothing is patched.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from outpost.manifests.catalog import Catalog
from outpost.manifests.store import ModelStore

from .client import OutpostClient
from .config import Settings
from .daemon.server import Daemon


class EmbeddedDaemon:
    def __init__(self, settings: Settings, start_timeout_s: float = 120.0,
                 cloud_transport: Any = None) -> None:
        self.settings = settings
        store = ModelStore(settings.store_dir)
        self.catalog = Catalog.load(store, settings.manifest_dirs, settings.default_model)
        self.daemon = Daemon(settings, self.catalog, store, cloud_transport)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="outpost-daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise RuntimeError(f"the daemon did not start in {start_timeout_s:g} s")
        if self.error:
            raise self.error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await self.daemon.serve(on_ready=lambda _: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to whoever started it
            self.error = exc
            self._ready.set()

    def client(self, timeout_s: float = 120.0) -> OutpostClient:
        return OutpostClient(self.settings.endpoint, timeout_s=timeout_s, curve=self.settings.client_keys())

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.daemon.stop)
        self._thread.join(30)
        if self._thread.is_alive():  # a socket left open blocks the context's term() for good
            raise RuntimeError("the daemon did not stop within 30 s")

    def __enter__(self) -> EmbeddedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
