"""A grant is not an amplifier (issue 9, item 9), and a copy keeps its author (item 15).

Three practices in one process on 127.0.0.1 (the World of test_patients.py): A
holds the patient's records, B holds a grant, C wrote one of the records.
Re-presenting a grant sends only what B does not have yet; a grant is used at
most 20 times an hour; a request captured on the wire and replayed, to the
running node or to the node restarted, is refused and changes nothing; a copy
shows who wrote the original, when, under which ID, and how it came.
"""

from __future__ import annotations

import argparse
import json

import aiohttp
import pytest

from conftest import PASSPHRASE
from node import Node
from node.core import wire
from node.core.audit_docs import unwrap_copy_data, wrap_copy_data
from node.core.errors import AuthenticationFailed, PeerRefused
from node.core.identity import parse_node_id
from node.store import audit
from node.transport import access, auth
from test_patients import World, arrived, make, meet, world  # noqa: F401  (world is a fixture)

HOUR = 3_600_000


async def test_a_grant_presented_20_times_yields_each_copy_once_then_none(world):
    w = world
    token = w.grant()
    first = await w.b.patients.request("A", token=token, pull=False)
    assert len(first) == 2
    for _ in range(19):                                   # uses 2 to 20: nothing new, nothing sealed
        assert await w.b.patients.request("A", token=token, pull=False) == []
    assert await w.copies() == 2
    # The 21st use within the hour is refused, with a clear reason, and logged.
    with pytest.raises(PeerRefused, match="too many uses of this grant; try again later") as info:
        await w.b.patients.request("A", token=token, pull=False)
    assert info.value.status == 403
    last = (await w.last_entries())[0]
    assert last["event"] == "access-refused" and json.loads(last["detail"])["why"].startswith("too many uses")
    # Another grant for the same patient sends only the record B does not have yet (the lab results).
    wider = w.grant(scope="all")
    more = await w.b.patients.request("A", token=wider, pull=False)
    assert len(more) == 1 and await w.copies() == 3
    await arrived(w.b, first + more)
    assert (await w.b.read(more[0])).manifest.letter == "CRP 12"
    # An hour later the first grant may be used again: still nothing to send twice.
    w.now += HOUR + 1
    assert await w.b.patients.request("A", token=token, pull=False) == []
    # Emergency access does not re-send what B already holds either.
    await w.a.patients.allow_break_glass("B")
    reason = "Patient unconscious in the emergency room, history needed"
    assert await w.b.patients.request("A", emergency=reason, patient="P-0042", pull=False) == []
    assert await w.copies() == 3


def test_replay_memory_is_per_caller_and_by_time_never_evicted_by_volume():
    start = 1_000_000_000
    guard = auth.ReplayGuard(per_caller=50, started=start)
    x, y = b"x" * 32, b"y" * 32
    for i in range(50):
        guard.check(x, i.to_bytes(16, "big"), start + i, start + i)
    with pytest.raises(AuthenticationFailed, match="too many requests"):   # x is full: x waits ...
        guard.check(x, b"\xff" * 16, start + 60, start + 60)
    guard.check(y, b"\0" * 16, start + 60, start + 60)                      # ... y is not affected
    with pytest.raises(AuthenticationFailed, match="replayed"):            # x's nonces were not pushed out
        guard.check(x, (0).to_bytes(16, "big"), start + 61, start + 61)
    later = start + 2 * auth.MAX_SKEW_MS + 100                             # aged out: memory shrinks by time
    guard.check(x, b"\xee" * 16, later, later)
    assert guard.remembered(x) == 1 and guard.remembered() == 1
    with pytest.raises(AuthenticationFailed, match="before this node started"):
        guard.check(y, b"\1" * 16, later, start - 1)


async def test_a_captured_request_replayed_to_a_restarted_node_is_refused_and_changes_nothing(tmp_path):
    a, b, c = await make(tmp_path, "A"), await make(tmp_path, "B"), await make(tmp_path, "C")
    await meet(a, b)
    await meet(a, c)
    w = await World(a, b, c, tmp_path).setup()
    try:
        await _replayed(w)
    finally:
        for n in (w.a, w.b, w.c):           # w.a is the restarted node
            await n.close()


