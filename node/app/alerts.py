"""Abusive-access and health alerts: rules over the audit log and the event stream.

Built from ports like every service. While the node runs it reads the audit log from
its own cursor (every `scan_seconds`, and at once when an entry is appended in this
process; entries written by CLI commands in other processes are read at the next scan),
listens to `Refusal`, `SignInFailed` and `KeyChanged`, and verifies the audit chain
every `verify_minutes`. The rules and their thresholds come from config.json's `alerts`
section (`Settings`, docs/operations.md).

An alert names the rule, the account or peer node ID, the count and the time, never a
patient (the rules read event names, accounts and node IDs only; patient details in the
audit log are sealed and never opened here). It is kept in SQLite (store/alerts.py),
published as `AlertRaised`, logged as one key=value line, and sent to IT by e-mail
(smtplib in a worker thread) or a webhook (POST JSON) when configured.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import smtplib
import zoneinfo
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiohttp

from ..logsetup import kv
from ..store import alerts as table
from ..store import audit
from .events import AlertRaised, AuditAppended, KeyChanged, Refusal, SignInFailed, Subscription
from .loop import Loop
from .ports import Ports

log = logging.getLogger("cabinet.alerts")

READS = ("read", "export", "download", "read-for-reply")          # what the records service writes
READS_BY = ("read-by", "download-by")                               # the same, naming the web account
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
LOCAL = "local"                     # reads made through the CLI or Python on the box itself


@dataclass
class Settings:
    """config.json "alerts": every key optional."""

    reads: int = 50                     # records read or exported by one account ...
    reads_minutes: float = 10           # ... within this many minutes
    refusals: int = 20                  # refused requests from one peer ...
    refusals_minutes: float = 10
    sign_ins: int = 5                   # failed sign-ins of one account ...
    sign_ins_minutes: float = 15
    verify_minutes: float = 60          # how often the audit chain is verified
    scan_seconds: float = 10            # how often the audit log is read (entries from other processes)
    opening_hours: dict[str, str] = field(default_factory=dict)   # {"mon": "08:00-19:00", ...}; absent day: closed
    timezone: str = ""                  # of the opening hours; "" = the box's local time
    break_glass: bool = True
    first_grant: bool = True
    key_change: bool = True
    backup_days: float = 7              # `cabinet status` asks for a person beyond these ...
    disk_days: float = 30               # ... days left before the disk is full
    clock_seconds: float = 60           # ... clock offset against a peer
    undelivered_days: float = 3         # ... age of the oldest undelivered record
    email_to: str = ""
    email_from: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    webhook: str = ""

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "Settings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in (section or {}).items() if k in known})

    def open_at(self, at_ms: int) -> bool:
        """Whether `at_ms` falls in the opening hours (always, when none are configured)."""
        if not self.opening_hours:
            return True
        tz = zoneinfo.ZoneInfo(self.timezone) if self.timezone else None
        t = datetime.datetime.fromtimestamp(at_ms / 1000, tz)
        hours = self.opening_hours.get(DAYS[t.weekday()], "")
        minute = t.hour * 60 + t.minute
        for span in filter(None, (s.strip() for s in hours.split(","))):
            start, _, end = span.partition("-")
            if _minutes(start) <= minute < _minutes(end):
                return True
        return False


def _minutes(hhmm: str) -> int:
    h, _, m = hhmm.strip().partition(":")
    return int(h) * 60 + int(m or 0)


class Window:
    """Times of one kind of fact per subject over a sliding window: the count when it crosses the limit."""

    def __init__(self, limit: int, minutes: float) -> None:
        self.limit, self.span = limit, int(minutes * 60_000)
        self._times: dict[str, collections.deque[int]] = {}

    def add(self, subject: str, at: int) -> int | None:
        q = self._times.setdefault(subject, collections.deque())
        q.append(at)
        while q and q[0] <= at - self.span:
            q.popleft()
        if len(self._times) > 10_000:                  # a bounded memory whatever happens
            self._times = {subject: q}
        return len(q) if len(q) >= self.limit else None


def account_of(detail: str | None) -> str:
    try:
        value = json.loads(detail or "").get("account")
    except (ValueError, AttributeError):
        return "?"
    return value if isinstance(value, str) else "?"


class AlertService:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.settings = Settings.from_config(getattr(ports.config, "alerts", None))
        s = self.settings
        self.reads = Window(s.reads, s.reads_minutes)
        self.refusals = Window(s.refusals, s.refusals_minutes)
        self.sign_ins = Window(s.sign_ins, s.sign_ins_minutes)
        self._scan = Loop("cabinet-alerts-scan", self._scan_round)
        self._verify = Loop("cabinet-alerts-verify", self._verify_round)
        self._sub: Subscription | None = None
        self._task: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()
        self._http: aiohttp.ClientSession | None = None

    async def ensure(self) -> None:
        await self.ports.store.call(table.ensure_schema)

    async def start(self) -> None:
        await self.ensure()
        if await self.ports.store.call(table.state, "audit_cursor", -1) < 0:   # first start: from now on
            await self.ports.store.call(lambda db: table.set_state(db, "audit_cursor", table.audit_head(db)))
        self._sub = self.ports.events.subscribe(Refusal, SignInFailed, KeyChanged, AuditAppended)
        self._task = asyncio.create_task(self._listen(), name="cabinet-alerts")
        self._scan.start()
        self._verify.start()

    async def stop(self) -> None:
        for loop in (self._scan, self._verify):
            await loop.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._sub is not None:
            self._sub.close()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- the rules ----------------------------------------------------------------------

    async def _listen(self) -> None:
        assert self._sub is not None
        async for event in self._sub:
            try:
                await self.on_event(event)
            except Exception:            # a bug must not stop the alerts
                log.exception("alert rule failed")

    async def on_event(self, e: object) -> None:
        s = self.settings
        if isinstance(e, AuditAppended):
            self._scan.wake()
        elif isinstance(e, Refusal) and e.peer:
            if (n := self.refusals.add(e.peer, e.at)) is not None:
                await self.raise_alert("refusals", e.peer, n, f"{n} refused requests in {s.refusals_minutes:g} min")
        elif isinstance(e, SignInFailed):
            if (n := self.sign_ins.add(e.account, e.at)) is not None:
                await self.raise_alert("failed-sign-ins", e.account, n,
                                       f"{n} failed sign-ins in {s.sign_ins_minutes:g} min")
        elif (isinstance(e, KeyChanged) and s.key_change and e.status in ("rotated", "held", "revoked")
              and e.node_id != self.ports.identity.node_id):          # our own rotation is not an alert
            await self.raise_alert("key-change", e.node_id, 1, f"contact key {e.status}")

    async def _scan_round(self) -> float:
        cursor = await self.ports.store.call(table.state, "audit_cursor", 0)
        rows = await self.ports.store.call(table.audit_since, cursor)
        if rows:
            await self.check_entries(rows)
            await self.ports.store.call(table.set_state, "audit_cursor", rows[-1][0])
        return 0.0 if len(rows) >= 5000 else self.settings.scan_seconds

    async def check_entries(self, rows: list[tuple]) -> None:
        """Apply the audit rules to entries (seq, at, event, record, peer, detail), oldest first."""
        s = self.settings
        by_account = {(r[3], r[0] - k) for r in rows if r[2] in READS_BY for k in range(1, 4)}
        for seq, at, event, record, peer, detail in rows:
            who = None
            if event in READS_BY:
                who = account_of(detail)
            elif event in READS and (record, seq) not in by_account:
                who = LOCAL
            if who is not None:
                if (n := self.reads.add(who, at)) is not None:
                    await self.raise_alert("bulk-reads", who, n, f"{n} records opened in {s.reads_minutes:g} min",
                                           at=at)
                if not s.open_at(at):
                    await self.raise_alert("after-hours", who, 1, "a record opened outside opening hours", at=at)
            elif event == "break-glass" and s.break_glass:
                await self.raise_alert("break-glass", peer or "?", 1, "emergency access given", at=at)
            elif event == "grant-used" and s.first_grant and peer:
                if await self.ports.store.call(_first_grant_use, seq, peer):
                    await self.raise_alert("first-grant", peer, 1,
                                           "a practice used a patient's grant for the first time", at=at)

    async def _verify_round(self) -> float:
        await self.verify_chain()
        return self.settings.verify_minutes * 60

    async def verify_chain(self) -> bool:
        ok, bad = await self.ports.store.call(audit.verify)
        if not ok:
            await self.raise_alert("audit-broken", "node", 1, f"audit chain broken at entry {bad}")
        return ok

    # --- raising and telling -----------------------------------------------------------

    async def raise_alert(self, rule: str, subject: str, count: int, detail: str, *, at: int | None = None) -> dict:
        at = self.ports.now() if at is None else at
        row, new = await self.ports.store.call(table.raise_alert, rule=rule, subject=subject, count=count, at=at,
                                               detail=detail)
        self.ports.publish(AlertRaised(at=at, alert_id=row["id"], rule=rule, subject=subject, count=row["count"],
                                       new=new))
        if new:
            log.warning(kv("alert-raised", alert=row["id"], rule=rule, subject=subject, count=row["count"], at=at))
            self._send(row)
        return row

    def _send(self, row: dict) -> None:
        s = self.settings
        for enabled, coro in ((s.email_to and s.smtp_host, self._email), (s.webhook, self._webhook)):
            if enabled:
                task = asyncio.create_task(coro(row))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _email(self, row: dict) -> None:
        s = self.settings
        msg = EmailMessage()
        msg["Subject"] = f"cabinet alert: {row['rule']} ({row['subject']})"
        msg["From"], msg["To"] = s.email_from or f"cabinet@{s.smtp_host}", s.email_to
        msg.set_content(describe(row, self.ports.identity.node_id))

        def deliver() -> None:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=30) as smtp:
                smtp.send_message(msg)
        try:
            await asyncio.to_thread(deliver)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning(kv("alert-mail-failed", alert=row["id"], error=exc.__class__.__name__))

    async def _webhook(self, row: dict) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        body = {"node": self.ports.identity.node_id, **{k: row[k] for k in ("id", "rule", "subject", "count",
                                                                            "first_at", "at", "detail")}}
        try:
            async with self._http.post(self.settings.webhook, json=body,
                                       timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status >= 300:
                    log.warning(kv("alert-webhook-failed", alert=row["id"], status=resp.status))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning(kv("alert-webhook-failed", alert=row["id"], error=exc.__class__.__name__))

    async def list(self, include_acked: bool = False) -> list[dict]:
        await self.ensure()
        return await self.ports.store.call(table.listing, include_acked=include_acked)

    async def ack(self, alert_id: int, by: str) -> dict | None:
        await self.ensure()
        return await self.ports.store.call(table.ack, alert_id, by=by, at=self.ports.now())


def describe(row: dict, node_id: str) -> str:
    when = datetime.datetime.fromtimestamp(row["at"] / 1000).strftime("%Y-%m-%d %H:%M")
    return (f"Node {node_id}: alert {row['id']}, rule {row['rule']}, {row['subject']}: {row['detail']} "
            f"(count {row['count']}, {when}).\nList with 'cabinet alerts', acknowledge with "
            f"'cabinet alerts ack {row['id']}'.")


def _first_grant_use(db, seq: int, peer: str) -> bool:
    """Whether the grant-used entry `seq` is `peer`'s first for that (unnamed) patient."""
    row = db.conn.execute(
        "SELECT COUNT(*) FROM audit a JOIN patient_audit pa ON pa.seq = a.seq WHERE a.event = 'grant-used' "
        "AND a.peer = ? AND a.seq < ? AND pa.ref_ix = (SELECT ref_ix FROM patient_audit WHERE seq = ?)",
        (peer, seq, seq)).fetchone()
    return row[0] == 0
