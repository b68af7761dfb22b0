"""The envelope: known-answer vectors, tampering, truncation, the body parser, properties.

Every failure to verify or open must be one of two project errors: InvalidEnvelope
(opaque, no oracle) or RemoteProtocolError (a malformed head, refused before any
key is used). Nothing else may escape, whatever the bytes.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import random
import re

import nacl.bindings as B
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import crypto, envelope, wire
from node.core.envelope import ABYTES, CHUNK, CT_CHUNK, Attachment, BodyParser, Decryptor, Head, Manifest
from node.core.errors import CabinetError, InvalidEnvelope, LocalProtocolError, RemoteProtocolError, TooLarge
from node.core.identity import Identity, node_id_bytes

try:
    from _vectors import (REPO, attachments_of, case, counter_rng, envelope_vectors, expected, flip, identity,
                          make_head, manifest_of, recipient_of, seal_case, split_head)
except ImportError:  # tests/ imported as a package
    from tests._vectors import (REPO, attachments_of, case, counter_rng, envelope_vectors, expected, flip,
                                identity, make_head, manifest_of, recipient_of, seal_case, split_head)

CASES = [c["name"] for c in envelope_vectors()["cases"]]
BAD = (InvalidEnvelope, RemoteProtocolError)


def readers(c: dict) -> list[str]:
    return [c["sender"], *c["recipients"]]


def decrypt_raw(head: bytes, body: bytes, who: Identity) -> bytes:
    """Run only the stream layer (no size or hash check), feeding `body` in odd-sized pieces."""
    h = Head.from_wire(head)
    dec = Decryptor(h.header, h.content_key(who))
    out = []
    for i in range(0, len(body), 40_000):
        out += dec.feed(body[i:i + 40_000])
    out.append(dec.finish())
    return b"".join(out)


def vouched(head: bytes, body: bytes, signer: Identity) -> bytes:
    """A head re-signed by the real sender so that size and SHA-256 match `body`.

    This is what a buggy or hostile sender could produce: only the stream layer
    (tags, FINAL, the record ID and sender as associated data) stands between it and the reader.
    """
    header, _ = split_head(head)
    header["body"]["size"] = len(body)
    header["body"]["sha256"] = hashlib.sha256(body).digest()
    return make_head(header, signer=signer)


# --- known-answer vectors -----------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_vector_regenerates_byte_for_byte(name):
    c = case(name)
    head, body = seal_case(c)
    want_head, want_body = expected(c)
    assert head.hex() == want_head.hex()
    assert body == want_body
    e = c["expected"]
    assert hashlib.sha256(body).hexdigest() == e["body_sha256"]
    assert len(body) == e["body_size"] == envelope.ciphertext_size(e["plaintext_size"])
    assert manifest_of(c).plaintext_size == e["plaintext_size"]
    assert manifest_of(c).to_wire().hex() == e["manifest_wire"]
    assert [hashlib.sha256(ch).hexdigest() for ch in _chunks(body)] == e["chunk_sha256"]
    assert len(e["chunk_sha256"]) == e["chunks"]
    assert [hashlib.sha256(a).hexdigest() for a in attachments_of(c)] == c["attachment_sha256"]


@pytest.mark.parametrize("name", CASES)
def test_vector_intermediate_values(name):
    c = case(name)
    e = c["expected"]
    rng = counter_rng(bytes.fromhex(c["rng_seed"]))
    assert rng(16).hex() == e["record_id"]
    assert rng(32).hex() == e["content_key"]
    for slot in e["slots"]:
        esk = rng(32)
        assert esk.hex() == slot["ephemeral_secret"]
        assert B.crypto_scalarmult_base(esk).hex() == slot["ephemeral_public"] == slot["key"][:64]
    assert rng(24).hex() == e["stream_header"]
    outer = wire.unpack(bytes.fromhex(e["head"]))
    assert outer == {"h": bytes.fromhex(e["header"]), "sig": bytes.fromhex(e["signature"])}
    # the key commitment and the chunks' associated data, as docs/envelope.md defines them
    key = bytes.fromhex(e["content_key"])
    kc = hashlib.sha256(b"cabinet/key-commitment\0" + key).digest()
    assert kc.hex() == e["key_commitment"] == envelope.key_commitment(key).hex()
    header = wire.unpack(outer["h"])
    assert header["body"]["kc"] == kc
    record_id, sender = bytes.fromhex(e["record_id"]), header["from"]
    assert sender == node_id_bytes(identity(c["sender"]).sign_public)
    ad = b"cabinet/chunk\0" + record_id + sender
    assert ad.hex() == e["chunk_ad"] == envelope.chunk_ad(record_id, sender).hex()
    assert len(ad) == 14 + 16 + 20
    signer = identity(c["sender"])
    assert signer.sign("envelope", outer["h"]).hex() == e["signature"]


@pytest.mark.parametrize("name", CASES)
def test_vector_opens_for_sender_and_every_recipient(name):
    c = case(name)
    head, body = expected(c)
    e = c["expected"]
    for who in readers(c):
        header, manifest, atts = envelope.open_bytes(head, body, identity(who))
        assert manifest == manifest_of(c)
        assert atts == attachments_of(c)
        assert header.record_id.hex() == e["record_id"]
        assert header.thread.hex() == e["thread"]
        assert header.reply_to == (bytes.fromhex(c["reply_to"]) if c["reply_to"] else None)
        assert header.kind == c["kind"] and header.created == c["created"]
        assert header.sender_id == envelope_vectors()["identities"][c["sender"]]["node_id"]
        assert header.recipient_ids == [envelope_vectors()["identities"][n]["node_id"] for n in readers(c)]
        assert Head.from_wire(head).content_key(identity(who)).hex() == e["content_key"]


@pytest.mark.parametrize("name", CASES)
def test_vector_refuses_an_outsider(name):
    head, body = expected(case(name))
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(head, body, identity("outsider"))


def test_vectors_file_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("gen_vectors", REPO / "scripts" / "gen_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert json.loads(gen.render(gen.build())) == envelope_vectors()


def test_vector_identities():
    for name, spec in envelope_vectors()["identities"].items():
        ident = identity(name)
        assert ident.sign_public.hex() == spec["sign_public"]
        assert ident.node_id == spec["node_id"]
        assert ident.enc_public.hex() == spec["enc_public"]
        assert crypto.key_id(ident.enc_public).hex() == spec["enc_key_id"]


def test_vector_shapes():
    """The cases cover what they claim to cover."""
    two = case("referral-exact-two-chunks")["expected"]
    assert two["plaintext_size"] == 2 * CHUNK and two["body_size"] == 2 * CT_CHUNK and two["chunks"] == 2
    # only that body is left out of the file (it is regenerated and checked against its hashes)
    assert [c["name"] for c in envelope_vectors()["cases"] if c["expected"]["body"] is None] == [
        "referral-exact-two-chunks"]
    assert len(expected(case("referral-exact-two-chunks"))[1]) == 2 * CT_CHUNK
    assert (REPO / "tests" / "vectors" / "envelope-v1.json").stat().st_size < 100_000
    assert len(case("referral-two-recipients-attachments")["recipients"]) == 2
    assert 0 in [a["size"] for a in case("referral-two-recipients-attachments")["manifest"]["attachments"]]
    reply, first = case("reply"), case("referral-one-recipient")
    assert reply["kind"] == "reply"
    assert reply["reply_to"] == reply["thread"] == first["expected"]["record_id"]


def test_slot_is_libsodium_sealed_box():
    """seal_slot writes out crypto_box_seal; libsodium's own open must accept it."""
    c = case("referral-two-recipients-attachments")
    head, _ = expected(c)
    h = Head.from_wire(head).header
    key = bytes.fromhex(c["expected"]["content_key"])
    for slot, who in zip(h.slots, readers(c)):
        ident = identity(who)
        secret = bytes(ident.enc_private(slot.kid))
        assert B.crypto_box_seal_open(slot.key, ident.enc_public, secret) == key
        assert slot.to == node_id_bytes(ident.sign_public)


