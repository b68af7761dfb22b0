"""Two practices, each behind its own NAT, exchange a referral through a blind relay (issue 11).

The test builds its own network out of Linux namespaces (root needed; without it, or when the
kernel refuses a part, it fails with one line saying what is missing; it is never skipped):

    practice A (192.168.1.2) ── router A (NAT) ──┐                 ┌── router B (NAT) ── practice B (192.168.1.2)
                                   203.0.113.2   └─ br0 "internet" ┘   203.0.113.3
                                                     203.0.113.1: python -m relay, python -m bootstrap

Both practices use the same private subnet, as two ISP boxes do, and their routers masquerade
and forward nothing inwards (no port forward), so neither can reach the other directly. Real
`python -m node` processes (init, directory announce, contact add by ID through the bootstrap,
run, send, reply, outbox, inbox, export) run inside `ip netns exec`. A 50 MB referral goes
through the relay; the relay is killed mid-transfer and started again, and the upload resumes
(the new relay forwards much less than the whole file) and the record is stored once; the
report comes back. tcpdump on the relay's interface captured everything: no patient name, file
name, subject or letter text appears in it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env

PATIENT = "Zoé CANARY-nat-41 Quintero"
SUBJECT = "Sujet-CANARY-nat-subject"
LETTER = "Lettre-CANARY-nat-letter: cher confrère, merci de voir ce patient."
REPORT = "Compte-rendu-CANARY-nat-report: rien d'inquiétant."
FILE_NAME = "IRM-CANARY-nat-file.bin"
SIZE = 50 * 1000 * 1000
WAN = "203.0.113"
RELAY = f"relay+tcp://{WAN}.1:7600"
BOOTSTRAP = f"http://{WAN}.1:7500"
DEADLINE = 180.0               # the whole exchange, relay restart included


def _run(*cmd: str, what: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=stdin)
    if check and proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        pytest.fail(f"{what}: `{' '.join(cmd)}` failed: {why[0] if why else proc.returncode}", pytrace=False)
    return proc


def _require() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_relay_nat.py must run as root: it creates network namespaces, veth pairs, a bridge "
                    "and NAT rules (ip netns, nft)", pytrace=False)
    missing = [t for t in ("ip", "nft", "tcpdump") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: source scripts/_netns.sh (as root) to install them", pytrace=False)


NAT_RULES = """
table ip nat {
    chain post { type nat hook postrouting priority 100; oifname "wan0" masquerade; }
}
table ip filter {
    chain guard { type filter hook forward priority 0; policy drop;
                iifname "lan0" accept; ct state established,related accept; }
}
"""


class Net:
    """The namespaces, the processes started in them, and their clean-up (always)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = f"cbnat{os.getpid() % 100000}"
        self.inet = f"{self.prefix}-inet"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def _ns(self, name: str) -> str:
        _run("ip", "netns", "add", name, what="creating a network namespace")
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up", what="bringing up loopback")
        return name

    def build(self) -> None:
        self._ns(self.inet)
        _run("ip", "-n", self.inet, "link", "add", "br0", "type", "bridge", what="creating the internet bridge")
        _run("ip", "-n", self.inet, "addr", "add", f"{WAN}.1/24", "dev", "br0", what="addressing the bridge")
        _run("ip", "-n", self.inet, "link", "set", "br0", "up", what="bringing up the bridge")
        for n, side in ((2, "a"), (3, "b")):
            self._practice(side, n)

    def _practice(self, side: str, n: int) -> None:
        router, home = self._ns(f"{self.prefix}-r{side}"), self._ns(f"{self.prefix}-p{side}")
        _run("ip", "-n", router, "link", "add", "wan0", "type", "veth", "peer", "name", f"up{side}",
             "netns", self.inet, what="creating the router's uplink")
        _run("ip", "-n", self.inet, "link", "set", f"up{side}", "master", "br0", what="plugging the router in")
        _run("ip", "-n", self.inet, "link", "set", f"up{side}", "up", what="bringing up the uplink")
        _run("ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", home,
             what="creating the practice's LAN")
        for ns, link, addr in ((router, "wan0", f"{WAN}.{n}/24"), (router, "lan0", "192.168.1.1/24"),
                               (home, "eth0", "192.168.1.2/24")):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", link, what="addressing an interface")
            _run("ip", "-n", ns, "link", "set", link, "up", what="bringing up an interface")
        _run("ip", "-n", home, "route", "add", "default", "via", "192.168.1.1", what="routing the practice")
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1", what="enabling forwarding")
        _run("ip", "netns", "exec", router, "nft", "-f", "-", stdin=NAT_RULES,
             what="the kernel refused the router's NAT (nftables masquerade and conntrack)")
        # An ordinary uplink (80 Mbit/s): the 50 MB take seconds, so the relay can be stopped mid-transfer.
        _run("ip", "netns", "exec", router, "tc", "qdisc", "add", "dev", "wan0", "root", "tbf", "rate", "80mbit",
             "burst", "256kb", "latency", "100ms", what="the kernel refused traffic shaping (tc tbf)")

    def start(self, ns: str, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:                 # a file, not a pipe nobody drains
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], cwd=ROOT, env=base_env(), stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        for ns in reversed(self.namespaces):
            _run("ip", "netns", "del", ns, what="removing a namespace", check=False)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(cond, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.05)