async def _replayed(w: World) -> None:
    body = wire.pack({"token": w.grant()})
    headers = auth.sign_request(w.b.identity, method="POST", target=access.ACCESS,
                                callee=parse_node_id(w.a.node_id), body_digest=auth.digest(body),
                                now_ms=auth.now_ms(), nonce=b"\x42" * 16)

    async def post(node: Node) -> tuple[int, bytes]:
        address = w.b.peer(await w.b.contact("A")).addresses[0]
        async with aiohttp.ClientSession() as http:
            async with http.post(address.rstrip("/") + access.ACCESS, data=body, headers=headers, ssl=False) as r:
                return r.status, await r.read()

    status, _ = await post(w.a)                       # the genuine request: two copies
    assert status == 200 and await w.copies() == 2
    assert (await post(w.a))[0] == 401                # replayed to the running node
    # A restarts (same folder); the captured bytes are sent again.
    folder = w.a.folder
    await w.a.close()
    w.a = await Node.open_node(folder, passphrase=PASSPHRASE)
    await w.a.serve("127.0.0.1:0", pull_interval=3600)
    w.a.patients.clock = lambda: w.now
    await w.b.add_contact(w.a.descriptor.signed)      # its new address
    before = (await w.copies(), await w.a.store.call(audit.head))
    status, raw = await post(w.a)
    assert status == 401
    assert (await w.copies(), await w.a.store.call(audit.head)) == before
    # The same grant, in a fresh request, still works (and has nothing new to send).
    assert await w.b.patients.request("A", token=w.grant(), pull=False) == []


# --- provenance of a copy (item 15) --------------------------------------------------------------

async def test_a_copy_shows_its_original_author_date_and_id_and_how_it_came(world, capsys, monkeypatch):
    w = world
    token = w.grant(scope="all")
    ids = await w.b.patients.request("A", token=token, pull=False)
    await arrived(w.b, ids)
    by_subject = {}
    for rid in ids:
        view = await w.b.read(rid)
        by_subject[view.manifest.subject] = view
    lab, echo = by_subject["Bilan"], by_subject["Echo"]
    originals = {r: await w.a.store.call(lambda db, r=r: db.conn.execute(
        "SELECT id, created, sender FROM records WHERE id = ?", (r,)).fetchone()) for r in w.records.values()}
    # The lab results were written by C and obtained from A: B does not know C, so the signature is
    # checked against the key in the head, and the view says so.
    p = lab.provenance
    assert p is not None and p.author == w.c.node_id and p.via == w.a.node_id
    assert (p.record_id, p.written) == (originals[w.records["lab"]][0], originals[w.records["lab"]][1])
    assert p.record_id != lab.summary.id and p.checked == "head" and not p.emergency and p.grant
    text = p.describe()
    assert text.startswith(f"Written by {w.c.node_id} on ") and f"(record {w.records['lab']})" in text
    assert f"obtained from A with the patient's grant {p.grant}" in text and "not one of your contacts" in text
    assert lab.manifest.data == "" and lab.manifest.letter == "CRP 12"       # the original's data, unwrapped
    # The echo was written by A itself, a contact of B: checked against the contact's key.
    assert echo.provenance is not None and echo.provenance.checked == "contact"
    assert echo.provenance.describe().startswith("Written by A on ")
    # Once B knows C, the same copy is checked against C's key.
    await w.b.add_contact(w.c.descriptor.signed)
    again = await w.b.read(lab.summary.id)
    assert again.provenance.checked == "contact" and again.provenance.author_name == "C"
    # `cabinet show` prints the same line.
    from node.faces import cli
    monkeypatch.setenv("CABINET_PASSPHRASE", PASSPHRASE)
    assert await cli.cmd_show(argparse.Namespace(data=w.b.folder, id=lab.summary.id)) == 0
    out = capsys.readouterr().out
    assert "Origin   Written by C on " in out and f"(record {w.records['lab']})" in out
    assert f"obtained from A with the patient's grant {p.grant}" in out


async def test_an_emergency_copy_says_so_and_a_forged_head_is_not_believed(world):
    w = world
    await w.a.patients.allow_break_glass("B")
    ids = await w.b.patients.request("A", emergency="Unconscious patient, cardiac history needed",
                                     patient="P-0042", want=f"record:{w.records['lab']}", pull=False)
    await arrived(w.b, ids)
    p = (await w.b.read(ids[0])).provenance
    assert p is not None and p.emergency and p.grant is None and "emergency access" in p.describe()
    # A head with one byte changed does not verify: the view names no author, date or ID.
    row = await w.a.store.call(lambda db: db.conn.execute("SELECT head FROM records WHERE id = ?",
                                                          (w.records["lab"],)).fetchone()[0])
    data = wrap_copy_data("{}", original_head=row, grant="g" * 22, emergency=False)
    origin, inner = unwrap_copy_data(data)
    assert origin is not None and origin.head is not None and inner == "{}"
    bad = bytearray(row)
    bad[-5] ^= 1
    origin, _ = unwrap_copy_data(wrap_copy_data("", original_head=bytes(bad), grant=None, emergency=False))
    assert origin is not None and origin.head is None
    # Structured data that merely looks like ours is left alone.
    assert unwrap_copy_data('{"cabinet-copy": 1}') == (None, '{"cabinet-copy": 1}')
