"""Node IDs (check character), signed descriptors, safety codes, the Identity key holder."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from node.core import crypto, identity, wire
from node.core.errors import InvalidKey, InvalidSignature, RemoteProtocolError, UsageError
from node.core.identity import Descriptor, Identity, format_node_id, node_id_bytes, parse_node_id, safety_code

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NOW = 1_767_605_400_000


def ident(n: int) -> Identity:
    return Identity(hashlib.sha256(b"sign%d" % n).digest(), [hashlib.sha256(b"enc%d" % n).digest()])


# --- node IDs ---------------------------------------------------------------------

def test_node_id_is_a_hash_of_the_key():
    pk = ident(1).sign_public
    assert node_id_bytes(pk) == hashlib.sha256(b"cabinet/node-id\0" + pk).digest()[:20]
    assert ident(1).node_id == format_node_id(node_id_bytes(pk))
    assert node_id_bytes(ident(2).sign_public) != node_id_bytes(pk)


def test_format_shape():
    for n in range(20):
        text = ident(n).node_id
        assert re.fullmatch(r"([A-Z2-7]{4}-){8}[A-Z2-7]", text), text
        assert text.replace("-", "")[:32] == base64.b32encode(node_id_bytes(ident(n).sign_public)).decode()


def test_parse_round_trip():
    for raw in (bytes(20), b"\xff" * 20, bytes(range(20))):
        assert parse_node_id(format_node_id(raw)) == raw
    for n in range(10):
        text = ident(n).node_id
        assert parse_node_id(text) == node_id_bytes(ident(n).sign_public)
        assert identity.normalize_node_id(text) == text


def test_every_single_character_substitution_is_caught():
    for n in range(3):
        compact = ident(n).node_id.replace("-", "")
        for pos in range(len(compact)):
            for ch in ALPHABET:
                if ch == compact[pos]:
                    continue
                typo = compact[:pos] + ch + compact[pos + 1:]
                with pytest.raises(UsageError, match="check character"):
                    parse_node_id(typo)


def test_dashes_spaces_tabs_and_lowercase_accepted():
    text = ident(4).node_id
    raw = node_id_bytes(ident(4).sign_public)
    compact = text.replace("-", "")
    for variant in (compact, compact.lower(), text.lower(), text.replace("-", " "), " " + text + " ",
                    "\t".join(compact[i:i + 3] for i in range(0, 33, 3)), text.replace("-", " - ")):
        assert parse_node_id(variant) == raw
        assert identity.normalize_node_id(variant) == text


def test_malformed_ids_refused():
    compact = ident(5).node_id.replace("-", "")
    typos = [compact[:10] + ch + compact[11:] for ch in "0189_"]
    for bad in ("", compact[:-1], compact + "A", compact + "\n", *typos):
        with pytest.raises(UsageError, match="not a node ID"):
            parse_node_id(bad)
    with pytest.raises(InvalidKey):
        format_node_id(b"\x00" * 19)


def test_non_ascii_lookalikes_refused():
    """str.upper() maps some non-ASCII letters onto ASCII ones (ı → I, ſ → S, ﬀ → FF):
    a node ID is ASCII, so these are refused, not quietly read as another spelling."""
    for plain, fancy in (("I", "\u0131"), ("S", "\u017f"), ("FF", "\ufb00"), ("SS", "\u00df"), ("K", "\u212a")):
        text = next(t for t in (ident(n).node_id for n in range(500)) if plain in t)
        assert parse_node_id(text) == parse_node_id(text.replace(plain, plain.lower(), 1))
        for variant in (text.replace(plain, fancy, 1), text.replace(plain, fancy.upper(), 1)):
            if variant.isascii():
                continue
            with pytest.raises(UsageError, match="not a node ID"):
                parse_node_id(variant)
    for bad in ("\u00e9" * 33, "\uff21" * 33, "A" * 32 + "\u0661"):
        with pytest.raises(UsageError, match="not a node ID"):
            parse_node_id(bad)


# --- descriptors ------------------------------------------------------------------

def make(n: int = 1, **kw) -> Descriptor:
    args = dict(name="Dr Lefebvre", specialty="general practice", city="Lyon", rpps="10001234567",
                addresses=("https://192.0.2.10:8443",), seq=3, now_ms=NOW)
    args.update(kw)
    return ident(n).descriptor(**args)


def resign(body: dict, signer: Identity) -> bytes:
    raw = wire.pack(body)
    return wire.pack({"body": raw, "sig": signer.sign("descriptor", raw)})


def body_of(d: Descriptor) -> dict:
    return wire.unpack(wire.unpack(d.signed)["body"])


def test_descriptor_round_trip():
    d = make()
    for back in (Descriptor.from_wire(d.signed), Descriptor.from_text(d.to_text())):
        assert back == d
        assert back.signed == d.signed
        assert back.node_id == ident(1).node_id and back.enc_key == ident(1).enc_public
        assert back.addresses == ("https://192.0.2.10:8443",) and back.seq == 3
        assert back.enc_key_id == crypto.key_id(ident(1).enc_public)
    assert d.issued == NOW and d.expires == NOW + identity.DESCRIPTOR_DAYS * 86_400_000


def test_descriptor_text_tolerates_line_breaks():
    text = make().to_text()
    wrapped = text[:40] + "\n" + text[40:90] + " \n  " + text[90:] + "\n"
    assert Descriptor.from_text("  " + wrapped) == make()


def test_descriptor_text_errors():
    with pytest.raises(UsageError, match="should start with"):
        Descriptor.from_text("descriptor:abc")
    with pytest.raises(UsageError, match="bad base64"):
        Descriptor.from_text(identity.DESCRIPTOR_PREFIX + "a")
    with pytest.raises(RemoteProtocolError):
        Descriptor.from_text(identity.DESCRIPTOR_PREFIX + "AAAA")


def test_descriptor_every_byte_flip_refused():
    signed = make().signed
    for i in range(len(signed)):
        for mask in (0x01, 0x80):
            bad = signed[:i] + bytes([signed[i] ^ mask]) + signed[i + 1:]
            with pytest.raises((RemoteProtocolError, InvalidSignature)):
                Descriptor.from_wire(bad)


def test_descriptor_field_changes_without_resigning_refused():
    d = make()
    sig = wire.unpack(d.signed)["sig"]
    for key, value in [("name", "Dr Mallory"), ("addrs", ["https://203.0.113.66"]), ("seq", 4),
                       ("expires", 2**62), ("ek", ident(9).enc_public), ("rpps", "1")]:
        body = dict(body_of(d), **{key: value})
        with pytest.raises(InvalidSignature):
            Descriptor.from_wire(wire.pack({"body": wire.pack(body), "sig": sig}))


def test_descriptor_signed_by_another_key_refused():
    with pytest.raises(InvalidSignature):
        Descriptor.from_wire(resign(body_of(make(1)), ident(2)))


def test_descriptor_wrong_id_refused():
    body = body_of(make(1))
    body["id"] = node_id_bytes(ident(2).sign_public)
    with pytest.raises(InvalidSignature, match="node ID does not match"):
        Descriptor.from_wire(resign(body, ident(1)))


def test_descriptor_claiming_another_key_refused():
    """Someone else's key and ID, signed by me: the signature does not verify under their key."""
    body = body_of(make(1))
    body["sk"] = ident(2).sign_public
    body["id"] = node_id_bytes(ident(2).sign_public)
    with pytest.raises(InvalidSignature):
        Descriptor.from_wire(resign(body, ident(1)))


