"""Node-to-node traffic in TLS 1.3, with certificates bound to the nodes' identity keys.

Real nodes on 127.0.0.1, a real TCP relay between them that records every byte
(what a network observer sees), and an impostor serving a certificate bound to
another identity at a contact's address.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from conftest import PASSPHRASE
from node import Node
from node.core import crypto, der, wire
from node.core.errors import AuthenticationFailed, NotFound
from node.core.identity import Identity, node_id_bytes
from node.store import records
from node.transport import auth, tls
from node.transport.client import Client, Peer
from node.transport.server import Server

CANARY = "Zoé CANARY-4b1d Vasquez"


class Relay:
    """A TCP relay on 127.0.0.1 that keeps every byte it forwards, both ways."""

    def __init__(self) -> None:
        self.target_port = 0
        self.seen = bytearray()
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while piece := await src.read(65536):
                    self.seen += piece
                    dst.write(piece)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def make(tmp_path, name: str, advertise: tuple[str, ...] = ()) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", advertise=advertise, lan=False)
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


def referral_letter(tmp_path) -> os.PathLike:
    letter = tmp_path / "lettre.txt"
    letter.write_text(f"Cher confrère, je vous adresse {CANARY} pour une douleur thoracique.")
    return letter


async def test_a_referral_crosses_a_relay_in_tls_1_3_and_the_relay_sees_no_identifier(tmp_path):
    relay = Relay()
    relay_port = await relay.start()
    a = await make(tmp_path, "A")
    b = await make(tmp_path, "B", advertise=(f"https://127.0.0.1:{relay_port}",))
    relay.target_port = b._server.port
    try:
        assert b.descriptor.addresses == (f"https://127.0.0.1:{relay_port}",)
        await a.add_contact(b.descriptor.signed)
        await b.add_contact(a.descriptor.signed)
        res = await a.send_referral(to="B", patient=CANARY, subject="Douleur thoracique",
                                    letter=referral_letter(tmp_path), deliver=False)
        assert await a.courier.deliver_record(res.record_id) == {}
        assert {d["recipient"]: d["state"] for d in await a.outbox(res.record_id)}[b.node_id] == "delivered"
        assert (await b.read(res.record_id)).summary.sender == a.node_id
        # Over TLS 1.3, checked against B's identity key before the first request byte.
        assert a.client.pin(b.identity.sign_public).last_version == "TLSv1.3"
        assert relay.connections >= 1 and len(relay.seen) > 1000
        seen = bytes(relay.seen)
        for secret in (res.record_id.encode(), bytes.fromhex(res.record_id), a.node_id.encode(), b.node_id.encode(),
                       node_id_bytes(a.identity.sign_public), node_id_bytes(b.identity.sign_public),
                       b"/v1/", b"Cabinet-", b"HTTP/1.1", CANARY.encode(), b"CANARY", b"Vasquez",
                       b.identity.sign_public, a.identity.sign_public):
            assert secret not in seen, secret
    finally:
        await a.close()
        await b.close()
        await relay.stop()


async def test_the_node_speaks_only_tls_1_3(tmp_path):
    b = await make(tmp_path, "B")
    port = b._server.port
    try:
        assert b.descriptor.addresses == (f"https://127.0.0.1:{port}",)
        # Plain HTTP gets no HTTP answer at all.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/descriptor HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(15):
            answer = await reader.read()
        writer.close()
        assert not answer.startswith(b"HTTP/") and b.descriptor.signed not in answer
        # A client that stops at TLS 1.2 is refused in the handshake.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            async with asyncio.timeout(15):
                await asyncio.open_connection("127.0.0.1", port, ssl=old)
        # TLS 1.3, and the certificate is bound to B's identity key.
        new = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        new.check_hostname, new.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=new)
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() == "TLSv1.3"
        tls.check_certificate(sslobj.getpeercert(binary_form=True), b.identity.sign_public, auth.now_ms())
        writer.close()
        # The public descriptor is still there for anyone, over TLS.
        client = Client(Identity.generate())
        try:
            assert await client.fetch_descriptor(b.descriptor.addresses[0]) == b.descriptor.signed
        finally:
            await client.close()
    finally:
        await b.close()


class Impostor:
    """The Handler port of a node that answers at a contact's address: it records any request."""

    def __init__(self, identity: Identity) -> None:
        self.identity, self.asked = identity, []

    def descriptor_bytes(self) -> bytes:
        return b"not yours"

    async def pinned_key(self, node_id: str):
        self.asked.append(node_id)
        return None, None


