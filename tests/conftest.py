"""Shared fixtures: real node processes on loopback, the CLI as a subprocess.

Nodes use the "min" Argon2id profile (CABINET_KDF=min) so that each CLI call
does not spend a quarter of a second deriving the key; everything else is the
real code path.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSPHRASE = "correct horse battery"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABINET_")}
    env.update(CABINET_KDF="min", CABINET_PASSPHRASE=PASSPHRASE, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    monkeypatch.setenv("CABINET_KDF", "min")


_PORTS_GIVEN: set[int] = set()
_PORT_RNG = random.Random()             # seeded by the OS: two test runs side by side pick different ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port for a node or server a test starts later, below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the range it also
    uses for outgoing connections: between this call and the node's start,
    any client connection in the run could take it ("address already in
    use"). Below the range, only this function hands ports out, each once.
    """
    lo, _ = _ephemeral_range()
    if lo - 1024 >= 4096:
        for _ in range(200):
            port = _PORT_RNG.randrange(max(1024, lo - 12000), lo)
            if port in _PORTS_GIVEN:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _PORTS_GIVEN.add(port)
            return port
    with socket.socket() as s:         # an unusual port range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain(proc: subprocess.Popen, into: list) -> threading.Thread:
    """Keep reading a running process's output into `into`.

    A node logs every event to its stdout: a pipe nobody reads fills (64 KiB)
    and the node then blocks in its next log write, which a test sees as a
    node that stopped answering.
    """
    def read() -> None:
        for line in proc.stdout:
            into.append(line)

    t = threading.Thread(target=read, name="drain", daemon=True)
    t.start()
    return t


def cli(data: Path | None, *args: str, env: dict | None = None, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `cabinet ARGS --data DATA` as a real subprocess."""
    cmd = [sys.executable, "-m", "node", *args]
    if data is not None:
        cmd += ["--data", str(data)]
    return subprocess.run(cmd, cwd=ROOT, env=env or base_env(), input=input, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


@dataclass
class NodeProc:
    """A practice: its data folder and, while started, its `cabinet run` process."""

    data: Path
    name: str
    port: int
    node_id: str = ""
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def init(self, **details: str) -> "NodeProc":
        args = ["init", "--name", self.name, "--listen", f"127.0.0.1:{self.port}"]
        for k, v in details.items():
            args += [f"--{k}", v]
        out = ok(cli(self.data, *args))
        self.node_id = next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("Node ID:"))
        return self

    def start(self, *extra: str, timeout: float = 20) -> "NodeProc":
        cmd = [sys.executable, "-m", "node", "run", "--data", str(self.data), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if "listening" in line:
                self._reader = drain(self.proc, self.log)
                return self
        self.proc.kill()
        raise AssertionError(f"node {self.name} did not start:\n{''.join(self.log)}{self.proc.stdout.read()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if self._reader is None:
            self._reader = drain(self.proc, self.log)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)         # the output's end: the pipe closes when the process exits
        code, self.proc, self._reader = self.proc.returncode, None, None
        return code

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return cli(self.data, *args, **kw)

    def ok(self, *args: str) -> str:
        return ok(self.cli(*args))


@pytest.fixture
def practice(tmp_path):
    """Factory: practice("Dr X") -> an initialised (not started) NodeProc; all are stopped at the end."""
    made: list[NodeProc] = []

    def make(name: str, **details: str) -> NodeProc:
        n = NodeProc(tmp_path / name.replace(" ", "_"), name, free_port()).init(**details)
        made.append(n)
        return n

    yield make
    for n in made:
        if n.proc is not None:
            n.stop(signal.SIGKILL)


def db_rows(node: NodeProc, sql: str, args: tuple = ()) -> list[tuple]:
    """Read a node's database directly (read-only), as an auditor with the file would."""
    import sqlite3
    conn = sqlite3.connect(f"file:{node.data / 'cabinet.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def introduce(a: NodeProc, b: NodeProc) -> None:
    """Each adds the other as a contact from its exported descriptor file."""
    for x, y in ((a, b), (b, a)):
        f = x.data.parent / f"{x.data.name}.descriptor"
        x.ok("id", "--export", str(f))
        y.ok("contact", "add", str(f), "--id", x.node_id)


@pytest.fixture
def pair(practice):
    """Two running practices that know each other: a GP and a cardiologist."""
    gp = practice("Dr Anne Martin", specialty="general practice", city="Lyon")
    cardio = practice("Dr Paul Durand", specialty="cardiology", city="Lyon", rpps="10101010101")
    introduce(gp, cardio)
    gp.start()
    cardio.start()
    return gp, cardio
