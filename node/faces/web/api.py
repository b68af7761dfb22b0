"""The local API's route table and its handlers: read the request, call one Node method, answer JSON.

`ROUTES` is the one list of routes: server.py registers it, auth.py reads each
route's `scope` (what an API token must hold), `letters` (the route opens a
record's content: practitioners only) and `public`, and openapi.py describes it.
URLs this API hands out hold record IDs and indexes only, never patient data.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from ...node import CabinetError, Descriptor, Summary, UsageError, contact_state
from . import api_admin, api_patients, auth, stream, upload
from .keys import NODE

log = logging.getLogger("cabinet.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")
PREVIEW = {"application/pdf", "image/png", "image/jpeg", "image/gif", "image/webp", "text/plain"}
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Param:
    name: str
    where: str                       # "query" or "path"
    type: str                        # a JSON Schema type
    description: str
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    scope: str | None = None         # an API token must hold it; None: any signed-in caller
    letters: bool = False            # opens a record's letter or attachments: not for secretaries
    public: bool = False             # no credentials needed
    params: tuple[Param, ...] = ()
    body: str | None = None          # a schema name in openapi.py
    answer: str = "Ok"               # a schema name in openapi.py
    status: int = 200
    media: str = "application/json"


# --- helpers -----------------------------------------------------------------------

def record_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    if not _RECORD_ID.match(rid):
        raise UsageError("a record ID is 32 lowercase hexadecimal characters")
    return rid


def summary_json(s: Summary) -> dict:
    return {"id": s.id, "direction": s.direction, "kind": s.kind, "sender": s.sender, "sender_name": s.sender_name,
            "created": s.created, "patient": s.patient, "born": s.born, "subject": s.subject,
            "attachments": [{"name": n, "size": size} for n, size in s.attachments], "thread": s.thread,
            "reply_to": s.reply_to, "opened": s.opened, "url": f"/api/records/{s.id}"}


def delivery_json(d: dict) -> dict:
    size = d.get("body_size") or 0
    done = d["state"] == "delivered"
    return {"record_id": d["record_id"], "recipient": d["recipient"], "recipient_name": d.get("recipient_name"),
            "state": d["state"], "reason": d.get("last_error") or "", "attempts": d["attempts"],
            "sent_bytes": d["sent_bytes"], "size": size,
            "percent": 100 if done else (min(99, d["sent_bytes"] * 100 // size) if size else 0),
            "created": d.get("created"), "updated": d["updated"], "delivered": d.get("delivered"),
            "opened": d.get("opened"), "stale": bool(d.get("stale"))}


def _when(text: str | None, end: bool = False) -> int | None:
    """Unix ms, or a day YYYY-MM-DD (local time: its start, or its end for `until`)."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        day = datetime.date.fromisoformat(text)
    except ValueError:
        raise UsageError("since/until take Unix milliseconds or a day YYYY-MM-DD") from None
    start = datetime.datetime.combine(day, datetime.time()).timestamp() * 1000
    return int(start + (86_400_000 - 1 if end else 0))


