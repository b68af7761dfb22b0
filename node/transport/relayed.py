"""Reaching and being reached through blind relays (docs/relay.md): the node's two halves.

`Registrar` (the node that cannot be reached) keeps a few connections open to
each configured relay, each registered with a signed Hello that lists the
contacts it accepts. When the relay joins a caller to one of them, the
connection is handed to the node's own TLS server through a loopback hop
(127.0.0.1:<its port>), and a fresh registration takes its place.

`Tunnels` (the caller) gives each (relay, node) pair a local forwarder on
127.0.0.1: every connection made to it is carried through the relay with a
signed Connect. The existing client, TLS pin and request signatures run
unchanged over it, so whatever the relay does to the bytes is caught where a
network attacker's tampering is caught today.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..core import relaywire
from ..core.errors import CabinetError, RemoteProtocolError
from ..core.identity import Identity, parse_node_id, valid_relay_address
from .auth import now_ms as wall_ms

log = logging.getLogger("cabinet.relay")
CHUNK = 256 * 1024
CONNECT_TIMEOUT = 10.0
SILENCE = 150.0              # a registration that hears nothing (not even a ping) for this long is renewed
MAX_TUNNELS = 64
MAX_HANDOFFS = 32            # relayed sessions being served at once


async def _read_frame(reader: asyncio.StreamReader, timeout: float) -> dict:
    async def read() -> dict:
        n = relaywire.frame_length(await reader.readexactly(4))
        return relaywire.decode(await reader.readexactly(n))
    return await asyncio.wait_for(read(), timeout)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while piece := await src.read(CHUNK):
            dst.write(piece)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.transport.abort()


async def join(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Forward both ways until both ends close; memory bounded by the streams' limits."""
    for _, w in (a, b):
        w.transport.set_write_buffer_limits(high=512 * 1024)
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for _, w in (a, b):
            w.close()


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = relaywire.parse_relay_url(url)
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT)


@dataclass
class RelayState:
    """What one relay is doing for us, for `cabinet status` (no secrets, no patient data)."""

    url: str
    registered: int = 0
    sessions: int = 0
    last_error: str = ""


class Registrar:
    """Keeps `per_relay` registrations open at each relay and serves what they bring."""

    def __init__(self, relays: list[str], *, identity: Callable[[], Identity],
                 accept: Callable[[], Awaitable[frozenset[bytes]]], local_port: int,
                 now: Callable[[], int] = wall_ms,
                 per_relay: int = 2, rng: random.Random | None = None) -> None:
        self.relays = [r for r in relays if valid_relay_address(r)]
        self.identity, self.accept, self.now, self.local_port = identity, accept, now, local_port
        self.per_relay, self.rng = per_relay, rng or random.Random()
        self.state = {r: RelayState(r) for r in self.relays}
        self._tasks: list[asyncio.Task] = []
        self._handoffs: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(MAX_HANDOFFS)
        self._waiting: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        for url in self.relays:
            for i in range(self.per_relay):
                self._tasks.append(asyncio.create_task(self._keep(url), name=f"cabinet-relay-{i}"))

    async def stop(self) -> None:
        for t in self._tasks + list(self._handoffs):
            t.cancel()
        for t in self._tasks + list(self._handoffs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks, self._handoffs = [], set()

    def renew(self) -> None:
        """Re-register (the accept list changed): waiting connections close and reopen at once."""
        for w in list(self._waiting):
            w.transport.abort()

    async def _keep(self, url: str) -> None:
        backoff = 1.0
        while True:
            try:
                if await self._register_once(url):
                    backoff = 1.0
                    continue
            except (CabinetError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                self.state[url].last_error = _reason(exc)
            await asyncio.sleep(backoff * (0.5 + self.rng.random()))
            backoff = min(backoff * 2, 60.0)

    async def _register_once(self, url: str) -> bool:
        """One registration, until a caller comes (True) or it ends (False or an error)."""
        await self._slots.acquire()                # no registration while every serving slot is taken
        self._slots.release()
        reader, writer = await _open(url)
        registered = False
        self._waiting.add(writer)
        try:
            hello = relaywire.Hello.make(self.identity(), relay=url, accept=await self.accept(), now_ms=self.now(),
                                         nonce=os.urandom(16))
            writer.write(hello.to_frame())
            await writer.drain()
            while True:
                msg = await _read_frame(reader, SILENCE)
                if msg["t"] == "ok" and not registered:
                    registered = True
                    self.state[url].registered += 1
                    self.state[url].last_error = ""
                elif msg["t"] == "call" and registered:
                    break
                elif msg["t"] != "ping":
                    raise RemoteProtocolError("unexpected frame from the relay")
        except BaseException:
            writer.transport.abort()
            raise
        finally:
            self._waiting.discard(writer)
            if registered:
                self.state[url].registered -= 1
        task = asyncio.create_task(self._serve(url, reader, writer))
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)
        return True

    async def _serve(self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand a joined connection to the node's own server, through 127.0.0.1."""
        async with self._slots:
            self.state[url].sessions += 1
            try:
                local = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.local_port, limit=CHUNK),
                                               CONNECT_TIMEOUT)
                await join((reader, writer), local)
            except (OSError, asyncio.TimeoutError):
                writer.transport.abort()
            finally:
                self.state[url].sessions -= 1


