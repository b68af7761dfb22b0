"""Patients at the practice: enrolled keys, which records are theirs, grants, revocations, their history.

Plain functions over the sqlite_utils.Database, run on the database thread
(db.Store). A patient is known here only by a pseudonymous reference (the
practice's patient number, never a name) and the public half of their key,
and even the reference is never stored in clear: it is sealed under the local
storage key, and found through a keyed blind index (HMAC under the index key),
as the inbox details are (store/records.py). So are categories, grant IDs and
scopes, revocation tokens, and the details of every audit entry written here
(which hold references, reasons, grant IDs). A `Vault` carries the two keys.

Every change and every access is appended to the hash-chained audit log in the
same transaction; the chain hashes the detail as stored (sealed). Entries
about a patient are also listed in `patient_audit` under the patient's blind
index, so the history is those entries plus the entries about their records.
`signed_head` and `verify_against_head` let a head handed out earlier (alone,
or inside a patient's history) prove that no entry was cut off the end of the
chain since. Folders made before the sealing migrate by themselves
(`ensure_schema`, the "patients_schema" version in `meta`).
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from dataclasses import dataclass

import sqlite_utils

from ..core import crypto, wire
from ..core.audit_docs import HEAD_KIND, HISTORY_KIND, check_ref, open_signed
from ..core.errors import AlreadyExists, CorruptStore, NotFound, UsageError
from ..core.identity import Identity
from . import audit
from .records import open_meta, seal_meta
from .tx import transaction

VERSION = 2          # 1: references, categories, reasons and grants in clear; 2: sealed, blind-indexed
SCHEMA = """
CREATE TABLE IF NOT EXISTS patient_keys (
    ref_ix     BLOB PRIMARY KEY,
    ref        BLOB NOT NULL,
    public_key BLOB NOT NULL,
    key_id     TEXT NOT NULL UNIQUE,
    enrolled   INTEGER NOT NULL,
    updated    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patient_records (
    record_id TEXT PRIMARY KEY,
    ref_ix    BLOB NOT NULL,
    sealed    BLOB NOT NULL,
    linked    INTEGER NOT NULL,
    copy_of   TEXT,
    requester TEXT
);
CREATE INDEX IF NOT EXISTS patient_records_ref ON patient_records (ref_ix, copy_of);
CREATE INDEX IF NOT EXISTS patient_records_copy ON patient_records (copy_of, requester);
CREATE TABLE IF NOT EXISTS patient_revocations (
    key_id TEXT NOT NULL,
    jti_ix BLOB NOT NULL,
    at     INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (key_id, jti_ix)
);
CREATE TABLE IF NOT EXISTS patient_grants (
    key_id     TEXT NOT NULL,
    jti_ix     BLOB NOT NULL,
    ref_ix     BLOB NOT NULL,
    audience   TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    first_used INTEGER NOT NULL,
    last_used  INTEGER NOT NULL,
    uses       INTEGER NOT NULL,
    PRIMARY KEY (key_id, jti_ix)
);
CREATE TABLE IF NOT EXISTS patient_grant_uses (
    jti_ix BLOB NOT NULL,
    at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS patient_grant_uses_jti ON patient_grant_uses (jti_ix, at);
CREATE TABLE IF NOT EXISTS patient_audit (
    seq    INTEGER PRIMARY KEY,
    ref_ix BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS patient_audit_ref ON patient_audit (ref_ix);
CREATE TABLE IF NOT EXISTS break_glass (
    requester TEXT PRIMARY KEY,
    since     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_record ON audit (record);
"""

ANY = "*"                                            # break-glass policy row: any contact may ask
CATEGORY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")    # as consent.py's scope grammar
SEALED = "sealed:"                                   # prefix of an audit detail sealed under the storage key
HOUR = 3_600_000


@dataclass(frozen=True, slots=True)
class Vault:
    """The local storage key (seals) and index key (blind index) of the data folder."""

    storage_key: bytes
    index_key: bytes

    def ix(self, kind: str, value: str) -> bytes:
        return crypto.keyed_hash(self.index_key, f"patients/{kind}\0{value}".encode("utf-8"))

    def seal(self, obj: dict) -> bytes:
        return seal_meta(self.storage_key, obj)

    def open(self, sealed: bytes) -> dict:
        return open_meta(self.storage_key, sealed)

    def seal_detail(self, text: str) -> str:
        return SEALED + base64.b64encode(self.seal({"d": text})).decode("ascii")

    def open_detail(self, detail: str | None) -> str | None:
        """An audit detail as written: opened if sealed, as stored otherwise."""
        if not detail or not detail.startswith(SEALED):
            return detail
        try:
            text = self.open(base64.b64decode(detail[len(SEALED):], validate=True))["d"]
        except (ValueError, KeyError, TypeError):
            raise CorruptStore("an audit entry's details are damaged") from None
        return str(text)


def check_category(category: str | None) -> str | None:
    if category is not None and not CATEGORY.fullmatch(category):
        raise UsageError("a category is 1-32 lowercase letters, digits or '-', e.g. cardiology")
    return category


def detail(patient: str | None = None, **fields) -> str:
    """The audit `detail` of a patient event, before sealing: canonical JSON."""
    body = {"patient": patient, **fields}
    return json.dumps({k: v for k, v in body.items() if v is not None}, sort_keys=True, separators=(",", ":"))


def _append(db: sqlite_utils.Database, v: Vault, *, at: int, event: str, patient: str | None = None,
            record: str | None = None, peer: str | None = None, **fields) -> int:
    """One audit entry with a sealed detail, listed under the patient; inside the caller's transaction."""
    seq = audit.append(db, at=at, event=event, record=record, peer=peer,
                       detail=v.seal_detail(detail(patient, **fields)))
    if patient is not None:
        db.conn.execute("INSERT INTO patient_audit (seq, ref_ix) VALUES (?, ?)", (seq, v.ix("ref", patient)))
    return seq


def log(db: sqlite_utils.Database, v: Vault, *, at: int, event: str, patient: str | None = None,
        record: str | None = None, peer: str | None = None, **fields) -> int:
    with transaction(db):
        return _append(db, v, at=at, event=event, patient=patient, record=record, peer=peer, **fields)


def open_entries(v: Vault, rows) -> list[dict]:
    return [dict(r, detail=v.open_detail(r["detail"])) for r in rows]


# --- enrolment and links -----------------------------------------------------------

def _patient_row(v: Vault, row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"patient_ref": v.open(row["ref"])["ref"], "public_key": row["public_key"], "key_id": row["key_id"],
            "enrolled": row["enrolled"], "updated": row["updated"]}


def enroll(db: sqlite_utils.Database, v: Vault, ref: str, public_key: bytes, key_id: str, now: int, *,
           replace: bool = False) -> str:
    """Enrol (or, with replace=True, re-key: a lost card) a patient; returns 'enrolled' or 'replaced'."""
    check_ref(ref)
    ix = v.ix("ref", ref)
    with transaction(db) as conn:
        other = conn.execute("SELECT ref_ix FROM patient_keys WHERE key_id = ?", (key_id,)).fetchone()
        if other and other[0] != ix:
            raise AlreadyExists("this key is already enrolled for another patient at this practice")
        row = conn.execute("SELECT key_id FROM patient_keys WHERE ref_ix = ?", (ix,)).fetchone()
        if row and not replace:
            raise AlreadyExists(f"patient {ref} is already enrolled (re-key a lost card with --replace)")
        if row:
            conn.execute("UPDATE patient_keys SET public_key = ?, key_id = ?, updated = ? WHERE ref_ix = ?",
                         (public_key, key_id, now, ix))
        else:
            conn.execute("INSERT INTO patient_keys (ref_ix, ref, public_key, key_id, enrolled, updated) "
                         "VALUES (?,?,?,?,?,?)", (ix, v.seal({"ref": ref}), public_key, key_id, now, now))
        _append(db, v, at=now, event="patient-rekeyed" if row else "patient-enrolled", patient=ref, key=key_id)
        return "replaced" if row else "enrolled"


def patient(db: sqlite_utils.Database, v: Vault, ref: str) -> dict:
    row = next(db.query("SELECT * FROM patient_keys WHERE ref_ix = ?", [v.ix("ref", ref)]), None)
    if row is None:
        raise NotFound(f"no patient {ref!r} is enrolled at this practice")
    return _patient_row(v, row) or {}


def patient_by_key(db: sqlite_utils.Database, v: Vault, key_id: str) -> dict | None:
    return _patient_row(v, next(db.query("SELECT * FROM patient_keys WHERE key_id = ?", [key_id]), None))


def link(db: sqlite_utils.Database, v: Vault, record_id: str, ref: str, category: str | None, now: int) -> None:
    """Mark a stored record as this patient's (in a category); idempotent for the same patient."""
    check_category(category)
    ix = v.ix("ref", ref)
    with transaction(db) as conn:
        if not conn.execute("SELECT 1 FROM patient_keys WHERE ref_ix = ?", (ix,)).fetchone():
            raise NotFound(f"no patient {ref!r} is enrolled at this practice")
        if not conn.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone():
            raise NotFound(f"no record {record_id}")
        row = conn.execute("SELECT ref_ix, copy_of FROM patient_records WHERE record_id = ?", (record_id,)).fetchone()
        if row and (row[0] != ix or row[1] is not None):
            raise AlreadyExists(f"record {record_id} is already linked to another patient")
        conn.execute("INSERT INTO patient_records (record_id, ref_ix, sealed, linked) VALUES (?,?,?,?) "
                     "ON CONFLICT (record_id) DO UPDATE SET sealed = excluded.sealed",
                     (record_id, ix, v.seal({"category": category}), now))
        _append(db, v, at=now, event="patient-linked", patient=ref, record=record_id, category=category)


def records_of(db: sqlite_utils.Database, v: Vault, ref: str) -> list[dict]:
    """The patient's own records (not the copies sent under grants), oldest first."""
    # GROUP BY: a record ID another sender squatted at this node is still one record here.
    rows = db.query("SELECT l.record_id, l.sealed, min(r.created) AS c, min(r.rowid) AS o FROM patient_records l "
                    "JOIN records r ON r.id = l.record_id WHERE l.ref_ix = ? AND l.copy_of IS NULL "
                    "GROUP BY l.record_id, l.sealed ORDER BY c, o", [v.ix("ref", ref)])
    return [{"record_id": r["record_id"], "category": v.open(r["sealed"]).get("category")} for r in rows]


def sent_to(db: sqlite_utils.Database, v: Vault, ref: str, requester: str) -> set[str]:
    """The patient's records already copied to `requester` (under any grant, or in an emergency)."""
    return {r for (r,) in db.conn.execute("SELECT copy_of FROM patient_records WHERE ref_ix = ? AND requester = ? "
                                          "AND copy_of IS NOT NULL", (v.ix("ref", ref), requester))}


def copies(db: sqlite_utils.Database) -> int:
    """How many copies were ever sealed here for requesters."""
    return int(db.conn.execute("SELECT count(*) FROM patient_records WHERE copy_of IS NOT NULL").fetchone()[0])


def link_copy(db: sqlite_utils.Database, v: Vault, *, copy: str, original: str, ref: str, requester: str, now: int,
              grant: str | None, emergency: bool) -> None:
    """Before a copy is stored and queued: file it under the patient and log what is being sent."""
    with transaction(db) as conn:
        conn.execute("INSERT INTO patient_records (record_id, ref_ix, sealed, linked, copy_of, requester) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (copy, v.ix("ref", ref), v.seal({"grant": grant}), now, original,
                                                   requester))
        _append(db, v, at=now, event="access-sent", patient=ref, record=original, peer=requester, grant=grant,
                emergency=True if emergency else None, copy=copy)


# --- grants, revocations, break-glass ----------------------------------------------------

def revoked(db: sqlite_utils.Database, v: Vault, key_id: str) -> set[str]:
    return {v.open(s)["jti"] for (s,) in db.conn.execute("SELECT sealed FROM patient_revocations WHERE key_id = ?",
                                                         (key_id,))}


def add_revocation(db: sqlite_utils.Database, v: Vault, *, key_id: str, jti: str, token: str, now: int,
                   peer: str | None) -> bool:
    """File a revoked grant ID under the key that revoked it; False if it already was."""
    row = patient_by_key(db, v, key_id)
    with transaction(db) as conn:
        cur = conn.execute("INSERT OR IGNORE INTO patient_revocations (key_id, jti_ix, at, sealed) VALUES (?,?,?,?)",
                           (key_id, v.ix("jti", jti), now, v.seal({"jti": jti, "token": token})))
        if cur.rowcount:
            _append(db, v, at=now, event="grant-revoked", peer=peer, patient=row["patient_ref"] if row else None,
                    grant=jti)
        return bool(cur.rowcount)


def take_grant_use(db: sqlite_utils.Database, v: Vault, *, jti: str, now: int, per_hour: int) -> bool:
    """Count one use of a grant, unless it was used `per_hour` times in the last hour (then False)."""
    ix = v.ix("jti", jti)
    with transaction(db) as conn:
        conn.execute("DELETE FROM patient_grant_uses WHERE at <= ?", (now - HOUR,))
        used = conn.execute("SELECT count(*) FROM patient_grant_uses WHERE jti_ix = ? AND at > ?",
                            (ix, now - HOUR)).fetchone()[0]
        if used >= per_hour:
            return False
        conn.execute("INSERT INTO patient_grant_uses (jti_ix, at) VALUES (?, ?)", (ix, now))
        return True


def grant_used(db: sqlite_utils.Database, v: Vault, *, key_id: str, jti: str, ref: str, audience: str, scope: str,
               expires: str, count: int, now: int) -> None:
    sealed = v.seal({"jti": jti, "scope": scope, "expires": expires})
    with transaction(db) as conn:
        conn.execute("INSERT INTO patient_grants (key_id, jti_ix, ref_ix, audience, sealed, first_used, last_used, "
                     "uses) VALUES (?,?,?,?,?,?,?,1) ON CONFLICT (key_id, jti_ix) DO UPDATE SET "
                     "last_used = excluded.last_used, uses = uses + 1",
                     (key_id, v.ix("jti", jti), v.ix("ref", ref), audience, sealed, now, now))
        _append(db, v, at=now, event="grant-used", patient=ref, peer=audience, grant=jti, scope=scope, records=count)


def grants_of(db: sqlite_utils.Database, v: Vault, ref: str) -> list[dict]:
    rows = db.query("SELECT g.audience, g.sealed, g.first_used, g.last_used, g.uses, r.at AS revoked "
                    "FROM patient_grants g LEFT JOIN patient_revocations r ON r.key_id = g.key_id "
                    "AND r.jti_ix = g.jti_ix WHERE g.ref_ix = ? ORDER BY g.first_used", [v.ix("ref", ref)])
    return [{**{k: r[k] for k in ("audience", "first_used", "last_used", "uses", "revoked")}, **v.open(r["sealed"])}
            for r in rows]


def set_break_glass(db: sqlite_utils.Database, v: Vault, requester: str, allowed: bool, now: int) -> None:
    """Allow (or stop allowing) emergency requests without a token from one contact, or ANY."""
    with transaction(db) as conn:
        if allowed:
            conn.execute("INSERT OR IGNORE INTO break_glass (requester, since) VALUES (?, ?)", (requester, now))
        else:
            conn.execute("DELETE FROM break_glass WHERE requester = ?", (requester,))
        _append(db, v, at=now, event="break-glass-allowed" if allowed else "break-glass-denied",
                peer=None if requester == ANY else requester, who=requester)


def break_glass_allowed(db: sqlite_utils.Database, requester: str) -> bool:
    return db.conn.execute("SELECT 1 FROM break_glass WHERE requester IN (?, ?)", (requester, ANY)).fetchone() is not None


def break_glass_policy(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT * FROM break_glass ORDER BY requester"))


def flagged(db: sqlite_utils.Database, v: Vault, limit: int = 1000) -> list[dict]:
    """Emergency accesses and refusals, newest first: what the practice reviews."""
    return open_entries(v, db.query("SELECT seq, at, event, record, peer, detail FROM audit WHERE event IN "
                                    "('break-glass', 'break-glass-refused') ORDER BY seq DESC LIMIT ?", [int(limit)]))


def entries(db: sqlite_utils.Database, v: Vault, record: str | None = None, limit: int = 1000) -> list[dict]:
    """audit.entries with the details opened."""
    return open_entries(v, audit.entries(db, record, limit))


# --- history and signed heads --------------------------------------------------------

_ENTRY = "seq, at, event, record, peer, detail, hash"


def history_entries(db: sqlite_utils.Database, v: Vault, ref: str) -> list[dict]:
    """Every audit entry that names the patient, or is about one of their records (copies included)."""
    ix = v.ix("ref", ref)
    rows = db.query(
        f"SELECT {_ENTRY} FROM audit WHERE record IN (SELECT record_id FROM patient_records WHERE ref_ix = ?) "
        f"UNION SELECT {_ENTRY} FROM audit WHERE seq IN (SELECT seq FROM patient_audit WHERE ref_ix = ?) "
        f"ORDER BY seq", [ix, ix])
    return open_entries(v, rows)


def _signed(identity: Identity, kind: str, body: dict) -> bytes:
    raw = wire.pack(dict(body, v=1, kind=kind, practice=identity.node_id, sign_key=identity.sign_public))
    return wire.pack({"body": raw, "sig": identity.sign(kind, raw)})


def signed_head(db: sqlite_utils.Database, identity: Identity, now: int) -> bytes:
    """The chain's last (seq, hash) and the time, signed by the practice (domain "audit-head")."""
    seq, digest = audit.head(db)
    return _signed(identity, HEAD_KIND, {"seq": seq, "hash": digest, "at": now})


def signed_history(db: sqlite_utils.Database, v: Vault, identity: Identity, ref: str, now: int) -> bytes:
    """The patient's entries (details opened) and the chain head, signed together (domain "patient-history")."""
    with transaction(db):      # one snapshot: no entry can land between the list and the head
        entries = history_entries(db, v, ref)
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


# --- schema version and the migration from version 1 ----------------------------------------

PATIENT_EVENTS = ("patient-enrolled", "patient-rekeyed", "patient-linked", "access-sent", "grant-used",
                  "access-refused", "break-glass", "break-glass-refused", "grant-revoked", "revocation-refused",
                  "history-given", "history-refused", "break-glass-allowed", "break-glass-denied")


def ensure_schema(db: sqlite_utils.Database, v: Vault) -> None:
    """The tables exist and hold nothing in clear; a version 1 folder is migrated (once)."""
    conn = db.conn
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key = 'patients_schema'").fetchone()
    if row is not None and row[0] == VERSION:
        return
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'patients'").fetchone():
        with transaction(db):
            _migrate_v1(db, v)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")      # no page of the clear tables left in the WAL
    conn.execute("INSERT INTO meta (key, value) VALUES ('patients_schema', ?) ON CONFLICT (key) DO UPDATE "
                 "SET value = excluded.value", (VERSION,))


def _migrate_v1(db: sqlite_utils.Database, v: Vault) -> None:
    conn = db.conn
    ixref = lambda ref: v.ix("ref", ref)      # noqa: E731
    for ref, pk, kid, enrolled, updated in conn.execute(
            "SELECT patient_ref, public_key, key_id, enrolled, updated FROM patients").fetchall():
        conn.execute("INSERT OR IGNORE INTO patient_keys VALUES (?,?,?,?,?,?)",
                     (ixref(ref), v.seal({"ref": ref}), pk, kid, enrolled, updated))
    requester_of = {}
    for peer, text in conn.execute("SELECT peer, detail FROM audit WHERE event = 'access-sent'").fetchall():
        d = _json(text)
        if d.get("copy"):
            requester_of[d["copy"]] = peer
    for rid, ref, cat, linked, copy_of, jti in conn.execute(
            "SELECT record_id, patient_ref, category, linked, copy_of, grant_jti FROM record_patients").fetchall():
        sealed = v.seal({"grant": jti} if copy_of else {"category": cat})
        conn.execute("INSERT OR IGNORE INTO patient_records VALUES (?,?,?,?,?,?)",
                     (rid, ixref(ref), sealed, linked, copy_of, requester_of.get(rid) if copy_of else None))
    for kid, jti, at, token in conn.execute("SELECT key_id, jti, at, token FROM revocations").fetchall():
        conn.execute("INSERT OR IGNORE INTO patient_revocations VALUES (?,?,?,?)",
                     (kid, v.ix("jti", jti), at, v.seal({"jti": jti, "token": token})))
    for r in conn.execute("SELECT key_id, jti, patient_ref, audience, scope, expires, first_used, last_used, uses "
                          "FROM grants_used").fetchall():
        conn.execute("INSERT OR IGNORE INTO patient_grants VALUES (?,?,?,?,?,?,?,?)",
                     (r[0], v.ix("jti", r[1]), ixref(r[2]), r[3], v.seal({"jti": r[1], "scope": r[4],
                                                                        "expires": r[5]}), r[6], r[7], r[8]))
    _reseal_audit(db, v)
    for table in ("record_patients", "revocations", "grants_used", "patients"):
        conn.execute(f"DROP TABLE {table}")


def _json(text: str | None) -> dict:
    try:
        d = json.loads(text) if text and text.startswith("{") else {}
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _reseal_audit(db: sqlite_utils.Database, v: Vault) -> None:
    """Seal the details of the patient entries written in clear, and re-chain the log from the first one.

    The chain then verifies again (it hashes what is stored); a head signed before the
    migration no longer matches past the first sealed entry, so the old head is
    logged in the entry that records the migration.
    """
    conn = db.conn
    marks = ",".join("?" * len(PATIENT_EVENTS))
    rows = conn.execute(f"SELECT seq, detail FROM audit WHERE event IN ({marks}) ORDER BY seq",
                        PATIENT_EVENTS).fetchall()
    todo = [(seq, text) for seq, text in rows if text and not text.startswith(SEALED)]
    if not todo:
        return
    old_seq, old_hash = audit.head(db)
    triggers = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'"
                            ).fetchall()
    for name, _ in triggers:
        conn.execute(f'DROP TRIGGER "{name}"')
    for seq, text in todo:
        ref = _json(text).get("patient")
        if isinstance(ref, str):
            conn.execute("INSERT OR IGNORE INTO patient_audit (seq, ref_ix) VALUES (?, ?)", (seq, v.ix("ref", ref)))
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", (v.seal_detail(text), seq))
    prev = conn.execute("SELECT hash FROM audit WHERE seq = ?", (todo[0][0] - 1,)).fetchone()
    prev = prev[0] if prev else audit.GENESIS
    for seq, at, event, record, peer, text in conn.execute(
            "SELECT seq, at, event, record, peer, detail FROM audit WHERE seq >= ? ORDER BY seq",
            (todo[0][0],)).fetchall():
        digest = audit._entry_hash(prev, seq, at, event, record, peer, text)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
    for _, sql in triggers:
        conn.execute(sql)
    audit.append(db, at=conn.execute("SELECT max(at) FROM audit").fetchone()[0] or 0, event="patients-sealed",
                 detail=f"patient details sealed; entries from {todo[0][0]} re-chained; the head before was "
                        f"{old_seq}:{old_hash.hex()}")