def test_rotated_key_still_opens_old_records():
    """A recipient keeps its old encryption key: records sealed to it still open."""
    c = case("referral-one-recipient")
    card = identity("cardiologist")
    old_only = Identity(bytes(card.signing_key), [card.secrets()["enc"][0]])
    sealer = envelope.Sealer(sender=identity("gp"), recipients=[recipient_of(old_only)], kind="referral",
                             created=1, rng=counter_rng(b"rotation"))
    head, body = envelope.seal_bytes(sealer, manifest_of(c))
    assert envelope.open_bytes(head, body, card)[1] == manifest_of(c)


def _doc_table_keys(doc: str, heading: str) -> list[str]:
    """The backticked keys in the first column of the first table after `heading`."""
    lines = doc[doc.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    keys = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys.append(line.split("|")[1].strip().strip("`"))
    return keys


def test_spec_tables_match_the_code():
    """docs/envelope.md names exactly the fields the code writes, in canonical order."""
    doc = (REPO / "docs" / "envelope.md").read_text(encoding="utf-8")
    head, _ = expected(case("reply"))
    header, _ = split_head(head)
    assert _doc_table_keys(doc, "The head is a canonical msgpack map") == list(wire.unpack(head))
    assert _doc_table_keys(doc, "### Header fields") == list(header)
    assert _doc_table_keys(doc, "`body` map:") == list(header["body"])
    assert _doc_table_keys(doc, "Key slot (each element") == list(header["to"][0])
    manifest = wire.unpack(manifest_of(case("reply")).to_wire())
    assert _doc_table_keys(doc, "- `manifest` is canonical msgpack") == list(manifest)
    section = doc[doc.index("## Limits"):doc.index("## Versioning")]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    units = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "": 1}
    assert len(rows) == 9
    limits = {name for name in vars(envelope) if name.startswith("MAX_")} | {"CHUNK"}
    assert {name.strip().strip("`") for name, _ in rows} == limits
    for name, value in rows:
        number, unit = re.match(r"\s*(\d[\d ]*\d|\d)\s*(bytes|KiB|MiB|GiB|)", value).group(1, 2)
        assert int(number.replace(" ", "")) * units[unit] == getattr(envelope, name.strip().strip("`")), name


# --- tampering with the head ---------------------------------------------------

def _header_paths(header: dict) -> list[tuple]:
    paths = [(k,) for k in header if k not in ("to", "body")]
    paths += [("body", k) for k in header["body"]]
    paths += [("to", i, k) for i, slot in enumerate(header["to"]) for k in slot]
    return paths


def _get(header: dict, path: tuple):
    for p in path:
        header = header[p]
    return header


def _set(header: dict, path: tuple, value) -> dict:
    header = copy.deepcopy(header)
    target = header
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return header


def _flipped(value):
    if isinstance(value, bytes):
        return [flip(value, 0), flip(value, len(value) - 1, 0x80)]
    if isinstance(value, int):
        return [value ^ 1]
    if isinstance(value, str):
        return [chr(ord(value[0]) ^ 1) + value[1:]]
    raise AssertionError(f"unexpected header value {value!r}")


