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


PATIENT_CANARIES = (b"P-CANARY7", b"psychiatry-canary", b"CANARYREASON")


def test_stolen_folder_reveals_no_patient_reference_category_or_reason(pair, tmp_path):
    """Patients (issue 9, item 12): references, categories, break-glass reasons, grants and
    revocations are sealed or blind-indexed; every byte of both folders is scanned."""
    import base64 as b64
    import json as js
    gp, cardio = pair
    letter = tmp_path / "letter.txt"
    letter.write_text("Bilan", encoding="utf-8")
    rid = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Test", "--subject", "Bilan",
                "--letter", str(letter)).split()[1]
    gp.ok("patient", "enroll", "--patient", "P-CANARY7", "--out", str(tmp_path / "cards"))
    card = str(tmp_path / "cards" / "card-P-CANARY7.txt")
    gp.ok("patient", "link", rid, "--patient", "P-CANARY7", "--category", "psychiatry-canary")
    token = gp.ok("patient", "grant", "--card", card, "--to", cardio.node_id, "--scope",
                  "category:psychiatry-canary", "--days", "2").strip()
    assert "Record " in cardio.ok("request", "--from", "Dr Anne Martin", "--token", token)
    gp.ok("patient", "break-glass", "--allow", "Dr Paul Durand")
    reason = "Unconscious patient CANARYREASON cardiac history needed"
    cardio.ok("request", "--from", "Dr Anne Martin", "--emergency", reason, "--patient", "P-CANARY7")
    payload = token.split(".")[2]
    jti = js.loads(b64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))[:-64])["jti"]
    gp.ok("patient", "revoke", "--card", card, jti)
    history = gp.ok("patient", "history", "--card", card)
    for shown in ("CANARYREASON", "break-glass", "grant-revoked", "psychiatry-canary", "access-sent"):
        assert shown in history, history
    assert "intact" in gp.ok("audit", "verify")
    scanned = 0
    for node in (gp, cardio):
        for stop_first in (False, True):          # with the WAL live, then after a clean stop
            if stop_first:
                node.stop()
            for f in every_file(node.data):
                raw = f.read_bytes()
                scanned += len(raw)
                for needle in PATIENT_CANARIES + (jti.encode(),):
                    for form in (needle, needle.decode().encode("utf-16-le")):
                        assert form not in raw, f"{needle!r} found in {f.relative_to(node.data)}"
    assert scanned > 10_000


# --- schema 3: a record is keyed by (id, sender); files are 0600 -------------------------------

def _schema_2() -> str:
    from node.store import db as dbmod
    old = dbmod.SCHEMA.replace("    id         TEXT NOT NULL,", "    id         TEXT PRIMARY KEY,")
    old = old.replace(",\n    PRIMARY KEY (id, sender)\n", "\n")
    old = old.replace("    record_id  TEXT NOT NULL,", "    record_id  TEXT NOT NULL REFERENCES records (id),")
    assert old != dbmod.SCHEMA and "REFERENCES records (id)" in old
    return old


def test_a_schema_2_database_is_migrated_to_records_keyed_by_sender(tmp_path):
    from node.store import db as dbmod
    path = tmp_path / DBFILE
    conn = sqlite3.connect(path)
    conn.executescript(_schema_2() + dbmod.PATIENTS_SCHEMA)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', 2)")
    rid = "ab" * 16
    for direction, sender, seq in (("out", "ME", None), ("in", "A", 1)):
        conn.execute("INSERT INTO records (id, direction, kind, sender, thread, created, stored, head, body_size, "
                     "meta, patient_ix, seq) VALUES (?, ?, 'referral', ?, 't', 1, 1, x'01', 3, x'00', x'00', ?)",
                     (rid if direction == "out" else "cd" * 16, direction, sender, seq))
    conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                 "VALUES (?, 'B', 1, 'queued', 0, 0)", (rid,))
    conn.commit()
    conn.close()

    store = Store(path)
    try:
        assert store.call_sync(lambda db: db.conn.execute("SELECT value FROM meta WHERE key='schema'")
                               .fetchone()[0]) == dbmod.SCHEMA_VERSION == 3
        assert store.call_sync(records.pending_for, "B") == {1: rid}               # the outbox survived
        assert store.call_sync(records.stored_from, "cd" * 16, "A") == b"\x01"
        # Another sender's record under an ID already held is now a record of its own.
        row = dict(id="cd" * 16, direction="in", kind="referral", sender="C", thread="t", reply_to=None,
                   created=1, stored=2, head=b"\x02", body_size=3, meta=b"\x00", patient_ix=b"\x00", seq=1)
        new, _ = store.call_sync(records.insert_received, [row], sender="C", now=2)
        assert new == [True]
        with pytest.raises(UsageError, match="several senders"):
            store.call_sync(records.get_record, "cd" * 16)
        assert store.call_sync(records.get_record, "cd" * 16, "C")["head"] == b"\x02"
        assert store.call_sync(records.get_record, "cd" * 16, "A")["head"] == b"\x01"
        # The same sender reusing its ID for another record is still refused.
        new, _ = store.call_sync(records.insert_received, [dict(row, head=b"\x03", seq=2)], sender="C", now=3)
        assert new == [None]
        assert store.call_sync(lambda db: db.conn.execute("PRAGMA foreign_key_check").fetchall()) == []
    finally:
        store.close()
    Store(path).close()                                        # opens again, already migrated


