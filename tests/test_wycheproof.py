"""Wycheproof vectors through the project's crypto wrappers (and the AEAD under secretstream).

The files are upstream's, unchanged, in tests/vectors/public/wycheproof/ (see its
SOURCE.md): `testGroups[].tests[]`, each test with a `tcId`, `flags` and a
`result` of "valid", "invalid" or "acceptable". The last test checks that every
folder of public vectors is exactly the files its SOURCE.md lists.
"""

from __future__ import annotations

import nacl.bindings as B
import nacl.exceptions
import nacl.signing
import pytest

from node.core import crypto
from node.core.errors import InvalidKey, InvalidSignature

try:
    from _vectors import PUBLIC_VECTORS, listed_hashes, load_public
except ImportError:  # tests/ imported as a package
    from tests._vectors import PUBLIC_VECTORS, listed_hashes, load_public


def _tests(name: str, *group_keys: str) -> list[tuple]:
    data = load_public(f"wycheproof/{name}")
    assert data["numberOfTests"] == sum(len(g["tests"]) for g in data["testGroups"])
    return [(*(g[k] for k in group_keys), t) for g in data["testGroups"] for t in g["tests"]]


def _ids(rows: list[tuple]) -> list[str]:
    return [f"tc{row[-1]['tcId']}-{row[-1]['result']}" for row in rows]


# --- Ed25519 ----------------------------------------------------------------------

ED25519 = _tests("ed25519_test.json", "publicKey")


@pytest.fixture
def raw_domain(monkeypatch):
    """Wycheproof signs raw messages; our signatures carry a domain prefix. Drop it for these tests
    so they exercise crypto.verify's own length checks and error mapping on the real vectors."""
    monkeypatch.setattr(crypto, "_domain", lambda domain, message: message)


@pytest.mark.parametrize("public,test", ED25519, ids=_ids(ED25519))
def test_ed25519(raw_domain, public, test):
    pk, msg, sig = bytes.fromhex(public["pk"]), bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
    assert test["result"] in ("valid", "invalid")
    if test["result"] == "valid":
        crypto.verify(pk, "any", msg, sig)
    else:
        with pytest.raises(InvalidSignature):
            crypto.verify(pk, "any", msg, sig)


def test_ed25519_covers_both_outcomes():
    results = [t["result"] for _, t in ED25519]
    assert results.count("valid") > 50 and results.count("invalid") > 50


def test_domain_prefix_is_exactly_as_documented():
    """crypto.sign(domain, m) is plain Ed25519 over b"cabinet/" + domain + b"\\0" + m."""
    key = nacl.signing.SigningKey(b"\x07" * 32)
    sig = crypto.sign(key, "envelope", b"header bytes")
    assert sig == key.sign(b"cabinet/envelope\0header bytes").signature
    nacl.signing.VerifyKey(bytes(key.verify_key)).verify(b"cabinet/envelope\0header bytes", sig)
    crypto.verify(bytes(key.verify_key), "envelope", b"header bytes", sig)
    # domains are fixed ASCII names without NUL, so the NUL ends the domain unambiguously,
    # and a signature made for one domain is refused in every other
    for domain, message in [("envelop", b"e\0header bytes"), ("descriptor", b"header bytes"), ("", b"header bytes")]:
        with pytest.raises(InvalidSignature):
            crypto.verify(bytes(key.verify_key), domain, message, sig)


def test_domain_with_a_nul_is_refused():
    """("envelope\\0x", m) and ("envelope", b"x\\0" + m) would be the same signed bytes."""
    key = nacl.signing.SigningKey(b"\x07" * 32)
    sig = crypto.sign(key, "envelope", b"x\0header bytes")
    for domain in ("envelope\0x", "\0", "envelope\0"):
        with pytest.raises(ValueError, match="NUL"):
            crypto.sign(key, domain, b"header bytes")
        with pytest.raises(InvalidSignature):
            crypto.verify(bytes(key.verify_key), domain, b"header bytes", sig)
    crypto.verify(bytes(key.verify_key), "envelope", b"x\0header bytes", sig)


# --- X25519 ------------------------------------------------------------------------

X25519 = _tests("x25519_test.json", "curve")


@pytest.mark.parametrize("curve,test", X25519, ids=_ids(X25519))
def test_x25519(curve, test):
    assert curve == "curve25519"
    private, public, shared = (bytes.fromhex(test[k]) for k in ("private", "public", "shared"))
    zero = shared == bytes(32)
    if test["result"] == "valid":
        assert not zero
        assert crypto.x25519(private, public) == shared
    elif test["result"] == "acceptable":
        try:
            got = crypto.x25519(private, public)
        except InvalidKey:
            assert zero, "only an all-zero result may be refused"
        else:
            assert got == shared and not zero
    else:
        with pytest.raises(InvalidKey):
            crypto.x25519(private, public)