@pytest.mark.parametrize("name", ["reply", "referral-two-recipients-attachments"])
def test_every_header_field_is_covered_by_the_signature(name):
    c = case(name)
    head, body = expected(c)
    header, sig = split_head(head)
    paths = [p for p in _header_paths(header) if _get(header, p) is not None]
    assert len(paths) >= 14
    for path in paths:
        for value in _flipped(_get(header, path)):
            forged = make_head(_set(header, path, value), sig=sig)
            with pytest.raises(InvalidEnvelope):
                Head.from_wire(forged)
            for who in readers(c):
                with pytest.raises(InvalidEnvelope):
                    envelope.open_bytes(forged, body, identity(who))


# What each field does once the signature is valid again (a buggy or hostile sender):
# "open" means only the signature protects it, the record still opens with the new value.
# Slot fields are keyed by whose slot it is: the sender's (whose `to` must stay among the
# recipients) or another reader's. A slot change refused with InvalidEnvelope hits only the
# reader of that slot; the others still open the record.
RESIGNED = {
    ("v",): RemoteProtocolError, ("id",): InvalidEnvelope, ("kind",): RemoteProtocolError,
    ("from",): RemoteProtocolError,                 # no longer among the recipients
    ("sk",): InvalidEnvelope, ("created",): "open", ("thread",): "open",
    ("reply_to",): "open", ("body", "size"): BAD, ("body", "chunk"): RemoteProtocolError,
    ("body", "kc"): InvalidEnvelope, ("body", "ss"): InvalidEnvelope, ("body", "sha256"): InvalidEnvelope,
    ("to", "sender's", "to"): RemoteProtocolError,  # the sender is then not among the recipients
    ("to", "sender's", "kid"): InvalidEnvelope, ("to", "sender's", "key"): InvalidEnvelope,
    ("to", "reader's", "to"): InvalidEnvelope, ("to", "reader's", "kid"): InvalidEnvelope,
    ("to", "reader's", "key"): InvalidEnvelope,
}


def _resigned_key(header: dict, path: tuple) -> tuple:
    if path[0] != "to":
        return path
    return ("to", "sender's" if header["to"][path[1]]["to"] == header["from"] else "reader's", path[2])


def test_each_header_field_matters_after_resigning():
    c = case("reply")
    head, body = expected(c)
    header, _ = split_head(head)
    sender = identity(c["sender"])
    paths = _header_paths(header)
    assert {_resigned_key(header, p) for p in paths} == set(RESIGNED)
    for path in paths:
        outcome = RESIGNED[_resigned_key(header, path)]
        hit, spared = readers(c), []
        if path[0] == "to" and outcome is InvalidEnvelope:
            hit = [readers(c)[path[1]]]
            spared = [who for who in readers(c) if who not in hit]
        for value in _flipped(_get(header, path)):
            forged = make_head(_set(header, path, value), signer=sender)
            for who in hit:
                if outcome == "open":
                    h, m, _ = envelope.open_bytes(forged, body, identity(who))
                    assert _get({"created": h.created, "thread": h.thread, "reply_to": h.reply_to}, path) == value
                else:
                    with pytest.raises(outcome):
                        envelope.open_bytes(forged, body, identity(who))
            for who in spared:
                assert envelope.open_bytes(forged, body, identity(who))[1] == manifest_of(c)


@pytest.mark.parametrize("name", CASES)
def test_every_single_bit_flip_of_the_head_is_refused(name):
    c = case(name)
    head, body = expected(c)
    who = identity(c["recipients"][0])
    for i in range(len(head)):
        for mask in (0x01, 0x80):
            with pytest.raises(BAD):
                envelope.open_bytes(flip(head, i, mask), body, who)


def test_random_byte_changes_of_the_head_are_refused():
    c = case("referral-two-recipients-attachments")
    head, body = expected(c)
    who = identity("radiologist")
    r = random.Random(20260105)
    for _ in range(2000):
        forged = bytearray(head)
        for _ in range(r.randint(1, 4)):
            forged[r.randrange(len(forged))] ^= r.randint(1, 255)
        with pytest.raises(BAD):
            envelope.open_bytes(bytes(forged), body, who)


def test_head_cut_or_extended_is_refused():
    head, body = expected(case("reply"))
    who = identity("gp")
    for n in range(len(head)):
        with pytest.raises(RemoteProtocolError):
            envelope.open_bytes(head[:n], body, who)
    for extra in (b"\x00", b"\xc0", head):
        with pytest.raises(RemoteProtocolError):
            envelope.open_bytes(head + extra, body, who)


def test_head_signed_by_someone_else_is_refused():
    c = case("reply")
    head, body = expected(c)
    header, _ = split_head(head)
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(make_head(header, signer=identity("outsider")), body, identity("gp"))


def test_unknown_version_is_refused_clearly():
    c = case("referral-one-recipient")
    head, body = expected(c)
    header, _ = split_head(head)
    for version, shown in [(0, "0"), (2, "2"), (255, "255"), (999, "999"),
                           (1000, "?"), (2**63 - 1, "?"), (-1, "?"), (-(2**63), "?")]:
        header["v"] = version
        forged = make_head(header, signer=identity("gp"))
        with pytest.raises(RemoteProtocolError) as info:
            envelope.open_bytes(forged, body, identity("cardiologist"))
        assert str(info.value) == (f"envelope header: unknown format version {shown} "
                                   f"(this node reads version {envelope.VERSION})")
    # anything but an int is a malformed head; the peer's value is never echoed
    for version in ("1", "two\nlines", b"\x01", [1], {"v": 1}, True, False):
        header["v"] = version
        with pytest.raises(RemoteProtocolError) as info:
            Head.from_wire(make_head(header, signer=identity("gp")))
        assert str(info.value) == "envelope header: field 'v' has the wrong type"
    for version in (None, "missing"):
        if version is None:
            header["v"] = None
        else:
            del header["v"]
        with pytest.raises(RemoteProtocolError) as info:
            Head.from_wire(make_head(header, signer=identity("gp")))
        assert str(info.value) == "envelope header: missing field 'v'"


