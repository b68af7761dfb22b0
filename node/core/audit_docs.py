"""The practice's signed audit documents, as anyone checks them; the patient reference grammar;
and the provenance a copy sent under a patient's grant carries.

A signed head (kind "audit-head") carries the audit chain's last (seq, hash)
and the time; a patient history (kind "patient-history") carries the entries
about one patient with the head they were read at. Both are a canonical
msgpack body signed by the practice's identity key under the domain of their
kind. The practice signs them in node.store.patients; the patient's card and
the practice's own checks open them here, with no database.

A copy sealed for a practitioner under a grant (or an emergency) is a new
envelope from the practice that holds the record. So that the reader still
sees who wrote it, when, and under which ID, the copy's structured data
(`Manifest.data`, a string) becomes `{"cabinet-copy": {...}, "data": the
original's structured data}`: the original's signed head travels inside the
copy (see docs/patients.md, "Provenance of a copy"). Older readers show that
JSON as structured data; the envelope format does not change.
"""

from __future__ import annotations

import re
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from . import crypto, wire
from .envelope import Head
from .errors import CabinetError, InvalidSignature, RemoteProtocolError, UsageError
from .identity import format_node_id, node_id_for

REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no spaces: a name does not fit by accident
HEAD_KIND, HISTORY_KIND = "audit-head", "patient-history"
MAX_SIGNED = 4 << 20


def check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not REF.fullmatch(ref):
        raise UsageError("a patient reference is 1-64 letters, digits, '.', '_' or '-' (a number, never a name)")
    return ref


def open_signed(raw: bytes, *, practice: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """Verify a signed head or history; returns its body. `practice` pins the expected node ID."""
    outer = wire.unpack(raw, max_size=MAX_SIGNED, what="signed audit document")
    wire.only_fields(outer, {"body", "sig"}, what="signed audit document")
    body_raw = wire.field(outer, "body", bytes, what="signed audit document")
    sig = wire.field(outer, "sig", bytes, what="signed audit document", size=64)
    body: dict[str, Any] = wire.unpack(body_raw, max_size=MAX_SIGNED, what="signed audit document")
    what = "signed audit document"
    found = wire.field(body, "kind", str, what=what)
    if found not in (HEAD_KIND, HISTORY_KIND) or (kind and found != kind):
        raise RemoteProtocolError(f"{what}: expected {kind or 'a head or a history'}, got {found[:40]!r}")
    if wire.field(body, "v", int, what=what) != 1:
        raise RemoteProtocolError(f"{what}: unknown version")
    key = wire.field(body, "sign_key", bytes, what=what, size=32)
    if node_id_for(key) != wire.field(body, "practice", str, what=what):
        raise InvalidSignature(f"{what}: the practice's node ID does not match its key")
    if practice is not None and body["practice"] != practice:
        raise InvalidSignature(f"{what}: signed by {body['practice']}, not by the practice {practice}")
    crypto.verify(key, found, body_raw, sig)
    wire.field(body, "seq", int, what=what)
    wire.field(body, "hash", bytes, what=what, size=32)
    return body


# --- provenance of a copy ---------------------------------------------------------------

COPY_KEY = "cabinet-copy"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a copy came from: the original's signed head (checked), and under what."""

    head: Head | None               # None: the head carried does not verify
    grant: str | None               # the grant's ID, or None in an emergency
    emergency: bool

    @property
    def author(self) -> str:
        return format_node_id(self.head.header.sender) if self.head else ""


def wrap_copy_data(data: str, *, original_head: bytes, grant: str | None, emergency: bool) -> str:
    """The structured data of a copy: the original's, with its signed head and how it is sent."""
    origin = {"v": 1, "head": base64.b64encode(original_head).decode("ascii"), "grant": grant,
              "emergency": emergency}
    return json.dumps({COPY_KEY: origin, "data": data}, sort_keys=True, separators=(",", ":"))


def unwrap_copy_data(data: str) -> tuple[Origin | None, str]:
    """(the copy's origin, the original's structured data); (None, data) for a record that is no copy."""
    if not data.startswith('{"' + COPY_KEY + '":'):
        return None, data
    try:
        obj = json.loads(data)
        origin, inner = obj[COPY_KEY], obj["data"]
        if set(obj) != {COPY_KEY, "data"} or not isinstance(inner, str) or origin.get("v") != 1:
            return None, data
        grant, emergency = origin.get("grant"), origin.get("emergency") is True
        raw = base64.b64decode(origin["head"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        return None, data
    if grant is not None and not (isinstance(grant, str) and len(grant) <= 64 and grant.isprintable()):
        grant = None
    try:
        head: Head | None = Head.from_wire(raw)
    except CabinetError:
        head = None
    return Origin(head=head, grant=grant, emergency=emergency), inner
