"""Plain functions over the database: contacts, records, the outbox.

Each function takes the sqlite_utils.Database as its first argument and runs
on the database thread (see db.Store). What the inbox lists about a record
(patient, subject, attachment names) is sealed under the local storage key;
the patient can be searched through a keyed blind index.
"""

from __future__ import annotations

import unicodedata

import nacl.exceptions
import nacl.secret
import sqlite_utils

from .. import crypto, wire
from ..errors import AlreadyExists, CorruptStore, NotFound, ProtocolError, UsageError
from ..identity import Descriptor
from . import audit
from .db import transaction

# --- encrypted metadata ------------------------------------------------------

def seal_meta(storage_key: bytes, meta: dict) -> bytes:
    return bytes(nacl.secret.SecretBox(storage_key).encrypt(wire.pack(meta)))


def open_meta(storage_key: bytes, sealed: bytes) -> dict:
    try:
        return wire.unpack(nacl.secret.SecretBox(storage_key).decrypt(sealed), max_size=1 << 24, what="metadata")
    except (nacl.exceptions.CryptoError, ProtocolError):
        raise CorruptStore("a record's stored details are damaged") from None


def patient_index(index_key: bytes, patient: str, born: str) -> bytes:
    """Blind index: equal (name, birth date) match, whatever the case or accents typed."""
    norm = unicodedata.normalize("NFKD", f"{patient}|{born}")
    norm = "".join(ch for ch in norm if not unicodedata.combining(ch)).casefold()
    return crypto.keyed_hash(index_key, " ".join(norm.split()).encode("utf-8"))


# --- contacts ----------------------------------------------------------------

def upsert_contact(db: sqlite_utils.Database, desc: Descriptor, name: str, now: int) -> str:
    """Add or refresh a contact; returns 'added', 'updated' or 'unchanged'."""
    with transaction(db) as conn:
        row = conn.execute("SELECT seq, name FROM contacts WHERE node_id = ?", (desc.node_id,)).fetchone()
        clash = conn.execute("SELECT node_id FROM contacts WHERE name = ? COLLATE NOCASE AND node_id != ?",
                             (name, desc.node_id)).fetchone()
        if clash and row is None:
            raise AlreadyExists(f"another contact is already named {name!r}; choose one with --name")
        if row is None:
            conn.execute("INSERT INTO contacts (node_id, name, sign_key, descriptor, seq, verified, added, updated) "
                         "VALUES (?,?,?,?,?,0,?,?)", (desc.node_id, name, desc.sign_key, desc.signed, desc.seq,
                                                       now, now))
            audit.append(db, at=now, event="contact-added", peer=desc.node_id)
            return "added"
        if desc.seq < row[0]:
            raise UsageError("this descriptor is older than the one already known (rolled back); not used")
        if desc.seq == row[0]:
            return "unchanged"
        conn.execute("UPDATE contacts SET descriptor = ?, seq = ?, updated = ? WHERE node_id = ?",
                     (desc.signed, desc.seq, now, desc.node_id))
        return "updated"


def find_contact(db: sqlite_utils.Database, ref: str) -> dict:
    from ..identity import normalize_node_id
    row = next(db.query("SELECT * FROM contacts WHERE name = ? COLLATE NOCASE", [ref.strip()]), None)
    if row is None:
        try:
            row = next(db.query("SELECT * FROM contacts WHERE node_id = ?", [normalize_node_id(ref)]), None)
        except UsageError:
            row = None
    if row is None:
        raise NotFound(f"unknown contact {ref!r} (see 'cabinet contact list')")
    return row


def contact_by_id(db: sqlite_utils.Database, node_id: str) -> dict | None:
    return next(db.query("SELECT * FROM contacts WHERE node_id = ?", [node_id]), None)


