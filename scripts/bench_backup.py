"""Backup and restore of a full data folder, against a plain `cp -a` of the same folder in the same run.

    python scripts/bench_backup.py                         # 10,000 small records + 2 GiB of attachments
    python scripts/bench_backup.py --records 500 --attach-mib 64      # quicker

The data folder is filled in-process through the Node facade (records sealed for
one contact, not delivered). Then, timed: `cp -a DATA`, `Node.backup` (SQLite
online backup + encryption + blob copies), a second backup (incremental: no new
blobs), `Node.check_backup`, and `Node.restore` into a fresh folder. Everything
runs in a temporary folder on the same disk, removed at the end; memory is the
peak RSS of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("CABINET_KDF", "min")
PASSPHRASE = "bench passphrase"
MiB = 1 << 20

from node import Node  # noqa: E402


async def fill(data: Path, peer: Path, records: int, attach_mib: int, tmp: Path) -> None:
    await Node.init(peer, PASSPHRASE, name="Dr Peer")
    async with Node.open(peer, passphrase=PASSPHRASE) as p:
        text = p.descriptor.to_text()
    await Node.init(data, PASSPHRASE, name="Dr Bench")
    async with Node.open(data, passphrase=PASSPHRASE) as node:
        await node.add_contact(text, name="Dr Peer")
        letter = "Cher confrère, compte rendu de consultation. " * 20
        for i in range(records):
            await node.send_referral(to="Dr Peer", patient=f"Patient {i}", born="1960-01-01", subject=f"S {i}",
                                     letter=letter, deliver=False)
        left, n = attach_mib * MiB, 0
        while left > 0:
            size = min(left, 256 * MiB)
            f = tmp / f"scan-{n}.bin"
            with open(f, "wb") as fh:
                for _ in range(0, size, MiB):
                    fh.write(os.urandom(min(MiB, size)))
            await node.send_referral(to="Dr Peer", patient=f"Big {n}", letter="see attachment",
                                     attachments=[f], deliver=False)
            f.unlink()
            left, n = left - size, n + 1


def timed(label: str, fn, results: dict) -> None:
    start = time.perf_counter()
    fn()
    results[label] = time.perf_counter() - start
    print(f"{label:28} {results[label]:8.2f} s", flush=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--attach-mib", type=int, default=2048)
    ap.add_argument("--dir", help="where to make the temporary folder (default: the system's)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cabinet-bench-backup-", dir=a.dir) as t:
        tmp = Path(t)
        data, results = tmp / "data", {}
        print(f"filling: {a.records} small records, {a.attach_mib} MiB of attachments ...", flush=True)
        start = time.perf_counter()
        asyncio.run(fill(data, tmp / "peer", a.records, a.attach_mib, tmp))
        print(f"filled in {time.perf_counter() - start:.1f} s: {du(data) / MiB:.0f} MiB", flush=True)
        os.sync()

        timed("cp -a", lambda: subprocess.run(["cp", "-a", str(data), str(tmp / "copy")], check=True), results)

        async def backup(dest: Path):
            async with Node.open(data, passphrase=PASSPHRASE) as node:
                return await node.backup(dest, PASSPHRASE)
        timed("backup (first)", lambda: asyncio.run(backup(tmp / "bk")), results)
        timed("backup (incremental)", lambda: asyncio.run(backup(tmp / "bk")), results)
        timed("backup --check", lambda: asyncio.run(Node.check_backup(tmp / "bk", passphrase=PASSPHRASE)), results)
        timed("restore", lambda: asyncio.run(Node.restore(tmp / "bk", tmp / "restored", passphrase=PASSPHRASE)),
              results)
        base = results["cp -a"]
        print(f"\nsize: data {du(data) / MiB:.0f} MiB, backup {du(tmp / 'bk') / MiB:.0f} MiB")
        for k in ("backup (first)", "backup (incremental)", "backup --check", "restore"):
            print(f"{k:28} {results[k] / base:6.2f} x cp -a")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
