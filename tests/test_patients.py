"""Patients in control (issue #5): three practices in one process, on 127.0.0.1, through the real transport.

A holds the records of a patient enrolled there; B is the practitioner the
patient grants access to; C is another colleague of A's. Every request goes
through signed HTTP between the nodes; the consent clock is injected, never
slept on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sqlite3
from pathlib import Path

import pytest

from conftest import PASSPHRASE
from node import Node
from node.core import consent
from node.core.card import Card, check_history, grant as grant_with, history_request, open_as_patient, revocation
from node.core.errors import (AlreadyExists, ConsentRefused, InvalidSignature, PeerRefused, RemoteProtocolError,
                              UsageError)
from node.store import audit, records
from node.store import patients as sp
from node.transport import access

DAY = 86_400_000
LETTER = "Cher confrère, bilan cardiologique de Mme Jeanne Martin."



async def make(tmp_path, name: str) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0", pull_interval=3600)
    return node


async def meet(x: Node, y: Node) -> None:
    await x.add_contact(y.descriptor.signed)
    await y.add_contact(x.descriptor.signed)


class World:
    """A with a patient's records, B and C its colleagues; the patient's card for A."""

    def __init__(self, a: Node, b: Node, c: Node, tmp_path) -> None:
        self.a, self.b, self.c, self.tmp = a, b, c, tmp_path
        self.card: Card
        self.records: dict[str, str] = {}          # name -> record ID at A
        self.now = a.patients.clock()
        a.patients.clock = lambda: self.now        # the consent clock at A, moved by the tests

    async def setup(self) -> "World":
        a, c = self.a, self.c
        self.card = await a.patients.enroll("P-0042")
        scan = self.tmp / "echo.bin"
        scan.write_bytes(bytes(range(256)) * 1300)      # 332 KB: kept as a blob file, not inline
        sent = await a.send_referral(to="C", patient="Jeanne Martin", subject="Echo", letter=LETTER,
                                     attachments=[scan])
        lab = self.tmp / "crp.csv"
        lab.write_text("crp;12\n")
        got = await c.send_referral(to="A", patient="Jeanne Martin", subject="Bilan", letter="CRP 12",
                                    attachments=[lab])
        ecg = await a.send_referral(to="C", patient="Jeanne Martin", subject="ECG", letter="ECG normal")
        assert not sent.errors and not got.errors and not ecg.errors
        self.records = {"echo": sent.record_id, "lab": got.record_id, "ecg": ecg.record_id}
        for name, category in (("echo", "cardiology"), ("lab", "lab-results"), ("ecg", "cardiology")):
            await a.patients.link(self.records[name], "P-0042", category)
        return self

    def grant(self, to: Node | None = None, card: Card | None = None, **kw) -> str:
        args = dict(to=(to or self.b).node_id, scope="category:cardiology", days=30, now=self.now)
        args.update(kw)
        return grant_with(card or self.card, **args)

    async def copies(self) -> int:
        return await self.a.store.call(sp.copies)

    async def last_entries(self, n: int = 1) -> list[dict]:
        """A's newest audit entries, their sealed details opened."""
        return await self.a.store.call(sp.entries, self.a.patients.vault, None, n)


@pytest.fixture
async def world(tmp_path):
    a, b, c = await make(tmp_path, "A"), await make(tmp_path, "B"), await make(tmp_path, "C")
    await meet(a, b)
    await meet(a, c)
    w = await World(a, b, c, tmp_path).setup()
    yield w
    for n in (a, b, c):
        await n.close()