def logged(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text(errors="replace")


@pytest.fixture
def net(tmp_path):
    _require()
    net = Net(tmp_path)
    try:
        net.build()
        yield net
    finally:
        net.close()


class Practice:
    def __init__(self, net: Net, side: str, name: str) -> None:
        self.net, self.ns, self.name = net, f"{net.prefix}-p{side}", name
        self.data = net.tmp / f"practice-{side}"
        self.log = net.tmp / f"run-{side}.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 60) -> str:
        p = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m", "node", *args, "--data",
                            str(self.data)], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{self.name}: cabinet {args[0]}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    def init(self) -> str:
        out = self.cli("init", "--name", self.name, "--listen", "127.0.0.1:7400", "--no-lan",
                       "--relay", RELAY, "--bootstrap", BOOTSTRAP)
        assert "accepted by 1 of 1" in self.cli("directory", "announce")
        return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Node ID"))

    def run(self) -> None:
        self.proc = self.net.start(self.ns, [sys.executable, "-m", "node", "run", "--no-web", "--pull-every", "2",
                                             "--data", str(self.data)], self.log)
        wait_for(lambda: logged(self.log, "listening on") or self.proc.poll() is not None, 30,
                 f"{self.name} to start", self.log)
        assert self.proc.poll() is None, self.log.read_text()

    def delivered(self, record_id: str) -> bool:
        return "delivered" in self.cli("outbox", record_id)

    def incoming(self) -> int:
        total = 0
        for p in (self.data / "incoming").glob("*.body"):
            try:
                total += p.stat().st_size
            except FileNotFoundError:           # completed (or collected) while we looked
                pass
        return total


class Relay:
    def __init__(self, net: Net) -> None:
        self.net, self.runs = net, 0
        self.proc: subprocess.Popen | None = None
        self.log = net.tmp / "relay-0.log"

    def start(self) -> None:
        self.runs += 1
        self.log = self.net.tmp / f"relay-{self.runs}.log"
        self.proc = self.net.start(self.net.inet, [sys.executable, "-m", "relay", "--listen", f"{WAN}.1:7600",
                                                   "-v"], self.log)
        wait_for(lambda: logged(self.log, "relay listening"), 20, "the relay to start", self.log)

    def bytes_up(self) -> int:
        return sum(int(m) for m in re.findall(r"session ended: (\d+) bytes up", self.log.read_text()))


