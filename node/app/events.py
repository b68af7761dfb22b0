"""One event stream: typed facts published by the services, read by the faces.

Services publish what happened (a record arrived, a delivery moved, a record
was opened, something was refused, the audit log grew, a key changed, a peer
was seen); faces and monitors subscribe instead of polling SQL. Events carry
identifiers, states and counts, never patient data (no name, subject or file
name), so any subscriber may log or count them.

Publishing never blocks and never fails the publisher: each subscriber has a
bounded queue, and a subscriber that falls behind loses its oldest events and
is told how many it missed (`Subscription.missed`), as a live page that
reloads its lists would want.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import AsyncIterator, Callable


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    at: int                    # Unix ms, from the node's clock


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordReceived(Event):
    record_id: str
    sender: str
    kind: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordStored(Event):
    """A record this node wrote (sent, replied, re-sealed for a grant) is in the outbox."""

    record_id: str
    kind: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryChanged(Event):
    record_id: str
    recipient: str
    state: str                 # an outbox state (node/sync/outbox.py)
    sent_bytes: int = 0
    reason: str = ""           # why it is still queued or was refused, in plain words


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordOpened(Event):
    record_id: str
    how: str                   # read, export, read-for-reply, ...
    by: str = ""               # a colleague's node ID when its "opened" receipt came back


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal(Event):
    peer: str                  # node ID, or "" for a caller not yet identified
    reason: str                # a short code: invalid-envelope, quota, consent, ...
    record_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditAppended(Event):
    event: str                 # the audit event's name, e.g. "sent", "export", "break-glass"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChanged(Event):
    node_id: str
    status: str                # rotated (a new encryption key), held (a new identity key), revoked


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSeen(Event):
    node_id: str
    url: str
    verified: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SignInFailed(Event):
    """A wrong account name or password at the local API's sign-in (the account name only)."""

    account: str
    retry_after_ms: int        # how long this account and source are now made to wait


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertRaised(Event):
    """An abusive-access or health rule fired (node/app/alerts.py): never a patient."""

    alert_id: int
    rule: str
    subject: str               # an account, a peer's node ID, or "node"
    count: int
    new: bool                  # False: an open alert of this rule and subject was brought up to date


class Subscription:
    """One reader's bounded queue of events."""

    def __init__(self, bus: "EventBus", size: int, want: Callable[[Event], bool]) -> None:
        self._bus, self._want = bus, want
        self._queue: collections.deque[Event] = collections.deque(maxlen=size)
        self._ready = asyncio.Event()
        self.missed = 0

    def _put(self, event: Event) -> None:
        if not self._want(event):
            return
        if len(self._queue) == self._queue.maxlen:
            self.missed += 1
        self._queue.append(event)
        self._ready.set()

    def pending(self) -> list[Event]:
        """Take what is queued now, without waiting."""
        out = list(self._queue)
        self._queue.clear()
        self._ready.clear()
        return out

    async def get(self) -> Event:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        event = self._queue.popleft()
        if not self._queue:
            self._ready.clear()
        return event

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.get()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.published = 0

    def publish(self, event: Event) -> None:
        self.published += 1
        for sub in list(self._subs):
            sub._put(event)

    def subscribe(self, *types: type[Event], size: int = 1000) -> Subscription:
        """Events of these types (all when none is named), from now on."""
        sub = Subscription(self, size, (lambda e: isinstance(e, types)) if types else (lambda e: True))
        self._subs.add(sub)
        return sub