def test_boolean_version_is_refused():
    """`true == 1` in Python: the version is read as a strict int."""
    head, body = expected(case("referral-one-recipient"))
    header, _ = split_head(head)
    header["v"] = True
    with pytest.raises(RemoteProtocolError, match="field 'v' has the wrong type"):
        envelope.open_bytes(make_head(header, signer=identity("gp")), body, identity("cardiologist"))


def test_unknown_version_is_not_believed_before_the_signature():
    """A version claim under a bad signature is just a bad signature."""
    head, body = expected(case("referral-one-recipient"))
    header, sig = split_head(head)
    header["v"] = 2
    with pytest.raises(InvalidEnvelope):
        Head.from_wire(make_head(header, sig=sig))


def test_head_structure_errors_are_protocol_errors():
    head, _ = expected(case("reply"))
    outer = wire.unpack(head)
    for bad in ([outer["h"], outer["sig"]], {"h": outer["h"]}, {**outer, "x": 1},
                {"h": outer["h"], "sig": outer["sig"][:63]}, {"h": "text", "sig": outer["sig"]},
                {"h": wire.pack([1]), "sig": outer["sig"]}, {"h": wire.pack({"sk": b"x"}), "sig": outer["sig"]}):
        with pytest.raises(RemoteProtocolError):
            Head.from_wire(wire.pack(bad))
    with pytest.raises(RemoteProtocolError, match="limit"):
        Head.from_wire(b"\x00" * (envelope.MAX_HEAD + 1))


def test_resigned_header_checks():
    """Rules that only a validly signed header reaches."""
    c = case("referral-two-recipients-attachments")
    head, body = expected(c)
    gp = identity("gp")
    header, _ = split_head(head)

    def refused(change, error=RemoteProtocolError):
        forged = dict(header, to=list(header["to"]), body=dict(header["body"]))
        change(forged)
        with pytest.raises(error):
            envelope.open_bytes(make_head(forged, signer=gp), body, gp)

    refused(lambda h: h.update(to=[]))
    refused(lambda h: h.update(to=[h["to"][0]] * 2))
    refused(lambda h: h.update(to=[h["to"][0]] * 33))
    refused(lambda h: h.update(created=-1))
    refused(lambda h: h.update(extra=1))
    refused(lambda h: h["body"].update(extra=1))
    refused(lambda h: h["to"].append({"to": b"\x01" * 20, "kid": b"\x02" * 8, "key": b"\x03" * 80, "x": 1}))
    refused(lambda h: h.update(id=b"\x00" * 15))
    refused(lambda h: h.update(reply_to="text"))
    refused(lambda h: h.update(kind="receipt"))
    refused(lambda h: h["body"].update(kc=h["body"]["kc"][:31]))
    refused(lambda h: h["body"].update(kc=None))
    for size in (0, ABYTES, CT_CHUNK + 1, CT_CHUNK + ABYTES, envelope.MAX_BODY + 1, envelope.MAX_BODY + CT_CHUNK):
        refused(lambda h: h["body"].update(size=size))
    for missing in ("v", "id", "kind", "from", "sk", "created", "thread", "reply_to", "to", "body"):
        refused(lambda h: h.pop(missing))
    for missing in ("size", "chunk", "ss", "sha256", "kc"):
        refused(lambda h: h["body"].pop(missing))
    # the largest possible body passes the header checks (and then fails on the hash, as it should)
    refused(lambda h: h["body"].update(size=envelope.MAX_BODY), InvalidEnvelope)


def test_reply_to_must_be_present_even_when_nil():
    """One encoding per header: `reply_to: nil` is the only way to say "answers nothing"."""
    c = case("referral-one-recipient")
    head, body = expected(c)
    header, _ = split_head(head)
    assert "reply_to" in header and header["reply_to"] is None
    gp, card = identity("gp"), identity("cardiologist")
    assert envelope.open_bytes(make_head(header, signer=gp), body, card)[0].reply_to is None
    del header["reply_to"]
    with pytest.raises(RemoteProtocolError, match="missing field 'reply_to'"):
        envelope.open_bytes(make_head(header, signer=gp), body, card)


def test_sender_must_be_among_the_recipients():
    c = case("referral-two-recipients-attachments")
    head, body = expected(c)
    header, _ = split_head(head)
    gp = identity("gp")
    assert header["to"][0]["to"] == header["from"]           # the sealer puts the sender first
    without = dict(header, to=header["to"][1:])
    for who in readers(c):
        with pytest.raises(RemoteProtocolError, match="the sender must be one of the recipients"):
            envelope.open_bytes(make_head(without, signer=gp), body, identity(who))
    # a reader requires only that the sender is among them, not where
    moved = dict(header, to=header["to"][1:] + header["to"][:1])
    for who in readers(c):
        assert envelope.open_bytes(make_head(moved, signer=gp), body, identity(who))[1] == manifest_of(c)


def test_recipient_whose_key_id_does_not_match():
    """Same node, but a key the slot was not sealed to: opaque refusal."""
    head, body = expected(case("referral-one-recipient"))
    card = identity("cardiologist")
    other_key = Identity(bytes(card.signing_key), [b"\x42" * 32])
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(head, body, other_key)


def test_slot_with_matching_kid_but_wrong_sealed_key():
    c = case("referral-one-recipient")
    head, body = expected(c)
    header, _ = split_head(head)
    header["to"][1]["key"] = header["to"][0]["key"]     # the gp's sealed key in the cardiologist's slot
    forged = make_head(header, signer=identity("gp"))
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(forged, body, identity("cardiologist"))
    assert envelope.open_bytes(forged, body, identity("gp"))[1] == manifest_of(c)


