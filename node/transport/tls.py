"""TLS 1.3 between nodes, with certificates bound to the nodes' identity keys.

At start a node makes an ephemeral TLS key (Ed25519) and a self-signed X.509
certificate for it. The certificate carries, in a private extension, a statement
signed by the node's identity key over the TLS key: `b"cabinet/tls\\0" +
msgpack([SubjectPublicKeyInfo DER, expires_ms])`. No CA is involved: a caller
checks that statement against the identity key it pinned for the node it meant
to call (`IdentityPin`), before a single request byte is sent; TLS itself proves
that the server holds the certificate's private key. See docs/transport.md.

Certificates are written and read with PyNaCl and the small DER codec of
node/core/der.py: a running node never loads the `cryptography` package (about
8 MiB of resident memory on a small box; tests/test_tls.py checks both, and
cross-checks every byte against `cryptography`).

The TLS private key never touches the data folder. OpenSSL takes it only from a
path, so it goes, as unencrypted PKCS#8, into an anonymous memory file (memfd)
read through /proc/self/fd/N and closed at once. Encrypting it there, as this
module once did, added nothing: another process opens /proc/PID/fd/N only if it
passes the kernel's ptrace check (the same user, Yama absent or ptrace_scope 0;
root), which also lets it read the memory, where the password was and where the
key stays, in OpenSSL's context, all day. The exception is Yama's ptrace_scope 1
(Ubuntu): memory then needs ptrace "attach" rights (an ancestor's), the fd only
"read" rights (any process of the same user), so such a process racing the
microseconds of a load, once a day, now gets the key rather than ciphertext;
running the node as its own user (`cabinet service install`) leaves no such
process. Without memfd the key goes through a 0600 temporary file removed at
once: while it exists the same user can read it, and on a disk-backed temporary
folder its bytes may reach the disk and stay in free blocks, which the
encryption prevented. docs/transport.md says the same at more length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from typing import Iterator

import aiohttp
import nacl.exceptions
import nacl.signing

from ..core import crypto, der, wire
from ..core.errors import AuthenticationFailed, InvalidSignature, ProtocolError
from ..core.identity import Identity

# A private OID (2.25 = UUID arc, ITU-T X.667): no registration needed, no clash possible.
BINDING_OID = "2.25.150961934245718153364389095264582117713"
ED25519_OID = "1.3.101.112"                    # RFC 8410: the key and signature algorithm, no parameters
COMMON_NAME_OID = "2.5.4.3"
DOMAIN = "tls"
LIFETIME_MS = 30 * 24 * 3600 * 1000          # a binding is good for 30 days ...
RENEW_EVERY = 24 * 3600.0                     # ... and a running server makes a new one every day
HANDSHAKE_TIMEOUT = 10.0                      # seconds a connection may take to finish its handshake
_DAY_S = 24 * 3600
_ED25519 = der.sequence(der.oid(ED25519_OID))
_NAME = der.sequence(der.set_of(der.sequence(der.oid(COMMON_NAME_OID),
                                             der.utf8_string("cabinet node"))))   # says nothing about whom


def binding_message(spki_der: bytes, expires_ms: int) -> bytes:
    return wire.pack([spki_der, expires_ms])


def ed25519_spki(public: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of an Ed25519 key: 30 2a 30 05 06 03 2b 65 70 03 21 00 || key."""
    return der.sequence(_ED25519, der.bit_string(public))


def ed25519_pkcs8(seed: bytes) -> bytes:
    """Unencrypted PKCS#8 DER of an Ed25519 key: 30 2e 02 01 00 30 05 06 03 2b 65 70 04 22 04 20 || seed."""
    return der.sequence(der.integer(0), _ED25519, der.octet_string(der.octet_string(seed)))


def make_certificate(identity: Identity, now_ms: int, lifetime_ms: int = LIFETIME_MS) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted PKCS#8 private key PEM) for a fresh ephemeral TLS key."""
    key = nacl.signing.SigningKey.generate()
    spki = ed25519_spki(key.verify_key.encode())
    expires = now_ms + lifetime_ms
    statement = wire.pack({"expires": expires, "sig": identity.sign(DOMAIN, binding_message(spki, expires))})
    serial = (int.from_bytes(os.urandom(20), "big") >> 1) | 1        # positive, 159 random bits
    tbs = der.sequence(
        der.explicit(0, der.integer(2)),                                # X.509 v3
        der.integer(serial), _ED25519, _NAME,
        der.sequence(der.time(now_ms // 1000 - _DAY_S), der.time(expires // 1000)),
        _NAME, spki,
        der.explicit(3, der.sequence(                                   # one non-critical extension
            der.sequence(der.oid(BINDING_OID), der.octet_string(statement)))))
    cert = der.sequence(tbs, _ED25519, der.bit_string(key.sign(tbs).signature))
    return der.pem("CERTIFICATE", cert), der.pem("PRIVATE KEY", ed25519_pkcs8(key.encode()))


def _binding_of(cert_der: bytes) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, binding extension value) of a self-signed X.509 v3 certificate
    for an Ed25519 key; DERError for anything else.

    TLS's CertificateVerify already proves that the peer holds the key; checking the
    self-signature as well costs one verification and makes any altered byte a refusal."""
    parts = der.children(der.decode(cert_der), der.SEQUENCE)
    if len(parts) != 3 or parts[1].encoded != _ED25519:
        raise der.DERError("not a certificate signed with Ed25519")
    fields = der.children(parts[0], der.SEQUENCE)
    if len(fields) < 8 or der.to_int(der.decode(der.expect(fields[0], der.context(0)).content)) != 2:
        raise der.DERError("not an X.509 v3 certificate with extensions")
    spki = der.expect(fields[6], der.SEQUENCE).encoded
    if fields[2].encoded != _ED25519 or len(spki) != 44 or spki != ed25519_spki(spki[12:]):
        raise der.DERError("the certificate's key is not an Ed25519 key")
    try:
        nacl.signing.VerifyKey(spki[12:]).verify(parts[0].encoded, der.to_bits(parts[2]))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        raise der.DERError("the certificate's self-signature does not verify") from None
    if fields[-1].tag != der.context(3):
        raise der.DERError("the certificate has no extensions")
    found = []
    for extension in der.children(der.decode(fields[-1].content), der.SEQUENCE):
        items = der.children(extension, der.SEQUENCE)
        if len(items) == 3:
            der.to_bool(items[1])
        elif len(items) != 2:
            raise der.DERError("malformed extension")
        if der.to_oid(items[0]) == BINDING_OID:
            found.append(der.to_octets(items[-1]))
    if len(found) != 1:
        raise der.DERError("the certificate has no binding, or more than one")
    return spki, found[0]


def check_certificate(der_bytes: bytes | None, sign_key: bytes, now_ms: int) -> None:
    """Raise AuthenticationFailed unless the certificate's TLS key is bound to `sign_key`, unexpired."""
    if not der_bytes:
        raise AuthenticationFailed("the peer presented no TLS certificate")
    try:
        spki, raw = _binding_of(der_bytes)
        statement = wire.unpack(raw, max_size=1024, what="TLS binding")
        expires = wire.field(statement, "expires", int, what="TLS binding")
        sig = wire.field(statement, "sig", bytes, what="TLS binding")
        crypto.verify(sign_key, DOMAIN, binding_message(spki, expires), sig)
    except (ProtocolError, InvalidSignature):
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
        cert_pem, key_pem = make_certificate(self.identity, now_ms)
        with _key_file(cert_pem + key_pem) as path:
            self.context.load_cert_chain(path)
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
