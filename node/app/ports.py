"""What a service is built from: the ports, given explicitly, never the Node facade.

node/node.py is the only module that fills a `Ports` and hands it to the
services. A test (or a future replica, or a relay-side tool) builds its own:
an in-memory link as `client`, a fixed clock, a seeded rng. Services never
read the wall clock or `random` themselves; they ask `ports.clock()` and
`ports.rng`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..config import Config
from ..core.identity import Identity
from ..store.blobs import BlobStore
from ..store.db import Store
from ..transport.client import Peer
from .events import Event, EventBus


def wall_clock() -> int:
    """Unix time in milliseconds: the node's one clock."""
    return int(time.time() * 1000)


class Keys(Protocol):
    """The local keys that seal list details at rest and key the blind index."""

    @property
    def storage_key(self) -> bytes: ...

    @property
    def index_key(self) -> bytes: ...


class Locate(Protocol):
    def __call__(self, contact: dict) -> Peer: ...


@dataclass(slots=True, kw_only=True)
class Ports:
    """Mutable on purpose: a key rotation or a new config is seen by every service at once."""

    folder: Path
    config: Config
    identity: Identity
    keys: Keys
    store: Store
    blobs: BlobStore
    client: Any                        # transport.client.Client, or a test's in-memory link
    events: EventBus
    clock: Callable[[], int] = wall_clock
    rng: random.Random = field(default_factory=random.Random)

    def now(self) -> int:
        return self.clock()

    def publish(self, event: Event) -> None:
        self.events.publish(event)
