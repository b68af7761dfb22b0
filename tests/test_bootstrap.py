"""Bootstrap servers: real `python -m bootstrap` processes peered on loopback, the
directory client helpers (node/transport/directory.py) against honest and lying
bootstraps, and the storage rules underneath (verification, rollback, search)."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap import storage
from bootstrap.ratelimit import RateLimiter, client_key
from conftest import ROOT, base_env, free_port
from node.core import wire
from node.core.errors import InvalidSignature, PeerRefused, PeerUnreachable, RemoteProtocolError, UsageError
from node.core.identity import MAX_DESCRIPTOR, Descriptor, Identity
from node.transport import directory

DAY = 86_400_000
FIRST = ["Hélène", "Jean", "Zoé", "François", "Anaïs", "Loïc", "Cécile", "Jérôme", "Maëlle", "Noël"]
LAST = ["Lefèbvre", "Durand", "Nguyen", "Müller", "Garçon", "Moreau", "Benoît", "Faure", "Rousseau", "Caron"]
SPECIALTIES = ["Cardiologie", "Médecine générale", "Pédiatrie", "Dermatologie"]
CITIES = ["Lyon", "Saint-Étienne", "Besançon", "Orléans", "Nîmes"]


def now() -> int:
    return int(time.time() * 1000)


T0 = now()          # every descriptor made here is issued at T0, so the same call gives the same bytes


def ident(n: int) -> Identity:
    return Identity(hashlib.sha256(b"bootstrap-sign%d" % n).digest(), [hashlib.sha256(b"bootstrap-enc%d" % n).digest()])


def details(n: int) -> dict:
    return dict(name=f"Dr {FIRST[n % 10]} {LAST[(n * 3) % 10]}", specialty=SPECIALTIES[n % 4], city=CITIES[n % 5],
                rpps=f"10{n:09d}", addresses=(f"http://192.0.2.{n % 250}:8443",))


def desc(n: int, seq: int = 1, at: int | None = None, **changes) -> Descriptor:
    return ident(n).descriptor(**(details(n) | changes), seq=seq, now_ms=T0 if at is None else at)


def resign(d: Descriptor, signer: Identity, **changes) -> bytes:
    """d's body (optionally changed), signed by `signer`: a forgery unless signer is d's key."""
    body = wire.unpack(wire.unpack(d.signed)["body"]) | changes
    raw = wire.pack(body)
    return wire.pack({"body": raw, "sig": signer.sign("descriptor", raw)})


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


def altered_name(d: Descriptor) -> bytes:
    at = d.signed.index(d.name.encode()) + 1         # "Dr" -> "Ds": still valid msgpack
    return flip(d.signed, at)


async def until(check, what: str, timeout: float = 15.0):
    """Poll `check()` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- real bootstrap processes ---------------------------------------------------------

@dataclass
class BootProc:
    data: Path
    port: int
    peers: list[str] = field(default_factory=list)
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    log_from: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logfile(self) -> Path:
        return self.data.parent / f"{self.data.name}.log"

    def launch(self) -> "BootProc":
        cmd = [sys.executable, "-m", "bootstrap", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.data),
               "--sync-interval", "0.1", *self.args]
        for p in self.peers:
            cmd += ["--peer", p]
        self.log_from = len(self.log())
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 20) -> "BootProc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"listening on {self.url}" in self.log()[self.log_from:]:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"bootstrap on {self.port} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.logfile.read_text("utf-8", "replace") if self.logfile.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code


def start_cluster(folder: Path, n: int, *args: str) -> list[BootProc]:
    """n bootstraps, each peered with all the others, started in parallel."""
    ports = [free_port() for _ in range(n)]
    boots = [BootProc(folder / f"boot{i}", ports[i], [f"http://127.0.0.1:{p}" for p in ports if p != ports[i]], args)
             for i in range(n)]
    for b in boots:
        b.launch()
    return [b.wait_ready() for b in boots]


