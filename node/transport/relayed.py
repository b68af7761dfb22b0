"""Reaching and being reached through blind relays (docs/relay.md): the node's two halves.

`Registrar` (the node that cannot be reached) keeps a few connections open to
each configured relay, each registered with a signed Hello that lists the
contacts it accepts. When the relay joins a caller to one of them, the socket
itself is handed to the node's own TLS server (server.Server.adopt), as if its
listener had accepted it, and a fresh registration takes its place.

`Tunnels` (the caller) gives each (relay, node) pair a local address,
https://127.0.0.1:<port>: the client dials it through the relay with a signed
Connect (client.carried) and runs TLS, its pin and the signed requests over
that socket, unchanged. Whatever the relay does to the bytes is caught where a
network attacker's tampering is caught today.

Handshake frames are read exactly (no byte past them), so the TLS bytes that
follow stay in the socket for whoever takes it over: no Python copies any byte
of a session on either node, only the relay does.
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
from . import client, server
from .auth import now_ms as wall_ms

log = logging.getLogger("cabinet.relay")
CONNECT_TIMEOUT = 10.0
SILENCE = 150.0              # a registration that hears nothing (not even a ping) for this long is renewed
MAX_TUNNELS = 64
MAX_HANDOFFS = 32            # relayed sessions being served at once
LINGER = 5.0                 # seconds a served session's end waits for the caller's end


async def _open(url: str) -> socket.socket:
    """A connected non-blocking socket to the relay (its first address that answers)."""
    host, port = relaywire.parse_relay_url(url)
    loop = asyncio.get_running_loop()

    async def connect() -> socket.socket:
        last: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last
    async with asyncio.timeout(CONNECT_TIMEOUT):     # not wait_for: on 3.11 it can swallow a cancel (a node that never stops)
        return await connect()


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop, got = asyncio.get_running_loop(), bytearray()
    while len(got) < n:
        piece = await loop.sock_recv(sock, n - len(got))
        if not piece:
            raise asyncio.IncompleteReadError(bytes(got), n)
        got += piece
    return bytes(got)


async def _read_frame(sock: socket.socket, timeout: float) -> dict:
    """One handshake frame and not a byte more: what follows belongs to TLS."""
    async def read() -> dict:
        n = relaywire.frame_length(await _read_exactly(sock, 4))
        return relaywire.decode(await _read_exactly(sock, n))
    async with asyncio.timeout(timeout):             # not wait_for: on 3.11 it can swallow a cancel (a node that never stops)
        return await read()


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
        self._waiting: set[socket.socket] = set()

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
        for sock in list(self._waiting):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)     # its read ends at once; _register_once closes it

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
        sock = await _open(url)
        registered = False
        self._waiting.add(sock)
        try:
            hello = relaywire.Hello.make(self.identity(), relay=url, accept=await self.accept(), now_ms=self.now(),
                                         nonce=os.urandom(16))
            await asyncio.get_running_loop().sock_sendall(sock, hello.to_frame())
            while True:
                msg = await _read_frame(sock, SILENCE)
                if msg["t"] == "ok" and not registered:
                    registered = True
                    self.state[url].registered += 1
                    self.state[url].last_error = ""
                elif msg["t"] == "call" and registered:
                    break
                elif msg["t"] != "ping":
                    raise RemoteProtocolError("unexpected frame from the relay")
        except BaseException:
            sock.close()
            raise
        finally:
            self._waiting.discard(sock)
            if registered:
                self.state[url].registered -= 1
        task = asyncio.create_task(self._serve(url, sock))
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)
        return True

    async def _serve(self, url: str, sock: socket.socket) -> None:
        """Hand a joined connection to the node's own server, which serves it as one it accepted."""
        async with self._slots:
            self.state[url].sessions += 1
            try:
                own = server.serving_on(self.local_port)
                if own is not None:
                    with contextlib.suppress(OSError, EOFError):     # refused by its TLS (a replayed session), reset
                        await own.adopt(sock.dup())
                await _end(sock)
            finally:
                sock.close()
                self.state[url].sessions -= 1


class Tunnels:
    """Local tunnel addresses, one per (relay, node): https://127.0.0.1:<port> reaches the node via the relay."""

    def __init__(self, *, identity: Callable[[], Identity], now: Callable[[], int] = wall_ms) -> None:
        self.identity, self.now = identity, now
        self._open: OrderedDict[tuple[str, str], socket.socket] = OrderedDict()     # each holds its port

    def address(self, relay: str, node_id: str) -> str:
        """The local address that reaches `node_id` through `relay` (made at the first call)."""
        key = (relaywire.audience(relay), node_id)
        if key in self._open:
            self._open.move_to_end(key)
            return f"https://127.0.0.1:{self._open[key].getsockname()[1]}"
        while len(self._open) >= MAX_TUNNELS:
            _release(self._open.popitem(last=False)[1])
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.bind(("127.0.0.1", 0))         # bound, never listening: the port is ours, a stray connect is refused
        port = held.getsockname()[1]
        to = parse_node_id(node_id)
        client.carried[("127.0.0.1", port)] = lambda: self._dial(relay, to)
        self._open[key] = held
        return f"https://127.0.0.1:{port}"

    async def _dial(self, relay: str, to: bytes) -> socket.socket:
        """A socket joined to `to` through `relay`; refused or unreachable is an OSError (the client
        then tries the contact's next address)."""
        sock = await _open(relay)
        try:
            req = relaywire.Connect.make(self.identity(), relay=relay, to=to, now_ms=self.now(), nonce=os.urandom(16))
            await asyncio.get_running_loop().sock_sendall(sock, req.to_frame())
            msg = await _read_frame(sock, CONNECT_TIMEOUT + 5)
            if msg["t"] != "ok":
                raise RemoteProtocolError("the relay did not join us")
        except (CabinetError, EOFError):
            sock.close()
            raise ConnectionRefusedError("the relay did not join us") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        while self._open:
            _release(self._open.popitem()[1])


def _release(held: socket.socket) -> None:
    client.carried.pop(("127.0.0.1", held.getsockname()[1]), None)
    held.close()


async def _end(sock: socket.socket) -> None:
    """End a served session in order. The server closed its copy of the socket, perhaps with the
    caller's bytes unread (a TLS error): closing now would send a reset, which a relay may not pass
    on as an end. So: our end first (FIN), then drop what still comes, briefly."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):                  # TimeoutError included
        sock.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER):
            while await loop.sock_recv(sock, 1 << 16):
                pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the relay did not answer in time"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the relay closed the connection (registration refused?)"
    if isinstance(exc, OSError):
        return f"cannot reach the relay: {exc.strerror or exc.__class__.__name__}"
    return str(exc)