def test_descriptor_expiry():
    d = make()
    assert not d.expired(NOW)
    assert not d.expired(d.expires - 1)
    assert d.expired(d.expires)
    assert d.expired(d.expires + 1)
    old = Descriptor.from_wire(make(now_ms=NOW - 400 * 86_400_000).signed)
    assert old.expired(NOW)


def test_descriptor_validation_after_signature():
    d = make()
    cases = [
        ({"v": 2}, RemoteProtocolError, "unknown format version"),
        ({"extra": 1}, RemoteProtocolError, "unknown field"),
        ({"ek": bytes(32)}, InvalidKey, None),                  # low-order encryption key
        ({"ek": b"\x01" + bytes(31)}, InvalidKey, None),
        ({"ek": b"short"}, RemoteProtocolError, "must be 32 bytes"),
        ({"addrs": ["x"] * 17}, RemoteProtocolError, "address list"),
        ({"addrs": ["x" * 257]}, RemoteProtocolError, "address list"),
        ({"addrs": [1]}, RemoteProtocolError, "address list"),
        ({"name": "x" * 201}, RemoteProtocolError, "too long"),
        ({"seq": "3"}, RemoteProtocolError, "wrong type"),
        ({"seq": True}, RemoteProtocolError, "wrong type"),
    ]
    for change, error, message in cases:
        body = dict(body_of(d), **change)
        with pytest.raises(error, match=message):
            Descriptor.from_wire(resign(body, ident(1)))
    body = body_of(d)
    del body["city"]
    with pytest.raises(RemoteProtocolError, match="missing field 'city'"):
        Descriptor.from_wire(resign(body, ident(1)))