def stop_all(boots: list[BootProc]) -> None:
    codes = [b.stop() for b in boots if b.proc is not None]
    assert codes == [0] * len(codes), "\n".join(b.log() for b in boots)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    boots = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    yield boots
    stop_all(boots)


async def announce_nodes(boots: list[BootProc], numbers: range) -> list[Descriptor]:
    """Node n announces to bootstrap n % len(boots)."""
    made = [desc(n) for n in numbers]
    async with aiohttp.ClientSession() as s:
        for i, d in enumerate(made):
            answer = await directory.announce(s, boots[i % len(boots)].url, d.signed)
            assert answer == {"status": "stored", "node_id": d.node_id, "seq": 1}
    return made


async def wait_everywhere(boots: list[BootProc], made: list[Descriptor], timeout: float = 15.0) -> None:
    missing = {(b.url, d.node_id) for b in boots for d in made}
    async with aiohttp.ClientSession() as s:
        async def check() -> bool:
            for url, node_id in sorted(missing):
                if await directory.lookup(s, url, node_id) is not None:
                    missing.discard((url, node_id))
            return not missing
        await until(check, f"replication ({len(missing)} copies missing)", timeout)


@pytest.fixture(scope="module")
def nodes(cluster) -> list[Descriptor]:
    made = asyncio.run(announce_nodes(cluster, range(20)))
    asyncio.run(wait_everywhere(cluster, made))
    return made


async def test_every_node_is_found_by_id_on_every_server(cluster, nodes):
    urls = [b.url for b in cluster]
    async with aiohttp.ClientSession() as s:
        for d in nodes:
            for url in urls:
                got = await directory.lookup(s, url, d.node_id.lower().replace("-", ""))
                assert got == d and got.signed == d.signed
            assert await directory.lookup_any(urls, d.node_id, session=s) == d
        assert await directory.lookup(s, urls[0], ident(999).node_id) is None
        assert await directory.lookup_any(urls, ident(999).node_id, session=s) is None
        with pytest.raises(UsageError, match="not a node ID"):
            await directory.lookup(s, urls[0], "ABCD-EFGH")


async def test_search_by_name_specialty_city_and_rpps(cluster, nodes):
    by = lambda pred: {d.node_id for d in nodes if pred(d)}  # noqa: E731
    cases = {
        "cardiologie": by(lambda d: d.specialty == "Cardiologie"),
        "MEDECINE generale": by(lambda d: d.specialty == "Médecine générale"),
        "saint-etienne": by(lambda d: d.city == "Saint-Étienne"),
        "SAINT ÉTIENNE": by(lambda d: d.city == "Saint-Étienne"),
        "helene": by(lambda d: "Hélène" in d.name),
        "lefeb": by(lambda d: "Lefèbvre" in d.name),             # word prefixes match
        "pédiatrie besancon": by(lambda d: d.specialty == "Pédiatrie" and d.city == "Besançon"),
        "cardiologie lyon": by(lambda d: d.specialty == "Cardiologie" and d.city == "Lyon"),
        nodes[7].rpps: {nodes[7].node_id},
        "dr": {d.node_id for d in nodes},
        "cardiologie nulle-part": set(),
        "ardiologie": set(),                                      # inside a word: no
    }
    assert all(cases[q] for q in ("cardiologie", "saint-etienne", "helene", "cardiologie lyon"))
    ours = {d.node_id for d in nodes}       # other tests announce other nodes to the same cluster
    async with aiohttp.ClientSession() as s:
        for b in cluster:
            for query, expected in cases.items():
                found = await directory.search(s, b.url, query)
                assert {d.node_id for d in found} & ours == expected, (b.url, query)
                assert all(d in nodes for d in found if d.node_id in ours)
        merged = [d for d in await directory.search_any([b.url for b in cluster], "lyon", session=s) if d in nodes]
        assert {d.node_id for d in merged} == by(lambda d: d.city == "Lyon")
        assert [d.name.casefold() for d in merged] == sorted(d.name.casefold() for d in merged)
        for bad in ("", "  -- ", "x" * 300, "a b c d e f g h i"):
            with pytest.raises(PeerRefused) as err:
                await directory.search(s, cluster[0].url, bad)
            assert err.value.status == 400


