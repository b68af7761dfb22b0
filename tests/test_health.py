"""Health and metrics without patient data: the key=value event log, /metrics behind the API's gate,
`Node.health()` (what `cabinet status` prints) and the disk and clock samples behind it.

The canary test runs two real nodes on 127.0.0.1 with their web servers, exchanges a referral
whose patient name, subject, letter and file name carry a canary, answers it, scrapes /metrics
of both and reads every log line: no canary, no contact name, no file name, no API token."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
import pytest
import sqlite_utils

from conftest import PASSPHRASE
from node import Node
from node.app.events import DeliveryChanged, RecordReceived, RecordStored
from node.app.health import log_line
from node.faces.web.server import start_web
from node.logsetup import file_handler, kv
from node.store import health as table

CANARY = "Zéphyrine Canarywood"
FILE = "canary-scan-Quetzal.pdf"
DEADLINE = 60.0


async def until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kv_lines_are_stable_and_quoted():
    assert kv("record-received", record="ab12", peer="NODE", size=3) == \
        "event=record-received record=ab12 peer=NODE size=3"
    assert kv("x", reason='quota "full"\nnext', empty="", none=None, flag=True) == \
        'event=x reason="quota \\"full\\"\\\\x0anext" empty="" flag=true'
    line = log_line(RecordReceived(at=1, record_id="ab12", sender="NODE", kind="referral", size=10))
    assert line == "event=record-received record=ab12 peer=NODE kind=referral size=10"
    assert log_line(RecordStored(at=1, record_id="r", kind="referral", recipients=("A", "B"))) == \
        "event=record-stored record=r kind=referral recipients=2"          # how many, never who
    assert log_line(DeliveryChanged(at=1, record_id="r", recipient="N", state="queued", reason="offline")) == \
        "event=delivery-changed record=r peer=N state=queued bytes=0 reason=offline"


def test_disk_growth_and_clock_offsets(tmp_path):
    db = sqlite_utils.Database(tmp_path / "t.db")
    table.ensure_schema(db)
    day = table.DAY_MS
    assert table.growth_per_day(db) is None
    table.sample_disk(db, now=10 * day, used=1000)
    table.sample_disk(db, now=10 * day + 5, used=1500)           # the latest of the day counts
    assert table.growth_per_day(db) is None
    table.sample_disk(db, now=14 * day, used=3500)
    assert table.growth_per_day(db) == 500.0                      # 2000 bytes over 4 days
    for i, off in enumerate((900, -50, 1000, 1100, 950, 5, 7000)):
        table.note_offset(db, peer="P", at=i, offset_ms=off)
    assert table.offsets(db) == {"P": 1000}                       # median of the last five
    assert db.conn.execute("SELECT COUNT(*) FROM clock_offsets").fetchone()[0] == 5


async def make(tmp_path, name: str) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


async def scrape(session, web, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(web.url + "/metrics", headers=headers) as resp:
        return resp.status, await resp.text()


def metric(text: str, pattern: str) -> float:
    m = re.search(r"^" + pattern + r" ([0-9.e+-]+)$", text, re.M)
    assert m, f"no {pattern} in metrics"
    return float(m.group(1))


async def test_exchange_leaves_no_patient_data_in_metrics_or_logs(tmp_path):
    root = logging.getLogger("cabinet")
    handler = file_handler(tmp_path)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    a, b = await make(tmp_path, "Dr Anne Martin"), await make(tmp_path, "Dr Paul Durand")
    wa, wb = await start_web(a, "127.0.0.1", 0), await start_web(b, "127.0.0.1", 0)
    try:
        await a.add_contact(b.descriptor.signed)
        await b.add_contact(a.descriptor.signed)
        tok_a = await a.accounts.add_token("prometheus", ["admin"])
        tok_b = await b.accounts.add_token("prometheus", ["admin"])
        weak = await a.accounts.add_token("ehr", ["read"])
        letter, attached = tmp_path / "letter.txt", tmp_path / FILE
        letter.write_text(f"Cher confrère, {CANARY}")
        attached.write_bytes(CANARY.encode() * 1000)
        sent = await a.send_referral(to="Dr Paul Durand", patient=CANARY, born="1961-04-02",
                                     subject=f"Douleur {CANARY}", letter=letter, attachments=[attached])

        async def delivered():
            return [d for d in await a.outbox(sent.record_id) if d["state"] == "delivered"]
        await until(delivered, "delivery")
        await b.read(sent.record_id)
        await b.export(sent.record_id, tmp_path / "out")
        reply = await b.reply(sent.record_id, letter=f"Compte rendu {CANARY}")

        async def replied():
            return [d for d in await b.outbox(reply.record_id) if d["state"] == "delivered"]
        await until(replied, "the reply's delivery")

        async with aiohttp.ClientSession() as s:
            assert (await scrape(s, wa, None))[0] == 401
            assert (await scrape(s, wa, weak))[0] == 403                 # a token without the admin scope

            async def counted():
                status, text = await scrape(s, wb, tok_b)
                assert status == 200
                return text if "cabinet_records_received_total{kind=" in text else None
            text_b = await until(counted, "B's metrics to count the record")
            status, text_a = await scrape(s, wa, tok_a)
        assert status == 200
        assert metric(text_b, r'cabinet_records_received_total\{kind="referral"\}') == 1
        assert metric(text_b, r"cabinet_received_bytes_total") > 1000
        assert metric(text_a, r'cabinet_deliveries\{state="delivered"\}') == 1
        assert metric(text_a, r'cabinet_records_stored_total\{kind="referral"\}') == 1
        assert metric(text_b, r'cabinet_request_seconds_count\{route="(?:PUT|POST) /v1/[^"]*"\}') >= 1
        assert metric(text_a, r"cabinet_disk_free_bytes") > 0
        assert metric(text_a, r"cabinet_alerts_open") == 0
        # B measured A's clock from the Cabinet-Time of A's signed requests (same machine: close to 0)
        offsets = await b.store.call(table.offsets)
        assert abs(offsets[a.node_id]) < 5000
    finally:
        for w in (wa, wb):
            await w.close()
        await a.close()
        await b.close()
        root.removeHandler(handler)
        handler.close()
    logs = (tmp_path / "node.log").read_text("utf-8")
    assert f"event=record-received record={sent.record_id} peer={a.node_id}" in logs
    assert "event=delivery-changed" in logs and "event=record-opened" in logs
    forbidden = [CANARY, "Canarywood", "Zéphyrine", FILE, "Quetzal", "Douleur", "Compte rendu", tok_a, tok_b,
                 weak, "Anne Martin", "Paul Durand"]
    for text, where in ((text_a, "A's metrics"), (text_b, "B's metrics")):
        for word in forbidden:
            assert word not in text, f"{word!r} in {where}"
    for word in forbidden[:-2] :                          # logs may name contacts (docs/storage.md), never patients
        assert word not in logs, f"{word!r} in the log"
    for line in logs.splitlines():
        if "event=" in line:
            assert CANARY not in line and FILE not in line


async def test_health_of_a_stopped_node_needs_a_person_until_backed_up(tmp_path):
    await Node.init(tmp_path / "n", PASSPHRASE, name="Dr Anne Martin", listen="127.0.0.1:0", lan=False)
    async with Node.open(tmp_path / "n", passphrase=PASSPHRASE) as node:
        h = await node.health()
        assert h["state"] == "stopped" and h["backup_at"] is None
        assert h["reach"] == {"addresses": {}, "bootstraps": {}}          # nothing configured: not checked
        assert "the node is not running" in h["needs"] and "no backup" in h["needs"]
        assert h["disk_free"] > 0 and h["days_left"] is None               # one day of samples only
        await node.backup(tmp_path / "backup", PASSPHRASE)
        h = await node.health()
        assert h["backup_at"] and h["backup_age_s"] < 60 and "no backup" not in h["needs"]
        await node.serve("127.0.0.1:0")
        h = await node.health()
        assert h["state"] == "running" and h["relays"] == [] and h["lan"] is None
        assert h["reach"]["addresses"] and set(h["reach"]["addresses"].values()) == {"ok"}
        assert h["needs"] == [], h["needs"]
        await node.raise_alert("break-glass", "SOME-PEER", 1, "emergency access given")
        h = await node.health(check_reach=False)
        assert h["reach"] is None and [a["rule"] for a in h["alerts"]] == ["break-glass"]
        assert h["needs"] == ["1 alert(s) not acknowledged"]


def test_cabinet_status_exits_3_when_a_person_is_needed(tmp_path):
    from conftest import cli, ok
    ok(cli(tmp_path / "n", "init", "--name", "Dr Anne Martin", "--listen", "127.0.0.1:0", "--no-lan"))
    proc = cli(tmp_path / "n", "status", "--no-check")
    assert proc.returncode == 3, proc.stderr
    assert "state       stopped" in proc.stdout and "NEEDS A PERSON" in proc.stdout and "  - no backup" in proc.stdout
    proc = cli(tmp_path / "n", "alerts", "ack", "7")
    assert proc.returncode != 0 and proc.stderr.strip() == "cabinet: no open alert 7 ('cabinet alerts' lists them)"
    assert ok(cli(tmp_path / "n", "alerts")).strip() == "No open alerts."
