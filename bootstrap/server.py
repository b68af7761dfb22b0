"""The bootstrap's HTTP API (aiohttp): thin handlers over bootstrap.storage.

    POST /v1/announce              body: a signed descriptor; verified, then stored
    GET  /v1/nodes/{node_id}       the signed descriptor, 404 if unknown or expired
    GET  /v1/search?q=words        {"items": [descriptor, ...], "conflicts": [[flag, ...], ...]}, at most 50
    GET  /v1/sync?since=N&limit=M&wait=S   {"db", "items", "last", "more"} for anti-entropy

Answers are canonical msgpack, shaped by node/core/directory.py (a lookup answers the
descriptor bytes as they were signed). One middleware finds the client's address (the
connection's, or X-Forwarded-For from a trusted proxy) and limits it (token buckets);
identities never seen before are counted against a quota per address block and in total;
one middleware maps the project's errors to statuses, so malformed input gets a clear
status and message and the server keeps serving. See docs/bootstrap.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass

from aiohttp import web

from node.core import directory as codec
from node.core import wire
from node.core.directory import DESCRIPTOR_TYPE, MAX_WAIT, MSGPACK, SyncPage
from node.core.errors import CabinetError, CryptoError, NotFound, RemoteProtocolError, StoreError, TooLarge, UsageError
from node.core.identity import MAX_DESCRIPTOR, normalize_node_id

from . import storage
from .ratelimit import NewIdentityQuota, RateLimiter, block_key, client_address, client_key, parse_proxies
from .storage import Expired, NewIdentityLimit, Revoked, Rollback, Storage

log = logging.getLogger("cabinet.bootstrap")


@dataclass(frozen=True, slots=True)
class Limits:
    announce_rate: float = 20
    announce_burst: float = 40
    read_rate: float = 200
    read_burst: float = 400
    new_per_block: int = 20             # identities never seen, per IPv4 /24 or IPv6 /56 ...
    new_total: int = 500                # ... and from everyone,
    new_period: float = 3600            # per this many seconds
    trusted_proxies: tuple[str, ...] = ()   # X-Forwarded-For is believed only from these


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
NEW_IDENTITIES = web.AppKey("new_identities", NewIdentityQuota)
PROXIES = web.AppKey("proxies", tuple)
CLIENT = web.RequestKey("client", str)      # the client's address, as client_address found it

STATUS = [
    (NewIdentityLimit, 429),
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
        retry = getattr(err, "retry_after", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return answer(codec.error_body(str(err)), status, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (413 over client_max_size, 404 no route, 405) also answer msgpack.
        return answer(codec.error_body(exc.reason.lower()), exc.status)
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return answer(codec.error_body("internal error"), 500)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
    address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), request.app[PROXIES])
    request[CLIENT] = address or "?"
    limiter = request.app[ANNOUNCE_LIMIT if request.method == "POST" else READ_LIMIT]
    client = client_key(address)
    if not limiter.allow(client, time.monotonic()):
        retry = max(1, round(limiter.retry_after(client)))
        return answer(codec.error_body("too many requests: slow down"), 429, headers={"Retry-After": str(retry)})
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
    quota, block = request.app[NEW_IDENTITIES], block_key(request[CLIENT])

    def admit() -> None:           # runs on the storage writer thread, the quota's only user
        wait = quota.admit(block, time.monotonic())
        if wait:
            raise NewIdentityLimit("too many new identities from this network lately: try again later", wait)

    stored = await request.app[STORAGE].write(storage.put, raw, now_ms(), admit)
    if stored.changed:
        request.app[CHANGES].notify()
        log.info("stored %s seq %d", stored.node_id, stored.seq)
    return answer(codec.announce_answer("stored" if stored.changed else "unchanged", stored.node_id, stored.seq))


async def get_node(request: web.Request) -> web.Response:
    node_id = normalize_node_id(request.match_info["node_id"])
    raw = await request.app[STORAGE].read(storage.get, node_id, now_ms())
    if raw is None:
        raise NotFound("no descriptor for this node ID")
    return web.Response(body=raw, content_type=DESCRIPTOR_TYPE)


async def get_search(request: web.Request) -> web.Response:
    items, conflicts = await request.app[STORAGE].read(storage.search_flagged, request.query.get("q", ""), now_ms())
    return answer(codec.search_answer(items, conflicts))


async def get_sync(request: web.Request) -> web.Response:
    since = _int(request, "since", 0, 0, 2**62)
    limit = _int(request, "limit", codec.SYNC_LIMIT, 1, codec.SYNC_MAX_ITEMS)
    wait = _int(request, "wait", 0, 0, MAX_WAIT)
    store, changes = request.app[STORAGE], request.app[CHANGES]
    event = changes.current()
    page = await store.read(storage.changes, since, limit, now_ms())
    if page.last == since and wait and not changes.closing:
        # Long poll: nothing new yet, so hold the request until something is stored (or `wait` passes).
        try:
            async with asyncio.timeout(wait):          # not wait_for: on 3.11 it can swallow a cancel
                await event.wait()
        except TimeoutError:
            pass
        page = await store.read(storage.changes, since, limit, now_ms())
    return answer(SyncPage(db=store.db_id, items=page.items, last=page.last, more=page.more).to_wire())


def trace_middleware(path: Path):
    """Append every request as received (method, path, body) to a file: to audit what a
    bootstrap is ever told. The tests use it to show no record reaches a bootstrap."""
    @web.middleware
    async def trace(request: web.Request, handler) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else b""
        with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as fh:
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
    app[NEW_IDENTITIES] = NewIdentityQuota(limits.new_per_block, limits.new_total, limits.new_period)
    app[PROXIES] = parse_proxies(limits.trusted_proxies)
    app.router.add_post("/v1/announce", post_announce)
    app.router.add_get("/v1/nodes/{node_id}", get_node)
    app.router.add_get("/v1/search", get_search)
    app.router.add_get("/v1/sync", get_sync)

    async def release_waiters(app: web.Application) -> None:
        app[CHANGES].close()

    app.on_shutdown.append(release_waiters)
    return app
