"""Anti-entropy: copy every descriptor a peer bootstrap has, through its /v1/sync.

One task per peer pulls pages of the peer's changes after a cursor (the peer's
local change counter), long-polling when caught up so a new announce crosses
in milliseconds. Each page is verified and stored by the same rules as an
announce (a forged, expired or rolled-back descriptor is skipped), and the
cursor is saved in the same transaction as the page. What is stored gets a
local change counter of its own, so a descriptor also travels on through
bootstraps that are not peered directly. A peer that goes away is retried
with backoff and jitter; one whose database ID changes is read again from 0.
The page's shape and checks are node/core/directory.py, shared with the server.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable

import aiohttp

from node.core import directory as codec
from node.core.directory import SyncPage
from node.core.errors import CabinetError, PeerRefused, PeerTimeout, PeerUnreachable, RemoteProtocolError

from . import storage
from .server import now_ms as wall_ms
from .storage import Storage

log = logging.getLogger("cabinet.bootstrap.replicate")
PAGE = 500
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0


class Puller:
    def __init__(self, store: Storage, peer: str, *, on_change: Callable[[], None], wait: int = 25,
                 interval: float = 1.0, now_ms: Callable[[], int] = wall_ms) -> None:
        self.store, self.peer, self.wait, self.interval = store, peer.rstrip("/"), wait, interval
        self.on_change, self.now_ms = on_change, now_ms
        self.pulled = 0

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            delay = BACKOFF_FIRST
            while True:
                try:
                    moved = await self.round(session)
                    delay = BACKOFF_FIRST
                    if not moved:
                        await asyncio.sleep(self.interval)      # the long poll ended empty
                    continue
                except CabinetError as exc:
                    log.info("peer %s: %s; retrying in %.1f s", self.peer, exc, delay)
                except Exception:
                    log.exception("peer %s: unexpected error; retrying in %.1f s", self.peer, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX)

    async def round(self, session: aiohttp.ClientSession) -> bool:
        """Pull until caught up (a request long-polls for `wait` s if nothing is new); False if nothing came."""
        peer_db, cursor = await self.store.read(storage.peer_cursor, self.peer)
        start = cursor
        while True:
            page = await self.fetch(session, cursor)
            if page.db != peer_db:
                if peer_db and cursor:
                    log.warning("peer %s has a new database: reading it again from the start", self.peer)
                    peer_db, cursor = page.db, 0
                    continue            # that page followed the old database's cursor
                peer_db = page.db
            if page.last < cursor:
                raise RemoteProtocolError("peer answered a cursor that goes backwards")
            if page.items or page.last != cursor:
                await self._store(page)
                cursor = page.last
            if not page.more:
                return cursor != start

    async def fetch(self, session: aiohttp.ClientSession, since: int) -> SyncPage:
        """One page of the peer's changes after `since` (long-polling up to `wait` s if none)."""
        timeout = aiohttp.ClientTimeout(total=self.wait + 30, connect=5)
        params = codec.sync_params(since, PAGE, self.wait)
        try:
            async with session.get(self.peer + codec.SYNC, params=params, timeout=timeout) as resp:
                raw = await read_bounded(resp)
                status = resp.status
        except asyncio.TimeoutError:
            raise PeerTimeout("no answer in time") from None
        except aiohttp.ClientError as exc:
            raise PeerUnreachable(f"cannot reach it ({exc.__class__.__name__})") from None
        if status != 200:
            raise PeerRefused(f"refused to send its changes: {codec.error_reason(raw, status)}", status)
        return SyncPage.from_wire(raw, "sync page")

    async def _store(self, page: SyncPage) -> None:
        result = await self.store.write(storage.put_many, page.items, self.now_ms(), (self.peer, page.db, page.last))
        self.pulled += len(result.stored)
        if result.stored:
            self.on_change()
            log.info("peer %s: %d new descriptor(s), e.g. %s", self.peer, len(result.stored), result.stored[0])
        if result.refused:
            log.warning("peer %s: skipped %d descriptor(s) that failed the checks", self.peer, result.refused)


async def read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, or RemoteProtocolError past codec.MAX_ANSWER (read(n) returns what has arrived)."""
    parts, size = [], 0
    while piece := await resp.content.read(codec.MAX_ANSWER + 1 - size):
        parts.append(piece)
        size += len(piece)
        if size > codec.MAX_ANSWER:
            raise RemoteProtocolError(f"answer over {codec.MAX_ANSWER} bytes")
    return b"".join(parts)