async def post(s: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict]:
    async with s.post(url + "/v1/announce", data=body) as resp:
        return resp.status, wire.unpack(await resp.read())


async def test_server_refuses_forged_altered_expired_and_rolled_back(cluster):
    x = desc(100, seq=5)
    a, b = cluster[0].url, cluster[1].url
    async with aiohttp.ClientSession() as s:
        assert await post(s, a, x.signed) == (200, {"status": "stored", "node_id": x.node_id, "seq": 5})
        assert await post(s, a, x.signed) == (200, {"status": "unchanged", "node_id": x.node_id, "seq": 5})
        refusals = [
            (resign(x, ident(101), name="Dr Mallory", seq=6), 422, "signature"),      # forged
            (altered_name(x), 422, "signature"),                                       # altered body
            (flip(x.signed, len(x.signed) - 1), 422, "signature"),                     # altered signature
            (desc(100, seq=6, at=now() - 400 * DAY).signed, 422, "expired"),
            (desc(100, seq=4).signed, 409, "older"),                                   # rollback
        ]
        for raw, status, message in refusals:
            got_status, body = await post(s, a, raw)
            assert got_status == status and message in body["error"], body

        async def replicated():
            return await directory.lookup(s, b, x.node_id)
        assert (await until(replicated, "x on the second bootstrap")).signed == x.signed
        status, body = await post(s, b, desc(100, seq=3).signed)                      # rollback on a peer too
        assert status == 409
        for boot in cluster:
            assert (await directory.lookup(s, boot.url, x.node_id)).signed == x.signed
        assert await directory.search(s, a, "mallory") == []

        # The client helper refuses to send what the server would refuse, and reports refusals.
        with pytest.raises(InvalidSignature):
            await directory.announce(s, a, resign(x, ident(101), seq=7))
        with pytest.raises(RemoteProtocolError, match="expired"):
            await directory.announce(s, a, desc(100, seq=7, at=now() - 400 * DAY).signed)
        with pytest.raises(PeerRefused, match="older") as err:
            await directory.announce(s, a, desc(100, seq=2).signed)
        assert err.value.status == 409

        newer = desc(100, seq=6)
        assert (await directory.announce(s, b, newer.signed))["status"] == "stored"

        async def updated():
            got = await directory.lookup(s, cluster[2].url, x.node_id)
            return got is not None and got.seq == 6
        await until(updated, "seq 6 on the third bootstrap")


class LyingBootstrap:
    """An in-process bootstrap that answers whatever the test tells it to."""

    def __init__(self) -> None:
        self.nodes: dict[str, bytes] = {}
        self.results: list = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "LyingBootstrap":
        app = web.Application()

        async def node(request):
            raw = self.nodes.get(request.match_info["node_id"])
            return web.Response(body=raw, status=200) if raw is not None else web.Response(status=404)

        async def search(request):
            return web.Response(body=wire.pack({"items": self.results}))

        app.router.add_get("/v1/nodes/{node_id}", node)
        app.router.add_get("/v1/search", search)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


