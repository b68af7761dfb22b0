"""Patients at the practice: enrolled keys, which records are theirs, revocations, and their history.

Plain functions over the sqlite_utils.Database, run on the database thread
(db.Store). A patient is known here only by a pseudonymous reference (the
practice's patient number, never a name) and the public half of their key.
Every change and every access is appended to the hash-chained audit log in the
same transaction; entries about a patient carry `{"patient": REF, ...}` as JSON
in `detail`, so the patient's history is the entries that name them plus the
entries about their records. `signed_head` and `verify_against_head` let a
head handed out earlier (alone, or inside a patient's history) prove that no
entry was cut off the end of the chain since.
"""

from __future__ import annotations

import hmac
import json
import re

import sqlite_utils

from ..core import wire
from ..core.audit_docs import HEAD_KIND, HISTORY_KIND, check_ref, open_signed
from ..core.errors import AlreadyExists, NotFound, UsageError
from ..core.identity import Identity
from . import audit
from .tx import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_ref TEXT PRIMARY KEY,
    public_key  BLOB NOT NULL,
    key_id      TEXT NOT NULL UNIQUE,
    enrolled    INTEGER NOT NULL,
    updated     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS record_patients (
    record_id   TEXT PRIMARY KEY,
    patient_ref TEXT NOT NULL REFERENCES patients (patient_ref),
    category    TEXT,
    linked      INTEGER NOT NULL,
    copy_of     TEXT,
    grant_jti   TEXT
);
CREATE INDEX IF NOT EXISTS record_patients_ref ON record_patients (patient_ref, copy_of);
CREATE TABLE IF NOT EXISTS revocations (
    key_id TEXT NOT NULL,
    jti    TEXT NOT NULL,
    at     INTEGER NOT NULL,
    token  TEXT NOT NULL,
    PRIMARY KEY (key_id, jti)
);
CREATE TABLE IF NOT EXISTS grants_used (
    key_id      TEXT NOT NULL,
    jti         TEXT NOT NULL,
    patient_ref TEXT NOT NULL,
    audience    TEXT NOT NULL,
    scope       TEXT NOT NULL,
    expires     TEXT NOT NULL,
    first_used  INTEGER NOT NULL,
    last_used   INTEGER NOT NULL,
    uses        INTEGER NOT NULL,
    PRIMARY KEY (key_id, jti)
);
CREATE TABLE IF NOT EXISTS break_glass (
    requester TEXT PRIMARY KEY,
    since     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_record ON audit (record);
"""

ANY = "*"                                            # break-glass policy row: any contact may ask
CATEGORY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")    # as consent.py's scope grammar


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create the tables if db.SCHEMA does not already (CREATE ... IF NOT EXISTS: safe to repeat)."""
    db.conn.executescript(SCHEMA)


def _tx(db: sqlite_utils.Database) -> transaction:
    return transaction(db)


def check_category(category: str | None) -> str | None:
    if category is not None and not CATEGORY.fullmatch(category):
        raise UsageError("a category is 1-32 lowercase letters, digits or '-', e.g. cardiology")
    return category


def detail(patient: str | None = None, **fields) -> str:
    """The audit `detail` of a patient event: canonical JSON, the patient reference first."""
    body = {"patient": patient, **{k: v for k, v in fields.items() if v is not None}}
    return json.dumps({k: v for k, v in body.items() if v is not None}, sort_keys=True, separators=(",", ":"))


def log(db: sqlite_utils.Database, *, at: int, event: str, patient: str | None = None, record: str | None = None,
        peer: str | None = None, **fields) -> int:
    with _tx(db):
        return audit.append(db, at=at, event=event, record=record, peer=peer, detail=detail(patient, **fields))


# --- enrolment and links -----------------------------------------------------------

def enroll(db: sqlite_utils.Database, ref: str, public_key: bytes, key_id: str, now: int, *,
           replace: bool = False) -> str:
    """Enrol (or, with replace=True, re-key: a lost card) a patient; returns 'enrolled' or 'replaced'."""
    check_ref(ref)
    with _tx(db) as conn:
        other = conn.execute("SELECT patient_ref FROM patients WHERE key_id = ?", (key_id,)).fetchone()
        if other and other[0] != ref:
            raise AlreadyExists("this key is already enrolled for another patient at this practice")
        row = conn.execute("SELECT key_id FROM patients WHERE patient_ref = ?", (ref,)).fetchone()
        if row and not replace:
            raise AlreadyExists(f"patient {ref} is already enrolled (re-key a lost card with --replace)")
        if row:
            conn.execute("UPDATE patients SET public_key = ?, key_id = ?, updated = ? WHERE patient_ref = ?",
                         (public_key, key_id, now, ref))
        else:
            conn.execute("INSERT INTO patients (patient_ref, public_key, key_id, enrolled, updated) "
                         "VALUES (?,?,?,?,?)", (ref, public_key, key_id, now, now))
        event = "patient-rekeyed" if row else "patient-enrolled"
        audit.append(db, at=now, event=event, detail=detail(ref, key=key_id))
        return "replaced" if row else "enrolled"


def patient(db: sqlite_utils.Database, ref: str) -> dict:
    row = next(db.query("SELECT * FROM patients WHERE patient_ref = ?", [ref]), None)
    if row is None:
        raise NotFound(f"no patient {ref!r} is enrolled at this practice")
    return row


def patient_by_key(db: sqlite_utils.Database, key_id: str) -> dict | None:
    return next(db.query("SELECT * FROM patients WHERE key_id = ?", [key_id]), None)


def link(db: sqlite_utils.Database, record_id: str, ref: str, category: str | None, now: int) -> None:
    """Mark a stored record as this patient's (in a category); idempotent for the same patient."""
    check_category(category)
    with _tx(db) as conn:
        if not conn.execute("SELECT 1 FROM patients WHERE patient_ref = ?", (ref,)).fetchone():
            raise NotFound(f"no patient {ref!r} is enrolled at this practice")
        if not conn.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone():
            raise NotFound(f"no record {record_id}")
        row = conn.execute("SELECT patient_ref, copy_of FROM record_patients WHERE record_id = ?",
                           (record_id,)).fetchone()
        if row and (row[0] != ref or row[1] is not None):
            raise AlreadyExists(f"record {record_id} is already linked to another patient")
        conn.execute("INSERT INTO record_patients (record_id, patient_ref, category, linked) VALUES (?,?,?,?) "
                     "ON CONFLICT (record_id) DO UPDATE SET category = excluded.category",
                     (record_id, ref, category, now))
        audit.append(db, at=now, event="patient-linked", record=record_id, detail=detail(ref, category=category))


def records_of(db: sqlite_utils.Database, ref: str) -> list[dict]:
    """The patient's own records (not the copies sent under grants), oldest first."""
    return list(db.query("SELECT l.record_id, l.category FROM record_patients l JOIN records r ON r.id = l.record_id "
                         "WHERE l.patient_ref = ? AND l.copy_of IS NULL ORDER BY r.created, r.rowid", [ref]))


def link_copy(db: sqlite_utils.Database, *, copy: str, original: str, ref: str, requester: str, now: int,
              grant: str | None, emergency: bool) -> None:
    """Before a copy is stored and queued: file it under the patient and log what is being sent."""
    with _tx(db) as conn:
        conn.execute("INSERT INTO record_patients (record_id, patient_ref, category, linked, copy_of, grant_jti) "
                     "VALUES (?, ?, NULL, ?, ?, ?)", (copy, ref, now, original, grant))
        audit.append(db, at=now, event="access-sent", record=original, peer=requester,
                     detail=detail(ref, grant=grant, emergency=True if emergency else None, copy=copy))


# --- grants, revocations, break-glass ----------------------------------------------------

def revoked(db: sqlite_utils.Database, key_id: str) -> set[str]:
    return {jti for (jti,) in db.conn.execute("SELECT jti FROM revocations WHERE key_id = ?", (key_id,))}


def add_revocation(db: sqlite_utils.Database, *, key_id: str, jti: str, token: str, now: int, peer: str | None) -> bool:
    """File a revoked grant ID under the key that revoked it; False if it already was."""
    row = patient_by_key(db, key_id)
    with _tx(db) as conn:
        cur = conn.execute("INSERT OR IGNORE INTO revocations (key_id, jti, at, token) VALUES (?,?,?,?)",
                           (key_id, jti, now, token))
        if cur.rowcount:
            audit.append(db, at=now, event="grant-revoked", peer=peer,
                         detail=detail(row["patient_ref"] if row else None, grant=jti))
        return bool(cur.rowcount)


def grant_used(db: sqlite_utils.Database, *, key_id: str, jti: str, ref: str, audience: str, scope: str,
               expires: str, count: int, now: int) -> None:
    with _tx(db) as conn:
        conn.execute("INSERT INTO grants_used (key_id, jti, patient_ref, audience, scope, expires, first_used, "
                     "last_used, uses) VALUES (?,?,?,?,?,?,?,?,1) ON CONFLICT (key_id, jti) DO UPDATE SET "
                     "last_used = excluded.last_used, uses = uses + 1",
                     (key_id, jti, ref, audience, scope, expires, now, now))
        audit.append(db, at=now, event="grant-used", peer=audience,
                     detail=detail(ref, grant=jti, scope=scope, records=count))


def grants_of(db: sqlite_utils.Database, ref: str) -> list[dict]:
    return list(db.query("SELECT g.*, r.at AS revoked FROM grants_used g LEFT JOIN revocations r "
                         "ON r.key_id = g.key_id AND r.jti = g.jti WHERE g.patient_ref = ? ORDER BY g.first_used",
                         [ref]))


def set_break_glass(db: sqlite_utils.Database, requester: str, allowed: bool, now: int) -> None:
    """Allow (or stop allowing) emergency requests without a token from one contact, or ANY."""
    with _tx(db) as conn:
        if allowed:
            conn.execute("INSERT OR IGNORE INTO break_glass (requester, since) VALUES (?, ?)", (requester, now))
        else:
            conn.execute("DELETE FROM break_glass WHERE requester = ?", (requester,))
        audit.append(db, at=now, event="break-glass-allowed" if allowed else "break-glass-denied",
                     peer=None if requester == ANY else requester, detail=detail(None, who=requester))


def break_glass_allowed(db: sqlite_utils.Database, requester: str) -> bool:
    return db.conn.execute("SELECT 1 FROM break_glass WHERE requester IN (?, ?)", (requester, ANY)).fetchone() is not None


def break_glass_policy(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT * FROM break_glass ORDER BY requester"))


def flagged(db: sqlite_utils.Database, limit: int = 1000) -> list[dict]:
    """Emergency accesses and refusals, newest first: what the practice reviews."""
    return list(db.query("SELECT seq, at, event, record, peer, detail FROM audit WHERE event IN "
                         "('break-glass', 'break-glass-refused') ORDER BY seq DESC LIMIT ?", [int(limit)]))


# --- history and signed heads --------------------------------------------------------

_ENTRY = "seq, at, event, record, peer, detail, hash"


def history_entries(db: sqlite_utils.Database, ref: str) -> list[dict]:
    """Every audit entry that names the patient, or is about one of their records (copies included)."""
    rows = db.query(
        f"SELECT {_ENTRY} FROM audit WHERE record IN (SELECT record_id FROM record_patients WHERE patient_ref = ?) "
        f"UNION SELECT {_ENTRY} FROM audit WHERE detail LIKE '{{%' "
        f"AND CASE WHEN json_valid(detail) THEN json_extract(detail, '$.patient') END = ? ORDER BY seq", [ref, ref])
    return [dict(r) for r in rows]


def _signed(identity: Identity, kind: str, body: dict) -> bytes:
    raw = wire.pack(dict(body, v=1, kind=kind, practice=identity.node_id, sign_key=identity.sign_public))
    return wire.pack({"body": raw, "sig": identity.sign(kind, raw)})


def signed_head(db: sqlite_utils.Database, identity: Identity, now: int) -> bytes:
    """The chain's last (seq, hash) and the time, signed by the practice (domain "audit-head")."""
    seq, digest = audit.head(db)
    return _signed(identity, HEAD_KIND, {"seq": seq, "hash": digest, "at": now})


def signed_history(db: sqlite_utils.Database, identity: Identity, ref: str, now: int) -> bytes:
    """The patient's entries and the chain head, signed together (domain "patient-history")."""
    with _tx(db):      # one snapshot: no entry can land between the list and the head
        entries = history_entries(db, ref)
        seq, digest = audit.head(db)
    return _signed(identity, HISTORY_KIND, {"patient": ref, "at": now, "seq": seq, "hash": digest,
                                            "entries": entries})


def verify_against_head(db: sqlite_utils.Database, signed: bytes, *, practice: str | None = None) -> tuple[bool, str]:
    """Is the chain intact and still an extension of what `signed` (a head or a history) saw?

    A chain that verifies on its own can still have lost its tail, or have been
    rewritten whole; the entry at the signed sequence number must still carry
    the signed hash, and every entry a history listed must still be there.
    """
    body = open_signed(signed, practice=practice)
    ok, bad = audit.verify(db)
    if not ok:
        return False, f"the audit chain is broken at entry {bad} (edited, deleted or reordered)"
    seq, digest = body["seq"], body["hash"]
    if seq > 0:
        row = db.conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return False, f"entry {seq}, signed at the head earlier, is gone: the log was truncated"
        if not hmac.compare_digest(row[0], digest):
            return False, f"entry {seq} differs from the signed head: the log was rewritten"
    for e in body.get("entries", []) if body["kind"] == HISTORY_KIND else []:
        row = db.conn.execute("SELECT hash FROM audit WHERE seq = ?", (e.get("seq"),)).fetchone()
        if row is None or not hmac.compare_digest(row[0], e.get("hash", b"")):
            return False, f"entry {e.get('seq')} shown in the patient's history is missing or changed"
    return True, f"intact, and entry {seq} is still the one signed"
