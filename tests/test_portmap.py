"""Router port mapping (docs/reachability.md): NAT-PMP (RFC 6886) and PCP (RFC 6887).

First the pure codecs against byte layouts written out from the RFCs' figures;
then the asyncio client and a real node against a small responder (asyncio
UDP, below) on 127.0.0.1: the mapping, its renewal, its deletion on stop, the
public address learnt and put in the descriptor; then in network namespaces
(as root, as tests/test_mdns.py does): a router namespace runs the responder on
its LAN side (this file run as a script) and a real `python -m node run` in the
practice namespace behind it maps its port through it and advertises the
router's public address.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from node.core import portmap as codec  # noqa: E402
from node.core.errors import PeerTimeout, PeerUnreachable, RemoteProtocolError  # noqa: E402
from node.core.portmap import Mapped, MappingRefused, UnsupportedVersion  # noqa: E402
from node.transport.portmap import PortMapper  # noqa: E402

NONCE = bytes(range(1, 13))
PUBLIC = "203.0.113.7"
_RUNS = itertools.count(1)


# --- the codecs, byte by byte ---------------------------------------------------------

def test_natpmp_requests_match_rfc6886_layouts():
    assert codec.natpmp_address_request() == b"\x00\x00"                      # §3.2: version 0, opcode 0
    # §3.3: version, opcode 2 (TCP), reserved 0, internal port, suggested external port, lifetime
    assert codec.natpmp_map_request(7400, 7400, 7200) == bytes.fromhex("00 02 0000 1ce8 1ce8 00001c20")
    # §3.4: deleting a mapping is lifetime 0 and suggested port 0
    assert codec.natpmp_map_request(7400, 0, 0) == bytes.fromhex("00 02 0000 1ce8 0000 00000000")
    for bad in ((0, 1, 1), (70000, 1, 1), (1, -1, 1), (1, 1, -1), (1, 1, 1 << 32)):
        with pytest.raises(ValueError):
            codec.natpmp_map_request(*bad)


def test_natpmp_answers_decode_and_are_checked():
    # §3.2: version 0, opcode 128, result 0, seconds since epoch, external address
    answer = bytes.fromhex("00 80 0000 0000012c cb007107")
    assert codec.parse_natpmp_address(answer) == (PUBLIC, 300)
    # §3.3: version 0, opcode 130, result, epoch, internal port, mapped external port, lifetime
    mapped = codec.parse_natpmp_map(bytes.fromhex("00 82 0000 0000012c 1ce8 9c40 00000e10"), 7400)
    assert mapped == Mapped(protocol="nat-pmp", internal_port=7400, external_port=40000, lifetime=3600, epoch=300)
    with pytest.raises(MappingRefused, match="out of resources") as refused:
        codec.parse_natpmp_map(bytes.fromhex("00 82 0004 0000012c 1ce8 0000 00000000"), 7400)
    assert refused.value.code == 4
    with pytest.raises(UnsupportedVersion):
        codec.parse_natpmp_map(bytes.fromhex("00 82 0001 0000012c"), 7400)
    for junk in (b"", b"\x00", bytes.fromhex("01 82 0000 0000012c 1ce8 9c40 00000e10"),    # version 1
                 bytes.fromhex("00 81 0000 0000012c 1ce8 9c40 00000e10"),                   # the UDP answer
                 bytes.fromhex("00 82 0000 0000012c 1ce9 9c40 00000e10"),                   # another port
                 bytes.fromhex("00 82 0000 0000012c 1ce8 9c40 00000e"),                     # short
                 bytes.fromhex("00 80 0000 0000012c cb0071")):
        with pytest.raises(RemoteProtocolError):
            (codec.parse_natpmp_address if junk[1:2] == b"\x80" else
             lambda d: codec.parse_natpmp_map(d, 7400))(junk)


def test_pcp_map_request_matches_rfc6887_layout():
    req = codec.pcp_map_request(client_ip="192.168.1.2", internal_port=7400, external_port=7400, lifetime=7200,
                                nonce=NONCE)
    expected = (bytes.fromhex("02 01 0000 00001c20")                     # §7.1: version 2, R=0 MAP, lifetime
                + bytes.fromhex("00000000000000000000ffff c0a80102")     # client IP, IPv4-mapped
                + NONCE                                                  # §11.1: mapping nonce
                + bytes.fromhex("06 000000 1ce8 1ce8")                   # TCP, reserved, ports
                + bytes.fromhex("00000000000000000000ffff 00000000"))    # suggested external: none (::ffff:0.0.0.0)
    assert req == expected and len(req) == 60
    assert codec.parse_request(req) == {"protocol": "pcp", "op": "map", "client_ip": "192.168.1.2", "nonce": NONCE,
                                        "proto": 6, "internal_port": 7400, "external_port": 7400, "lifetime": 7200}
    with pytest.raises(ValueError):
        codec.pcp_map_request(client_ip="192.168.1.2", internal_port=7400, external_port=0, lifetime=1, nonce=b"x")


def test_pcp_map_answers_decode_and_are_checked():
    req = codec.pcp_map_request(client_ip="192.168.1.2", internal_port=7400, external_port=7400, lifetime=7200,
                                nonce=NONCE)
    ans = codec.pcp_map_answer(req, external_ip=PUBLIC, external_port=40000, lifetime=3600, epoch=77)
    assert ans[:24] == bytes.fromhex("02 81 00 00 00000e10 0000004d") + bytes(12)    # §7.2: R=1, result 0
    assert codec.parse_pcp_map(ans, NONCE, 7400) == Mapped(protocol="pcp", internal_port=7400, external_port=40000,
                                                         lifetime=3600, epoch=77, external_ip=PUBLIC)
    refused = codec.pcp_map_answer(req, external_ip="0.0.0.0", external_port=0, lifetime=30, epoch=77, result=2)
    with pytest.raises(MappingRefused, match="NOT_AUTHORIZED"):
        codec.parse_pcp_map(refused, NONCE, 7400)
    # A NAT-PMP-only router answers a PCP request with its own version and "unsupported version" (§9).
    with pytest.raises(UnsupportedVersion):
        codec.parse_pcp_map(bytes.fromhex("00 81 0001 0000004d"), NONCE, 7400)
    for junk in (ans[:-4], ans + b"\x00", ans[:24 + 12] + ans[36:40], bytes([3]) + ans[1:],
                 ans[:1] + b"\x80" + ans[2:]):
        with pytest.raises(RemoteProtocolError):
            codec.parse_pcp_map(junk, NONCE, 7400)
    with pytest.raises(RemoteProtocolError, match="nonce"):
        codec.parse_pcp_map(ans, bytes(12), 7400)               # an answer for another mapping
    with pytest.raises(RemoteProtocolError):
        codec.parse_pcp_map(ans, NONCE, 7401)
    v6 = codec.pcp_map_answer(req, external_ip="2001:db8::7", external_port=1, lifetime=1, epoch=1)
    assert codec.parse_pcp_map(v6, NONCE, 7400).external_ip == "2001:db8::7"


# --- a router that answers (this test's responder) ------------------------------------------

class Responder(asyncio.DatagramProtocol):
    """A NAT-PMP and/or PCP server: grants every mapping (or refuses), remembers the requests.

    mode: "pcp" (PCP and NAT-PMP), "natpmp" (answers PCP with NAT-PMP's unsupported version),
    "refuse" (PCP NOT_AUTHORIZED), "silent" (reads and never answers).
    """

    def __init__(self, *, mode: str = "pcp", external_ip: str = PUBLIC, lifetime: int = 3600,
                 external_port: int = 40000, junk_first: bool = False, echo: bool = False) -> None:
        self.mode, self.external_ip, self.lifetime, self.echo = mode, external_ip, lifetime, echo
        self.external_port, self.junk_first = external_port, junk_first
        self.requests: list[dict] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            req = codec.parse_request(data)
        except RemoteProtocolError:
            return
        self.requests.append(req)
        if self.echo and req["op"] == "map":
            print(f"{req['protocol']} map {req['internal_port']} lifetime {req['lifetime']}", flush=True)
        if self.mode == "silent":
            return
        if self.junk_first:                           # noise the client must ignore, then the answer
            self.transport.sendto(b"\x02\x81garbage!" * 3, addr)
        self.transport.sendto(self.answer(req, data), addr)

    def answer(self, req: dict, data: bytes) -> bytes:
        granted = min(req.get("lifetime", 0), self.lifetime)
        port = self.external_port if granted else 0
        if req["protocol"] == "pcp":
            if self.mode == "natpmp":
                return struct.pack("!BBHI", 0, 128 + data[1], 1, 5)
            result = 2 if self.mode == "refuse" else 0
            return codec.pcp_map_answer(data, external_ip=self.external_ip, external_port=port, lifetime=granted,
                                        epoch=5, result=result)
        if req["op"] == "address":
            return codec.natpmp_address_answer(self.external_ip, 5)
        return codec.natpmp_map_answer(data, external_port=port, lifetime=granted, epoch=5)

    def maps(self, alive: bool = True) -> list[dict]:
        return [r for r in self.requests if r["op"] == "map" and (r["lifetime"] > 0) == alive]


async def responder(host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[Responder, int]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Responder(**kw), local_addr=(host, port))
    return proto, transport.get_extra_info("sockname")[1]


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.05)
    return value


# --- the client ----------------------------------------------------------------------------

async def test_pcp_mapping_renewal_and_deletion():
    router, port = await responder(junk_first=True)
    try:
        mapper = PortMapper("127.0.0.1", port)
        mapped = await mapper.map(7400, 7200)
        assert (mapped.protocol, mapped.external_ip, mapped.external_port, mapped.lifetime) == ("pcp", PUBLIC,
                                                                                                 40000, 3600)
        again = await mapper.map(7400, 7200, external_port=mapped.external_port)        # a renewal
        assert again.external_port == 40000
        first, second = router.maps()
        assert first["nonce"] == second["nonce"]             # one mapping, renewed (RFC 6887 §11.2)
        assert first["external_port"] == 7400 and second["external_port"] == 40000
        assert first["client_ip"] == "127.0.0.1"
        await mapper.unmap(again)
        assert router.maps(alive=False)[0]["nonce"] == first["nonce"]
    finally:
        router.transport.close()


async def test_a_nat_pmp_router_is_spoken_to_in_nat_pmp():
    router, port = await responder(mode="natpmp")
    try:
        mapper = PortMapper("127.0.0.1", port)
        mapped = await mapper.map(7400, 7200)
        assert (mapped.protocol, mapped.external_ip, mapped.external_port) == ("nat-pmp", PUBLIC, 40000)
        assert [r["protocol"] for r in router.requests] == ["pcp", "nat-pmp", "nat-pmp"]      # map, then address
        await mapper.map(7400, 7200)
        assert router.requests[3]["protocol"] == "nat-pmp"        # remembered: no PCP attempt again
        await mapper.unmap(mapped)
        deletion = router.maps(alive=False)[0]
        assert deletion["protocol"] == "nat-pmp" and deletion["external_port"] == 0
    finally:
        router.transport.close()


async def test_refusal_silence_and_nobody_are_clear_errors():
    router, port = await responder(mode="refuse")
    silent, quiet_port = await responder(mode="silent")
    try:
        with pytest.raises(MappingRefused, match="NOT_AUTHORIZED"):
            await PortMapper("127.0.0.1", port).map(7400, 7200)
        with pytest.raises(PeerTimeout):
            await PortMapper("127.0.0.1", quiet_port, retries=(0.05, 0.1)).map(7400, 7200)
        assert len(silent.requests) == 4           # PCP twice, then NAT-PMP twice: retransmitted, then given up
    finally:
        router.transport.close()
        silent.transport.close()
    with pytest.raises((PeerUnreachable, PeerTimeout)):         # ICMP port unreachable on loopback
        await PortMapper("127.0.0.1", quiet_port, retries=(0.2,)).map(7400, 7200)


# --- a node behind the responder -------------------------------------------------------------

async def _node(tmp_path: Path, gateway: str, *, mapping: bool = True):
    from node.config import Config
    from node.node import Node
    folder = tmp_path / "node"
    await Node.init(folder, "pass phrase", name="Dr Map", listen="127.0.0.1:0")
    cfg = Config.load(folder)
    cfg.port_mapping, cfg.port_mapping_gateway = mapping, gateway
    cfg.save(folder)
    return await Node.open_node(folder, passphrase="pass phrase")


async def test_node_maps_renews_advertises_and_removes_its_port(tmp_path):
    router, port = await responder(lifetime=2)          # renewed every second
    node = await _node(tmp_path, f"127.0.0.1:{port}")
    try:
        _, bound = await node.serve()
        public = f"https://{PUBLIC}:40000"
        await until(lambda: public in node.descriptor.addresses, 10, "the public address in the descriptor")
        assert node.descriptor.addresses[0] == f"https://127.0.0.1:{bound}"       # the configured one first
        assert router.maps()[0]["internal_port"] == bound
        await until(lambda: len(router.maps()) >= 3, 10, "two renewals")
        assert len({r["nonce"] for r in router.maps()}) == 1
        status = node.port_mapping_status()
        assert {k: status[k] for k in ("state", "protocol", "external_address", "external_port", "lifetime",
                                       "last_error")} == {"state": "mapped", "protocol": "pcp",
                                                          "external_address": PUBLIC, "external_port": 40000,
                                                          "lifetime": 2, "last_error": None}
        from node.app.contacts import DESCRIPTOR_FILE
        from node.core.identity import Descriptor
        assert public in Descriptor.from_wire((node.folder / DESCRIPTOR_FILE).read_bytes()).addresses   # kept signed
    finally:
        await node.close()
        router.transport.close()
    assert router.maps(alive=False), "the mapping was not removed on stop"
    assert node.port_mapping_status()["state"] == "not serving"


async def test_a_private_external_address_is_not_advertised(tmp_path):
    router, port = await responder(external_ip="100.64.3.4")        # carrier-grade NAT behind the router
    node = await _node(tmp_path, f"127.0.0.1:{port}")
    try:
        await node.serve()
        await until(lambda: node.port_mapping_status()["state"] == "mapped", 10, "the mapping")
        assert not any("100.64.3.4" in a for a in node.descriptor.addresses)
    finally:
        await node.close()
        router.transport.close()


async def test_port_mapping_off_asks_nothing(tmp_path):
    router, port = await responder()
    node = await _node(tmp_path, f"127.0.0.1:{port}", mapping=False)
    try:
        await node.serve()
        assert node.port_mapping_status()["state"] == "off"
        # A second node whose mapping is on proves the responder answers: the first one never asked.
        other = await _node(tmp_path / "2", f"127.0.0.1:{port}")
        try:
            await other.serve()
            await until(lambda: other.port_mapping_status()["state"] == "mapped", 10, "the other's mapping")
        finally:
            await other.close()
        assert {r["internal_port"] for r in router.requests} == {other.own.bound_port}
    finally:
        await node.close()
        router.transport.close()


async def test_a_router_that_refuses_is_reported_not_fatal(tmp_path):
    router, port = await responder(mode="refuse")
    node = await _node(tmp_path, f"127.0.0.1:{port}")
    try:
        await node.serve()
        status = await until(lambda: (s := node.port_mapping_status())["state"] == "failed" and s, 10, "a failure")
        assert "NOT_AUTHORIZED" in status["last_error"] and status["external_address"] is None
        assert not any(PUBLIC in a for a in node.descriptor.addresses)
    finally:
        await node.close()
        router.transport.close()


# --- behind a router, in network namespaces ---------------------------------------------------

def _ip(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *cmd], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        pytest.fail(f"ip {' '.join(cmd)} failed: {proc.stderr.strip()}", pytrace=False)
    return proc


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the namespace tests of tests/test_portmap.py need root (ip netns)", pytrace=False)


def test_practice_behind_a_router_maps_its_port_and_advertises_the_public_address(tmp_path):
    """router: lan0 192.168.1.1/24 (responder on :5351), wan0 198.51.100.1; practice: 192.168.1.2, default
    route via the router. A real `python -m node run` maps its port and advertises 198.51.100.1."""
    _require_root()
    from conftest import ROOT, base_env, cli, ok
    from node.core.identity import Descriptor
    prefix = f"cbp{os.getpid()}-{next(_RUNS)}"
    router, practice = f"{prefix}-r", f"{prefix}-p"
    made, procs = [], []
    try:
        for ns in (router, practice):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0", "netns", practice)
        _ip("-n", router, "link", "add", "wan0", "type", "veth", "peer", "name", "wan1")     # the "Internet" side
        for ns, links in ((router, ("lo", "lan0", "wan0", "wan1")), (practice, ("lo", "lan0"))):
            for link in links:
                _ip("-n", ns, "link", "set", link, "up")
        _ip("-n", router, "addr", "add", "192.168.1.1/24", "dev", "lan0")
        _ip("-n", router, "addr", "add", "198.51.100.1/24", "dev", "wan0")
        _ip("-n", practice, "addr", "add", "192.168.1.2/24", "dev", "lan0")
        _ip("-n", practice, "route", "add", "default", "via", "192.168.1.1")
        env = base_env()
        resp = subprocess.Popen(["ip", "netns", "exec", router, sys.executable, __file__, "--respond",
                                 "192.168.1.1", "--external", "198.51.100.1"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(resp)
        assert resp.stdout.readline().strip() == "ready", "the responder did not start"
        data = tmp_path / "practice"
        ok(cli(data, "init", "--name", "Dr Behind Router", "--listen", "0.0.0.0:7400", "--no-lan"))
        run = subprocess.Popen(["ip", "netns", "exec", practice, sys.executable, "-m", "node", "run", "--data",
                                str(data), "--no-web", "--no-lan"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(run)
        want = "https://198.51.100.1:7400"
        deadline = time.monotonic() + 30
        addresses: tuple[str, ...] = ()
        while time.monotonic() < deadline and run.poll() is None:
            try:
                addresses = Descriptor.from_wire((data / "descriptor").read_bytes()).addresses
            except Exception:
                addresses = ()
            if want in addresses:
                break
            time.sleep(0.2)
        assert want in addresses, f"descriptor lists {addresses}; node exited: {run.poll()}"
        run.terminate()
        out, _ = run.communicate(timeout=20)
        assert run.returncode == 0, out
    finally:
        outputs = []
        for p in procs:
            if p.poll() is None:
                p.terminate()
            try:
                outputs.append(p.communicate(timeout=10)[0] or "")
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in made:
            _ip("netns", "del", ns, check=False)
    log = outputs[0]
    assert "map 7400 lifetime 7200" in log and "map 7400 lifetime 0" in log, log     # mapped, then removed


async def _respond_forever(host: str, external: str) -> None:
    await responder(host, codec.SERVER_PORT, external_ip=external, external_port=7400, echo=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":            # the router's side, inside its namespace
    args = argparse.ArgumentParser()
    args.add_argument("--respond", required=True)
    args.add_argument("--external", required=True)
    a = args.parse_args()
    try:
        asyncio.run(_respond_forever(a.respond, a.external))
    except KeyboardInterrupt:
        pass
