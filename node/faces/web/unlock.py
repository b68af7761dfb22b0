"""The unlock page of a node started locked (`cabinet run --locked`, or a service with no passphrase).

Until the passphrase is given, the web port serves only this: `GET /unlock` (the form), `POST
/unlock` (the form's post), `GET /api/unlock` ({"locked": true, "csrf"}) and `POST /api/unlock`
({"passphrase"} with the X-CSRF-Token header), plus /static/. No key is held and no store is
open, so nothing else is reachable. Host and Origin are checked as on the full app (server.gate)
and every answer has its headers. The CSRF token is random per locked start; a page from another
origin cannot read it.

Failed unlocks wait 1 s, then 2, 4, ... up to 15 minutes before the next is even tried (429
with Retry-After), and each is logged (never the passphrase). On success `opened` holds the
Node; control_run.py then closes this server and starts the full web app on the same port.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ...node import Node, UsageError, WrongPassphrase
from .keys import ALLOWED_HOSTS, CLOSING, ROUTE_SPECS, TLS_ON
from .server import JSON_MAX, PortInUse, _headers, errors, gate, host_names, is_loopback, tls_context

log = logging.getLogger("cabinet.web")
HERE = Path(__file__).parent
MAX_WAIT_S = 15 * 60


@dataclass
class Unlocker:
    folder: Path
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    failures: int = 0
    failed_at: list[int] = field(default_factory=list)      # Unix ms of each wrong passphrase (for the audit)
    not_before: float = 0.0
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    opened: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    async def try_passphrase(self, passphrase: str) -> None:
        """Open the node with `passphrase`, or raise (a wrong one counts as a failure)."""
        async with self.busy:                     # one derivation at a time
            wait = self.not_before - time.monotonic()
            if wait > 0:
                raise web.HTTPTooManyRequests(text=f"too many failed unlocks: try again in {int(wait) + 1} s",
                                              headers={"Retry-After": str(int(wait) + 1)})
            if self.opened.done():
                return
            try:
                node = await Node.open_node(self.folder, passphrase=passphrase)
            except WrongPassphrase:
                self.failures += 1
                self.failed_at.append(int(time.time() * 1000))
                delay = min(MAX_WAIT_S, 2 ** (self.failures - 1))
                self.not_before = time.monotonic() + delay
                log.warning("unlock failed (wrong passphrase, %d in a row); next try in %d s", self.failures, delay)
                raise web.HTTPUnauthorized(text="wrong passphrase") from None
            log.info("node unlocked from the web page")
            self.opened.set_result(node)


UNLOCKER = web.AppKey("unlocker", Unlocker)


def _page(csrf: str, message: str = "", done: bool = False) -> web.Response:
    body = ("<p>Le cabinet est déverrouillé. <a href=\"/login\">Se connecter</a></p>" if done else
            f"""<form method="post" action="/unlock">
<input type="hidden" name="csrf" value="{html.escape(csrf)}">
<p><label for="passphrase">Phrase secrète du cabinet (passphrase)</label>
<input id="passphrase" name="passphrase" type="password" autocomplete="current-password" required autofocus></p>
<p><button type="submit">Déverrouiller</button></p></form>""")
    alert = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    text = f"""<!doctype html><html lang="fr"><head><meta charset="utf-8"><title>Déverrouiller le cabinet</title>
<link rel="stylesheet" href="/static/style.css"></head><body><main><section class="card narrow">
<h1>Déverrouiller le cabinet</h1>{alert}{body}</section></main></body></html>"""
    return web.Response(text=text, content_type="text/html", headers={"Referrer-Policy": "same-origin"})


async def unlock_page(request: web.Request) -> web.Response:
    return _page(request.app[UNLOCKER].csrf)


async def unlock_form(request: web.Request) -> web.Response:
    u = request.app[UNLOCKER]
    form = await request.post()
    if not hmac.compare_digest(str(form.get("csrf", "")).encode(), u.csrf.encode()):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
    try:
        await u.try_passphrase(str(form.get("passphrase", "")))
    except web.HTTPException as exc:
        return _page(u.csrf, exc.text or exc.reason)
    return _page(u.csrf, done=True)


async def unlock_state(request: web.Request) -> web.Response:
    u = request.app[UNLOCKER]
    return web.json_response({"locked": not u.opened.done(), "csrf": u.csrf})


async def unlock_api(request: web.Request) -> web.Response:
    u = request.app[UNLOCKER]
    if not hmac.compare_digest(request.headers.get("X-CSRF-Token", "").encode(), u.csrf.encode()):
        raise web.HTTPForbidden(text="missing or wrong X-CSRF-Token header (GET /api/unlock gives it)")
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("the body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("passphrase"), str):
        raise UsageError("give {\"passphrase\": \"...\"}")
    await u.try_passphrase(body["passphrase"])
    return web.json_response({"locked": False})


async def to_unlock(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/unlock")


@dataclass
class UnlockServer:
    runner: web.AppRunner
    port: int
    url: str
    opened: asyncio.Future
    failed_at: list[int]                 # when each wrong passphrase was typed (Node.note_failed_unlocks)

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_unlock(folder: Path, host: str, port: int, *, tls=None) -> UnlockServer:
    if not is_loopback(host) and tls is None:
        raise UsageError("the web app listens beyond this computer only over TLS: give --web-cert FILE "
                         "and --web-key FILE (or listen on 127.0.0.1)")
    ctx = tls_context(tls)
    app = web.Application(middlewares=[errors, gate], client_max_size=JSON_MAX)
    app[TLS_ON], app[ALLOWED_HOSTS], app[ROUTE_SPECS], app[CLOSING] = ctx is not None, set(), {}, asyncio.Event()
    app[UNLOCKER] = Unlocker(Path(folder))
    app.router.add_get("/unlock", unlock_page)
    app.router.add_post("/unlock", unlock_form)
    app.router.add_get("/api/unlock", unlock_state)
    app.router.add_post("/api/unlock", unlock_api)
    for path in ("/", "/login"):
        app.router.add_get(path, to_unlock)
    app.router.add_static("/static/", HERE / "static")
    app.on_response_prepare.append(_headers)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    except OSError as exc:
        await runner.cleanup()
        kind = PortInUse if exc.errno == errno.EADDRINUSE else UsageError
        raise kind(f"cannot serve the unlock page on {host}:{port}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1]
    app[ALLOWED_HOSTS].update(host_names(host, bound))
    shown = f"[{host}]" if ":" in host else host
    return UnlockServer(runner, bound, f"{'https' if ctx else 'http'}://{shown}:{bound}", app[UNLOCKER].opened,
                        app[UNLOCKER].failed_at)