async def test_client_helpers_refuse_what_a_lying_bootstrap_serves(cluster, nodes):
    liar = await LyingBootstrap().start()
    good = nodes[3]
    y_new = desc(200, seq=3)
    honest = [b.url for b in cluster]
    try:
        async with aiohttp.ClientSession() as s:
            await directory.announce(s, honest[0], y_new.signed)
            forged = resign(good, ident(4), name="Dr Mallory")
            lies = [
                (forged, InvalidSignature),
                (altered_name(good), InvalidSignature),
                (flip(good.signed, len(good.signed) - 1), InvalidSignature),
                (b"\xc1garbage", RemoteProtocolError),
                (nodes[4].signed, RemoteProtocolError),                          # another node's descriptor
                (desc(3, at=now() - 400 * DAY).signed, RemoteProtocolError),      # expired
            ]
            for raw, error in lies:
                liar.nodes[good.node_id] = raw
                with pytest.raises(error):
                    await directory.lookup(s, liar.url, good.node_id)
                # Another bootstrap answering honestly wins; alone, the liar's answer is an error.
                assert await directory.lookup_any([liar.url, *honest], good.node_id, session=s) == good
                with pytest.raises(error):
                    await directory.lookup_any([liar.url], good.node_id, session=s)

            # Rollback: the liar serves an older, validly signed descriptor.
            liar.nodes[y_new.node_id] = desc(200, seq=2).signed
            with pytest.raises(RemoteProtocolError, match="older"):
                await directory.lookup(s, liar.url, y_new.node_id, min_seq=3)
            assert (await directory.lookup(s, liar.url, y_new.node_id)).seq == 2
            assert (await until(lambda: directory.lookup_any([liar.url, *honest], y_new.node_id, session=s),
                                "y on the honest bootstraps")).seq == 3

            liar.results = [forged, altered_name(good), desc(5, at=now() - 400 * DAY).signed, b"\xc1", 5,
                            nodes[6].signed, desc(200, seq=2).signed, y_new.signed]
            found = await directory.search(s, liar.url, "anything")
            assert sorted((d.node_id, d.seq) for d in found) == sorted([(nodes[6].node_id, 1), (y_new.node_id, 3)])

            liar.results = [desc(n).signed for n in range(500, 700)]        # ~80 KB: read in several pieces
            assert len(await directory.search(s, liar.url, "many")) == 200

            dead = f"http://127.0.0.1:{free_port()}"
            with pytest.raises(PeerUnreachable):
                await directory.lookup(s, dead, good.node_id)
            assert await directory.lookup_any([dead, honest[1]], good.node_id, session=s) == good
            assert [d.node_id for d in await directory.search_any([dead, honest[2]], nodes[7].rpps, session=s)] \
                == [nodes[7].node_id]
            with pytest.raises(PeerUnreachable):
                await directory.lookup_any([dead, dead + "/"], good.node_id, session=s)
    finally:
        await liar.stop()


async def test_losing_a_bootstrap_the_others_answer_and_replicate(tmp_path):
    boots = start_cluster(tmp_path, 3)
    try:
        first = await announce_nodes(boots, range(300, 306))
        await wait_everywhere(boots, first)
        assert boots[2].stop(signal.SIGKILL) == -signal.SIGKILL
        alive = boots[:2]
        later = await announce_nodes(alive, range(306, 312))
        await wait_everywhere(alive, first + later)
        async with aiohttp.ClientSession() as s:
            assert await directory.lookup_any([b.url for b in boots], later[0].node_id, session=s) == later[0]
            assert {d.node_id for d in await directory.search_any([b.url for b in boots], "dr", session=s)} \
                >= {d.node_id for d in first + later}
        boots[2].launch().wait_ready()          # comes back on its old data and catches up
        await wait_everywhere(boots, first + later)
    finally:
        stop_all(boots)


async def test_a_new_bootstrap_copies_a_whole_directory_page_by_page(tmp_path):
    """1,200 descriptors (three sync pages) loaded into one bootstrap; a new peer of it copies them all."""
    made = [desc(n).signed for n in range(1000, 2200)]
    db = storage.connect(tmp_path / "big")
    assert len(storage.put_many(db, made, now()).stored) == 1200
    db.close()
    (tmp_path / "old").mkdir()
    (tmp_path / "big").rename(tmp_path / "old" / storage.DBFILE)
    old = BootProc(tmp_path / "old", free_port()).launch().wait_ready()
    new = BootProc(tmp_path / "new", free_port(), [old.url]).launch().wait_ready()
    try:
        async with aiohttp.ClientSession() as s:
            async def copied() -> bool:
                return (await directory.sync_page(s, new.url, 1199, limit=1)).last == 1200
            await until(copied, "the copy of 1,200 descriptors")
            assert (await directory.lookup(s, new.url, desc(2199).node_id)).signed == made[-1]
    finally:
        stop_all([old, new])


