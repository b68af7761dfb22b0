"""Sync benchmarks (issue 3): catch-up after a long absence, and resuming a big transfer.

    .venv/bin/python scripts/bench_sync.py [--count 10000] [--resume-mib 1024]

1. Catch-up: COUNT small referrals (5 KB letter) are queued while the
   recipient is off; we time from the recipient's start until all are
   committed (real `cabinet run` processes on 127.0.0.1). Baseline, same run:
   the same envelopes verified and written straight into a fresh recipient
   store in one transaction (the intake's work without network or protocol).
2. Resume: a RESUME-MiB attachment; the recipient is killed (-9) when about
   half has arrived, then restarted; the body bytes the receiver logs as
   received from the network after the restart (its server's byte count) are
   compared with the file size. Then the same with the sender killed instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, CABINET_KDF="min", CABINET_PASSPHRASE="bench passphrase", PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cabinet(data: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "node", *args, "--data", str(data)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, check=True)
    return out.stdout


def init(data: Path, name: str) -> str:
    out = cabinet(data, "init", "--name", name, "--listen", f"127.0.0.1:{free_port()}")
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Node ID"))


def introduce(a: Path, b: Path, ida: str, idb: str) -> None:
    for x, y, idx in ((a, b, ida), (b, a, idb)):
        f = x.parent / (x.name + ".desc")
        cabinet(x, "id", "--export", str(f))
        cabinet(y, "contact", "add", str(f), "--id", idx)


def start(data: Path, *extra: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "node", "run", "--data", str(data), *extra], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:          # a queued record's log lines may come before "listening"
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "listening" in line:
            # read on: a pipe nobody reads fills, and the node then stops at its next log line
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p
    p.kill()
    raise SystemExit("node did not start:\n" + "".join(seen[-20:]))


def stop(p: subprocess.Popen, sig=signal.SIGTERM) -> None:
    p.send_signal(sig)
    p.wait(timeout=30)


def count_in(data: Path) -> int:
    conn = sqlite3.connect(f"file:{data / 'cabinet.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM records WHERE direction = 'in'").fetchone()[0]
    finally:
        conn.close()


async def enqueue(data: Path, to: str, count: int, attachment: Path | None = None) -> None:
    from node import Node
    async with Node.open(data, passphrase=ENV["CABINET_PASSPHRASE"]) as node:
        letter = "Cher confrère,\n" + "x" * 5000
        for i in range(count):
            await node.send_referral(to=to, patient=f"Patient {i}", subject=f"n{i}", letter=letter, deliver=False)
        if attachment:
            await node.send_referral(to=to, patient="Big", letter="scan", attachments=[attachment], deliver=False)


async def direct_write(sender: Path, recipient: Path, sender_id: str) -> float:
    """Baseline: the sender's envelopes verified and committed into a fresh store in one transaction."""
    from node import Node
    from node.store import records
    conn = sqlite3.connect(sender / "cabinet.db")
    items = [(seq, head, body) for seq, head, body in conn.execute(
        "SELECT d.seq, r.head, r.body FROM deliveries d JOIN records r ON r.id = d.record_id ORDER BY d.seq")]
    conn.close()
    async with Node.open(recipient, passphrase=ENV["CABINET_PASSPHRASE"]) as node:
        t = time.perf_counter()
        try:                                    # this checkout's intake takes messages; older ones tuples
            from node.sync.messages import PushItem
            batch = [PushItem(seq=seq, head=head, body=body) for seq, head, body in items]
        except ImportError:
            batch = items
        rows = await asyncio.to_thread(node.intake._verify_all, sender_id, batch)
        await node.store.call(records.insert_received, rows, sender=sender_id, now=0)
        elapsed = time.perf_counter() - t
        assert await node.store.call(lambda db: db.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]) \
            == len(items)
    return len(items) / elapsed


def catch_up(tmp: Path, count: int) -> None:
    gp, cardio, fresh = tmp / "gp", tmp / "cardio", tmp / "fresh"
    gid, cid = init(gp, "Dr Gp"), init(cardio, "Dr Cardio")
    introduce(gp, cardio, gid, cid)
    shutil.copytree(cardio, fresh)          # the same recipient, untouched, for the baseline
    t = time.perf_counter()
    asyncio.run(enqueue(gp, "Dr Cardio", count))
    print(f"queued {count} referrals in {time.perf_counter() - t:.1f} s (sealing + one commit each)")
    sender = start(gp)
    time.sleep(1.0)                               # its courier has tried and backed off
    t0 = time.perf_counter()
    receiver = start(cardio)
    while count_in(cardio) < count:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    stop(receiver)
    stop(sender)
    rate = count / elapsed
    base = asyncio.run(direct_write(gp, fresh, gid))
    print(f"catch-up:      {count} records in {elapsed:.2f} s = {rate:,.0f} records/s "
          f"(target >= 2,000)")
    print(f"direct write:  {base:,.0f} records/s (verify + one transaction, no network)")
    print(f"ratio:         {rate / base:.2f} (target >= 0.33)")


def received_on_the_wire(log: Path, since_offset: int) -> int:
    """Body bytes the receiver logged as received over the network, in log lines after an offset."""
    total = 0
    with open(log, "rb") as fh:
        fh.seek(since_offset)
        for line in fh.read().decode("utf-8", "replace").splitlines():
            m = re.search(r"(\d+) body bytes received from offset", line)
            if m:
                total += int(m.group(1))
    return total


def resume(tmp: Path, mib: int, kill: str) -> None:
    gp, cardio = tmp / f"gp-{kill}", tmp / f"cardio-{kill}"
    gid, cid = init(gp, "Dr Gp"), init(cardio, "Dr Cardio")
    introduce(gp, cardio, gid, cid)
    big = tmp / "big.bin"
    if not big.exists():
        with open(big, "wb") as fh:
            block = os.urandom(1 << 20)
            for i in range(mib):
                fh.write(block[:-8] + i.to_bytes(8, "big"))
    size = big.stat().st_size
    asyncio.run(enqueue(gp, "Dr Cardio", 0, big))
    receiver = start(cardio)
    sender = start(gp)
    incoming = cardio / "incoming"
    while True:
        partial = [p.stat().st_size for p in incoming.glob("*.body")]
        if partial and partial[0] >= size // 2:
            break
        time.sleep(0.005)
    log = cardio / "node.log"
    if kill == "receiver":
        stop(receiver, signal.SIGKILL)
        mark = log.stat().st_size
        have = next(p.stat().st_size for p in incoming.glob("*.body"))
        receiver = start(cardio)
    else:
        stop(sender, signal.SIGKILL)
        time.sleep(0.3)                       # the receiver notices the dropped connection and logs it
        mark = log.stat().st_size
        have = next(p.stat().st_size for p in incoming.glob("*.body"))
        sender = start(gp)
    t = time.perf_counter()
    while count_in(cardio) < 1:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t
    after = received_on_the_wire(log, mark)
    stop(receiver)
    stop(sender)
    print(f"resume ({kill} killed at {100 * have / size:.0f}%): {after / 2**20:,.0f} MiB received after the "
          f"restart = {100 * after / size:.1f}% of the file, in {elapsed:.1f} s (target <= 55%)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--resume-mib", type=int, default=1024)
    ap.add_argument("--skip-catch-up", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cabinet-bench-sync-"))
    try:
        if not args.skip_catch_up:
            catch_up(tmp, args.count)
        if args.resume_mib:
            for kill in ("receiver", "sender"):
                resume(tmp, args.resume_mib, kill)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
