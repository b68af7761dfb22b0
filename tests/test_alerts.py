"""Abusive-access alerts (node/app/alerts.py): each rule against a real node (SQLite in a temp folder,
real audit entries and events), persistence, acknowledgement in the audit log, and IT told by e-mail
(a local aiosmtpd sink) and by webhook (a local aiohttp receiver on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
import time

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from conftest import PASSPHRASE, free_port
from node import Node
from node.node import AuthenticationFailed, TooManyAttempts
from node.app.alerts import Settings, Window
from node.app.events import AlertRaised, KeyChanged, Refusal
from node.store import audit, records

DEADLINE = 30.0
PATIENT = "Zéphyrine Canarywood"


async def until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def make(tmp_path, name: str, alerts: dict | None = None) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    if alerts is not None:
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["alerts"] = alerts
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


async def open_alerts(node: Node, rule: str) -> list[dict]:
    return [a for a in await node.alerts() if a["rule"] == rule]


# --- pure parts -------------------------------------------------------------------------

def test_window_counts_within_the_span_only():
    w = Window(3, 1)                                   # 3 in one minute
    assert w.add("anne", 0) is None and w.add("anne", 10_000) is None
    assert w.add("paul", 20_000) is None               # another subject does not count
    assert w.add("anne", 59_000) == 3
    assert w.add("anne", 130_000) is None              # the first ones left the window


def test_opening_hours_per_weekday_in_the_configured_zone():
    s = Settings.from_config({"opening_hours": {"mon": "08:00-12:00, 14:00-19:00", "sat": "09:00-12:00"},
                              "timezone": "Europe/Paris", "unknown_key": 1})
    paris = datetime.timezone(datetime.timedelta(hours=2))          # summer time
    at = lambda *a: int(datetime.datetime(*a, tzinfo=paris).timestamp() * 1000)   # noqa: E731
    assert s.open_at(at(2024, 6, 3, 8, 30))            # Monday morning
    assert not s.open_at(at(2024, 6, 3, 13, 0))        # Monday lunch
    assert not s.open_at(at(2024, 6, 3, 19, 0))        # Monday, closing time
    assert s.open_at(at(2024, 6, 8, 11, 59)) and not s.open_at(at(2024, 6, 9, 10, 0))   # Saturday; Sunday closed
    assert Settings().open_at(at(2024, 6, 9, 3, 0))    # no opening hours configured: never "outside"


# --- rules on a real node ---------------------------------------------------------------

@pytest.fixture
async def pair(tmp_path):
    # Saturday 3 a.m. UTC is outside these opening hours
    b_alerts = {"reads": 3, "reads_minutes": 10, "opening_hours": {"mon": "08:00-18:00"}, "timezone": "UTC",
                "refusals": 4, "sign_ins": 2, "scan_seconds": 0.05}
    a, b = await make(tmp_path, "Dr Anne Martin"), await make(tmp_path, "Dr Paul Durand", b_alerts)
    await a.add_contact(b.descriptor.signed)
    await b.add_contact(a.descriptor.signed)
    yield a, b
    for n in (a, b):
        if not getattr(n, "closed_by_test", False):
            await n.close()


async def test_bulk_reads_and_after_hours_name_the_account_never_the_patient(pair, tmp_path):
    a, b = pair
    letter = tmp_path / "letter.txt"
    letter.write_text(f"Cher confrère, {PATIENT}")
    sent = await a.send_referral(to="Dr Paul Durand", patient=PATIENT, born="1961-04-02", subject=PATIENT,
                                 letter=letter)
    await until(lambda: b.store.call(lambda db: db.conn.execute(
        "SELECT 1 FROM records WHERE id = ?", (sent.record_id,)).fetchone()), "the record at the colleague")
    saturday_night = int(datetime.datetime(2024, 6, 8, 3, 0, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    b.ports.clock = lambda: saturday_night
    with b.subscribe(AlertRaised) as raised:
        for _ in range(3):
            await b.read(sent.record_id)
        bulk = await until(lambda: open_alerts(b, "bulk-reads"), "the bulk-reads alert")
        late = await until(lambda: open_alerts(b, "after-hours"), "the after-hours alert")
        assert {e.rule for e in raised.pending()} >= {"bulk-reads", "after-hours"}
    assert bulk[0]["subject"] == "local" and bulk[0]["count"] == 3 and bulk[0]["at"] == saturday_night
    assert late[0]["subject"] == "local"
    for row in bulk + late:
        assert PATIENT not in json.dumps(row) and sent.record_id not in json.dumps(row)


async def test_refusals_sign_ins_key_change_and_persistence(pair, tmp_path):
    a, b = pair
    for _ in range(4):                                # what the intake publishes for a bad envelope
        b.events.publish(Refusal(at=b.ports.now(), peer=a.node_id, reason="invalid-envelope"))
    await b.accounts.add_user("secretariat", "secretary", "a long enough password")
    failures = 0
    while failures < 2:                               # the second is let through once the throttle's delay passed
        try:
            await b.accounts.sign_in("secretariat", "wrong password!", "127.0.0.1")
        except TooManyAttempts:
            await asyncio.sleep(0.05)
        except AuthenticationFailed:
            failures += 1
    b.events.publish(KeyChanged(at=b.ports.now(), node_id=a.node_id, status="held"))
    refused = await until(lambda: open_alerts(b, "refusals"), "the refusals alert")
    signs = await until(lambda: open_alerts(b, "failed-sign-ins"), "the sign-in alert")
    keys = await until(lambda: open_alerts(b, "key-change"), "the key-change alert")
    assert refused[0]["subject"] == a.node_id and refused[0]["count"] == 4
    assert signs[0]["subject"] == "secretariat" and signs[0]["count"] == 2
    assert keys[0]["subject"] == a.node_id
    assert a.alerts is not None and await a.alerts() == []          # nothing at the other practice
    folder = b.folder
    await b.close()
    b.closed_by_test = True  # type: ignore[attr-defined]
    again = await Node.open_node(folder, passphrase=PASSPHRASE)     # alerts persist in SQLite
    try:
        rules = {r["rule"] for r in await again.alerts()}
        assert {"refusals", "failed-sign-ins", "key-change"} <= rules
        row = await again.ack_alert(refused[0]["id"], "cli:it")
        assert row["acked_by"] == "cli:it" and row["acked_at"]
        assert refused[0]["id"] not in {r["id"] for r in await again.alerts()}
        assert refused[0]["id"] in {r["id"] for r in await again.alerts(include_acked=True)}
        entries = await again.store.call(audit.entries)
        assert entries[0]["event"] == "alert-acknowledged" and "refusals" in entries[0]["detail"]
        assert await again.audit_verify() == (True, None)
        with pytest.raises(Exception, match="no open alert"):
            await again.ack_alert(refused[0]["id"], "cli:it")             # twice: one clear line
    finally:
        await again.close()


async def test_break_glass_and_first_grant_use_from_the_audit_log(pair):
    a, b = pair

    def write(db):                                    # the entries the patient service writes (sealed detail)
        with records.transaction(db):
            audit.append(db, at=1, event="break-glass", peer=a.node_id, detail="sealed:xx")
            for n in range(2):                        # the same practice, the same patient: one alert only
                seq = audit.append(db, at=2 + n, event="grant-used", peer=a.node_id, detail="sealed:yy")
                db.conn.execute("INSERT INTO patient_audit (seq, ref_ix) VALUES (?, ?)", (seq, b"\1" * 32))
    await b.store.call(write)
    glass = await until(lambda: open_alerts(b, "break-glass"), "the break-glass alert")
    first = await until(lambda: open_alerts(b, "first-grant"), "the first-grant alert")
    assert glass[0]["subject"] == a.node_id and first[0]["subject"] == a.node_id and first[0]["count"] == 1


async def test_a_broken_audit_chain_raises_an_alert(pair):
    a, b = pair
    await b._audit("read", record="0" * 32)
    assert await b.verify_audit_for_alerts() is True and await open_alerts(b, "audit-broken") == []
    conn = sqlite3.connect(b.folder / "cabinet.db")  # someone editing the file by other means
    triggers = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                           "AND tbl_name = 'audit'")]
    for t in triggers:
        conn.execute(f"DROP TRIGGER {t}")
    conn.execute("UPDATE audit SET event = 'nothing' WHERE seq = 1")
    conn.commit()
    conn.close()
    assert await b.verify_audit_for_alerts() is False
    row = (await open_alerts(b, "audit-broken"))[0]
    assert row["subject"] == "node" and "entry 1" in row["detail"]


# --- telling IT ---------------------------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content)
        return "250 OK"


async def test_alerts_go_to_an_smtp_sink_and_a_webhook(tmp_path):
    sink = Sink()
    smtp_port, hook_port = free_port(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    posted: list[dict] = []

    async def receive(request: web.Request) -> web.Response:
        posted.append(await request.json())
        return web.json_response({"ok": True})
    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    node = await make(tmp_path, "Dr Anne Martin", {
        "refusals": 2, "email_to": "it@example.test", "email_from": "cabinet@example.test",
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "webhook": f"http://127.0.0.1:{hook_port}/hook"})
    try:
        for _ in range(3):
            node.events.publish(Refusal(at=node.ports.now(), peer="PEER-NODE-ID", reason="quota"))

        async def told():
            return sink.messages and posted
        await until(told, "the e-mail and the webhook")
        await asyncio.sleep(0)
        assert len(posted) == 1                        # a new alert is told once, not at each count
        assert posted[0]["rule"] == "refusals" and posted[0]["subject"] == "PEER-NODE-ID"
        assert posted[0]["node"] == node.node_id and posted[0]["count"] >= 2
        mail = sink.messages[0].decode()
        assert "Subject: cabinet alert: refusals (PEER-NODE-ID)" in mail and "cabinet alerts ack" in mail
    finally:
        await node.close()
        await runner.cleanup()
        controller.stop()