async def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(tmp_path):
    boot = start_cluster(tmp_path, 1)[0]
    url, d = boot.url, desc(400)
    try:
        async with aiohttp.ClientSession() as s:
            assert (await post(s, url, d.signed))[0] == 200
            for body, status, message in [
                (b"\x00" * (MAX_DESCRIPTOR + 1), 413, "too large"),
                (b"\xc1", 400, "malformed"),
                (b"\x92\x01", 400, "malformed"),                              # truncated array
                (b"\x82\xa1b\x01\xa1a\x02", 400, "malformed"),                  # keys not in canonical order
                (wire.pack({"x": 1}), 400, "unknown field"),
                (wire.pack({"body": wire.pack(5), "sig": bytes(64)}), 400, "descriptor: "),
                (b"", 400, "empty body"),
            ]:
                got, answer = await post(s, url, body)
                assert got == status and message in answer["error"], (body[:10], got, answer)
            for path, status, message in [
                ("/v1/nodes/NOT-AN-ID", 400, "not a node ID"),
                (f"/v1/nodes/{ident(401).node_id}", 404, "no descriptor"),
                ("/v1/sync?since=x", 400, "since must be an integer"),
                ("/v1/sync?limit=0", 400, "limit must be between"),
                ("/v1/sync?wait=99", 400, "wait must be between"),
                ("/v1/search?q=" + "a" * 201, 400, "over 200 characters"),
                ("/v1/nope", 404, "not found"),
            ]:
                async with s.get(url + path) as resp:
                    assert resp.status == status and message in wire.unpack(await resp.read())["error"], path

            page = await directory.sync_page(s, url, 0)
            assert page.items == [d.signed] and page.last == 1 and not page.more and len(page.db) == 16

            # A flood from one address: past the burst, 429s; the server itself is fine.
            statuses = await asyncio.gather(*(post(s, url, d.signed) for _ in range(150)))
            codes = [c for c, _ in statuses]
            assert codes.count(429) > 0 and codes.count(200) >= 20 and set(codes) == {200, 429}
            assert await directory.lookup(s, url, d.node_id) == d

            async def get_status() -> int:
                async with s.get(f"{url}/v1/nodes/{d.node_id}") as resp:
                    return resp.status
            reads = await asyncio.gather(*(get_status() for _ in range(1000)))
            assert reads.count(429) > 0 and reads.count(200) >= 300
            async def lookup_when_refilled() -> Descriptor | None:
                try:
                    return await directory.lookup(s, url, d.node_id)
                except PeerRefused as err:
                    assert err.status == 429
                    return None
            assert await until(lookup_when_refilled, "a lookup after the flood") == d
        assert boot.stop(signal.SIGINT) == 0
        assert "bootstrap stopped" in boot.log() and "Traceback" not in boot.log()
    finally:
        if boot.proc is not None:
            boot.stop(signal.SIGKILL)