# --- tampering with the body --------------------------------------------------

def _chunks(body: bytes) -> list[bytes]:
    return [body[i:i + CT_CHUNK] for i in range(0, len(body), CT_CHUNK)]


@pytest.mark.parametrize("name", ["referral-exact-two-chunks", "referral-two-recipients-attachments"])
def test_flipped_byte_in_each_chunk_is_refused(name):
    c = case(name)
    head, body = expected(c)
    gp, card = identity("gp"), identity("cardiologist")
    chunks = _chunks(body)
    assert len(chunks) == c["expected"]["chunks"]
    for n, chunk in enumerate(chunks):
        start = n * CT_CHUNK
        for offset in (0, ABYTES - 1, ABYTES, len(chunk) // 2, len(chunk) - 1):
            bad = flip(body, start + offset)
            with pytest.raises(InvalidEnvelope):
                envelope.open_bytes(head, bad, card)                    # caught by the signed SHA-256
            with pytest.raises(InvalidEnvelope):
                decrypt_raw(head, bad, card)                             # and by the stream itself
            with pytest.raises(InvalidEnvelope):
                envelope.open_bytes(vouched(head, bad, gp), bad, card)


def test_reordered_chunks_are_refused():
    head, body = expected(case("referral-exact-two-chunks"))
    gp, card = identity("gp"), identity("cardiologist")
    first, second = _chunks(body)
    assert len(first) == len(second) == CT_CHUNK
    swapped = second + first
    with pytest.raises(InvalidEnvelope):
        decrypt_raw(head, swapped, card)
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(vouched(head, swapped, gp), swapped, card)
    doubled = first + first + second         # a replayed chunk
    with pytest.raises(InvalidEnvelope):
        decrypt_raw(head, doubled, card)


def test_chunk_from_another_record_is_refused():
    """Same key and stream header under a different record ID: the associated data differs."""
    c = case("referral-exact-two-chunks")
    head, body = expected(c)
    header, _ = split_head(head)
    header["id"] = b"\x00" * 16
    forged = make_head(header, signer=identity("gp"))
    with pytest.raises(InvalidEnvelope):
        decrypt_raw(forged, body, identity("cardiologist"))


TRUNCATIONS = [0, 1, ABYTES - 1, ABYTES, ABYTES + 1, CHUNK, CT_CHUNK - 1, CT_CHUNK, CT_CHUNK + 1,
               CT_CHUNK + ABYTES, 2 * CT_CHUNK - 1]


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_truncated_body_is_refused(cut):
    head, body = expected(case("referral-exact-two-chunks"))
    gp, card = identity("gp"), identity("cardiologist")
    short = body[:cut]
    with pytest.raises(InvalidEnvelope):
        decrypt_raw(head, short, card)
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(head, short, card)
    if cut > ABYTES and not 0 < cut % CT_CHUNK <= ABYTES:
        with pytest.raises(InvalidEnvelope):
            envelope.open_bytes(vouched(head, short, gp), short, card)


def test_stream_that_stops_at_a_chunk_boundary_is_refused_by_finish():
    """libsodium accepts each MESSAGE chunk; only finish() knows the FINAL chunk never came."""
    head, body = expected(case("referral-exact-two-chunks"))
    card = identity("cardiologist")
    h = Head.from_wire(head)
    dec = Decryptor(h.header, h.content_key(card))
    plain = dec.feed(body[:CT_CHUNK])
    assert len(plain) == 1 and len(plain[0]) == CHUNK          # the first chunk itself is genuine
    with pytest.raises(InvalidEnvelope):
        dec.finish()


def test_decryptor_accepts_any_piece_sizes():
    c = case("referral-exact-two-chunks")
    head, body = expected(c)
    h = Head.from_wire(head)
    card = identity("cardiologist")
    r = random.Random(7)
    for _ in range(5):
        dec = Decryptor(h.header, h.content_key(card))
        out, i = [], 0
        while i < len(body):
            n = r.choice([1, 17, 1000, CT_CHUNK - 1, CT_CHUNK, CT_CHUNK + 1])
            out += dec.feed(body[i:i + n])
            i += n
        out.append(dec.finish())
        plain = b"".join(out)
        assert len(plain) == 2 * CHUNK
        assert plain.endswith(attachments_of(c)[0])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * ABYTES, b"\x00" * (ABYTES + 1), "chunk"])
def test_appended_bytes_are_refused(extra):
    for name in ("referral-exact-two-chunks", "referral-one-recipient"):
        head, body = expected(case(name))
        gp, card = identity("gp"), identity("cardiologist")
        longer = body + (body[:CT_CHUNK] if extra == "chunk" else extra)
        with pytest.raises(InvalidEnvelope):
            decrypt_raw(head, longer, card)
        with pytest.raises(InvalidEnvelope):
            envelope.open_bytes(head, longer, card)
        with pytest.raises(BAD):
            envelope.open_bytes(vouched(head, longer, gp), longer, card)


def test_decryptor_refuses_data_after_final():
    head, body = expected(case("referral-exact-two-chunks"))
    card = identity("cardiologist")
    h = Head.from_wire(head)
    dec = Decryptor(h.header, h.content_key(card))
    assert [len(p) for p in dec.feed(body)] == [CHUNK, CHUNK]     # both chunks, FINAL included
    with pytest.raises(InvalidEnvelope):
        dec.feed(body[CT_CHUNK:])                                  # a genuine chunk, but after FINAL
    dec = Decryptor(h.header, h.content_key(card))
    dec.feed(body)
    dec.feed(b"\x00")
    with pytest.raises(InvalidEnvelope):
        dec.finish()


