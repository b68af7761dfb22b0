"""Every door authenticates: real nodes serving aiohttp on 127.0.0.1, attacked with raw requests."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from conftest import PASSPHRASE
from node import Node
from node.core import wire
from node.core.errors import AuthenticationFailed, InvalidEnvelope, PeerRefused
from node.core.identity import Identity, parse_node_id
from node.store import audit, records
from node.transport import auth
from node.transport.client import Peer


async def make(tmp_path, name: str, serve: bool = True) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0")
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    if serve:
        await node.serve("127.0.0.1:0")
    return node


@pytest.fixture
async def nodes(tmp_path):
    a, b = await make(tmp_path, "A"), await make(tmp_path, "B")
    await a.add_contact(b.descriptor.signed)
    await b.add_contact(a.descriptor.signed)
    yield a, b
    await a.close()
    await b.close()


def raw_session() -> aiohttp.ClientSession:
    """A caller speaking raw HTTP inside the node's TLS, without the certificate check
    (that check is tests/test_tls.py's): these tests attack what lies behind it."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False))


def url(node: Node, target: str) -> str:
    return node.descriptor.addresses[0] + target


async def signed(session, caller: Identity, callee: Node, method: str, target: str, body: bytes = b"",
                 digest_of: bytes | None = None, now: int | None = None, nonce: bytes | None = None,
                 callee_id: bytes | None = None):
    headers = auth.sign_request(caller, method=method, target=target,
                                callee=callee_id or parse_node_id(callee.node_id),
                                body_digest=auth.digest(body if digest_of is None else digest_of),
                                now_ms=now or auth.now_ms(), nonce=nonce or os.urandom(16))
    async with session.request(method, url(callee, target), data=body, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def sealed_record(a: Node, tmp_path, to: Node) -> tuple[str, bytes, bytes]:
    """Seal a record at A for B without delivering it; return (id, head, body)."""
    letter = tmp_path / "l.txt"
    letter.write_text("hello")
    res = await a.send_referral(to=to.config.name, patient="P Q", letter=letter, deliver=False)
    row = await a.store.call(records.get_record, res.record_id)
    return res.record_id, row["head"], stored_body(a, row)


def stored_body(node: Node, row: dict) -> bytes:
    return row["body"] if row["body"] is not None else node.blobs.path(row["id"]).read_bytes()


async def test_descriptor_is_public_and_everything_else_needs_authentication(nodes):
    a, b = nodes
    async with raw_session() as s:
        async with s.get(url(b, "/v1/descriptor")) as resp:
            assert resp.status == 200
            assert await resp.read() == b.descriptor.signed
        for method, target in (("PUT", f"/v1/records/{'ab' * 16}?offset=0"),
                               ("GET", f"/v1/records/{'ab' * 16}/status")):
            async with s.request(method, url(b, target), data=b"\0\0\0\0") as resp:
                assert resp.status == 401
                assert "authentication" in wire.unpack(await resp.read())["error"]


async def test_unknown_caller_replay_stale_and_forged_requests_are_refused(nodes):
    a, b = nodes
    stranger = Identity.generate()
    target = f"/v1/records/{'cd' * 16}/status"
    async with raw_session() as s:
        status, body, _ = await signed(s, stranger, b, "GET", target)
        assert status == 401 and wire.unpack(body)["error"] == auth.NOT_AUTHENTICATED

        nonce = os.urandom(16)
        status, body, headers = await signed(s, a.identity, b, "GET", target, nonce=nonce)
        assert status == 200 and wire.unpack(body) == {"stored": False, "have": 0}
        auth.verify_response(b.identity.sign_public, nonce=nonce, status=200, body=body, headers=headers)
        status, body, _ = await signed(s, a.identity, b, "GET", target, nonce=nonce)
        assert status == 401 and "replayed" in wire.unpack(body)["error"]

        status, body, _ = await signed(s, a.identity, b, "GET", target, now=auth.now_ms() - 10 * 60 * 1000)
        assert status == 401 and "minutes off" in wire.unpack(body)["error"]

        # Signed for another callee (a request captured from A to C, replayed at B).
        status, body, _ = await signed(s, a.identity, b, "GET", target, callee_id=os.urandom(20))
        assert status == 401 and wire.unpack(body)["error"] == auth.NOT_AUTHENTICATED

        # A path other than the one signed.
        headers = auth.sign_request(a.identity, method="GET", target=target, callee=parse_node_id(b.node_id),
                                    body_digest=auth.digest(b""), now_ms=auth.now_ms(), nonce=os.urandom(16))
        async with s.get(url(b, f"/v1/records/{'ef' * 16}/status"), headers=headers) as resp:
            assert resp.status == 401


async def test_tampered_envelope_is_refused_logged_and_nothing_stored(nodes, tmp_path):
    a, b = nodes
    rid, head, body = await sealed_record(a, tmp_path, b)
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 1
    target = f"/v1/records/{rid}?offset=0"
    async with raw_session() as s:
        payload = len(head).to_bytes(4, "big") + head + bytes(flipped)
        status, raw, _ = await signed(s, a.identity, b, "PUT", target, body=payload, digest_of=head)
        assert status == 422 and wire.unpack(raw)["error"] == "invalid envelope"
    assert not await b.store.call(records.has_record, rid)
    assert not b.blobs.incoming_path(rid, a.node_id).exists()
    events = await b.store.call(audit.entries)
    assert events[0]["event"] == "refused" and events[0]["record"] == rid
    # The server keeps serving, and the genuine record still goes through.
    errors = await a.courier.deliver_record(rid)
    assert errors == {}
    assert await b.store.call(records.has_record, rid)


async def test_malformed_and_oversized_heads_get_clear_statuses(nodes):
    a, b = nodes
    rid = "12" * 16
    async with raw_session() as s:
        big = (1 << 20).to_bytes(4, "big")
        status, raw, _ = await signed(s, a.identity, b, "PUT", f"/v1/records/{rid}?offset=0",
                                      body=big + b"x" * 100, digest_of=b"")
        assert status == 413
        junk = b"\xc1not msgpack"
        status, raw, _ = await signed(s, a.identity, b, "PUT", f"/v1/records/{rid}?offset=0",
                                      body=len(junk).to_bytes(4, "big") + junk, digest_of=junk)
        assert status == 400 and "malformed" in wire.unpack(raw)["error"]
        status, raw, _ = await signed(s, a.identity, b, "PUT", f"/v1/records/{rid}?offset=-1", body=b"",
                                      digest_of=b"")
        assert status == 400
        async with s.get(url(b, "/v1/descriptor")) as resp:
            assert resp.status == 200


async def test_only_the_sender_may_upload_its_record(tmp_path, nodes):
    a, b = nodes
    c = await make(tmp_path, "C")
    try:
        await b.add_contact(c.descriptor.signed)
        await c.add_contact(b.descriptor.signed)
        rid, head, body = await sealed_record(a, tmp_path, b)
        async with raw_session() as s:
            payload = len(head).to_bytes(4, "big") + head + body
            status, raw, _ = await signed(s, c.identity, b, "PUT", f"/v1/records/{rid}?offset=0", body=payload,
                                          digest_of=head)
        assert status == 422
        assert not await b.store.call(records.has_record, rid)
    finally:
        await c.close()


async def test_an_impostor_at_the_colleagues_address_is_detected(tmp_path, nodes):
    a, b = nodes
    rid, head, body = await sealed_record(a, tmp_path, b)
    impostor = await make(tmp_path, "Impostor")
    try:
        await impostor.add_contact(a.descriptor.signed)
        # A believes B lives at the impostor's address (e.g. a spoofed hint).
        peer = Peer(b.node_id, b.identity.sign_public, impostor.descriptor.addresses)

        async def read(off):
            yield body[off:]
        with pytest.raises((AuthenticationFailed, PeerRefused)):
            await a.client.push_record(peer, rid, head, len(body), read)
    finally:
        await impostor.close()
    assert not await b.store.call(records.has_record, rid)


async def test_interrupted_upload_resumes_from_what_arrived(nodes, tmp_path):
    a, b = nodes
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 << 20))
    letter = tmp_path / "l.txt"
    letter.write_text("x")
    res = await a.send_referral(to="B", patient="P", letter=letter, attachments=[big], deliver=False)
    rid = res.record_id
    row = await a.store.call(records.get_record, rid)
    head, body = row["head"], stored_body(a, row)
    half = len(body) // 2

    # Send half the body and drop the connection.
    async def cut():
        yield len(head).to_bytes(4, "big") + head
        yield body[:half]
        raise ConnectionResetError("cable pulled")
    headers = auth.sign_request(a.identity, method="PUT", target=f"/v1/records/{rid}?offset=0",
                                callee=parse_node_id(b.node_id), body_digest=auth.digest(head),
                                now_ms=auth.now_ms(), nonce=os.urandom(16))
    async with raw_session() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.put(url(b, f"/v1/records/{rid}?offset=0"), data=cut(), headers=headers) as resp:
                await resp.read()
    for _ in range(50):
        if b.blobs.incoming_path(rid, a.node_id).exists() and not b.intake._busy:
            break
        await asyncio.sleep(0.05)
    have = b.blobs.incoming_path(rid, a.node_id).stat().st_size
    assert 0 < have <= half
    assert not await b.store.call(records.has_record, rid)          # partial: never in the inbox

    sent_from = []

    async def reader(off):
        sent_from.append(off)
        yield body[off:]
    peer = Peer(b.node_id, b.identity.sign_public, b.descriptor.addresses)
    answer = await a.client.push_record(peer, rid, head, len(body), reader)
    assert answer["status"] == "stored"
    assert sent_from == [have]                                       # only the missing part was sent
    assert await b.store.call(records.has_record, rid)
    view = await b.read(rid)
    assert view.manifest.attachments[0].size == 6 << 20
    out = await b.export(rid, tmp_path / "out")
    assert hashlib.sha256(out[0].read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()


async def test_duplicate_delivery_is_acknowledged_and_dropped(nodes, tmp_path):
    a, b = nodes
    rid, head, body = await sealed_record(a, tmp_path, b)
    peer = Peer(b.node_id, b.identity.sign_public, b.descriptor.addresses)

    async def read(off):
        yield body[off:]
    first = await a.client.push_record(peer, rid, head, len(body), read)
    second = await a.client.push_record(peer, rid, head, len(body), read)
    assert (first["status"], second["status"]) == ("stored", "duplicate")
    assert len(await b.store.call(records.list_records, "in")) == 1


async def test_a_batch_pushed_again_is_answered_duplicate_without_being_verified_again(nodes, tmp_path):
    """A record pushed and pulled at once, or pushed again after a lost answer: what is held byte for byte
    is answered 'duplicate' (with its receipt) without a second verification; another head under a held
    seq still goes through every check (and is kept without the reused number, as before)."""
    from node.sync.messages import PushAnswer, Receipt
    a, b = nodes
    items = []
    for seq in (1, 2, 3):
        rid, head, body = await sealed_record(a, tmp_path, b)
        items.append((seq, head, body))
    peer = Peer(b.node_id, b.identity.sign_public, b.descriptor.addresses)
    verified: list[int] = []
    verify = b.intake._verify_all
    b.intake._verify_all = lambda sender, batch: (verified.append(len(batch)), verify(sender, batch))[1]
    first = PushAnswer.from_wire(await a.client.push_batch(peer, items))
    second = PushAnswer.from_wire(await a.client.push_batch(peer, items))
    assert set(first.results.values()) == {"stored"} and len(first.results) == 3
    assert second.results == {rid: "duplicate" for rid in first.results}
    for rid, raw in second.receipts.items():
        Receipt.verify(raw, b.identity.sign_public, rid)
    assert set(second.receipts) == set(first.results) and second.ack.upto == 3
    assert verified == [3, 0]                                            # nothing verified the second time
    _, other, other_body = await sealed_record(a, tmp_path, b)          # another record under held seq 2
    third = PushAnswer.from_wire(await a.client.push_batch(peer, [(2, other, other_body)]))
    assert verified == [3, 0, 1] and list(third.results.values()) == ["stored"]   # checked as any new record
    assert len(await b.store.call(records.list_records, "in")) == 4                 # (kept, without the seq)


async def test_no_push_to_a_recipient_while_it_pulls_and_pushes_again_after_its_ack(nodes, tmp_path):
    """A catch-up pulled and pushed at once sends (and has verified) every record twice."""
    from node.sync.messages import Ack, Want
    a, b = nodes
    first, _, _ = await sealed_record(a, tmp_path, b)
    second, _, _ = await sealed_record(a, tmp_path, b)
    listing = await a.courier.on_want(b.node_id, Want(since=0, after=0), 1)     # B pulls, one at a time
    assert [o.record_id for o in listing.offers] == [first]
    assert await a.courier.run_due() == 0                                       # nothing pushed meanwhile
    assert not await b.store.call(records.has_record, second)
    await a.courier.on_ack(b.node_id, Ack(upto=0))                              # the pull is over
    assert await a.courier.run_due() == 1                                       # the rest goes by push ...
    assert await b.store.call(records.has_record, second)
    assert not await b.store.call(records.has_record, first)                    # ... not what B was fetching


async def test_record_not_for_this_node_is_refused(tmp_path, nodes):
    a, b = nodes
    c = await make(tmp_path, "C", serve=False)
    try:
        await a.add_contact(c.descriptor.signed)
        rid, head, body = await sealed_record(a, tmp_path, c)     # sealed for C, pushed to B
        async with raw_session() as s:
            payload = len(head).to_bytes(4, "big") + head + body
            status, raw, _ = await signed(s, a.identity, b, "PUT", f"/v1/records/{rid}?offset=0", body=payload,
                                          digest_of=head)
        assert status == 422 and wire.unpack(raw)["error"] == str(InvalidEnvelope())
    finally:
        await c.close()


async def test_a_co_recipient_cannot_squat_a_record_id(tmp_path, nodes):
    """M, also a recipient of A's record, pushes its own record under that ID to B first: it is
    kept as M's record, and A's genuine record still arrives, as A's (a record is its sender's
    ID and its own). tests/test_squat.py covers partial uploads and lookups by ID."""
    from node.core.envelope import Manifest, Recipient, Sealer, seal_bytes
    from node.core.identity import node_id_bytes
    a, b = nodes
    m = await make(tmp_path, "M")
    try:
        for x, y in ((a, m), (m, b), (b, m)):
            await x.add_contact(y.descriptor.signed)
        letter = tmp_path / "l.txt"
        letter.write_text("genuine")
        res = await a.send_referral(to=["B", "M"], patient="P Q", letter=letter, deliver=False)
        rid = res.record_id
        forged = Sealer(sender=m.identity, recipients=[Recipient(node_id_bytes(b.identity.sign_public),
                                                                 b.identity.enc_public)],
                        kind="referral", created=1, record_id=bytes.fromhex(rid))
        head, body = seal_bytes(forged, Manifest(patient="P Q", letter="forged"))
        peer_b = Peer(b.node_id, b.identity.sign_public, b.descriptor.addresses)

        async def read(off):
            yield body[off:]
        assert (await m.client.push_record(peer_b, rid, head, len(body), read))["status"] == "stored"
        assert b.node_id not in await a.courier.deliver_record(rid)      # (M does not know A: refused there)
        states = {d["recipient"]: d["state"] for d in await a.outbox(rid)}
        assert states[b.node_id] == "delivered"
        held = {(r["id"], r["sender"]) for r in await b.store.call(records.list_records, "in")}
        assert held == {(rid, a.node_id), (rid, m.node_id)}
        genuine = await b.store.call(records.get_record, rid, a.node_id)
        assert genuine["head"] == (await a.store.call(records.get_record, rid))["head"]
    finally:
        await m.close()


async def test_a_held_contact_is_refused_at_the_door(nodes):
    a, b = nodes
    await b.store.call(lambda db: db.conn.execute("UPDATE contacts SET held = 1 WHERE node_id = ?", (a.node_id,)))
    peer_b = Peer(b.node_id, b.identity.sign_public, b.descriptor.addresses)
    with pytest.raises(PeerRefused, match="not a confirmed contact") as info:
        await a.client.fetch_outbox(peer_b, 0)
    assert info.value.status == 401


async def test_export_without_hard_links_still_never_overwrites(nodes, tmp_path, monkeypatch):
    import errno
    import os as _os
    a, b = nodes
    att = tmp_path / "scan.pdf"
    att.write_bytes(b"%PDF scan")
    letter = tmp_path / "l.txt"
    letter.write_text("x")
    rid = (await a.send_referral(to="B", patient="P", letter=letter, attachments=[att])).record_id
    out = tmp_path / "usb"
    out.mkdir()
    (out / "scan.pdf").write_bytes(b"already there")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(_os, "link", no_links)                    # as on a FAT or exFAT stick
    written = await b.export(rid, out)
    assert [p.name for p in written] == ["scan (2).pdf"]
    assert (out / "scan.pdf").read_bytes() == b"already there"
    assert (out / "scan (2).pdf").read_bytes() == b"%PDF scan"
    assert sorted(p.name for p in out.iterdir()) == ["scan (2).pdf", "scan.pdf"]   # no temporary left


async def test_a_stranger_is_refused_before_any_body_is_read(nodes):
    """The door checks who calls before reading: a stranger's 9 MiB batch is refused unread."""
    a, b = nodes
    stranger = Identity.generate()
    target = "/v1/batch"
    body = b"\0" * (8 << 20)
    headers = auth.sign_request(stranger, method="POST", target=target, callee=parse_node_id(b.node_id),
                                body_digest=auth.digest(body), now_ms=auth.now_ms(), nonce=os.urandom(16))

    async def trickle():           # would take a minute to send; the answer must come at once
        yield body[:1024]
        await asyncio.sleep(60)
        yield body[1024:]
    async with raw_session() as s:
        started = asyncio.get_running_loop().time()
        try:
            async with s.post(url(b, target), data=trickle(), headers=headers) as resp:
                status, raw = resp.status, await resp.read()
        except aiohttp.ClientError:
            status, raw = 401, b""          # the server may close the connection on us instead
        assert asyncio.get_running_loop().time() - started < 10
    assert status == 401
    if raw:
        assert wire.unpack(raw)["error"] == auth.NOT_AUTHENTICATED


async def test_the_signature_is_checked_first_and_the_body_digest_after(nodes, tmp_path):
    """A contact's valid headers with a swapped body or head: refused (and signed: the caller was proven)."""
    a, b = nodes
    rid, head, body = await sealed_record(a, tmp_path, b)
    target = f"/v1/records/{rid}?offset=0"
    other_head = head[:-1] + bytes([head[-1] ^ 1])
    async with raw_session() as s:
        nonce = os.urandom(16)
        payload = len(other_head).to_bytes(4, "big") + other_head + body
        status, raw, headers = await signed(s, a.identity, b, "PUT", target, body=payload, digest_of=head,
                                            nonce=nonce)
        assert status == 401 and "does not match the signed digest" in wire.unpack(raw)["error"]
        auth.verify_response(b.identity.sign_public, nonce=nonce, status=401, body=raw, headers=headers)
        status, raw, _ = await signed(s, a.identity, b, "POST", "/v1/acks", body=wire.pack({"upto": 0}),
                                      digest_of=wire.pack({"upto": 1}))
        assert status == 401 and "does not match the signed digest" in wire.unpack(raw)["error"]
    assert not await b.store.call(records.has_record, rid)
    assert await a.courier.deliver_record(rid) == {}
    assert await b.store.call(records.has_record, rid)
