"""Backup and restore (issue 12): real `cabinet run` processes, real backup folders, damaged on purpose.

Also the pure parts: the sender's voids after a restore and the recipient's skip over them, and
`cabinet keys passphrase`.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import PASSPHRASE, ROOT, base_env, db_rows, wait_for

from node.core.errors import RemoteProtocolError
from node.store import backup as seqs
from node.store import records
from node.store.db import connect
from node.sync.messages import Ack, Batch, BatchItem, Want
from node.sync.session import RecipientSession, SenderSession

CANARY = "Zorglubine Canarybackup"
LETTER = f"Cher confrère, je vous adresse {CANARY} pour bilan.\n"


def box(data, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cabinet backup|restore|keys passphrase ...` as a real subprocess."""
    mod = "node"
    cmd = [sys.executable, "-m", mod, *args] + (["--data", str(data)] if data is not None else [])
    return subprocess.run(cmd, cwd=ROOT, env=env or base_env(), capture_output=True, text=True, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    for w in words:
        assert w in err, err
    return err


def send(node, to: str, tmp_path, tag: str, attach: int = 0) -> str:
    letter = tmp_path / f"letter-{tag}.txt"
    letter.write_text(LETTER + tag)
    args = ["send", "--to", to, "--patient", CANARY, "--born", "1961-04-02", "--subject", f"{CANARY} {tag}",
            "--letter", str(letter)]
    if attach:
        f = tmp_path / f"{CANARY}-{tag}.bin"
        f.write_bytes(os.urandom(attach))
        args.append(str(f))
    out = node.ok(*args)
    return re.search(r"Record ([0-9a-f]{32})", out).group(1)


def delivered(node, rid: str) -> bool:
    return "delivered" in node.ok("outbox", rid)


def count_in(node, rid: str) -> int:
    return db_rows(node, "SELECT COUNT(*) FROM records WHERE id = ?", (rid,))[0][0]


def integrity(node) -> str:
    return db_rows(node, "PRAGMA integrity_check")[0][0]


# --- end to end ---------------------------------------------------------------------

def test_backup_exchange_destroy_restore_carry_on(pair, tmp_path):
    gp, cardio = pair
    dest = tmp_path / "stick"
    r1 = send(gp, "Dr Paul Durand", tmp_path, "r1", attach=600_000)         # a body in blobs/
    r2 = send(cardio, "Dr Anne Martin", tmp_path, "r2")
    wait_for(lambda: delivered(gp, r1) and delivered(cardio, r2), 30, "first exchange")

    out = ok(box(gp.data, "backup", str(dest)))
    assert re.search(r"Recovery code: [A-Z2-7]{4}(-[A-Z2-7]{4}){7}; keep it on paper", out)
    assert "1 new record bodies copied" in out
    assert "backup OK" in ok(box(None, "backup", "--check", str(dest)))

    # After the backup: one record each way, then the disk dies.
    lost = send(gp, "Dr Paul Durand", tmp_path, "r3")
    r4 = send(cardio, "Dr Anne Martin", tmp_path, "r4")
    wait_for(lambda: delivered(gp, lost) and delivered(cardio, r4), 30, "exchange after the backup")
    gp.stop()
    shutil.rmtree(gp.data)

    out = ok(box(gp.data, "restore", str(dest)))
    assert "restored" in out and not (gp.data.parent / (gp.data.name + ".partial")).exists()
    assert "restored" in [e for e, in db_rows(gp, "SELECT event FROM audit ORDER BY seq DESC LIMIT 1")]
    gp.start()

    r5 = send(gp, "Dr Paul Durand", tmp_path, "r5")
    r6 = send(cardio, "Dr Anne Martin", tmp_path, "r6")
    wait_for(lambda: delivered(gp, r5) and delivered(cardio, r6), 30, "exchange after the restore")

    # What the colleague sent after the backup (r4, delivered then lost with the disk) comes again by pull.
    wait_for(lambda: count_in(gp, r4) == 1, 30, "r4 pulled again by the restored node")
    # What the lost node sent after the backup is named: the colleague's acks and wants hold its seq.
    lost_line = wait_for(lambda: next((ln for ln in gp.ok("outbox").splitlines()
                                       if ln.startswith("sent after the last backup: not in this copy")), None),
                         30, "the outbox names what the lost node sent")
    assert "(1 record to Dr Paul Durand, backup of " in lost_line, lost_line

    # Nothing doubled anywhere; what the restored node sends never reuses a number the lost one used.
    for rid in (r1, lost, r5):
        assert count_in(cardio, rid) == 1
    for rid in (r2, r4, r6):
        assert count_in(gp, rid) == 1 and count_in(cardio, rid) == 1
    assert count_in(gp, lost) == 0                                                          # not in this copy
    assert sorted(db_rows(gp, "SELECT seq FROM records WHERE sender = ? AND direction = 'in'", (cardio.node_id,))) \
        == [(1,), (2,), (3,)]                                                     # r2, r4, r6: the cursor is whole
    assert db_rows(gp, "SELECT cursor FROM streams_in WHERE sender = ?", (cardio.node_id,)) == [(3,)]
    cardio_out = cardio.ok("outbox").splitlines()
    for rid in (r2, r4, r6):                              # the colleague's outbox: each once, delivered
        lines = [ln for ln in cardio_out if ln.startswith(rid[:10])]
        assert len(lines) == 1 and "delivered" in lines[0], cardio_out
    assert db_rows(cardio, "SELECT COUNT(*), COUNT(DISTINCT record_id) FROM deliveries") == [(3, 3)]
    assert db_rows(cardio, "SELECT COUNT(*) FROM deliveries WHERE state != 'delivered'") == [(0,)]
    new_seq = db_rows(gp, "SELECT seq FROM deliveries WHERE record_id = ?", (r5,))[0][0]
    old_seqs = [s for s, in db_rows(cardio, "SELECT seq FROM records WHERE sender = ? AND direction = 'in'",
                                    (gp.node_id,))]
    assert new_seq > seqs.VOID_MARGIN and len(old_seqs) == len(set(old_seqs)) == 3
    for n in (gp, cardio):
        assert integrity(n) == "ok"
        assert "intact" in n.ok("audit", "verify")
    assert CANARY in gp.ok("show", r1)                  # the restored body opens


def _node_with_blobs(practice, tmp_path, n: int = 2):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    from conftest import introduce
    introduce(gp, cardio)
    for i in range(n):
        letter = tmp_path / f"l{i}.txt"
        letter.write_text(LETTER)
        att = tmp_path / f"{CANARY}-{i}.bin"
        att.write_bytes(os.urandom(300_000))
        gp.ok("send", "--to", "Dr Paul Durand", "--patient", CANARY, "--letter", str(letter), "--no-deliver",
              str(att))
    return gp


def test_incremental_copies_only_new_bodies_and_no_patient_string_in_the_backup(practice, tmp_path):
    gp = _node_with_blobs(practice, tmp_path, 2)
    dest = tmp_path / "nas"
    assert "2 new record bodies copied, 0 already there" in ok(box(gp.data, "backup", str(dest)))
    letter = tmp_path / "l9.txt"
    letter.write_text(LETTER)
    att = tmp_path / "more.bin"
    att.write_bytes(os.urandom(400_000))
    gp.ok("send", "--to", "Dr Paul Durand", "--patient", CANARY, "--letter", str(letter), "--no-deliver", str(att))
    out = ok(box(gp.data, "backup", str(dest)))
    assert "1 new record bodies copied, 2 already there" in out and "Recovery code" not in out
    blobs = [p for p in (dest / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3 and len(list((dest / "db").iterdir())) == 1        # the older database copy is gone
    for p in dest.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            for form in (CANARY.encode(), CANARY.encode("utf-16-le"), LETTER.encode()):
                assert form not in raw, p


@pytest.mark.parametrize("damage, words", [
    ("truncate-db", ["db/", "bytes"]),
    ("flip-blob", ["blobs/", "checksum"]),
    ("missing-blob", ["blobs/", "missing"]),
    ("flip-manifest", ["manifest"]),
])
def test_damaged_backup_is_refused_in_one_line_and_restore_leaves_nothing(practice, tmp_path, damage, words):
    gp = _node_with_blobs(practice, tmp_path, 1)
    dest = tmp_path / "bk"
    ok(box(gp.data, "backup", str(dest), "--part-mib", "0.05"))
    parts = sorted((dest / "db").iterdir())
    assert len(parts) >= 2                         # the database copy is chunked
    blob = next(p for p in (dest / "blobs").rglob("*") if p.is_file())
    if damage == "truncate-db":
        parts[-1].write_bytes(parts[-1].read_bytes()[:-100])
    elif damage == "flip-blob":
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 1
        blob.write_bytes(bytes(raw))
    elif damage == "missing-blob":
        blob.unlink()
    else:
        raw = bytearray((dest / "manifest").read_bytes())
        raw[40] ^= 1
        (dest / "manifest").write_bytes(bytes(raw))
    refused(box(None, "backup", "--check", str(dest)), "damaged", *words)
    target = tmp_path / "new-box"
    refused(box(target, "restore", str(dest)), "damaged", *words)
    assert not target.exists() and not (tmp_path / "new-box.partial").exists()


def test_restore_with_recovery_code_and_wrong_secrets(practice, tmp_path):
    gp = _node_with_blobs(practice, tmp_path, 1)
    dest = tmp_path / "bk"
    code = re.search(r"Recovery code: (\S+);", ok(box(gp.data, "backup", str(dest)))).group(1)
    target = tmp_path / "box2"
    wrong = base_env(CABINET_PASSPHRASE="not the passphrase")
    refused(box(target, "restore", str(dest), env=wrong), "wrong passphrase")
    bad_code = base_env(CABINET_RECOVERY_CODE="AAAA-BBBB", CABINET_NEW_PASSPHRASE="a new passphrase")
    refused(box(target, "restore", str(dest), "--recovery-code", env=bad_code), "wrong recovery code")
    assert not target.exists()
    env = base_env(CABINET_PASSPHRASE="", CABINET_RECOVERY_CODE=code.lower().replace("-", " "),
                   CABINET_NEW_PASSPHRASE="a new passphrase")
    assert "restored" in ok(box(target, "restore", str(dest), "--recovery-code", env=env))
    new = base_env(CABINET_PASSPHRASE="a new passphrase")
    from conftest import cli
    assert CANARY in ok(cli(target, "inbox", "--all", env=new))
    assert "intact" in ok(cli(target, "audit", "verify", env=new))
    refused(cli(target, "inbox", env=base_env()), "wrong passphrase")


def test_keys_passphrase_rewraps_only_the_key_file(practice, tmp_path):
    gp = practice("Dr Anne Martin")
    before = gp.ok("id")
    db_before = (gp.data / "cabinet.db").read_bytes()
    env = base_env(CABINET_NEW_PASSPHRASE="another good passphrase")
    assert "passphrase changed" in ok(box(gp.data, "keys", "passphrase", "--kdf", "interactive", env=env))
    from conftest import cli
    refused(cli(gp.data, "id"), "wrong passphrase")
    new = base_env(CABINET_PASSPHRASE="another good passphrase")
    assert ok(cli(gp.data, "id", env=new)).splitlines()[0] == before.splitlines()[0]
    assert (gp.data / "cabinet.db").read_bytes() == db_before
    short = base_env(CABINET_PASSPHRASE="another good passphrase", CABINET_NEW_PASSPHRASE="short")
    refused(box(gp.data, "keys", "passphrase", env=short), "too short")


def test_a_running_node_survives_a_passphrase_change_by_another_command(pair, tmp_path):
    gp, cardio = pair
    env = base_env(CABINET_NEW_PASSPHRASE="another good passphrase")
    assert "passphrase changed" in ok(box(gp.data, "keys", "passphrase", env=env))
    said = "the passphrase was changed by another command; restart the node to take later key changes"
    log = gp.data / "node.log"
    wait_for(lambda: said in log.read_text(), 30, "the running node to notice the new passphrase")
    r = send(cardio, "Dr Anne Martin", tmp_path, "after")       # the running node still receives
    wait_for(lambda: delivered(cardio, r), 30, "a record delivered to the node after the change")
    text = log.read_text()
    assert gp.proc.poll() is None and text.count(said) == 1 and "Traceback" not in text


# --- the sequence numbers after a restore (pure, and SQLite in a temp folder) ------------

def test_sender_lists_the_void_and_recipient_skips_it():
    sender = SenderSession("B", last=7, voids=[(8, 1_000_007)])
    assert sender.last == 1_000_007
    listing, _ = sender.on_want(Want(since=9, after=9))
    assert listing.void == (8, 1_000_007)
    assert sender.held_unknown([9, 5, 12]) == (9, 12)                 # sent by the lost node
    with pytest.raises(RemoteProtocolError):
        sender.on_want(Want(since=1_000_008))
    recipient = RecipientSession("A", Ack(upto=9))
    batch = Batch.from_wire(Batch(prev=9, last=1_000_007, void=listing.void).to_wire())
    assert recipient.skip(batch) == (8, 1_000_007)
    assert RecipientSession("A", Ack(upto=5)).skip(batch) is None      # seqs 6, 7 still to come
    with pytest.raises(RemoteProtocolError):
        Batch(prev=0, last=10, void=(3, 11))
    with pytest.raises(RemoteProtocolError):
        Batch(prev=0, last=10, void=(3, 5), items=(BatchItem(seq=4, record_id="a" * 32, head=b"h", size=1),))


def test_restore_voids_move_next_seq_and_the_recipient_cursor(tmp_path):
    db = connect(tmp_path / "cabinet.db")
    conn = db.conn
    conn.execute("INSERT INTO records (id, direction, kind, sender, thread, created, stored, head, body_size, meta, "
                 "patient_ix) VALUES ('r1', 'out', 'referral', 'me', 't', 0, 0, x'00', 0, x'00', x'00')")
    conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                 "VALUES ('r1', 'B', 3, 'delivered', 0, 0)")
    seqs.record_restore(db, at=1, backup_at=0, detail="backup of test")
    assert seqs.next_seq(conn, "B") == 3 + seqs.VOID_MARGIN + 1
    assert seqs.next_seq(conn, "C") == seqs.VOID_MARGIN + 1            # a stream the backup did not know
    assert records.last_seqs(db)["B"] == 3 + seqs.VOID_MARGIN
    assert seqs.void_above(conn, "B", 5) == (4, 3 + seqs.VOID_MARGIN)
    assert seqs.note_seen(db, "C", [0, 7]) == 1
    assert seqs.sent_after_backup(db) == [{"recipient": "C", "count": 7, "backup_at": 0}]
    # The recipient's side: cursor 3, the sender's void (4 .. 1,000,003) is skipped.
    conn.execute("INSERT INTO streams_in (sender, cursor) VALUES ('S', 3)")
    assert records.skip_void(db, "S", 4, 1_000_003).upto == 1_000_003
    conn.execute("INSERT INTO streams_in (sender, cursor) VALUES ('T', 1)")
    assert records.skip_void(db, "T", 4, 1_000_003).upto == 1                # 2 and 3 have not come yet
    from node.store import audit
    assert audit.verify(db) == (True, None)
    conn.close()


def test_settled_above_lists_delivered_and_refused_positions_of_one_stream(tmp_path):
    db = connect(tmp_path / "cabinet.db")
    conn = db.conn
    for n, (who, seq, state) in enumerate([("B", 1, "delivered"), ("B", 2, "refused"), ("B", 3, "queued"),
                                            ("B", 4, "delivered"), ("B", 5, "sending"), ("C", 3, "delivered")]):
        conn.execute("INSERT OR IGNORE INTO records (id, direction, kind, sender, thread, created, stored, head, "
                     "body_size, meta, patient_ix) VALUES (?, 'out', 'referral', 'me', 't', 0, 0, x'00', 0, x'00', "
                     "x'00')", (f"r{n}",))
        conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                     "VALUES (?, ?, ?, ?, 0, 0)", (f"r{n}", who, seq, state))
    assert records.settled_above(db, "B", 0, 500) == [(1, "r0"), (2, "r1"), (4, "r3")]
    assert records.settled_above(db, "B", 1, 1) == [(2, "r1")]                 # above `start`, the lowest
    assert records.settled_above(db, "B", 4, 500) == [] and records.settled_above(db, "D", 0, 500) == []
    conn.close()
