"""Who may use the local API and the web app: accounts, API tokens, browser sessions, sign-in throttling.

Built from ports like every service. Passwords are kept as Argon2id hashes
(libsodium's "interactive" limits; CABINET_KDF=min in tests), tokens and
session IDs as HMAC-SHA256 under the node's index key, so a copy of the
database alone neither signs anyone in nor yields a usable token. Tokens,
session IDs and CSRF tokens come from the operating system's CSPRNG
(never `ports.rng`, which is for jitter).

Roles: a "practitioner" may do everything; a "secretary" may list, send,
follow deliveries and manage contacts, but not open a record's letter or
attachments, nor reply (replying opens the record). API tokens carry scopes
instead (SCOPES). Failed sign-ins make the account and the source wait, twice
as long after each failure (in memory: a restart forgets, which only helps the
practice), are logged with the account name only, and are published as
`SignInFailed`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import nacl.exceptions
import nacl.pwhash
import nacl.utils

from ..core.errors import AuthenticationFailed, NotFound, UsageError
from ..store import accounts as table
from .events import AuditAppended, SignInFailed
from .ports import Ports

log = logging.getLogger("cabinet.accounts")

ROLES = ("practitioner", "secretary")
SCOPES = ("send", "read", "contacts", "patients", "admin")
TOKEN_PREFIX = "cab_"
MIN_PASSWORD = 10
IDLE_MS = 30 * 60_000               # a browser session ends after 30 min without a request ...
ABSOLUTE_MS = 12 * 3600_000         # ... and 12 h after sign-in, whatever happens
FIRST_DELAY_MS, MAX_DELAY_MS = 1000, 15 * 60_000
_NAME = re.compile(r"^[\w.@-]{1,64}$")
_DUMMY = b""                         # set on first use: a hash to verify against for unknown accounts


class TooManyAttempts(AuthenticationFailed):
    """Sign-in refused without checking the password: this account or source must wait."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"too many failed sign-ins: try again in {max(1, -(-retry_after_ms // 1000))} s")
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an account signed in through a session, or an API token."""

    account: str                     # the account name, or "token:NAME"
    role: str                        # practitioner, secretary, or "token"
    via: str                         # "session" or "token"
    scopes: frozenset[str] = frozenset()
    csrf: str = ""
    session_hash: bytes = b""

    def may(self, scope: str, letters: bool = False) -> bool:
        """`scope`: what a token must hold; `letters`: the route opens a record's content."""
        if self.via == "token":
            return scope in self.scopes
        return self.role == "practitioner" or not letters


def _kdf() -> tuple[int, int]:
    if os.environ.get("CABINET_KDF") == "min":
        return nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN
    return nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE


def hash_password(password: str) -> bytes:
    ops, mem = _kdf()
    return nacl.pwhash.argon2id.str(password.encode("utf-8"), opslimit=ops, memlimit=mem)


def verify_password(pw_hash: bytes, password: str) -> bool:
    try:
        return nacl.pwhash.verify(pw_hash, password.encode("utf-8"))
    except (nacl.exceptions.InvalidkeyError, nacl.exceptions.CryptoError, ValueError):
        return False


def check_name(name: str, what: str = "account") -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise UsageError(f"an {what} name is 1 to 64 letters, digits, '.', '_', '-' or '@'")
    return name


def _random_text(n: int = 32) -> str:
    return base64.urlsafe_b64encode(nacl.utils.random(n)).decode("ascii").rstrip("=")


@dataclass
class Throttle:
    """Exponential waits after failed sign-ins, per key (an account, a source address); bounded memory."""

    clock: Callable[[], int]
    limit: int = 10_000
    _fails: OrderedDict = field(default_factory=OrderedDict)     # key -> (count, until_ms)

    def wait_ms(self, keys: list[str]) -> int:
        now = self.clock()
        return max((self._fails.get(k, (0, 0))[1] - now for k in keys), default=0)

    def failed(self, keys: list[str]) -> int:
        now, longest = self.clock(), 0
        for k in keys:
            count = self._fails.pop(k, (0, 0))[0] + 1
            delay = min(FIRST_DELAY_MS << min(count - 1, 20), MAX_DELAY_MS)
            self._fails[k] = (count, now + delay)
            longest = max(longest, delay)
        while len(self._fails) > self.limit:
            self._fails.popitem(last=False)
        return longest

    def succeeded(self, keys: list[str]) -> None:
        for k in keys:
            self._fails.pop(k, None)


class AccountService:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.clock: Callable[[], int] = ports.now         # a test may replace it
        self.idle_ms, self.absolute_ms = IDLE_MS, ABSOLUTE_MS
        self.throttle = Throttle(lambda: self.clock())
        self._ready = False
        self._verifying = asyncio.Semaphore(2)             # Argon2id takes 64 MiB each: bound them

    async def _db(self, fn, *args, **kwargs):
        if not self._ready:
            await self.ports.store.call(table.ensure_schema)
            self._ready = True
        return await self.ports.store.call(fn, *args, **kwargs)

    def _keyed(self, purpose: bytes, value: str) -> bytes:
        return hmac.new(self.ports.keys.index_key, purpose + b"\0" + value.encode("utf-8"), hashlib.sha256).digest()

    # --- accounts -------------------------------------------------------------------

    async def add_user(self, name: str, role: str, password: str) -> None:
        name = check_name(name)
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
        if len(password) < MIN_PASSWORD:
            raise UsageError(f"password too short: use at least {MIN_PASSWORD} characters")
        pw_hash = await asyncio.to_thread(hash_password, password)
        await self._db(table.add_account, name, role, pw_hash, self.clock())

    async def users(self) -> list[dict]:
        return await self._db(table.list_accounts)

    async def remove_user(self, name: str) -> None:
        await self._db(table.remove_account, name.strip(), self.clock())

    # --- tokens ---------------------------------------------------------------------

    async def add_token(self, name: str, scopes: list[str]) -> str:
        """Make a token; its value is returned once and never stored."""
        name = check_name(name, "a token")
        scopes = sorted({s.strip() for s in scopes if s.strip()})
        unknown = [s for s in scopes if s not in SCOPES]
        if not scopes or unknown:
            raise UsageError(f"scopes are some of: {', '.join(SCOPES)}" + (f" (not {unknown[0]!r})" if unknown else ""))
        value = TOKEN_PREFIX + _random_text()
        await self._db(table.add_token, name, self._keyed(b"api-token", value), scopes, self.clock())
        return value

    async def tokens(self) -> list[dict]:
        return await self._db(table.list_tokens)

    async def revoke_token(self, name: str) -> None:
        await self._db(table.revoke_token, name.strip(), self.clock())

    async def by_token(self, value: str) -> Principal | None:
        if not value.startswith(TOKEN_PREFIX) or len(value) > 200:
            return None
        row = await self._db(table.token, self._keyed(b"api-token", value))
        if row is None:
            return None
        now = self.clock()
        if not row["last_used"] or now - row["last_used"] > 60_000:
            await self._db(table.touch_token, row["name"], now)
        return Principal(f"token:{row['name']}", "token", "token", frozenset(row["scopes"].split(",")))

    # --- sessions -------------------------------------------------------------------

    async def sign_in(self, name: str, password: str, source: str) -> tuple[str, Principal]:
        """A new session for a right account name and password; returns (session ID, principal)."""
        name = name.strip()[:64]
        keys = [f"account:{name.casefold()}", f"source:{source}"]
        wait = self.throttle.wait_ms(keys)
        if wait > 0:
            raise TooManyAttempts(wait)
        row = await self._db(table.get_account, name) if _NAME.match(name) else None
        async with self._verifying:
            good = await asyncio.to_thread(_check, row["pw_hash"] if row else None, password)
        if not (row and good):
            delay = self.throttle.failed(keys)
            await self._db(table.sign_in_failed, name, self.clock())
            log.warning("failed sign-in for account %r; next attempt in %d s", name, delay // 1000)
            self.ports.publish(SignInFailed(at=self.clock(), account=name, retry_after_ms=delay))
            raise AuthenticationFailed("wrong account name or password")
        self.throttle.succeeded(keys)
        sid, csrf = _random_text(), _random_text()
        await self._db(table.signed_in, row["name"], self._keyed(b"web-session", sid), csrf, self.clock())
        return sid, Principal(row["name"], row["role"], "session", csrf=csrf,
                              session_hash=self._keyed(b"web-session", sid))

    async def by_session(self, sid: str) -> Principal | None:
        if not sid or len(sid) > 200:
            return None
        h = self._keyed(b"web-session", sid)
        row = await self._db(table.session, h)
        if row is None:
            return None
        now = self.clock()
        if now - row["last_seen"] > self.idle_ms or now - row["created"] > self.absolute_ms:
            await self._db(table.end_session, h, now, "session-expired")
            return None
        if now - row["last_seen"] > 5_000:
            await self._db(table.touch_session, h, now)
        return Principal(row["account"], row["role"], "session", csrf=row["csrf"], session_hash=h)

    async def sign_out(self, who: Principal) -> None:
        if who.session_hash:
            await self._db(table.end_session, who.session_hash, self.clock())

    async def audit(self, who: Principal, event: str, *, record: str | None = None, peer: str | None = None,
                    **more: object) -> None:
        """An audit entry naming the account (or token) that acted."""
        await self._db(table.log, at=self.clock(), event=event, account=who.account, record=record, peer=peer,
                       via=who.via, **more)
        self.ports.publish(AuditAppended(at=self.clock(), event=event))

    async def require(self, name: str) -> dict:
        row = await self._db(table.get_account, name)
        if row is None:
            raise NotFound(f"no account named {name!r}")
        return row


def _check(pw_hash: bytes | None, password: str) -> bool:
    """Unknown accounts cost the same Argon2id work as known ones (no account-name oracle by timing)."""
    return verify_password(pw_hash or _dummy_hash(), password) and pw_hash is not None


def _dummy_hash() -> bytes:
    global _DUMMY
    if not _DUMMY:
        _DUMMY = hash_password(_random_text())
    return _DUMMY
