"""The DER codec of node/core/der.py: known encodings, round trips, strictness, and random
bytes (hypothesis) that never raise anything but DERError, nor read past the input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.core import der
from node.core.errors import AuthenticationFailed
from node.core.identity import Identity
from node.transport import auth, tls

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_known_encodings():
    assert der.integer(0) == bytes.fromhex("020100")
    assert der.integer(127) == bytes.fromhex("02017f")
    assert der.integer(128) == bytes.fromhex("02020080")
    assert der.integer(256) == bytes.fromhex("02020100")
    assert der.integer(-1) == bytes.fromhex("0201ff")
    assert der.integer(-128) == bytes.fromhex("020180")
    assert der.integer(-129) == bytes.fromhex("0202ff7f")
    assert der.oid("1.3.101.112") == bytes.fromhex("06032b6570")
    assert der.oid("2.999.3") == bytes.fromhex("0603883703")            # X.690's own example
    assert der.oid("2.5.4.3") == bytes.fromhex("0603550403")
    assert der.boolean(True) == b"\x01\x01\xff" and der.boolean(False) == b"\x01\x01\x00"
    assert der.octet_string(b"\x00" * 128)[:3] == b"\x04\x81\x80"
    assert der.octet_string(b"\x00" * 256)[:4] == b"\x04\x82\x01\x00"
    assert der.bit_string(b"\xab") == b"\x03\x02\x00\xab"
    assert der.explicit(0, der.integer(2)) == bytes.fromhex("a003020102")
    assert der.explicit(3, b"") == b"\xa3\x00"
    assert der.set_of(b"\x02\x01\x02", b"\x02\x01\x01") == bytes.fromhex("3106020101020102")
    assert der.utf8_string("é") == b"\x0c\x02\xc3\xa9" and der.printable_string("CN 1") == b"\x13\x04CN 1"
    assert der.time(0) == b"\x17\x0d700101000000Z"
    assert der.time(2524608000) == b"\x18\x0f20500101000000Z"            # 2050: GeneralizedTime
    assert der.time(2524607999) == b"\x17\x0d491231235959Z"
    assert der.pem("X", b"\x00" * 60) == b"-----BEGIN X-----\n" + b"A" * 64 + b"\n" + b"A" * 16 + b"\n-----END X-----\n"
    for bad in ("1", "3.1", "1.40", "0.1.-2"):
        with pytest.raises(ValueError):
            der.oid(bad)
    with pytest.raises(ValueError):
        der.printable_string("é")


@pytest.mark.parametrize("data", [
    b"", b"\x02", b"\x02\x01",                    # truncated
    b"\x02\x81\x01\x00",                          # length not in its shortest form
    b"\x04\x82\x00\x80" + b"\x00" * 128,          # leading zero length byte
    b"\x30\x80\x00\x00",                          # indefinite length
    b"\x1f\x01\x00", b"\x3f\x81\x01\x00",         # multi-byte tags
    b"\x04\x85\x01\x00\x00\x00\x00",              # five length bytes
    b"\x04\x84\xff\xff\xff\xff\x00",              # 4 GiB claimed
    b"\x02\x01\x00\x00",                          # a byte after the element
])
def test_malformed_elements_are_refused(data):
    with pytest.raises(der.DERError):
        der.decode(data)


@pytest.mark.parametrize("data, convert", [
    (b"\x02\x00", der.to_int), (b"\x02\x02\x00\x01", der.to_int), (b"\x02\x02\xff\x80", der.to_int),
    (b"\x01\x01\x01", der.to_bool), (b"\x01\x00", der.to_bool), (b"\x01\x02\xff\xff", der.to_bool),
    (b"\x06\x00", der.to_oid), (b"\x06\x02\x2b\x80", der.to_oid), (b"\x06\x03\x2b\x80\x01", der.to_oid),
    (b"\x03\x00", der.to_bits), (b"\x03\x02\x01\xfe", der.to_bits),
    (b"\x04\x00", der.to_int), (b"\x02\x01\x00", der.to_octets),
])
def test_non_canonical_or_mistyped_values_are_refused(data, convert):
    with pytest.raises(der.DERError):
        convert(der.decode(data))


def test_primitive_elements_have_no_children():
    with pytest.raises(der.DERError):
        der.children(der.decode(b"\x04\x03\x02\x01\x00"))
    with pytest.raises(der.DERError):
        der.children(der.decode(b"\x30\x00"), der.SET)
    assert der.children(der.decode(b"\x30\x00")) == []


@given(st.integers(min_value=-(2 ** 200), max_value=2 ** 200))
def test_integers_round_trip(n):
    assert der.to_int(der.decode(der.integer(n))) == n


@given(st.integers(0, 2), st.integers(0, 39), st.lists(st.integers(0, 2 ** 130), max_size=8))
def test_oids_round_trip(first, second, rest):
    dotted = ".".join(map(str, [first, second + (200 if first == 2 else 0), *rest]))
    assert der.to_oid(der.decode(der.oid(dotted))) == dotted


@given(st.binary(max_size=70000), st.booleans())
@settings(max_examples=50, deadline=None)
def test_strings_and_nesting_round_trip(data, flag):
    nested = der.sequence(der.octet_string(data), der.bit_string(data), der.boolean(flag),
                          der.explicit(3, der.sequence()))
    octets, bits, boolean, empty = der.children(der.decode(nested, der.SEQUENCE))
    assert (der.to_octets(octets), der.to_bits(bits), der.to_bool(boolean)) == (data, data, flag)
    assert der.children(der.decode(empty.content), der.SEQUENCE) == [] and empty.tag == der.context(3)
    assert octets.encoded == der.octet_string(data)


def walk(data: bytes, depth: int = 0) -> int:
    """Decode everything in `data` every way the codec allows; return how many elements were read."""
    count, offset = 0, 0
    while offset < len(data):
        element, end = der.read(data, offset)
        assert offset < end <= len(data) and element.encoded == data[offset:end]
        assert element.encoded.endswith(element.content)
        offset, count = end, count + 1
        if element.tag & der.CONSTRUCTED and depth < 20:
            count += walk(element.content, depth + 1)
        for convert in (der.to_int, der.to_bool, der.to_oid, der.to_bits, der.to_octets):
            try:
                convert(element)
            except der.DERError:
                pass
    return count


@given(st.binary(max_size=600))
@FUZZ
def test_random_bytes_raise_only_der_errors(data):
    try:
        walk(data)
    except der.DERError:
        pass
    try:
        der.children(der.decode(data))
    except der.DERError:
        pass


# Random bytes rarely look like DER; these are DER-shaped: tags and lengths that nest.
element = st.recursive(
    st.tuples(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x06, 0x0C, 0x17]), st.binary(max_size=40)).map(
        lambda t: der.encode(*t)),
    lambda inner: st.tuples(st.sampled_from([0x30, 0x31, 0xA0, 0xA3]), st.lists(inner, max_size=4)).map(
        lambda t: der.encode(t[0], b"".join(t[1]))),
    max_leaves=12)


@given(element, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
@FUZZ
def test_der_shaped_bytes_with_random_edits_raise_only_der_errors(data, edits):
    assert walk(data) >= 1
    edited = bytearray(data)
    for where, value in edits:
        edited[where % len(edited)] = value
    try:
        walk(bytes(edited))
    except der.DERError:
        pass


ME = Identity.generate()
NOW = auth.now_ms()
GOOD = tls.ServerTLS(ME, NOW).certificate


@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(GOOD)))
@FUZZ
def test_an_edited_certificate_is_refused_with_authentication_failed_only(edits, cut):
    edited = bytearray(GOOD)
    for where, value in edits:
        edited[where] = value
    edited_bytes = bytes(edited[:cut])
    if edited_bytes == GOOD:
        tls.check_certificate(edited_bytes, ME.sign_public, NOW)
    else:
        with pytest.raises(AuthenticationFailed):
            tls.check_certificate(edited_bytes, ME.sign_public, NOW)
