"""The node's HTTP server (aiohttp): thin handlers around one Handler object.

Handlers read, authenticate, call one method of the handler, encode. One
middleware maps the project's errors to statuses and signs every answer to an
authenticated request. Only the public descriptor is served without
authentication. The server never touches the store: node.py supplies the
Handler that does.

Against strangers (door.py holds the mechanisms): the caller's signature is
checked on the headers before any body is read; refusals before that are
counted per source, not logged one by one; small bodies are bounded by a
budget per caller and in total and must arrive within BODY_TIMEOUT; streamed
bodies may not stall or trickle; connections are capped per source address.
A node serves TLS 1.3 only, with a certificate bound to its identity key
(tls.py); a bare Server without `tls` speaks plain HTTP (tests, tools).

    GET  /v1/descriptor                       the signed descriptor (public)
    POST /v1/descriptor                       a contact hands over its new descriptor (key rotated, revoked)
    PUT  /v1/records/{id}?offset=N&seq=S      push one record: [u32 head length][head][ciphertext from N]
    GET  /v1/records/{id}/status              how much of a record the callee already has (for resuming)
    POST /v1/batch                            push many small records in one request
    GET  /v1/outbox?since=N[&after=M]         pull: what the callee has queued for the caller after N (or M)
    GET  /v1/records/{id}/body?offset=N       pull: a record's ciphertext, streamed
    POST /v1/acks                             pull: the caller has committed up to N (and these)
    POST /v1/receipts                         signed "opened" receipts for records the callee sent
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Sequence, overload

from aiohttp import web

from .. import logsetup
from ..core import wire
from ..core.envelope import MAX_HEAD
from ..core.errors import (AuthenticationFailed, CabinetError, ConsentRefused, CryptoError, NotFound, RemoteProtocolError,
                      StoreError, TooLarge, UsageError)
from ..core.identity import Identity
from . import auth, door
from . import tls as _tls

log = logging.getLogger("cabinet.server")
MAX_SMALL_BODY = 1 << 20
MAX_BATCH_BODY = 9 << 20
BODY_TIMEOUT = 30                   # seconds for a small body or an envelope head to arrive, whole
PIECE_TIMEOUT = 30                  # seconds without a byte of a streamed body
RATE_WINDOW, RATE_MIN = 30, 4096    # a streamed body brings at least RATE_MIN bytes per window
KEEPALIVE_TIMEOUT = 15              # an idle connection, or one whose headers never complete, is closed
PER_CALLER_BYTES = 20 << 20         # small-body bytes held in memory for one contact ...
TOTAL_BYTES = 64 << 20              # ... and for all together
SUMMARY_PERIOD = 60.0               # seconds between refusal summaries
MSGPACK = "application/msgpack"
NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)     # a kernel without IPv6
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict


class Handler(Protocol):
    @property
    def identity(self) -> Identity: ...

    def descriptor_bytes(self) -> bytes: ...

    async def pinned_key(self, node_id: str) -> tuple[bytes | None, str | None]:
        """The identity key a caller must sign with (None: a stranger), and why a proven caller
        is refused anyway (held, revoked) or None. The reason is told only once the signature
        verifies, so a stranger cannot tell held and revoked contacts from unknown IDs."""
        ...

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int, seq: int | None,
                             body: AsyncIterator[bytes]) -> Answer: ...

    async def record_status(self, caller: str, record_id: str) -> Answer: ...

    async def receive_batch(self, caller: str, items: list[tuple[int | None, bytes, bytes]]) -> Answer: ...

    async def outbox_for(self, caller: str, since: int, limit: int, after: int = 0) -> Answer: ...

    async def body_for(self, caller: str, record_id: str, offset: int) -> tuple[int, AsyncIterator[bytes]]: ...

    async def receive_ack(self, caller: str, ack: dict) -> Answer: ...

    async def receive_receipts(self, caller: str, receipts: list[bytes]) -> Answer: ...

    async def receive_descriptor(self, caller: str, raw: bytes) -> Answer: ...


HANDLER = web.AppKey("handler", Handler)
GUARD = web.AppKey("guard", auth.ReplayGuard)
BUDGET = web.AppKey("budget", door.BodyBudget)
GATE = web.AppKey("gate", door.ConnectionGate)
REFUSALS = web.AppKey("refusals", logsetup.RefusalSummary)
_KEY = getattr(web, "RequestKey", lambda name, _t: f"cabinet.{name}")      # aiohttp < 3.11: plain strings
_NONCE, _CLAIMS, _HELD = _KEY("nonce", bytes), _KEY("claims", auth.Claims), _KEY("held", int)

STATUS = [
    (AuthenticationFailed, 401), (TooLarge, 413), (NotFound, 404), (RemoteProtocolError, 400),
    (CryptoError, 422), (StoreError, 507), (UsageError, 400), (ConsentRefused, 403), (door.Busy, 503),
]


def status_for(err: CabinetError) -> int:
    for kind, status in STATUS:
        if isinstance(err, kind):
            return status
    return 500


def _encode(request: web.Request, status: int, body: dict) -> web.Response:
    raw = wire.pack(body)
    headers = {}
    nonce = request.get(_NONCE)
    if nonce is not None:
        headers = auth.sign_response(request.app[HANDLER].identity, nonce=nonce, status=status, body=raw)
    return web.Response(status=status, body=raw, content_type=MSGPACK, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Errors to statuses. A refusal before the caller is proven is counted, not logged, and
    its connection closed; one to a proven contact is logged (escaped, like every line)."""
    try:
        return await handler(request)
    except CabinetError as err:
        status = status_for(err)
        resp = _encode(request, status, {"error": str(err)})
        if request.get(_NONCE) is None:
            request.app[REFUSALS].note(request.remote, str(err))
            resp.force_close()
        else:
            log.warning("refused %s %s from %s: %s (%d)", request.method, logsetup.clean(request.path, 120),
                        request[_CLAIMS].caller, err, status)
        return resp
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error handling %s %s", request.method, logsetup.clean(request.path, 120))
        return _encode(request, 500, {"error": "internal error"})


