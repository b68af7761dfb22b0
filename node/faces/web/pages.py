"""The practice's web pages: server-rendered HTML (Jinja2, autoescaped) over the same Node as the JSON API.

`mount(app)` adds the pages and /static/ to the API's aiohttp app (server.make_app).
Pages read the Node directly; what changes state from a script (sending, replying)
goes through the JSON API with the session's CSRF token. Each page handler is
wrapped by `page`: no session -> the sign-in page; a CabinetError -> an error page
with one line, never a traceback. Patient data never goes in a URL: filters are
POSTed, links hold record IDs and node IDs only. Every answer is `no-store`
(server._headers).
"""

from __future__ import annotations

import datetime
import functools
import hmac
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

from aiohttp import web

from ...node import (AlreadyExists, AuthenticationFailed, CabinetError, Descriptor, NotFound, Principal, TooLarge,
                     TooManyAttempts, UsageError, contact_state)
from . import auth, i18n, lock, patients_pages
from .api import PREVIEW, delivery_json
from .keys import NODE

HERE = Path(__file__).parent
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")
PageHandler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]
PUBLIC_PREFIXES = ("/static/",)


# --- plumbing ----------------------------------------------------------------------------

def lang_of(request: web.Request) -> str:
    return i18n.pick(request.cookies.get(i18n.COOKIE))


def when(ms: int | None, lang: str = "fr") -> str:
    if not ms:
        return "—"
    t = datetime.datetime.fromtimestamp(ms / 1000)
    return t.strftime("%d/%m/%Y %H:%M" if lang == "fr" else "%Y-%m-%d %H:%M")


def day(text: str, lang: str = "fr") -> str:
    """A date of birth YYYY-MM-DD shown as the practice reads it (02/04/1961 in French)."""
    try:
        d = datetime.date.fromisoformat(text)
    except ValueError:
        return text or "—"
    return d.strftime("%d/%m/%Y") if lang == "fr" else d.isoformat()


def size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("o", "Kio", "Mio", "Gio"):
        if value < 1024 or unit == "Gio":
            return f"{value:.0f} {unit}" if unit == "o" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} Gio"


@functools.lru_cache(maxsize=1)
def _templates() -> Any:
    """The Jinja2 environment, made on the first page served (Jinja2 is not loaded by a node whose
    web pages nobody opens). Autoescaped (HTML and XML); an undefined name is an error, not blank."""
    import jinja2
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                              autoescape=jinja2.select_autoescape(("html", "xml"), default=True),
                              undefined=jinja2.StrictUndefined)


def render(request: web.Request, name: str, context: dict, status: int = 200) -> web.Response:
    lang = lang_of(request)
    base = {"t": i18n.translator(lang), "lang": lang, "when": lambda ms: when(ms, lang), "size": size,
            "day": lambda text: day(text, lang),
            "path": request.path}
    html = _templates().get_template(name).render(base | context)
    resp = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
    resp.headers["Referrer-Policy"] = "same-origin"      # so that the page's own posts carry its Origin
    return resp


