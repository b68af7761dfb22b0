"""The little DER (ASN.1 Distinguished Encoding Rules) that node TLS certificates need.

An encoder for the few universal types an X.509 v3 certificate and a PKCS#8 key are made
of, and a decoder for reading a peer's certificate. The decoder takes attacker-supplied
bytes: it accepts only DER (definite, minimal lengths; low tag numbers; canonical INTEGER,
OID and BOOLEAN), never reads past its input, does not recurse on its own (callers walk
one known level at a time), and raises only `DERError`, whatever the bytes.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

from .errors import RemoteProtocolError

BOOLEAN, INTEGER, BIT_STRING, OCTET_STRING, OID = 0x01, 0x02, 0x03, 0x04, 0x06
UTF8_STRING, PRINTABLE_STRING, UTC_TIME, GENERALIZED_TIME = 0x0C, 0x13, 0x17, 0x18
SEQUENCE, SET = 0x30, 0x31
CONSTRUCTED = 0x20
MAX_LENGTH_BYTES = 4            # lengths up to 4 GiB - 1: far beyond any certificate
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class DERError(RemoteProtocolError):
    """Bytes that are not the DER the caller expected."""


def context(number: int) -> int:
    """The tag of an explicit, constructed context-specific element: [0] is 0xA0, [3] is 0xA3."""
    if not 0 <= number < 31:
        raise ValueError("context tag numbers above 30 are not supported")
    return 0xA0 | number


# --- encoding ----------------------------------------------------------------------------

def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(body) > MAX_LENGTH_BYTES:
        raise ValueError("DER element too long")
    return bytes([0x80 | len(body)]) + body


def encode(tag: int, content: bytes) -> bytes:
    if not 0 <= tag <= 0xFF or tag & 0x1F == 0x1F:
        raise ValueError("only single-byte tags are supported")
    return bytes([tag]) + _length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return encode(SEQUENCE, b"".join(items))


def set_of(*items: bytes) -> bytes:
    return encode(SET, b"".join(sorted(items)))          # DER orders a SET OF by encoding


def explicit(number: int, inner: bytes) -> bytes:
    return encode(context(number), inner)


def integer(n: int) -> bytes:
    size = (n if n >= 0 else ~n).bit_length() // 8 + 1   # minimal two's complement, sign bit included
    return encode(INTEGER, n.to_bytes(size, "big", signed=True))


def boolean(value: bool) -> bytes:
    return encode(BOOLEAN, b"\xff" if value else b"\x00")


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40) or min(arcs) < 0:
        raise ValueError(f"not an object identifier: {dotted}")
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return encode(OID, bytes(out))


def bit_string(data: bytes) -> bytes:
    return encode(BIT_STRING, b"\x00" + data)            # whole bytes only: no unused bits


def octet_string(data: bytes) -> bytes:
    return encode(OCTET_STRING, data)


def utf8_string(text: str) -> bytes:
    return encode(UTF8_STRING, text.encode("utf-8"))


def printable_string(text: str) -> bytes:
    if not set(text) <= _PRINTABLE:
        raise ValueError("not a PrintableString")
    return encode(PRINTABLE_STRING, text.encode("ascii"))


def time(unix_seconds: int) -> bytes:
    """An X.509 Time (RFC 5280 4.1.2.5): UTCTime through 2049, GeneralizedTime from 2050, in UTC."""
    when = _EPOCH + datetime.timedelta(seconds=unix_seconds)
    if 1950 <= when.year < 2050:
        return encode(UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return encode(GENERALIZED_TIME, f"{when.year:04d}{when.strftime('%m%d%H%M%S')}Z".encode("ascii"))


def pem(label: str, der: bytes) -> bytes:
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode("ascii")


# --- decoding ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Element:
    """One decoded element: its tag, its whole encoding and its content."""

    tag: int
    encoded: bytes
    content: bytes


def read(data: bytes, offset: int = 0) -> tuple[Element, int]:
    """The element that starts at `offset`, and the offset right after it."""
    if offset + 2 > len(data):
        raise DERError("DER: truncated element")
    tag, first = data[offset], data[offset + 1]
    if tag & 0x1F == 0x1F:
        raise DERError("DER: multi-byte tag")
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise DERError("DER: indefinite length")
        if count > MAX_LENGTH_BYTES or start + count > len(data):
            raise DERError("DER: bad length")
        length = int.from_bytes(data[start:start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise DERError("DER: length not in its shortest form")
        start += count
    end = start + length
    if end > len(data):
        raise DERError("DER: element longer than its input")
    return Element(tag, bytes(data[offset:end]), bytes(data[start:end])), end


def decode(data: bytes, tag: int | None = None) -> Element:
    """Exactly one element, with nothing after it (and of `tag`, if given)."""
    element, end = read(data)
    if end != len(data):
        raise DERError("DER: bytes after the element")
    return element if tag is None else expect(element, tag)


def children(element: Element, tag: int | None = None) -> list[Element]:
    """The elements inside a constructed element (of `tag`, if given), in order."""
    if tag is not None:
        expect(element, tag)
    if not element.tag & CONSTRUCTED:
        raise DERError("DER: a primitive element has no children")
    out, offset = [], 0
    while offset < len(element.content):
        child, offset = read(element.content, offset)
        out.append(child)
    return out


def expect(element: Element, tag: int) -> Element:
    if element.tag != tag:
        raise DERError(f"DER: expected tag {tag:#04x}, found {element.tag:#04x}")
    return element


def to_int(element: Element) -> int:
    body = expect(element, INTEGER).content
    if not body or (len(body) > 1 and (body[0], body[1] & 0x80) in ((0x00, 0), (0xFF, 0x80))):
        raise DERError("DER: INTEGER not in its shortest form")
    return int.from_bytes(body, "big", signed=True)


def to_bool(element: Element) -> bool:
    body = expect(element, BOOLEAN).content
    if body not in (b"\x00", b"\xff"):
        raise DERError("DER: BOOLEAN must be 00 or FF")
    return body == b"\xff"


def to_oid(element: Element) -> str:
    body = expect(element, OID).content
    if not body or body[-1] & 0x80:
        raise DERError("DER: truncated OBJECT IDENTIFIER")
    arcs, arc, fresh = [], 0, True
    for byte in body:
        if fresh and byte == 0x80:
            raise DERError("DER: OBJECT IDENTIFIER arc not in its shortest form")
        arc, fresh = (arc << 7) | (byte & 0x7F), not byte & 0x80
        if fresh:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def to_bits(element: Element) -> bytes:
    """The bytes of a BIT STRING made of whole bytes (no unused bits), as keys and signatures are."""
    body = expect(element, BIT_STRING).content
    if not body or body[0] != 0:
        raise DERError("DER: BIT STRING with unused bits")
    return body[1:]


def to_octets(element: Element) -> bytes:
    return expect(element, OCTET_STRING).content