async def arrived(node: Node, ids: list[str], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if all([await node.store.call(records.has_record, i) for i in ids]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"records {ids} did not arrive")


async def delivered(node: Node, ids: list[str], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        states = {d["record_id"]: d["state"] for i in ids for d in await node.store.call(records.deliveries, i)}
        if all(states.get(i) == "delivered" for i in ids):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"records {ids} were not marked delivered")


# --- grant, fetch, refusals --------------------------------------------------------------

async def test_b_fetches_exactly_the_records_in_scope_and_can_read_them(world, tmp_path):
    w = world
    ids = await w.b.patients.request("A", token=w.grant())
    assert len(ids) == 2
    await arrived(w.b, ids)
    views = [await w.b.read(i) for i in ids]
    assert sorted(v.summary.subject for v in views) == ["ECG", "Echo"]          # not the lab results
    assert all(v.summary.sender == w.a.node_id and v.manifest.patient == "Jeanne Martin" for v in views)
    echo = next(v for v in views if v.summary.subject == "Echo")
    assert echo.manifest.letter == LETTER
    out = await w.b.export(echo.summary.id, tmp_path / "at-b")
    assert out[0].read_bytes() == (tmp_path / "echo.bin").read_bytes()
    # The copies are sealed to B and to A only: C cannot open them even if it got the bytes.
    row = await w.a.store.call(records.get_record, ids[0])
    from node.core.envelope import Head
    assert set(Head.from_wire(row["head"]).header.recipient_ids) == {w.a.node_id, w.b.node_id}
    # A narrower request inside the grant: one record.
    one = await w.b.patients.request("A", token=w.grant(scope="all"), want=f"record:{w.records['lab']}")
    await arrived(w.b, one)
    assert (await w.b.read(one[0])).manifest.letter == "CRP 12"


async def refused(w: World, match: str, *, by: Node | None = None, token: str | None = None, **kw) -> None:
    """The request is refused with `match` in the reason, logged at A, and nothing is sealed or queued."""
    before = (await w.copies(), len(await w.a.store.call(records.deliveries)))
    with pytest.raises(PeerRefused, match=match) as info:
        await (by or w.b).patients.request("A", token=token, **kw)
    assert info.value.status == 403
    assert (await w.copies(), len(await w.a.store.call(records.deliveries))) == before
    last = (await w.last_entries())[0]
    assert last["event"] in ("access-refused", "break-glass-refused") and last["peer"] == (by or w.b).node_id
    assert json.loads(last["detail"])["why"] in str(info.value)


def _parts(token: str) -> tuple[bytes, bytes, str]:
    body = token.split(".")[2]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return raw[:-64], raw[-64:], token.split(".")[3]


async def test_every_refusal_has_a_clear_reason_is_logged_and_sends_nothing(world):
    w = world
    token = w.grant()
    # Wrong audience: C presents the grant the patient gave B.
    await refused(w, "wrong audience", by=w.c, token=token)
    # Expired, and not yet valid (beyond the one-minute skew), on A's injected clock.
    start = w.now
    w.now = start + 31 * DAY
    await refused(w, "grant expired", token=token)
    w.now = start - 5 * 60_000
    await refused(w, "not yet valid", token=token)
    w.now = start + 30_000
    # Forged: signed by another key, naming the patient's key.
    m, _, footer = _parts(token)
    stranger, _ = consent.new_patient_key()
    forged = consent.sign_v4_public(stranger, m, base64.urlsafe_b64decode(footer + "=" * (-len(footer) % 4)),
                                    consent.IMPLICIT)
    await refused(w, "forged or was altered", token=forged)
    # Altered: the scope widened after signing.
    m, sig, footer = _parts(token)
    wider = m.replace(b'"scope":"category:cardiology"', b'"scope":"all"')
    await refused(w, "forged or was altered", token="v4.public." + consent.b64url(wider + sig) + "." + footer)
    # A v4.local token, padded base64, an unknown key.
    await refused(w, "v4.local tokens are refused", token="v4.local." + consent.b64url(b"\0" * 90))
    await refused(w, "padded base64", token=token + "==")
    outsider = Card.create(w.a.node_id, "P-9999", seed=consent.new_patient_key()[0])
    await refused(w, "unknown patient key", token=w.grant(card=outsider))
    # Another patient's records: a second patient signs for the first one's reference, or names their record.
    other = await w.a.patients.enroll("P-0043")
    spoof = consent.issue_grant(other.seed, subject="P-0042", audience=w.b.node_id, scope="all", days=3,
                                now=w.now)
    await refused(w, "another patient", token=spoof)
    await refused(w, "not one of this patient's records",
                  token=w.grant(card=other, scope=f"record:{w.records['echo']}"))
    # Out of scope: asking for the lab results under a cardiology grant.
    await refused(w, "out of scope", token=token, want="category:lab-results")
    await refused(w, "out of scope", token=token, want=f"record:{w.records['lab']}")
    # A contact held after an identity key change gets nothing, whatever it presents.
    if "held" in await w.a.contact("B"):
        await w.a.store.call(lambda db: db.conn.execute("UPDATE contacts SET held = 1 WHERE name = 'B'"))
        before = (await w.copies(), len(await w.a.store.call(records.deliveries)))
        with pytest.raises(PeerRefused, match="not a confirmed contact") as info:
            await w.b.patients.request("A", token=token)
        assert info.value.status == 401            # refused at the door, before any grant is looked at
        assert (await w.copies(), len(await w.a.store.call(records.deliveries))) == before
        await w.a.store.call(lambda db: db.conn.execute("UPDATE contacts SET held = 0 WHERE name = 'B'"))
    # The same grant still works, and only for B.
    assert len(await w.b.patients.request("A", token=token)) == 2


async def test_revocation_signed_by_the_patient_and_only_for_their_own_grants(world):
    w = world
    token = w.grant()
    jti = consent.check_grant(token, patient_public_keys={w.card.key_id: w.card.public_key},
                              expected_audience=w.b.node_id, now=w.now, revoked=()).jti
    assert len(await w.b.patients.request("A", token=token)) == 2
    # Another enrolled patient who learnt the grant's ID cannot withdraw it.
    other = await w.a.patients.enroll("P-0043")
    await w.a.patients.apply_revocation(revocation(other, jti, now=w.now))
    assert await w.b.patients.request("A", token=token) == []     # still accepted; nothing new to send
    # A revocation signed by the patient, carried to A by B (any node may carry it: it is signed).
    assert await w.b.patients.send_revocation(w.card.practice, revocation(w.card, jti, now=w.now)) == jti
    await refused(w, f"grant {jti} has been revoked", token=token)
    # A revocation by an unknown key is refused and logged, and revokes nothing.
    with pytest.raises(ConsentRefused, match="unknown patient key"):
        outsider = Card.create(w.a.node_id, "P-9", seed=consent.new_patient_key()[0])
        await w.a.patients.apply_revocation(revocation(outsider, "x" * 22, now=w.now))
    assert (await w.last_entries())[0]["event"] == "revocation-refused"


async def test_break_glass_only_when_allowed_always_flagged_and_in_the_history(world):
    w = world
    reason = "Patient unconscious in the emergency room, suspected myocardial infarction"
    await refused(w, "not allowed", emergency=reason, patient="P-0042")
    await w.a.patients.allow_break_glass("B")
    await refused(w, "written reason", emergency="urgent", patient="P-0042")
    await refused(w, "enrolled patient", emergency=reason, patient="Jeanne Martin")
    await refused(w, "not allowed", by=w.c, emergency=reason, patient="P-0042")
    ids = await w.b.patients.request("A", emergency=reason, patient="P-0042")
    assert len(ids) == 3
    await arrived(w.b, ids)
    flagged = await w.a.patients.flagged()
    assert [f["event"] for f in flagged][:2] == ["break-glass", "break-glass-refused"]
    assert json.loads(flagged[0]["detail"])["reason"] == reason and flagged[0]["peer"] == w.b.node_id
    raw, body = await w.b.patients.fetch_history(w.card)
    events = [e["event"] for e in body["entries"]]
    assert "break-glass" in events and events.count("access-sent") == 3
    sent = [json.loads(e["detail"]) for e in body["entries"] if e["event"] == "access-sent"]
    assert all(d.get("emergency") is True and "grant" not in d for d in sent)
    await w.a.patients.allow_break_glass("any", False)
    await w.a.patients.allow_break_glass("B", False)
    await refused(w, "not allowed", emergency=reason, patient="P-0042")


# --- the patient's history ----------------------------------------------------------------

async def test_history_lists_exactly_what_happened_signed_by_the_practice(world):
    w = world
    token = w.grant()
    jti = token_jti(w, token)
    await w.a.read(w.records["lab"])                                   # a read at the practice
    ids = await w.b.patients.request("A", token=token)
    await delivered(w.a, ids)
    await refused(w, "wrong audience", by=w.c, token=token)
    await w.a.patients.apply_revocation(revocation(w.card, jti, now=w.now))
    await refused(w, "revoked", token=token)
    raw, body = await w.b.patients.fetch_history(w.card)             # asked through B, answered by A
    r = w.records
    want = [("patient-enrolled", None, None),
            ("sent", r["echo"], None), ("delivered", r["echo"], w.c.node_id),
            ("received", r["lab"], w.c.node_id),
            ("sent", r["ecg"], None), ("delivered", r["ecg"], w.c.node_id),
            ("patient-linked", r["echo"], None), ("patient-linked", r["lab"], None),
            ("patient-linked", r["ecg"], None),
            ("read", r["lab"], None),
            ("grant-used", None, w.b.node_id),
            ("access-sent", r["echo"], w.b.node_id), ("copy-sent", ids[0], w.b.node_id),
            ("access-sent", r["ecg"], w.b.node_id), ("copy-sent", ids[1], w.b.node_id),
            ("delivered", ids[0], w.b.node_id), ("delivered", ids[1], w.b.node_id),
            ("access-refused", None, w.c.node_id),
            ("grant-revoked", None, None),
            ("access-refused", None, w.b.node_id),
            ("history-given", None, w.b.node_id)]
    got = [(e["event"], e["record"], e["peer"]) for e in body["entries"]]
    # The two deliveries may be logged in either order; everything else is in the order it happened.
    assert sorted(got[15:17]) == sorted(want[15:17]) and got[:15] + got[17:] == want[:15] + want[17:]
    details = {e["event"]: json.loads(e["detail"] or "null") for e in body["entries"]}
    assert details["grant-used"] == {"patient": "P-0042", "grant": jti, "scope": "category:cardiology",
                                     "records": 2}
    assert details["grant-revoked"] == {"patient": "P-0042", "grant": jti}
    assert "wrong audience" in [json.loads(e["detail"])["why"] for e in body["entries"]
                                if e["event"] == "access-refused"][0]
    # Nothing about anyone else, and no names: only references and IDs.
    assert "Jeanne" not in repr(body)
    # Signed by A: the patient's card checks it; a changed byte or another patient's card does not.
    assert check_history(raw, w.card)["seq"] == body["seq"]
    with pytest.raises(InvalidSignature):
        check_history(raw.replace(b"access-refused", b"access-REFUSED"), w.card)
    other = await w.a.patients.enroll("P-0043")
    with pytest.raises(ConsentRefused, match="another patient"):
        check_history(raw, other)
    assert (await w.a.patients.verify_against_head(raw))[0]


def token_jti(w: World, token: str) -> str:
    return consent.check_grant(token, patient_public_keys={w.card.key_id: w.card.public_key},
                               expected_audience=w.b.node_id, now=w.now, revoked=()).jti


async def test_history_requests_are_signed_by_the_patient_and_bound_to_the_carrier(world):
    w = world
    req = history_request(w.card, by=w.b.node_id, now=w.now)
    with pytest.raises(PeerRefused, match="made for node"):        # replayed by C
        await access.fetch_history(w.c.client, w.c.peer(await w.c.contact("A")), req)
    w.now += 10 * 60_000
    with pytest.raises(ConsentRefused, match="stale"):
        await w.a.patients.history_for(req, caller=w.b.node_id)
    stranger = Card.create(w.a.node_id, "P-0042", seed=consent.new_patient_key()[0])
    with pytest.raises(ConsentRefused, match="unknown patient key"):
        await w.a.patients.history_for(history_request(stranger, by=w.b.node_id, now=w.now), caller=w.b.node_id)
    # A grant is not a history request (another implicit assertion).
    with pytest.raises(ConsentRefused, match="signature does not verify"):
        await w.a.patients.history_for(w.grant(), caller=w.b.node_id)
    events = [e["event"] for e in await w.last_entries(3)]
    assert events == ["history-refused"] * 3


# --- the audit chain against signed heads ------------------------------------------------------

def _attacker(node: Node) -> sqlite3.Connection:
    """Someone with the database file, the triggers dropped."""
    conn = sqlite3.connect(node.folder / "cabinet.db", isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    return conn


def _rechain(conn: sqlite3.Connection) -> None:
    prev = audit.GENESIS
    for seq, at, event, record, peer, detail in conn.execute(
            "SELECT seq, at, event, record, peer, detail FROM audit ORDER BY seq").fetchall():
        digest = audit._entry_hash(prev, seq, at, event, record, peer, detail)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "rewrite", "truncate"])
