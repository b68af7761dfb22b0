"""What a stranger can hold of the node: connections, bytes in flight, file descriptors.

`ConnectionGate` admits connections per source address (at most `per_source`, and at most
`total`). When a source is at its cap, its oldest idle connection (no request being handled:
an idle keep-alive, or headers still trickling in) is closed to make room, so a colleague
behind the same address as a stranger still gets through; if none is idle the new connection
is closed at once. `GatedHandler` is aiohttp's RequestHandler reporting to the gate.

`BodyBudget` bounds the small-body bytes held in memory, per authenticated caller and in total.
`HttpLog` is the logger aiohttp's protocol is given: malformed requests become counted
refusals (a RefusalSummary), never a traceback each. `raise_file_limit()` lifts the open-file
soft limit toward the hard limit and says how many connections fit with headroom left for the
node's own files and outgoing connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from aiohttp import web_protocol

from ..core.errors import CabinetError, RemoteProtocolError

PER_SOURCE = 64
HEADROOM = 256                      # descriptors kept for the store, blobs, the courier, mDNS


def raise_file_limit(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward the hard limit; return the connections to allow."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        limit = want if soft == resource.RLIM_INFINITY else soft
    except ImportError:                  # not on a POSIX system
        limit = 512
    return max(PER_SOURCE, limit - HEADROOM)


class ConnectionGate:
    def __init__(self, per_source: int = PER_SOURCE, total: int = 4096, on_refuse=None) -> None:
        self.per_source, self.total = per_source, total
        self._by_source: dict[str, OrderedDict] = {}
        self._busy: set = set()
        self._count = 0
        self._on_refuse = on_refuse or (lambda source, reason: None)

    @property
    def open_connections(self) -> int:
        return self._count

    def admit(self, source: str, conn) -> bool:
        mine = self._by_source.setdefault(source, OrderedDict())
        if len(mine) >= self.per_source and not self._evict_idle(mine):
            self._on_refuse(source, "too many connections from this address")
            return self._forget_empty(source, False)
        if self._count >= self.total:
            self._on_refuse(source, "too many connections")
            return self._forget_empty(source, False)
        mine[conn] = None
        self._count += 1
        return True

    def release(self, source: str, conn) -> None:
        mine = self._by_source.get(source)
        if mine is not None and mine.pop(conn, 0) is None:
            self._count -= 1
        self._busy.discard(conn)
        self._forget_empty(source, True)

    def busy(self, conn, flag: bool) -> None:
        """A request is (or is no longer) being handled on this connection: do not evict it."""
        (self._busy.add if flag else self._busy.discard)(conn)

    def _evict_idle(self, mine: OrderedDict) -> bool:
        for conn in mine:
            if conn not in self._busy:
                conn.force_close()        # its connection_lost releases it
                mine.pop(conn)
                self._count -= 1
                return True
        return False

    def _forget_empty(self, source: str, result: bool) -> bool:
        if not self._by_source.get(source):
            self._by_source.pop(source, None)
        return result


class GatedHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol, admitted (or closed at once) by a ConnectionGate."""

    def __init__(self, manager, *, gate: ConnectionGate, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._source: str | None = None

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "unknown"
        if not self._gate.admit(source, self):
            transport.abort()
            return
        self._source = source
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self._source is None:
            return                        # never admitted: aiohttp never saw it
        self._gate.release(self._source, self)
        self._source = None
        super().connection_lost(exc)


class HttpLog:
    """aiohttp's per-connection logger: malformed requests (huge headers, bad request lines)
    become counted refusals, not a traceback each; anything else is logged, escaped."""

    def __init__(self, refusals, log: logging.Logger) -> None:
        self._refusals, self._log = refusals, log

    def debug(self, msg: str, *args, **kw) -> None:
        if msg.startswith("Error handling request"):       # not HTTP at all (aiohttp's BadHttpMethod)
            self._refusals.note(str(args[0]) if args else None, "not an HTTP request")

    def exception(self, msg: str, *args, exc_info=True, **kw) -> None:
        if msg.startswith("Error handling request"):
            self._refusals.note(str(args[0]) if args else None, "malformed HTTP request")
        else:
            self._log.error(msg, *args, exc_info=exc_info)

    def warning(self, msg: str, *args, **kw) -> None:
        self.exception(msg, *args, exc_info=kw.get("exc_info"))

    error = warning


class Busy(CabinetError):
    """Too many bytes in flight, for this caller or for the node: try again shortly (503)."""


class BodyBudget:
    """Bytes of small bodies held in memory, per caller and in total."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller, self.total = per_caller, total
        self._held: dict[str, int] = {}
        self.in_flight = 0

    def reserve(self, caller: str, n: int) -> None:
        mine = self._held.get(caller, 0)
        if mine + n > self.per_caller or self.in_flight + n > self.total:
            raise Busy("busy: too many requests in flight; try again shortly")
        self._held[caller] = mine + n
        self.in_flight += n

    def release(self, caller: str, n: int) -> None:
        left = self._held.get(caller, 0) - n
        if left > 0:
            self._held[caller] = left
        else:
            self._held.pop(caller, None)
        self.in_flight -= n


async def read_within(coro, seconds: float, what: str):
    """Await a read with a deadline; a stalled peer gets a protocol error, not a held handler."""
    try:
        async with asyncio.timeout(seconds):
            return await coro
    except TimeoutError:
        raise RemoteProtocolError(f"{what} did not arrive in time") from None
