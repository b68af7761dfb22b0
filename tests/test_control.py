"""The control socket: while `cabinet run` runs, commands are answered by it with no passphrase;
another uid is refused; bad requests get one line and the node keeps serving; a node started
locked is unlocked through its web page and then receives a referral."""

from __future__ import annotations

import json
import re
import os
import socket
import stat
import struct
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, base_env, db_rows, drain, free_port, introduce, ok, wait_for
from node.faces import control, control_client as cc

LETTER = "Cher confrère, merci de voir Mme Martin.\n"


def no_passphrase() -> dict[str, str]:
    env = base_env()
    env.pop("CABINET_PASSPHRASE")
    return env


def raw_ask(folder, payload: bytes, fds=()) -> dict:
    """Send raw bytes on the control socket; the one answer frame."""
    with cc.connect(folder) as sock:
        if fds:
            sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                __import__("array").array("i", fds))))])
        else:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return cc.recv_frame(sock)


def test_commands_through_the_socket_without_passphrase(pair, tmp_path):
    gp, cardio = pair
    sock = gp.data / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    letter = tmp_path / "lettre.txt"
    letter.write_text(LETTER)
    scan = tmp_path / "ecg.pdf"
    scan.write_bytes(b"%PDF-1.4 " + os.urandom(3000))
    env = no_passphrase()
    sent = ok(gp.cli("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--born", "1961-04-02",
                     "--subject", "Douleur", "--letter", str(letter), str(scan), env=env))
    rid = sent.split()[1]
    assert "delivered" in sent
    assert rid[:10] in ok(gp.cli("outbox", env=env))
    inbox = ok(cardio.cli("inbox", env=no_passphrase()))
    assert rid[:10] in inbox and "Jeanne Martin" in inbox
    shown = ok(cardio.cli("show", rid, env=no_passphrase()))
    assert "Cher confrère" in shown and "ecg.pdf" in shown
    out = tmp_path / "export"
    written = ok(cardio.cli("export", rid, str(out), env=no_passphrase()))
    assert (out / "ecg.pdf").read_bytes() == scan.read_bytes() and str(out / "ecg.pdf") in written
    assert rid[:10] in ok(cardio.cli("thread", rid, env=no_passphrase()))
    assert "Dr Anne Martin" in ok(cardio.cli("contact", "list", env=no_passphrase()))
    assert gp.node_id in ok(gp.cli("id", env=env))
    assert "intact" in ok(gp.cli("audit", "verify", env=env))
    reply = ok(cardio.cli("reply", rid, "--letter", str(letter), env=no_passphrase()))
    assert reply.startswith("Reply ")
    ok(gp.cli("token", "add", "ehr", "--scope", "read", env=env))
    assert "ehr" in ok(gp.cli("token", "list", env=env))
    # the commands were the node's: each is in its log, not a key derivation of their own
    wait_for(lambda: "control inbox ok" in (cardio.data / "node.log").read_text(), 10,
             "the node's log line (written on its log thread)")


def test_errors_through_the_socket_are_one_line(pair, tmp_path):
    gp, _ = pair
    env = no_passphrase()
    proc = gp.cli("show", "0123456789abcdef", env=env)
    assert proc.returncode != 0 and proc.stderr.startswith("cabinet: ") and proc.stderr.count("\n") == 1
    assert "no record" in proc.stderr.lower()
    missing = gp.cli("send", "--to", "Dr Paul Durand", "--patient", "X", "--letter", str(tmp_path / "nope.txt"),
                     env=env)
    assert missing.returncode == 2 and "letter file not found" in missing.stderr


def test_bad_requests_get_one_line_and_the_node_keeps_serving(pair):
    gp, _ = pair
    bad = [struct.pack(">I", 5) + b"nope!", struct.pack(">I", 2 << 20), b"\x00\x00",
           cc.encode({"v": 1, "cmd": "no-such", "args": {}, "fds": 0}),
           cc.encode({"v": 9, "cmd": "inbox"}), cc.encode(["a list"]),
           cc.encode({"v": 1, "cmd": "inbox", "args": {}, "fds": 3})]
    for payload in bad:
        answer = raw_ask(gp.data, payload)
        assert set(answer) == {"error", "exit"} and "\n" not in answer["error"], answer
    # a file descriptor more than announced is refused and closed, not leaked into a command
    r, w = os.pipe()
    try:
        answer = raw_ask(gp.data, cc.encode({"v": 1, "cmd": "inbox", "args": {}, "fds": 0}), fds=[r])
        assert "error" in answer
    finally:
        os.close(r)
        os.close(w)
    assert cc.ask(gp.data, "inbox", {}) == []
    assert "Inbox" in ok(gp.cli("inbox", env=no_passphrase()))


def test_another_uid_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert control.peer_uid(a) == os.getuid()
        assert control.caller_allowed(a, os.getuid())
        assert not control.caller_allowed(a, os.getuid() + 1)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as nobody")
