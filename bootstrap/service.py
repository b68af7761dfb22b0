"""One running bootstrap: the HTTP server, a puller per peer, the hourly purge.

`Bootstrap.start()` opens the data folder and listens; `stop()` lets
long-polls go, cancels the pullers and closes the database, so a SIGTERM
ends with everything committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from aiohttp import web

from node.core.errors import UsageError

from . import storage
from .replicate import Puller
from .server import CHANGES, Limits, make_app, now_ms
from .storage import Storage

log = logging.getLogger("cabinet.bootstrap")
PURGE_EVERY = 3600


class Bootstrap:
    def __init__(self, data: Path, host: str, port: int, *, peers: tuple[str, ...] = (), limits: Limits = Limits(),
                 sync_wait: int = 25, sync_interval: float = 1.0, trace: Path | None = None) -> None:
        self.trace = trace
        self.data, self.host, self.port = data, host, port
        self.peers, self.limits = tuple(p.rstrip("/") for p in peers), limits
        self.sync_wait, self.sync_interval = sync_wait, sync_interval
        self.store: Storage | None = None
        self.pullers: list[Puller] = []
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        for p in self.peers:
            if not p.startswith(("http://", "https://")):
                raise UsageError(f"a peer address starts with http:// or https:// (got {p[:60]!r})")
        self.store = Storage(self.data)
        app = make_app(self.store, self.limits, self.trace)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        changes = app[CHANGES]
        self.pullers = [Puller(self.store, p, on_change=changes.notify, wait=self.sync_wait,
                               interval=self.sync_interval) for p in self.peers]
        self._tasks = [asyncio.create_task(p.run(), name=f"pull {p.peer}") for p in self.pullers]
        self._tasks.append(asyncio.create_task(self._purge(), name="purge"))

    async def _purge(self) -> None:
        store = self.store
        assert store is not None          # started before this task
        while True:
            n = await store.write(storage.purge, now_ms())
            if n:
                log.info("reduced %d long-expired descriptor(s) to tombstones", n)
            await asyncio.sleep(PURGE_EVERY)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.store is not None:
            self.store.close()
            self.store = None
