"""The background loop every service runs: one round now, then whenever woken or its delay passes.

A round returns the delay in seconds until the next one. A project error is
logged in one line and retried after 5 s; a bug is logged with its traceback
and retried after 30 s: the node keeps running either way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ..core.errors import CabinetError

log = logging.getLogger("cabinet.loop")


class Loop:
    def __init__(self, name: str, round_fn: Callable[[], Awaitable[float]]) -> None:
        self._name, self._round = name, round_fn
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()                # a wake during the round below runs another at once
            try:
                delay = await self._round()
            except CabinetError as exc:
                log.error("%s: %s", self._name, exc)
                delay = 5.0
            except Exception:   # a bug: log it, keep the node running, try again later
                log.exception("%s: unexpected error", self._name)
                delay = 30.0
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancel that lands together with a
            # wake, and stop() would then wait for ever (a node that never finishes shutting down).
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=delay)
            finally:
                waiter.cancel()