def test_a_client_running_as_nobody_is_refused(pair):
    gp, _ = pair
    opened = [p for p in [gp.data, *gp.data.parents] if p != p.parent and not p.stat().st_mode & stat.S_IXOTH]
    for p in opened:                              # let nobody reach the socket file ...
        os.chmod(p, p.stat().st_mode | stat.S_IXOTH)
    os.chmod(gp.data / "control.sock", 0o666)     # ... and even connect: the uid check must refuse it
    try:
        code = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
                "s.sendall(bytes.fromhex(sys.argv[2]));print(s.recv(4096)[4:].decode())")
        # (the node answers before reading and then reads the request to its end: the send above never fails)
        proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                               "-c", code, str(gp.data / "control.sock"),
                               cc.encode({"v": 1, "cmd": "inbox", "args": {}, "fds": 0}).hex()],
                              capture_output=True, text=True, timeout=30)
        assert "another user" in proc.stdout, proc
    finally:
        os.chmod(gp.data / "control.sock", 0o600)
        for p in opened:
            os.chmod(p, p.stat().st_mode & ~stat.S_IXOTH)


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_locked_node_is_unlocked_from_the_web_then_receives(practice, tmp_path):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    introduce(gp, cardio)
    config = json.loads((cardio.data / "config.json").read_text())
    config["alerts"] = {"sign_ins": 1}          # one wrong passphrase is enough to be told here
    (cardio.data / "config.json").write_text(json.dumps(config))
    web_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "node", "run", "--locked", "--web", f"127.0.0.1:{web_port}",
                             "--data", str(cardio.data)], cwd=ROOT, env=no_passphrase(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cardio.proc = proc
    lines: list[str] = []
    try:
        line = proc.stdout.readline()
        lines.append(line)
        assert "locked" in line, lines
        # locked: the socket says so, no command runs, and the API is not there
        locked = cardio.cli("inbox", env=no_passphrase())
        assert locked.returncode != 0 and "locked: unlock it in the web app" in locked.stderr
        # status, for IT and monitoring: no passphrase asked, "locked" said, exit 3 (a person is needed)
        status = cardio.cli("status", env=no_passphrase())
        assert status.returncode == 3 and "locked: unlock it in the web app" in status.stdout, status
        assert json.loads(cardio.cli("status", "--json", env=no_passphrase()).stdout)["state"] == "locked"
        base = f"http://127.0.0.1:{web_port}"
        status, state = _http(f"{base}/api/unlock")
        assert status == 200 and state["locked"] is True
        body = json.dumps({"passphrase": "wrong horse battery"}).encode()
        hdr = {"Content-Type": "application/json", "X-CSRF-Token": state["csrf"]}
        assert _http(f"{base}/api/unlock", body, {"Content-Type": "application/json"})[0] == 403
        assert _http(f"{base}/api/unlock", body, hdr)[0] == 401
        assert _http(f"{base}/api/unlock", body, hdr)[0] == 429          # slowed down after a failure
        good = json.dumps({"passphrase": "correct horse battery"}).encode()
        status, answer = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(_http(f"{base}/api/unlock", good,
                                                                                         hdr)), 30, "the unlock")
        assert answer == {"locked": False}
        while "listening" not in line:
            line = proc.stdout.readline()
            assert line, lines
            lines.append(line)
        cardio._reader = drain(proc, lines)        # read on: a full pipe would stop the node at its next log line
        letter = tmp_path / "l.txt"
        letter.write_text(LETTER)
        gp.start()
        sent = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(letter))
        assert "delivered" in sent
        assert sent.split()[1][:10] in ok(cardio.cli("inbox", env=no_passphrase()))
        wait_for(lambda: "unlock failed" in (cardio.data / "node.log").read_text(), 10, "the unlock line")
        log = (cardio.data / "node.log").read_text()
        assert "wrong horse" not in log and "correct horse" not in log
        # The wrong passphrase typed while it was locked is in the audit log and raised an alert.
        details = [d for (d,) in db_rows(cardio, "SELECT detail FROM audit WHERE event = 'unlock-failed'")]
        assert len(details) == 1 and json.loads(details[0])["count"] == 1, details
        alerts = ok(cardio.cli("alerts", env=no_passphrase()))      # through the running node: no passphrase
        assert "failed-sign-ins" in alerts and "(passphrase)" in alerts, alerts
        alert_id = re.search(r"#(\d+)", alerts).group(1)
        assert "acknowledged" in ok(cardio.cli("alerts", "ack", alert_id, env=no_passphrase()))
        assert ok(cardio.cli("alerts", env=no_passphrase())).strip() == "No open alerts."
        status = cardio.cli("status", "--no-check", env=no_passphrase())
        assert status.returncode in (0, 3) and "state       running" in status.stdout, status
    finally:
        cardio.stop()
