#!/usr/bin/env python3
"""Bootstrap benchmark (on demand, not part of the tests).

    .venv/bin/python scripts/bench_bootstrap.py [--descriptors 100000] [--queries 500] [--nodes 200]

1. One bootstrap holding N signed descriptors (signed in a process pool, loaded
   through bootstrap.storage.put_many, which verifies every one), served by a
   real `python -m bootstrap` process: search latency p50/p99 over HTTP for a
   mix of queries, lookup latency, and the server's peak RSS (VmHWM).
   Optionally (--catch-up) the time a fresh peer takes to copy all of them.
2. Three peered bootstraps and 200 in-process nodes: time for all 200 to reach
   every bootstrap, time for one new descriptor to reach the other two, and
   lookup latency p50/p99 (one bootstrap, and lookup_any over the three).

Targets: search p99 < 50 ms and RSS < 300 MiB at 100,000 descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bootstrap import storage  # noqa: E402
from node.core.identity import Identity  # noqa: E402
from node.transport import directory  # noqa: E402

FIRST = ["Anne", "Hélène", "Jean", "Zoé", "François", "Anaïs", "Loïc", "Cécile", "Jérôme", "Maëlle", "Noël", "Paul",
         "Camille", "Léa", "Hugo", "Chloé", "Théo", "Inès", "Louis", "Manon", "Gaëlle", "Benoît", "Agnès", "Rémi"]
LAST = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau", "Simon",
        "Laurent", "Lefèbvre", "Michel", "Garcia", "David", "Bertrand", "Roux", "Vincent", "Fournier", "Morel",
        "Girard", "André", "Lefèvre", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Martinez", "Nguyen",
        "Müller", "Garçon", "Benoît", "Faure", "Rousseau", "Caron", "Blanc", "Guérin", "Boyer", "Chevalier"]
SPECIALTIES = ["Cardiologie", "Médecine générale", "Pédiatrie", "Dermatologie", "Radiologie", "Gynécologie",
               "Ophtalmologie", "Psychiatrie", "Rhumatologie", "Néphrologie", "Pneumologie", "Endocrinologie",
               "Gastro-entérologie", "Neurologie", "Oto-rhino-laryngologie", "Kinésithérapie"]
CITIES = ["Lyon", "Saint-Étienne", "Besançon", "Orléans", "Nîmes", "Paris", "Marseille", "Toulouse", "Nice",
          "Nantes", "Strasbourg", "Montpellier", "Bordeaux", "Lille", "Rennes", "Reims", "Le Havre", "Toulon",
          "Grenoble", "Dijon", "Angers", "Villeurbanne", "Clermont-Ferrand", "Aix-en-Provence", "Brest", "Limoges",
          "Tours", "Amiens", "Perpignan", "Metz", "Béziers", "Chambéry", "Évry", "Créteil", "Pessac", "Vénissieux"]


def details(n: int) -> dict:
    r = random.Random(n)
    return dict(name=f"Dr {r.choice(FIRST)} {r.choice(LAST)}", specialty=r.choice(SPECIALTIES),
                city=r.choice(CITIES), rpps=f"1{n:010d}", addresses=(f"https://198.51.100.{n % 250}:8443",))


def sign_range(args: tuple[int, int, int]) -> list[bytes]:
    start, stop, now_ms = args
    out = []
    for n in range(start, stop):
        seed = hashlib.sha256(b"bench-sign%d" % n).digest()
        ident = Identity(seed, [hashlib.sha256(b"bench-enc%d" % n).digest()])
        out.append(ident.descriptor(**details(n), seq=1, now_ms=now_ms).signed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class Proc:
    def __init__(self, data: Path, peers: list[str] = (), port: int | None = None) -> None:
        self.data, self.port = data, port or free_port()
        self.log = data.parent / f"{data.name}.log"
        cmd = [sys.executable, "-m", "bootstrap", "--listen", f"127.0.0.1:{self.port}", "--data", str(data),
               "--new-per-block", "1000000", "--new-total", "1000000",
               "--read-rate", "1000000", "--read-burst", "1000000", "--announce-rate", "1000000",
               "--announce-burst", "1000000", "--sync-interval", "0.05"]
        for p in peers:
            cmd += ["--peer", p]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> "Proc":
        deadline = time.monotonic() + 60
        while f"listening on {self.url}" not in self.log.read_text("utf-8", "replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"bootstrap did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        return self

    def memory(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) // 1024
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


# --- part 1: one bootstrap, many descriptors ----------------------------------------------

def make_descriptors(count: int, now_ms: int) -> list[bytes]:
    step = 2000
    jobs = [(i, min(i + step, count), now_ms) for i in range(0, count, step)]
    with multiprocessing.Pool() as pool:
        return [raw for chunk in pool.imap(sign_range, jobs) for raw in chunk]


def queries(count: int, rng: random.Random, n_desc: int) -> list[str]:
    kinds = [
        lambda: rng.choice(CITIES),
        lambda: f"{rng.choice(SPECIALTIES)} {rng.choice(CITIES)}",
        lambda: rng.choice(LAST),
        lambda: rng.choice(LAST)[:4],
        lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)} {rng.choice(CITIES)}",
        lambda: f"1{rng.randrange(n_desc):010d}",
        lambda: rng.choice(SPECIALTIES).split()[0][:3],
        lambda: "dr",
        lambda: "zzzz nowhere",
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


async def timed(fn, items) -> tuple[list[float], list]:
    times, results = [], []
    for item in items:
        t = time.perf_counter()
        results.append(await fn(item))
        times.append(time.perf_counter() - t)
    return times, results


async def bench_search(url: str, n_desc: int, n_queries: int, node_ids: list[str]) -> dict:
    rng = random.Random(7)
    qs = queries(n_queries, rng, n_desc)
    async with aiohttp.ClientSession() as s:
        async def raw_search(q: str) -> int:
            async with s.get(url + "/v1/search", params={"q": q}) as resp:
                assert resp.status == 200
                return len(await resp.read())

        await directory.search(s, url, "warm up")
        raw_times, _ = await timed(raw_search, qs)
        search_times, results = await timed(lambda q: directory.search(s, url, q), qs)
        ids = [rng.choice(node_ids) for _ in range(n_queries)]
        lookup_times, found = await timed(lambda i: directory.lookup(s, url, i), ids)
    assert all(found), "a lookup failed"
    return {"raw": raw_times, "search": search_times, "hits": [len(r) for r in results], "lookup": lookup_times}


async def catch_up(source: Proc, folder: Path, count: int) -> float:
    t = time.perf_counter()
    peer = Proc(folder / "catchup", [source.url]).ready()
    async with aiohttp.ClientSession() as s:
        while True:
            page = await directory.sync_page(s, peer.url, count - 1, limit=10)
            if page.last >= count:
                break
            await asyncio.sleep(0.2)
    took = time.perf_counter() - t
    peer.stop()
    return took


def part1(a, folder: Path) -> None:
    print(f"== 1. one bootstrap, {a.descriptors:,} descriptors ==")
    now_ms = directory.now_ms()
    t = time.perf_counter()
    raws = make_descriptors(a.descriptors, now_ms)
    print(f"signed {len(raws):,} descriptors in {time.perf_counter() - t:.1f} s "
          f"({multiprocessing.cpu_count()} processes)")
    data = folder / "big"
    data.mkdir()
    db = storage.connect(data / storage.DBFILE)
    t = time.perf_counter()
    for i in range(0, len(raws), 5000):
        result = storage.put_many(db, raws[i:i + 5000], now_ms)
        assert result.refused == 0
    load = time.perf_counter() - t
    db.conn.close()
    size = sum(p.stat().st_size for p in data.iterdir()) / 2**20
    print(f"verified and stored in {load:.1f} s ({len(raws) / load:,.0f}/s); database {size:.0f} MiB")
    node_ids = [directory.verified(r).node_id for r in random.Random(1).sample(raws, 200)]
    del raws

    proc = Proc(data).ready()
    try:
        r = asyncio.run(bench_search(proc.url, a.descriptors, a.queries, node_ids))
        mem = proc.memory()
        s99, s50 = pct(r["raw"], 99), pct(r["raw"], 50)
        print(f"search  ({len(r['raw'])} queries over HTTP, {sum(r['hits']) / len(r['hits']):.0f} hits on average)"
              f": p50 {ms(s50)}  p99 {ms(s99)}  max {ms(max(r['raw']))}   target p99 < 50 ms: "
              f"{'OK' if s99 < 0.050 else 'MISSED'}")
        print(f"search with the client verifying every result (directory.search): p50 {ms(pct(r['search'], 50))}  "
              f"p99 {ms(pct(r['search'], 99))}")
        print(f"lookup  ({len(r['lookup'])} by node ID): p50 {ms(pct(r['lookup'], 50))}  p99 {ms(pct(r['lookup'], 99))}")
        print(f"server memory: VmHWM {mem['VmHWM']} MiB, VmRSS {mem['VmRSS']} MiB   target < 300 MiB: "
              f"{'OK' if mem['VmHWM'] < 300 else 'MISSED'}")
        if a.catch_up:
            took = asyncio.run(catch_up(proc, folder, a.descriptors))
            print(f"a fresh peer copied all {a.descriptors:,} through /v1/sync in {took:.1f} s")
    finally:
        proc.stop()


# --- part 2: three bootstraps, 200 nodes ----------------------------------------------------

async def part2_async(boots: list[Proc], n_nodes: int, rounds: int) -> None:
    urls = [b.url for b in boots]
    now_ms = directory.now_ms()
    idents = [Identity(hashlib.sha256(b"net-sign%d" % n).digest(), [hashlib.sha256(b"net-enc%d" % n).digest()])
              for n in range(n_nodes)]
    descs = [i.descriptor(**details(10_000_000 + n), seq=1, now_ms=now_ms) for n, i in enumerate(idents)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def count(url: str) -> int:
            last, page = 0, None
            while page is None or page.more:
                page = await directory.sync_page(s, url, last, limit=1000)
                last = page.last
            return last

        t = time.perf_counter()
        await asyncio.gather(*(directory.announce(s, urls[n % 3], d.signed) for n, d in enumerate(descs)))
        while min([await count(u) for u in urls]) < n_nodes:
            await asyncio.sleep(0.01)
        print(f"{n_nodes} nodes announced (each to one of 3 bootstraps) and on all 3 after "
              f"{ms(time.perf_counter() - t)}")

        spread = []
        for r in range(rounds):
            n = r % n_nodes
            d = idents[n].descriptor(**details(10_000_000 + n), seq=2 + r, now_ms=now_ms)
            origin = r % 3
            others = [u for i, u in enumerate(urls) if i != origin]
            t = time.perf_counter()
            await directory.announce(s, urls[origin], d.signed)
            pending = set(others)
            while pending:
                for u in list(pending):
                    got = await directory.lookup(s, u, d.node_id)
                    if got is not None and got.seq == d.seq:
                        pending.discard(u)
            spread.append(time.perf_counter() - t)
        print(f"a new descriptor reached the other 2 bootstraps ({rounds} rounds): p50 {ms(pct(spread, 50))}  "
              f"p99 {ms(pct(spread, 99))}  max {ms(max(spread))}")

        rng = random.Random(3)
        picks = [(rng.choice(urls), rng.choice(descs).node_id) for _ in range(2000)]
        one, found = await timed(lambda p: directory.lookup(s, p[0], p[1]), picks)
        assert all(found)
        any_, found = await timed(lambda p: directory.lookup_any(urls, p[1], session=s), picks[:1000])
        assert all(found)
        print(f"lookup, one bootstrap ({len(one)}): p50 {ms(pct(one, 50))}  p99 {ms(pct(one, 99))}")
        print(f"lookup_any over 3 ({len(any_)}): p50 {ms(pct(any_, 50))}  p99 {ms(pct(any_, 99))}")

        # 200 nodes each look up 5 others at once, spread over the 3 bootstraps.
        async def node_lookups(n: int) -> list[float]:
            out = []
            for k in range(5):
                target = descs[(n * 7 + k * 13 + 1) % n_nodes].node_id
                t = time.perf_counter()
                assert await directory.lookup(s, urls[(n + k) % 3], target) is not None
                out.append(time.perf_counter() - t)
            return out
        t = time.perf_counter()
        burst = [x for lst in await asyncio.gather(*(node_lookups(n) for n in range(n_nodes))) for x in lst]
        took = time.perf_counter() - t
        print(f"{n_nodes} nodes x 5 concurrent lookups (one client process verifying all): "
              f"{len(burst) / took:,.0f} lookups/s, "
              f"p50 {ms(pct(burst, 50))}  p99 {ms(pct(burst, 99))}")


def part2(a, folder: Path) -> None:
    print(f"\n== 2. three peered bootstraps, {a.nodes} in-process nodes ==")
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    boots = [Proc(folder / f"net{i}", [u for u in urls if u != urls[i]], port=ports[i]) for i in range(3)]
    try:
        for b in boots:
            b.ready()
        asyncio.run(part2_async(boots, a.nodes, a.rounds))
        print("server memory: " + ", ".join(f"{b.memory()['VmHWM']} MiB" for b in boots) + " (VmHWM)")
    finally:
        for b in boots:
            b.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--descriptors", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--rounds", type=int, default=100, help="new descriptors timed across the 3 bootstraps")
    p.add_argument("--catch-up", action="store_true", help="also time a fresh peer copying everything")
    p.add_argument("--skip-1", action="store_true")
    p.add_argument("--skip-2", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
        if not a.skip_1:
            part1(a, Path(tmp))
        if not a.skip_2:
            part2(a, Path(tmp))


if __name__ == "__main__":
    main()