async def test_database_blobs_and_incoming_files_are_0600_under_umask_022(tmp_path):
    from test_squat import cut_upload, settled
    from test_transport import make, stored_body
    old = os.umask(0o022)
    try:
        a, b = await make(tmp_path, "A"), await make(tmp_path, "B")
        try:
            await a.add_contact(b.descriptor.signed)
            await b.add_contact(a.descriptor.signed)
            letter, big = tmp_path / "l.txt", tmp_path / "big.bin"
            letter.write_text("x")
            big.write_bytes(os.urandom(3 << 20))
            res = await a.send_referral(to="B", patient="P", letter=letter, attachments=[big])
            assert b.blobs.path(res.record_id, a.node_id).exists()
            res2 = await a.send_referral(to="B", patient="P", letter=letter, attachments=[big], deliver=False)
            row = await a.store.call(records.get_record, res2.record_id)
            body = stored_body(a, row)
            await cut_upload(a, b, res2.record_id, row["head"], body, len(body) // 2)
            await settled(b, a, res2.record_id)
            for node in (a, b):
                files = [node.folder / DBFILE, node.folder / (DBFILE + "-wal"), node.folder / (DBFILE + "-shm")]
                files += [p for d in ("blobs", "incoming") for p in (node.folder / d).rglob("*") if p.is_file()]
                assert len(files) > 3
                modes = {str(p.relative_to(node.folder)): stat.S_IMODE(p.stat().st_mode) for p in files}
                assert set(modes.values()) == {0o600}, modes
        finally:
            await a.close()
            await b.close()
    finally:
        os.umask(old)


def test_a_running_nodes_writes_survive_other_processes_opening_and_closing_the_database(tmp_path):
    """Regression: the process that holds the database must never lose SQLite's locks (by opening and
    closing the file itself), or another process closing its connection deletes the WAL under it."""
    import subprocess
    import sys

    from node.store.db import Store
    path = tmp_path / "cabinet.db"
    store = Store(path)
    try:
        other = ("import sys; sys.path.insert(0, sys.argv[1]); from node.store.db import Store; "
                 "from pathlib import Path; Store(Path(sys.argv[2])).close()")
        for _ in range(2):                     # a CLI command opens and closes the same folder
            subprocess.run([sys.executable, "-c", other, str(Path(__file__).resolve().parents[1]), str(path)],
                           check=True)
        store.call_sync(lambda db: db.conn.execute("INSERT INTO meta (key, value) VALUES ('probe', 42)"))
        assert (tmp_path / "cabinet.db-wal").exists()
        seen = subprocess.run([sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1])"
                               ".execute(\"SELECT value FROM meta WHERE key='probe'\").fetchone())", str(path)],
                              check=True, capture_output=True, text=True).stdout.strip()
        assert seen == "(42,)"
    finally:
        store.close()


# --- the outbox's change numbers: how a sender session stays in step ----------------------------

_OUT = {"direction": "out", "kind": "referral", "sender": "me", "reply_to": None, "created": 1, "stored": 1,
        "head": b"h", "body_size": 1, "meta": b"m", "patient_ix": b"p"}


def _queue(db, n: int, to: str = "B") -> str:
    rid = f"{n:02x}" * 16
    records.insert_record(db, dict(_OUT, id=rid, thread=rid), recipients=[to], now=n, event="sent")
    return rid