class Tunnels:
    """Local forwarders, one per (relay, node): https://127.0.0.1:<port> reaches the node via the relay."""

    def __init__(self, *, identity: Callable[[], Identity], now: Callable[[], int] = wall_ms) -> None:
        self.identity, self.now = identity, now
        self._open: OrderedDict[tuple[str, str], tuple[asyncio.AbstractServer | None, int, asyncio.Task | None]] = \
            OrderedDict()
        self._conns: set[asyncio.Task] = set()

    def address(self, relay: str, node_id: str) -> str:
        """The local address that reaches `node_id` through `relay` (made at the first call)."""
        key = (relaywire.audience(relay), node_id)
        if key in self._open:
            self._open.move_to_end(key)
            return f"https://127.0.0.1:{self._open[key][1]}"
        while len(self._open) >= MAX_TUNNELS:
            _, (server, _, task) = self._open.popitem(last=False)
            if server is not None:
                server.close()
            if task is not None:
                task.cancel()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)                          # connections queue here until the server below runs
        sock.setblocking(False)
        port = sock.getsockname()[1]
        to = parse_node_id(node_id)
        self._open[key] = (None, port, None)

        async def serve() -> None:
            server = await asyncio.start_server(lambda r, w: self._forward(relay, to, r, w), sock=sock,
                                                limit=CHUNK)
            if key in self._open:
                self._open[key] = (server, port, None)
            else:
                server.close()
        self._open[key] = (None, port, asyncio.get_running_loop().create_task(serve()))
        return f"https://127.0.0.1:{port}"

    async def _forward(self, relay: str, to: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            far = await _open(relay)
            req = relaywire.Connect.make(self.identity(), relay=relay, to=to, now_ms=self.now(), nonce=os.urandom(16))
            far[1].write(req.to_frame())
            msg = await _read_frame(far[0], CONNECT_TIMEOUT + 5)
            if msg["t"] != "ok":
                raise RemoteProtocolError("the relay did not join us")
            await join(far, (reader, writer))
        except (CabinetError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
            writer.transport.abort()            # the client sees a dropped connection: tries the next address
        except asyncio.CancelledError:
            writer.transport.abort()            # closing: asyncio's stream callback must not see the cancel
        finally:
            if task is not None:
                self._conns.discard(task)

    async def close(self) -> None:
        for server, _, task in self._open.values():
            if server is not None:
                server.close()
            if task is not None:
                task.cancel()
        self._open.clear()
        for t in list(self._conns):
            t.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the relay did not answer in time"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the relay closed the connection (registration refused?)"
    if isinstance(exc, OSError):
        return f"cannot reach the relay: {exc.strerror or exc.__class__.__name__}"
    return str(exc)
