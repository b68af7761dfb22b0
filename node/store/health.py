"""What `cabinet status` reads that no other table keeps: disk-use samples, clock offsets, the last backup.

- `disk_samples`: one row per day, the data folder's size that day; the growth over
  the last days gives the rate at which the disk fills (days left).
- `clock_offsets`: the last few offsets (ms) measured against each peer, from the
  Cabinet-Time of the requests it signed.
- `last_backup`: the time of the newest "backup-made" audit entry (Node.backup writes it).

Plain functions over sqlite_utils; the tables are created by `ensure_schema`.
"""

from __future__ import annotations

import sqlite_utils

from .tx import transaction

DAY_MS = 86_400_000
KEEP_DAYS = 30
KEEP_OFFSETS = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS disk_samples (day INTEGER PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clock_offsets (peer TEXT NOT NULL, at INTEGER NOT NULL, offset_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS clock_offsets_peer ON clock_offsets (peer, at);
"""


def ensure_schema(db: sqlite_utils.Database) -> None:
    db.conn.executescript(SCHEMA)


def sample_disk(db: sqlite_utils.Database, *, now: int, used: int) -> None:
    """Keep today's size of the data folder (the latest of the day), and 30 days of them."""
    day = now // DAY_MS
    with transaction(db) as conn:
        conn.execute("INSERT INTO disk_samples (day, bytes) VALUES (?, ?) "
                     "ON CONFLICT (day) DO UPDATE SET bytes = excluded.bytes", (day, used))
        conn.execute("DELETE FROM disk_samples WHERE day < ?", (day - KEEP_DAYS,))


def growth_per_day(db: sqlite_utils.Database, days: int = 7) -> float | None:
    """Bytes per day over the last `days` samples; None until two days are known."""
    rows = db.conn.execute("SELECT day, bytes FROM disk_samples ORDER BY day DESC LIMIT ?", (days,)).fetchall()
    if len(rows) < 2:
        return None
    (last_day, last), (first_day, first) = rows[0], rows[-1]
    return max(0.0, (last - first) / (last_day - first_day))


def note_offset(db: sqlite_utils.Database, *, peer: str, at: int, offset_ms: int) -> None:
    with transaction(db) as conn:
        conn.execute("INSERT INTO clock_offsets (peer, at, offset_ms) VALUES (?, ?, ?)", (peer, at, offset_ms))
        conn.execute("DELETE FROM clock_offsets WHERE peer = ? AND rowid NOT IN (SELECT rowid FROM clock_offsets "
                     "WHERE peer = ? ORDER BY at DESC LIMIT ?)", (peer, peer, KEEP_OFFSETS))


def offsets(db: sqlite_utils.Database) -> dict[str, int]:
    """Per peer, the median of its last offsets (ms; positive: the peer's clock is ahead)."""
    out: dict[str, list[int]] = {}
    for peer, off in db.conn.execute("SELECT peer, offset_ms FROM clock_offsets ORDER BY peer, at"):
        out.setdefault(peer, []).append(off)
    return {p: sorted(v)[len(v) // 2] for p, v in out.items()}


def last_backup(db: sqlite_utils.Database) -> int | None:
    row = db.conn.execute("SELECT at FROM audit WHERE event = 'backup-made' ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else None
