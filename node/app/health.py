"""Health and metrics of a running node, from the event stream: counters, the event log, disk and clocks.

`HealthService` (built from ports) subscribes to every event and, for each, writes one
key=value log line (logsetup.kv) and updates `Metrics`; it samples the data folder's size
once a day (the rate at which the disk fills) and keeps the clock offsets measured against
each peer from the Cabinet-Time of the requests it signed. `server_hook` adds a small
middleware to the node's aiohttp app (through Server's `routes` adders) that times each
request and reports that offset: nothing in node/transport/ knows about it.

Nothing here holds patient data: events carry identifiers, states, counts and reason
codes, and the request hook sees only the route pattern, the status and the caller's ID.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from aiohttp import web

from ..logsetup import kv
from ..store import health as table
from .events import (AlertRaised, DeliveryChanged, Event, RecordReceived, RecordStored, Refusal, SignInFailed,
                     Subscription)
from .loop import Loop
from .ports import Ports

log = logging.getLogger("cabinet.events")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SAMPLE_EVERY = 3600.0
OFFSET_EVERY_MS = 60_000            # at most one stored clock offset per peer and minute
_RENAME = {"record_id": "record", "sender": "peer", "recipient": "peer", "node_id": "peer", "alert_id": "alert",
           "sent_bytes": "bytes", "event": "audit"}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def event_name(e: Event) -> str:
    return _CAMEL.sub("-", type(e).__name__).lower()


def log_line(e: Event) -> str:
    """The event's key=value line: identifiers, states, counts and reason codes only."""
    fields: dict[str, object] = {}
    for f in dataclasses.fields(e):
        if f.name == "at":
            continue
        value = getattr(e, f.name)
        if isinstance(value, tuple):          # RecordStored.recipients: how many, not who
            fields[f.name] = len(value)
            continue
        fields[_RENAME.get(f.name, f.name)] = value if value != "" else None
    return kv(event_name(e), **fields)


class Metrics:
    """Counters and one histogram, in memory since the node started (Prometheus resets are expected)."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.latency: dict[str, list[float]] = {}        # route -> bucket counts + [sum, count]
        self._progress: dict[tuple[str, str], int] = {}
        self.missed = 0
        self.buckets = BUCKETS

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0) + value

    def on_event(self, e: Event) -> None:
        if isinstance(e, RecordReceived):
            self.inc("records_received_total", kind=e.kind)
            self.inc("received_bytes_total", e.size)
        elif isinstance(e, RecordStored):
            self.inc("records_stored_total", kind=e.kind)
        elif isinstance(e, DeliveryChanged):
            self._delivery(e)
        elif isinstance(e, Refusal):
            self.inc("refusals_total", reason=e.reason)
        elif isinstance(e, SignInFailed):
            self.inc("sign_in_failures_total")
        elif isinstance(e, AlertRaised) and e.new:
            self.inc("alerts_raised_total", rule=e.rule)
        self.inc("events_total", type=event_name(e))

    def _delivery(self, e: DeliveryChanged) -> None:
        key = (e.record_id, e.recipient)
        if e.state == "sending" and e.sent_bytes:
            before = self._progress.get(key, 0)
            if e.sent_bytes > before:
                self.inc("sent_bytes_total", e.sent_bytes - before)
            if len(self._progress) < 10_000 or key in self._progress:
                self._progress[key] = e.sent_bytes
            return
        self.inc("deliveries_total", state=e.state)
        if e.state == "queued" and e.reason:
            self.inc("delivery_retries_total")
        if e.state in ("delivered", "refused"):
            self._progress.pop(key, None)

    def observe(self, route: str, seconds: float) -> None:
        row = self.latency.setdefault(route, [0.0] * (len(BUCKETS) + 2))
        i = bisect.bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            row[i] += 1
        row[-2] += seconds
        row[-1] += 1


def folder_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass                      # a file removed while walking
    return total


class HealthService:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.metrics = Metrics()
        self._sub: Subscription | None = None
        self._task: asyncio.Task | None = None
        self._sampler = Loop("cabinet-disk-sample", self._sample)
        self._offset_at: dict[str, int] = {}

    async def start(self) -> None:
        await self.ports.store.call(table.ensure_schema)
        self._sub = self.ports.events.subscribe(size=5000)
        self._task = asyncio.create_task(self._listen(), name="cabinet-health")
        self._sampler.start()

    async def stop(self) -> None:
        await self._sampler.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            for e in self._sub.pending():     # what happened during the stop is still logged
                self._take(e)
            self._sub.close()

    async def _listen(self) -> None:
        assert self._sub is not None
        async for e in self._sub:
            try:
                self._take(e)
            except Exception:            # a bug must not stop the log and the metrics
                log.exception("health: event not taken")
            await asyncio.sleep(0)       # a burst of events (a batch of 500 records) never holds the loop

    def _take(self, e: Event) -> None:
        assert self._sub is not None
        if self._sub.missed > self.metrics.missed:
            log.warning(kv("events-missed", count=self._sub.missed - self.metrics.missed))
            self.metrics.missed = self._sub.missed
        self.metrics.on_event(e)
        if not (isinstance(e, DeliveryChanged) and e.state == "sending" and e.sent_bytes):   # progress: counted only
            log.info(log_line(e))

    async def _sample(self) -> float:
        used = await asyncio.to_thread(folder_size, self.ports.folder)
        await self.ports.store.call(table.sample_disk, now=self.ports.now(), used=used)
        return SAMPLE_EVERY

    def observe_request(self, route: str, seconds: float, caller: str, claimed_ms: int) -> None:
        self.metrics.observe(route, seconds)
        if not caller or not claimed_ms:
            return
        now = self.ports.now()
        if now - self._offset_at.get(caller, 0) < OFFSET_EVERY_MS or len(self._offset_at) > 10_000:
            return
        self._offset_at[caller] = now
        # arrival minus handling time approximates when the caller signed; the network delay is in the error
        offset = claimed_ms - (now - int(seconds * 1000))
        task = asyncio.ensure_future(self.ports.store.call(table.note_offset, peer=caller, at=now, offset_ms=offset))
        task.add_done_callback(lambda t: t.exception())


def server_hook(observe: Callable[[str, float, str, int], None]) -> Callable[[web.Application], None]:
    """A `routes` adder for transport.server.Server that adds the timing middleware to its app."""

    @web.middleware
    async def timed(request: web.Request, handler) -> web.StreamResponse:
        started = time.monotonic()
        try:
            return await handler(request)
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "(no route)"
            caller = request.headers.get("Cabinet-Caller", "")
            stamp = request.headers.get("Cabinet-Time", "")
            observe(f"{request.method} {route}", time.monotonic() - started, caller[:80],
                    int(stamp) if stamp.isdigit() and len(stamp) < 16 else 0)

    def add(app: web.Application) -> None:
        app.middlewares.append(timed)        # inside the door: the caller is proven when the handler runs
    return add


def disk(folder: Path) -> tuple[int, int]:
    """(free bytes, total bytes) of the data folder's file system."""
    usage = shutil.disk_usage(folder)
    return usage.free, usage.total



