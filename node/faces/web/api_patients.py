"""The local API's patient routes (token scope `patients`; sessions: practitioners only).

The same five things the patient pages do (patients_pages.py), as JSON: list and enrol
patients (the card, with its recovery phrase, is given once in the enrol answer, never
at a URL), link a stored record to a patient, one patient's records, grants (and their
revocations) and signed access history, and the break-glass policy with the emergency
accesses to review. Each change goes through the facade method that names the account or
token in the audit log (enroll_as, link_as, patient_view, break_glass_as). URLs hold only
patient references, which are numbers chosen never to be names (check_ref), and record IDs.
The route table entries are in api.py's ROUTES; this module does not import api.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ...node import ANY_REQUESTER, UsageError
from ...node import consent
from . import auth
from .keys import NODE
from .patients_pages import describe

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")


def plain(value: Any) -> Any:
    """A value as JSON holds it: bytes (keys, hashes) as lowercase hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _text(body: dict, name: str) -> str | None:
    """An optional text field of a JSON body, stripped."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"give \"{name}\" as text")
    return value.strip() if value is not None else None


def _required(body: dict, name: str) -> str:
    value = _text(body, name)
    if not value:
        raise UsageError(f"give \"{name}\" as text")
    return value


def _ref_of(request: web.Request) -> str:
    ref = request.match_info["ref"]
    if not _REF.match(ref):
        raise UsageError("a patient reference is 1-64 letters, digits, '.', '_' or '-' (a number, never a name)")
    return ref


def entry_json(e: dict, names: dict[str, str]) -> dict:
    """One audit entry about a patient, its sealed details opened (the columns the patient page shows)."""
    try:
        details = json.loads(e.get("detail") or "{}")
    except ValueError:
        details = {}
    out = describe(e) | {"peer_name": names.get(e.get("peer") or ""),
                         "details": details if isinstance(details, dict) else {}}
    if e.get("hash") is not None:
        out["hash"] = plain(e["hash"])
    return out


async def _names(request: web.Request) -> dict[str, str]:
    node = request.app[NODE]
    return {c["node_id"]: c["name"] for c in await node.contacts()} | {node.node_id: node.config.name}


# --- patients -------------------------------------------------------------------------------

async def patients(request: web.Request) -> web.Response:
    rows = await request.app[NODE].patients_list()
    return web.json_response({"patients": [r | {"url": f"/api/patients/{r['patient_ref']}"} for r in rows]})


async def enroll(request: web.Request) -> web.Response:
    body = await auth._json(request)
    ref = _text(body, "ref")
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise UsageError("\"replace\" is true or false (true: a new key for a patient who lost the card)")
    card = await request.app[NODE].enroll_as(auth.who(request), ref or None, replace=replace)
    url = f"/api/patients/{card.patient_ref}"
    return web.json_response({
        "patient_ref": card.patient_ref, "key_id": card.key_id, "practice": card.practice,
        "public": consent.k4_public(card.public_key), "recovery": card.phrase, "text": card.to_text(),
        "qr": card.qr_payload(), "url": url}, status=201, headers={"Location": url})


async def patient(request: web.Request) -> web.Response:
    view = await request.app[NODE].patient_view(auth.who(request), _ref_of(request))
    p, signed, names = view["patient"], view["history"], await _names(request)
    entries = [entry_json(e, names) for e in signed["entries"]]
    return web.json_response({
        "patient": {"patient_ref": p["patient_ref"], "key_id": p["key_id"], "public": consent.k4_public(p["public_key"]),
                    "enrolled": p["enrolled"], "updated": p["updated"]},
        "records": [r | {"url": f"/api/records/{r['record_id']}"} for r in view["records"]],
        "grants": [plain(g) | {"audience_name": names.get(g["audience"])} for g in view["grants"]],
        "revocations": [{"grant": e["grant"], "at": e["at"], "seq": e["seq"], "peer": e["peer"]}
                        for e in entries if e["event"] == "grant-revoked"],
        "history": {"practice": signed["practice"], "patient": signed["patient"], "at": signed["at"],
                    "seq": signed["seq"], "hash": plain(signed["hash"]), "sign_key": plain(signed["sign_key"]),
                    "entries": entries}})


async def link(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not _RECORD_ID.match(rid):
        raise UsageError("a record ID is 32 lowercase hexadecimal characters")
    body = await auth._json(request)
    ref, category = _required(body, "patient"), _text(body, "category")
    record_id = await request.app[NODE].link_as(auth.who(request), rid, ref, category or None)
    return web.json_response({"record_id": record_id, "patient_ref": ref, "category": category or None,
                              "url": f"/api/patients/{ref}"})


# --- break-glass ----------------------------------------------------------------------------

async def break_glass(request: web.Request) -> web.Response:
    node, names = request.app[NODE], await _names(request)
    policy = [{"requester": r["requester"], "since": r["since"],              # ANY_REQUESTER is "*"
               "name": None if r["requester"] == ANY_REQUESTER else names.get(r["requester"])}
              for r in await node.patients.break_glass_policy()]
    flagged = [entry_json(e, names) for e in await node.patients.flagged()]
    return web.json_response({"policy": policy, "flagged": flagged})


async def set_break_glass(request: web.Request) -> web.Response:
    body = await auth._json(request)
    requester, allow = _required(body, "requester"), body.get("allow")
    if not isinstance(allow, bool):
        raise UsageError("give \"allow\": true (allow emergency requests without a grant) or false (stop)")
    await request.app[NODE].break_glass_as(auth.who(request), requester, allow)
    return await break_glass(request)