def test_a_reader_gets_exactly_the_deliveries_changed_since_its_last_look_in_any_process(tmp_path):
    mine, other = _db(tmp_path), _db(tmp_path)                  # two connections: this process and another
    _queue(mine, 1)
    _queue(mine, 2)
    rows, mark, full = records.stream_out(mine)
    assert full and [(r["seq"], r["state"]) for r in rows] == [(1, "queued"), (2, "queued")]
    assert records.stream_out(mine, mark) == ([], mark, False)                  # nothing changed: nothing read
    records.retire(other, "B", [1], now=5)                                      # `cabinet send` elsewhere
    _queue(other, 3)
    rows, mark2, full = records.stream_out(mine, mark)
    assert not full and mark2 > mark
    assert sorted((r["seq"], r["state"]) for r in rows) == [(1, "delivered"), (3, "queued")]
    records.update_delivery(mine, "02" * 16, "B", now=6, attempts=1, next_try=99)
    rows, mark3, _ = records.stream_out(other, mark2)
    assert [(r["seq"], r["attempts"], r["next_try"]) for r in rows] == [(2, 1, 99)]
    records.mark_opened_by(mine, "01" * 16, "B", at=7, receipt=b"r", now=7)     # not what a session holds
    assert records.stream_out(mine, mark3) == ([], mark3, False)


def test_a_reader_behind_the_pruning_reloads_every_pending_delivery(tmp_path):
    db = _db(tmp_path)
    for n in range(1, 5):
        _queue(db, n)
    _, mark, _ = records.stream_out(db)
    records.retire(db, "B", [1, 2], now=9)
    _, newest, _ = records.stream_out(db, mark)
    records.prune_outbox_changes(db, newest + records.KEEP_CHANGES)            # everything forgotten
    assert db.conn.execute("SELECT COUNT(*) FROM outbox_changes").fetchone()[0] == 0
    rows, _, full = records.stream_out(db, mark)
    assert full and [r["seq"] for r in rows] == [3, 4]                          # the pending ones, whole
    _queue(db, 5)                                                               # numbering goes on after a prune
    _, after, _ = records.stream_out(db, newest)
    assert after > newest


def test_a_folder_from_before_the_change_numbers_opens_with_its_outbox_whole(tmp_path):
    db = _db(tmp_path)
    _queue(db, 1)
    db.conn.executescript("DROP TRIGGER outbox_changed_on_insert; DROP TRIGGER outbox_changed_on_update; "
                          "DROP TABLE outbox_changes;")                       # as main made it before
    db.conn.close()
    db = _db(tmp_path)
    rows, mark, full = records.stream_out(db)
    assert full and [r["seq"] for r in rows] == [1]
    records.retire(db, "B", [1], now=3)
    assert [r["state"] for r in records.stream_out(db, mark)[0]] == ["delivered"]


def test_no_query_of_the_outbox_reads_every_record(tmp_path):
    """Each lookup of a record by ID uses the key: SQLite, without statistics, otherwise picks the index on
    direction and reads every outgoing record for each delivery (what made catch-up slow)."""
    db = _db(tmp_path)
    for n in range(1, 4):
        _queue(db, n)
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    _, mark, _ = records.stream_out(db)
    records.outgoing(db, "B", [1, 2])
    records.deliveries(db, "01" * 16)
    records.due(db, 10)
    records.retire(db, "B", [1], now=5, receipts={1: b"r"})
    records.refuse(db, "B", 2, reason="no", now=6)
    records.stream_out(db, mark)
    records.receipts_due(db, "B")
    records.receipts_due(db)
    db.conn.set_trace_callback(None)
    checked = 0
    for sql in {s for s in seen if s.lstrip().upper().startswith(("SELECT", "UPDATE"))}:
        plan = [row[3] for row in db.conn.execute("EXPLAIN QUERY PLAN " + sql)]
        checked += 1
        bad = [p for p in plan if "records_listing" in p or "records_inbox" in p
               or (p.startswith(("SCAN records", "SCAN deliveries", "SCAN receipts_out", "SCAN r", "SCAN d"))
                   and "receipts_out_due" not in p)]                 # that index holds only the unsent
        assert not bad, f"{sql[:120]}: {plan}"
    assert checked >= 8