PUBLIC = {("GET", "/v1/descriptor")}


@web.middleware
async def door_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Before any body is read, the headers must prove the caller: a contact's valid signature.

    The signature covers the body's digest, which is checked once the body is in hand
    (`authenticate`). A stranger never makes the node read or hold a body. While a request
    is handled its connection is busy, so the gate does not evict it.
    """
    gate = request.app.get(GATE)
    if gate is not None:
        gate.busy(request.protocol, True)
    try:
        if (request.method, request.path) not in PUBLIC:
            await _prove_caller(request)
        return await handler(request)
    finally:
        if gate is not None:
            gate.busy(request.protocol, False)
        held = request.get(_HELD)
        if held:
            request.app[BUDGET].release(request[_CLAIMS].caller, held)


async def _prove_caller(request: web.Request) -> None:
    h = request.app[HANDLER]
    claims = auth.parse_request(request.headers)
    if abs(auth.now_ms() - claims.ts) > auth.MAX_SKEW_MS:
        raise AuthenticationFailed("request time is more than 5 minutes off; check the clocks")
    key, refusal = await h.pinned_key(claims.caller)
    auth.check_request(claims, method=request.method, target=request.raw_path, me=h.identity,
                       sign_key=key, guard=request.app[GUARD], now_ms=auth.now_ms())
    request[_CLAIMS], request[_NONCE] = claims, claims.nonce
    if refusal is not None:
        raise AuthenticationFailed(refusal)          # proven: a signed 401 with the reason


async def authenticate(request: web.Request, body_digest_of: bytes | None) -> str:
    """The caller proven at the door, once the body (or head) matches the digest it signed."""
    claims = request[_CLAIMS]
    if body_digest_of is not None and auth.digest(body_digest_of) != claims.body_digest:
        raise AuthenticationFailed("body does not match the signed digest")
    return claims.caller


def _reserve(request: web.Request, n: int) -> None:
    """Count n more bytes held for this request against the caller's and the node's budget."""
    request.app[BUDGET].reserve(request[_CLAIMS].caller, n)
    request[_HELD] = request.get(_HELD, 0) + n


async def get_descriptor(request: web.Request) -> web.Response:
    return web.Response(body=request.app[HANDLER].descriptor_bytes(), content_type="application/x-cabinet-descriptor")


def _record_id(request: web.Request) -> str:
    record_id = request.match_info["id"]
    if not _RECORD_ID.match(record_id):
        raise NotFound("no such record path")
    return record_id


@overload
def _int_query(request: web.Request, name: str, default: int) -> int: ...
@overload
def _int_query(request: web.Request, name: str, default: None) -> int | None: ...
def _int_query(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RemoteProtocolError(f"{name} must be an integer") from None
    if not 0 <= value < 2**63:
        raise RemoteProtocolError(f"{name} must be between 0 and 2^63-1")
    return value


async def _small_body(request: web.Request, limit: int = MAX_SMALL_BODY) -> bytes:
    if not request.body_exists:
        return b""
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"request body over {limit} bytes")
    _reserve(request, length if length is not None else limit + 1)
    body = await door.read_within(auth.read_limited(request.content, limit), BODY_TIMEOUT, "the request body")
    if len(body) > limit:
        raise TooLarge(f"request body over {limit} bytes")
    return body


async def put_record(request: web.Request) -> web.Response:
    record_id = _record_id(request)
    offset = _int_query(request, "offset", 0)
    seq = _int_query(request, "seq", None)
    _reserve(request, 4 + MAX_HEAD)
    head_raw = await door.read_within(_read_head(request), BODY_TIMEOUT, "the envelope head")
    caller = await authenticate(request, head_raw)
    answer = await request.app[HANDLER].receive_record(caller, record_id, head_raw, offset, seq, _body(request))
    return _encode(request, answer.status, answer.body)


async def _read_head(request: web.Request) -> bytes:
    try:
        n = int.from_bytes(await request.content.readexactly(4), "big")
        if n > MAX_HEAD:
            raise TooLarge(f"envelope head over {MAX_HEAD} bytes")
        return await request.content.readexactly(n)
    except EOFError:
        raise RemoteProtocolError("body ended before the envelope head") from None


async def post_batch(request: web.Request) -> web.Response:
    raw = await _small_body(request, MAX_BATCH_BODY)
    caller = await authenticate(request, raw)
    msg = wire.unpack(raw, max_size=MAX_BATCH_BODY, what="batch")
    items = wire.field(msg, "items", list, what="batch")
    if len(items) > 500:
        raise TooLarge("at most 500 records per batch")
    parsed = []
    for it in items:
        wire.only_fields(it, {"seq", "head", "body"}, what="batch item")
        parsed.append((wire.field(it, "seq", int, what="batch item", optional=True),
                       wire.field(it, "head", bytes, what="batch item", max_len=MAX_HEAD),
                       wire.field(it, "body", bytes, what="batch item")))
    answer = await request.app[HANDLER].receive_batch(caller, parsed)
    return _encode(request, answer.status, answer.body)


async def get_outbox(request: web.Request) -> web.Response:
    caller = await authenticate(request, await _small_body(request))
    since = _int_query(request, "since", 0)
    limit = min(_int_query(request, "limit", 500), 500)
    after = _int_query(request, "after", 0)
    answer = await request.app[HANDLER].outbox_for(caller, since, limit, after)
    return _encode(request, answer.status, answer.body)


async def get_record_body(request: web.Request) -> web.StreamResponse:
    record_id = _record_id(request)
    caller = await authenticate(request, await _small_body(request))
    offset = _int_query(request, "offset", 0)
    size, pieces = await request.app[HANDLER].body_for(caller, record_id, offset)
    # Not signed as a whole: the bytes are bound by the signed envelope head's digest.
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size - offset
    await resp.prepare(request)
    async for piece in pieces:
        await resp.write(piece)
    await resp.write_eof()
    return resp


async def post_acks(request: web.Request) -> web.Response:
    raw = await _small_body(request)
    caller = await authenticate(request, raw)
    answer = await request.app[HANDLER].receive_ack(caller, wire.unpack(raw, what="ack"))
    return _encode(request, answer.status, answer.body)


async def post_descriptor(request: web.Request) -> web.Response:
    raw = await _small_body(request, 64 * 1024)
    caller = await authenticate(request, raw)
    answer = await request.app[HANDLER].receive_descriptor(caller, raw)
    return _encode(request, answer.status, answer.body)


async def post_receipts(request: web.Request) -> web.Response:
    raw = await _small_body(request)
    caller = await authenticate(request, raw)
    msg = wire.unpack(raw, what="receipts")
    receipts = wire.field(msg, "receipts", list, what="receipts")
    if len(receipts) > 1000 or not all(isinstance(r, bytes) for r in receipts):
        raise RemoteProtocolError("receipts: malformed list")
    answer = await request.app[HANDLER].receive_receipts(caller, receipts)
    return _encode(request, answer.status, answer.body)


async def get_record_status(request: web.Request) -> web.Response:
    record_id = _record_id(request)
    caller = await authenticate(request, await _small_body(request))
    answer = await request.app[HANDLER].record_status(caller, record_id)
    return _encode(request, answer.status, answer.body)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The rest of an upload, in the pieces aiohttp buffers (bounded), never stalled or trickled.

    A peer that sends nothing for PIECE_TIMEOUT, or fewer than RATE_MIN bytes in RATE_WINDOW
    seconds, is cut off (what arrived stays, for resuming).
    """
    loop = asyncio.get_running_loop()
    window_start, window_bytes = loop.time(), 0
    while True:
        piece = await door.read_within(request.content.readany(), PIECE_TIMEOUT, "the next part of the body")
        if not piece:
            return
        yield piece
        window_bytes += len(piece)
        if loop.time() - window_start >= RATE_WINDOW:
            if window_bytes < RATE_MIN:
                raise RemoteProtocolError("the body arrives too slowly")
            window_start, window_bytes = loop.time(), 0