def test_bad_arguments_are_one_line(tmp_path):
    for args, message in [(["--listen", "nowhere", "--data", str(tmp_path)], "HOST:PORT"),
                          (["--listen", "127.0.0.1:0", "--data", str(tmp_path), "--peer", "ftp://x"], "http://")]:
        proc = subprocess.run([sys.executable, "-m", "bootstrap", *args], cwd=ROOT, env=base_env(),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


# --- storage rules, without a server ------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    db = storage.connect(tmp_path / storage.DBFILE)
    yield db
    db.conn.close()


def test_normalise():
    assert storage.normalise("Saint-Étienne") == "saint etienne"
    assert storage.normalise("  CŒUR, Müller_Straße ") == "coeur muller strasse"
    assert storage.normalise("Dr Zoé N'Guyen (10012345678)") == "dr zoe n guyen 10012345678"
    assert storage.match_expression("Médecine  générale") == '"medecine"* "generale"*'
    for bad in ("", " -*- ", '"', "x" * 201, "a b c d e f g h i"):
        with pytest.raises(UsageError):
            storage.match_expression(bad)


def test_store_rules(db):
    t = now()
    assert storage.put(db, desc(1, seq=2).signed, t).changed
    assert not storage.put(db, desc(1, seq=2).signed, t).changed
    with pytest.raises(storage.Rollback):
        storage.put(db, desc(1, seq=1).signed, t)
    with pytest.raises(storage.Expired, match="expired"):
        storage.put(db, desc(1, seq=3, at=t - 400 * DAY).signed, t)
    with pytest.raises(storage.Expired, match="too far"):
        storage.put(db, desc(1, seq=3, at=t + 100 * DAY).signed, t)
    with pytest.raises(InvalidSignature):
        storage.put(db, resign(desc(1, seq=3), ident(2)), t)
    assert storage.get(db, desc(1).node_id, t) == desc(1, seq=2).signed
    # A newer descriptor replaces the old one in the search index too.
    storage.put(db, desc(1, seq=3, city="Grenoble").signed, t)
    assert storage.search(db, "grenoble", t) == [desc(1, seq=3, city="Grenoble").signed]
    assert storage.search(db, desc(1).city, t) == []
    # Expired: no longer served, then purged to a tombstone that still refuses a rollback.
    later = t + 366 * DAY
    assert storage.get(db, desc(1).node_id, later) is None and storage.search(db, "grenoble", later) == []
    assert storage.purge(db, t + 400 * DAY) == 1
    assert storage.get(db, desc(1).node_id, t) is None
    with pytest.raises(storage.Rollback):
        storage.put(db, desc(1, seq=2).signed, t)


def test_search_limit_and_prefixes(db):
    t = now()
    result = storage.put_many(db, [desc(n, name=f"Dr Martin {n}", city="Lyon").signed for n in range(60)]
                              + [b"\xc1", resign(desc(61), ident(62))], t)
    assert len(result.stored) == 60 and result.refused == 2
    assert len(storage.search(db, "martin lyon", t)) == 50
    assert len(storage.search(db, "mart ly", t)) == 50
    assert [Descriptor.from_wire(r).name for r in storage.search(db, "martin 7", t)] == ["Dr Martin 7"]
    assert storage.count(db, t) == 60


def test_changes_pages(db):
    t = now()
    raws = [desc(n).signed for n in range(10)]
    storage.put_many(db, raws, t)
    page = storage.changes(db, 0, 4, t)
    assert page.items == raws[:4] and page.last == 4 and page.more
    page = storage.changes(db, 8, 4, t)
    assert page.items == raws[8:] and page.last == 10 and not page.more
    assert storage.changes(db, 10, 4, t) == storage.Page([], 10, False)
    storage.put(db, desc(3, seq=2).signed, t)                     # an update moves to the end
    assert storage.changes(db, 10, 4, t).items == [desc(3, seq=2).signed]
    # Expired rows are skipped but the cursor still moves past them.
    page = storage.changes(db, 0, 100, t + 366 * DAY)
    assert page.items == [] and page.last == 11


def test_equal_seq_conflict_settles_the_same_everywhere(tmp_path):
    """A node that signs two different descriptors with one seq: every bootstrap keeps the same one."""
    t = now()
    one, two = desc(1, seq=4).signed, desc(1, seq=4, city="Grenoble").signed
    kept = []
    for i, order in enumerate(([one, two], [two, one])):
        db = storage.connect(tmp_path / f"{i}.db")
        for raw in order:
            storage.put(db, raw, t)
        kept.append(storage.get(db, desc(1).node_id, t))
        db.conn.close()
    assert kept[0] == kept[1]


SAMPLE = [desc(n, seq=s, city=c).signed for n in range(3) for s in (1, 2) for c in ("Lyon", "Nice")]


@settings(max_examples=30, deadline=None)
@given(st.permutations(SAMPLE))
def test_any_arrival_order_converges(order):
    db = storage.connect(Path(":memory:"))
    t = now()
    for raw in order:
        try:
            storage.put(db, raw, t)
        except storage.Rollback:
            pass
    got = [storage.get(db, desc(n).node_id, t) for n in range(3)]
    reference = storage.connect(Path(":memory:"))
    storage.put_many(reference, SAMPLE, t)
    assert got == [storage.get(reference, desc(n).node_id, t) for n in range(3)]
    assert all(Descriptor.from_wire(g).seq == 2 for g in got)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_any_query_is_a_result_or_a_usage_error(db, query):
    try:
        assert isinstance(storage.search(db, query, now()), list)
    except UsageError:
        pass


def test_rate_limiter():
    r = RateLimiter(rate=20, burst=40)
    assert sum(r.allow("a", 0.0) for _ in range(100)) == 40
    assert r.allow("b", 0.0)                                       # another client is not affected
    assert not r.allow("a", 0.01) and r.retry_after("a") > 0
    assert sum(r.allow("a", 1.0) for _ in range(100)) == 20        # refilled at 20/s
    assert client_key("192.0.2.7") == "192.0.2.7" and client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key(None) == "?"


# --- specialties under their usual forms ----------------------------------------------------

@pytest.mark.parametrize("specialty, queries", [
    ("Cardiologie", ["cardiologue lyon", "cardiology", "Cardiologist", "cardiologues Lyon", "cardio"]),
    ("cardiology", ["cardiologue", "cardiologie Lyon"]),
    ("Médecine générale", ["généraliste", "general practice", "medecin generaliste lyon", "GP"]),
    ("general practice", ["médecine générale", "generaliste Lyon"]),
    ("Pédiatrie", ["pédiatre", "pediatrician", "pédiatres lyon"]),
])
def test_specialties_are_found_under_their_usual_forms(db, specialty, queries):
    t = now()
    storage.put(db, desc(1, specialty=specialty, city="Lyon").signed, t)
    storage.put(db, desc(2, specialty="Dermatologie", city="Lyon").signed, t)
    for q in queries:
        assert storage.search(db, q, t) == [desc(1, specialty=specialty, city="Lyon").signed], q
    assert storage.search(db, "cardiologue Paris", t) == []
    assert [Descriptor.from_wire(r).specialty for r in storage.search(db, "dermatologue", t)] == ["Dermatologie"]


def test_an_index_from_before_the_synonyms_is_rebuilt_on_open(tmp_path):
    path = tmp_path / storage.DBFILE
    db = storage.connect(path)
    t = now()
    storage.put(db, desc(1, specialty="Cardiologie", city="Lyon").signed, t)
    # What schema 1 left: the plain normalised fields only, and the old schema number.
    old_text = storage.normalise(" ".join(("Dr X", "Cardiologie", "Lyon")))
    db.execute("DELETE FROM descriptors_fts")
    db.execute("INSERT INTO descriptors_fts (rowid, text) SELECT id, ? FROM descriptors", (old_text,))
    db.execute("UPDATE meta SET value = 1 WHERE key = 'schema'")
    assert storage.search(db, "cardiologue", t) == []
    db.conn.close()
    db = storage.connect(path)
    try:
        assert storage.search(db, "cardiologue lyon", t) == [desc(1, specialty="Cardiologie", city="Lyon").signed]
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == storage.SCHEMA_VERSION
    finally:
        db.conn.close()
