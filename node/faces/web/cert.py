"""The web app's own TLS certificate, for a node that serves the practice's PCs (`--web` beyond loopback).

Made the first time and kept in DATA/web-tls/: cert.pem; key.pem (ECDSA P-256, PKCS#8 PEM encrypted
with a random password); key.pass (that password sealed under a key the node derives from its
storage key, `Node.seal_secret`: the disk alone never yields a usable key); cert.json (fingerprint,
validity and names as the maker wrote them). Renewed, a new key and certificate, when fewer than
RENEW_DAYS are left or when its names no longer cover the --web host or this machine's name.

The running node never imports `cryptography` (its memory budget): `make` runs this module as a
short-lived child process (`python -m node.faces.web.cert`: JSON in on stdin, JSON out on stdout),
which alone builds the key and the certificate. The node reads a stored certificate with the
standard library only: cert.json is bound to cert.pem by the SHA-256 of its DER, and
`load_cert_chain(password=)` proves that key, password and certificate belong together.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ...node import Node

log = logging.getLogger("cabinet.web")

FOLDER, CERT, KEY, PASS, INFO = "web-tls", "cert.pem", "key.pem", "key.pass", "cert.json"
PURPOSE = "web-tls-key"
VALID_DAYS = 397             # the longest validity browsers accept for a server certificate
RENEW_DAYS = 30
CHILD_TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[3]
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class Unusable(Exception):
    """The stored certificate cannot be used (the reason, one line): a new one is made."""


@dataclasses.dataclass(frozen=True)
class WebCert:
    folder: Path
    sha256: str                  # AB:CD:... as browsers show it
    not_before: int              # Unix seconds
    not_after: int
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    host: str                    # the --web host it was made for
    context: ssl.SSLContext | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def path(self) -> Path:
        return self.folder / CERT

    @property
    def hosts(self) -> list[str]:
        """What a browser may send as Host (without the port) for these names."""
        return list(self.dns) + [f"[{ip}]" if ":" in ip else ip for ip in self.ips]


def fingerprint(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def der_of(pem: str) -> bytes:
    try:
        return ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        raise Unusable("cert.pem is not a PEM certificate") from None


# --- which names the certificate covers ----------------------------------------------------

def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def required_names(host: str) -> list[str]:
    """The --web host (a name or a specific address) and this machine's name: a certificate that
    does not cover all of them is renewed."""
    names = [host.strip("[]").lower()]
    hostname = socket.gethostname().lower()
    names += [hostname, hostname.split(".")[0] + ".local"]
    out = []
    for n in names:
        ip = _ip(n)
        if (ip is not None and not (ip.is_unspecified or ip.is_loopback)) or (ip is None and _valid_name(n)):
            out.append(str(ip) if ip is not None else n)
    return list(dict.fromkeys(out))


def local_addresses() -> list[str]:
    """This machine's non-loopback, non-link-local addresses: IPv4 per interface (SIOCGIFADDR),
    IPv6 from /proc/net/if_inet6 (Linux; elsewhere only what the host name resolves to)."""
    found: list[str] = []
    with contextlib.suppress(ImportError, OSError, AttributeError):     # no fcntl or no interfaces: none
        import fcntl
        import struct
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:                 # no IPv4 address on this interface
                    continue
                found.append(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError, ValueError, IndexError):          # not Linux, or no IPv6
        for line in Path("/proc/net/if_inet6").read_text("ascii").splitlines():
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    if not found:
        with contextlib.suppress(OSError):                              # the host name does not resolve
            found = [str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None)]
    ips = [ip for ip in map(_ip, found) if ip is not None and not (ip.is_loopback or ip.is_link_local
                                                                   or ip.is_unspecified)]
    return [str(ip) for ip in dict.fromkeys(ips)]


def names_for(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) for a new certificate: the required names and the local addresses."""
    dns: list[str] = []
    ips: list[str] = []
    for n in required_names(host) + local_addresses():
        (dns if _ip(n) is None else ips).append(n)
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


def covers(cert: WebCert, host: str) -> bool:
    return all(n in cert.dns or n in cert.ips for n in required_names(host))


# --- reading and storing, without `cryptography` -------------------------------------------

def load(folder: Path, open_secret: Callable[[str, bytes], bytes] | None = None) -> WebCert:
    """The stored certificate, its details checked against cert.pem; with `open_secret` (the node's),
    also its key opened and an SSLContext ready. Raises Unusable."""
    try:
        info = json.loads((folder / INFO).read_text("utf-8"))
        pem = (folder / CERT).read_text("ascii")
        cert = WebCert(folder, str(info["sha256"]), int(info["not_before"]), int(info["not_after"]),
                       tuple(map(str, info["dns"])), tuple(map(str, info["ips"])), str(info["host"]))
    except FileNotFoundError:
        raise Unusable("none yet") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Unusable(f"its files are damaged ({exc.__class__.__name__})") from None
    if fingerprint(der_of(pem)) != cert.sha256:
        raise Unusable("cert.json does not describe cert.pem")
    if open_secret is None:
        return cert
    from ...node import CabinetError
    from .server import tls_context
    try:
        password = open_secret(PURPOSE, (folder / PASS).read_bytes())
        ctx = tls_context((folder / CERT, folder / KEY), password=password)
    except (OSError, CabinetError) as exc:
        raise Unusable(f"its key cannot be used ({exc.__class__.__name__})") from None
    assert ctx is not None
    return dataclasses.replace(cert, context=ctx)