def _int(text: str | None, default: int, name: str, top: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or int(text) > top:
        raise UsageError(f"{name} is a whole number up to {top}")
    return int(text)


def _flag(text: str | None) -> bool:
    return (text or "").lower() in ("1", "true", "yes")


# --- records -----------------------------------------------------------------------

async def inbox(request: web.Request) -> web.Response:
    node, q = request.app[NODE], request.query
    rows = await node.inbox(patient=q.get("patient") or None, born=q.get("born", ""))
    sender = q.get("sender", "").strip().casefold()
    since, until = _when(q.get("since")), _when(q.get("until"), end=True)
    unread = _flag(q.get("unread"))
    rows = [s for s in rows if (not sender or sender in (s.sender.casefold(), s.sender_name.casefold()))
            and (since is None or s.created >= since) and (until is None or s.created <= until)
            and (not unread or s.opened is None)]
    offset, limit = _int(q.get("offset"), 0, "offset", 10**9), _int(q.get("limit"), 200, "limit", MAX_LIMIT)
    return web.json_response({"total": len(rows), "records": [summary_json(s) for s in rows[offset:offset + limit]]})


async def record(request: web.Request) -> web.Response:
    node = request.app[NODE]
    view = await node.read_as(auth.who(request), record_id(request))
    s, m = view.summary, view.manifest
    out = summary_json(s) | {
        "letter": m.letter, "data": m.data, "recipients": list(view.recipients),
        "attachments": [{"index": i, "name": a.name, "size": a.size, "type": a.type,
                         "url": f"/api/records/{s.id}/attachments/{i}"} for i, a in enumerate(m.attachments)]}
    if s.direction == "out":
        out["deliveries"] = [delivery_json(d) for d in await node.outbox(s.id)]
    return web.json_response(out)


def _disposition(name: str, inline: bool) -> str:
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", name)[:100] or "attachment"
    return f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def attachment(request: web.Request) -> web.StreamResponse:
    node, rid = request.app[NODE], record_id(request)
    index = int(request.match_info["n"])
    inline = _flag(request.query.get("inline"))
    att, pieces = await node.attachment_as(auth.who(request), rid, index)
    ctype = att.type.lower() if _MIME.match(att.type.lower()) else "application/octet-stream"
    if inline and ctype not in PREVIEW:
        await pieces.aclose()
        raise UsageError("only PDF, images and plain text are shown in the browser: download this one")
    resp = web.StreamResponse(headers={
        "Content-Type": "text/plain; charset=utf-8" if ctype == "text/plain" else ctype,
        "Content-Disposition": _disposition(att.name, inline)})
    if inline:
        resp.headers["Content-Security-Policy"] = ("default-src 'none'; object-src 'self'" if ctype == "application/pdf"
                                                   else "default-src 'none'; img-src 'self'; sandbox")
    resp.content_length = att.size
    await resp.prepare(request)
    try:
        async for piece in pieces:
            await resp.write(piece)
    except CabinetError as exc:          # found damaged while streaming: cut the connection short
        log.warning("record %s: attachment %d could not be decrypted (%s)", rid, index, exc.__class__.__name__)
        if request.transport is not None:
            request.transport.abort()
        return resp
    await resp.write_eof()
    return resp


async def thread(request: web.Request) -> web.Response:
    rows = await request.app[NODE].thread(record_id(request))
    return web.json_response({"records": [summary_json(s) for s in rows]})


def _sent(result) -> web.Response:
    return web.json_response({"record_id": result.record_id, "deliveries": result.deliveries,
                              "url": f"/api/records/{result.record_id}"}, status=202,
                             headers={"Location": f"/api/records/{result.record_id}"})


async def send_referral(request: web.Request) -> web.Response:
    node = request.app[NODE]
    up = await upload.receive(request, node.incoming)
    try:
        result = await node.send_as(auth.who(request), to=up.many("to"), patient=up.one("patient"),
                                    born=up.one("born"), subject=up.one("subject"), letter=up.letter(),
                                    attachments=up.files, data=up.one("data"))
    finally:
        await asyncio.to_thread(up.remove)
    return _sent(result)


async def reply(request: web.Request) -> web.Response:
    node, rid = request.app[NODE], record_id(request)
    up = await upload.receive(request, node.incoming)
    try:
        subject = up.one("subject") if "subject" in up.fields else None
        result = await node.reply_as(auth.who(request), rid, letter=up.letter(), attachments=up.files,
                                     subject=subject)
    finally:
        await asyncio.to_thread(up.remove)
    return _sent(result)


async def outbox(request: web.Request) -> web.Response:
    rows = await request.app[NODE].outbox()
    return web.json_response({"deliveries": [delivery_json(d) for d in rows]})


# --- contacts, directory, status ---------------------------------------------------------

def contact_json(c: dict) -> dict:
    d = Descriptor.from_wire(c["descriptor"])
    return {"node_id": c["node_id"], "name": c["name"], "specialty": d.specialty, "city": d.city, "rpps": d.rpps,
            "state": contact_state(c), "verified": bool(c["verified"]), "held": bool(c["held"]),
            "revoked": bool(c["revoked"]), "added": c["added"]}


async def contacts(request: web.Request) -> web.Response:
    return web.json_response({"contacts": [contact_json(c) for c in await request.app[NODE].contacts()]})


async def add_contact(request: web.Request) -> web.Response:
    body = await auth._json(request)
    source = body.get("source")
    if not isinstance(source, str) or not source.strip():
        raise UsageError("give \"source\": a node ID, a descriptor's text, or an http:// address (with \"id\")")
    expect, name = body.get("id"), body.get("name")
    if not all(v is None or isinstance(v, str) for v in (expect, name)):
        raise UsageError("\"id\" and \"name\" are text")
    c, status = await request.app[NODE].add_contact_as(auth.who(request), source, name=name, expect_id=expect)
    out = {"contact": contact_json(c), "status": status}
    if status == "held":
        out["warning"] = ("a colleague you know under another identity key: nothing is sent to this key until "
                          "you compare the safety code and confirm it")
    return web.json_response(out, status=201 if status == "added" else 200)


async def directory(request: web.Request) -> web.Response:
    q = request.query.get("q", "").strip()
    if not q:
        raise UsageError("give q: a name, specialty, city or RPPS number")
    found = await request.app[NODE].directory_search(q)
    return web.json_response({"results": [
        {"node_id": f.descriptor.node_id, "name": f.descriptor.name, "specialty": f.descriptor.specialty,
         "city": f.descriptor.city, "rpps": f.descriptor.rpps, "conflict": list(f.conflict)} for f in found]})


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[NODE].status())


async def openapi_json(request: web.Request) -> web.Response:
    from .openapi import document
    return web.json_response(document(ROUTES))


# --- the table -----------------------------------------------------------------------