def test_descriptor_structure_errors():
    d = make()
    outer = wire.unpack(d.signed)
    for bad in (wire.pack([1]), wire.pack({"body": outer["body"]}), wire.pack({**outer, "x": 1}),
                wire.pack({"body": outer["body"], "sig": outer["sig"][:-1]}), b"\xc1",
                wire.pack({"body": b"\xc1", "sig": outer["sig"]})):
        with pytest.raises(RemoteProtocolError):
            Descriptor.from_wire(bad)
    with pytest.raises(RemoteProtocolError, match="limit"):
        Descriptor.from_wire(wire.pack({"body": b"x" * identity.MAX_DESCRIPTOR, "sig": outer["sig"]}))


def test_descriptor_signature_is_domain_separated():
    d = make()
    outer = wire.unpack(d.signed)
    crypto.verify(d.sign_key, "descriptor", outer["body"], outer["sig"])
    for domain in ("envelope", "request", "receipt", "descriptor2"):
        with pytest.raises(InvalidSignature):
            crypto.verify(d.sign_key, domain, outer["body"], outer["sig"])


def test_descriptor_with_a_non_map_body_is_a_protocol_error():
    for body in (5, None, [[1]], "text", b"bytes"):
        with pytest.raises(RemoteProtocolError):
            Descriptor.from_wire(wire.pack({"body": wire.pack(body), "sig": bytes(64)}))


# --- safety codes -------------------------------------------------------------------

def test_safety_code_symmetric_and_shaped():
    a, b = ident(1).sign_public, ident(2).sign_public
    code = safety_code(a, b)
    assert code == safety_code(b, a)
    assert re.fullmatch(r"\d{4}( \d{4}){5}", code)


def test_safety_code_differs_per_pair():
    keys = [ident(n).sign_public for n in range(8)]
    codes = {safety_code(keys[i], keys[j]) for i in range(8) for j in range(i + 1, 8)}
    assert len(codes) == 28
    assert safety_code(keys[0], keys[1]) != safety_code(keys[0], keys[2])


def test_safety_code_definition():
    a, b = ident(1).sign_public, ident(2).sign_public
    lo, hi = sorted([a, b])
    n = int.from_bytes(hashlib.sha256(b"cabinet/safety-code\0" + lo + hi).digest()[:10], "big") % 10**24
    assert safety_code(a, b).replace(" ", "") == f"{n:024d}"


# --- the key holder -------------------------------------------------------------------

