"""Which address of each colleague last worked: the table behind "measured, not guessed".

Run on the database thread (db.Store). One row per (contact, address): when a
call through it last succeeded, last failed, and how many failures in a row.
Addresses are a contact's own descriptor addresses (https://... or
relay+tcp://...), never a local tunnel port. Nothing here is secret or about a
patient. The table is created by `ensure_schema` (CREATE ... IF NOT EXISTS),
so this module does not depend on db.SCHEMA or its migrations; rows beyond
MAX_PER_NODE per contact (the oldest) are dropped, so a colleague that changes
address every day cannot grow it without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from .tx import transaction

MAX_PER_NODE = 16

SCHEMA = """
CREATE TABLE IF NOT EXISTS reach (
    node_id   TEXT NOT NULL,
    address   TEXT NOT NULL,
    ok_at     INTEGER NOT NULL DEFAULT 0,
    failed_at INTEGER NOT NULL DEFAULT 0,
    fails     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, address)
);
"""


@dataclass(frozen=True, slots=True)
class Seen:
    """What we know of one address of one contact (Unix ms; 0: never)."""

    ok_at: int = 0
    failed_at: int = 0
    fails: int = 0

    def after(self, ok: bool, now: int) -> "Seen":
        if ok:
            return Seen(ok_at=now, failed_at=self.failed_at, fails=0)
        return Seen(ok_at=self.ok_at, failed_at=now, fails=self.fails + 1)


def ensure_schema(db: sqlite_utils.Database) -> None:
    db.conn.executescript(SCHEMA)


def load(db: sqlite_utils.Database) -> dict[str, dict[str, Seen]]:
    """Every contact's addresses and what we saw of them."""
    out: dict[str, dict[str, Seen]] = {}
    for node_id, address, ok_at, failed_at, fails in db.conn.execute(
            "SELECT node_id, address, ok_at, failed_at, fails FROM reach"):
        out.setdefault(node_id, {})[address] = Seen(ok_at, failed_at, fails)
    return out


def record(db: sqlite_utils.Database, node_id: str, address: str, seen: Seen) -> None:
    """Keep what was seen of one address (the table exists: `ensure_schema` ran when the memory was loaded)."""
    with transaction(db) as conn:
        conn.execute("INSERT INTO reach (node_id, address, ok_at, failed_at, fails) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (node_id, address) DO UPDATE SET ok_at = excluded.ok_at, "
                     "failed_at = excluded.failed_at, fails = excluded.fails",
                     (node_id, address, seen.ok_at, seen.failed_at, seen.fails))
        conn.execute("DELETE FROM reach WHERE node_id = ? AND address NOT IN (SELECT address FROM reach "
                     "WHERE node_id = ? ORDER BY max(ok_at, failed_at) DESC LIMIT ?)",
                     (node_id, node_id, MAX_PER_NODE))


def forget(db: sqlite_utils.Database, node_id: str) -> None:
    with transaction(db) as conn:
        conn.execute("DELETE FROM reach WHERE node_id = ?", (node_id,))