def make_app(handler: Handler, routes: Sequence[Callable[[web.Application], None]] = ()) -> web.Application:
    """The node's aiohttp app; `routes` add more (transport/access.py's patient routes), so that this
    module never imports the modules that build on it."""
    app = web.Application(middlewares=[errors_middleware, door_middleware], client_max_size=MAX_BATCH_BODY)
    app[HANDLER] = handler
    app[GUARD] = auth.ReplayGuard()
    app[BUDGET] = door.BodyBudget(PER_CALLER_BYTES, TOTAL_BYTES)
    app[REFUSALS] = logsetup.RefusalSummary(log, SUMMARY_PERIOD)
    app.router.add_get("/v1/descriptor", get_descriptor)
    app.router.add_post("/v1/descriptor", post_descriptor)
    app.router.add_put("/v1/records/{id}", put_record)
    app.router.add_get("/v1/records/{id}/status", get_record_status)
    app.router.add_get("/v1/records/{id}/body", get_record_body)
    app.router.add_post("/v1/batch", post_batch)
    app.router.add_get("/v1/outbox", get_outbox)
    app.router.add_post("/v1/acks", post_acks)
    app.router.add_post("/v1/receipts", post_receipts)
    for add in routes:
        add(app)
    return app


_SERVING: dict[int, Server] = {}    # port -> the running Server on it (relayed.Registrar hands it connections)