def test_x25519_low_order_points_are_invalid_key_not_runtime_error():
    low_order = {bytes.fromhex(t["public"]) for _, t in X25519 if "LowOrderPublic" in t["flags"]}
    assert len(low_order) >= 10
    for public in low_order:
        with pytest.raises(InvalidKey):
            crypto.check_x25519_public(public)
        with pytest.raises(InvalidKey):
            crypto.seal_key(public, bytes(32))
    good = {bytes.fromhex(t["public"]) for _, t in X25519 if t["result"] == "valid"}
    for public in list(good)[:20]:
        assert crypto.check_x25519_public(public) == public


def test_x25519_wrong_lengths():
    for private, public in [(bytes(31), bytes(32)), (bytes(32), bytes(33)), (b"", b"")]:
        with pytest.raises(InvalidKey):
            crypto.x25519(private, public)
    for public in (bytes(31), "x" * 32, bytearray(32)):
        with pytest.raises(InvalidKey):
            crypto.check_x25519_public(public)


# --- XChaCha20-Poly1305 (the AEAD inside secretstream) ---------------------------------

XCHACHA = _tests("xchacha20_poly1305_test.json", "ivSize")


@pytest.mark.parametrize("iv_size,test", XCHACHA, ids=_ids(XCHACHA))
def test_xchacha20_poly1305(iv_size, test):
    key, iv, aad, msg, ct, tag = (bytes.fromhex(test[k]) for k in ("key", "iv", "aad", "msg", "ct", "tag"))
    assert len(iv) * 8 == iv_size
    if test["result"] == "valid":
        assert B.crypto_aead_xchacha20poly1305_ietf_encrypt(msg, aad, iv, key) == ct + tag
        assert B.crypto_aead_xchacha20poly1305_ietf_decrypt(ct + tag, aad, iv, key) == msg
    else:
        assert test["result"] == "invalid"
        with pytest.raises(nacl.exceptions.CryptoError):
            B.crypto_aead_xchacha20poly1305_ietf_decrypt(ct + tag, aad, iv, key)
        if len(iv) != 24:
            with pytest.raises(nacl.exceptions.CryptoError):
                B.crypto_aead_xchacha20poly1305_ietf_encrypt(msg, aad, iv, key)
        else:
            assert B.crypto_aead_xchacha20poly1305_ietf_encrypt(msg, aad, iv, key) != ct + tag


def test_sealed_key_opening_maps_errors():
    """open_sealed_key: any damage is the one opaque envelope error."""
    from nacl.public import PrivateKey

    from node.core.errors import InvalidEnvelope

    me = PrivateKey(b"\x05" * 32)
    sealed = crypto.seal_key(bytes(me.public_key), b"k" * 32)
    assert len(sealed) == crypto.SEALED_KEY_SIZE
    assert crypto.open_sealed_key(me, sealed) == b"k" * 32
    for bad in (sealed[:-1], sealed[:10], b"", bytes([sealed[0] ^ 1]) + sealed[1:], sealed[:-1] + b"\x00"):
        with pytest.raises(InvalidEnvelope):
            crypto.open_sealed_key(me, bad)
    with pytest.raises(InvalidEnvelope):
        crypto.open_sealed_key(PrivateKey(b"\x06" * 32), sealed)
    short = B.crypto_box_seal(b"k" * 31, bytes(me.public_key))
    with pytest.raises(InvalidEnvelope):
        crypto.open_sealed_key(me, short)


# --- provenance of every public vector folder ---------------------------------------

def test_public_vectors_are_exactly_the_listed_upstream_files():
    """Each folder: a LICENSE, a SOURCE.md, and only files whose SHA-256 SOURCE.md lists."""
    import hashlib

    folders = sorted(p.name for p in PUBLIC_VECTORS.iterdir() if p.is_dir())
    assert folders == ["msgpack-test-suite", "paseto", "wycheproof"]
    for folder in folders:
        listed = listed_hashes(folder)
        present = {p.name for p in (PUBLIC_VECTORS / folder).iterdir()} - {"SOURCE.md"}
        assert "LICENSE" in listed and present == set(listed), folder
        for name, digest in listed.items():
            assert hashlib.sha256((PUBLIC_VECTORS / folder / name).read_bytes()).hexdigest() == digest, name
        source = (PUBLIC_VECTORS / folder / "SOURCE.md").read_text(encoding="utf-8")
        assert "unchanged" in source and "https://github.com/" in source, folder
