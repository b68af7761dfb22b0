"""The node's HTTP server (aiohttp): thin handlers around one Handler object.

Handlers read, authenticate, call one method of the handler, encode. One
middleware maps the project's errors to statuses and signs every answer to an
authenticated request. Only the public descriptor is served without
authentication. The server never touches the store: node.py supplies the
Handler that does.

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
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from aiohttp import web

from ..core import wire
from ..core.envelope import MAX_HEAD
from ..core.errors import (AuthenticationFailed, CabinetError, ConsentRefused, CryptoError, NotFound, RemoteProtocolError,
                      StoreError, TooLarge, UsageError)
from ..core.identity import Identity
from . import access, auth

log = logging.getLogger("cabinet.server")
MAX_SMALL_BODY = 1 << 20
MAX_BATCH_BODY = 9 << 20
BODY_TIMEOUT = 60                   # seconds for a small body or an envelope head to arrive
MSGPACK = "application/msgpack"
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict


class Handler(Protocol):
    identity: Identity

    def descriptor_bytes(self) -> bytes: ...

    async def sign_key_for(self, node_id: str) -> bytes | None: ...

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int,
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
_NONCE = web.RequestKey("nonce", bytes) if hasattr(web, "RequestKey") else "cabinet.nonce"

STATUS = [
    (AuthenticationFailed, 401), (TooLarge, 413), (NotFound, 404), (RemoteProtocolError, 400),
    (CryptoError, 422), (StoreError, 507), (UsageError, 400), (ConsentRefused, 403),
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
    try:
        return await handler(request)
    except CabinetError as err:
        status = status_for(err)
        log.warning("refused %s %s from %s: %s (%d)", request.method, request.path,
                    request.headers.get(auth.H_CALLER, "?"), err, status)
        return _encode(request, status, {"error": str(err)})
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return _encode(request, 500, {"error": "internal error"})


PUBLIC = {("GET", "/v1/descriptor")}
_CLAIMS = web.RequestKey("claims", object) if hasattr(web, "RequestKey") else "cabinet.claims"
_KEY = web.RequestKey("key", object) if hasattr(web, "RequestKey") else "cabinet.key"


@web.middleware
async def door_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Before any body is read: the headers must name a known contact and a current time.

    A stranger cannot make the node buffer a body or hold a handler; the
    signature itself is checked once the body (or its digest) is known.
    """
    if (request.method, request.path) not in PUBLIC:
        claims = auth.parse_request(request.headers)
        if abs(auth.now_ms() - claims.ts) > auth.MAX_SKEW_MS:
            raise AuthenticationFailed("request time is more than 5 minutes off; check the clocks")
        key = await request.app[HANDLER].sign_key_for(claims.caller)
        if key is None:
            raise AuthenticationFailed("unknown caller: this practice has not added you as a contact")
        request[_CLAIMS], request[_KEY] = claims, key
    return await handler(request)


async def authenticate(request: web.Request, body_digest_of: bytes | None) -> str:
    """Check the caller's signature; remember the nonce so the answer can be signed."""
    h = request.app[HANDLER]
    claims, key = request[_CLAIMS], request[_KEY]
    auth.check_request(claims, method=request.method, target=request.raw_path, me=h.identity,
                       sign_key=key, guard=request.app[GUARD], now_ms=auth.now_ms())
    request[_NONCE] = claims.nonce
    if body_digest_of is not None and auth.digest(body_digest_of) != claims.body_digest:
        raise AuthenticationFailed("body does not match the signed digest")
    return claims.caller


async def get_descriptor(request: web.Request) -> web.Response:
    return web.Response(body=request.app[HANDLER].descriptor_bytes(), content_type="application/x-cabinet-descriptor")


def _record_id(request: web.Request) -> str:
    record_id = request.match_info["id"]
    if not _RECORD_ID.match(record_id):
        raise NotFound("no such record path")
    return record_id


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
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request body over {limit} bytes")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await auth.read_limited(request.content, limit)
    except TimeoutError:
        raise RemoteProtocolError("the request body did not arrive in time") from None
    if len(body) > limit:
        raise TooLarge(f"request body over {limit} bytes")
    return body


async def put_record(request: web.Request) -> web.Response:
    record_id = _record_id(request)
    offset = _int_query(request, "offset", 0)
    seq = _int_query(request, "seq", None)
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            n = int.from_bytes(await request.content.readexactly(4), "big")
            if n > MAX_HEAD:
                raise TooLarge(f"envelope head over {MAX_HEAD} bytes")
            head_raw = await request.content.readexactly(n)
    except EOFError:
        raise RemoteProtocolError("body ended before the envelope head") from None
    except TimeoutError:
        raise RemoteProtocolError("the envelope head did not arrive in time") from None
    caller = await authenticate(request, head_raw)
    answer = await request.app[HANDLER].receive_record(caller, record_id, head_raw, offset, seq, _body(request))
    return _encode(request, answer.status, answer.body)


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
    async for piece in request.content.iter_any():
        yield piece


def make_app(handler: Handler) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, door_middleware], client_max_size=MAX_BATCH_BODY)
    app[HANDLER] = handler
    app[GUARD] = auth.ReplayGuard()
    app.router.add_get("/v1/descriptor", get_descriptor)
    app.router.add_post("/v1/descriptor", post_descriptor)
    app.router.add_put("/v1/records/{id}", put_record)
    app.router.add_get("/v1/records/{id}/status", get_record_status)
    app.router.add_get("/v1/records/{id}/body", get_record_body)
    app.router.add_post("/v1/batch", post_batch)
    app.router.add_get("/v1/outbox", get_outbox)
    app.router.add_post("/v1/acks", post_acks)
    app.router.add_post("/v1/receipts", post_receipts)
    access.add_routes(app)
    return app


class Server:
    """Runs the app on host:port; port 0 picks a free port (see .port after start)."""

    def __init__(self, handler: Handler, host: str, port: int) -> None:
        self._runner = web.AppRunner(make_app(handler), access_log=None, handle_signals=False)
        self.host, self.port = host, port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, backlog=512)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sockets = self._runner.server and site._server.sockets  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

