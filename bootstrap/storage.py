"""The bootstrap's SQLite file: signed descriptors and nothing else.

Each row keeps the descriptor exactly as its node signed it, plus the fields
needed to find it (node ID, name, specialty, city, RPPS, seq, expiry) and a
local change counter that anti-entropy pages through. Search goes through an
FTS5 table over normalised text (casefolded, accents stripped), so a query for
"saint etienne" finds "Saint-Étienne" among 100,000 rows in a millisecond.

Every write verifies first (`Descriptor.from_wire`), whichever way the bytes
came (an announce, a peer's sync page, a bulk load): a forged, altered,
expired or rolled-back descriptor is never stored. The functions take the
`sqlite_utils.Database` and `now_ms` as arguments; `Storage` runs them on one
writer thread and a few reader threads (WAL), never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import sqlite_utils

from node.core import directory as codec
from node.core.directory import SEARCH_LIMIT, SYNC_MAX_ITEMS, normalise, specialty_terms
from node.core.errors import CabinetError, CorruptStore, RemoteProtocolError, StoreError, UsageError
from node.core.identity import Descriptor

DBFILE = "bootstrap.db"
SCHEMA_VERSION = 2                   # 2: specialties indexed under their usual forms (1 is migrated)
MAX_EXPIRY_MS = 400 * 86_400_000     # a descriptor may not claim to be valid for longer than this
PURGE_AFTER_MS = 30 * 86_400_000     # expired descriptors are reduced to a tombstone this long after expiry
SYNC_MAX_BYTES = 1 << 20
READERS = 4
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS descriptors (
    id        INTEGER PRIMARY KEY,
    node_id   TEXT NOT NULL UNIQUE,
    seq       INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    name      TEXT NOT NULL,
    specialty TEXT NOT NULL,
    city      TEXT NOT NULL,
    rpps      TEXT NOT NULL,
    change    INTEGER NOT NULL UNIQUE,
    raw       BLOB NOT NULL,
    revoked   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS descriptors_expires ON descriptors (expires);
CREATE INDEX IF NOT EXISTS descriptors_rpps ON descriptors (rpps);
CREATE VIRTUAL TABLE IF NOT EXISTS descriptors_fts
    USING fts5(text, tokenize = 'unicode61 remove_diacritics 0', prefix = '1 2 3');
CREATE TABLE IF NOT EXISTS peers (
    url    TEXT PRIMARY KEY,
    db     BLOB NOT NULL,
    cursor INTEGER NOT NULL
);
"""


class Revoked(RemoteProtocolError):
    """A descriptor for a node whose keys were revoked: nothing replaces a revocation."""


class Expired(RemoteProtocolError):
    """A descriptor past its expiry, or claiming an expiry too far ahead."""


class Rollback(RemoteProtocolError):
    """A descriptor older (lower seq) than the one already stored for that node."""