async def test_audit_tampering_is_detected_against_a_signed_head(world, tamper):
    w = world
    ids = await w.b.patients.request("A", token=w.grant())
    await delivered(w.a, ids)
    _, history = await w.b.patients.fetch_history(w.card)
    raw_history, _ = await w.a.patients.fetch_history(w.card)
    head = await w.a.patients.signed_head()
    await w.a.read(w.records["echo"])                              # the log goes on after the head
    assert await w.a.patients.verify_against_head(head) == (True, f"intact, and entry "
                                                                  f"{sp.open_signed(head)['seq']} is still the one signed")
    seq = sp.open_signed(head)["seq"]
    access_sent = next(e["seq"] for e in history["entries"] if e["event"] == "access-sent")
    conn = _attacker(w.a)
    if tamper == "edit":
        conn.execute("UPDATE audit SET peer = NULL WHERE seq = ?", (access_sent,))
    elif tamper == "delete":
        conn.execute("DELETE FROM audit WHERE seq = ?", (access_sent,))
    elif tamper == "reorder":
        conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (access_sent,))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (access_sent, access_sent + 1))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (access_sent + 1,))
    elif tamper == "rewrite":          # an entry hidden, the whole chain recomputed: verifies on its own
        conn.execute("UPDATE audit SET event = 'read', peer = NULL, detail = NULL WHERE seq = ?", (access_sent,))
        _rechain(conn)
    else:                              # the tail cut off: what is left verifies on its own
        conn.execute("DELETE FROM audit WHERE seq >= ?", (seq - 2,))
    conn.close()
    alone_ok, _ = await w.a.audit_verify()
    assert alone_ok == (tamper in ("rewrite", "truncate"))          # a chain alone cannot see these two
    for signed in (head, raw_history):
        ok, why = await w.a.patients.verify_against_head(signed)
        assert not ok, why
        assert {"edit": "broken", "delete": "broken", "reorder": "broken", "rewrite": "rewritten",
                "truncate": "truncated"}[tamper] in why or (tamper == "rewrite" and "history" in why)


