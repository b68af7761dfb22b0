"""The bootstrap's HTTP API (aiohttp): thin handlers over bootstrap.storage.

    POST /v1/announce              body: a signed descriptor; verified, then stored
    GET  /v1/nodes/{node_id}       the signed descriptor, 404 if unknown or expired
    GET  /v1/search?q=words        {"items": [descriptor, ...]}, at most 50
    GET  /v1/sync?since=N&limit=M&wait=S   {"db", "items", "last", "more"} for anti-entropy

Answers are canonical msgpack (a lookup answers the descriptor bytes as they
were signed). One middleware limits each client address (token buckets) and
one maps the project's errors to statuses, so malformed input gets a clear
status and message and the server keeps serving. See docs/bootstrap.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from dataclasses import dataclass

from aiohttp import web

from node.core import wire
from node.core.errors import CabinetError, CryptoError, NotFound, RemoteProtocolError, StoreError, TooLarge, UsageError
from node.core.identity import MAX_DESCRIPTOR, normalize_node_id

from . import storage
from .ratelimit import RateLimiter, client_key
from .storage import Expired, Revoked, Rollback, Storage

log = logging.getLogger("cabinet.bootstrap")
MSGPACK = "application/msgpack"
DESCRIPTOR_TYPE = "application/x-cabinet-descriptor"
MAX_WAIT = 30


@dataclass(frozen=True, slots=True)
class Limits:
    announce_rate: float = 20
    announce_burst: float = 40
    read_rate: float = 200
    read_burst: float = 400


class Changes:
    """Wakes long-polling /v1/sync requests when something new is stored."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def close(self) -> None:
        self.closing = True
        self.notify()


STORAGE = web.AppKey("storage", Storage)
CHANGES = web.AppKey("changes", Changes)
ANNOUNCE_LIMIT = web.AppKey("announce_limit", RateLimiter)
READ_LIMIT = web.AppKey("read_limit", RateLimiter)

STATUS = [
    (TooLarge, 413), (NotFound, 404), (Rollback, 409), (Revoked, 409), (Expired, 422), (RemoteProtocolError, 400),
    (CryptoError, 422), (StoreError, 503), (UsageError, 400),
]


def status_for(err: CabinetError) -> int:
    for kind, status in STATUS:
        if isinstance(err, kind):
            return status
    return 500


def now_ms() -> int:
    return int(time.time() * 1000)


def answer(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=wire.pack(body), content_type=MSGPACK, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CabinetError as err:
        status = status_for(err)
        log.info("refused %s %s: %s (%d)", request.method, request.path, err, status)
        return answer({"error": str(err)}, status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (413 over client_max_size, 404 no route, 405) also answer msgpack.
        return answer({"error": exc.reason.lower()}, exc.status)
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return answer({"error": "internal error"}, 500)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    limiter = request.app[ANNOUNCE_LIMIT if request.method == "POST" else READ_LIMIT]
    client = client_key(request.remote)
    if not limiter.allow(client, time.monotonic()):
        retry = max(1, round(limiter.retry_after(client)))
        return answer({"error": "too many requests: slow down"}, 429, headers={"Retry-After": str(retry)})
    return await handler(request)


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}")
    return value


async def post_announce(request: web.Request) -> web.Response:
    raw = await request.read()
    if not raw:
        raise RemoteProtocolError("empty body: expected a signed descriptor")
    stored = await request.app[STORAGE].write(storage.put, raw, now_ms())
    if stored.changed:
        request.app[CHANGES].notify()
        log.info("stored %s seq %d", stored.node_id, stored.seq)
    return answer({"status": "stored" if stored.changed else "unchanged", "node_id": stored.node_id,
                   "seq": stored.seq})


async def get_node(request: web.Request) -> web.Response:
    node_id = normalize_node_id(request.match_info["node_id"])
    raw = await request.app[STORAGE].read(storage.get, node_id, now_ms())
    if raw is None:
        raise NotFound("no descriptor for this node ID")
    return web.Response(body=raw, content_type=DESCRIPTOR_TYPE)


async def get_search(request: web.Request) -> web.Response:
    items = await request.app[STORAGE].read(storage.search, request.query.get("q", ""), now_ms())
    return answer({"items": items})


async def get_sync(request: web.Request) -> web.Response:
    since = _int(request, "since", 0, 0, 2**62)
    limit = _int(request, "limit", 500, 1, storage.SYNC_MAX_ITEMS)
    wait = _int(request, "wait", 0, 0, MAX_WAIT)
    store, changes = request.app[STORAGE], request.app[CHANGES]
    event = changes.current()
    page = await store.read(storage.changes, since, limit, now_ms())
    if page.last == since and wait and not changes.closing:
        # Long poll: nothing new yet, so hold the request until something is stored (or `wait` passes).
        try:
            await asyncio.wait_for(event.wait(), wait)
        except asyncio.TimeoutError:
            pass
        page = await store.read(storage.changes, since, limit, now_ms())
    return answer({"db": store.db_id, "items": page.items, "last": page.last, "more": page.more})


def trace_middleware(path: Path):
    """Append every request as received (method, path, body) to a file: to audit what a
    bootstrap is ever told. The tests use it to show no record reaches a bootstrap."""
    @web.middleware
    async def trace(request: web.Request, handler) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else b""
        with open(path, "ab") as fh:
            fh.write(f"{request.method} {request.path_qs} {len(body)}\n".encode() + body + b"\n")
        return await handler(request)
    return trace


def make_app(store: Storage, limits: Limits = Limits(), trace: Path | None = None) -> web.Application:
    # The largest request is an announce: one descriptor.
    middlewares = [errors_middleware, rate_limit_middleware] + ([trace_middleware(trace)] if trace else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_DESCRIPTOR)
    app[STORAGE] = store
    app[CHANGES] = Changes()
    app[ANNOUNCE_LIMIT] = RateLimiter(limits.announce_rate, limits.announce_burst)
    app[READ_LIMIT] = RateLimiter(limits.read_rate, limits.read_burst)
    app.router.add_post("/v1/announce", post_announce)
    app.router.add_get("/v1/nodes/{node_id}", get_node)
    app.router.add_get("/v1/search", get_search)
    app.router.add_get("/v1/sync", get_sync)

    async def release_waiters(app: web.Application) -> None:
        app[CHANGES].close()

    app.on_shutdown.append(release_waiters)
    return app
