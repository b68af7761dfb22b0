"""The practice's signed audit documents, as anyone checks them; and the patient reference grammar.

A signed head (kind "audit-head") carries the audit chain's last (seq, hash)
and the time; a patient history (kind "patient-history") carries the entries
about one patient with the head they were read at. Both are a canonical
msgpack body signed by the practice's identity key under the domain of their
kind. The practice signs them in node.store.patients; the patient's card and
the practice's own checks open them here, with no database.
"""

from __future__ import annotations

import re
from typing import Any

from . import crypto, wire
from .errors import InvalidSignature, RemoteProtocolError, UsageError
from .identity import node_id_for

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
