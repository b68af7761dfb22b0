"""Who is calling the local API, and whether the route lets them: API tokens, sessions, CSRF.

`Authorization: Bearer cab_...` names an API token (its scopes decide; no CSRF: a
browser never adds that header by itself). Otherwise the session cookie names
a signed-in account (its role decides), and every state-changing request must
carry the session's CSRF token in X-CSRF-Token. The cookie is HttpOnly,
SameSite=Strict, and Secure (with the __Host- prefix) when served over TLS.

The page lock (SessionLock): a session that made no request for `lock_ms` is
*locked*: pages send it to /lock (lock.py), API routes answer 401 "locked: ...",
the event stream ends, and nothing it sends counts as activity or touches the
session, whose idle expiry keeps running. Tokens have no lock.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from aiohttp import web

from ...node import AccountService, AuthenticationFailed, Principal, UsageError
from .keys import NODE, TLS_ON

log = logging.getLogger("cabinet.web")
LOCK_MS = 5 * 60_000                    # the page locks after 5 minutes without a request (0: never)


class Guarded(Protocol):
    """What check() reads of a route (api.Route)."""

    @property
    def scope(self) -> str | None: ...

    @property
    def letters(self) -> bool: ...

WHO = web.RequestKey("who", Principal)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_HEADER = "X-CSRF-Token"


class SessionLocked(AuthenticationFailed):
    """The session is locked (no request for the lock time): its password is asked again at /lock."""

    def __init__(self) -> None:
        super().__init__("locked: this session is locked; give the password again at /lock")


@dataclass
class Activity:
    """What the lock knows of one session: who it is and when it last made a request."""

    who: Principal
    last: int
    locked: bool = False


class SessionLock:
    """Last activity per session, in memory, found by a hash of the cookie (never the cookie itself), so
    that a locked request is answered without reading or touching the session. A restart forgets (each
    session then counts from its next request); the session's own idle and absolute expiry still apply."""

    def __init__(self, accounts: AccountService, lock_ms: int = LOCK_MS, limit: int = 10_000) -> None:
        self.accounts, self.lock_ms, self.limit = accounts, lock_ms, limit
        self._seen: OrderedDict[bytes, Activity] = OrderedDict()

    @staticmethod
    def _key(sid: str) -> bytes:
        return hashlib.sha256(sid.encode("utf-8", "replace")).digest()

    def _now(self) -> int:
        return self.accounts.clock()             # the accounts' clock: a test moves both at once

    async def held(self, sid: str) -> Activity | None:
        """The session's entry if it is locked now (the first time: audited and logged), else None."""
        entry = self._seen.get(self._key(sid))
        if entry is None:
            return None
        idle = self._now() - entry.last
        if idle > self.accounts.idle_ms:         # expired anyway: by_session ends it and says so
            self.forget(sid)
            return None
        if not entry.locked and (self.lock_ms <= 0 or idle <= self.lock_ms):
            return None
        if not entry.locked:
            await self._locked(entry, "after %d s without a request" % (idle // 1000))
        return entry

    async def lock_now(self, sid: str, who: Principal) -> Activity:
        """Lock at once (the page's own timer, or the "Lock" link)."""
        entry = self._seen.get(self._key(sid))
        if entry is None:
            entry = self.seen(sid, who)
        if not entry.locked:
            await self._locked(entry, "on request")
        return entry

    async def _locked(self, entry: Activity, why: str) -> None:
        entry.locked = True
        await self.accounts.audit(entry.who, "session-locked")
        log.info("session of account %r locked %s", entry.who.account, why)

    def seen(self, sid: str, who: Principal) -> Activity:
        key, now = self._key(sid), self._now()
        entry = self._seen.pop(key, None) or Activity(who, now)
        entry.who, entry.last = who, now
        self._seen[key] = entry                  # the most recent last: the oldest are first
        while self._seen and (len(self._seen) > self.limit
                              or now - next(iter(self._seen.values())).last > self.accounts.idle_ms):
            self._seen.popitem(last=False)
        return entry

    def forget(self, sid: str) -> None:
        self._seen.pop(self._key(sid), None)


LOCK = web.AppKey("session_lock", SessionLock)


def cookie_name(app: web.Application) -> str:
    return "__Host-cabinet_session" if app[TLS_ON] else "cabinet_session"


def session_id(request: web.Request) -> str | None:
    return request.cookies.get(cookie_name(request.app)) or None


def set_session_cookie(resp: web.StreamResponse, request: web.Request, sid: str) -> None:
    resp.set_cookie(cookie_name(request.app), sid, path="/", httponly=True, samesite="Strict",
                    secure=request.app[TLS_ON], max_age=request.app[NODE].accounts.absolute_ms // 1000)


async def identify(request: web.Request) -> tuple[Principal | None, Activity | None]:
    """(who, None) for a token or an active session; (None, its entry) for a locked session.
    A request counts as activity once: the event stream's re-checks of its own request do not."""
    accounts = request.app[NODE].accounts
    header = request.headers.get("Authorization")
    if header is not None:
        kind, _, value = header.partition(" ")
        return (await accounts.by_token(value.strip()) if kind.lower() == "bearer" else None), None
    sid = session_id(request)
    if sid is None:
        return None, None
    lock = request.app[LOCK]
    held = await lock.held(sid)
    if held is not None:
        return None, held
    who = await accounts.by_session(sid)
    if who is None:
        lock.forget(sid)
    elif WHO not in request:
        lock.seen(sid, who)
    return who, None


async def principal(request: web.Request) -> Principal | None:
    """Who is calling; None for nobody and for a locked session."""
    return (await identify(request))[0]


def lock_url(request: web.Request) -> str:
    """/lock, with the page to come back to (a GET page; after a form's POST, the inbox)."""
    back = request.rel_url.path_qs if request.method == "GET" else "/inbox"
    return "/lock?next=" + quote(back, safe="")


def forbidden(message: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=message)


async def check(request: web.Request, spec: Guarded) -> Principal:
    who, held = await identify(request)
    if held is not None:
        raise SessionLocked()
    if who is None:
        raise AuthenticationFailed("sign in, or give an API token (Authorization: Bearer ...)")
    request[WHO] = who                   # named in the request's log line, even when refused below
    if spec.scope is not None and not who.may(spec.scope, spec.letters):
        if who.via == "token":
            raise forbidden(f"this token lacks the {spec.scope!r} scope")
        raise forbidden(f"the {who.role} role may not do this (letters and attachments are for practitioners)")
    if who.via == "session" and request.method not in SAFE_METHODS:
        given = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), who.csrf.encode()):
            raise forbidden(f"missing or wrong {CSRF_HEADER} header")
    return who


def who(request: web.Request) -> Principal:
    return request[WHO]


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object")
    return body


async def sign_in(request: web.Request) -> web.Response:
    body = await _json(request)
    account, password = body.get("account"), body.get("password")
    if not isinstance(account, str) or not isinstance(password, str):
        raise UsageError("give \"account\" and \"password\" as text")
    node = request.app[NODE]
    sid, me = await node.accounts.sign_in(account, password, request.remote or "?")
    request.app[LOCK].seen(sid, me)
    resp = web.json_response(_me(me, node.accounts.idle_ms))
    set_session_cookie(resp, request, sid)
    return resp


def _me(me: Principal, idle_ms: int) -> dict:
    out: dict[str, object] = {"account": me.account, "role": me.role, "via": me.via, "scopes": sorted(me.scopes)}
    if me.via == "session":
        out |= {"csrf": me.csrf, "idle_seconds": idle_ms // 1000}
    return out


async def session_info(request: web.Request) -> web.Response:
    return web.json_response(_me(who(request), request.app[NODE].accounts.idle_ms))


async def sign_out(request: web.Request) -> web.Response:
    await request.app[NODE].accounts.sign_out(who(request))
    resp = web.json_response({"signed_out": True})
    resp.del_cookie(cookie_name(request.app), path="/", secure=request.app[TLS_ON], httponly=True,
                    samesite="Strict")
    return resp