def test_sealer_holds_back_the_final_chunk():
    """Plaintext of exactly k * CHUNK: k chunks, the last one full-size and tagged FINAL."""
    c = case("referral-exact-two-chunks")
    head, body = expected(c)
    h = Head.from_wire(head)
    state = B.crypto_secretstream_xchacha20poly1305_state()
    B.crypto_secretstream_xchacha20poly1305_init_pull(state, h.header.stream_header,
                                                      h.content_key(identity("gp")))
    ad = envelope.chunk_ad(h.header.record_id, h.header.sender)
    tags = [B.crypto_secretstream_xchacha20poly1305_pull(state, ch, ad)[1] for ch in _chunks(body)]
    assert tags == [envelope.TAG_MESSAGE, envelope.TAG_FINAL]


def test_chunks_are_bound_to_the_sender():
    """The associated data is b"cabinet/chunk\\0" + id + from: the record ID alone does not open it."""
    head, body = expected(case("referral-one-recipient"))
    h = Head.from_wire(head)
    key = h.content_key(identity("cardiologist"))
    for ad, opens in [(envelope.chunk_ad(h.header.record_id, h.header.sender), True), (h.header.record_id, False),
                      (envelope.chunk_ad(h.header.record_id, node_id_bytes(identity("outsider").sign_public)), False),
                      (b"cabinet/chunk\0" + h.header.record_id, False)]:
        state = B.crypto_secretstream_xchacha20poly1305_state()
        B.crypto_secretstream_xchacha20poly1305_init_pull(state, h.header.stream_header, key)
        if opens:
            assert B.crypto_secretstream_xchacha20poly1305_pull(state, body, ad)[1] == envelope.TAG_FINAL
        else:
            with pytest.raises(Exception):
                B.crypto_secretstream_xchacha20poly1305_pull(state, body, ad)


# --- the body parser -------------------------------------------------------

def _plaintext(manifest: Manifest, atts: list[bytes]) -> bytes:
    return envelope.plaintext_prefix(manifest) + b"".join(atts)


def _parse(plain: bytes, piece: int) -> tuple[Manifest, list[bytes]]:
    parser = BodyParser()
    parts: dict[int, bytearray] = {}
    for i in range(0, len(plain), piece):
        for index, data in parser.feed(plain[i:i + piece]):
            parts.setdefault(index, bytearray()).extend(data)
    manifest = parser.finish()
    return manifest, [bytes(parts.get(i, b"")) for i in range(len(manifest.attachments))]


def _manifest(*sizes: int) -> Manifest:
    return Manifest(patient="P", attachments=tuple(Attachment(name=f"a{i}", size=s) for i, s in enumerate(sizes)))


def test_parser_zero_size_attachments():
    for sizes in [(0,), (0, 0), (0, 5, 0), (5, 0, 0, 3), (0, 0, 7)]:
        m = _manifest(*sizes)
        atts = [bytes([i + 1]) * s for i, s in enumerate(sizes)]
        for piece in (1, 2, 3, 1000):
            assert _parse(_plaintext(m, atts), piece) == (m, atts)


def test_parser_manifest_fed_byte_by_byte_yields_nothing_until_complete():
    m = _manifest(3)
    plain = _plaintext(m, [b"abc"])
    parser = BodyParser()
    cut = 4 + len(m.to_wire())
    for i in range(cut):
        assert list(parser.feed(plain[i:i + 1])) == []
        assert parser.manifest is None if i < cut - 1 else parser.manifest == m
    rest = [list(parser.feed(plain[i:i + 1])) for i in range(cut, len(plain))]
    assert rest == [[(0, b"a")], [(0, b"b")], [(0, b"c")]]
    assert parser.finish() == m


def test_parser_manifest_and_data_in_one_piece():
    m = _manifest(2, 0, 3)
    parser = BodyParser()
    assert list(parser.feed(_plaintext(m, [b"xy", b"", b"zzz"]))) == [(0, b"xy"), (2, b"zzz")]
    assert parser.finish() == m


def test_parser_refuses_missing_and_extra_bytes():
    m = _manifest(0, 4, 0)
    plain = _plaintext(m, [b"", b"abcd", b""])
    for cut in range(len(plain)):
        with pytest.raises(InvalidEnvelope):
            _parse(plain[:cut], 5)
    with pytest.raises(InvalidEnvelope):
        _parse(plain + b"!", 5)
    with pytest.raises(InvalidEnvelope):
        _parse(_plaintext(_manifest(), []) + b"!", 1)


def test_parser_refuses_bad_manifests():
    too_long = (envelope.MAX_MANIFEST + 1).to_bytes(4, "big")
    parser = BodyParser()
    with pytest.raises(InvalidEnvelope):
        list(parser.feed(too_long))
    for raw in (b"\xc1", wire.pack([1]), wire.pack({"patient": "P"}), b"\x81\xa1a\x01\x00",
                wire.pack({"patient": "P", "born": "", "subject": "", "letter": "", "data": "",
                           "att": [{"name": "x", "size": -1, "type": ""}]}),
                wire.pack({"patient": "P", "born": "", "subject": "", "letter": "", "data": "",
                           "att": [{"name": "x", "size": 1, "type": ""}] * 101}),
                wire.pack({"patient": "P", "born": "", "subject": "", "letter": "", "data": "", "att": [5]})):
        with pytest.raises(InvalidEnvelope):
            _parse(len(raw).to_bytes(4, "big") + raw, 3)


def test_parser_finish_before_manifest():
    with pytest.raises(InvalidEnvelope):
        BodyParser().finish()
    parser = BodyParser()
    list(parser.feed(b"\x00\x00"))
    with pytest.raises(InvalidEnvelope):
        parser.finish()