async def test_a_head_signed_by_someone_else_is_refused(world):
    head = await world.b.patients.signed_head()
    with pytest.raises(InvalidSignature, match="not by the practice"):
        await world.a.patients.verify_against_head(head)
    raw = bytearray(await world.a.patients.signed_head())
    raw[-3] ^= 1                                                  # inside the signature
    with pytest.raises(InvalidSignature, match="does not verify"):
        await world.a.patients.verify_against_head(bytes(raw))


# --- cards, enrolment ------------------------------------------------------------------------

def test_card_round_trips_as_text_and_qr_content_and_refuses_typos(tmp_path):
    card = Card.create("VOCK-F75R-NTQS-J3SQ-HWCY-R7HP-2VQF-3QGF-S", "P-0042", seed=b"\7" * 32)
    assert Card.parse(card.to_text()) == card
    assert Card.parse(card.qr_payload()) == card
    assert Card.load(card.qr_payload()) == card
    paths = card.write(tmp_path)
    assert Card.load(paths[0]) == card and oct(paths[0].stat().st_mode & 0o777) == "0o600"
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="already exists"):
        card.write(tmp_path)
    typo = card.to_text().replace(card.phrase, card.phrase.replace(card.phrase[5], "A" if card.phrase[5] != "A"
                                                                   else "B", 1))
    with pytest.raises(UsageError):
        Card.parse(typo)
    public_only = Card.create(card.practice, "P-0042", public_key=card.public_key)
    assert Card.parse(public_only.to_text()) == public_only and "recovery" not in public_only.to_text()
    with pytest.raises(UsageError, match="public key"):
        grant_with(public_only, to=card.practice, scope="all", days=1, now=0)
    with pytest.raises(UsageError, match="never a name"):
        Card.create(card.practice, "Jeanne Martin", seed=b"\7" * 32)


