"""The store: a stolen data folder reveals no patient data; the audit chain catches edits."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from node.core.errors import CorruptStore, StoreError, UsageError, WrongPassphrase
from node.store import audit, keyfile, records
from node.store.db import DBFILE, Store, connect, transaction

CANARY = "Zorglub-Canary-7731"


def every_file(folder: Path):
    for p in folder.rglob("*"):
        if p.is_file():
            yield p


def test_stolen_data_folders_reveal_no_patient_data(pair, tmp_path):
    gp, cardio = pair
    letter = tmp_path / "letter.txt"
    letter.write_text(f"Dear colleague, about {CANARY} ...", encoding="utf-8")
    att = tmp_path / f"{CANARY}-scan.pdf"
    att.write_bytes(b"%PDF-1.4 " + CANARY.encode() * 1000)
    out = gp.ok("send", "--to", "Dr Paul Durand", "--patient", f"Jeanne {CANARY}", "--born", "1961-04-02",
                "--subject", f"Subject {CANARY}", "--letter", str(letter), str(att))
    rid = out.split()[1]
    # Reading, exporting and replying exercise every path that touches plaintext.
    assert CANARY in cardio.ok("show", rid)
    cardio.ok("export", rid, str(tmp_path / "export"))
    reply = tmp_path / "reply.txt"
    reply.write_text(f"Report on {CANARY}", encoding="utf-8")
    reply_id = cardio.ok("reply", rid, "--letter", str(reply)).split()[1]
    assert "Jeanne Zorglub" in gp.ok("inbox")
    assert f"Report on {CANARY}" in gp.ok("show", reply_id)
    scanned = 0
    for node in (gp, cardio):
        for stop_first in (False, True):          # with the WAL live, then after a clean stop
            if stop_first:
                node.stop()
            for f in every_file(node.data):
                raw = f.read_bytes()
                scanned += len(raw)
                for needle in (CANARY.encode(), CANARY.encode("utf-16-le"), b"Jeanne"):
                    assert needle not in raw, f"{needle!r} found in {f.relative_to(node.data)}"
    assert scanned > 2 * len(CANARY) * 1000           # the ciphertext really was scanned
    names = {f.name for n in (gp, cardio) for f in every_file(n.data)}
    assert any(n.endswith("-wal") for n in names) or DBFILE in names


def test_permissions_of_data_folder_and_key_file(practice):
    n = practice("Dr Perm")
    assert stat.S_IMODE(n.data.stat().st_mode) == 0o700
    assert stat.S_IMODE((n.data / keyfile.KEYFILE).stat().st_mode) == 0o600
    os.chmod(n.data, 0o755)
    n.ok("contact", "list")
    assert stat.S_IMODE(n.data.stat().st_mode) == 0o700       # tightened again on open


def test_key_file_wrong_passphrase_and_damage(tmp_path):
    os.environ["CABINET_KDF"] = "min"
    secrets = keyfile.create(tmp_path, "a long passphrase")
    assert keyfile.open_(tmp_path, "a long passphrase").identity.node_id == secrets.identity.node_id
    with pytest.raises(WrongPassphrase):
        keyfile.open_(tmp_path, "another passphrase")
    with pytest.raises(UsageError):
        keyfile.create(tmp_path / "x", "short")
    raw = (tmp_path / keyfile.KEYFILE).read_bytes()
    (tmp_path / keyfile.KEYFILE).write_bytes(raw[:-5])
    with pytest.raises(CorruptStore):
        keyfile.open_(tmp_path, "a long passphrase")
    (tmp_path / keyfile.KEYFILE).write_bytes(b"\x00garbage")
    with pytest.raises(CorruptStore):
        keyfile.open_(tmp_path, "a long passphrase")


def test_garbage_database_is_a_clear_error(tmp_path):
    (tmp_path / DBFILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptStore, match="damaged"):
        connect(tmp_path / DBFILE)


def _db(tmp_path):
    return connect(tmp_path / DBFILE)


def test_audit_log_refuses_update_and_delete_through_sqlite(tmp_path):
    db = _db(tmp_path)
    with transaction(db):
        audit.append(db, at=1, event="read", record="ab" * 16)
    for sql in ("UPDATE audit SET event = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.conn.execute(sql)
    assert audit.verify(db) == (True, None)


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "rechain-one"])
def test_audit_chain_detects_tampering_by_other_means(tmp_path, tamper):
    db = _db(tmp_path)
    with transaction(db):
        for i in range(6):
            audit.append(db, at=1000 + i, event="read", record=f"{i:032x}", peer="P")
    assert audit.verify(db) == (True, None)
    # Someone with the file drops the triggers and edits it directly.
    db.conn.execute("DROP TRIGGER audit_no_update")
    db.conn.execute("DROP TRIGGER audit_no_delete")
    if tamper == "edit":
        db.conn.execute("UPDATE audit SET event = 'nothing' WHERE seq = 3")
    elif tamper == "delete":
        db.conn.execute("DELETE FROM audit WHERE seq = 3")
    elif tamper == "reorder":
        db.conn.execute("UPDATE audit SET seq = 100 WHERE seq = 2")
        db.conn.execute("UPDATE audit SET seq = 2 WHERE seq = 3")
        db.conn.execute("UPDATE audit SET seq = 3 WHERE seq = 100")
    else:  # recompute one entry's hash after editing it: the next entry's prev no longer matches
        row = db.conn.execute("SELECT prev FROM audit WHERE seq = 3").fetchone()
        db.conn.execute("UPDATE audit SET event = 'x', hash = ? WHERE seq = 3",
                        (audit._entry_hash(row[0], 3, 1002, "x", f"{2:032x}", "P", None),))
    ok, bad = audit.verify(db)
    assert not ok and bad in (2, 3, 4)


def test_record_insert_is_all_or_nothing_and_idempotent(tmp_path):
    db = _db(tmp_path)
    row = {"id": "aa" * 16, "direction": "in", "kind": "referral", "sender": "S", "thread": "aa" * 16,
           "reply_to": None, "created": 1, "stored": 2, "head": b"h", "body_size": 10, "meta": b"m",
           "patient_ix": b"p"}
    assert records.insert_record(db, row, now=5, event="received", peer="S") is True
    assert records.insert_record(db, row, now=6, event="received", peer="S") is False   # duplicate dropped
    assert len(records.list_records(db)) == 1
    bad = dict(row, id="bb" * 16, kind=None)       # violates NOT NULL: nothing at all is written
    with pytest.raises(sqlite3.IntegrityError):
        records.insert_record(db, bad, now=7, event="received")
    assert len(records.list_records(db)) == 1
    assert audit.head(db)[0] == 1                   # the failed insert left no audit entry either


def test_outbox_sequence_numbers_are_per_recipient(tmp_path):
    db = _db(tmp_path)
    base = {"direction": "out", "kind": "referral", "sender": "me", "reply_to": None, "created": 1, "stored": 1,
            "head": b"h", "body_size": 1, "meta": b"m", "patient_ix": b"p"}
    records.insert_record(db, dict(base, id="01" * 16, thread="01" * 16), recipients=["A", "B"], now=1, event="sent")
    records.insert_record(db, dict(base, id="02" * 16, thread="02" * 16), recipients=["B"], now=2, event="sent")
    seqs = {(d["record_id"][:2], d["recipient"]): d["seq"] for d in records.deliveries(db)}
    assert seqs == {("01", "A"): 1, ("01", "B"): 1, ("02", "B"): 2}


def test_blind_index_matches_despite_case_and_accents_but_not_other_patients():
    key = os.urandom(32)
    a = records.patient_index(key, "Jérôme  Dupont", "1961-04-02")
    assert a == records.patient_index(key, "jerome dupont", "1961-04-02")
    assert a != records.patient_index(key, "Jerome Dupont", "1961-04-03")
    assert a != records.patient_index(os.urandom(32), "Jérôme Dupont", "1961-04-02")


def test_store_errors_are_translated(tmp_path):
    store = Store(tmp_path / DBFILE)
    try:
        with pytest.raises(StoreError):
            store.call_sync(lambda db: db.conn.execute("SELECT * FROM no_such_table"))
    finally:
        store.close()
