"""The practice's patient pages: enrol (and print the card), link a record, grants and history, break-glass.

Practitioners only (a secretary is shown a one-line refusal, 403). Every action goes
through one facade method that names the account in the audit log beside the patient
service's own sealed entry (node.enroll_as, link_as, patient_view, break_glass_as).
Patient references are numbers chosen never to be names (core/audit_docs.check_ref),
so `/patients/{ref}` holds no patient data; the card itself (its recovery phrase signs
grants) is shown once, in the answer to the enrol POST, never at a URL, never cached.
"""

from __future__ import annotations

import json
import re

from types import SimpleNamespace
from typing import Awaitable, Callable

from aiohttp import web

from ...node import ANY_REQUESTER, Principal
from . import i18n
from .keys import NODE

_REF = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[SimpleNamespace, web.Request, Principal], Awaitable[web.StreamResponse]]
# pages.py's plumbing (page, render, chrome, lang_of, contact_row, record_id) is handed in by
# pages.mount through `routes(ui)`: this module does not import pages.py (no import cycle).


def routes(ui: SimpleNamespace) -> list[tuple[str, str, Callable]]:
    """The patient pages, each wrapped by ui.page (a session, CSRF) and refused to non-practitioners."""
    def only(handler: Handler) -> Callable:
        async def wrapped(request: web.Request, who: Principal) -> web.StreamResponse:
            if who.role != "practitioner":
                t = i18n.translator(ui.lang_of(request))
                return ui.render(request, "error.html", await ui.chrome(request, who)
                                 | {"message": t("practitioners_only")}, status=403)
            return await handler(ui, request, who)
        wrapped.__name__ = handler.__name__
        return ui.page(wrapped)
    return [(method, path, only(handler)) for method, path, handler in PAGES]


def describe(entry: dict) -> dict:
    """A history entry's opened details, as the columns the page shows (the service wrote them as JSON)."""
    try:
        d = json.loads(entry.get("detail") or "{}")
    except ValueError:
        d = {}
    d = d if isinstance(d, dict) else {}
    return {"seq": entry.get("seq"), "at": entry.get("at"), "event": entry.get("event"),
            "record": entry.get("record") or "", "peer": entry.get("peer") or "",
            "grant": d.get("grant") or "", "emergency": bool(d.get("emergency")),
            "why": d.get("reason") or d.get("why") or "", "scope": d.get("scope") or ""}


# --- the patients page ---------------------------------------------------------------------

async def _patients_page(ui: SimpleNamespace, request: web.Request, who: Principal, **extra) -> web.Response:
    node = request.app[NODE]
    contacts = [ui.contact_row(c) for c in await node.contacts()]
    names = {c["node_id"]: c["name"] for c in contacts}
    policy = [{"requester": r["requester"], "since": r["since"],
               "name": None if r["requester"] == ANY_REQUESTER else names.get(r["requester"], r["requester"])}
              for r in await node.patients.break_glass_policy()]
    flagged = [describe(e) | {"peer_name": names.get(e.get("peer") or "", e.get("peer") or "")}
               for e in await node.patients.flagged()]
    return ui.render(request, "patients.html", await ui.chrome(request, who) | {
        "patients": await node.patients_list(), "contacts": [c for c in contacts if not c["revoked"]],
        "policy": policy, "flagged": flagged[:50], "note": ""} | extra)


async def patients(ui: SimpleNamespace, request: web.Request, who: Principal) -> web.Response:
    return await _patients_page(ui, request, who)


async def enroll(ui: SimpleNamespace, request: web.Request, who: Principal) -> web.Response:
    ref = str((await request.post()).get("ref", "")).strip()
    card = await request.app[NODE].enroll_as(who, ref or None)
    import segno                      # loaded only when a QR code is drawn
    qr = segno.make(card.qr_payload(), error="m").svg_inline(scale=3, border=2, title="QR", svgclass="qr")
    return ui.render(request, "card.html", await ui.chrome(request, who) | {"card": card, "text": card.to_text(),
                                                                       "qr": qr})


async def patient(ui: SimpleNamespace, request: web.Request, who: Principal) -> web.Response:
    ref = request.match_info["ref"]
    if not _REF.match(ref):
        raise web.HTTPNotFound()
    node = request.app[NODE]
    view = await node.patient_view(who, ref)
    names = {c["node_id"]: c["name"] for c in await node.contacts()} | {node.node_id: node.config.name}
    history = [describe(e) | {"peer_name": names.get(e.get("peer") or "", e.get("peer") or "")}
               for e in view["history"]["entries"]]
    grants = [g | {"audience_name": names.get(g["audience"], g["audience"])} for g in view["grants"]]
    return ui.render(request, "patient.html", await ui.chrome(request, who) | {
        "p": view["patient"], "records": view["records"], "grants": grants, "history": history,
        "signed": view["history"]})


async def break_glass(ui: SimpleNamespace, request: web.Request, who: Principal) -> web.Response:
    form = await request.post()
    requester, action = str(form.get("requester", "")).strip(), str(form.get("action", ""))
    if action not in ("allow", "deny") or not requester:
        raise web.HTTPBadRequest(text="choose a colleague (or any) and allow or deny")
    await request.app[NODE].break_glass_as(who, requester, action == "allow")
    raise web.HTTPSeeOther("/patients")


async def link(ui: SimpleNamespace, request: web.Request, who: Principal) -> web.Response:
    rid = ui.record_id(request)
    form = await request.post()
    ref, category = str(form.get("patient", "")).strip(), str(form.get("category", "")).strip()
    await request.app[NODE].link_as(who, rid, ref, category or None)
    raise web.HTTPSeeOther(f"/records/{rid}?linked=1")


PAGES: list[tuple[str, str, Handler]] = [
    ("GET", "/patients", patients), ("POST", "/patients/enroll", enroll),
    ("POST", "/patients/break-glass", break_glass), ("GET", "/patients/{ref}", patient),
    ("POST", "/records/{id}/link", link),
]
