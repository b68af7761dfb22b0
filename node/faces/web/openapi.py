"""The OpenAPI 3.1 document of the local API, generated from api.ROUTES and the schemas below.

Every route of the table appears (a test checks it against the router), with its
parameters, request body, answer, and the credentials it takes: a session cookie
(with X-CSRF-Token on changes) or an API token whose scope is named in
`x-cabinet-scope`. Routes closed to a secretary's session (a record's content, the
patient routes) say `x-cabinet-letters`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

S = "#/components/schemas/"
_str, _int, _bool = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_nullable_int = {"type": ["integer", "null"]}


def _obj(required: Sequence[str] = (), **props: Any) -> dict:
    return {"type": "object", "properties": props, "required": list(required)}


def _ref(name: str) -> dict:
    return {"$ref": S + name}


SUMMARY = _obj(["id", "direction", "kind", "sender", "created", "patient"],
               id=_str, direction={"enum": ["in", "out"]}, kind=_str, sender=_str, sender_name=_str, created=_int,
               patient=_str, born=_str, subject=_str, thread=_str, reply_to={"type": ["string", "null"]},
               opened=_nullable_int, url=_str,
               attachments={"type": "array", "items": _obj(["name", "size"], name=_str, size=_int)})
DELIVERY = _obj(["record_id", "recipient", "state"], record_id=_str, recipient=_str,
                recipient_name={"type": ["string", "null"]},
                state={"enum": ["queued", "sending", "delivered", "refused"]}, reason=_str, attempts=_int,
                sent_bytes=_int, size=_int, percent=_int, created=_nullable_int, updated=_int,
                delivered=_nullable_int, opened=_nullable_int, stale=_bool)
CONTACT = _obj(["node_id", "name", "state"], node_id=_str, name=_str, specialty=_str, city=_str, rpps=_str,
               state=_str, verified=_bool, held=_bool, revoked=_bool, added=_int)
_files = {"type": "array", "items": {"type": "string", "contentMediaType": "application/octet-stream"}}

SCHEMAS: dict[str, dict] = {
    "Error": _obj(["error"], error=_str),
    "Ok": {"type": "object"},
    "SignIn": _obj(["account", "password"], account=_str, password={"type": "string", "format": "password"}),
    "Me": _obj(["account", "role", "via"], account=_str, role={"enum": ["practitioner", "secretary", "token"]},
               via={"enum": ["session", "token"]}, scopes={"type": "array", "items": _str}, csrf=_str,
               idle_seconds=_int),
    "Summary": SUMMARY,
    "Records": _obj(["records"], total=_int, records={"type": "array", "items": _ref("Summary")}),
    "Record": {"allOf": [_ref("Summary"), _obj(
        ["letter", "attachments"], letter=_str, data=_str, recipients={"type": "array", "items": _str},
        attachments={"type": "array", "items": _obj(["index", "name", "size", "type", "url"], index=_int, name=_str,
                                                    size=_int, type=_str, url=_str)},
        deliveries={"type": "array", "items": _ref("Delivery")})]},
    "File": {"type": "string", "contentMediaType": "application/octet-stream"},
    "Referral": _obj(["to", "patient"], to={"type": "array", "items": _str, "description": "contact names or node IDs"},
                     patient=_str, born={"type": "string", "format": "date"}, subject=_str, data=_str,
                     letter={"description": "the letter as text, or a file (PDF, Word: sent as the first attachment)"},
                     attachments=_files),
    "Reply": _obj([], subject=_str, letter={"description": "text, or a file"}, attachments=_files),
    "Sent": _obj(["record_id", "deliveries"], record_id=_str, url=_str,
                 deliveries={"type": "object", "additionalProperties": {"type": "string"}}),
    "Delivery": DELIVERY,
    "Deliveries": _obj(["deliveries"], deliveries={"type": "array", "items": _ref("Delivery")}),
    "Contact": CONTACT,
    "Contacts": _obj(["contacts"], contacts={"type": "array", "items": _ref("Contact")}),
    "NewContact": _obj(["source"], source={"type": "string", "description": "a node ID, a descriptor's text (even "
                                           "inside an e-mail), or an http:// address"},
                       id={"type": "string", "description": "the node ID expected (required with an address)"},
                       name=_str),
    "ContactAdded": _obj(["contact", "status"], contact=_ref("Contact"), warning=_str,
                         status={"enum": ["added", "updated", "unchanged", "held", "revoked"]}),
    "Directory": _obj(["results"], results={"type": "array", "items": _obj(
        ["node_id", "name"], node_id=_str, name=_str, specialty=_str, city=_str, rpps=_str,
        conflict={"type": "array", "items": _str})}),
    "Status": _obj(["node_id", "name"], node_id=_str, name=_str, addresses={"type": "array", "items": _str},
                   queued=_int, oldest_undelivered=_nullable_int, disk_free=_int, serving=_bool),
    # patients (api_patients.py)
    "PatientRow": _obj(["patient_ref", "key_id"], patient_ref=_str, key_id=_str, enrolled=_int, updated=_int, url=_str),
    "Patients": _obj(["patients"], patients={"type": "array", "items": _ref("PatientRow")}),
    "Enrol": _obj([], ref={"type": "string", "description": "the practice's reference for the patient (1-64 "
                           "letters, digits, '.', '_', '-': a number, never a name); one is made when absent"},
                  replace={"type": "boolean", "description": "a new key for an enrolled patient who lost the card"}),
    "PatientCard": _obj(["patient_ref", "key_id", "text"], patient_ref=_str, key_id=_str, practice=_str, public=_str,
                        recovery={"type": ["string", "null"], "description": "the recovery phrase: given only here"},
                        text={"type": "string", "description": "the card as text, to print"},
                        qr={"type": "string", "description": "what the card's QR code holds"}, url=_str),
    "Grant": _obj(["audience", "jti"], audience=_str, audience_name={"type": ["string", "null"]}, jti=_str,
                  scope=_str, expires=_str, first_used=_int, last_used=_int, uses=_int, revoked=_nullable_int),
    "HistoryEntry": _obj(["seq", "at", "event"], seq=_int, at=_int, event=_str, record=_str, peer=_str,
                         peer_name={"type": ["string", "null"]}, grant=_str, emergency=_bool, why=_str, scope=_str,
                         hash={"type": "string", "description": "the entry's chain hash (hex)"},
                         details={"type": "object"}),
    "Patient": _obj(["patient", "records", "grants", "revocations", "history"],
                    patient=_obj(["patient_ref", "key_id"], patient_ref=_str, key_id=_str, public=_str,
                                 enrolled=_int, updated=_int),
                    records={"type": "array", "items": _obj(["record_id"], record_id=_str,
                                                            category={"type": ["string", "null"]}, url=_str)},
                    grants={"type": "array", "items": _ref("Grant")},
                    revocations={"type": "array", "items": _obj(["grant", "at"], grant=_str, at=_int, seq=_int,
                                                                peer=_str)},
                    history=_obj(["practice", "seq", "hash", "entries"], practice=_str, patient=_str, at=_int,
                                 seq=_int, hash=_str, sign_key=_str,
                                 entries={"type": "array", "items": _ref("HistoryEntry")})),
    "Link": _obj(["patient"], patient={"type": "string", "description": "the patient's reference"},
                 category={"type": "string", "description": "e.g. cardiologie"}),
    "Linked": _obj(["record_id", "patient_ref"], record_id=_str, patient_ref=_str,
                   category={"type": ["string", "null"]}, url=_str),
    "BreakGlass": _obj(["policy", "flagged"],
                       policy={"type": "array", "items": _obj(["requester", "since"], requester={
                           "type": "string", "description": "a node ID, or \"*\": any colleague"}, since=_int,
                           name={"type": ["string", "null"]})},
                       flagged={"type": "array", "items": _ref("HistoryEntry")}),
    "BreakGlassChange": _obj(["requester", "allow"], requester={"type": "string", "description": "a contact's name "
                             "or node ID, or \"*\" for any"}, allow=_bool),
    # administration (api_admin.py)
    "AdminStatus": {"allOf": [_ref("Status"), _obj(
        ["audit_ok", "audit"], audit_ok=_bool, audit_bad=_nullable_int,
        audit=_obj(["intact"], intact=_bool, broken_at=_nullable_int, head_url=_str),
        port_mapping={"type": "object"}, bootstraps={"type": "array", "items": _str},
        relays={"type": "array", "items": _obj(["url"], url=_str, registered=_bool, sessions=_int,
                                              last_error={"type": ["string", "null"]})},
        lan={"type": ["array", "null"], "description": "null: this node does not run its LAN discovery",
             "items": _obj(["node_id"], node_id=_str, name=_str, url=_str, verified=_bool, last_seen=_int)},
        alerts={"type": "array", "items": {"type": "object"}})]},
    "AuditHead": {"type": "string", "description": "cabinet-audit-head:<base64url>, signed by this practice"},
    "HeadToVerify": _obj(["head"], head={"type": "string", "description": "cabinet-audit-head:..."}),
    "HeadVerified": _obj(["ok", "detail"], ok=_bool, detail=_str),
    "EventStream": {"type": "string", "description": "text/event-stream; events RecordReceived, RecordStored, "
                    "DeliveryChanged (with percent), RecordOpened, KeyChanged, Missed: IDs and states only"},
    "OpenAPI": {"type": "object"},
}

_ERRORS = {"400": "bad request", "401": "no or bad credentials", "403": "not allowed (scope, role, CSRF, Origin)",
           "404": "not found", "409": "already exists", "413": "too large", "421": "unknown Host (DNS rebinding)",
           "429": "too many failed sign-ins (Retry-After)"}


def _operation(route) -> dict:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_" + re.sub(r"\W+", "_", route.path.split(":")[0]).strip("_"),
        "parameters": [{"name": p.name, "in": p.where, "required": p.required or p.where == "path",
                        "description": p.description, "schema": {"type": p.type}} for p in route.params],
        "responses": {str(route.status): {"description": "success",
                                          "content": {route.media: {"schema": _ref(route.answer)}}}},
    }
    for code, text in _ERRORS.items():
        op["responses"][code] = {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
    if route.body:
        media = "multipart/form-data" if route.body in ("Referral", "Reply") else "application/json"
        op["requestBody"] = {"required": True, "content": {media: {"schema": _ref(route.body)}}}
    if route.public:
        op["security"] = []
    else:
        op["security"] = [{"session": []}, {"token": [route.scope] if route.scope else []}]
        op["x-cabinet-scope"] = route.scope
        op["x-cabinet-letters"] = route.letters
    return op


def openapi_path(path: str) -> str:
    """aiohttp's `{n:\\d+}` is OpenAPI's `{n}`."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def document(routes: Sequence) -> dict:
    paths: dict[str, dict] = {}
    for route in routes:
        paths.setdefault(openapi_path(route.path), {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "cabinet local API", "version": "1",
                 "description": "The practice node's local JSON API (docs/api.md). Served on 127.0.0.1 by "
                                "`cabinet run`; beyond loopback only over TLS."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "cabinet_session",
                            "description": "from POST /api/session; state changes need X-CSRF-Token"},
                "token": {"type": "http", "scheme": "bearer",
                          "description": "`cabinet token add NAME --scope ...`; scopes: send, read, contacts, "
                                         "patients, admin (docs/api.md)"}}},
    }
