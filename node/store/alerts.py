"""The alerts table and the alert service's cursor over the audit log.

An alert row names a rule, a subject (an account, a peer's node ID, or "node"), a
count, when it was first and last raised, and whether someone acknowledged it.
Never a patient: the rules see only audit event names, accounts and node IDs.
The table is created by `ensure_schema` (CREATE ... IF NOT EXISTS), so this module
needs nothing from db.py's schema.
"""

from __future__ import annotations

import sqlite_utils

from . import audit
from .tx import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id        INTEGER PRIMARY KEY,
    rule      TEXT NOT NULL,
    subject   TEXT NOT NULL,          -- account, peer node ID, or "node"
    count     INTEGER NOT NULL,
    first_at  INTEGER NOT NULL,
    at        INTEGER NOT NULL,       -- last raised
    detail    TEXT NOT NULL DEFAULT '',
    acked_at  INTEGER,
    acked_by  TEXT
);
CREATE INDEX IF NOT EXISTS alerts_open ON alerts (rule, subject) WHERE acked_at IS NULL;
CREATE TABLE IF NOT EXISTS alert_state (key TEXT PRIMARY KEY, value);
"""

COLUMNS = "id, rule, subject, count, first_at, at, detail, acked_at, acked_by"


def ensure_schema(db: sqlite_utils.Database) -> None:
    db.conn.executescript(SCHEMA)


def raise_alert(db: sqlite_utils.Database, *, rule: str, subject: str, count: int, at: int,
                detail: str = "") -> tuple[dict, bool]:
    """Open an alert, or bring the open one of this rule and subject up to date.

    Returns (the row, whether it is new)."""
    with transaction(db) as conn:
        row = conn.execute("SELECT id, count FROM alerts WHERE rule = ? AND subject = ? AND acked_at IS NULL",
                           (rule, subject)).fetchone()
        if row is None:
            n = conn.execute("INSERT INTO alerts (rule, subject, count, first_at, at, detail) VALUES (?,?,?,?,?,?)",
                             (rule, subject, count, at, at, detail)).lastrowid
            new = True
        else:
            n = row[0]
            conn.execute("UPDATE alerts SET count = MAX(count, ?), at = ?, detail = ? WHERE id = ?",
                         (count, at, detail, n))
            new = False
    return get(db, int(n or 0)) or {}, new


def get(db: sqlite_utils.Database, alert_id: int) -> dict | None:
    rows = list(db.query(f"SELECT {COLUMNS} FROM alerts WHERE id = ?", [alert_id]))
    return rows[0] if rows else None


def listing(db: sqlite_utils.Database, *, include_acked: bool = False, limit: int = 200) -> list[dict]:
    where = "" if include_acked else "WHERE acked_at IS NULL"
    return list(db.query(f"SELECT {COLUMNS} FROM alerts {where} ORDER BY at DESC LIMIT {int(limit)}"))


def ack(db: sqlite_utils.Database, alert_id: int, *, by: str, at: int) -> dict | None:
    """Acknowledge one alert and write the audit entry, in one transaction; None if unknown."""
    with transaction(db) as conn:
        row = conn.execute("SELECT rule, subject FROM alerts WHERE id = ? AND acked_at IS NULL",
                           (alert_id,)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE alerts SET acked_at = ?, acked_by = ? WHERE id = ?", (at, by, alert_id))
        audit.append(db, at=at, event="alert-acknowledged", detail=f"alert {alert_id} {row[0]} by {by}")
    return get(db, alert_id)


def state(db: sqlite_utils.Database, key: str, default: int = 0) -> int:
    row = db.conn.execute("SELECT value FROM alert_state WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else default


def set_state(db: sqlite_utils.Database, key: str, value: int) -> None:
    with transaction(db) as conn:
        conn.execute("INSERT INTO alert_state (key, value) VALUES (?, ?) "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def audit_since(db: sqlite_utils.Database, after: int, limit: int = 5000) -> list[tuple]:
    """(seq, at, event, record, peer, detail) of the audit entries after `after`, oldest first."""
    return db.conn.execute("SELECT seq, at, event, record, peer, detail FROM audit WHERE seq > ? "
                           "ORDER BY seq LIMIT ?", (after, limit)).fetchall()


def audit_head(db: sqlite_utils.Database) -> int:
    return audit.head(db)[0]
