"""LAN discovery (node/transport/mdns.py): the hint rules, then real multicast between hosts.

The first tests need nothing special: the TXT record, the hint table and
verify_hint against descriptors served on 127.0.0.1. The others build a small
LAN out of Linux network namespaces (one per host, each with one veth "lan0"
plugged into a bridge in a "switch" namespace, 10.77.0.0/24) and run
tests/_mdns_node.py in them: real nodes, real mDNS over multicast. They need
root; without it they fail with a message saying so (they are not skipped).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from conftest import ROOT, base_env
from node.core.identity import Identity
from node.transport import mdns
from node.transport.client import Client

DRIVER = ROOT / "tests" / "_mdns_node.py"
SUBNET = "10.77.0"
PORT = 7400
_RUNS = itertools.count(1)


def node_id() -> str:
    return Identity.generate().node_id


# --- the hint rules (no root needed) -----------------------------------------------

def test_txt_is_only_version_id_and_name():
    nid = node_id()
    txt = mdns.txt_record(nid, "  Dr Anne Martin  ")
    assert txt == {b"v": b"1", b"id": nid.encode(), b"name": b"Dr Anne Martin"}
    long = mdns.txt_record(nid, "é" * 300)[b"name"]
    assert len(long) <= mdns.MAX_NAME_BYTES and long.decode("utf-8")      # cut on a character boundary
    assert mdns.parse_txt(txt) == (nid, "Dr Anne Martin")


@pytest.mark.parametrize("change", [
    {b"id": b"X"},                              # not a node ID
    {b"id": "é".encode()},
    {b"id": None},
    {b"v": b"2"},                               # a later version: its fields may mean something else
    {b"v": None},
])
def test_txt_that_is_not_a_cabinet_v1_announcement_is_ignored(change):
    props = {**mdns.txt_record(node_id(), "Dr X"), **change}
    assert mdns.parse_txt(props) is None
    assert mdns.parse_txt({}) is None


def test_a_mistyped_id_is_caught_and_names_are_cleaned():
    nid = node_id()
    typo = nid[:-1] + ("A" if nid[-1] != "A" else "B")
    assert mdns.parse_txt({b"v": b"1", b"id": typo.encode()}) is None
    props = {b"v": b"1", b"id": nid.lower().encode(), b"name": b"Dr\x1b[2J X\xff"}    # escape codes, bad UTF-8
    assert mdns.parse_txt(props) == (nid, "Dr[2J X\ufffd")


def test_only_usable_lan_addresses_become_urls():
    assert mdns.url_for("10.77.0.2", 7400) == "http://10.77.0.2:7400"
    assert mdns.url_for("2001:db8::1", 7400) == "http://[2001:db8::1]:7400"
    for bad in ("127.0.0.1", "0.0.0.0", "224.0.0.251", "fe80::1", "::1", "not-an-ip"):
        assert mdns.url_for(bad, 7400) is None, bad
    assert mdns.url_for("10.77.0.2", 0) is None


def test_hint_table_replaces_orders_and_calls_back():
    clock = itertools.count(1000, 1000)
    seen = []
    lan = mdns.Lan(on_hint=lambda n, u: seen.append((n, u)), clock=lambda: next(clock))
    b = node_id()
    lan.record("B._cabinet._tcp.local.", b, "Dr B", ["http://10.77.0.2:7400"])
    lan.record("B._cabinet._tcp.local.", b, "Dr B", ["http://10.77.0.2:7400"])        # refresh: no new callback
    assert seen == [(b, "http://10.77.0.2:7400")]
    lan.record("Other._cabinet._tcp.local.", b, "Dr B?", ["http://10.77.0.3:7400"])   # a second announcer
    assert lan.hints(b) == ["http://10.77.0.3:7400", "http://10.77.0.2:7400"]         # newest first
    lan.record("B._cabinet._tcp.local.", b, "Dr B", ["http://10.77.0.12:7400"])       # moved
    assert seen[-1] == (b, "http://10.77.0.12:7400")
    assert lan.hints(b) == ["http://10.77.0.12:7400", "http://10.77.0.3:7400"]
    assert [(h.url, h.name) for h in lan.peers()] == [("http://10.77.0.12:7400", "Dr B"),
                                                       ("http://10.77.0.3:7400", "Dr B?")]
    lan._forget("b._cabinet._tcp.local.")                                              # goodbye / expiry
    assert lan.hints(b) == ["http://10.77.0.3:7400"]


def test_a_flood_of_announcements_for_one_id_is_bounded():
    lan = mdns.Lan()
    b = node_id()
    for i in range(50):
        lan.record(f"S{i}._cabinet._tcp.local.", b, "x", [f"http://10.77.1.{i}:7400"])
    assert len(lan.hints(b)) == mdns.MAX_PER_NODE
    assert lan.hints(b)[0] == "http://10.77.1.49:7400"


async def _serve(routes: dict[str, bytes]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, body in routes.items():
        async def handler(_request, body=body):
            return web.Response(body=body)
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def test_verify_hint_accepts_only_the_announced_node(caplog):
    genuine, other = Identity.generate(), Identity.generate()
    d_genuine = genuine.descriptor(name="Dr B", seq=1, now_ms=mdns.now_ms())
    d_other = other.descriptor(name="Dr M", seq=1, now_ms=mdns.now_ms())
    r1, url_genuine = await _serve({"/v1/descriptor": d_genuine.signed})
    r2, url_spoof = await _serve({"/v1/descriptor": d_other.signed})
    r3, url_garbage = await _serve({"/v1/descriptor": b"\x81\xa4body\xc4\x01x"})
    client = Client(Identity.generate())
    lan = mdns.Lan()
    try:
        for svc, url in (("B", url_genuine), ("M", url_spoof), ("G", url_garbage)):
            lan.record(f"{svc}._cabinet._tcp.local.", genuine.node_id, "Dr B", [url])
        caplog.set_level(logging.INFO, logger="cabinet.mdns")
        assert await lan.verify_hint(client, genuine.node_id, url_spoof) is None
        assert await lan.verify_hint(client, genuine.node_id, url_garbage) is None
        got = await lan.verify_hint(client, genuine.node_id, url_genuine)
        assert got is not None and got.node_id == genuine.node_id and got.sign_key == genuine.sign_public
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"spoofed mDNS answer for {genuine.node_id} at {url_spoof} ignored" in warnings
        assert f"spoofed mDNS answer for {genuine.node_id} at {url_garbage} ignored" in warnings
        assert lan.hints(genuine.node_id) == [url_genuine]                 # the impostors' hints are dropped
        assert [h.verified for h in lan.peers()] == [True]
        # Nobody listening: not a spoof, just absent; the hint stays for a later try.
        lan.record("C._cabinet._tcp.local.", other.node_id, "Dr M", ["http://127.0.0.1:9"])
        assert await lan.verify_hint(client, other.node_id, "http://127.0.0.1:9") is None
        assert lan.hints(other.node_id) == ["http://127.0.0.1:9"]
    finally:
        await client.close()
        for r in (r1, r2, r3):
            await r.cleanup()


async def test_without_a_lan_interface_discovery_is_off_not_fatal(caplog):
    lan = mdns.Lan(interfaces=["no-such-interface0"])
    caplog.set_level(logging.WARNING, logger="cabinet.mdns")
    await lan.start(node_id(), "Dr X", 7400)
    assert not lan.running and "LAN discovery is off" in caplog.text
    await lan.stop()


# --- a LAN of network namespaces ----------------------------------------------------

def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}", pytrace=False)
    return proc


def _require_root_and_ip() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_mdns.py LAN tests must run as root: they create network namespaces, veth pairs "
                    "and a bridge (ip netns). Run pytest as root (e.g. in the project container or with sudo).",
                    pytrace=False)
    if shutil.which("ip") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "--no-install-recommends", "iproute2"]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        if shutil.which("ip") is None:
            pytest.fail("the `ip` command (iproute2) is missing and could not be installed with apt-get",
                        pytrace=False)


class Driver:
    """One tests/_mdns_node.py process: JSON events in, JSON commands out."""

    def __init__(self, proc: subprocess.Popen, label: str) -> None:
        self.proc, self.label = proc, label
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "output", "line": line.rstrip()}
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait(self, pred, timeout: float, what: str, start: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = "\n".join(json.dumps(e) for e in self.events[-25:])
                    state = "exited" if self._eof else f"no match after {timeout} s"
                    raise AssertionError(f"{self.label}: waiting for {what}: {state}\n{tail}")
                self._cond.wait(left)

    REPLIES = {"verify": "verified", "hints": "hints", "peers": "peers", "update": "updated"}

    def ask(self, cmd: str, timeout: float = 15, **fields) -> dict:
        start = len(self.events)
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        reply = self.REPLIES[cmd]
        return self.wait(lambda e: e["event"] == reply, timeout, f"the answer to {cmd} {fields}", start)

    def hint(self, node_id: str, url: str, timeout: float = 15) -> dict:
        return self.wait(lambda e: e["event"] == "hint" and e["node_id"] == node_id and e["url"] == url,
                         timeout, f"a LAN hint for {node_id} at {url}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Lab:
    """Hosts on one Ethernet segment: a bridge in a switch namespace, one namespace per host."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = f"cbm{os.getpid()}-{next(_RUNS)}"
        self.switch = f"{self.prefix}-sw"
        self.namespaces: list[str] = []
        self.drivers: list[Driver] = []

    def switch_on(self) -> None:
        self._netns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)

    def host(self, n: int) -> str:
        """Namespace `n` with lan0 at 10.77.0.n, plugged into the switch."""
        ns = f"{self.prefix}-h{n}"
        self._netns(ns)
        _run("ip", "-n", ns, "link", "add", "lan0", "type", "veth", "peer", "name", f"port{n}", "netns", self.switch)
        _run("ip", "-n", self.switch, "link", "set", f"port{n}", "master", "br0")
        _run("ip", "-n", self.switch, "link", "set", f"port{n}", "up")
        for link in ("lo", "lan0"):
            _run("ip", "-n", ns, "link", "set", link, "up")
        _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "lan0")
        _run("ip", "-n", ns, "route", "replace", "224.0.0.0/4", "dev", "lan0")
        return ns

    def readdress(self, ns: str, old: int, new: int) -> None:
        # Deleting first: removing a primary address also removes secondaries in its subnet.
        _run("ip", "-n", ns, "addr", "del", f"{SUBNET}.{old}/24", "dev", "lan0")
        _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{new}/24", "dev", "lan0")
        _run("ip", "-n", ns, "route", "replace", "224.0.0.0/4", "dev", "lan0")

    def node(self, ns: str, name: str, *extra: str) -> tuple[Driver, dict]:
        """Start a node in `ns`; returns its driver and its 'ready' event."""
        data = self.tmp / name.replace(" ", "_")
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(DRIVER), "--data", str(data), "--name", name,
               "--port", str(PORT), "--iface", "lan0", *extra]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        d = Driver(proc, name)
        self.drivers.append(d)
        ready = d.wait(lambda e: e["event"] == "ready", 20, "the node to start")
        assert ready["running"], f"{name}: LAN discovery did not start: {d.events}"
        return d, ready

    def close(self) -> None:
        for d in self.drivers:
            d.stop()
        for ns in reversed(self.namespaces):       # hosts first (their veths go with them), the switch last
            _run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def lab(tmp_path):
    _require_root_and_ip()
    lab = Lab(tmp_path)
    try:
        lab.switch_on()
        yield lab
    finally:
        lab.close()


