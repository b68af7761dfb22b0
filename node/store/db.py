"""The SQLite database and the one thread that touches it.

sqlite-utils over one connection, used only from a single worker thread, so
the event loop never blocks on SQLite and writes are serialised (the pattern
of datasette's execute_write_fn). WAL with synchronous=FULL: a commit that
returned is on disk, which is what lets the receiver acknowledge a record
right after committing it. secure_delete overwrites freed pages.

The database file, its -wal and -shm are 0600 whatever the umask: the file is
made 0600 before SQLite opens it (SQLite gives its WAL and SHM the database
file's mode) and any older ones are set to 0600 when opened.

Schema 3: a record is its sender's ID and its own (PRIMARY KEY (id, sender)),
so another sender's record under the same ID never keeps a genuine one out.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import sqlite_utils

from ..core.errors import CorruptStore, StoreError
from .tx import transaction
from .patients import SCHEMA as PATIENTS_SCHEMA

DBFILE = "cabinet.db"
SCHEMA_VERSION = 3
FILE_MODE = 0o600
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS contacts (
    node_id    TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    sign_key   BLOB NOT NULL,
    descriptor BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    verified   INTEGER NOT NULL DEFAULT 0,
    held       INTEGER NOT NULL DEFAULT 0,
    replaces   TEXT,
    revoked    INTEGER NOT NULL DEFAULT 0,
    added      INTEGER NOT NULL,
    updated    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id         TEXT NOT NULL,
    direction  TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    kind       TEXT NOT NULL,
    sender     TEXT NOT NULL,
    thread     TEXT NOT NULL,
    reply_to   TEXT,
    created    INTEGER NOT NULL,
    stored     INTEGER NOT NULL,
    head       BLOB NOT NULL,
    body_size  INTEGER NOT NULL,
    meta       BLOB NOT NULL,
    patient_ix BLOB NOT NULL,
    opened     INTEGER,
    seq        INTEGER,
    body       BLOB,
    PRIMARY KEY (id, sender)
);
CREATE UNIQUE INDEX IF NOT EXISTS records_stream ON records (sender, seq) WHERE direction = 'in';
CREATE INDEX IF NOT EXISTS records_thread ON records (thread, created);
CREATE INDEX IF NOT EXISTS records_patient ON records (patient_ix);
CREATE INDEX IF NOT EXISTS records_listing ON records (direction, stored);
CREATE INDEX IF NOT EXISTS records_inbox ON records (direction, (opened IS NOT NULL), created DESC, id);
CREATE TABLE IF NOT EXISTS deliveries (
    record_id  TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   INTEGER NOT NULL,
    last_error TEXT,
    sent_bytes INTEGER NOT NULL DEFAULT 0,
    updated    INTEGER NOT NULL,
    delivered  INTEGER,
    receipt    BLOB,
    opened     INTEGER,
    opened_receipt BLOB,
    stale      INTEGER NOT NULL DEFAULT 0,
    refused    INTEGER,
    PRIMARY KEY (record_id, recipient),
    UNIQUE (recipient, seq)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_try);
DROP INDEX IF EXISTS deliveries_updated;          -- no query reads by `updated` since outbox_changes
-- Every change to what a sender session holds of a delivery, numbered in commit order (the
-- number is given under SQLite's write lock): a courier takes in what changed since the last
-- number it saw, its own process's changes and another's (`cabinet send`) alike, without
-- rereading the outbox (records.outbox_changes). Old numbers are pruned; a reader that fell
-- behind the pruning reloads every pending delivery.
CREATE TABLE IF NOT EXISTS outbox_changes (
    n         INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    seq       INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS outbox_changed_on_insert AFTER INSERT ON deliveries
    BEGIN INSERT INTO outbox_changes (recipient, seq) VALUES (NEW.recipient, NEW.seq); END;
CREATE TRIGGER IF NOT EXISTS outbox_changed_on_update AFTER UPDATE OF state, attempts, next_try, stale
    ON deliveries
    BEGIN INSERT INTO outbox_changes (recipient, seq) VALUES (NEW.recipient, NEW.seq); END;
CREATE TABLE IF NOT EXISTS streams_in (
    sender TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refused_in (
    sender    TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (sender, seq)
);
CREATE TABLE IF NOT EXISTS receipts_out (
    record_id TEXT NOT NULL,
    to_node   TEXT NOT NULL,
    status    TEXT NOT NULL,
    receipt   BLOB NOT NULL,
    sent      INTEGER,
    PRIMARY KEY (record_id, to_node, status)
);
CREATE INDEX IF NOT EXISTS receipts_out_due ON receipts_out (to_node) WHERE sent IS NULL;
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY,
    at     INTEGER NOT NULL,
    event  TEXT NOT NULL,
    record TEXT,
    peer   TEXT,
    detail TEXT,
    prev   BLOB NOT NULL,
    hash   BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def _private(path: Path, *, create: bool = False) -> None:
    """The database file (created empty if new), its WAL and SHM: 0600.

    Only chmod once SQLite has the file open: closing any descriptor of a file
    drops every POSIX lock this process holds on it, SQLite's included, and
    another process closing its own connection would then take itself for the
    last one and delete the WAL under our feet.
    """
    if create:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            pass                      # never open an existing one here: see above
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            os.chmod(p, FILE_MODE)
        except FileNotFoundError:
            pass


def connect(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) the database file and bring the schema up to date."""
    try:
        _private(path, create=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        db = sqlite_utils.Database(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(SCHEMA + PATIENTS_SCHEMA)
        version = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif version[0] != SCHEMA_VERSION:
            _migrate(conn, version[0])
            conn.executescript(SCHEMA + PATIENTS_SCHEMA)      # the indexes of rebuilt tables
        _private(path)                                          # the WAL and SHM SQLite just made
        return db
    except sqlite3.DatabaseError as exc:
        raise CorruptStore(f"the database {path.name} is damaged or not a cabinet database ({exc})") from None


def _rebuild(table: str) -> list[str]:
    """Recreate `table` as SCHEMA now defines it, keeping its rows (SQLite cannot change a key)."""
    start = SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {table} (")
    create = SCHEMA[start:SCHEMA.index(");", start) + 2].replace(f"EXISTS {table} (", f"EXISTS {table}_new (")
    return [create, f"INSERT INTO {table}_new SELECT * FROM {table}", f"DROP TABLE {table}",
            f"ALTER TABLE {table}_new RENAME TO {table}"]


# Each step takes a database at version N to N + 1, in one transaction.
MIGRATIONS = {
    1: ["ALTER TABLE deliveries ADD COLUMN refused INTEGER"],      # a refused delivery (sync v1.1)
    # A record is keyed by (id, sender); deliveries can no longer reference records (id) alone.
    2: _rebuild("records") + _rebuild("deliveries"),
}


def _migrate(conn: sqlite3.Connection, version: object) -> None:
    if not isinstance(version, int) or not 1 <= version < SCHEMA_VERSION:
        raise CorruptStore(f"database schema {version} is not supported by this version")
    conn.execute("PRAGMA foreign_keys=OFF")          # tables are rebuilt; settable only outside a transaction
    try:
        for step in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql in MIGRATIONS[step]:
                    conn.execute(sql)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (step + 1,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")


class Store:
    """Async facade: `await store.call(fn, *args)` runs fn(db, *args) on the database thread."""

    def __init__(self, path: Path) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-db")
        self.db = self._pool.submit(connect, path).result()

    def call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._pool.submit(_guarded, fn, self.db, args, kwargs).result()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _guarded, fn, self.db, args, kwargs)

    def close(self) -> None:
        try:
            self._pool.submit(self.db.conn.close).result()
        finally:
            self._pool.shutdown(wait=True)


def _guarded(fn: Callable[..., T], db: sqlite_utils.Database, args: tuple, kwargs: dict) -> T:
    try:
        return fn(db, *args, **kwargs)
    except OverflowError:
        raise StoreError("a number too large to store") from None
    except sqlite3.DatabaseError as exc:
        if "disk" in str(exc) or "full" in str(exc):
            raise StoreError(f"the database could not be written: {exc}") from None
        raise StoreError(f"database error: {exc}") from None
