"""The local JSON API's aiohttp application and `start_web`, which serves it beside `cabinet run`.

Every request passes three gates, in this order (middlewares):
  1. `errors`: whatever goes wrong becomes {"error": "one line"} with a clear status, never a traceback;
  2. `gate`: the Host header must name this server (DNS rebinding), an Origin header must be this
     server's own origin; then auth.check finds who is calling and whether the route allows it;
and `on_response_prepare` adds the security headers to every answer, errors and streams included.

Requests are logged as method, route pattern (IDs never expanded, no query string), status and
account: never a path or a query as sent, so no patient name can reach node.log through here.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from aiohttp import web

from ...node import (AlreadyExists, AuthenticationFailed, CabinetError, Node, NotFound, StoreError, TooLarge,
                     TooManyAttempts, UsageError)
from . import api, auth, metrics, pages
from .keys import ALLOWED_HOSTS, CLOSING, NODE, ROUTE_SPECS, TLS_ON

log = logging.getLogger("cabinet.web")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
JSON_MAX = 1 << 20


def error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def status_of(exc: CabinetError) -> int:
    for kind, status in ((TooManyAttempts, 429), (AuthenticationFailed, 401), (NotFound, 404), (TooLarge, 413),
                         (AlreadyExists, 409), (UsageError, 400), (StoreError, 507)):
        if isinstance(exc, kind):
            return status
    return 502 if exc.__class__.__name__.startswith("Peer") else 400


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error(exc.status, exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:")
                     else exc.text, dict(exc.headers) if "Allow" in exc.headers else None)
    except TooManyAttempts as exc:
        resp = error(429, str(exc), {"Retry-After": str(max(1, -(-exc.retry_after_ms // 1000)))})
    except CabinetError as exc:
        resp = error(status_of(exc), str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:             # a bug: the class in the log, one line for the caller
        log.error("internal error on %s %s: %s", request.method, _pattern(request), exc.__class__.__name__)
        resp = error(500, "internal error")
    who = request.get(auth.WHO)
    log.info("%s %s %s %s %.0f ms", request.method, _pattern(request), resp.status,
             who.account if who else "-", (time.monotonic() - started) * 1000)
    return resp


def _pattern(request: web.Request) -> str:
    route = request.match_info.route
    info = route.resource.canonical if route.resource is not None else "(no route)"
    return info


@web.middleware
async def gate(request: web.Request, handler) -> web.StreamResponse:
    allowed = request.app[ALLOWED_HOSTS]
    host = (request.headers.get("Host") or "").lower()
    if host not in allowed:
        return error(421, "this server does not answer to that host name")
    origin = request.headers.get("Origin")
    scheme = "https" if request.app[TLS_ON] else "http"
    if origin is not None and origin.lower() not in {f"{scheme}://{h}" for h in allowed}:
        return error(403, "requests from another origin are refused")
    spec = request.app[ROUTE_SPECS].get((request.method, _pattern(request)))
    if spec is not None and not spec.public:
        await auth.check(request, spec)
    return await handler(request)


async def _headers(request: web.Request, resp: web.StreamResponse) -> None:
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    # pages set "same-origin": under "no-referrer" a browser sends `Origin: null` with the pages' own
    # form posts and fetches, which the Origin check refuses; their URLs hold no patient data
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    # an attachment previewed inline may be framed by this server's own record page, nothing else
    inline = resp.headers.get("Content-Disposition", "").startswith("inline")
    resp.headers["X-Frame-Options"] = "SAMEORIGIN" if inline else "DENY"
    resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    resp.headers["Cache-Control"] = "no-store"       # every answer may carry patient data: none is cached


def make_app(node: Node, *, tls: bool = False) -> web.Application:
    app = web.Application(middlewares=[errors, gate], client_max_size=JSON_MAX)
    app[NODE], app[TLS_ON], app[ALLOWED_HOSTS] = node, tls, set()
    app[CLOSING] = asyncio.Event()
    specs = {}
    for spec in api.ROUTES:
        route = app.router.add_route(spec.method, spec.path, spec.handler)
        assert route.resource is not None
        specs[(spec.method, route.resource.canonical)] = spec
    app[ROUTE_SPECS] = specs
    pages.mount(app)                     # the web pages and /static/ (pages.py), beside the API
    metrics.mount(app)                   # GET /metrics (token scope admin): docs/operations.md
    app.on_response_prepare.append(_headers)
    app.on_shutdown.append(_closing)
    return app


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()                   # event streams end, so that shutdown does not wait for them


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_names(host: str, port: int, extra: Sequence[str] = ()) -> set[str]:
    """What a browser may send as Host for this server (lowercase host:port)."""
    names = {f"{h}:{port}".lower() for h in extra}
    if is_loopback(host):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    elif host not in ("0.0.0.0", "::"):
        names.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return names


def tls_context(tls: ssl.SSLContext | tuple[str | Path, str | Path] | None, *,
                password: bytes | None = None) -> ssl.SSLContext | None:
    """`tls` as an SSLContext; `password` opens an encrypted key (the node's own web certificate, cert.py)."""
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    cert, key = tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key), password=password)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the web certificate {Path(cert).name} and key {Path(key).name}: {exc}") from None
    return ctx


@dataclass
class WebServer:
    runner: web.AppRunner
    site: web.TCPSite
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


class PortInUse(UsageError):
    """The web app's port is taken (another node on this computer, or another program)."""


async def start_web(node: Node, host: str, port: int, *,
                    tls: ssl.SSLContext | tuple[str | Path, str | Path] | None = None,
                    names: Sequence[str] = (), idle_minutes: float | None = None) -> WebServer:
    """Serve the local API on host:port (0: any free port). Beyond loopback, TLS is required:
    `tls` is an SSLContext or (certificate file, key file). `names`: other host names the
    practice's PCs use to reach it (e.g. "cabinet.local:7480"). Returns the running server."""
    if not is_loopback(host) and tls is None:
        raise UsageError("the web app listens beyond this computer only over TLS: give --web-cert FILE "
                         "and --web-key FILE (or listen on 127.0.0.1)")
    ctx = tls_context(tls)
    if idle_minutes is not None:
        node.accounts.idle_ms = int(idle_minutes * 60_000)
    app = make_app(node, tls=ctx is not None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        kind = PortInUse if exc.errno == errno.EADDRINUSE else UsageError
        raise kind(f"cannot serve the web app on {host}:{port}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1]
    app[ALLOWED_HOSTS].update(host_names(host, bound, names))
    return WebServer(runner, site, host, bound, ctx is not None)
