"""The database side of backup and restore: the online snapshot, checks, and what a restore records.

- `snapshot` copies cabinet.db with SQLite's online backup API while the node
  runs (one step, so the copy is one consistent read transaction; WAL lets the
  node keep writing meanwhile).
- `integrity` runs PRAGMA integrity_check on a copy.
- `record_restore` writes, in the restored database, the restore itself: the
  `restores` row, one *void* per outgoing stream (the sequence numbers the lost
  node may have given out after the backup, never to be used again) and the
  "restored" audit entry that continues the chain.
- `next_seq`, `floors`, `voids_of` and `void_above` are what records.py and the
  sync layer ask about voids; `note_seen` and `sent_after_backup` keep and list
  what colleagues' acks say the lost node sent after the backup (docs/backup.md, "Sequence numbers after a restore").

Plain functions over sqlite3 / sqlite_utils; everything here blocks.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlite_utils

from ..core.errors import CorruptStore
from . import audit
from .tx import transaction

# Sequence numbers a restored node skips in every outgoing stream: more than the
# records a practice sends one colleague between a backup and a disk failure.
VOID_MARGIN = 1_000_000
FILE_MODE = 0o600

SCHEMA = """
CREATE TABLE IF NOT EXISTS restores (
    n         INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    backup_at INTEGER NOT NULL,
    margin    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS restore_voids (
    restore   INTEGER NOT NULL,
    recipient TEXT NOT NULL,          -- '*': every stream unknown to the backup
    lo        INTEGER NOT NULL,
    hi        INTEGER NOT NULL,
    seen      INTEGER NOT NULL DEFAULT 0,   -- highest seq of the void a recipient said it holds
    PRIMARY KEY (restore, recipient)
);
"""


# --- the snapshot -----------------------------------------------------------------

def snapshot(db_path: Path, out: Path) -> None:
    """A consistent copy of the live database into `out` (created 0600), by the online backup API."""
    os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE))
    try:
        src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise CorruptStore(f"cannot open the database for a backup ({exc})") from None
    try:
        dst = sqlite3.connect(str(out))
        try:
            src.backup(dst, pages=-1)          # one step: one read transaction, one consistent state
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise CorruptStore(f"the database could not be copied ({exc})") from None
    finally:
        src.close()


def integrity(path: Path) -> str:
    """'ok', or the first problem PRAGMA integrity_check names (the file is opened read-only)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("PRAGMA integrity_check").fetchone()
            conn.execute("SELECT COUNT(*) FROM audit").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return str(row[0]) if row else "no answer"


def get_meta(db: sqlite_utils.Database, key: str) -> bytes | None:
    row = db.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return bytes(row[0]) if row and row[0] is not None else None


def set_meta(db: sqlite_utils.Database, key: str, value: bytes) -> None:
    db.conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value))


# --- what a restore records ---------------------------------------------------------

def record_restore(db: sqlite_utils.Database, *, at: int, backup_at: int, detail: str,
                   margin: int = VOID_MARGIN) -> int:
    """In a restored database: the restore, a void per stream, the audit entry. Returns the restore's number."""
    conn = db.conn
    conn.executescript(SCHEMA)
    conn.execute("BEGIN IMMEDIATE")
    try:
        n = conn.execute("INSERT INTO restores (at, backup_at, margin) VALUES (?, ?, ?)",
                         (at, backup_at, margin)).lastrowid
        lasts = dict(conn.execute("SELECT recipient, MAX(seq) FROM deliveries GROUP BY recipient"))
        for node_id, in conn.execute("SELECT node_id FROM contacts").fetchall():
            lasts.setdefault(node_id, 0)
        for recipient, last in [*lasts.items(), ("*", 0)]:
            base = max(last, floor_of(conn, recipient))
            conn.execute("INSERT INTO restore_voids (restore, recipient, lo, hi) VALUES (?, ?, ?, ?)",
                         (n, recipient, base + 1, base + margin))
        audit.append(db, at=at, event="restored", detail=detail)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    assert n is not None
    return n


