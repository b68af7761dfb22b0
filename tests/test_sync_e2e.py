"""Store-and-forward with real node processes: push alone, pull alone, receipts, catch-up."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, base_env, db_rows, introduce, wait_for


def enqueue(node, to: str, count: int, big=None) -> list[str]:
    args = [sys.executable, str(ROOT / "tests" / "_enqueue.py"), str(node.data), to, str(count)]
    if big:
        args.append(str(big))
    out = subprocess.run(args, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def received(node) -> set[str]:
    return {r[0] for r in db_rows(node, "SELECT id FROM records WHERE direction = 'in'")}


def delivered(node) -> int:
    return db_rows(node, "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'")[0][0]


def test_pull_alone_is_enough_when_the_recipient_accepts_no_connections(practice, tmp_path):
    gp, cardio = practice("Dr Gp"), practice("Dr Cardio")
    introduce(gp, cardio)
    gp.start()
    cardio.start("--no-listen", "--pull-every", "1")
    assert any("not listening" in line for line in cardio.log)
    letter = tmp_path / "l.txt"
    letter.write_text("hello")
    out = gp.ok("send", "--to", "Dr Cardio", "--patient", "Anne Pull", "--letter", str(letter))
    rid = out.split()[1]
    assert "queued" in out                     # nobody to push to
    wait_for(lambda: rid in received(cardio), 30, "the recipient to pull the record")
    wait_for(lambda: "delivered" in gp.ok("outbox", rid), 30, "the sender to learn it was delivered")


def test_push_alone_is_enough_when_the_sender_accepts_no_connections(practice, tmp_path):
    gp, cardio = practice("Dr Gp"), practice("Dr Cardio")
    introduce(gp, cardio)
    gp.start("--no-listen")
    cardio.start()
    letter = tmp_path / "l.txt"
    letter.write_text("hello")
    out = gp.ok("send", "--to", "Dr Cardio", "--patient", "Anne Push", "--letter", str(letter))
    assert "delivered" in out
    assert out.split()[1] in received(cardio)


def test_opened_receipt_travels_back_to_the_sender(pair, tmp_path):
    gp, cardio = pair
    letter = tmp_path / "l.txt"
    letter.write_text("hello")
    rid = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Anne Read", "--letter", str(letter)).split()[1]
    assert "not opened yet" in gp.ok("outbox", rid)
    cardio.ok("show", rid)
    wait_for(lambda: "opened" in gp.ok("outbox", rid).replace("not opened", ""), 30, "the opened receipt")
    receipt = db_rows(gp, "SELECT opened_receipt FROM deliveries WHERE record_id = ?", (rid,))[0][0]
    assert receipt and len(receipt) > 64


def test_catch_up_after_days_away_delivers_each_record_once(practice, tmp_path):
    gp, cardio = practice("Dr Gp"), practice("Dr Cardio")
    introduce(gp, cardio)
    ids = enqueue(gp, "Dr Cardio", 300)
    gp.start()                                  # the courier tries, the colleague is away
    wait_for(lambda: "attempt" in gp.ok("outbox", ids[0]), 20, "a failed attempt")
    gp.stop()                                   # the sender restarts meanwhile: the schedule is on disk
    gp.start()
    cardio.start()
    wait_for(lambda: len(received(cardio)) == 300, 60, "all 300 records")
    assert received(cardio) == set(ids)
    wait_for(lambda: delivered(gp) == 300, 30, "the sender's outbox to drain")
    seqs = [r[0] for r in db_rows(cardio, "SELECT seq FROM records WHERE direction = 'in' ORDER BY seq")]
    assert seqs == list(range(1, 301))
    assert db_rows(cardio, "SELECT cursor FROM streams_in")[0][0] == 300
    events = db_rows(cardio, "SELECT record, COUNT(*) FROM audit WHERE event = 'received' GROUP BY record")
    assert len(events) == 300 and all(n == 1 for _, n in events)


def test_one_colleague_offline_delays_no_one_else(practice, tmp_path):
    gp, a, b = practice("Dr Gp"), practice("Dr A"), practice("Dr B")
    introduce(gp, a)
    introduce(gp, b)
    gp.start()
    b.start()                                   # A stays off
    letter = tmp_path / "l.txt"
    letter.write_text("hello")
    out = gp.ok("send", "--to", "Dr A", "--to", "Dr B", "--patient", "Anne Both", "--letter", str(letter))
    rid = out.split()[1]
    assert out.count("delivered") == 1 and out.count("queued") == 1
    assert rid in received(b)
    a.start()
    wait_for(lambda: rid in received(a), 30, "the record to reach A once it is back")