async def test_an_impostor_at_a_contacts_address_is_refused_before_any_request(tmp_path):
    mallory = Identity.generate()
    impostor = Impostor(mallory)
    srv = Server(impostor, "127.0.0.1", 0, tls=tls.ServerTLS(mallory, auth.now_ms()))
    await srv.start()
    # B's own signed descriptor names the address where Mallory now answers (a stale address).
    a = await make(tmp_path, "A")
    b = await make(tmp_path, "B", advertise=(f"https://127.0.0.1:{srv.port}",))
    try:
        await a.add_contact(b.descriptor.signed)
        await b.add_contact(a.descriptor.signed)
        res = await a.send_referral(to="B", patient=CANARY, letter=referral_letter(tmp_path), deliver=False)
        errors = await a.courier.deliver_record(res.record_id)
        assert "not the expected colleague" in errors[b.node_id]
        assert {d["recipient"]: d["state"] for d in await a.outbox(res.record_id)}[b.node_id] != "delivered"
        assert impostor.asked == []                         # not one request reached Mallory
        with pytest.raises(NotFound):
            await b.store.call(records.get_record, res.record_id)           # nothing delivered anywhere
        peer = Peer(b.node_id, b.identity.sign_public, (f"https://127.0.0.1:{srv.port}",))
        with pytest.raises(AuthenticationFailed, match="not the expected colleague"):
            await a.client.call(peer, "GET", "/v1/outbox?since=0")
        assert impostor.asked == []
        # The same server is fine for whoever meant to call Mallory.
        pinned = Peer(mallory.node_id, mallory.sign_public, (f"https://127.0.0.1:{srv.port}",))
        with pytest.raises(Exception, match="refused"):
            await a.client.call(pinned, "GET", "/v1/outbox?since=0")
        assert impostor.asked == [a.node_id]
    finally:
        await a.close()
        await b.close()
        await srv.stop()


OID = x509.ObjectIdentifier(tls.BINDING_OID)


