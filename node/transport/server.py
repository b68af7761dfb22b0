"""The node's HTTP server (aiohttp): thin handlers around one Handler object.

Handlers read, authenticate, call one method of the handler, encode. One
middleware maps the project's errors to statuses and signs every answer to an
authenticated request. Only the public descriptor is served without
authentication. The server never touches the store: node.py supplies the
Handler that does.

    GET /v1/descriptor                 the signed descriptor (public)
    PUT /v1/records/{id}?offset=N      upload a record: [u32 head length][head][ciphertext from N]
    GET /v1/records/{id}/status        how much of a record the callee already has (for resuming)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from aiohttp import web

from .. import wire
from ..envelope import MAX_HEAD
from ..errors import (AuthenticationFailed, CabinetError, CryptoError, NotFound, RemoteProtocolError, StoreError,
                      TooLarge, UsageError)
from ..identity import Identity
from . import auth

log = logging.getLogger("cabinet.server")
MAX_SMALL_BODY = 1 << 20
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


HANDLER = web.AppKey("handler", Handler)
GUARD = web.AppKey("guard", auth.ReplayGuard)
_NONCE = web.RequestKey("nonce", bytes) if hasattr(web, "RequestKey") else "cabinet.nonce"

STATUS = [
    (AuthenticationFailed, 401), (TooLarge, 413), (NotFound, 404), (RemoteProtocolError, 400),
    (CryptoError, 422), (StoreError, 507), (UsageError, 400),
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


async def authenticate(request: web.Request, body_digest_of: bytes | None) -> str:
    """Check the caller's signature; remember the nonce so the answer can be signed."""
    h = request.app[HANDLER]
    claims = auth.parse_request(request.headers)
    key = await h.sign_key_for(claims.caller)
    auth.check_request(claims, method=request.method, target=request.raw_path, me=h.identity,
                       sign_key=key, guard=request.app[GUARD], now_ms=auth.now_ms())
    request[_NONCE] = claims.nonce
    if body_digest_of is not None and auth.digest(body_digest_of) != claims.body_digest:
        raise AuthenticationFailed("body does not match the signed digest")
    return claims.caller


async def get_descriptor(request: web.Request) -> web.Response:
    return web.Response(body=request.app[HANDLER].descriptor_bytes(), content_type="application/x-cabinet-descriptor")


async def put_record(request: web.Request) -> web.Response:
    record_id = request.match_info["id"]
    if not _RECORD_ID.match(record_id):
        raise NotFound("no such record path")
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise RemoteProtocolError("offset must be an integer") from None
    if offset < 0:
        raise RemoteProtocolError("offset must not be negative")
    try:
        n = int.from_bytes(await request.content.readexactly(4), "big")
        if n > MAX_HEAD:
            raise TooLarge(f"envelope head over {MAX_HEAD} bytes")
        head_raw = await request.content.readexactly(n)
    except EOFError:
        raise RemoteProtocolError("body ended before the envelope head") from None
    caller = await authenticate(request, head_raw)
    answer = await request.app[HANDLER].receive_record(caller, record_id, head_raw, offset, _body(request))
    return _encode(request, answer.status, answer.body)


async def get_record_status(request: web.Request) -> web.Response:
    record_id = request.match_info["id"]
    if not _RECORD_ID.match(record_id):
        raise NotFound("no such record path")
    caller = await authenticate(request, await request.read())
    answer = await request.app[HANDLER].record_status(caller, record_id)
    return _encode(request, answer.status, answer.body)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for piece in request.content.iter_any():
        yield piece


def make_app(handler: Handler) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_SMALL_BODY)
    app[HANDLER] = handler
    app[GUARD] = auth.ReplayGuard()
    app.router.add_get("/v1/descriptor", get_descriptor)
    app.router.add_put("/v1/records/{id}", put_record)
    app.router.add_get("/v1/records/{id}/status", get_record_status)
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


def random_nonce() -> bytes:
    return os.urandom(16)
