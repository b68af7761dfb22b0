"""What a box does on its own (issue 12): retention (`cabinet purge`, and the daily purge of a running
node) and scheduled backups made by `cabinet run` without the passphrase.

Real node processes on loopback and real data folders; the running node's own loops are driven by
its clock port set ahead (a day, eleven years), and waited on through its event stream.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import re
import sqlite3
import threading
import time

import pytest

from conftest import PASSPHRASE, base_env, cli, db_rows, wait_for

from node import Node
from node.app import retention
from node.app.events import AuditAppended
from node.core.errors import UsageError

CANARY = "Zorglubine Canaryretention"
DAY_MS = 24 * 3600 * 1000


def send(node, to: str, tmp_path, tag: str, attach: int = 0) -> str:
    letter = tmp_path / f"letter-{tag}.txt"
    letter.write_text(f"Cher confrère, {CANARY} {tag}\n")
    args = ["send", "--to", to, "--patient", "Jeanne Martin", "--subject", f"Bilan {tag}", "--letter", str(letter)]
    if attach:
        f = tmp_path / f"scan-{tag}.bin"
        f.write_bytes(os.urandom(attach))
        args.append(str(f))
    return re.search(r"Record ([0-9a-f]{32})", node.ok(*args)).group(1)


def bodies(node, rid: str) -> tuple[int, int]:
    """(rows, rows with an inline body) of a record, and whether any blob file of it remains."""
    rows = db_rows(node, "SELECT COUNT(*), COUNT(body) FROM records WHERE id = ?", (rid,))[0]
    return rows[0], rows[1]


def blob_files(node, rid: str) -> list:
    return list((node.data / "blobs" / rid[:2]).glob(rid + "*")) if (node.data / "blobs" / rid[:2]).is_dir() else []


async def wait_event(sub, event: str, timeout: float) -> None:
    async def until():
        while True:
            e = await sub.get()
            if isinstance(e, AuditAppended) and e.event == event:
                return
    await asyncio.wait_for(until(), timeout)


def run_in_process(coro_fn, timeout: float = 120):
    """asyncio.run(coro_fn()) with a hard deadline: a node that does not stop fails the test, never hangs it."""
    result: list = []
    errors: list = []

    def target():
        try:
            result.append(asyncio.run(coro_fn()))
        except BaseException as exc:      # handed to the test below
            errors.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"the in-process node did not finish and stop within {timeout:g} s")
    if errors:
        raise errors[0]
    return result[0]


# --- pure ----------------------------------------------------------------------------

def test_periods_and_cut_offs():
    at = int(datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    back = lambda p: datetime.datetime.fromtimestamp(retention.cutoff(at, p) / 1000, datetime.timezone.utc)
    assert back("10y").date() == datetime.date(2014, 2, 28)           # no 29 February in 2014
    assert back("18m").date() == datetime.date(2022, 8, 29)
    assert back("2w").date() == datetime.date(2024, 2, 15) and back("400d").date() == datetime.date(2023, 1, 25)
    for bad in ("", "10", "ten years", "0y", "5x", "-1y"):
        with pytest.raises(UsageError):
            retention.parse_period(bad)
    assert retention.check_configured("10Y") == "10y"
    with pytest.raises(UsageError, match="under a year"):
        retention.check_configured("30d")
    with pytest.raises(UsageError):
        retention.parse_date("2015-13-01")


# --- cabinet purge ----------------------------------------------------------------------

def test_purge_removes_old_bodies_on_both_sides_keeps_rows_and_audit(pair, tmp_path):
    gp, cardio = pair
    small = send(gp, "Dr Paul Durand", tmp_path, "small")
    large = send(gp, "Dr Paul Durand", tmp_path, "large", attach=400_000)      # above the inline limit: a blob
    for rid in (small, large):
        wait_for(lambda: "delivered" in gp.ok("outbox", rid), 30, "delivery")
    assert blob_files(gp, large) and blob_files(cardio, large) and bodies(cardio, small) == (1, 1)
    audit_before = db_rows(cardio, "SELECT COUNT(*) FROM audit")[0][0]

    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    out = cardio.ok("purge", "--before", tomorrow, "--yes")
    assert "purged the bodies of 2 record(s)" in out and "audit trail are kept" in out
    out = gp.ok("purge", "--before", tomorrow, "--yes")                 # the sender's own copies too
    assert "purged the bodies of 2 record(s)" in out
    for node in (gp, cardio):
        for rid in (small, large):
            assert bodies(node, rid) == (1, 0) and not blob_files(node, rid)
        assert "audit log: intact" in node.ok("audit", "verify")
        assert CANARY not in "".join(p.read_bytes().decode("latin-1") for p in node.data.rglob("*.bin"))
    marks = db_rows(cardio, "SELECT record, event, detail FROM audit WHERE event = 'purged' ORDER BY record")
    assert sorted(m[0] for m in marks) == sorted([small, large])
    assert all(m[2].startswith("retention: created before") for m in marks)
    assert db_rows(cardio, "SELECT COUNT(*) FROM audit")[0][0] == audit_before + 2
    assert "Bilan small" in cardio.ok("inbox")                         # the row is still listed
    again = cardio.ok("purge", "--before", tomorrow, "--yes")
    assert "purged the bodies of 0 record(s)" in again                  # nothing twice


def test_show_of_a_purged_record_says_when(pair, tmp_path):
    gp, cardio = pair
    rid = send(gp, "Dr Paul Durand", tmp_path, "shown")
    wait_for(lambda: "delivered" in gp.ok("outbox", rid), 30, "delivery")
    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    cardio.ok("purge", "--before", tomorrow, "--yes")
    done = cardio.cli("show", rid[:10])
    today = time.strftime("%Y-%m-%d")
    assert done.returncode != 0 and f"purged on {today} (retention)" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_purge_refuses_clearly_and_keeps_what_waits_for_delivery(practice, tmp_path):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    f = tmp_path / "cardio.descriptor"
    cardio.ok("id", "--export", str(f))
    gp.ok("contact", "add", str(f), "--id", cardio.node_id)
    rid = send(gp, "Dr Paul Durand", tmp_path, "queued")                 # cardio is not running: queued
    for args, words in ((("--before", "2015-01-01"), "--yes"), (("--before", "2015-02-30", "--yes"), "not a date"),
                        (("--older-than", "soon", "--yes"), "not a retention period"),
                        (("--before", "2999-01-01", "--yes"), "in the future"),
                        (("--retention", "2d"), "under a year"), ((), "give one of")):
        done = gp.cli("purge", *args)
        assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    out = gp.ok("purge", "--before", tomorrow, "--yes")
    assert "purged the bodies of 0 record(s)" in out and "1 older record(s) still waiting" in out
    assert bodies(gp, rid) == (1, 1)


def test_the_running_node_applies_the_configured_retention_daily(pair, tmp_path):
    gp, cardio = pair
    rid = send(gp, "Dr Paul Durand", tmp_path, "old")
    wait_for(lambda: "delivered" in gp.ok("outbox", rid), 30, "delivery")
    assert "retention: 10y" in cardio.ok("purge", "--retention", "10y")
    cardio.stop()

    async def eleven_years_later() -> int | None:
        async with Node.open(cardio.data, passphrase=PASSPHRASE) as node:
            node.ports.clock = lambda: int(time.time() * 1000) + 11 * 365 * DAY_MS
            sub = node.subscribe(AuditAppended)
            await node.serve("127.0.0.1:0", accept=False)
            await wait_event(sub, "purged", 30)
            return await node.purged_on(rid)

    assert run_in_process(eleven_years_later) is not None
    assert bodies(cardio, rid) == (1, 0)
    assert "audit log: intact" in cardio.ok("audit", "verify")


# --- scheduled backups -------------------------------------------------------------------

def test_cabinet_run_backs_up_when_due_without_the_passphrase(pair, tmp_path):
    gp, cardio = pair
    first = send(gp, "Dr Paul Durand", tmp_path, "before")
    dest = tmp_path / "nas"
    out = gp.ok("backup", str(dest), "--schedule", "daily")
    assert "Recovery code:" in out and "daily" in out
    code = re.search(r"Recovery code: ([A-Z2-7-]+)", out).group(1)
    later = send(gp, "Dr Paul Durand", tmp_path, "after")
    gp.stop()

    async def a_day_later() -> None:
        async with Node.open(gp.data, passphrase=PASSPHRASE) as node:
            node.ports.clock = lambda: int(time.time() * 1000) + DAY_MS + 60_000
            sub = node.subscribe(AuditAppended)
            await node.serve("127.0.0.1:0", accept=False)
            await wait_event(sub, "backup-made", 60)

    run_in_process(a_day_later)
    made = db_rows(gp, "SELECT detail FROM audit WHERE event = 'backup-made' ORDER BY seq")
    assert len(made) == 2 and made[1][0].startswith("scheduled:")
    checked = gp.cli("backup", "--check", str(dest), "--recovery-code", env=base_env(CABINET_RECOVERY_CODE=code))
    assert checked.returncode == 0 and "backup OK" in checked.stdout, checked.stderr   # the code still opens it
    restored = tmp_path / "restored"
    done = cli(None, "restore", str(dest), "--data", str(restored))             # and so does the passphrase
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(restored / "cabinet.db")
    try:
        ids = {r[0] for r in conn.execute("SELECT id FROM records")}
    finally:
        conn.close()
    assert {first, later} <= ids                                              # it holds the later record


def test_a_failed_scheduled_backup_is_logged_audited_and_retried_hourly(practice, tmp_path, caplog):
    gp = practice("Dr Anne Martin")
    dest = tmp_path / "stick"
    gp.ok("backup", str(dest), "--schedule", "weekly")
    blocked = tmp_path / "stick-gone"
    blocked.write_text("not a folder")                                       # the stick is gone, a file in its place
    cfg = gp.data / "config.json"
    cfg.write_text(cfg.read_text().replace(str(dest), str(blocked)))

    async def a_week_later() -> float:
        async with Node.open(gp.data, passphrase=PASSPHRASE) as node:
            node.ports.clock = lambda: int(time.time() * 1000) + 8 * DAY_MS
            node._upkeep()
            with caplog.at_level(logging.ERROR, logger="cabinet.backup"):
                return await node.scheduled_backups.round()

    assert run_in_process(a_week_later) == 3600
    assert any("scheduled backup to" in r.getMessage() and "next try in an hour" in r.getMessage()
               for r in caplog.records)
    failed = db_rows(gp, "SELECT detail FROM audit WHERE event = 'backup-failed'")
    assert len(failed) == 1 and "cannot use" in failed[0][0]
    assert "audit log: intact" in gp.ok("audit", "verify")
