"""Per-contact quotas and the disk reserve (node/app/quota.py), with in-process nodes on 127.0.0.1.

C opens uploads to B beyond its quota: the excess is refused for now (507, never an ack) while A's
referral still arrives; a partial body left behind is collected once expired (the ports clock is
moved, nothing sleeps); a batch over the quota is refused whole.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from conftest import PASSPHRASE
from node import Node
from node.app.quota import DISK_FULL, QUOTA_FULL, Limits, Quota, QuotaFull
from node.config import Config
from node.core.envelope import Manifest, Recipient, Sealer, seal_bytes
from node.core.errors import PeerRefused
from node.core.identity import node_id_bytes
from node.store import records
from node.store.blobs import Partial
from node.sync.messages import PushItem
from node.transport.client import Peer
from test_squat import cut_upload, settled

MiB = 1 << 20


async def make(tmp_path, name: str, quota_mib: int = 2048) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0")
    cfg = Config.load(tmp_path / name)
    cfg.incoming_quota_mib = quota_mib
    cfg.save(tmp_path / name)
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


@pytest.fixture
async def trio(tmp_path):
    b = await make(tmp_path, "B", quota_mib=4)
    a, c = await make(tmp_path, "A"), await make(tmp_path, "C")
    for x, y in ((a, b), (b, a), (b, c), (c, b)):
        await x.add_contact(y.descriptor.signed)
    yield a, b, c
    for n in (a, b, c):
        await n.close()


async def sealed_big(sender: Node, to: Node, tmp_path, size: int, name: str) -> tuple[str, bytes, bytes]:
    att = tmp_path / f"{name}.bin"
    att.write_bytes(os.urandom(size))
    letter = tmp_path / "l.txt"
    letter.write_text("x")
    res = await sender.send_referral(to=to.config.name, patient="P", letter=letter, attachments=[att],
                                     deliver=False)
    row = await sender.store.call(records.get_record, res.record_id)
    body = row["body"] if row["body"] is not None else sender.blobs.path(row["id"]).read_bytes()
    return res.record_id, row["head"], body


def peer(node: Node) -> Peer:
    return Peer(node.node_id, node.identity.sign_public, node.descriptor.addresses)


async def wait_until(check, what: str, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_one_contact_over_its_quota_is_refused_while_another_still_gets_through(trio, tmp_path):
    a, b, c = trio
    first = await sealed_big(c, b, tmp_path, 3 * MiB, "first")
    others = [await sealed_big(c, b, tmp_path, 2 * MiB, f"more{i}") for i in range(3)]
    go = asyncio.Event()

    async def held_open(off):              # C's first upload: half now, the rest when told
        body = first[2]
        yield body[off:len(body) // 2]
        await go.wait()
        yield body[len(body) // 2:]
    upload = asyncio.create_task(c.client.push_record(peer(b), first[0], first[1], len(first[2]), held_open))
    await wait_until(lambda: b.intake.quota.used(c.node_id) > 0, "C's first upload to be under way")

    # C's other uploads, at the same time: each would pass the quota, each is refused for now.
    async def send(rid, head, body):
        async def read(off):
            yield body[off:]
        return await c.client.push_record(peer(b), rid, head, len(body), read)
    results = await asyncio.gather(*(send(*o) for o in others), return_exceptions=True)
    assert all(isinstance(r, PeerRefused) and r.status == 507 and "quota" in str(r) for r in results), results
    for rid, _, _ in others:
        assert not await b.store.call(records.has_record, rid, c.node_id)        # no ack, nothing stored
    # What C's practice sees for a referral sent now: queued, with the reason.
    letter = tmp_path / "l.txt"
    att = tmp_path / "late.bin"
    att.write_bytes(os.urandom(2 * MiB))
    late = await c.send_referral(to="B", patient="P", letter=letter, attachments=[att])
    assert late.deliveries[b.node_id] == "queued" and "disk quota for you is full" in late.errors[b.node_id]

    # Meanwhile A's referral (big enough to need its own upload) arrives.
    rid_a, head_a, body_a = await sealed_big(a, b, tmp_path, 3 * MiB, "from-a")
    assert b.node_id not in await a.courier.deliver_record(rid_a)
    assert await b.store.call(records.has_record, rid_a, a.node_id)

    go.set()
    assert (await upload)["status"] == "stored"
    assert b.intake.quota.used(c.node_id) == 0 and b.intake.quota.used(a.node_id) == 0
    # With its first upload done, C's next one fits again.
    assert b.node_id not in await c.courier.deliver_record(late.record_id)


async def test_an_abandoned_partial_counts_until_it_expires_then_is_collected(trio, tmp_path):
    a, b, c = trio
    rid, head, body = await sealed_big(c, b, tmp_path, 3 * MiB, "abandoned")
    await cut_upload(c, b, rid, head, body, len(body) // 2)
    have = await settled(b, c, rid)
    assert b.intake.quota.used(c.node_id) == have               # the partial stays counted
    other = await sealed_big(c, b, tmp_path, 3 * MiB, "next")          # with the partial: over 4 MiB

    async def read(off):
        yield other[2][off:]
    with pytest.raises(PeerRefused) as refused:
        await c.client.push_record(peer(b), other[0], other[1], len(other[2]), read)
    assert refused.value.status == 507

    await b.intake.sweep()                                       # not expired yet: kept
    assert b.blobs.incoming_path(rid, c.node_id).exists()
    real = b.ports.clock
    expiry = b.config.partial_expiry_hours * 3600 * 1000
    b.ports.clock = lambda: real() + expiry + 1000
    try:
        await b.intake.sweep()
    finally:
        b.ports.clock = real
    assert not b.blobs.incoming_path(rid, c.node_id).exists()
    assert b.intake.quota.used(c.node_id) == 0
    assert (await c.client.push_record(peer(b), other[0], other[1], len(other[2]), read))["status"] == "stored"


async def test_a_batch_over_the_quota_is_refused_whole(trio):
    a, b, c = trio
    b.intake.quota.limits = Limits(per_contact=2000, reserve=0)
    items = []
    for i in range(3):
        sealer = Sealer(sender=c.identity, recipients=[Recipient(node_id_bytes(b.identity.sign_public),
                                                                 b.identity.enc_public)],
                        kind="referral", created=1 + i)
        head, body = seal_bytes(sealer, Manifest(patient="P", letter="x" * 600))
        items.append(PushItem(seq=i + 1, head=head, body=body))
    with pytest.raises(QuotaFull):
        await b.intake.small(c.node_id, items)
    assert await b.store.call(records.list_records, "in") == []
    assert b.intake.quota.used(c.node_id) == 0
    out = await b.intake.small(c.node_id, items[:1])             # one fits
    assert list(out.results.values()) == ["stored"]


def test_reservations_are_atomic_and_the_reserve_is_kept():
    free = [100 * MiB]
    q = Quota(Limits(per_contact=10 * MiB, reserve=50 * MiB), lambda: (free[0], 1 << 40))
    q.load([Partial(path=None, sender="C", record_id="r1", size=4 * MiB, mtime_ms=0)])  # type: ignore[arg-type]
    held = q.reserve("C", 6 * MiB, record_id="r1", have=4 * MiB)   # resuming r1: its partial is inside
    assert q.used("C") == 6 * MiB
    with pytest.raises(QuotaFull, match="quota"):
        q.reserve("C", 5 * MiB)
    other = q.reserve("A", 9 * MiB)
    free[0] = 65 * MiB
    with pytest.raises(QuotaFull) as err:                         # 65 - (2 + 9) unwritten - 9 < 50
        q.reserve("D", 9 * MiB)
    assert str(err.value) == DISK_FULL and QUOTA_FULL != DISK_FULL
    held.release(kept=5 * MiB)                                    # interrupted: 5 MiB kept
    held.release(kept=0)                                          # a second release changes nothing
    assert q.used("C") == 5 * MiB
    other.release()
    q.forget("C", "r1")
    assert q.used("C") == 0 and q.used("A") == 0


async def test_the_running_node_sweeps_expired_partials_at_start(tmp_path):
    await Node.init(tmp_path / "N", PASSPHRASE, name="N", listen="127.0.0.1:0")
    old = tmp_path / "N" / "incoming" / f"SOME-SENDER-{'ab' * 16}.body"
    fresh = tmp_path / "N" / "incoming" / f"SOME-SENDER-{'cd' * 16}.body"
    sealing = tmp_path / "N" / "incoming" / f"{'ef' * 16}.sealing"      # a send interrupted while sealing
    sealing_now = tmp_path / "N" / "incoming" / f"{'12' * 16}.sealing"  # one still being sealed
    old.parent.mkdir(mode=0o700, exist_ok=True)
    for p in (old, fresh, sealing, sealing_now):
        p.write_bytes(b"x" * 1000)
    week_ago = os.path.getmtime(old) - 7 * 24 * 3600
    for p in (old, sealing):
        os.utime(p, (week_ago, week_ago))
    node = await Node.open_node(tmp_path / "N", passphrase=PASSPHRASE)
    try:
        assert node.intake.quota.used("SOME-SENDER") == 2000            # counted from incoming/ at start
        await node.serve("127.0.0.1:0")
        await wait_until(lambda: not old.exists() and not sealing.exists(), "the expired leftovers to be collected")
        assert fresh.exists() and node.intake.quota.used("SOME-SENDER") == 1000
        assert sealing_now.exists()
    finally:
        await node.close()
