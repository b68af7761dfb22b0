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
