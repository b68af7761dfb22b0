"""Append-only, hash-chained audit log of every read, send, export and refusal.

Each entry's hash covers the previous hash and the entry's fields, so an edit,
deletion or reordering of past entries breaks the chain from that point on.
Triggers refuse UPDATE and DELETE through SQLite; the chain catches anyone who
edits the file by other means. Entries hold record and node IDs, never patient
data.
"""

from __future__ import annotations

import hashlib

import sqlite_utils

from ..core import wire

GENESIS = b"\0" * 32


def _entry_hash(prev: bytes, seq: int, at: int, event: str, record: str | None, peer: str | None,
                detail: str | None) -> bytes:
    return hashlib.sha256(prev + wire.pack([seq, at, event, record, peer, detail])).digest()


def append(db: sqlite_utils.Database, *, at: int, event: str, record: str | None = None,
           peer: str | None = None, detail: str | None = None) -> int:
    """Add one entry; call inside the transaction that does what is being logged."""
    last = db.conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    digest = _entry_hash(prev, seq, at, event, record, peer, detail)
    db.conn.execute("INSERT INTO audit (seq, at, event, record, peer, detail, prev, hash) VALUES (?,?,?,?,?,?,?,?)",
                    (seq, at, event, record, peer, detail, prev, digest))
    return seq


def head(db: sqlite_utils.Database) -> tuple[int, bytes]:
    last = db.conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (last[0], last[1]) if last else (0, GENESIS)


def verify(db: sqlite_utils.Database) -> tuple[bool, int | None]:
    """Walk the chain; (True, None) if intact, else (False, first bad sequence number)."""
    prev, expected = GENESIS, 1
    for seq, at, event, record, peer, detail, p, h in db.conn.execute(
            "SELECT seq, at, event, record, peer, detail, prev, hash FROM audit ORDER BY seq"):
        if seq != expected or p != prev or h != _entry_hash(prev, seq, at, event, record, peer, detail):
            return False, seq if seq == expected else expected
        prev, expected = h, seq + 1
    return True, None


def entries(db: sqlite_utils.Database, record: str | None = None, limit: int = 1000) -> list[dict]:
    where, args = ("WHERE record = ?", [record]) if record else ("", [])
    return list(db.query(f"SELECT seq, at, event, record, peer, detail FROM audit {where} "
                         f"ORDER BY seq DESC LIMIT {int(limit)}", args))