# --- properties -------------------------------------------------------------

_text = st.text(max_size=40)
_att = st.tuples(st.text(min_size=1, max_size=20), st.text(max_size=20),
                 st.one_of(st.integers(0, 300), st.integers(CHUNK - 300, CHUNK + 300), st.just(0)),
                 st.integers(0, 2**32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patient=_text, born=_text, subject=_text, letter=st.text(max_size=500), data=_text,
       atts=st.lists(_att, max_size=4), recipients=st.integers(0, 2), seed=st.binary(min_size=1, max_size=8))
def test_any_record_round_trips(patient, born, subject, letter, data, atts, recipients, seed):
    contents = [random.Random(s).randbytes(size) for _, _, size, s in atts]
    manifest = Manifest(patient=patient, born=born, subject=subject, letter=letter, data=data,
                        attachments=tuple(Attachment(name=n, type=t, size=len(b))
                                          for (n, t, _, _), b in zip(atts, contents)))
    names = ["cardiologist", "radiologist"][:recipients]
    sealer = envelope.Sealer(sender=identity("gp"), recipients=[recipient_of(identity(n)) for n in names],
                             kind="referral", created=1_767_605_400_000, rng=counter_rng(seed))
    head, body = envelope.seal_bytes(sealer, manifest, contents)
    assert len(body) == envelope.ciphertext_size(manifest.plaintext_size)
    for who in ["gp", *names]:
        header, got, got_atts = envelope.open_bytes(head, body, identity(who))
        assert got == manifest and got_atts == contents
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(head, body, identity("outsider"))


_mutation = st.tuples(st.integers(0, 10**6), st.integers(1, 255))


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(CASES), head_muts=st.lists(_mutation, max_size=3),
       body_muts=st.lists(_mutation, max_size=3), cut_head=st.integers(0, 3), cut_body=st.integers(0, 3),
       tail=st.binary(max_size=20), who=st.sampled_from(["gp", "cardiologist", "outsider"]))
def test_mutated_records_only_raise_project_errors(name, head_muts, body_muts, cut_head, cut_body, tail, who):
    head, body = expected(case(name))
    h, b = bytearray(head), bytearray(body)
    for pos, mask in head_muts:
        h[pos % len(h)] ^= mask
    for pos, mask in body_muts:
        b[pos % len(b)] ^= mask
    h = h[:len(h) - cut_head]
    b = b[:len(b) - cut_body] + tail
    if (bytes(h), bytes(b)) == (head, body):
        return
    with pytest.raises(CabinetError) as info:
        envelope.open_bytes(bytes(h), bytes(b), identity(who))
    assert isinstance(info.value, BAD)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=400))
def test_arbitrary_head_bytes_only_raise_project_errors(raw):
    with pytest.raises(BAD):
        Head.from_wire(raw)


# --- who sent it, and one key for everyone ---------------------------------------

def test_a_third_party_cannot_re_sign_a_record_as_its_own():
    """Mallory holds a head and body she cannot read, and wants them to come from her."""
    c = case("referral-one-recipient")
    head, body = expected(c)
    header, _ = split_head(head)
    card = identity("cardiologist")
    mallory = identity("outsider")
    header["sk"] = mallory.sign_public
    header["from"] = node_id_bytes(mallory.sign_public)
    # just her name on it: she is not among the recipients
    with pytest.raises(RemoteProtocolError, match="the sender must be one of the recipients"):
        envelope.open_bytes(make_head(header, signer=mallory), body, card)
    # with a slot of her own, in place of the GP's or beside it (she cannot open the GP's,
    # so she seals a key of her choosing): the signature, the cardiologist's slot and the key
    # commitment all pass, and the stream, bound to the GP, refuses
    hers = envelope.seal_slot(recipient_of(mallory), bytes(32), counter_rng(b"mallory")).to_wire()
    for slots in ([hers, header["to"][1]], [hers, *header["to"]], [*header["to"], hers]):
        forged = make_head(dict(header, to=slots), signer=mallory)
        h = Head.from_wire(forged)
        assert h.header.sender == node_id_bytes(mallory.sign_public)
        assert h.content_key(card).hex() == c["expected"]["content_key"]
        with pytest.raises(InvalidEnvelope):
            decrypt_raw(forged, body, card)
        with pytest.raises(InvalidEnvelope):
            envelope.open_bytes(forged, body, card)


def test_key_commitment_is_checked():
    """A head re-signed by the real sender with another `kc`: no reader gets past its slot."""
    c = case("referral-two-recipients-attachments")
    head, body = expected(c)
    header, _ = split_head(head)
    for kc in (bytes(32), envelope.key_commitment(b"\x01" * 32), flip(header["body"]["kc"], 31)):
        forged = make_head(dict(header, body=dict(header["body"], kc=kc)), signer=identity("gp"))
        h = Head.from_wire(forged)                     # well formed and validly signed
        for who in readers(c):
            with pytest.raises(InvalidEnvelope):
                h.content_key(identity(who))
            with pytest.raises(InvalidEnvelope):
                envelope.open_bytes(forged, body, identity(who))