def _store(folder: Path, made: dict, sealed: bytes, host: str) -> None:
    from ...node import write_private
    folder.mkdir(mode=0o700, exist_ok=True)
    info = {k: made[k] for k in ("sha256", "not_before", "not_after", "dns", "ips")} | {"host": host}
    for name, data in ((KEY, made["key"].encode()), (PASS, sealed), (CERT, made["cert"].encode()),
                       (INFO, json.dumps(info, indent=1).encode())):      # cert.json last: it marks a whole set
        write_private(folder / name, data)                                  # each fsynced, with the folder


async def _child(request: dict) -> dict:
    """Run the maker (this module as a program) and return its checked answer."""
    from ...node import UsageError
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.faces.web.cert", cwd=ROOT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(request).encode()), CHILD_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise UsageError("could not make the web certificate: its maker did not answer") from None
    if proc.returncode != 0:
        last = (err.decode("utf-8", "replace").strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
        raise UsageError(f"could not make the web certificate: {last[:200]}")
    try:
        made = json.loads(out)
        ok = (made["key"].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
              and fingerprint(ssl.PEM_cert_to_DER_cert(made["cert"])) == made["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UsageError("could not make the web certificate: its maker gave an unusable answer")
    return made


async def make(node: "Node", host: str, *, days: float = VALID_DAYS) -> WebCert:
    """A new key and certificate for `host`, stored in DATA/web-tls/, loaded and ready."""
    dns, ips = await asyncio.to_thread(names_for, host)     # reads /proc, may resolve the host name
    password = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=")
    made = await _child({"dns": dns, "ips": ips, "days": days, "password": password.decode()})
    folder = Path(node.folder) / FOLDER
    await asyncio.to_thread(_store, folder, made, node.seal_secret(PURPOSE, password), host)
    cert = await asyncio.to_thread(load, folder, node.open_secret)
    log.info("new web certificate, SHA-256 %s, valid until %s", cert.sha256, _day(cert.not_after))
    return cert


async def ensure(node: "Node", host: str, *, days: float = VALID_DAYS, now: float | None = None) -> WebCert:
    """The node's web certificate for `host`: the stored one while it is good, else a new one."""
    folder = Path(node.folder) / FOLDER
    now = time.time() if now is None else now
    try:
        cert = await asyncio.to_thread(load, folder, node.open_secret)
        if cert.not_before > now or cert.not_after - now < RENEW_DAYS * 86400:
            raise Unusable(f"it expires on {_day(cert.not_after)}")
        if not covers(cert, host):
            raise Unusable(f"it does not name {', '.join(required_names(host))}")
        return cert
    except Unusable as why:
        log.info("making a web certificate: the stored one is not usable: %s", why)
    return await make(node, host, days=days)


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def describe(cert: WebCert) -> list[str]:
    left = int((cert.not_after - time.time()) // 86400)
    return [f"Web certificate {cert.path}",
            f"SHA-256  {cert.sha256}",
            f"Valid    {_day(cert.not_before)} to {_day(cert.not_after)} (UTC; {left} days left)",
            f"Names    {', '.join(cert.dns + cert.ips)}"]


# --- `cabinet web-cert` ----------------------------------------------------------------------

async def command(a) -> int:
    """Print the certificate's fingerprint, validity and names; --renew makes a new one (the
    passphrase opens the folder); --export FILE writes the certificate (never its key)."""
    from ...node import Node, UsageError, parse_listen
    folder = Path(a.data) / FOLDER
    if a.renew:
        from ..prompt import passphrase
        try:
            host = parse_listen(a.web)[0] if a.web else load(folder).host
        except Unusable:
            raise UsageError("no web certificate yet: give --web HOST:PORT, where 'cabinet run --web' listens") from None
        async with Node.open(a.data, passphrase=passphrase()) as node:
            cert = await make(node, host)
        print("New web certificate: restart 'cabinet run' to serve it.")
    else:
        try:
            cert = load(folder)
        except Unusable as why:
            raise UsageError(f"no usable web certificate in {folder} ({why}): 'cabinet run --web HOST:PORT' "
                             "beyond this computer makes one, or 'cabinet web-cert --renew --web HOST:PORT'") from None
    if a.export:
        Path(a.export).write_bytes(cert.path.read_bytes())
        print(f"Certificate (not its key) written to {a.export}")
    print("\n".join(describe(cert)))
    return 0


# --- the maker: run as a child process, the only code that imports `cryptography` ----------

def generate(request: dict) -> dict:
    """{"dns", "ips", "days", "password"} -> {"cert", "key" (encrypted PKCS#8), "sha256", "not_before",
    "not_after", "dns", "ips"}."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dns = [str(n) for n in request["dns"]]
    ips = [ipaddress.ip_address(str(i)) for i in request["ips"]]
    password, days = str(request["password"]).encode(), float(request["days"])
    if len(password) < 16 or not 0 < days <= VALID_DAYS:
        raise ValueError("a password of 16 characters or more and 0 < days <= 397 are needed")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ["cabinet"])[0][:64])])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]
                                                       + [x509.IPAddress(i) for i in ips]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(password))
    return {"cert": cert.public_bytes(serialization.Encoding.PEM).decode(), "key": key_pem.decode(),
            "sha256": fingerprint(cert.public_bytes(serialization.Encoding.DER)),
            "not_before": int(start.timestamp()), "not_after": int(end.timestamp()),
            "dns": dns, "ips": [str(i) for i in ips]}


def _main() -> int:
    try:
        made = generate(json.loads(sys.stdin.buffer.read(1 << 16)))
    except Exception as exc:            # one line for the node, which reports it
        print(f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(made))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