def url(n: int) -> str:
    return f"http://{SUBNET}.{n}:{PORT}"


def test_two_nodes_on_a_lan_find_each_other(lab):
    a, ready_a = lab.node(lab.host(1), "Dr Anne Martin")
    b, ready_b = lab.node(lab.host(2), "Dr Paul Durand")
    a_id, b_id = ready_a["node_id"], ready_b["node_id"]
    assert ready_a["addresses"] == [f"{SUBNET}.1"] and ready_b["addresses"] == [f"{SUBNET}.2"]

    a.hint(b_id, url(2))
    b.hint(a_id, url(1))
    peers = a.ask("peers")["peers"]
    assert [(p["node_id"], p["name"], p["url"]) for p in peers] == [(b_id, "Dr Paul Durand", url(2))]
    assert a.ask("hints", node_id=b_id)["urls"] == [url(2)]
    v = a.ask("verify", node_id=b_id, url=url(2))
    assert v["ok"] and v["descriptor_id"] == b_id
    assert a.ask("peers")["peers"][0]["verified"] is True
    assert not [e for e in a.events if e["event"] == "hint" and e["node_id"] == a_id], "A recorded itself"
    assert not [e for e in b.events if e["event"] == "hint" and e["node_id"] == b_id], "B recorded itself"
    # The drivers run asyncio in debug mode: a callback that held the loop for 0.25 s (a blocking call) is logged.
    assert not [e for e in a.events + b.events if e["event"] == "log" and e["logger"] == "asyncio"]