def version() -> str:
    from importlib import metadata
    try:
        return metadata.version("cabinet")
    except metadata.PackageNotFoundError:
        return "unknown"


async def gather(ports: Ports, alerts, *, base: dict, running: bool, in_process: bool, lan: list | None,
                 relays: list | None, reach: Callable | None) -> dict:
    """`cabinet status` as data, and `needs` (what a person should look at; empty: healthy)."""
    s, now = alerts.settings, ports.now()
    needs: list[str] = []
    await ports.store.call(table.ensure_schema)
    if in_process or not running:            # a running node in another process samples by itself
        await ports.store.call(table.sample_disk, now=now, used=await asyncio.to_thread(folder_size, ports.folder))
    rate = await ports.store.call(table.growth_per_day)
    free, total = await asyncio.to_thread(disk, ports.folder)
    days_left = free / rate if rate else None
    backup_at = await ports.store.call(table.last_backup)
    offsets = await ports.store.call(table.offsets)
    open_alerts = await alerts.list()
    checked = await reach() if reach is not None else None
    out = dict(state="running" if running else "stopped", version=version(), node_id=base["node_id"],
               listen=ports.config.listen, advertised=base["addresses"], reach=checked, lan=lan, relays=relays,
               queued=base["queued"], oldest_undelivered=base["oldest_undelivered"], backup_at=backup_at,
               backup_age_s=(now - backup_at) // 1000 if backup_at else None, disk_free=free, disk_total=total,
               growth_per_day=rate, days_left=days_left, clock_offsets=offsets, alerts=open_alerts, needs=needs)
    if not running:
        needs.append("the node is not running")
    if checked is not None:
        bad = [a for a, r in checked["addresses"].items() if r != "ok"]
        if bad:
            needs.append(f"{len(bad)} advertised address(es) do not answer with this node's descriptor")
        if checked["bootstraps"] and not any(r == "ok" for r in checked["bootstraps"].values()):
            needs.append("no bootstrap lists this node")
    if base["oldest_undelivered"] and now - base["oldest_undelivered"] > s.undelivered_days * 86_400_000:
        needs.append(f"a record has waited more than {s.undelivered_days:g} days to be delivered")
    if backup_at is None or now - backup_at > s.backup_days * 86_400_000:
        needs.append("no backup" if backup_at is None else f"the last backup is older than {s.backup_days:g} days")
    if days_left is not None and days_left < s.disk_days:
        needs.append(f"the disk fills in about {days_left:.0f} days at the current rate")
    if any(abs(o) > s.clock_seconds * 1000 for o in offsets.values()):
        needs.append(f"a peer's clock differs from ours by more than {s.clock_seconds:g} s")
    if open_alerts:
        needs.append(f"{len(open_alerts)} alert(s) not acknowledged")
    return out
