"""One SQLite transaction: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error.

Its own module so that every store module (db, records, patients) can use it
without importing the one that builds the schema from them.
"""

from __future__ import annotations

import sqlite3

import sqlite_utils


class transaction:
    """`with transaction(db):` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.conn = db.conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
