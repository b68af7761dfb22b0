"""Disk space for incoming data: a quota per contact and a reserve no incoming data may use.

Every upload (the whole body of a PUT record, partial bytes included) and
every batch reserves its bytes here, atomically under one lock, before a byte
is written; the reservation ends when the upload ends (committed, refused or
interrupted). A partial body kept for resuming stays counted against its
sender until it completes or expires (the intake's sweep collects it).

Two checks, both before anything is read from the body:
- the contact's bytes (uploads in flight, batches in flight, partial bodies)
  stay within its quota, so one colleague cannot take the disk from the others;
- the disk's free space, less what reservations in flight may still write,
  stays above the reserve, so the node's own sending (sealing into incoming/
  and blobs/), its database, its audit log and its start keep working.

The state is in memory, in the running process; it is rebuilt from incoming/
at start. A command run beside `cabinet run` does not share it: it receives
only what it pulls itself, and the reserve still protects the disk.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..core.errors import StoreError
from ..store.blobs import Partial

MiB = 1 << 20
MIN_RESERVE = 64 * MiB          # a small box keeps at least this much for its own work
MAX_RESERVE = 1024 * MiB        # ... and at most this much (or 5% of the disk, if less)
QUOTA_FULL = "the colleague's disk quota for you is full; try again later"
DISK_FULL = "not enough disk space at the colleague's for this record; try again later"


class QuotaFull(StoreError):
    """Incoming data refused for now (answered 507): over the sender's quota or into the reserve."""


@dataclass(frozen=True, slots=True)
class Limits:
    per_contact: int                 # bytes in flight + partial, per contact
    reserve: int | None = None       # free bytes incoming data never uses; None: automatic
    expiry_ms: int = 3 * 24 * 3600 * 1000     # a partial body with no progress for this long is collected


def limits_of(config: object) -> Limits:
    """The node's settings (config.json: incoming_quota_mib, disk_reserve_mib 0 = automatic,
    partial_expiry_hours); the defaults when a test's ports carry no config."""
    quota = getattr(config, "incoming_quota_mib", 2048)
    reserve = getattr(config, "disk_reserve_mib", 0)
    hours = getattr(config, "partial_expiry_hours", 72)
    return Limits(per_contact=quota * MiB, reserve=reserve * MiB or None, expiry_ms=hours * 3600 * 1000)


def auto_reserve(total: int) -> int:
    """5% of the disk, at least 64 MiB and at most 1 GiB."""
    return max(MIN_RESERVE, min(MAX_RESERVE, total // 20))


def disk_of(folder: Path) -> Callable[[], tuple[int, int]]:
    """(free bytes for this user, total bytes) of the disk holding `folder`."""
    def measure() -> tuple[int, int]:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return measure


class Reservation:
    """Bytes held for one upload or batch; `release` exactly once (idempotent)."""

    def __init__(self, quota: "Quota", sender: str, record_id: str | None, size: int, new: int) -> None:
        self._quota, self.sender, self.record_id = quota, sender, record_id
        self.size, self.new = size, new          # counted for the sender; still to be written
        self._done = False

    def release(self, kept: int = 0) -> None:
        """The upload ended; `kept`: bytes of a partial body left on disk for resuming."""
        if not self._done:
            self._done = True
            self._quota._release(self, kept)


class Quota:
    def __init__(self, limits: Limits, disk: Callable[[], tuple[int, int]]) -> None:
        self.limits, self._disk = limits, disk
        self._lock = threading.Lock()
        self._partial: dict[str, dict[str, int]] = {}     # sender -> record ID -> bytes kept
        self._held: dict[str, int] = {}                   # sender -> bytes of uploads/batches in flight
        self._unwritten = 0                               # what reservations may still write

    def load(self, partials: Iterable[Partial]) -> None:
        """At start: count the partial bodies found in incoming/ against their senders."""
        with self._lock:
            for p in partials:
                self._partial.setdefault(p.sender, {})[p.record_id] = p.size

    def used(self, sender: str) -> int:
        with self._lock:
            return self._used(sender)

    def _used(self, sender: str) -> int:
        return self._held.get(sender, 0) + sum(self._partial.get(sender, {}).values())

    def reserve(self, sender: str, size: int, *, record_id: str | None = None, have: int = 0) -> Reservation:
        """Hold `size` bytes for `sender` (a body of `size` of which `have` are already on disk,
        or a batch); QuotaFull if over its quota or into the reserve."""
        new = max(0, size - have)
        free, total = self._disk()
        reserve = self.limits.reserve if self.limits.reserve is not None else auto_reserve(total)
        with self._lock:
            kept = self._partial.get(sender, {}).get(record_id, 0) if record_id else 0
            if self._used(sender) - kept + size > self.limits.per_contact:
                raise QuotaFull(QUOTA_FULL)
            if free - self._unwritten - new < reserve:
                raise QuotaFull(DISK_FULL)
            if record_id:
                self._partial.get(sender, {}).pop(record_id, None)   # now counted in the upload
            self._held[sender] = self._held.get(sender, 0) + size
            self._unwritten += new
            return Reservation(self, sender, record_id, size, new)

    def _release(self, r: Reservation, kept: int) -> None:
        with self._lock:
            self._held[r.sender] -= r.size
            if not self._held[r.sender]:
                del self._held[r.sender]
            self._unwritten -= r.new
            if kept and r.record_id:
                self._partial.setdefault(r.sender, {})[r.record_id] = kept

    def forget(self, sender: str, record_id: str) -> None:
        """A partial body was collected (expired) or completed by another way."""
        with self._lock:
            left = self._partial.get(sender, {})
            left.pop(record_id, None)
            if not left:
                self._partial.pop(sender, None)