def test_a_sender_cannot_give_one_recipient_another_key():
    """The GP seals a different content key for the cardiologist, the header committing to the
    key of the others: the cardiologist's slot opens, to a key that is refused."""
    c = case("referral-two-recipients-attachments")
    head, body = expected(c)
    header, _ = split_head(head)
    gp, card, radio = identity("gp"), identity("cardiologist"), identity("radiologist")
    real_key = bytes.fromhex(c["expected"]["content_key"])
    other_key = hashlib.sha256(b"another content key").digest()
    assert header["to"][1]["to"] == node_id_bytes(card.sign_public)
    split = copy.deepcopy(header)
    split["to"][1] = envelope.seal_slot(recipient_of(card), other_key, counter_rng(b"split")).to_wire()
    assert split["body"]["kc"] == envelope.key_commitment(real_key)
    forged = make_head(split, signer=gp)
    h = Head.from_wire(forged)
    slot = h.header.slots[1]
    assert crypto.open_sealed_key(card.enc_private(slot.kid), slot.key) == other_key   # the box itself opens
    with pytest.raises(InvalidEnvelope):
        h.content_key(card)
    with pytest.raises(InvalidEnvelope):
        envelope.open_bytes(forged, body, card)
    for who in (gp, radio):
        assert envelope.open_bytes(forged, body, who)[1] == manifest_of(c)
    # committing to the cardiologist's key instead turns it around: the others are refused at
    # their slot, and the cardiologist's key does not decrypt this body
    split["body"]["kc"] = envelope.key_commitment(other_key)
    forged = make_head(split, signer=gp)
    assert Head.from_wire(forged).content_key(card) == other_key
    for who in (gp, radio, card):
        with pytest.raises(InvalidEnvelope):
            envelope.open_bytes(forged, body, who)


# --- the sending side refuses what readers refuse ------------------------------

def _atts(*sizes: int, name: str = "a", type_: str = "t") -> tuple[Attachment, ...]:
    return tuple(Attachment(name=f"{name}{i}" if name else "", size=s, type=type_) for i, s in enumerate(sizes))


def _raw_manifest(atts: tuple[Attachment, ...]) -> bytes:
    return wire.pack({"patient": "P", "born": "", "subject": "", "letter": "", "data": "",
                      "att": [{"name": a.name, "size": a.size, "type": a.type} for a in atts]})


def test_manifest_limits():
    """Sizes are only numbers in the manifest: the limits are checked without any data."""
    G = envelope.MAX_ATTACHMENT
    assert envelope.MAX_RECORD == 4 * G
    largest = Manifest(patient="P", attachments=_atts(G, G, G, G))
    many = Manifest(patient="P", attachments=_atts(*[0] * envelope.MAX_ATTACHMENTS))
    long_names = Manifest(patient="P", attachments=(Attachment(name="é" * 255, size=1, type="é" * 255),))
    for m in (largest, many, long_names):
        assert Manifest.from_wire(m.to_wire()) == m
    assert envelope.ciphertext_size(largest.plaintext_size) <= envelope.MAX_BODY
    too_large = [_atts(*[0] * (envelope.MAX_ATTACHMENTS + 1)), _atts(G + 1), _atts(G, G, G, G, 1),
                 _atts(G, G, G, G, G), _atts(-1)]
    too_long = [(Attachment(name="n" * 256, size=1),), (Attachment(name="n", size=1, type="t" * 256),)]
    for atts, error in [(a, TooLarge) for a in too_large] + [(a, LocalProtocolError) for a in too_long]:
        with pytest.raises(error):
            Manifest(patient="P", attachments=atts).to_wire()
        with pytest.raises(RemoteProtocolError):         # and a reader refuses the same manifest
            Manifest.from_wire(_raw_manifest(atts))


def test_max_body_is_the_largest_possible_record():
    biggest = 4 + envelope.MAX_MANIFEST + envelope.MAX_RECORD
    assert envelope.MAX_BODY == envelope.ciphertext_size(biggest) == 17_192_716_437
    assert envelope.MAX_BODY % CT_CHUNK > ABYTES                 # a possible body size


def test_sealer_refuses_what_readers_refuse():
    gp, card = identity("gp"), recipient_of(identity("cardiologist"))
    base = dict(sender=gp, recipients=[card], kind="referral", created=1, rng=counter_rng(b"sealer"))
    for change in (dict(record_id=b"x" * 15), dict(record_id=b"x" * 17), dict(thread=b"x" * 15),
                   dict(thread=b"x" * 17), dict(reply_to=b"x" * 15), dict(reply_to=b""), dict(created=-1),
                   dict(kind="receipt"), dict(recipients=[card, card]),
                   dict(recipients=[recipient_of(Identity.generate()) for _ in range(envelope.MAX_RECIPIENTS)])):
        with pytest.raises(LocalProtocolError):
            envelope.Sealer(**{**base, **change})
    envelope.Sealer(**{**base, "recipients": [recipient_of(Identity.generate())
                                              for _ in range(envelope.MAX_RECIPIENTS - 1)]})
    sealer = envelope.Sealer(**base)
    with pytest.raises(TooLarge):
        sealer.head(body_size=envelope.MAX_BODY + 1, body_sha256=bytes(32))
    hraw = wire.unpack(sealer.head(body_size=envelope.MAX_BODY, body_sha256=bytes(32)))["h"]
    assert wire.unpack(hraw)["body"]["size"] == envelope.MAX_BODY


def test_sealer_output_does_not_depend_on_how_plaintext_is_pushed():
    c = case("referral-exact-two-chunks")
    _, body = expected(c)
    plain = envelope.plaintext_prefix(manifest_of(c)) + attachments_of(c)[0]
    r = random.Random(11)
    for kind in (bytes, bytearray, memoryview):
        sealer = envelope.Sealer(sender=identity(c["sender"]), recipients=[recipient_of(identity("cardiologist"))],
                                 kind=c["kind"], created=c["created"], rng=counter_rng(bytes.fromhex(c["rng_seed"])))
        out, i = [], 0
        while i < len(plain):
            n = r.choice([0, 1, 3, CHUNK - 1, CHUNK, CHUNK + 1, len(plain)])
            out += sealer.push(kind(plain[i:i + n]))
            i += n
        out.append(sealer.finish())
        assert b"".join(out) == body