def test_a_spoofed_announcement_gets_nothing(lab):
    a, _ = lab.node(lab.host(1), "Dr Anne Martin")
    b, ready_b = lab.node(lab.host(2), "Dr Paul Durand")
    b_id = ready_b["node_id"]
    # The impostor announces B's node ID, pointing at its own server (which serves its own descriptor).
    _, ready_m = lab.node(lab.host(3), "Mallory", "--announce-as", b_id)
    assert ready_m["announced_as"] == b_id != ready_m["node_id"]

    a.hint(b_id, url(2))
    a.hint(b_id, url(3))
    assert set(a.ask("hints", node_id=b_id)["urls"]) == {url(2), url(3)}

    start = len(a.events)
    spoofed = a.ask("verify", node_id=b_id, url=url(3))
    assert not spoofed["ok"] and spoofed["descriptor_id"] is None
    a.wait(lambda e: e["event"] == "log" and e["level"] == "WARNING"
           and e["msg"] == f"spoofed mDNS answer for {b_id} at {url(3)} ignored", 1, "the spoof warning", start)
    genuine = a.ask("verify", node_id=b_id, url=url(2))
    assert genuine["ok"] and genuine["descriptor_id"] == b_id
    assert a.ask("hints", node_id=b_id)["urls"] == [url(2)]


