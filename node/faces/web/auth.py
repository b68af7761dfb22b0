"""Who is calling the local API, and whether the route lets them: API tokens, sessions, CSRF.

`Authorization: Bearer cab_...` names an API token (its scopes decide; no CSRF: a
browser never adds that header by itself). Otherwise the session cookie names
a signed-in account (its role decides), and every state-changing request must
carry the session's CSRF token in X-CSRF-Token. The cookie is HttpOnly,
SameSite=Strict, and Secure (with the __Host- prefix) when served over TLS.
"""

from __future__ import annotations

import hmac
from typing import Protocol

from aiohttp import web

from ...node import AuthenticationFailed, Principal, UsageError
from .keys import NODE, TLS_ON



class Guarded(Protocol):
    """What check() reads of a route (api.Route)."""

    @property
    def scope(self) -> str | None: ...

    @property
    def letters(self) -> bool: ...

WHO = web.RequestKey("who", Principal)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSRF_HEADER = "X-CSRF-Token"


def cookie_name(app: web.Application) -> str:
    return "__Host-cabinet_session" if app[TLS_ON] else "cabinet_session"


async def principal(request: web.Request) -> Principal | None:
    accounts = request.app[NODE].accounts
    header = request.headers.get("Authorization")
    if header is not None:
        kind, _, value = header.partition(" ")
        return await accounts.by_token(value.strip()) if kind.lower() == "bearer" else None
    sid = request.cookies.get(cookie_name(request.app))
    return await accounts.by_session(sid) if sid else None


def forbidden(message: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=message)


async def check(request: web.Request, spec: Guarded) -> Principal:
    who = await principal(request)
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
    resp = web.json_response(_me(me, node.accounts.idle_ms))
    resp.set_cookie(cookie_name(request.app), sid, path="/", httponly=True, samesite="Strict",
                    secure=request.app[TLS_ON], max_age=node.accounts.absolute_ms // 1000)
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