def list_contacts(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT * FROM contacts ORDER BY name COLLATE NOCASE"))


def mark_verified(db: sqlite_utils.Database, node_id: str, now: int) -> None:
    with transaction(db):
        db.conn.execute("UPDATE contacts SET verified = 1, updated = ? WHERE node_id = ?", (now, node_id))
        audit.append(db, at=now, event="contact-verified", peer=node_id)


# --- records -----------------------------------------------------------------

RECORD_FIELDS = ("id", "direction", "kind", "sender", "thread", "reply_to", "created", "stored", "head",
                 "body_size", "meta", "patient_ix")


def insert_record(db: sqlite_utils.Database, row: dict, *, recipients: list[str] = (), now: int,
                  event: str, peer: str | None = None) -> bool:
    """Store a record (and queue it for `recipients`) in one transaction.

    Returns False, changing nothing, if the record is already stored: a
    duplicate delivery is acknowledged again and dropped.
    """
    with transaction(db) as conn:
        if conn.execute("SELECT 1 FROM records WHERE id = ?", (row["id"],)).fetchone():
            return False
        conn.execute(f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES ({', '.join('?' * len(RECORD_FIELDS))})",
                     [row[f] for f in RECORD_FIELDS])
        for to in recipients:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deliveries WHERE recipient = ?",
                               (to,)).fetchone()[0]
            conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                         "VALUES (?, ?, ?, 'queued', ?, ?)", (row["id"], to, seq, now, now))
        audit.append(db, at=now, event=event, record=row["id"], peer=peer)
        return True


def get_record(db: sqlite_utils.Database, ref: str) -> dict:
    """By full ID or an unambiguous prefix of at least 6 characters."""
    ref = ref.strip().lower()
    if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
        raise NotFound(f"no record {ref!r} (give at least 6 hex characters of its ID)")
    rows = list(db.query("SELECT * FROM records WHERE id >= ? AND id < ? LIMIT 2", [ref, ref + "g"]))
    if not rows:
        raise NotFound(f"no record {ref!r}")
    if len(rows) > 1:
        raise UsageError(f"record ID {ref!r} is ambiguous; give more characters")
    return rows[0]


def has_record(db: sqlite_utils.Database, record_id: str) -> bool:
    return db.conn.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone() is not None


def list_records(db: sqlite_utils.Database, direction: str | None = None, patient_ix: bytes | None = None,
                 thread: str | None = None, limit: int = 500) -> list[dict]:
    where, args = [], []
    for col, val in (("direction", direction), ("patient_ix", patient_ix), ("thread", thread)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    sql = "SELECT * FROM records" + (" WHERE " + " AND ".join(where) if where else "")
    return list(db.query(sql + f" ORDER BY created DESC, id LIMIT {int(limit)}", args))


def mark_opened(db: sqlite_utils.Database, record_id: str, now: int, event: str = "read") -> None:
    with transaction(db):
        db.conn.execute("UPDATE records SET opened = COALESCE(opened, ?) WHERE id = ?", (now, record_id))
        audit.append(db, at=now, event=event, record=record_id)


def log(db: sqlite_utils.Database, *, at: int, event: str, record: str | None = None, peer: str | None = None,
        detail: str | None = None) -> None:
    with transaction(db):
        audit.append(db, at=at, event=event, record=record, peer=peer, detail=detail)


# --- outbox ------------------------------------------------------------------

def deliveries(db: sqlite_utils.Database, record_id: str | None = None, state: str | None = None) -> list[dict]:
    where, args = [], []
    if record_id:
        where.append("d.record_id = ?")
        args.append(record_id)
    if state:
        where.append("d.state = ?")
        args.append(state)
    sql = ("SELECT d.*, r.created, r.body_size, c.name AS recipient_name FROM deliveries d "
           "JOIN records r ON r.id = d.record_id LEFT JOIN contacts c ON c.node_id = d.recipient")
    sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.created DESC, d.recipient"
    return list(db.query(sql, args))


def due(db: sqlite_utils.Database, now: int, limit: int = 100) -> list[dict]:
    return list(db.query("SELECT * FROM deliveries WHERE state IN ('queued', 'sending') AND next_try <= ? "
                         "ORDER BY recipient, seq LIMIT ?", [now, limit]))


def next_due(db: sqlite_utils.Database) -> int | None:
    row = db.conn.execute("SELECT MIN(next_try) FROM deliveries WHERE state IN ('queued', 'sending')").fetchone()
    return row[0]


def update_delivery(db: sqlite_utils.Database, record_id: str, recipient: str, *, now: int,
                    event: str | None = None, **fields) -> None:
    fields["updated"] = now
    cols = ", ".join(f"{k} = ?" for k in fields)
    with transaction(db):
        db.conn.execute(f"UPDATE deliveries SET {cols} WHERE record_id = ? AND recipient = ?",
                        [*fields.values(), record_id, recipient])
        if event:
            audit.append(db, at=now, event=event, record=record_id, peer=recipient)