@pytest.mark.parametrize("how", ["update", "watch"])
def test_a_node_that_moves_is_found_at_its_new_address(lab, how):
    """Renumbered (DHCP, a new router): told by the node (update) or noticed by the Lan itself (watch)."""
    a, _ = lab.node(lab.host(1), "Dr Anne Martin")
    ns_b = lab.host(2)
    b, ready_b = lab.node(ns_b, "Dr Paul Durand", *(["--watch", "0.5"] if how == "watch" else []))
    b_id = ready_b["node_id"]
    a.hint(b_id, url(2))

    lab.readdress(ns_b, 2, 12)
    if how == "update":
        assert b.ask("update")["addresses"] == [f"{SUBNET}.12"]
    else:
        b.wait(lambda e: e["event"] == "log" and e["msg"] == f"LAN announcement updated: {SUBNET}.12", 10,
               "the watch to re-announce")
    a.hint(b_id, url(12))
    deadline = time.monotonic() + 10
    while (urls := a.ask("hints", node_id=b_id)["urls"]) != [url(12)] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert urls == [url(12)], "the old address should be gone once the new one is announced"
    v = a.ask("verify", node_id=b_id, url=url(12))
    assert v["ok"] and v["descriptor_id"] == b_id


# --- the real CLI and `cabinet run` on the LAN -------------------------------------------

def _cabinet(ns: str, data: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "node", *args, "--data", str(data)],
                          cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_practices_on_a_lan_find_and_add_each_other_by_id_alone(lab, tmp_path):
    """`cabinet run` announces on the LAN; `cabinet peers` lists it verified; a bare node ID is
    resolved on the LAN (no bootstrap configured) and a referral goes through."""
    hosts = {1: lab.host(1), 2: lab.host(2)}
    data = {n: tmp_path / f"practice{n}" for n in hosts}
    ids, procs = {}, []
    try:
        for n, ns in hosts.items():
            out = _ok(_cabinet(ns, data[n], "init", "--name", f"Dr Lan {n}", "--listen", f"{SUBNET}.{n}:{PORT}"))
            ids[n] = next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("Node ID"))
            log = tmp_path / f"run{n}.log"
            with open(log, "w") as out:        # a file, not a pipe nobody drains
                p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "node", "run",
                                      "--data", str(data[n])], cwd=ROOT, env=base_env(), stdout=out,
                                     stderr=subprocess.STDOUT, text=True)
            procs.append(p)
            deadline = time.monotonic() + 20
            while "listening on" not in log.read_text() and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.05)
            assert "listening on" in log.read_text(), log.read_text()
        listed = _ok(_cabinet(hosts[1], data[1], "peers", "--wait", "3"))
        assert ids[2] in listed and f"{SUBNET}.2:{PORT}" in listed and "verified" in listed
        assert ids[1] not in listed                                    # not itself
        assert "Contact added" in _ok(_cabinet(hosts[1], data[1], "contact", "add", ids[2]))
        assert "Contact added" in _ok(_cabinet(hosts[2], data[2], "contact", "add", ids[1]))
        letter = tmp_path / "letter.txt"
        letter.write_text("Found on the LAN")
        sent = _ok(_cabinet(hosts[1], data[1], "send", "--to", "Dr Lan 2", "--patient", "P Q", "--letter",
                            str(letter)))
        assert "delivered" in sent
        assert "Found on the LAN" in _ok(_cabinet(hosts[2], data[2], "show", sent.split()[1]))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)