async def test_enrolment_keeps_only_the_public_key_and_a_brought_key_works(world):
    w = world
    row = await w.a.store.call(sp.patient, w.a.patients.vault, "P-0042")
    assert set(row) == {"patient_ref", "public_key", "key_id", "enrolled", "updated"}
    assert row["public_key"] == w.card.public_key and row["key_id"] == w.card.key_id
    with pytest.raises(AlreadyExists):
        await w.a.patients.enroll("P-0042")
    with pytest.raises(AlreadyExists, match="another patient"):
        await w.a.patients.enroll("P-0044", public_key=consent.k4_public(w.card.public_key))
    # A patient who already has a key (from another practice) brings its public half.
    seed, public = consent.new_patient_key()
    brought = await w.a.patients.enroll("P-0050", public_key=consent.k4_public(public))
    assert brought.seed is None
    with pytest.raises(AlreadyExists, match="another patient"):
        await w.a.patients.link(w.records["lab"], "P-0050", "lab-results")
    # Re-keying after a lost card: the old card's grants stop working.
    old = w.grant()
    await w.a.patients.enroll("P-0042", replace=True)
    await refused(w, "unknown patient key", token=old)


# --- the commands -----------------------------------------------------------------------------

def _parser():
    from node.faces import cli_patient
    from node.config import default_data_dir
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=lambda s: __import__("pathlib").Path(s), default=default_data_dir())
    common.add_argument("-v", "--verbose", action="store_true")
    p = argparse.ArgumentParser(prog="cabinet")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, parent=sub):
        sp_ = parent.add_parser(name, parents=[common], help=help_)
        sp_.set_defaults(fn=fn)
        return sp_
    audit_ = sub.add_parser("audit").add_subparsers(dest="audit_command", required=True)
    cli_patient.register(sub, add, audit_)
    return p


