"""People's accounts, API tokens and browser sessions: the tables and plain functions over them.

Run on the database thread (db.Store). Nothing here holds a secret in plain:
an account keeps its Argon2id password hash, a token and a session are found
by a hash of their value (app/accounts.py computes it). Creating, removing and
revoking are appended to the hash-chained audit log in the same transaction,
naming the account or token only (`detail` is JSON: {"account": NAME, ...}).

The tables are created by `ensure_schema` (CREATE ... IF NOT EXISTS), so this
module does not depend on db.SCHEMA or its migrations.
"""

from __future__ import annotations

import json

import sqlite_utils

from ..core.errors import AlreadyExists, NotFound
from . import audit
from .tx import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    name       TEXT PRIMARY KEY COLLATE NOCASE,
    role       TEXT NOT NULL,
    pw_hash    BLOB NOT NULL,
    created    INTEGER NOT NULL,
    last_login INTEGER
);
CREATE TABLE IF NOT EXISTS api_tokens (
    name      TEXT PRIMARY KEY COLLATE NOCASE,
    hash      BLOB NOT NULL UNIQUE,
    scopes    TEXT NOT NULL,
    created   INTEGER NOT NULL,
    last_used INTEGER,
    revoked   INTEGER
);
CREATE TABLE IF NOT EXISTS web_sessions (
    hash      BLOB PRIMARY KEY,
    account   TEXT NOT NULL COLLATE NOCASE,
    csrf      TEXT NOT NULL,
    created   INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_account ON web_sessions (account);
"""


def ensure_schema(db: sqlite_utils.Database) -> None:
    db.conn.executescript(SCHEMA)


def _detail(**fields: object) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def log(db: sqlite_utils.Database, *, at: int, event: str, account: str, record: str | None = None,
        peer: str | None = None, **more: object) -> None:
    """An audit entry naming the account (and what it did), never patient data."""
    with transaction(db):
        audit.append(db, at=at, event=event, record=record, peer=peer, detail=_detail(account=account, **more))


# --- accounts -------------------------------------------------------------------------

def add_account(db: sqlite_utils.Database, name: str, role: str, pw_hash: bytes, now: int) -> None:
    with transaction(db) as conn:
        if conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"an account named {name!r} already exists")
        conn.execute("INSERT INTO accounts (name, role, pw_hash, created) VALUES (?,?,?,?)",
                     (name, role, pw_hash, now))
        audit.append(db, at=now, event="account-added", detail=_detail(account=name, role=role))


def get_account(db: sqlite_utils.Database, name: str) -> dict | None:
    rows = list(db.query("SELECT name, role, pw_hash, created, last_login FROM accounts WHERE name = ?", [name]))
    return rows[0] if rows else None


def list_accounts(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT name, role, created, last_login FROM accounts ORDER BY name"))


def remove_account(db: sqlite_utils.Database, name: str, now: int) -> None:
    with transaction(db) as conn:
        if conn.execute("DELETE FROM accounts WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no account named {name!r}")
        conn.execute("DELETE FROM web_sessions WHERE account = ?", (name,))
        audit.append(db, at=now, event="account-removed", detail=_detail(account=name))


def signed_in(db: sqlite_utils.Database, name: str, session_hash: bytes, csrf: str, now: int) -> None:
    with transaction(db) as conn:
        conn.execute("UPDATE accounts SET last_login = ? WHERE name = ?", (now, name))
        conn.execute("INSERT INTO web_sessions (hash, account, csrf, created, last_seen) VALUES (?,?,?,?,?)",
                     (session_hash, name, csrf, now, now))
        audit.append(db, at=now, event="signed-in", detail=_detail(account=name))


def sign_in_failed(db: sqlite_utils.Database, name: str, now: int) -> None:
    log(db, at=now, event="sign-in-failed", account=name[:64])


# --- sessions -------------------------------------------------------------------------

def session(db: sqlite_utils.Database, session_hash: bytes) -> dict | None:
    rows = list(db.query("SELECT s.hash, s.account, s.csrf, s.created, s.last_seen, a.role FROM web_sessions s "
                         "JOIN accounts a ON a.name = s.account WHERE s.hash = ?", [session_hash]))
    return rows[0] if rows else None


def touch_session(db: sqlite_utils.Database, session_hash: bytes, now: int) -> None:
    with transaction(db) as conn:
        conn.execute("UPDATE web_sessions SET last_seen = ? WHERE hash = ?", (now, session_hash))


def end_session(db: sqlite_utils.Database, session_hash: bytes, now: int, why: str = "signed-out") -> None:
    with transaction(db) as conn:
        row = conn.execute("SELECT account FROM web_sessions WHERE hash = ?", (session_hash,)).fetchone()
        if row is None:
            return
        conn.execute("DELETE FROM web_sessions WHERE hash = ?", (session_hash,))
        audit.append(db, at=now, event=why, detail=_detail(account=row[0]))


def expire_sessions(db: sqlite_utils.Database, idle_before: int, created_before: int) -> int:
    with transaction(db) as conn:
        return conn.execute("DELETE FROM web_sessions WHERE last_seen < ? OR created < ?",
                            (idle_before, created_before)).rowcount


# --- API tokens -----------------------------------------------------------------------

def add_token(db: sqlite_utils.Database, name: str, token_hash: bytes, scopes: list[str], now: int) -> None:
    with transaction(db) as conn:
        if conn.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a token named {name!r} already exists (revoke it first, or pick another name)")
        conn.execute("INSERT INTO api_tokens (name, hash, scopes, created) VALUES (?,?,?,?)",
                     (name, token_hash, ",".join(scopes), now))
        audit.append(db, at=now, event="token-added", detail=_detail(token=name, scopes=scopes))


def list_tokens(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT name, scopes, created, last_used, revoked FROM api_tokens ORDER BY name"))


def revoke_token(db: sqlite_utils.Database, name: str, now: int) -> None:
    """A revoked token's row is deleted: its name can be reused, and nothing finds it by its hash."""
    with transaction(db) as conn:
        if conn.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount == 0:
            raise NotFound(f"no token named {name!r}")
        audit.append(db, at=now, event="token-revoked", detail=_detail(token=name))


def token(db: sqlite_utils.Database, token_hash: bytes) -> dict | None:
    rows = list(db.query("SELECT name, scopes, created, last_used FROM api_tokens WHERE hash = ?", [token_hash]))
    return rows[0] if rows else None


def touch_token(db: sqlite_utils.Database, name: str, now: int) -> None:
    with transaction(db) as conn:
        conn.execute("UPDATE api_tokens SET last_used = ? WHERE name = ?", (now, name))