def self_signed(binding: bytes | None, key=None) -> bytes:
    """A certificate made by `cryptography` (an independent implementation), optionally carrying `binding`."""
    key = key or ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if binding is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(OID, binding), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def genuine_binding(identity: Identity, key, now_ms: int, lifetime_ms: int = tls.LIFETIME_MS) -> bytes:
    """The extension value today's and yesterday's nodes put in their certificates, for `key`."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expires = now_ms + lifetime_ms
    return wire.pack({"expires": expires, "sig": identity.sign(tls.DOMAIN, tls.binding_message(spki, expires))})


def test_a_certificate_binds_only_its_own_key_to_only_its_identity_until_it_expires():
    me, other = Identity.generate(), Identity.generate()
    now = auth.now_ms()
    good = tls.ServerTLS(me, now).certificate
    tls.check_certificate(good, me.sign_public, now)
    tls.check_certificate(good, me.sign_public, now + tls.LIFETIME_MS - 1)
    for der, key, when in ((good, other.sign_public, now),                  # bound to another identity
                           (good, me.sign_public, now + tls.LIFETIME_MS + 1),   # expired binding
                           (self_signed(None), me.sign_public, now),          # no binding at all
                           (self_signed(b"\xc1"), me.sign_public, now),         # a binding that is not msgpack
                           (b"", me.sign_public, now), (b"\x30\x03junk", me.sign_public, now)):
        with pytest.raises(AuthenticationFailed):
            tls.check_certificate(der, key, when)
    # A binding copied from a genuine certificate onto another TLS key does not verify.
    genuine = x509.load_der_x509_certificate(good).extensions.get_extension_for_oid(OID).value.value
    with pytest.raises(AuthenticationFailed, match="not signed by the expected node"):
        tls.check_certificate(self_signed(genuine), me.sign_public, now)


async def test_no_tls_private_key_is_left_on_disk(tmp_path):
    import tempfile
    before = set(os.listdir(tempfile.gettempdir()))
    a = await make(tmp_path, "A")
    try:
        assert a._server.tls is not None
        a._server.tls.renew(auth.now_ms())                  # a renewal loads a new key the same way
        for path in (tmp_path / "A").rglob("*"):
            if path.is_file():
                assert b"PRIVATE KEY" not in path.read_bytes(), path
        assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("cabinet-tls")]
    finally:
        await a.close()


async def test_a_descriptor_is_fetched_from_an_address_typed_with_http(tmp_path):
    """`cabinet contact add http://host:port --id ...` as written before TLS still finds the node."""
    b = await make(tmp_path, "B")
    client = Client(Identity.generate())
    try:
        plain = b.descriptor.addresses[0].replace("https://", "http://")
        assert await client.fetch_descriptor(plain) == b.descriptor.signed
    finally:
        await client.close()
        await b.close()


# --- certificates written and read without `cryptography`, cross-checked against it --------

def test_a_certificate_made_here_reads_in_cryptography_and_all_of_it_checks_out():
    me, now = Identity.generate(), auth.now_ms()
    cert_pem, key_pem = tls.make_certificate(me, now)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.version == x509.Version.v3
    assert cert.subject == cert.issuer == x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "cabinet node")])
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ED25519 and cert.serial_number > 0
    # The self-signature, checked by cryptography's own Ed25519 code (raises if it does not verify).
    public = cert.public_key()
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(cert.signature, cert.tbs_certificate_bytes)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert spki == bytes.fromhex("302a300506032b6570032100") + public.public_bytes_raw()
    # The binding: a non-critical extension under our OID, signed by the identity over that SPKI.
    extension = cert.extensions.get_extension_for_oid(OID)
    assert not extension.critical and len(cert.extensions) == 1
    statement = wire.unpack(extension.value.value, max_size=1024, what="test")
    assert statement["expires"] == now + tls.LIFETIME_MS
    crypto.verify(me.sign_public, tls.DOMAIN, tls.binding_message(spki, statement["expires"]), statement["sig"])
    assert cert.not_valid_after_utc.timestamp() == (now + tls.LIFETIME_MS) // 1000
    assert cert.not_valid_before_utc.timestamp() == now // 1000 - 24 * 3600
    # The key: unencrypted PKCS#8 of exactly the certificate's key.
    key_der = ssl.PEM_cert_to_DER_cert(key_pem.decode().replace("PRIVATE KEY", "CERTIFICATE"))
    assert key_der[:16] == bytes.fromhex("302e020100300506032b657004220420") and len(key_der) == 48
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey) and key.public_key() == public
    tls.check_certificate(cert.public_bytes(serialization.Encoding.DER), me.sign_public, now)


async def test_a_certificate_made_by_cryptography_as_older_nodes_did_is_accepted():
    me, now = Identity.generate(), auth.now_ms()
    key = ed25519.Ed25519PrivateKey.generate()
    cert = self_signed(genuine_binding(me, key, now), key)
    tls.check_certificate(cert, me.sign_public, now)
    tls.check_certificate(cert, me.sign_public, now + tls.LIFETIME_MS)
    # Over a real TLS 1.3 handshake with a server set up as older nodes did (encrypted PKCS#8).
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pem = ssl.DER_cert_to_PEM_cert(cert).encode() + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a password"))
    with tls._key_file(pem) as path:
        server_context.load_cert_chain(path, password=b"a password")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    try:
        async with asyncio.timeout(15):
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1],
                                                      ssl=client_context)
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        assert peer == cert
        tls.check_certificate(peer, me.sign_public, now)
    finally:
        server.close()


def refused(cert: bytes, key: bytes, now: int) -> None:
    with pytest.raises(AuthenticationFailed):
        tls.check_certificate(cert, key, now)


def test_truncated_garbled_and_over_long_certificates_are_refused():
    me, now = Identity.generate(), auth.now_ms()
    good = tls.ServerTLS(me, now).certificate
    for n in range(len(good)):                                  # every truncation
        refused(good[:n], me.sign_public, now)
    for i in range(len(good)):                                  # every single-byte change
        for flip in (0x01, 0x80, 0xFF):
            refused(good[:i] + bytes([good[i] ^ flip]) + good[i + 1:], me.sign_public, now)
    length = int.from_bytes(good[2:4], "big")
    assert good[:2] == b"\x30\x82"                              # SEQUENCE, two length bytes
    for bad in (good + b"\x00",                                 # a byte after the certificate
                b"\x30\x82" + (length + 1).to_bytes(2, "big") + good[4:],       # longer than its input
                b"\x30\x83\x00" + good[2:],                     # a length not in its shortest form
                b"\x30\x84\xff\xff\xff\xff" + good[4:],         # 4 GiB claimed
                b"\x30\x89" + b"\xff" * 9 + good[4:],           # more length bytes than allowed
                b"\x30\x80" + good[4:] + b"\x00\x00",           # BER's indefinite length
                b"\x30\x03junk", b"\x30", b"\x00" * 64, b"\xff" * 300):
        refused(bad, me.sign_public, now)


def test_missing_foreign_or_stale_bindings_and_other_key_types_are_refused():
    me, other, now = Identity.generate(), Identity.generate(), auth.now_ms()
    key = ed25519.Ed25519PrivateKey.generate()
    refused(self_signed(None), me.sign_public, now)                                       # no extension
    refused(self_signed(genuine_binding(other, key, now), key), me.sign_public, now)     # another identity signed
    refused(tls.ServerTLS(other, now).certificate, me.sign_public, now)
    refused(self_signed(genuine_binding(me, key, now, lifetime_ms=-1), key), me.sign_public, now)  # expired
    with pytest.raises(AuthenticationFailed, match="expired"):
        tls.check_certificate(self_signed(genuine_binding(me, key, now, lifetime_ms=-1), key), me.sign_public, now)
    # An ECDSA P-256 certificate whose binding is genuinely signed by `me` over its own SPKI:
    # only Ed25519 TLS keys are accepted.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    refused(self_signed(genuine_binding(me, ec_key, now), ec_key), me.sign_public, now)
    # The same binding twice, or the binding in a certificate whose self-signature is wrong.
    cert = x509.load_der_x509_certificate(self_signed(genuine_binding(me, key, now), key))
    fields = der.children(der.decode(cert.tbs_certificate_bytes), der.SEQUENCE)
    exts = der.children(der.decode(fields[-1].content), der.SEQUENCE)
    assert len(exts) == 1
    two = der.explicit(3, der.sequence(exts[0].encoded, exts[0].encoded))
    tbs = der.sequence(*[f.encoded for f in fields[:-1]], two)
    algorithm = der.sequence(der.oid(tls.ED25519_OID))
    refused(der.sequence(tbs, algorithm, der.bit_string(key.sign(tbs))), me.sign_public, now)
    single = der.sequence(*[f.encoded for f in fields])
    assert single == cert.tbs_certificate_bytes
    tls.check_certificate(der.sequence(single, algorithm, der.bit_string(key.sign(single))), me.sign_public, now)
    refused(der.sequence(single, algorithm, der.bit_string(bytes(64))), me.sign_public, now)


def test_openssl_accepts_the_certificate_and_the_key():
    me, now = Identity.generate(), auth.now_ms()
    cert_pem, key_pem = tls.make_certificate(me, now)
    if os.path.exists("/usr/bin/openssl"):
        import subprocess
        out = subprocess.run(["/usr/bin/openssl", "x509", "-noout", "-text"], input=cert_pem,
                             capture_output=True, check=True, timeout=30).stdout.decode()
        assert "Version: 3 (0x2)" in out and "Signature Algorithm: ED25519" in out
        assert "CN = cabinet node" in out and tls.BINDING_OID in out
        key_out = subprocess.run(["/usr/bin/openssl", "pkey", "-pubout"], input=key_pem,
                                 capture_output=True, check=True, timeout=30).stdout
        cert_key = subprocess.run(["/usr/bin/openssl", "x509", "-noout", "-pubkey"], input=cert_pem,
                                  capture_output=True, check=True, timeout=30).stdout
        assert key_out == cert_key
    # Python's ssl (OpenSSL) loads the pair and refuses a key that is not the certificate's.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tls._key_file(cert_pem + key_pem) as path:
        context.load_cert_chain(path)
    _, other_key = tls.make_certificate(me, now)
    with pytest.raises(ssl.SSLError), tls._key_file(cert_pem + other_key) as path:
        context.load_cert_chain(path)
    assert ssl.PEM_cert_to_DER_cert(cert_pem.decode()) == x509.load_pem_x509_certificate(cert_pem).public_bytes(
        serialization.Encoding.DER)


def test_a_running_node_never_loads_cryptography():
    import subprocess
    import sys
    code = ("import sys, time; import node.node, node.transport.tls as tls, node.faces.control_run\n"
            "from node.core.identity import Identity\n"
            "me = Identity.generate(); now = int(time.time() * 1000)\n"
            "server = tls.ServerTLS(me, now); server.renew(now)\n"
            "tls.check_certificate(server.certificate, me.sign_public, now)\n"
            "assert 'cryptography' not in sys.modules, sorted(m for m in sys.modules if 'cryptography' in m)\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
