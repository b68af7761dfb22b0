"""The web app's own TLS certificate (node/faces/web/cert.py), beyond loopback without --web-cert.

Real `cabinet run --web 0.0.0.0:PORT` processes (clients connect to 127.0.0.1 only), the real
maker child process, the standard library's TLS client.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from conftest import PASSPHRASE, cli, ok, wait_for
from node.faces.web import cert as webcert
from node.node import Node

FP = re.compile(r"web certificate SHA-256 fingerprint ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")


def start(n, port: int) -> str:
    """Start the node serving its web app on every address; the fingerprint it prints."""
    n.log.clear()
    n.start("--web", f"0.0.0.0:{port}", "--no-lan", "--no-port-mapping")
    found = wait_for(lambda: FP.search("".join(n.log)), 60, "the web certificate's fingerprint line")
    return found.group(1)


def colon_sha256(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def served_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # only to read what is served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
    assert der
    return der


def get_verified(port: int, cafile: Path, name: str, path: str = "/login") -> str:
    """GET over TLS verified against `cafile` for `name` (SNI, hostname check, Host header)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            host = f"[{name}]" if ":" in name else name
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    return data.decode("latin-1").split("\r\n", 1)[0]


def rust_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "_rust.abi3.so" in maps or "/cryptography/" in maps


async def test_served_certificate_pinned_verified_and_key_sealed(practice):
    from conftest import free_port
    a = practice("Dr A")
    port = free_port()
    fp = start(a, port)
    folder = a.data / "web-tls"
    pem = folder / "cert.pem"
    der = served_der(port)
    assert colon_sha256(der) == fp == colon_sha256(ssl.PEM_cert_to_DER_cert(pem.read_text()))
    info = json.loads((folder / "cert.json").read_text())
    hostname = socket.gethostname().lower()
    assert hostname in info["dns"] and hostname.split(".")[0] + ".local" in info["dns"]
    assert info["not_after"] - time.time() > 396 * 86400
    # a browser that trusts cert.pem: verified for every name it covers, for no other
    for name in [info["dns"][0], hostname.split(".")[0] + ".local"] + info["ips"][:1]:
        assert get_verified(port, pem, name).startswith("HTTP/1.1 200"), name
    with pytest.raises(ssl.SSLCertVerificationError):
        get_verified(port, pem, "not-this-box.example")
    # the running node never loaded `cryptography`: the maker was a child process
    assert a.proc is not None and not rust_loaded(a.proc.pid)
    a.stop()
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    # key.pem is encrypted: no password, no key
    for wrong in (b"", b"not the password"):
        with pytest.raises(ssl.SSLError):
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(pem, folder / "key.pem",
                                                                                password=wrong)
    # its password opens only with the node's unlocked secrets, and is nowhere in the folder in clear
    async with Node.open(a.data, passphrase=PASSPHRASE) as node:
        password = node.open_secret(webcert.PURPOSE, (folder / "key.pass").read_bytes())
    assert len(password) >= 32
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(pem, folder / "key.pem", password=password)
    for f in a.data.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert password not in data and password.hex().encode() not in data, f


async def test_reused_across_restarts_and_renewed(practice):
    from conftest import free_port
    a = practice("Dr A")
    port = free_port()
    first = start(a, port)
    a.stop()
    assert start(a, port) == first                      # the same certificate after a restart
    assert "new web certificate" not in "".join(a.log)
    a.stop()
    async with Node.open(a.data, passphrase=PASSPHRASE) as node:
        short = await webcert.make(node, "0.0.0.0", days=10)    # 10 days left: under RENEW_DAYS
    assert short.sha256 != first and short.not_after - time.time() < 11 * 86400
    renewed = start(a, port)
    assert renewed not in (first, short.sha256) and "it expires on" in "".join(a.log)
    assert colon_sha256(served_der(port)) == renewed
    info = json.loads((a.data / "web-tls" / "cert.json").read_text())
    assert info["sha256"] == renewed and info["not_after"] - time.time() > 396 * 86400
    a.stop()
    async with Node.open(a.data, passphrase=PASSPHRASE) as node:
        same = await webcert.ensure(node, "0.0.0.0")
        assert same.sha256 == renewed
        named = await webcert.ensure(node, "cabinet-box.example")     # a name the certificate lacks
        assert named.sha256 != renewed and "cabinet-box.example" in named.dns
        (a.data / "web-tls" / "cert.pem").write_text((a.data / "web-tls" / "cert.pem").read_text()
                                                     .replace("A", "B", 1))    # damaged: made anew
        again = await webcert.ensure(node, "cabinet-box.example")
        assert again.sha256 != named.sha256 and again.context is not None


def test_web_cert_command_prints_exports_and_renews(practice, tmp_path):
    a = practice("Dr A")
    missing = a.cli("web-cert")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert "no usable web certificate" in missing.stderr and "Traceback" not in missing.stderr
    from conftest import free_port
    fp = start(a, free_port())
    a.stop()
    shown = a.ok("web-cert")
    assert fp in shown and socket.gethostname().lower() in shown and "days left" in shown
    out = tmp_path / "cabinet-web.pem"
    a.ok("web-cert", "--export", str(out))
    exported = out.read_text()
    assert exported == (a.data / "web-tls" / "cert.pem").read_text()
    assert "PRIVATE KEY" not in exported and exported.count("BEGIN CERTIFICATE") == 1
    renewed = a.ok("web-cert", "--renew")
    new_fp = json.loads((a.data / "web-tls" / "cert.json").read_text())["sha256"]
    assert new_fp != fp and new_fp in renewed and "restart" in renewed


def test_locked_beyond_loopback_without_certificate_is_refused(practice):
    a = practice("Dr A")
    from conftest import free_port
    r = a.cli("run", "--locked", "--web", f"0.0.0.0:{free_port()}", "--no-lan", timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "locked node cannot serve its own web certificate" in r.stderr
    assert not (a.data / "web-tls").exists()


def test_maker_refuses_bad_requests():
    import subprocess
    import sys
    from conftest import ROOT
    for request in ({"dns": ["x"], "ips": [], "days": 10, "password": "short"},
                    {"dns": ["x"], "ips": ["not-an-ip"], "days": 10, "password": "p" * 32},
                    {"dns": ["x"], "ips": [], "days": 400, "password": "p" * 32}):
        r = subprocess.run([sys.executable, "-m", "node.faces.web.cert"], cwd=ROOT, input=json.dumps(request),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
        assert "p" * 32 not in r.stderr