class NewIdentityLimit(CabinetError):
    """Too many identities this bootstrap never saw, from one address block or in total, lately."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- text normalisation (node.core.directory.normalise) ------------------------------

def match_expression(query: str) -> str:
    """All words must match, each as a word prefix. Tokens are [^\\W_]+, so quoting is safe."""
    return " ".join(f'"{w}"*' for w in codec.query_words(query))


def _search_text(d: Descriptor) -> str:
    return search_text(d.name, d.specialty, d.city, d.rpps)


def search_text(name: str, specialty: str, city: str, rpps: str) -> str:
    """What the index holds for a descriptor: its fields normalised, the specialty under all its usual forms."""
    return " ".join(t for t in (normalise(name), specialty_terms(specialty), normalise(city), normalise(rpps)) if t)


def _reindex(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: rebuild the search text of every live row (tombstones have none)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute("SELECT id, name, specialty, city, rpps FROM descriptors WHERE raw != x''").fetchall()
        for rowid, name, specialty, city, rpps in rows:
            conn.execute("DELETE FROM descriptors_fts WHERE rowid = ?", (rowid,))
            conn.execute("INSERT INTO descriptors_fts (rowid, text) VALUES (?, ?)",
                         (rowid, search_text(name, specialty, city, rpps)))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --- schema -------------------------------------------------------------------------

def connect(path: Path, *, readonly: bool = False) -> sqlite_utils.Database:
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=30)
        else:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        if readonly:
            return sqlite_utils.Database(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a power cut may lose the last announces, never corrupt the file; peers resend.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?), ('db_id', ?)",
                         (SCHEMA_VERSION, os.urandom(16)))
        elif version[0] == 1:
            _reindex(conn)
        elif version[0] != SCHEMA_VERSION:
            raise CorruptStore(f"bootstrap database schema {version[0]} is not supported by this version")
        return sqlite_utils.Database(conn)
    except sqlite3.DatabaseError as exc:
        raise CorruptStore(f"{path.name} is damaged or not a bootstrap database ({exc})") from None


def db_id(db: sqlite_utils.Database) -> bytes:
    """A random ID for this database file: a peer that sees it change starts its cursor over."""
    return db.execute("SELECT value FROM meta WHERE key='db_id'").fetchone()[0]


class transaction:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.conn = db.conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


# --- writes -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Stored:
    node_id: str
    seq: int
    changed: bool           # False: the same (or a preferred) descriptor was already there


def verify(raw: bytes, now_ms: int) -> Descriptor:
    """The checks every stored descriptor passed: signature, ID, fields, expiry."""
    try:
        d = Descriptor.from_wire(raw)
    except TypeError:       # a non-map body slips past from_wire's checks as TypeError
        raise RemoteProtocolError("descriptor: malformed") from None
    if d.expired(now_ms) and not d.revoked:        # a revocation stays valid for ever
        raise Expired("descriptor has expired")
    if d.expires > now_ms + MAX_EXPIRY_MS:
        raise Expired("descriptor expiry is too far in the future")
    return d


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


Admit = Callable[[], None]     # raises NewIdentityLimit when a new identity is over its quota


def _store(conn: sqlite3.Connection, d: Descriptor, admit: Admit | None = None) -> Stored:
    row = conn.execute("SELECT id, seq, raw, revoked FROM descriptors WHERE node_id = ?", (d.node_id,)).fetchone()
    if row is None and admit is not None:
        admit()                    # a node ID never seen here (tombstones count as seen)
    if row is not None:
        rowid, seq, raw, revoked = row
        if revoked:
            if raw == d.signed:
                return Stored(d.node_id, seq, False)
            raise Revoked("this node revoked its keys; a revocation is final")
        if d.seq < seq:
            raise Rollback(f"descriptor seq {d.seq} is older than the stored seq {seq}")
        # Equal seq: a no-op, except that two different descriptors signed with one seq are settled
        # the same way everywhere (higher digest wins), so the bootstraps still converge.
        if d.seq == seq and (raw == d.signed or _digest(raw) > _digest(d.signed)):
            return Stored(d.node_id, seq, False)
    change = conn.execute("SELECT coalesce(max(change), 0) + 1 FROM descriptors").fetchone()[0]
    values = (d.seq, d.expires, d.name, d.specialty, d.city, d.rpps, change, d.signed, int(d.revoked))
    if row is None:
        cur = conn.execute("INSERT INTO descriptors (seq, expires, name, specialty, city, rpps, change, raw, revoked,"
                           " node_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values + (d.node_id,))
        rowid = cur.lastrowid
    else:
        conn.execute("UPDATE descriptors SET seq=?, expires=?, name=?, specialty=?, city=?, rpps=?, change=?, raw=?,"
                     " revoked=? WHERE id=?", values + (rowid,))
        conn.execute("DELETE FROM descriptors_fts WHERE rowid = ?", (rowid,))
    if not d.revoked:              # a revoked node is still found by ID (to learn it), not by search
        conn.execute("INSERT INTO descriptors_fts (rowid, text) VALUES (?, ?)", (rowid, _search_text(d)))
    return Stored(d.node_id, d.seq, True)


def put(db: sqlite_utils.Database, raw: bytes, now_ms: int, admit: Admit | None = None) -> Stored:
    """Verify and store one descriptor; raise the reason it was refused.

    `admit` is called (on this, the writer thread) only for a node ID never seen before.
    """
    d = verify(raw, now_ms)
    with transaction(db) as conn:
        return _store(conn, d, admit)


@dataclass(slots=True)
class BatchResult:
    stored: list[str]
    unchanged: int = 0
    older: int = 0          # a peer that has not caught up yet: normal, not an attack
    refused: int = 0


def put_many(db: sqlite_utils.Database, raws: Iterable[bytes], now_ms: int,
             peer: tuple[str, bytes, int] | None = None) -> BatchResult:
    """Verify and store a batch in one transaction, skipping what is refused.

    `peer` = (url, peer's db id, cursor): the replication cursor is saved in the
    same transaction as the batch it follows.
    """
    result = BatchResult(stored=[])
    checked = []
    for raw in raws:
        try:
            checked.append(verify(raw, now_ms))
        except CabinetError:
            result.refused += 1
    with transaction(db) as conn:
        for d in checked:
            try:
                s = _store(conn, d)
            except (Rollback, Revoked):
                result.older += 1
                continue
            if s.changed:
                result.stored.append(s.node_id)
            else:
                result.unchanged += 1
        if peer is not None:
            conn.execute("INSERT OR REPLACE INTO peers (url, db, cursor) VALUES (?, ?, ?)", peer)
    return result


def peer_cursor(db: sqlite_utils.Database, url: str) -> tuple[bytes, int]:
    row = db.execute("SELECT db, cursor FROM peers WHERE url = ?", (url,)).fetchone()
    return (row[0], row[1]) if row else (b"", 0)


def purge(db: sqlite_utils.Database, now_ms: int) -> int:
    """Reduce long-expired descriptors to (node_id, seq): no personal details kept, rollback still refused."""
    with transaction(db) as conn:
        # Revocations are kept whole: they must outlive any copy of the key.
        ids = [r[0] for r in conn.execute("SELECT id FROM descriptors WHERE expires < ? AND raw != x'' "
                                          "AND revoked = 0", (now_ms - PURGE_AFTER_MS,))]
        for rowid in ids:
            conn.execute("UPDATE descriptors SET name='', specialty='', city='', rpps='', raw=x'' WHERE id=?", (rowid,))
            conn.execute("DELETE FROM descriptors_fts WHERE rowid = ?", (rowid,))
    return len(ids)


# --- reads --------------------------------------------------------------------------

def get(db: sqlite_utils.Database, node_id: str, now_ms: int) -> bytes | None:
    row = db.execute("SELECT raw FROM descriptors WHERE node_id = ? AND (expires > ? OR revoked = 1)",
                     (node_id, now_ms)).fetchone()
    return row[0] if row and row[0] else None         # b"": a purged tombstone


def _search_rows(db: sqlite_utils.Database, query: str, now_ms: int, limit: int) -> list[tuple]:
    return db.execute(
        "SELECT d.raw, d.node_id, d.name, d.city, d.rpps FROM descriptors_fts f JOIN descriptors d ON d.id = f.rowid"
        " WHERE descriptors_fts MATCH ? AND d.expires > ? LIMIT ?",
        (match_expression(query), now_ms, min(limit, SEARCH_LIMIT))).fetchall()


def search(db: sqlite_utils.Database, query: str, now_ms: int, limit: int = SEARCH_LIMIT) -> list[bytes]:
    """Descriptors where every word of `query` starts a word of name, specialty, city or RPPS."""
    return [r[0] for r in _search_rows(db, query, now_ms, limit)]


def search_flagged(db: sqlite_utils.Database, query: str, now_ms: int,
                   limit: int = SEARCH_LIMIT) -> tuple[list[bytes], list[list[str]]]:
    """`search`, and for each result the other live identities' claims it collides with
    (codec.SAME_RPPS, codec.SAME_NAME_CITY), looked for in the whole directory."""
    rows = _search_rows(db, query, now_ms, limit)
    return [r[0] for r in rows], [conflicts(db, node_id, name, city, rpps, now_ms)
                                  for _, node_id, name, city, rpps in rows]


CANDIDATES = 200


def conflicts(db: sqlite_utils.Database, node_id: str, name: str, city: str, rpps: str, now_ms: int) -> list[str]:
    flags = []
    live = "d.node_id != ? AND d.expires > ? AND d.revoked = 0"
    if rpps and db.execute(f"SELECT 1 FROM descriptors d WHERE d.rpps = ? AND {live} LIMIT 1",
                           (rpps, node_id, now_ms)).fetchone():
        flags.append(codec.SAME_RPPS)
    key = codec.name_city_key(name, city)
    if key is not None:
        # The index finds the candidates (every word of the name and city, whole); the rule is the key.
        words = " ".join(f'"{w}"' for w in " ".join(key).split())
        rows = db.execute("SELECT d.name, d.city FROM descriptors_fts f JOIN descriptors d ON d.id = f.rowid"
                          f" WHERE descriptors_fts MATCH ? AND {live} LIMIT ?", (words, node_id, now_ms, CANDIDATES))
        if any(codec.name_city_key(n, c) == key for n, c in rows):
            flags.append(codec.SAME_NAME_CITY)
    return flags


@dataclass(frozen=True, slots=True)
class Page:
    items: list[bytes]
    last: int               # the change counter of the last row looked at (or `since` if none)
    more: bool


def changes(db: sqlite_utils.Database, since: int, limit: int, now_ms: int) -> Page:
    """Descriptors whose change counter is above `since`, in counter order; expired ones are skipped."""
    limit = max(1, min(limit, SYNC_MAX_ITEMS))
    rows = db.execute("SELECT change, expires, raw FROM descriptors WHERE change > ? ORDER BY change LIMIT ?",
                      (since, limit + 1)).fetchall()
    items: list[bytes] = []
    last, size = since, 0
    for change, expires, raw in rows[:limit]:
        if size + len(raw) > SYNC_MAX_BYTES and items:
            return Page(items, last, True)
        if expires > now_ms and raw:
            items.append(raw)
            size += len(raw)
        last = change
    return Page(items, last, len(rows) > limit)


def count(db: sqlite_utils.Database, now_ms: int) -> int:
    return db.execute("SELECT count(*) FROM descriptors WHERE expires > ?", (now_ms,)).fetchone()[0]


# --- threads --------------------------------------------------------------------------

class Storage:
    """`await storage.write(fn, ...)` on the one writer thread; `read` on reader threads (WAL)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / DBFILE
        private_folder(folder, self.path)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bootstrap-write")
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="bootstrap-read")
        self._local = threading.local()
        self._opened: list[sqlite_utils.Database] = []
        self.db = self._writer.submit(connect, self.path).result()
        self.db_id = db_id(self.db)

    def _reader(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, readonly=True)
            self._opened.append(db)
        return db

    def _read(self, fn: Callable[..., T], args: tuple) -> T:
        return _guarded(fn, self._reader(), args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, _guarded, fn, self.db, args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn, args)

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._writer.submit(_guarded, fn, self.db, args).result()

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        self._writer.submit(self.db.conn.close).result()
        self._writer.shutdown(wait=True)
        for db in self._opened:
            db.conn.close()


def private_folder(folder: Path, dbfile: Path) -> None:
    """The folder 0700 and the database 0600 (SQLite gives its -wal and -shm the database's mode)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        os.close(os.open(dbfile, os.O_RDWR | os.O_CREAT, 0o600))
        for path in (dbfile, Path(f"{dbfile}-wal"), Path(f"{dbfile}-shm")):
            if path.exists():
                os.chmod(path, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot use {folder} as the data folder: {exc.strerror or exc}") from None


def _guarded(fn: Callable[..., T], db: sqlite_utils.Database, args: tuple) -> T:
    try:
        return fn(db, *args)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"bootstrap database error: {exc.__class__.__name__}") from None