async def test_commands_enroll_link_grant_head_and_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CABINET_PASSPHRASE", PASSPHRASE)
    data = tmp_path / "A"
    await Node.init(data, PASSPHRASE, name="A", listen="127.0.0.1:0", lan=False)
    p = _parser()

    async def run(*argv: str) -> str:
        args = p.parse_args([*argv, "--data", str(data)])
        assert await args.fn(args) == 0
        return capsys.readouterr().out

    out = await run("patient", "enroll", "--patient", "P-7", "--out", str(tmp_path / "cards"))
    assert "Recovery" in out and (tmp_path / "cards" / "card-P-7.txt").exists()
    card = tmp_path / "cards" / "card-P-7.txt"
    token = (await run("patient", "grant", "--card", str(card), "--to", node_id_of(data), "--scope", "all",
                       "--days", "2")).strip()
    assert token.startswith("v4.public.")
    head = (await run("audit", "head", "--save", str(tmp_path / "head.txt"))).splitlines()[-1]
    assert head.startswith("cabinet-audit-head:")
    assert "intact" in await run("audit", "check-head", str(tmp_path / "head.txt"))
    out = await run("patient", "history", "--card", str(card))
    assert "patient-enrolled" in out and "history-given" in out
    assert "nobody" in await run("patient", "break-glass")
    rev = (await run("patient", "revoke", "--card", str(card), "A" * 22, "--print-only")).strip()
    loaded = Card.load(card)
    assert consent.check_revocation(rev, {loaded.key_id: loaded.public_key}, now=consent.parse_rfc3339(
        "2030-01-01T00:00:00Z")) == "A" * 22


async def test_request_command_fetches_the_records(world, capsys, monkeypatch):
    monkeypatch.setenv("CABINET_PASSPHRASE", PASSPHRASE)
    w = world
    args = _parser().parse_args(["request", "--from", "A", "--token", w.grant(), "--data", str(w.b.folder)])
    assert await args.fn(args) == 0
    ids = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("Record ")]
    assert len(ids) == 2
    await arrived(w.b, ids)
    args = _parser().parse_args(["request", "--from", "A", "--token", w.grant(to=w.c), "--data", str(w.b.folder)])
    with pytest.raises(PeerRefused, match="wrong audience"):
        await args.fn(args)