def _has_voids(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'restore_voids'").fetchone() \
        is not None


def voids(conn: sqlite3.Connection, recipient: str) -> list[tuple[int, int]]:
    """The (lo, hi) ranges this node must never use in its stream to `recipient`, lowest first."""
    if not _has_voids(conn):
        return []
    rows = conn.execute(
        "SELECT COALESCE(v.lo, w.lo), COALESCE(v.hi, w.hi) FROM restores r "
        "LEFT JOIN restore_voids v ON v.restore = r.n AND v.recipient = ? "
        "LEFT JOIN restore_voids w ON w.restore = r.n AND w.recipient = '*' ORDER BY r.n", (recipient,))
    return sorted((lo, hi) for lo, hi in rows if lo is not None)


def voids_of(db: sqlite_utils.Database, recipients: list[str]) -> dict[str, list[tuple[int, int]]]:
    """`voids` for several streams at once (the Courier's sender sessions, as it opens them)."""
    return {r: voids(db.conn, r) for r in recipients}


def floor_of(conn: sqlite3.Connection, recipient: str) -> int:
    """The highest seq a void reserves in this stream (0 when the node was never restored)."""
    return max((hi for _, hi in voids(conn, recipient)), default=0)


def next_seq(conn: sqlite3.Connection, recipient: str) -> int:
    """The stream's next sequence number: above every number given out and every void."""
    last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM deliveries WHERE recipient = ?", (recipient,)).fetchone()[0]
    return max(last, floor_of(conn, recipient)) + 1


def floors(conn: sqlite3.Connection) -> dict[str, int]:
    """Per known stream (contacts and recipients), its void floor; only streams that have one."""
    if not _has_voids(conn):
        return {}
    names = {r for r, in conn.execute("SELECT node_id FROM contacts")}
    names |= {r for r, in conn.execute("SELECT DISTINCT recipient FROM deliveries")}
    return {r: f for r in names if (f := floor_of(conn, r))}


def void_above(conn: sqlite3.Connection, recipient: str, since: int) -> tuple[int, int] | None:
    """The lowest void not yet behind `since`: what an outbox answer tells the recipient to skip."""
    return next(((lo, hi) for lo, hi in voids(conn, recipient) if hi > since), None)


def note_seen(db: sqlite_utils.Database, recipient: str, seqs: list[int]) -> int:
    """A recipient said it holds these seqs: those inside a void were sent by the lost node after the
    backup. Remember the highest per void; returns how many voids changed."""
    changed = 0
    with transaction(db) as conn:
        for lo, hi in voids(conn, recipient):
            top = max((s for s in seqs if lo <= s <= hi), default=0)
            if not top:
                continue
            # A '*' void (a stream the backup did not know) becomes this recipient's own row first.
            conn.execute("INSERT OR IGNORE INTO restore_voids (restore, recipient, lo, hi) SELECT restore, ?, lo, "
                         "hi FROM restore_voids WHERE recipient = '*' AND lo = ? AND hi = ?", (recipient, lo, hi))
            changed += conn.execute("UPDATE restore_voids SET seen = ? WHERE recipient = ? AND lo = ? AND hi = ? "
                                    "AND seen < ?", (top, recipient, lo, hi, top)).rowcount
    return changed


def sent_after_backup(db: sqlite_utils.Database) -> list[dict]:
    """Per recipient: how many records the lost node sent after the backup (not in this copy), as far as
    the recipients' acks told; and the date of the backup."""
    if not _has_voids(db.conn):
        return []
    return [dict(recipient=r, count=seen - lo + 1, backup_at=b) for r, lo, seen, b in db.conn.execute(
        "SELECT v.recipient, v.lo, v.seen, r.backup_at FROM restore_voids v JOIN restores r ON r.n = v.restore "
        "WHERE v.seen >= v.lo AND v.recipient != '*' ORDER BY v.recipient")]


def restores(db: sqlite_utils.Database) -> list[dict]:
    if not _has_voids(db.conn):
        return []
    return list(db.query("SELECT n, at, backup_at, margin FROM restores ORDER BY n"))