_ID = Param("id", "path", "string", "a record ID (32 hexadecimal characters)", True)
_REF = Param("ref", "path", "string", "a patient reference (a number the practice gives, never a name)", True)
_FILTERS = (Param("patient", "query", "string", "words of the patient's name, any order, case or accents"),
            Param("born", "query", "string", "date of birth YYYY-MM-DD"),
            Param("sender", "query", "string", "the sender's node ID or contact name"),
            Param("since", "query", "string", "Unix ms or YYYY-MM-DD"),
            Param("until", "query", "string", "Unix ms or YYYY-MM-DD (the whole day)"),
            Param("unread", "query", "boolean", "only records not opened yet"),
            Param("offset", "query", "integer", "skip this many"),
            Param("limit", "query", "integer", f"at most this many (default 200, up to {MAX_LIMIT})"))

ROUTES: list[Route] = [
    Route("POST", "/api/session", auth.sign_in, "sign in with an account and password (sets the session cookie)",
          public=True, body="SignIn", answer="Me"),
    Route("GET", "/api/session", auth.session_info, "who is calling, and the session's CSRF token", answer="Me"),
    Route("DELETE", "/api/session", auth.sign_out, "sign out (ends the session)"),
    Route("GET", "/api/inbox", inbox, "received records, newest first", "read", params=_FILTERS, answer="Records"),
    Route("GET", "/api/records/{id}", record, "a record's letter, details and attachments (audited as a read)",
          "read", letters=True, params=(_ID,), answer="Record"),
    Route("GET", r"/api/records/{id}/attachments/{n:\d+}", attachment, "one attachment, decrypted as it streams",
          "read", letters=True, answer="File", media="application/octet-stream",
          params=(_ID, Param("n", "path", "integer", "the attachment's index, from 0", True),
                  Param("inline", "query", "boolean", "show in the browser (PDF, images, plain text only)"))),
    Route("GET", "/api/records/{id}/thread", thread, "the records of a referral's thread", "read", params=(_ID,),
          answer="Records"),
    Route("POST", "/api/referrals", send_referral, "seal and queue a referral; delivery continues in the node",
          "send", body="Referral", answer="Sent", status=202),
    Route("POST", "/api/records/{id}/reply", reply, "send the report back in the same thread", "send",
          letters=True, params=(_ID,), body="Reply", answer="Sent", status=202),
    Route("GET", "/api/outbox", outbox, "per recipient: queued (and why), sending (percent), delivered, opened",
          "read", answer="Deliveries"),
    Route("GET", "/api/contacts", contacts, "colleagues and their trust state", "contacts", answer="Contacts"),
    Route("POST", "/api/contacts", add_contact, "add a colleague by node ID, descriptor text or address",
          "contacts", body="NewContact", answer="ContactAdded", status=201),
    Route("GET", "/api/directory", directory, "search the bootstraps' directory", "contacts",
          params=(Param("q", "query", "string", "name, specialty, city or RPPS", True),), answer="Directory"),
    Route("GET", "/api/status", status, "the node at a glance", "read", answer="Status"),
    Route("GET", "/api/events", stream.events, "live events (Server-Sent Events): IDs and states only", "read",
          answer="EventStream", media="text/event-stream"),
    # patients (api_patients.py): scope `patients`; `letters`: a secretary's session is refused, as on the pages
    Route("GET", "/api/patients", api_patients.patients, "the enrolled patients: reference, key ID, enrolled",
          "patients", letters=True, answer="Patients"),
    Route("POST", "/api/patients", api_patients.enroll, "enrol a patient; the card (with its recovery phrase) is "
          "given once, in this answer", "patients", letters=True, body="Enrol", answer="PatientCard", status=201),
    Route("GET", "/api/patients/{ref}", api_patients.patient, "one patient's records, grants, revocations and "
          "signed access history (audited)", "patients", letters=True, params=(_REF,), answer="Patient"),
    Route("POST", "/api/records/{id}/link", api_patients.link, "link a stored record to an enrolled patient",
          "patients", letters=True, params=(_ID,), body="Link", answer="Linked"),
    Route("GET", "/api/break-glass", api_patients.break_glass, "the break-glass policy, and the emergency "
          "accesses and refusals to review", "patients", letters=True, answer="BreakGlass"),
    Route("POST", "/api/break-glass", api_patients.set_break_glass, "allow (or stop allowing) emergency requests "
          "without a grant from a colleague, or any (\"*\")", "patients", letters=True, body="BreakGlassChange",
          answer="BreakGlass"),
    # administration (api_admin.py): scope `admin`; any signed-in account, as the status page
    Route("GET", "/api/admin/status", api_admin.status, "GET /api/status and the audit chain's state, port "
          "mapping, relays, bootstraps, LAN peers, open alerts", "admin", answer="AdminStatus"),
    Route("GET", "/api/admin/audit-head", api_admin.audit_head, "the audit chain's head signed by this practice "
          "(a text download)", "admin", answer="AuditHead", media="text/plain"),
    Route("POST", "/api/admin/audit-head/verify", api_admin.verify_head, "is the audit log intact and still an "
          "extension of a head signed earlier?", "admin", body="HeadToVerify", answer="HeadVerified"),
    Route("GET", "/api/openapi.json", openapi_json, "this document", public=True, answer="OpenAPI"),
]
