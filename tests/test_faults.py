"""Fault tests with real node processes: kill -9 at random points, a full disk.

The kill test is seeded; the seed is printed (run with -s to see it) and can
be replayed with CABINET_FAULT_SEED=N.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess

import pytest

from conftest import NodeProc, db_rows, free_port, introduce, wait_for
from test_sync_e2e import delivered, enqueue, received

BIG = 256 << 20
ROUNDS = 20


def make_big(path, size: int) -> bytes:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for i in range(size >> 20):
            piece = block[:-8] + i.to_bytes(8, "big")     # distinct blocks, cheap to make
            h.update(piece)
            fh.write(piece)
    return h.digest()


def integrity(node: NodeProc) -> str:
    conn = sqlite3.connect(node.data / "cabinet.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_either_side_at_random_points_loses_and_duplicates_nothing(practice, tmp_path):
    seed = int(os.environ.get("CABINET_FAULT_SEED", random.randrange(1 << 32)))
    print(f"\nfault test seed: {seed} (replay with CABINET_FAULT_SEED={seed})")
    rng = random.Random(seed)
    gp, cardio = practice("Dr Gp"), practice("Dr Cardio")
    introduce(gp, cardio)
    big = tmp_path / "scan.dcm"
    digest = make_big(big, BIG)
    ids = enqueue(gp, "Dr Cardio", 200, big)
    assert len(ids) == 201
    args = {gp.name: (), cardio.name: ("--pull-every", "1")}
    gp.start()
    cardio.start(*args[cardio.name])
    kills = {gp.name: 0, cardio.name: 0}
    for _ in range(ROUNDS):
        victim = rng.choice([gp, cardio])
        subprocess.run(["sleep", f"{rng.uniform(0.05, 0.7):.3f}"])
        victim.stop(signal.SIGKILL)
        kills[victim.name] += 1
        victim.start(*args[victim.name])
    assert all(kills.values()), f"seed {seed}: both sides must have been killed at least once"

    wait_for(lambda: received(cardio) == set(ids), 180, f"all 201 records (seed {seed})", interval=1)
    wait_for(lambda: delivered(gp) == 201, 60, f"the sender's outbox to drain (seed {seed})", interval=1)
    for n in (gp, cardio):
        assert integrity(n) == "ok", f"seed {seed}"
        assert "intact" in n.ok("audit", "verify")
    counts = db_rows(cardio, "SELECT record, COUNT(*) FROM audit WHERE event = 'received' GROUP BY record")
    assert sorted(r for r, _ in counts) == sorted(ids) and all(c == 1 for _, c in counts), f"seed {seed}"
    assert not list((cardio.data / "incoming").iterdir())          # no partial left behind
    out = tmp_path / "export"
    cardio.ok("export", ids[-1], str(out))
    h = hashlib.sha256()
    with open(out / "scan.dcm", "rb") as fh:
        while piece := fh.read(1 << 20):
            h.update(piece)
    assert h.digest() == digest, f"seed {seed}"


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and must run as root (CI does)")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_refuses_cleanly_then_completes_when_space_is_freed(practice, small_disk, tmp_path):
    gp = practice("Dr Gp")
    cardio = NodeProc(small_disk / "cardio", "Dr Cardio", free_port()).init()
    try:
        introduce(gp, cardio)
        gp.start()
        cardio.start("--pull-every", "1")
        scan = tmp_path / "scan.bin"
        scan.write_bytes(os.urandom(40 << 20))
        letter = tmp_path / "l.txt"
        letter.write_text("hello")
        out = gp.ok("send", "--to", "Dr Cardio", "--patient", "Disk Full", "--letter", str(letter), str(scan))
        rid = out.split()[1]
        assert "queued" in out and "disk space" in out          # refused cleanly, no ack
        assert rid not in received(cardio)
        assert "queued" in gp.ok("outbox", rid)
        assert not list((cardio.data / "incoming").iterdir())
        assert "refused" in {r[0] for r in db_rows(cardio, "SELECT event FROM audit")}
        # Space is freed: the transfer completes by itself (the recipient pulls, the sender retries).
        subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
        wait_for(lambda: rid in received(cardio), 60, "the record once space is free", interval=1)
        wait_for(lambda: "delivered" in gp.ok("outbox", rid), 60, "the sender to see it delivered", interval=1)
        cardio.ok("export", rid, str(tmp_path / "out"))
        assert (tmp_path / "out" / "scan.bin").read_bytes() == scan.read_bytes()
    finally:
        if cardio.proc is not None:
            cardio.stop(signal.SIGKILL)
        shutil.rmtree(small_disk / "cardio", ignore_errors=True)


def test_a_node_starts_and_sends_on_a_nearly_full_disk_while_incoming_data_is_refused(practice, small_disk,
                                                                                       tmp_path):
    """The reserve (node/app/quota.py) is never used by incoming data: with 10 MiB left on its disk,
    the node starts, seals and sends a referral and keeps its audit log, while a colleague's
    record waits, queued with the reason."""
    gp = practice("Dr Gp")
    cardio = NodeProc(small_disk / "cardio", "Dr Cardio", free_port()).init()
    try:
        introduce(gp, cardio)
        st = os.statvfs(small_disk)
        filler = small_disk / "filler"
        with open(filler, "wb") as fh:
            fh.truncate(0)
            left = st.f_bavail * st.f_frsize - (10 << 20)
            block = b"\0" * (1 << 20)
            while left > 0:
                left -= fh.write(block[:min(left, len(block))])
        gp.start()
        cardio.start("--pull-every", "1")
        letter = tmp_path / "l.txt"
        letter.write_text("hello")
        scan = tmp_path / "scan.bin"
        scan.write_bytes(os.urandom(3 << 20))
        out = cardio.ok("send", "--to", "Dr Gp", "--patient", "Small Disk", "--letter", str(letter), str(scan))
        sent = out.split()[1]
        assert "delivered" in out, out
        gp.ok("export", sent, str(tmp_path / "out"))
        assert (tmp_path / "out" / "scan.bin").read_bytes() == scan.read_bytes()
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(2 << 20))
        out = gp.ok("send", "--to", "Dr Cardio", "--patient", "Small Disk", "--letter", str(letter), str(small))
        assert "queued" in out and "disk space" in out, out
        assert out.split()[1] not in received(cardio)
        assert "intact" in cardio.ok("audit", "verify")
    finally:
        if cardio.proc is not None:
            cardio.stop(signal.SIGKILL)
        shutil.rmtree(small_disk / "cardio", ignore_errors=True)


def test_a_cut_upload_is_logged_in_one_clean_line(practice, tmp_path):
    """The sender goes away mid-upload: the recipient's node.log has one line saying what was kept,
    and no traceback."""
    import asyncio

    import aiohttp

    from conftest import PASSPHRASE
    from node import Node
    from node.core.identity import parse_node_id
    from node.store import records
    from node.transport import auth

    gp, cardio = practice("Dr Gp"), practice("Dr Cardio")
    introduce(gp, cardio)
    cardio.start()
    scan = tmp_path / "scan.bin"
    scan.write_bytes(os.urandom(4 << 20))
    letter = tmp_path / "l.txt"
    letter.write_text("x")

    async def cut() -> tuple[str, int, int]:
        node = await Node.open_node(gp.data, passphrase=PASSPHRASE)
        try:
            res = await node.send_referral(to="Dr Cardio", patient="P", letter=letter, attachments=[scan],
                                           deliver=False)
            rid = res.record_id
            row = await node.store.call(records.get_record, rid)
            head, body = row["head"], node.blobs.path(rid).read_bytes()
            contact = await node.store.call(records.find_contact, "Dr Cardio")
            target = f"/v1/records/{rid}?offset=0"

            async def pieces():
                yield len(head).to_bytes(4, "big") + head
                yield body[:len(body) // 2]
                raise ConnectionResetError("cable pulled")
            headers = auth.sign_request(node.identity, method="PUT", target=target,
                                        callee=parse_node_id(cardio.node_id), body_digest=auth.digest(head),
                                        now_ms=auth.now_ms(), nonce=os.urandom(16))
            address = node.discovery.locate(contact).addresses[0]
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as s:
                with pytest.raises(aiohttp.ClientError):
                    async with s.put(address + target, data=pieces(), headers=headers) as resp:
                        await resp.read()
            return rid, len(body) // 2, len(body)
        finally:
            await node.close()

    rid, half, size = asyncio.run(cut())
    log = cardio.data / "node.log"
    wait_for(lambda: "transfer interrupted" in log.read_text(), 20, "the interruption to be logged")
    lines = [l for l in log.read_text().splitlines() if rid in l]
    interrupted = [l for l in lines if "transfer interrupted" in l]
    assert len(interrupted) == 1, lines
    assert f"record {rid} from {gp.node_id}: transfer interrupted at " in interrupted[0]
    assert f" of {size} bytes; kept for resuming" in interrupted[0]
    have = int(interrupted[0].split("interrupted at ")[1].split()[0])
    assert 0 < have <= half
    assert "Traceback" not in log.read_text() and "internal error" not in log.read_text()