def test_identity_keys():
    i = ident(1)
    assert Identity(**{"sign_seed": i.secrets()["sign"], "enc_secrets": i.secrets()["enc"]}).node_id == i.node_id
    sig = i.sign("receipt", b"hello")
    crypto.verify(i.sign_public, "receipt", b"hello", sig)
    with pytest.raises(InvalidSignature):
        crypto.verify(i.sign_public, "receipt", b"hellO", sig)


def test_identity_key_rotation():
    old, new = hashlib.sha256(b"old").digest(), hashlib.sha256(b"new").digest()
    i = Identity(hashlib.sha256(b"s").digest(), [old, new])
    old_pub, new_pub = Identity(bytes(32), [old]).enc_public, Identity(bytes(32), [new]).enc_public
    assert i.enc_public == new_pub
    assert bytes(i.enc_private(crypto.key_id(old_pub))) == old
    assert bytes(i.enc_private(crypto.key_id(new_pub))) == new
    assert i.enc_private(b"\x00" * 8) is None


def test_identity_refuses_bad_keys():
    for args in ((bytes(31), [bytes(32)]), (bytes(33), [bytes(32)]), (bytes(32), [])):
        with pytest.raises(InvalidKey):
            Identity(*args)
    a, b = Identity.generate(), Identity.generate()
    assert a.node_id != b.node_id and a.enc_public != b.enc_public


def test_only_usable_addresses_are_accepted():
    from node.core.identity import valid_address
    for good in ("http://127.0.0.1:7400", "https://cabinet.example", "http://[::1]:7400", "http://host:7400/"):
        assert valid_address(good), good
    for bad in ("http://192.168.1.20:74000", "ftp://x", "http://:80", "http://x/path", "x:7400", "http://x:0",
                "http://x:7400?q=1", "http://" + "a" * 300):
        assert not valid_address(bad), bad
    assert valid_address("https://directory.example/cabinet", allow_path=True)


# --- control characters in descriptor fields ------------------------------------------

CONTROLS = ["\x1b[2J", "\n", "\r", "\t", "\x00", "\x7f", "\x85", "\x9b31m", "\u202e", "\u202a", "\u2066", "\u2069",
            "\u2028"]


def test_descriptor_with_control_characters_refused_by_the_parser():
    d = make()
    for field in ("name", "specialty", "city", "rpps"):
        for bad in CONTROLS:
            body = dict(body_of(d), **{field: f"Dr{bad}Mallory"})
            with pytest.raises(RemoteProtocolError, match=f"field '{field}' contains a control character"):
                Descriptor.from_wire(resign(body, ident(1)))
    for bad in ("http://x\x1b[31m:7400", "http://x\u202e:7400", "http://x:7400\x7f"):
        body = dict(body_of(d), addrs=[bad])
        with pytest.raises(RemoteProtocolError, match="addr"):
            Descriptor.from_wire(resign(body, ident(1)))
    # Accents, apostrophes, ligatures, non-Latin scripts and ordinary spaces are text, not controls.
    fine = "Dr Zoë N'Guyen-Lefèbvre, Cœur — Αθήνα 東京"
    body = dict(body_of(d), name=fine, city="Saint-Étienne")
    assert Descriptor.from_wire(resign(body, ident(1))).name == fine


def test_identity_refuses_to_sign_control_characters():
    for field in ("name", "specialty", "city", "rpps"):
        for bad in CONTROLS:
            with pytest.raises(UsageError, match=f"descriptor field '{field}' contains a control character"):
                make(**{field: f"Dr{bad}x"})
    with pytest.raises(UsageError, match="'addresses'"):
        make(addresses=("http://192.0.2.1:7400\x1b",))
    assert make(name="Dr Zoë Müller").name == "Dr Zoë Müller"


# --- relay addresses (docs/relay.md) ----------------------------------------------------------

