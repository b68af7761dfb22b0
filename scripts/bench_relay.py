"""Benchmark: one file through the blind relay against the same file direct, in the same run.

    .venv/bin/python scripts/bench_relay.py [--mib 256] [--runs 3] [--sessions 1,4] [--session-mib 64]

1. Two nodes in this process (TLS, signed requests, SQLite, fsync: the real path),
   the relay as its own `python -m relay` process on 127.0.0.1. Each run seals the
   same attachment twice (two records) and delivers one direct (B's https://
   address) and one through the relay (B's descriptor lists only relay+tcp://; B
   registers), the order alternating from run to run; each run prints its ratio and
   the load average. Only `courier.deliver_record` is timed. Target: relayed >= 0.7
   x direct in every run.
2. The relay's cost per concurrent session: K synthetic sessions (signed Hello and
   Connect, then raw bytes to a sink) each move --session-mib MiB at once; the
   relay's CPU seconds per GiB and its peak RSS (VmHWM) are read from /proc.
   Memory per session must not grow with the size moved.
Everything stays on 127.0.0.1; the temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update(CABINET_KDF="min")

from node import Node  # noqa: E402
from node.config import Config  # noqa: E402
from node.core import relaywire  # noqa: E402
from node.core.identity import Identity, node_id_bytes  # noqa: E402
from node.transport.auth import now_ms  # noqa: E402

PASS = "bench passphrase"
MiB = 1 << 20


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS KiB, peak RSS KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return cpu, int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def start_relay(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        raise SystemExit(f"relay did not start: {line!r}")
    return proc


async def node(folder: Path, name: str, relays: list[str]) -> Node:
    await Node.init(folder, PASS, name=name, listen="127.0.0.1:0", lan=False)
    cfg = Config.load(folder)
    cfg.relays = relays
    cfg.save(folder)
    n = await Node.open_node(folder, passphrase=PASS)
    await n.serve("127.0.0.1:0")
    return n


async def timed_delivery(a: Node, b: Node, path: Path) -> float:
    res = await a.send_referral(to=b.config.name, patient="Bench Patient", letter="bench", attachments=[path],
                                deliver=False)
    t0 = time.perf_counter()
    errors = await a.courier.deliver_record(res.record_id)
    took = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"delivery failed: {errors}")
    return took


async def direct_vs_relayed(tmp: Path, mib: int, relay_url: str, runs: int) -> list[tuple[float, float]]:
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    a = await node(tmp / "A", "A", [])
    b_direct = await node(tmp / "Bd", "Bd", [])
    b_relayed = await node(tmp / "Br", "Br", [relay_url])
    try:
        for b in (b_direct, b_relayed):
            await a.add_contact(b.descriptor.signed)
            await b.add_contact(a.descriptor.signed)
        await a.start_relays()
        await b_relayed.start_relays()
        await asyncio.sleep(0.5)             # registrations open (a bench, not a test)
        results = []
        for run in range(runs):
            if run % 2 == 0:
                direct = await timed_delivery(a, b_direct, big)
                relayed = await timed_delivery(a, b_relayed, big)
            else:
                relayed = await timed_delivery(a, b_relayed, big)
                direct = await timed_delivery(a, b_direct, big)
            results.append((mib / direct, mib / relayed))
            print(f"run {run + 1}: {mib} MiB direct: {mib / direct:.1f} MiB/s   through the relay: "
                  f"{mib / relayed:.1f} MiB/s   ratio {direct / relayed:.2f} (target >= 0.70)   "
                  f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
        return results
    finally:
        for n in (a, b_direct, b_relayed):
            await n.stop_relays()
            await n.close()


async def synthetic_sessions(port: int, k: int, mib: int) -> None:
    """k sessions at once, each moving `mib` MiB from a caller to a registered sink."""
    url = f"relay+tcp://127.0.0.1:{port}"
    callers = [Identity.generate() for _ in range(k)]
    sinks = [Identity.generate() for _ in range(k)]

    async def sink(ident: Identity, caller: Identity) -> int:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(relaywire.Hello.make(ident, relay=url, accept=frozenset({node_id_bytes(caller.sign_public)}),
                                     now_ms=now_ms(), nonce=os.urandom(16)).to_frame())
        got = 0
        for _ in range(2):                     # ok, then call
            n = int.from_bytes(await r.readexactly(4), "big")
            await r.readexactly(n)
        while piece := await r.read(1 << 16):
            got += len(piece)
        w.close()
        return got

    async def source(ident: Identity, target: Identity) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(relaywire.Connect.make(ident, relay=url, to=node_id_bytes(target.sign_public), now_ms=now_ms(),
                                       nonce=os.urandom(16)).to_frame())
        n = int.from_bytes(await r.readexactly(4), "big")
        await r.readexactly(n)
        block = os.urandom(1 << 16)
        for _ in range(mib * 16):
            w.write(block)
            await w.drain()
        w.write_eof()
        await r.read()
        w.close()

    sinks_t = [asyncio.create_task(sink(s, c)) for s, c in zip(sinks, callers)]
    await asyncio.sleep(0.3)
    await asyncio.gather(*(source(c, s) for c, s in zip(callers, sinks)))
    got = await asyncio.gather(*sinks_t)
    assert all(g == mib * MiB for g in got), got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sessions", default="1,4")
    ap.add_argument("--session-mib", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cabinet-bench-relay-") as tmp:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        relay = start_relay(port)
        try:
            cpu0, _, _ = proc_stats(relay.pid)
            results = asyncio.run(direct_vs_relayed(Path(tmp), a.mib, f"relay+tcp://127.0.0.1:{port}", a.runs))
            cpu1, rss, hwm = proc_stats(relay.pid)
            ratios = [r / d for d, r in results]
            print(f"ratio over {a.runs} run(s): {min(ratios):.2f} to {max(ratios):.2f}; "
                  f"{sum(r >= 0.7 for r in ratios)} of {a.runs} at or above 0.70")
            print(f"  relay: {(cpu1 - cpu0) / (a.mib * a.runs) * 1024:.1f} CPU s/GiB, RSS {rss // 1024} MiB, "
                  f"peak {hwm // 1024} MiB")
            for k in (int(x) for x in a.sessions.split(",")):
                for mib in (a.session_mib // 4, a.session_mib):
                    c0, _, _ = proc_stats(relay.pid)
                    t0 = time.perf_counter()
                    asyncio.run(synthetic_sessions(port, k, mib))
                    took = time.perf_counter() - t0
                    c1, rss, hwm = proc_stats(relay.pid)
                    print(f"  {k} concurrent session(s) x {mib} MiB: {k * mib / took:.0f} MiB/s through, "
                          f"{(c1 - c0) / (k * mib) * 1024:.1f} CPU s/GiB, RSS {rss // 1024} MiB, "
                          f"peak {hwm // 1024} MiB")
        finally:
            relay.terminate()
            relay.wait(10)


if __name__ == "__main__":
    main()
