"""The bootstrap under abuse: a flood of invented practitioners is cut per address block and in
total while known identities still update; X-Forwarded-For is believed only from a configured
proxy; search results flag identities that claim another's RPPS number or name and city; the
data folder is private. Real servers on 127.0.0.1 (in-process and `python -m bootstrap`)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from bootstrap import Bootstrap, Limits, storage
from bootstrap.ratelimit import NewIdentityQuota, block_key, client_address, parse_proxies
from conftest import ROOT, base_env, free_port
from node.core import directory as codec
from node.core import wire
from node.core.errors import PeerRefused, UsageError
from node.transport import directory
from test_bootstrap import T0, BootProc, desc, ident, now, resign

MANY = dict(announce_rate=1000, announce_burst=1000)      # so that only the new-identity caps cut


@asynccontextmanager
async def running(folder: Path, trace: Path | None = None, **limits):
    b = Bootstrap(folder, "127.0.0.1", 0, limits=Limits(**(MANY | limits)), trace=trace)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


async def post(s: aiohttp.ClientSession, url: str, body: bytes, xff: str | None = None) -> tuple[int, dict, dict]:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    async with s.post(url + "/v1/announce", data=body, headers=headers) as resp:
        return resp.status, wire.unpack(await resp.read()), dict(resp.headers)


# --- the flood ------------------------------------------------------------------------------

async def test_a_flood_of_new_identities_is_cut_while_known_ones_still_update(tmp_path):
    async with running(tmp_path / "boot", new_per_block=5, new_total=1000) as b, aiohttp.ClientSession() as s:
        known = desc(5000)
        assert (await post(s, b.url, known.signed))[0] == 200
        flood = [desc(n, specialty="Cardiologie interventionnelle") for n in range(5001, 5041)]
        results = [await post(s, b.url, d.signed) for d in flood]
        assert [status for status, _, _ in results] == [200] * 4 + [429] * 36
        _, answer, headers = results[-1]
        assert "too many new identities" in answer["error"] and int(headers["Retry-After"]) >= 1
        assert await directory.lookup(s, b.url, flood[4].node_id) is None
        assert {d.node_id for d in await directory.search(s, b.url, "interventionnelle")} \
            == {d.node_id for d in flood[:4]}
        with pytest.raises(PeerRefused, match="too many new identities") as err:
            await directory.announce(s, b.url, desc(5100).signed)
        assert err.value.status == 429

        # Identities already known are not new: they update, and re-announce, as before.
        for d in (desc(5000, seq=2, city="Grenoble"), desc(5001, seq=2, city="Grenoble")):
            assert (await directory.announce(s, b.url, d.signed))["status"] == "stored"
        assert (await directory.announce(s, b.url, desc(5000, seq=2, city="Grenoble").signed))["status"] \
            == "unchanged"
        assert len(await directory.search(s, b.url, "grenoble")) == 2
        # A refused announce costs nothing: still refused, not stored, the server serves on.
        assert (await post(s, b.url, flood[20].signed))[0] == 429
        assert (await directory.lookup(s, b.url, known.node_id)).city == "Grenoble"


async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(tmp_path):
    async with running(tmp_path / "boot", new_per_block=3, new_total=1000) as b, aiohttp.ClientSession() as s:
        spoofed = ["198.51.100.1", "203.0.113.1", "192.0.2.1, 100.64.0.1"]
        for n, xff in enumerate(spoofed):
            assert (await post(s, b.url, desc(5200 + n).signed, xff))[0] == 200
        # All three counted against 127.0.0.0/24, whatever the header claimed.
        status, answer, _ = await post(s, b.url, desc(5203).signed, "100.64.9.9")
        assert status == 429 and "new identities" in answer["error"]


def test_x_forwarded_for_from_a_trusted_proxy_is_used(tmp_path):
    """`python -m bootstrap --trust-proxy 127.0.0.1`: the test plays a reverse proxy on loopback."""
    boot = BootProc(tmp_path / "boot", free_port(), args=(
        "--trust-proxy", "127.0.0.1", "--new-per-block", "3", "--new-total", "6",
        "--announce-burst", "1000")).launch().wait_ready()

    async def scenario() -> list[int]:
        steps = [
            ("198.51.100.7", 5300), ("198.51.100.8", 5301), ("198.51.100.9, 127.0.0.1", 5302),
            ("198.51.100.200", 5303),                 # 4th from 198.51.100.0/24: cut
            ("203.0.113.5", 5304),                    # another block: admitted
            ("not-an-address", 5305),                 # unreadable: counted as the proxy itself (127.0.0.1)
            ("10.1.1.1, 127.0.0.1, 127.0.0.1", 5306),
            ("192.0.2.44", 5307),                     # 6 admitted in all: the total cap cuts
            ("198.51.100.7", 5300),                   # known identity: never cut
        ]
        async with aiohttp.ClientSession() as s:
            return [(await post(s, boot.url, desc(n).signed, xff))[0] for xff, n in steps]

    try:
        assert asyncio.run(scenario()) == [200, 200, 200, 429, 200, 200, 200, 429, 200]
    finally:
        assert boot.stop() == 0
    assert "Traceback" not in boot.log()


def test_bad_abuse_options_are_one_line(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for args, message in [(["--trust-proxy", "proxy.example"], "--trust-proxy wants an IP address"),
                          (["--new-per-block", "0"], "at least 1"),
                          (["--new-period", "-5"], "positive")]:
        proc = subprocess.run([sys.executable, "-m", "bootstrap", "--listen", "127.0.0.1:0", "--data",
                               str(tmp_path / "d"), *args], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bootstrap", "--listen", "127.0.0.1:0", "--data", str(afile)],
                          cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "cannot use" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_client_address_block_key_and_quota_rules():
    proxies = parse_proxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert client_address("127.0.0.1", ["198.51.100.7"], ()) == "127.0.0.1"
    assert client_address("192.0.2.1", ["198.51.100.7"], proxies) == "192.0.2.1"        # not a proxy
    assert client_address("127.0.0.1", ["198.51.100.7"], proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", ["6.6.6.6, 198.51.100.7, 10.2.3.4"], proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", ["6.6.6.6", "198.51.100.7"], proxies) == "198.51.100.7"
    assert client_address("::1", ["2001:db8::5"], proxies) == "2001:db8::5"
    assert client_address("127.0.0.1", ["junk, 198.51.100.7"], proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", ["198.51.100.7, junk"], proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", [], proxies) == "127.0.0.1"
    assert block_key("198.51.100.7") == block_key("198.51.100.250") == "198.51.100.0/24" != block_key("198.51.101.7")
    assert block_key("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert block_key("2001:db8:1:2::1") == block_key("2001:db8:1:ff:aaaa::9") == "2001:db8:1::/56"
    assert block_key("2001:db8:1:100::1") != block_key("2001:db8:1:2::1")

    q = NewIdentityQuota(per_block=3, total=5, period=300)       # a block refills one every 100 s
    assert [q.admit("a", 0.0) == 0 for _ in range(4)] == [True, True, True, False]
    assert 1 <= q.admit("a", 0.0) <= 100
    assert q.admit("b", 0.0) == 0 and q.admit("b", 1.0) == 0
    assert q.admit("c", 2.0) > 0                                  # five in all: the total is spent
    assert q.admit("a", 101.0) == 0 and q.admit("a", 101.0) > 0    # one back after a third of the period
    with pytest.raises(ValueError):
        NewIdentityQuota(0, 5, 60)


async def test_a_descriptor_carrying_an_escape_sequence_is_refused(tmp_path):
    d = desc(5700)
    async with running(tmp_path / "boot") as b, aiohttp.ClientSession() as s:
        for field in ("name", "city"):
            raw = resign(d, ident(5700), **{field: "Dr \x1b]0;owned\x07 \u202eEvil"})
            status, answer, _ = await post(s, b.url, raw)
            assert status == 400 and f"field '{field}' contains a control character" in answer["error"]
        assert await directory.lookup(s, b.url, d.node_id) is None
        assert (await post(s, b.url, d.signed))[0] == 200


# --- duplicate claims --------------------------------------------------------------------------

REAL = dict(name="Dr Jean Durand", city="Lyon", rpps="10000005400")


async def test_search_flags_identities_claiming_the_same_rpps_or_name_and_city(tmp_path):
    real = desc(5400, **REAL)
    same_rpps = desc(5401, name="Dr Mallory Faux", city="Nice", rpps=REAL["rpps"])
    same_name = desc(5402, name="DR JEAN DURAND", city="lyon", rpps="10000005402")    # case and accents aside
    other_city = desc(5403, name="Dr Jean Durand", city="Grenoble", rpps="10000005403")
    async with running(tmp_path / "boot") as b, aiohttp.ClientSession() as s:
        for d in (real, same_rpps, same_name, other_city):
            assert (await directory.announce(s, b.url, d.signed))["status"] == "stored"
        flagged = {f.descriptor.node_id: f.conflict for f in await directory.search_flagged(s, b.url, "durand")}
        assert flagged == {real.node_id: ("same-name-city", "same-rpps"), same_name.node_id: ("same-name-city",),
                           other_city.node_id: ()}
        # The server looks in its whole directory, not only in the results: "mallory" finds the fake
        # alone, yet it is flagged, and the answer carries the flag beside the signed bytes.
        async with s.get(b.url + "/v1/search", params={"q": "mallory"}) as resp:
            assert wire.unpack(await resp.read()) == {"items": [same_rpps.signed], "conflicts": [["same-rpps"]]}
        merged = await directory.search_any_flagged([b.url], "mallory", session=s)
        assert [(f.descriptor, f.conflict) for f in merged] == [(same_rpps, ("same-rpps",))]
        assert await directory.search(s, b.url, "mallory") == [same_rpps]          # the plain helper is unchanged

        # A revoked identity claims nothing any more.
        revoked = ident(5401).descriptor(name="Dr Mallory Faux", city="Nice", rpps=REAL["rpps"], seq=2,
                                         now_ms=now(), revoked=True)
        assert (await directory.announce(s, b.url, revoked.signed))["status"] == "stored"
        flagged = {f.descriptor.node_id: f.conflict for f in await directory.search_flagged(s, b.url, "durand")}
        assert flagged[real.node_id] == ("same-name-city",)


def test_client_flags_conflicts_among_results_and_ignores_junk_flags():
    real, same_rpps, alone = desc(5400, **REAL), desc(5401, name="Dr Mallory", rpps=REAL["rpps"]), desc(5404)
    t = T0 + 1000
    # An older server (no "conflicts"): the client still sees the clash among what it got.
    old = codec.decode_search(wire.pack({"items": [real.signed, same_rpps.signed, alone.signed]}), "answer", now=t)
    assert {f.descriptor.node_id: f.conflict for f in old} == {
        real.node_id: ("same-rpps",), same_rpps.node_id: ("same-rpps",), alone.node_id: ()}
    # Unknown flags and a misaligned list are ignored; known flags are kept.
    junk = codec.decode_search(wire.pack({"items": [alone.signed], "conflicts": [["evil", 5, "same-name-city"]]}),
                               "answer", now=t)
    assert [f.conflict for f in junk] == [("same-name-city",)]
    misaligned = codec.decode_search(wire.pack({"items": [alone.signed], "conflicts": [[], ["same-rpps"]]}),
                                     "answer", now=t)
    assert [f.conflict for f in misaligned] == [()]
    # Merging two bootstraps' answers keeps the highest seq and every flag raised about a node.
    newer = desc(5404, seq=2)
    merged = codec.merge([codec.Found(alone, ("same-rpps",)), codec.Found(newer, ())])
    assert [(f.descriptor.seq, f.conflict) for f in merged] == [(2, ("same-rpps",))]


def test_storage_conflicts_ignore_expired_identities(tmp_path):
    db = storage.connect(tmp_path / storage.DBFILE)
    t, day = now(), 86_400_000
    real = desc(5400, at=t, **REAL)
    storage.put(db, real.signed, t)
    storage.put(db, desc(5405, name="Dr Copy", city="Nice", rpps=REAL["rpps"], at=t - 300 * day).signed, t)
    assert storage.search_flagged(db, "durand", t) == ([real.signed], [["same-rpps"]])
    assert storage.search_flagged(db, "durand", t + 66 * day) == ([real.signed], [[]])     # the copy expired
    db.conn.close()


# --- a private data folder ------------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_folder_is_0700_and_its_files_0600(tmp_path):
    old_umask = os.umask(0o022)
    try:
        folder = tmp_path / "boot"
        folder.mkdir(mode=0o755)
        trace = folder / "trace.bin"
        async with running(folder, trace=trace) as b, aiohttp.ClientSession() as s:
            await directory.announce(s, b.url, desc(5500).signed)
            await directory.search(s, b.url, "dr")
            files = sorted(p.name for p in folder.iterdir())
            assert {"bootstrap.db", "bootstrap.db-wal", "bootstrap.db-shm", "trace.bin"} <= set(files)
            assert mode(folder) == 0o700
            assert {name: mode(folder / name) for name in files} == {name: 0o600 for name in files}
        fresh = tmp_path / "deep" / "new"
        async with running(fresh):
            assert mode(fresh) == 0o700 and mode(fresh / storage.DBFILE) == 0o600
    finally:
        os.umask(old_umask)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(UsageError, match="cannot use"):
        storage.Storage(afile)