def test_relay_addresses_are_accepted_in_descriptors_and_nowhere_else():
    good = ["relay+tcp://relay.example:7600", "relay+tcp://203.0.113.9:7600/", "relay+tcp://[2001:db8::1]:7600"]
    bad = ["relay+tcp://relay.example", "relay+tcp://relay.example:0", "relay+tcp://relay.example:7600/X",
           "relay+tcp://user@relay.example:7600", "relay+tcp://relay.example:7600?x=1", "relay+udp://r:1",
           "relay+tcp://:7600", "relay+tcp://r:99999", "relay+tcp://" + "r" * 260 + ":1"]
    for url in good:
        assert identity.valid_relay_address(url) and identity.valid_node_address(url), url
        assert not identity.valid_address(url), url          # not an http(s) address for the client
    for url in bad:
        assert not identity.valid_relay_address(url) and not identity.valid_node_address(url), url
    ident = Identity.generate()
    d = ident.descriptor(name="Dr R", addresses=("https://10.0.0.1:7400", good[0]), seq=1, now_ms=NOW)
    assert Descriptor.from_wire(d.signed).addresses == ("https://10.0.0.1:7400", good[0])
    for url in bad[:4]:
        d = ident.descriptor(name="Dr R", addresses=(url,), seq=1, now_ms=NOW)
        with pytest.raises(RemoteProtocolError, match="bad address list"):
            Descriptor.from_wire(d.signed)


# --- IPv6 addresses (docs/reachability.md) ----------------------------------------------------

IPV6_GOOD = ["https://[2001:db8::5]:7400", "https://[2001:db8::5]", "http://[2a01:e0a:1f2:3c40::17]:7400",
             "https://[::1]:7400", "https://[fd12:3456:789a::1]:7400", "https://[::ffff:203.0.113.5]:7400"]
IPV6_BAD = [
    "https://2001:db8::5:7400",           # no brackets: where does the address end?
    "https://[2001:db8::5:7400",          # unclosed
    "https://[2001:db8::5]x:7400",        # something between the bracket and the port
    "https://[2001:db8::5]]:7400",
    "https://[[2001:db8::5]:7400",
    "https://[fe80::1%25eth0]:7400",      # a zone index: meaningless on another machine
    "https://[fe80::1%eth0]:7400",
    "https://[fe80::1]:7400",             # link-local without its zone cannot be dialled
    "https://[::]:7400",                  # the wildcard is where one listens, not an address
    "https://[ff02::1]:7400",             # multicast
    "https://[2001:db8::zz]:7400",
    "https://[v1.fe]:7400",               # IPvFuture literal
    "https://[2001:db8::5]@evil.example:7400",
    "https://[2001:db8::5]:0",
    "https://[2001:db8::5]:65536",
]


@pytest.mark.parametrize("url", IPV6_GOOD)
def test_ipv6_urls_are_valid_descriptor_addresses(url):
    assert identity.valid_address(url) and identity.valid_node_address(url)
    ident = Identity.generate()
    d = ident.descriptor(name="Dr V6", addresses=(url, "https://203.0.113.5:7400"), seq=1, now_ms=NOW)
    assert Descriptor.from_wire(d.signed).addresses == (url, "https://203.0.113.5:7400")


@pytest.mark.parametrize("url", IPV6_BAD)
def test_malformed_or_unusable_ipv6_urls_are_refused(url):
    assert not identity.valid_address(url)
    assert not identity.valid_node_address(url)
    d = Identity.generate().descriptor(name="Dr V6", addresses=(url,), seq=1, now_ms=NOW)
    with pytest.raises(RemoteProtocolError, match="bad address list"):
        Descriptor.from_wire(d.signed)


def test_a_descriptor_read_again_is_not_verified_again_and_a_forgery_always_fails():
    d = make()
    first, again = Descriptor.from_wire(d.signed), Descriptor.from_wire(bytes(d.signed))
    assert first == d and again is first                       # the same bytes: the same immutable descriptor
    outer = wire.unpack(d.signed)
    forged = wire.pack({"body": outer["body"], "sig": bytes(64)})
    for _ in range(2):                                         # a failure is never remembered as a success
        with pytest.raises(InvalidSignature):
            Descriptor.from_wire(forged)