def serving_on(port: int) -> Server | None:
    """The Server of this process listening on `port`, if any."""
    return _SERVING.get(port)


class _Adopted(door.GatedHandler):
    """A GatedHandler that says when its connection has ended (Server.adopt waits for it)."""

    def __init__(self, manager, *, ended: asyncio.Future, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._ended = ended

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if not self._ended.done():
            self._ended.set_result(None)


def bind_hosts(host: str) -> list[str]:
    """Where to bind for a listen host: every interface means IPv4 and IPv6 both (dual stack, two
    sockets on one port); a named address (127.0.0.1, ::1, 192.168.1.20) means that one only."""
    return ["0.0.0.0", "::"] if host in ("0.0.0.0", "::", "") else [host]


class Server:
    """Runs the app on host:port; port 0 picks a free port (see .port after start).
    A wildcard host (0.0.0.0, ::) listens on IPv4 and IPv6 both.

    Connections go through a door.ConnectionGate (per source address and in total, within
    the open-file limit raised at start); idle ones and incomplete headers time out.
    `adopt(sock)` serves a connection that arrived another way (a relay's, relayed.Registrar)
    the same way; `serving_on(port)` finds the Server for it.
    """

    def __init__(self, handler: Handler, host: str, port: int, *, per_source: int = door.PER_SOURCE,
                 routes: Sequence[Callable[[web.Application], None]] = (), tls: _tls.ServerTLS | None = None) -> None:
        self._app = make_app(handler, routes)
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        self.host, self.port, self._per_source = host, port, per_source
        self.tls = tls
        self._listeners: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task] = []
        self._handler_args: dict = {}

    @property
    def scheme(self) -> str:
        """https when serving TLS (a node always does), http for a bare server (tests, tools)."""
        return "https" if self.tls is not None else "http"

    @property
    def gate(self) -> door.ConnectionGate:
        return self._app[GATE]

    @property
    def budget(self) -> door.BodyBudget:
        return self._app[BUDGET]

    async def start(self) -> None:
        refusals = self._app[REFUSALS]
        self._app[GATE] = gate = door.ConnectionGate(self._per_source, door.raise_file_limit(), refusals.note)
        await self._runner.setup()
        loop, manager, http_log = asyncio.get_running_loop(), self._runner.server, door.HttpLog(refusals, log)
        self._handler_args = dict(gate=gate, loop=loop, lingering_time=1.0, access_log=None, logger=http_log,
                                  max_headers=64)

        def connection() -> door.GatedHandler:
            return door.GatedHandler(manager, keepalive_timeout=KEEPALIVE_TIMEOUT, **self._handler_args)
        context = self.tls.context if self.tls is not None else None

        async def listen(host: str, port: int) -> asyncio.Server:
            return await loop.create_server(
                connection, host, port, reuse_address=True, backlog=512, ssl=context,
                ssl_handshake_timeout=_tls.HANDSHAKE_TIMEOUT if context is not None else None)
        first, *more = bind_hosts(self.host)
        try:
            self._listeners = [await listen(first, self.port)]
        except OSError as exc:
            await self._runner.cleanup()
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        if self._listeners[0].sockets:
            self.port = self._listeners[0].sockets[0].getsockname()[1]
        for host in more:                   # the same port on IPv6 (asyncio sets IPV6_V6ONLY on it)
            try:
                self._listeners.append(await listen(host, self.port))
            except OSError as exc:
                if exc.errno not in NO_IPV6:
                    await self.stop()
                    raise UsageError(f"cannot listen on [{host}]:{self.port}: {exc.strerror or exc}") from None
                log.info("no IPv6 on this machine (%s): listening on IPv4 only", exc.strerror or exc)
        _SERVING[self.port] = self
        self._tasks = [asyncio.create_task(self._summarise(refusals))]
        if self.tls is not None:
            self._tasks.append(asyncio.create_task(self._renew(self.tls)))

    async def adopt(self, sock: socket.socket) -> None:
        """Serve a connection that came another way (a relay's joined connection, with nothing of the
        caller's bytes read yet) exactly as a listener's, TLS and gate included; return when it ends."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        context = self.tls.context if self.tls is not None else None
        transport, _ = await loop.connect_accepted_socket(
            lambda: _Adopted(self._runner.server, ended=ended, keepalive_timeout=KEEPALIVE_TIMEOUT,
                             **self._handler_args), sock, ssl=context,
            ssl_handshake_timeout=_tls.HANDSHAKE_TIMEOUT if context is not None else None)
        try:
            await ended
        finally:
            transport.abort()               # already closed, or the caller gave up (cancelled)

    async def _summarise(self, refusals: logsetup.RefusalSummary) -> None:
        while True:
            await asyncio.sleep(refusals.period)
            refusals.flush()

    async def _renew(self, server_tls: _tls.ServerTLS) -> None:
        """A fresh ephemeral key and binding every day, so none outlives its 30-day expiry.
        The identity is read from the handler each time: a key change is taken at once."""
        while True:
            await asyncio.sleep(_tls.RENEW_EVERY)
            server_tls.renew(auth.now_ms(), self._app[HANDLER].identity)

    async def stop(self) -> None:
        if _SERVING.get(self.port) is self:
            del _SERVING[self.port]
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        await self._runner.cleanup()
        self._app[REFUSALS].flush()