def test_two_practices_behind_nat_exchange_through_the_relay_resuming_across_a_relay_restart(net, tmp_path):
    started = time.monotonic()
    pcap, dump_log = tmp_path / "relay.pcap", tmp_path / "tcpdump.log"
    dump = net.start(net.inet, ["tcpdump", "-i", "br0", "-n", "-s", "0", "-U", "-w", str(pcap)], dump_log)
    wait_for(lambda: logged(dump_log, "listening on") or dump.poll() is not None, 20, "tcpdump", dump_log)
    assert dump.poll() is None, f"tcpdump could not capture on the relay's interface: {dump_log.read_text()}"

    boot_log = tmp_path / "bootstrap.log"
    net.start(net.inet, [sys.executable, "-m", "bootstrap", "--listen", f"{WAN}.1:7500", "--data",
                         str(tmp_path / "bootstrap")], boot_log)
    relay = Relay(net)
    relay.start()
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", net.inet, "ss", "-ltn"], capture_output=True,
                                    text=True).stdout.count(f"{WAN}.1:7500") == 1, 20, "the bootstrap", boot_log)

    a, b = Practice(net, "a", "Dr Anne Martin"), Practice(net, "b", "Dr Paul Durand")
    a_id, b_id = a.init(), b.init()
    # The practices know each other by node ID alone, resolved through the bootstrap.
    assert "Contact added" in a.cli("contact", "add", b_id)
    assert "Contact added" in b.cli("contact", "add", a_id)
    a.run()
    b.run()

    scan = tmp_path / FILE_NAME
    scan.write_bytes(os.urandom(SIZE))
    digest = hashlib.sha256(scan.read_bytes()).hexdigest()
    letter = tmp_path / "lettre.txt"
    letter.write_text(LETTER, encoding="utf-8")
    sent = a.cli("send", "--to", "Dr Paul Durand", "--patient", PATIENT, "--subject", SUBJECT, "--letter",
                 str(letter), str(scan), "--no-deliver")
    record_id = sent.split()[1]

    # Mid-transfer (B holds part of the body), the relay dies; it comes back at the same address.
    wait_for(lambda: b.incoming() >= 8_000_000, 90, "the upload to be under way", a.log)
    had = b.incoming()
    stop(relay.proc, signal.SIGKILL)
    relay.start()

    wait_for(lambda: a.delivered(record_id), DEADLINE, "the referral to be delivered after the relay restart", a.log)
    assert b_id in a.cli("outbox", record_id) or "Dr Paul Durand" in a.cli("outbox", record_id)
    inbox = b.cli("inbox")
    assert inbox.count(record_id[:10]) == 1, inbox          # stored once
    out_dir = tmp_path / "exported"
    exported = b.cli("export", record_id, str(out_dir)).split()
    assert len(exported) == 1 and hashlib.sha256(Path(exported[0]).read_bytes()).hexdigest() == digest
    assert b.incoming() == 0                                # no partial left behind
    assert LETTER in b.cli("show", record_id)

    report = tmp_path / "cr.txt"
    report.write_text(REPORT, encoding="utf-8")
    reply_id = b.cli("reply", record_id, "--letter", str(report), "--no-deliver").split()[1]
    wait_for(lambda: b.delivered(reply_id), DEADLINE, "the report to come back", b.log)
    assert REPORT in a.cli("show", reply_id)
    assert "intact" in a.cli("audit", "verify").lower() and "intact" in b.cli("audit", "verify").lower()
    assert time.monotonic() - started < DEADLINE * 2

    # Sessions end when the nodes stop; the second relay then says what it forwarded: the rest, not all.
    for p in (a, b):
        stop(p.proc)
    stop(relay.proc)
    up_after = relay.bytes_up()
    assert 0 < up_after < SIZE - had + 2_000_000, (up_after, had)
    stop(dump)

    captured = pcap.read_bytes()
    assert len(captured) > SIZE, "the capture should hold the 50 MB that crossed the relay"
    for secret in (PATIENT, SUBJECT, LETTER, REPORT, FILE_NAME, "CANARY"):
        for enc in ("utf-8", "utf-16-le"):
            assert secret.encode(enc) not in captured, f"{secret!r} ({enc}) is visible on the relay's link"
    # The relay saw the routers' public addresses only: the practices' private ones never left their LANs.
    sources = subprocess.run(["tcpdump", "-n", "-r", str(pcap), "src net 192.168.0.0/16"], capture_output=True,
                             text=True).stdout
    assert sources.strip() == "", sources[:500]
    seen = subprocess.run(["tcpdump", "-n", "-c", "20000", "-r", str(pcap), "tcp port 7600"], capture_output=True,
                          text=True).stdout
    assert f"{WAN}.2." in seen and f"{WAN}.3." in seen
