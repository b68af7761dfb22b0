"""A record is its sender's ID and its own: three in-process nodes, where C (a contact of B) tries
to keep A's records out of B by using their IDs first, and to wipe A's interrupted upload."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from node.core.envelope import Manifest, Recipient, Sealer, seal_bytes
from node.core.errors import UsageError
from node.core.identity import node_id_bytes, parse_node_id
from node.store import records
from node.transport import auth
from node.transport.client import Peer
from test_transport import make, raw_session, stored_body, url


@pytest.fixture
async def trio(tmp_path):
    a, b, c = [await make(tmp_path, n) for n in "ABC"]
    for x, y in ((a, b), (b, a), (b, c), (c, b)):
        await x.add_contact(y.descriptor.signed)
    yield a, b, c
    for n in (a, b, c):
        await n.close()


def forged_by(c, b, rid: str, letter: str, attachment: bytes = b"") -> tuple[bytes, bytes]:
    """C's own record for B, under the ID `rid` (signed by C: the only thing C can make)."""
    sealer = Sealer(sender=c.identity, recipients=[Recipient(node_id_bytes(b.identity.sign_public),
                                                             b.identity.enc_public)],
                    kind="referral", created=1, record_id=bytes.fromhex(rid))
    return seal_bytes(sealer, Manifest(patient="X Y", letter=letter))


async def push(sender, to, rid: str, head: bytes, body: bytes, sent_from: list[int] | None = None) -> dict:
    async def read(off):
        if sent_from is not None:
            sent_from.append(off)
        yield body[off:]
    peer = Peer(to.node_id, to.identity.sign_public, to.descriptor.addresses)
    return await sender.client.push_record(peer, rid, head, len(body), read)


async def test_a_squatted_id_keeps_nothing_out_and_is_reported_with_both_senders(trio, tmp_path):
    a, b, c = trio
    letter = tmp_path / "l.txt"
    letter.write_text("genuine")
    rid = (await a.send_referral(to="B", patient="P Q", letter=letter, deliver=False)).record_id
    head, body = forged_by(c, b, rid, "squatted")
    assert (await push(c, b, rid, head, body))["status"] == "stored"          # C got there first

    assert b.node_id not in await a.courier.deliver_record(rid)
    assert {d["recipient"]: d["state"] for d in await a.outbox(rid)}[b.node_id] == "delivered"
    held = {(r["id"], r["sender"]) for r in await b.store.call(records.list_records, "in")}
    assert held == {(rid, a.node_id), (rid, c.node_id)}
    genuine = await b.store.call(records.get_record, rid, a.node_id)
    own = await a.store.call(records.get_record, rid)
    assert genuine["sender"] == a.node_id and genuine["head"] == own["head"]
    # By ID alone the record is ambiguous, and the answer names both senders.
    with pytest.raises(UsageError) as err:
        await b.store.call(records.get_record, rid[:8])
    assert "from A" in str(err.value) and "from C" in str(err.value)
    # C pushing its record again is a duplicate of C's own, never A's.
    assert (await push(c, b, rid, head, body))["status"] == "duplicate"


async def cut_upload(a, b, rid: str, head: bytes, body: bytes, upto: int) -> None:
    """A sends `upto` bytes of the body, then its connection drops."""
    async def cut():
        yield len(head).to_bytes(4, "big") + head
        yield body[:upto]
        raise ConnectionResetError("cable pulled")
    target = f"/v1/records/{rid}?offset=0"
    headers = auth.sign_request(a.identity, method="PUT", target=target, callee=parse_node_id(b.node_id),
                                body_digest=auth.digest(head), now_ms=auth.now_ms(), nonce=os.urandom(16))
    async with raw_session() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.put(url(b, target), data=cut(), headers=headers) as resp:
                await resp.read()


async def settled(b, a, rid: str) -> int:
    path = b.blobs.incoming_path(rid, a.node_id)
    for _ in range(200):                    # wait on the condition, with a deadline
        if path.exists() and not b.intake._busy:
            return path.stat().st_size
        await asyncio.sleep(0.05)
    raise AssertionError("the partial body never settled")


async def test_another_senders_head_never_touches_a_partial_upload(trio, tmp_path):
    a, b, c = trio
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    letter = tmp_path / "l.txt"
    letter.write_text("x")
    rid = (await a.send_referral(to="B", patient="P", letter=letter, attachments=[big], deliver=False)).record_id
    row = await a.store.call(records.get_record, rid)
    head, body = row["head"], stored_body(a, row)
    await cut_upload(a, b, rid, head, body, len(body) // 2)
    have = await settled(b, a, rid)
    partial = b.blobs.incoming_path(rid, a.node_id)
    before = hashlib.sha256(partial.read_bytes()).digest()
    assert 0 < have <= len(body) // 2

    # C sends a head (and a whole record) under the ID of A's partial upload.
    c_head, c_body = forged_by(c, b, rid, "wipe")
    assert (await push(c, b, rid, c_head, c_body))["status"] == "stored"
    assert partial.stat().st_size == have and hashlib.sha256(partial.read_bytes()).digest() == before

    sent_from: list[int] = []
    assert (await push(a, b, rid, head, body, sent_from))["status"] == "stored"
    assert sent_from == [have]                                   # A resumed where it stopped
    genuine = await b.store.call(records.get_record, rid, a.node_id)
    assert genuine["sender"] == a.node_id and genuine["body_size"] == len(body)
    assert not partial.exists()
    assert b.blobs.path(rid, a.node_id).read_bytes() == body
