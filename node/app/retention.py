"""Retention: removing the bodies of old records, keeping their rows and audit trail.

`Retention.purge(before)` drops the body (the inline bytes or the blob file) of
every record created before a date, this node's own copies of what it sent
included, marks each "purged" (store/retention.py) and writes one audit entry
per record in the same transaction, so the hash chain simply continues. A
record still waiting to be delivered keeps its body until it is delivered.

The running node applies `config.retention` (a period such as "10y") once a
day through `round`. Periods: Ny (years), Nm (months), Nw (weeks), Nd (days).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..core.errors import NotFound, UsageError
from ..store import retention as store
from .events import AuditAppended
from .ports import Ports

log = logging.getLogger("cabinet.retention")
DAY_S = 24 * 3600.0
_PERIOD = re.compile(r"^\s*(\d{1,3})\s*([ymwd])\s*$", re.I)
MIN_CONFIGURED_DAYS = 365          # an automatic purge of less than a year is surely a typo


@dataclass(frozen=True)
class PurgeReport:
    before: int                     # the cut-off (Unix ms): bodies of records created earlier are gone
    purged: int                     # records whose body was removed now
    blobs_removed: int
    held_back: int                  # own records older than the cut-off still waiting to be delivered


def parse_period(text: str) -> tuple[int, str]:
    m = _PERIOD.match(text or "")
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"not a retention period: {text!r} (e.g. 10y, 18m, 52w, 400d)")
    return int(m.group(1)), m.group(2).lower()


def cutoff(now_ms: int, period: str) -> int:
    """The instant `period` before `now_ms` (calendar years and months; 29 Feb becomes 28 Feb)."""
    n, unit = parse_period(period)
    now = datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.timezone.utc)
    if unit in "dw":
        then = now - datetime.timedelta(days=n * (7 if unit == "w" else 1))
    else:
        months = now.year * 12 + now.month - 1 - (n * 12 if unit == "y" else n)
        year, month = divmod(months, 12)
        day = now.day
        while True:
            try:
                then = now.replace(year=year, month=month + 1, day=day)
                break
            except ValueError:
                day -= 1
    return int(then.timestamp() * 1000)


def period_days(period: str) -> int:
    n, unit = parse_period(period)
    return n * {"y": 365, "m": 30, "w": 7, "d": 1}[unit]


def check_configured(period: str) -> str:
    """A period for the running node to apply daily: at least a year."""
    if period_days(period) < MIN_CONFIGURED_DAYS:
        raise UsageError(f"a retention period under a year ({period}) is refused for the daily purge; "
                         "use 'cabinet purge --older-than' once if that is really meant")
    return period.strip().lower()


def parse_date(text: str) -> int:
    """YYYY-MM-DD as local midnight, in Unix ms."""
    try:
        day = datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"not a date: {text!r} (expected YYYY-MM-DD)") from None
    return int(time.mktime(day.timetuple()) * 1000)


async def refuse_if_purged(ports: Ports, row: dict) -> None:
    """For Records.read/export/attachment: a purged record says so, in one line."""
    at = await ports.store.call(store.purged_on, row["id"], row["sender"])
    if at is not None:
        day = time.strftime("%Y-%m-%d", time.localtime(at / 1000))
        raise NotFound(f"record {row['id'][:10]}: purged on {day} (retention); its row and audit trail remain")


class Retention:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports

    async def purge(self, before: int, *, reason: str = "retention") -> PurgeReport:
        p = self.ports
        if before > p.now() + DAY_S * 1000:      # tomorrow at the latest: 2205 for 2015 purges nothing
            raise UsageError("the cut-off date is in the future: nothing is purged")
        day = time.strftime("%Y-%m-%d", time.localtime(before / 1000))
        detail = f"{reason}: created before {day}"
        purged = removed = 0
        while True:
            rows = await p.store.call(store.due, before)
            if not rows:
                break
            purged += await p.store.call(store.mark, rows, at=p.now(), before=before, detail=detail)
            removed += await asyncio.to_thread(self._remove_blobs, rows)
            p.publish(AuditAppended(at=p.now(), event="purged"))
        removed += await asyncio.to_thread(self._sweep)
        held = await p.store.call(store.held_back, before)
        log.info("retention: %d record bodies purged (created before %s), %d files removed, %d kept until delivered",
                 purged, day, removed, held)
        return PurgeReport(before=before, purged=purged, blobs_removed=removed, held_back=held)

    async def purged_on(self, record_id: str, sender: str) -> int | None:
        return await self.ports.store.call(store.purged_on, record_id, sender)

    def _blob(self, record_id: str, sender: str, direction: str) -> Path:
        blobs = self.ports.blobs
        if direction == "out":
            return blobs.blobs / record_id[:2] / record_id
        return blobs.received_path(record_id, sender)

    def _remove_blobs(self, rows: list[dict]) -> int:
        """After the marks are committed: a crash in between leaves files that `_sweep` removes."""
        n = 0
        for r in rows:
            try:
                self._blob(r["id"], r["sender"], r["direction"]).unlink()
                n += 1
            except FileNotFoundError:
                pass
        return n

    def _sweep(self) -> int:
        me = self.ports.identity.node_id
        rows = [{"id": i, "sender": s, "direction": "out" if s == me else "in"}
                for i, s, _ in self.ports.store.call_sync(store.purged_ids)]
        return self._remove_blobs(rows)

    async def round(self) -> float:
        """The running node's daily purge under `config.retention` (re-read: set by another command)."""
        p = self.ports
        fresh = await asyncio.to_thread(Config.load, p.folder)
        p.config.retention = fresh.retention
        if not p.config.retention:
            return DAY_S
        try:
            period = check_configured(p.config.retention)
        except UsageError as exc:
            log.error("retention: %s", exc)
            return DAY_S
        await self.purge(cutoff(p.now(), period))
        return DAY_S
