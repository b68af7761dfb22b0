"""Retention in the database: which records' bodies are due to go, and the mark a purge leaves.

A purge keeps a record's row (its ID, sender, dates, sealed list details and
its deliveries and receipts) and its audit trail; it drops the body kept
inline and leaves the blob file to the caller, which removes it once the
mark is committed. The `purged` table holds one row per purged record:

    purged (id, sender, at, before)     at: when; before: the cut-off date it applied

A record still waiting to be delivered to someone keeps its body (it is
purged at a later run, once delivered or refused).
"""

from __future__ import annotations

import sqlite_utils

from ..sync.outbox import PENDING
from . import audit
from .tx import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS purged (
    id     TEXT NOT NULL,
    sender TEXT NOT NULL,
    at     INTEGER NOT NULL,
    before INTEGER NOT NULL,
    PRIMARY KEY (id, sender)
);
"""
BATCH = 500


def ensure(db: sqlite_utils.Database) -> None:
    db.conn.execute(SCHEMA)


def due(db: sqlite_utils.Database, before: int, limit: int = BATCH) -> list[dict]:
    """Records created before `before` (Unix ms), not purged yet, not waiting to be delivered."""
    ensure(db)
    marks = ",".join("?" * len(PENDING))
    return list(db.query(
        "SELECT r.id, r.sender, r.direction, r.body IS NOT NULL AS inline FROM records r "
        "WHERE r.created < ? AND NOT EXISTS (SELECT 1 FROM purged p WHERE p.id = r.id AND p.sender = r.sender) "
        f"AND NOT (r.direction = 'out' AND EXISTS (SELECT 1 FROM deliveries d WHERE d.record_id = r.id "
        f"AND d.state IN ({marks}))) ORDER BY r.created LIMIT ?", [before, *PENDING, limit]))


def held_back(db: sqlite_utils.Database, before: int) -> int:
    """Own records older than the cut-off kept because a delivery is still pending."""
    ensure(db)
    marks = ",".join("?" * len(PENDING))
    row = db.conn.execute(
        "SELECT COUNT(DISTINCT r.id) FROM records r JOIN deliveries d ON d.record_id = r.id "
        f"WHERE r.direction = 'out' AND r.created < ? AND d.state IN ({marks}) AND NOT EXISTS "
        "(SELECT 1 FROM purged p WHERE p.id = r.id AND p.sender = r.sender)", [before, *PENDING]).fetchone()
    return int(row[0])


def mark(db: sqlite_utils.Database, rows: list[dict], *, at: int, before: int, detail: str) -> int:
    """In one transaction: drop inline bodies, mark each record purged, one audit entry per record."""
    ensure(db)
    done = 0
    with transaction(db):
        for r in rows:
            cur = db.conn.execute("INSERT OR IGNORE INTO purged (id, sender, at, before) VALUES (?, ?, ?, ?)",
                                  (r["id"], r["sender"], at, before))
            if cur.rowcount == 0:
                continue
            db.conn.execute("UPDATE records SET body = NULL WHERE id = ? AND sender = ?", (r["id"], r["sender"]))
            audit.append(db, at=at, event="purged", record=r["id"],
                         peer=None if r["direction"] == "out" else r["sender"], detail=detail)
            done += 1
    return done


def purged_on(db: sqlite_utils.Database, record_id: str, sender: str) -> int | None:
    """When this record's body was purged (Unix ms), or None."""
    ensure(db)
    row = db.conn.execute("SELECT at FROM purged WHERE id = ? AND sender = ?", (record_id, sender)).fetchone()
    return int(row[0]) if row else None


def purged_ids(db: sqlite_utils.Database) -> list[tuple[str, str, int]]:
    ensure(db)
    return [(r[0], r[1], int(r[2])) for r in db.conn.execute("SELECT id, sender, at FROM purged ORDER BY at")]


def last_backup(db: sqlite_utils.Database) -> int | None:
    """When the last backup of this node was made (its "backup-made" audit entry), or None."""
    row = db.conn.execute("SELECT MAX(at) FROM audit WHERE event = 'backup-made'").fetchone()
    return int(row[0]) if row and row[0] is not None else None
