"""TLS 1.3 between nodes, with certificates bound to the nodes' identity keys.

At start a node makes an ephemeral TLS key (Ed25519) and a self-signed X.509
certificate for it. The certificate carries, in a private extension, a statement
signed by the node's identity key over the TLS key: `b"cabinet/tls\\0" +
msgpack([SubjectPublicKeyInfo DER, expires_ms])`. No CA is involved: a caller
checks that statement against the identity key it pinned for the node it meant
to call (`IdentityPin`), before a single request byte is sent; TLS itself proves
that the server holds the certificate's private key. See docs/transport.md.

The TLS private key never touches the data folder: it is encrypted with a random
password held only in memory and handed to OpenSSL through an anonymous memory
file (memfd); where there is none, through a 0600 temporary file removed at once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import ssl
import tempfile
from typing import Iterator

import aiohttp
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..core import crypto, wire
from ..core.errors import AuthenticationFailed, InvalidSignature, ProtocolError
from ..core.identity import Identity

# A private OID (2.25 = UUID arc, ITU-T X.667): no registration needed, no clash possible.
BINDING_OID = x509.ObjectIdentifier("2.25.150961934245718153364389095264582117713")
DOMAIN = "tls"
LIFETIME_MS = 30 * 24 * 3600 * 1000          # a binding is good for 30 days ...
RENEW_EVERY = 24 * 3600.0                     # ... and a running server makes a new one every day
HANDSHAKE_TIMEOUT = 10.0                      # seconds a connection may take to finish its handshake
_DAY = datetime.timedelta(days=1)


def binding_message(spki_der: bytes, expires_ms: int) -> bytes:
    return wire.pack([spki_der, expires_ms])


def make_certificate(identity: Identity, now_ms: int, lifetime_ms: int = LIFETIME_MS) -> tuple[bytes, bytes, bytes]:
    """(certificate PEM, encrypted private key PEM, its password) for a fresh ephemeral TLS key."""
    key = ed25519.Ed25519PrivateKey.generate()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expires = now_ms + lifetime_ms
    statement = wire.pack({"expires": expires, "sig": identity.sign(DOMAIN, binding_message(spki, expires))})
    now = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "cabinet node")])   # says nothing about whom
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(datetime.datetime.fromtimestamp(expires / 1000, datetime.timezone.utc))
            .add_extension(x509.UnrecognizedExtension(BINDING_OID, statement), critical=False)
            .sign(key, None))
    password = os.urandom(32).hex().encode("ascii")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(password))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, password


def check_certificate(der: bytes | None, sign_key: bytes, now_ms: int) -> None:
    """Raise AuthenticationFailed unless the certificate's TLS key is bound to `sign_key`, unexpired."""
    if not der:
        raise AuthenticationFailed("the peer presented no TLS certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        raw = cert.extensions.get_extension_for_oid(BINDING_OID).value
        statement = wire.unpack(raw.value if isinstance(raw, x509.UnrecognizedExtension) else b"",
                                max_size=1024, what="TLS binding")
        expires = wire.field(statement, "expires", int, what="TLS binding")
        sig = wire.field(statement, "sig", bytes, what="TLS binding")
        crypto.verify(sign_key, DOMAIN, binding_message(spki, expires), sig)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound, ProtocolError, InvalidSignature):
        raise AuthenticationFailed("the peer's TLS certificate is not signed by the expected node") from None
    if expires < now_ms:
        raise AuthenticationFailed("the peer's TLS certificate binding has expired")


@contextlib.contextmanager
def _key_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read `data` from: a memory file, else a 0600 temporary file removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("cabinet-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="cabinet-tls-")      # 0600, in the system's temporary folder
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.unlink(path)


class ServerTLS:
    """The server's TLS 1.3 context, with a certificate bound to the identity; `renew()` replaces it."""

    def __init__(self, identity: Identity, now_ms: int) -> None:
        self.identity = identity
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
        self.context.set_alpn_protocols(["http/1.1"])
        self.certificate = b""
        self.renew(now_ms)

    def renew(self, now_ms: int, identity: Identity | None = None) -> None:
        """A new ephemeral key and certificate for the connections that start from now on."""
        self.identity = identity or self.identity
        cert_pem, key_pem, password = make_certificate(self.identity, now_ms)
        with _key_file(cert_pem + key_pem) as path:
            self.context.load_cert_chain(path, password=password)
        self.certificate = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii"))


class IdentityPin(aiohttp.Fingerprint):
    """aiohttp's certificate check, run on each new connection before any request is written:
    TLS 1.3 and a certificate bound to the identity key of the node the caller meant to reach.

    aiohttp pools connections per pin object, so a client keeps one pin per identity key.
    """

    def __init__(self, sign_key: bytes, clock) -> None:
        super().__init__(hashlib.sha256(sign_key).digest())
        self.sign_key, self._clock = sign_key, clock
        self.last_version: str | None = None
        self.last_reason = ""

    def check(self, transport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            return                                  # plain http:// (an older descriptor's address)
        self.last_version = sslobj.version()
        try:
            if self.last_version != "TLSv1.3":
                raise AuthenticationFailed(f"the peer speaks {self.last_version}, not TLS 1.3")
            check_certificate(sslobj.getpeercert(binary_form=True), self.sign_key, self._clock())
        except AuthenticationFailed as exc:
            self.last_reason = str(exc)
            peer = transport.get_extra_info("peername") or ("?", 0)
            raise aiohttp.ServerFingerprintMismatch(self.fingerprint, b"", peer[0], peer[1]) from None
