"""The page lock's own pages: /lock asks the same account's password again, or offers to sign out.

A session left without a request for the lock time is locked (auth.SessionLock):
every page sends it here and the API answers 401 "locked". The lock page shows
the account name and a password field, nothing of any patient. Unlocking goes
through the same `accounts.sign_in` as the sign-in page (the same Argon2id check,
waits, audit entry and log line on a failure); the locked session is then ended
and replaced by a fresh one (new session ID and CSRF token), and the browser goes
back to the page it came from: a relative path on this server only. The page's
script (static/app.js) comes here by itself at the lock time, clearing the page
first, so nothing stays on screen even if no request is made.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable
from urllib.parse import quote

from aiohttp import web
from yarl import URL

from ...node import AuthenticationFailed, TooManyAttempts, UsageError
from . import auth, i18n
from .auth import LOCK, Activity
from .keys import NODE

log = logging.getLogger("cabinet.web")
HOME = "/inbox"


def safe_next(text: object) -> str:
    """The page to come back to: a path on this server (never another site, nor the lock or sign-in pages)."""
    if not isinstance(text, str) or not text.startswith("/") or len(text) > 2000:
        return HOME
    if text.startswith("//") or "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return HOME
    try:
        url = URL(text)
    except ValueError:
        return HOME
    if url.is_absolute() or url.scheme or url.path.startswith(("/lock", "/login", "/logout", "/static/")):
        return HOME
    return text


async def _held_or_lock(request: web.Request) -> Activity | None:
    """The locked session's entry; an active session is locked now (the page's timer, the Lock link)."""
    sid = auth.session_id(request)
    if sid is None:
        return None
    lock = request.app[LOCK]
    held = await lock.held(sid)
    if held is None:
        who = await request.app[NODE].accounts.by_session(sid)
        held = await lock.lock_now(sid, who) if who is not None else None
    return held


def _csrf_ok(form: Any, held: Activity) -> bool:
    given = str(form.get("csrf", ""))
    return hmac.compare_digest(given.encode(), held.who.csrf.encode())


Render = Callable[..., web.Response]
RENDER: web.AppKey[Render] = web.AppKey("render")          # pages.render, set by pages.mount (no import cycle)


def _show(request: web.Request, held: Activity, nxt: str, message: str = "", status: int = 200) -> web.Response:
    return request.app[RENDER](request, "lock.html", {
        "account": held.who.account, "lock_csrf": held.who.csrf, "next": nxt, "message": message,
        "path": "/lock?next=" + quote(nxt, safe="")}, status=status)


async def lock_page(request: web.Request) -> web.StreamResponse:
    held = await _held_or_lock(request)
    if held is None:
        raise web.HTTPSeeOther("/login")
    return _show(request, held, safe_next(request.query.get("next")))


async def unlock(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    nxt, sid = safe_next(form.get("next")), auth.session_id(request)
    lock, accounts = request.app[LOCK], request.app[NODE].accounts
    held = await lock.held(sid) if sid else None
    if sid is None or held is None:                   # not locked (any more), or no session at all
        raise web.HTTPSeeOther(nxt if sid and await accounts.by_session(sid) else "/login")
    if not _csrf_ok(form, held):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
    t = i18n.translator(i18n.pick(request.cookies.get(i18n.COOKIE)))
    try:
        new_sid, me = await accounts.sign_in(held.who.account, str(form.get("password", "")), request.remote or "?")
    except TooManyAttempts as exc:
        return _show(request, held, nxt, t("sign_in_wait", s=-(-exc.retry_after_ms // 1000)), status=429)
    except (AuthenticationFailed, UsageError):
        return _show(request, held, nxt, t("unlock_failed"), status=401)
    await accounts.sign_out(held.who)                 # the locked session ends; the new one replaces it
    lock.forget(sid)
    lock.seen(new_sid, me)
    await accounts.audit(me, "session-unlocked")
    log.info("session of account %r unlocked", me.account)
    resp = web.HTTPSeeOther(nxt)
    auth.set_session_cookie(resp, request, new_sid)
    raise resp


async def sign_out(request: web.Request) -> web.StreamResponse:
    """The lock page's other way out: sign out (CSRF-checked), no password needed."""
    form = await request.post()
    held = await _held_or_lock(request)
    if held is not None:
        if not _csrf_ok(form, held):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
        await request.app[NODE].accounts.sign_out(held.who)
        request.app[LOCK].forget(auth.session_id(request) or "")
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(auth.cookie_name(request.app), path="/")
    raise resp


ROUTES: list[tuple[str, str, Callable]] = [
    ("GET", "/lock", lock_page), ("POST", "/lock", unlock), ("POST", "/lock/sign-out", sign_out)]


def configure(app: web.Application, minutes: float | None) -> None:
    """Set the lock time (minutes; 0: the page never locks by itself); None leaves the default."""
    if minutes is not None:
        if minutes < 0:
            raise UsageError("the page lock time is 0 (off) or a number of minutes")
        app[LOCK].lock_ms = int(minutes * 60_000)
