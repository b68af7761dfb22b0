"""The relay: signed handshakes, the table of waiting registrations, and splicing.

A node behind NAT keeps a few connections open here, each registered by a
signed Hello that lists the callers it accepts. A caller sends a signed
Connect for node X; the relay takes one of X's waiting connections that
accepts this caller, tells each side (Call / Ok) and splices them. Anything
else (no frame in time, a bad signature, a replayed nonce, a node that did not
accept the caller) is closed without a word.

What it holds is in memory and bounded (Limits): registrations per node and
nodes in all, connections per source address (the oldest unproven one makes
room for a new one, so a flood cannot crowd out genuine handshakes), unproven
connections in all, callers waiting, sessions, bytes in flight per session.
A session leaves nothing behind when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from node.core import relaywire
from node.core.errors import CabinetError

from . import splice

log = logging.getLogger("cabinet.relay")


@dataclass(frozen=True)
class Limits:
    per_node: int = 4                # waiting registrations per node (a new one replaces the oldest)
    nodes: int = 1000                # nodes registered at once
    per_source: int = 64             # connections per source address
    unproven: int = 512              # connections still in their handshake, in all
    sessions: int = 256              # spliced sessions at once
    pending: int = 128               # callers waiting for a registration, in all
    pending_per_node: int = 16       # ... for one node
    handshake_timeout: float = 10.0  # seconds for the first frame
    wait_timeout: float = 10.0       # seconds a caller waits for one of the node's connections to be free
    ping_every: float = 30.0         # a waiting registration hears a ping this often (keeps NAT mappings)
    idle_timeout: float = 300.0      # a session with no byte either way for this long is closed


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(eq=False)
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    source: str
    proven: bool = False

    def abort(self) -> None:
        self.writer.transport.abort()


@dataclass(eq=False)
class Registration:
    node: bytes
    accept: frozenset[bytes]
    conn: Conn
    taken: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class Session:
    caller: bytes
    callee: bytes
    started: float
    counters: splice.Counters


class Relay:
    def __init__(self, host: str, port: int, *, public: list[str] | None = None, limits: Limits = Limits(),
                 clock=lambda: int(time.time() * 1000)) -> None:
        self.host, self.port, self.limits, self.clock = host, port, limits, clock
        self._public = [relaywire.audience(u) for u in public or []]
        self.waiting: dict[bytes, list[Registration]] = {}       # node -> its idle registrations
        self.sessions: dict[int, Session] = {}
        self.pending = 0
        self._pending_for: dict[bytes, int] = {}
        self._arrived: dict[bytes, asyncio.Event] = {}
        self._by_source: dict[str, list[Conn]] = {}
        self._unproven: OrderedDict[Conn, None] = OrderedDict()
        self._nonces: OrderedDict[bytes, int] = OrderedDict()
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self.refused = 0                                  # handshakes closed without a word

    @property
    def audiences(self) -> frozenset[str]:
        return frozenset(self._public)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=splice.CHUNK,
                                                  backlog=1024, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if not self._public:
            host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            self._public = [relaywire.audience(f"relay+tcp://{'[' + host + ']' if ':' in host else host}:{self.port}")]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conns in list(self._by_source.values()):
            for c in list(conns):
                c.abort()

    def state(self) -> dict[str, int]:
        """What the relay holds right now (counts only)."""
        return {"sessions": len(self.sessions), "pending": self.pending,
                "registrations": sum(len(v) for v in self.waiting.values()), "nodes": len(self.waiting),
                "connections": sum(len(v) for v in self._by_source.values()), "unproven": len(self._unproven)}

    # --- admission ------------------------------------------------------------------

    def _admit(self, conn: Conn) -> bool:
        mine = self._by_source.setdefault(conn.source, [])
        if len(mine) >= self.limits.per_source:
            oldest = next((c for c in mine if not c.proven), None)
            if oldest is None:
                return False                            # all of this source's connections are genuine
            self._drop(oldest)
        if len(self._unproven) >= self.limits.unproven:
            self._drop(next(iter(self._unproven)))
        mine.append(conn)
        self._unproven[conn] = None
        return True

    def _drop(self, conn: Conn) -> None:
        self._forget(conn)
        conn.abort()

    def _forget(self, conn: Conn) -> None:
        self._unproven.pop(conn, None)
        mine = self._by_source.get(conn.source)
        if mine is not None:
            with contextlib.suppress(ValueError):
                mine.remove(conn)
            if not mine:
                del self._by_source[conn.source]

    def _fresh_nonce(self, nonce: bytes, now: int) -> bool:
        while self._nonces and next(iter(self._nonces.values())) < now - 2 * relaywire.SKEW_MS:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            return False
        if len(self._nonces) >= 200_000:
            self._nonces.popitem(last=False)
        self._nonces[nonce] = now
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        conn = Conn(reader, writer, str(peer[0]))
        if not self._admit(conn):
            conn.abort()
            self.refused += 1
            return
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):      # not wait_for: it can swallow a cancel
                msg = await self._read_frame(reader)
            now = self.clock()
            if msg["t"] == "hello":
                hello = relaywire.Hello.from_msg(msg, audiences=self.audiences, now_ms=now)
                if self._fresh_nonce(hello.nonce, now):
                    await self._register(conn, hello)
                    return
            elif msg["t"] == "connect":
                req = relaywire.Connect.from_msg(msg, audiences=self.audiences, now_ms=now)
                if self._fresh_nonce(req.nonce, now):
                    await self._connect(conn, req)
                    return
        except (CabinetError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:                               # never let one connection take the relay down
            log.exception("relay: unexpected error in a handshake")
        finally:
            self._forget(conn)
            conn.abort()
        self.refused += 1

    async def _read_frame(self, reader: asyncio.StreamReader) -> dict:
        n = relaywire.frame_length(await reader.readexactly(4))
        return relaywire.decode(await reader.readexactly(n))

    # --- registrations --------------------------------------------------------------

    async def _register(self, conn: Conn, hello: relaywire.Hello) -> None:
        regs = self.waiting.get(hello.node)
        if regs is None:
            if len(self.waiting) >= self.limits.nodes:
                raise CabinetError("relay full")
            regs = self.waiting[hello.node] = []
        if len(regs) >= self.limits.per_node:
            regs.pop(0).conn.abort()                  # the oldest: perhaps half-dead behind a new NAT mapping
        conn.proven = True
        self._unproven.pop(conn, None)
        reg = Registration(hello.node, hello.accept, conn)
        regs.append(reg)
        conn.writer.write(relaywire.ok())              # registered: tells the node, not a stranger
        self._wake(hello.node)
        eof = asyncio.ensure_future(conn.reader.read(1))
        try:
            while True:
                done, _ = await asyncio.wait({reg.taken, eof}, timeout=self.limits.ping_every,
                                             return_when=asyncio.FIRST_COMPLETED)
                if reg.taken in done or eof in done:
                    break
                conn.writer.write(relaywire.ping())
                async with asyncio.timeout(self.limits.handshake_timeout):
                    await conn.writer.drain()
        finally:
            self._unlist(reg)
            eof.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await eof
        if reg.taken.done() and not reg.taken.cancelled() and not (eof.done() and not eof.cancelled()):
            caller_conn, caller_id, finished = reg.taken.result()
            await self._session(caller_conn, caller_id, conn, hello.node, finished)
        elif reg.taken.done() and not reg.taken.cancelled():
            reg.taken.result()[2].set_result(None)     # the node went away at that very moment

    def _unlist(self, reg: Registration) -> None:
        regs = self.waiting.get(reg.node)
        if regs is not None and reg in regs:
            regs.remove(reg)
            if not regs and not self._pending_for.get(reg.node):
                del self.waiting[reg.node]
                self._arrived.pop(reg.node, None)

    def _wake(self, node: bytes) -> None:
        event = self._arrived.pop(node, None)
        if event is not None:
            event.set()

    def _take(self, node: bytes, caller: bytes) -> Registration | None:
        for reg in self.waiting.get(node, ()):
            if caller in reg.accept and not reg.taken.done():
                self.waiting[node].remove(reg)
                return reg
        return None

    # --- callers --------------------------------------------------------------------

    async def _connect(self, conn: Conn, req: relaywire.Connect) -> None:
        regs = self.waiting.get(req.to)
        if not regs or not any(req.node in r.accept for r in regs):
            return                                      # not there, or it did not accept this caller
        if self.pending >= self.limits.pending or self._pending_for.get(req.to, 0) >= self.limits.pending_per_node \
                or len(self.sessions) >= self.limits.sessions:
            return
        conn.proven = True
        self._unproven.pop(conn, None)
        self.pending += 1
        self._pending_for[req.to] = self._pending_for.get(req.to, 0) + 1
        try:
            deadline = asyncio.get_running_loop().time() + self.limits.wait_timeout
            while (reg := self._take(req.to, req.node)) is None:
                event = self._arrived.setdefault(req.to, asyncio.Event())
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await event.wait()
        finally:
            self.pending -= 1
            left_for = self._pending_for[req.to] - 1
            if left_for:
                self._pending_for[req.to] = left_for
            else:
                del self._pending_for[req.to]
                if not self.waiting.get(req.to):
                    self.waiting.pop(req.to, None)
        finished = asyncio.get_running_loop().create_future()
        reg.taken.set_result((conn, req.node, finished))
        await finished                                  # the registration's task runs the session

    async def _session(self, caller: Conn, caller_id: bytes, callee: Conn, callee_id: bytes,
                       finished: asyncio.Future) -> None:
        sid = next(self._ids)
        session = self.sessions[sid] = Session(caller_id, callee_id, time.monotonic(), splice.Counters())
        try:
            callee.writer.write(relaywire.call(caller_id))
            caller.writer.write(relaywire.ok())
            await splice.splice((caller.reader, caller.writer), (callee.reader, callee.writer),
                                idle=self.limits.idle_timeout, counters=session.counters)
        finally:
            del self.sessions[sid]
            self._forget(caller)
            self._forget(callee)
            if not finished.done():
                finished.set_result(None)
            log.info("session ended: %d bytes up, %d down, %.1f s", session.counters.up, session.counters.down,
                     time.monotonic() - session.started)


def new_nonce() -> bytes:
    return os.urandom(16)