def node_id_of(data) -> str:
    from node.store import keyfile
    return keyfile.open_(data, PASSPHRASE).identity.node_id


# --- a folder from before the sealing migrates by itself ----------------------------------------

async def test_a_version_1_folder_is_sealed_on_open_and_its_chain_still_verifies(tmp_path):
    a, c = await make(tmp_path, "A"), await make(tmp_path, "C")
    await meet(a, c)
    sent = await a.send_referral(to="C", patient="Jeanne Martin", subject="Echo", letter="x")
    folder = a.folder
    await a.close()
    await c.close()
    # The database as the code before the sealing left it: its schema, clear rows, clear audit details.
    old_schema = (Path(__file__).parent / "fixtures" / "patients-schema-v1.sql").read_text()
    conn = sqlite3.connect(folder / "cabinet.db", isolation_level=None)
    for t in ("patient_keys", "patient_records", "patient_revocations", "patient_grants", "patient_grant_uses",
              "patient_audit"):
        conn.execute(f"DROP TABLE {t}")
    conn.execute("DELETE FROM meta WHERE key = 'patients_schema'")
    conn.executescript(old_schema)
    seed, public = consent.new_patient_key()
    kid = consent.k4_pid(public)
    conn.execute("INSERT INTO patients VALUES ('P-OLD42', ?, ?, 1, 1)", (public, kid))
    conn.execute("INSERT INTO record_patients VALUES (?, 'P-OLD42', 'psychiatry', 1, NULL, NULL)", (sent.record_id,))
    conn.execute("INSERT INTO revocations VALUES (?, 'OLDJTI-0123456789ab', 2, 'v4.public.x')", (kid,))
    db = __import__("sqlite_utils").Database(conn)
    for event, fields in (("patient-enrolled", {"key": kid}), ("patient-linked", {"category": "psychiatry"}),
                          ("break-glass", {"reason": "OLD REASON unconscious"})):
        audit.append(db, at=3, event=event, record=sent.record_id if event == "patient-linked" else None,
                     detail=sp.detail("P-OLD42", **fields))
    conn.close()
    a = await Node.open_node(folder, passphrase=PASSPHRASE)
    try:
        card = Card.create(a.node_id, "P-OLD42", seed=seed)
        _, body = await a.patients.fetch_history(card)
        events = {e["event"]: json.loads(e["detail"] or "null") for e in body["entries"]}
        assert events["break-glass"]["reason"] == "OLD REASON unconscious"
        assert events["patient-linked"] == {"patient": "P-OLD42", "category": "psychiatry"}
        assert "sent" in events                                       # the record's own entries too
        assert (await a.audit_verify())[0]
        assert [e["event"] for e in await a.store.call(audit.entries, None, 3)][1] == "patients-sealed"
        assert await a.store.call(sp.revoked, a.patients.vault, kid) == {"OLDJTI-0123456789ab"}
        assert (await a.store.call(sp.records_of, a.patients.vault, "P-OLD42"))[0]["category"] == "psychiatry"
    finally:
        await a.close()
    raw = b"".join(p.read_bytes() for p in folder.iterdir() if p.name.startswith("cabinet.db"))
    for needle in (b"P-OLD42", b"psychiatry", b"OLD REASON", b"OLDJTI"):
        assert needle not in raw, needle


async def test_the_history_is_sealed_to_the_patients_card_on_its_way(world):
    """Only the card opens the history: the node carrying it, and anyone on the way, cannot read it."""
    w = world
    req = history_request(w.card, by=w.b.node_id, now=w.now)
    sealed = await w.a.patients.history_for(req, caller=w.b.node_id)
    assert b"patient-enrolled" not in sealed and b"P-0042" not in sealed
    with pytest.raises((InvalidSignature, RemoteProtocolError)):
        check_history(sealed, w.card)                       # not readable as it travels
    assert check_history(open_as_patient(w.card, sealed), w.card)["entries"]
    other = await w.a.patients.enroll("P-0043")
    with pytest.raises(ConsentRefused, match="not sealed to this patient"):
        open_as_patient(other, sealed)