def page(handler: PageHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Signed-in pages only (a browser session, not an API token); errors become a page."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        who, held = await auth.identify(request) if "Authorization" not in request.headers else (None, None)
        if held is not None:
            raise web.HTTPSeeOther(auth.lock_url(request))      # locked: the password again, nothing else
        if who is None or who.via != "session":
            raise web.HTTPSeeOther("/login")
        request[auth.WHO] = who
        if request.method == "POST":
            form = await request.post()
            if not hmac.compare_digest(str(form.get("csrf", "")).encode(), who.csrf.encode()):
                raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page")
        try:
            return await handler(request, who)
        except CabinetError as exc:
            return await error_page(request, who, exc)
    return wrapped


def status_of(exc: CabinetError) -> int:
    for kind, status in ((TooManyAttempts, 429), (AuthenticationFailed, 401), (NotFound, 404),
                         (AlreadyExists, 409), (TooLarge, 413)):
        if isinstance(exc, kind):
            return status
    return 400


async def error_page(request: web.Request, who: Principal, exc: CabinetError) -> web.Response:
    return render(request, "error.html", await chrome(request, who) | {"message": str(exc).splitlines()[0]},
                  status=status_of(exc))


async def chrome(request: web.Request, who: Principal) -> dict:
    """What every signed-in page shows: who, the CSRF token, the unread badge; the lock time for its script."""
    return {"me": who, "csrf": who.csrf, "unread": await request.app[NODE].unread_count(),
            "lock_ms": request.app[auth.LOCK].lock_ms}


def record_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not _RECORD_ID.match(rid):
        raise web.HTTPNotFound()
    return rid


# --- sign in, sign out, language -------------------------------------------------------------

async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", {"message": "", "account": ""})


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    account, password = str(form.get("account", "")), str(form.get("password", ""))
    node, t = request.app[NODE], i18n.translator(lang_of(request))
    try:
        sid, me = await node.accounts.sign_in(account, password, request.remote or "?")
    except TooManyAttempts as exc:
        return render(request, "login.html", {"message": t("sign_in_wait", s=-(-exc.retry_after_ms // 1000)),
                                              "account": account}, status=429)
    except (AuthenticationFailed, UsageError):
        return render(request, "login.html", {"message": t("sign_in_failed"), "account": account}, status=401)
    request.app[auth.LOCK].seen(sid, me)
    resp = web.HTTPSeeOther("/inbox")
    auth.set_session_cookie(resp, request, sid)
    raise resp


@page
async def logout(request: web.Request, who: Principal) -> web.StreamResponse:
    await request.app[NODE].accounts.sign_out(who)
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(auth.cookie_name(request.app), path="/")
    raise resp


async def set_lang(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    back = str(form.get("back", "/inbox"))
    if not back.startswith("/") or back.startswith("//") or "\\" in back:
        back = "/inbox"
    resp = web.HTTPSeeOther(back)
    resp.set_cookie(i18n.COOKIE, i18n.pick(str(form.get("lang", ""))), path="/", samesite="Strict",
                    max_age=365 * 86400)
    raise resp


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/inbox")


# --- inbox ---------------------------------------------------------------------------------

FILTERS = ("patient", "born", "sender", "since", "until")


_DMY = re.compile(r"^(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})$")


def parse_day(text: str) -> str:
    """A date typed as jj/mm/aaaa (or -, .) or YYYY-MM-DD -> YYYY-MM-DD; "" stays ""."""
    text = text.strip()
    if not text:
        return ""
    m = _DMY.match(text)
    try:
        d = (datetime.date(int(m[3]), int(m[2]), int(m[1])) if m else datetime.date.fromisoformat(text))
    except ValueError:
        raise UsageError("write dates as dd/mm/yyyy (jj/mm/aaaa)") from None
    return d.isoformat()


def _day(text: str, end: bool = False) -> int | None:
    if not text:
        return None
    day = datetime.date.fromisoformat(parse_day(text))
    start = datetime.datetime.combine(day, datetime.time()).timestamp() * 1000
    return int(start + (86_400_000 - 1 if end else 0))


PAGE_SIZE = 100


@page
async def inbox(request: web.Request, who: Principal) -> web.Response:
    if request.method == "GET":
        return await inbox_page(request, who)
    form = await request.post()
    f: dict[str, str] = {k: str(form.get(k, "")).strip() for k in FILTERS}
    unread = bool(form.get("unread"))
    rows = await request.app[NODE].inbox(patient=f["patient"] or None, born=parse_day(f["born"]))
    sender, since, until = f["sender"].casefold(), _day(f["since"]), _day(f["until"], end=True)
    rows = [s for s in rows if (not sender or sender in s.sender_name.casefold() or sender == s.sender.casefold())
            and (since is None or s.created >= since) and (until is None or s.created <= until)
            and (not unread or s.opened is None)]
    rows.sort(key=lambda s: (s.opened is not None, -s.created))       # unread first, newest first
    return render(request, "inbox.html", await chrome(request, who) | {
        "rows": rows, "f": f, "unread_only": unread, "filtered": unread or any(f.values()), "pager": None})


async def inbox_page(request: web.Request, who: Principal) -> web.Response:
    """Unfiltered: one page of PAGE_SIZE, unread first (only that page's summaries are decrypted)."""
    try:
        number = max(1, int(request.query.get("page", "1")))
    except ValueError:
        number = 1
    rows, total, unread = await request.app[NODE].inbox_page((number - 1) * PAGE_SIZE, PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    return render(request, "inbox.html", await chrome(request, who) | {
        "rows": rows, "f": dict.fromkeys(FILTERS, ""), "unread_only": False, "filtered": False,
        "pager": {"page": min(number, pages), "pages": pages, "total": total}, "unread": unread})


# --- a record ----------------------------------------------------------------------------------

def preview_kind(ctype: str) -> str | None:
    ctype = ctype.lower()
    if ctype not in PREVIEW:
        return None
    return "img" if ctype.startswith("image/") else "frame"


@page
async def record(request: web.Request, who: Principal) -> web.Response:
    node, rid = request.app[NODE], record_id(request)
    thread = await node.thread(rid)
    if not who.may("read", letters=True):
        summary = next(s for s in thread if s.id == rid)
        return render(request, "record.html", await chrome(request, who) | {
            "thread": thread, "rid": rid, "summary": summary, "denied": True, "linked": False})
    view = await node.read_as(who, rid)
    ctx = await chrome(request, who) | {"thread": await node.thread(rid), "rid": rid}   # read: no longer unread
    atts = [{"index": i, "name": a.name, "size": a.size, "type": a.type, "preview": preview_kind(a.type),
             "url": f"/api/records/{rid}/attachments/{i}"} for i, a in enumerate(view.manifest.attachments)]
    deliveries = [delivery_json(d) for d in await node.outbox(rid)] if view.summary.direction == "out" else []
    names = {c["node_id"]: c["name"] for c in await node.contacts()} | {node.node_id: node.config.name}
    ctx["to"] = [names.get(r, r) for r in view.recipients]
    return render(request, "record.html", ctx | {"summary": view.summary, "view": view, "atts": atts,
                                                 "deliveries": deliveries, "denied": False,
                                                 "linked": request.query.get("linked") == "1"})


# --- compose and outbox --------------------------------------------------------------------------

def contact_row(c: dict) -> dict:
    d = Descriptor.from_wire(c["descriptor"])
    return {"node_id": c["node_id"], "name": c["name"], "specialty": d.specialty, "city": d.city,
            "rpps": d.rpps, "state": contact_state(c), "verified": bool(c["verified"]), "held": bool(c["held"]),
            "revoked": bool(c["revoked"]), "replaced": bool(c["revoked"]) and not d.revoked}


@page
async def compose(request: web.Request, who: Principal) -> web.Response:
    contacts = [contact_row(c) for c in await request.app[NODE].contacts()]
    usable = [c for c in contacts if not c["held"] and not c["revoked"]]
    return render(request, "compose.html", await chrome(request, who) | {"contacts": usable})


@page
async def outbox(request: web.Request, who: Principal) -> web.Response:
    node = request.app[NODE]
    sent = {s.id: s for s in await node.list_records("out")}
    rows = [delivery_json(d) | {"summary": sent.get(d["record_id"])} for d in await node.outbox()]
    return render(request, "outbox.html", await chrome(request, who) | {"rows": rows})


# --- contacts ----------------------------------------------------------------------------------

async def _contacts_page(request: web.Request, who: Principal, **extra) -> web.Response:
    contacts = [contact_row(c) for c in await request.app[NODE].contacts()]
    contacts.sort(key=lambda c: (not c["held"], c["name"].casefold()))       # loud warnings first
    return render(request, "contacts.html", await chrome(request, who) | {"contacts": contacts, "q": "",
                                                                          "found": None, "note": "",
                                                                          "note_loud": False} | extra)


@page
async def contacts(request: web.Request, who: Principal) -> web.Response:
    return await _contacts_page(request, who)


@page
async def directory(request: web.Request, who: Principal) -> web.Response:
    q = str((await request.post()).get("q", "")).strip()
    if not q:
        raise UsageError("give a name, specialty, city or RPPS number")
    found = await request.app[NODE].directory_search(q)
    known = {c["node_id"] for c in await request.app[NODE].contacts()}
    return await _contacts_page(request, who, q=q, found=[(f, f.descriptor.node_id in known) for f in found])


@page
async def add_contact(request: web.Request, who: Principal) -> web.Response:
    form = await request.post()
    name = str(form.get("name", "")).strip() or None
    c, status = await request.app[NODE].add_contact_as(who, str(form.get("source", "")), name=name)
    t = i18n.translator(lang_of(request))
    note = {"added": t("added"), "held": t("held")}.get(status, t("already"))
    return await _contacts_page(request, who, note=note, note_loud=status == "held", focus=c["node_id"])


@page
async def contact(request: web.Request, who: Principal) -> web.Response:
    node = request.app[NODE]
    c, code = await node.safety_code(request.match_info["node_id"])
    import segno                      # loaded only when a QR code is drawn
    qr = segno.make(node.descriptor.to_text(), error="m").svg_inline(scale=3, border=2,
                                                                     title="QR", svgclass="qr")
    return render(request, "contact.html", await chrome(request, who) | {
        "c": contact_row(c), "code": code, "qr": qr})


@page
async def contact_action(request: web.Request, who: Principal) -> web.StreamResponse:
    node, ref = request.app[NODE], request.match_info["node_id"]
    action = request.match_info["action"]
    if action == "verify":
        await node.verify_contact(ref)
    elif action == "confirm":
        await node.confirm_contact(ref)
    else:
        raise web.HTTPNotFound()
    raise web.HTTPSeeOther(f"/contacts/{ref}")


# --- status --------------------------------------------------------------------------------------

@page
async def status(request: web.Request, who: Principal) -> web.Response:
    node = request.app[NODE]
    s = await node.status_report()
    return render(request, "status.html", await chrome(request, who) | {
        "s": s, "audit_ok": s["audit_ok"], "audit_bad": s["audit_bad"]})


@page
async def audit_head(request: web.Request, who: Principal) -> web.Response:
    text = await request.app[NODE].signed_audit_head()
    return web.Response(text=text + "\n", content_type="text/plain", headers={
        "Content-Disposition": 'attachment; filename="cabinet-audit-head.txt"'})


# --- mounting ------------------------------------------------------------------------------------

PUBLIC = {("GET", "/"), ("GET", "/login"), ("POST", "/login"), ("POST", "/lang")}    # no session needed
PAGES: list[tuple[str, str, Callable]] = [
    ("GET", "/", home), ("GET", "/login", login_form), ("POST", "/login", login), ("POST", "/logout", logout),
    ("POST", "/lang", set_lang), ("GET", "/inbox", inbox), ("POST", "/inbox", inbox),
    ("GET", "/records/{id}", record), ("GET", "/compose", compose), ("GET", "/outbox", outbox),
    ("GET", "/contacts", contacts), ("POST", "/contacts/search", directory), ("POST", "/contacts/add", add_contact),
    ("GET", "/contacts/{node_id}", contact), ("POST", "/contacts/{node_id}/{action}", contact_action),
    ("GET", "/status", status), ("GET", "/status/audit-head", audit_head),
    *lock.ROUTES,                        # /lock: its own session checks (lock.py)
]


def mount(app: web.Application) -> None:
    """Add the pages and /static/ to the API's app; templates are autoescaped (HTML and XML)."""
    ui = SimpleNamespace(page=page, render=render, chrome=chrome, lang_of=lang_of, contact_row=contact_row,
                         record_id=record_id)
    app[auth.LOCK] = auth.SessionLock(app[NODE].accounts)
    app[lock.RENDER] = render
    for method, path, handler in PAGES + patients_pages.routes(ui):
        app.router.add_route(method, path, handler)
    app.router.add_static("/static/", HERE / "static", append_version=False)
