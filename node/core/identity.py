"""Who a node is: its keys, its self-certifying ID, its signed descriptor.

The node ID is the first 20 bytes of SHA-256 over the Ed25519 identity key,
written in base32 with one Luhn mod 32 check character, so a mistyped ID is
caught before anything is looked up. Whoever answers for an ID must show the
key that hashes to it. The X25519 encryption key is carried in the descriptor,
which the identity key signs, so it can be rotated without changing the ID.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import urllib.parse
import hashlib
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import nacl.public
import nacl.signing

from . import crypto, wire
from .errors import InvalidKey, InvalidSignature, RemoteProtocolError, UsageError

ID_BYTES = 20
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DESCRIPTOR_PREFIX = "cabinet-descriptor:"
MAX_DESCRIPTOR = 16 * 1024
DESCRIPTOR_DAYS = 365
TEXT_FIELDS = ("name", "specialty", "city", "rpps")
# Besides the C0 and C1 controls and DEL (category Cc): the bidirectional overrides and isolates,
# which reorder what a terminal shows, and the line and paragraph separators.
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def control_free(text: str) -> bool:
    """No character that could move a cursor, start an escape sequence, or reorder a line on screen."""
    return not any(ch in _INVISIBLE or unicodedata.category(ch) == "Cc" for ch in text)


def _luhn32(text: str) -> str:
    """Luhn mod N check character over the base32 alphabet."""
    n = len(_ALPHABET)
    factor, total = 2, 0
    for ch in reversed(text):
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _ALPHABET[(n - total % n) % n]


def node_id_bytes(sign_public: bytes) -> bytes:
    return hashlib.sha256(b"cabinet/node-id\0" + sign_public).digest()[:ID_BYTES]


@functools.lru_cache(maxsize=4096)
def format_node_id(raw: bytes) -> str:
    """20 raw bytes -> 'ABCD-EFGH-...-WXYZ-C' (eight groups and a check character)."""
    if len(raw) != ID_BYTES:
        raise InvalidKey("node ID must be 20 bytes")
    body = base64.b32encode(raw).decode("ascii").rstrip("=")
    groups = [body[i:i + 4] for i in range(0, len(body), 4)]
    return "-".join(groups + [_luhn32(body)])


def parse_node_id(text: str) -> bytes:
    """Parse a typed node ID (dashes and spaces ignored, any case); check the check character."""
    text = str(text)
    if not text.isascii():
        raise UsageError("not a node ID (expected 33 letters and digits 2-7, in groups)")
    compact = "".join(ch for ch in text.upper() if ch not in " -\t")
    if len(compact) != 33 or any(ch not in _ALPHABET for ch in compact):
        raise UsageError("not a node ID (expected 33 letters and digits 2-7, in groups)")
    body, check = compact[:32], compact[32]
    if _luhn32(body) != check:
        raise UsageError("node ID check character does not match: is there a typo?")
    return base64.b32decode(body)


def normalize_node_id(text: str) -> str:
    return format_node_id(parse_node_id(text))


def node_id_for(sign_public: bytes) -> str:
    return format_node_id(node_id_bytes(sign_public))


def valid_address(url: str, *, allow_path: bool = False) -> bool:
    """An address a node can be reached at: http(s)://host[:port] (and a path, for a bootstrap)."""
    if len(url) > 256:
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and (allow_path or parts.path in ("", "/"))
            and not parts.query and not parts.fragment and (port is None or 0 < port < 65536)
            and _valid_host(parts.netloc))


def _valid_host(netloc: str) -> bool:
    """An IPv6 host is exactly `[address]` (then `:port` or nothing): a usable unicast address
    without a zone index (a URL cannot carry one portably), not link-local, not the wildcard."""
    if "[" not in netloc and "]" not in netloc:
        return True
    host, sep, rest = netloc.partition("]")
    if not host.startswith("[") or not sep or (rest and not rest.startswith(":")) or "[" in host[1:] or "]" in rest:
        return False
    try:
        ip = ipaddress.IPv6Address(host[1:])
    except ValueError:                      # also a zone index (fe80::1%eth0) or an IPvFuture literal
        return False
    return not (ip.is_unspecified or ip.is_link_local or ip.is_multicast)


RELAY_SCHEME = "relay+tcp"


def valid_relay_address(url: str) -> bool:
    """relay+tcp://host:port: in a descriptor, "reach this node through that blind relay" (docs/relay.md).

    No node ID in it: the descriptor that carries it is the node's own, signed."""
    if len(url) > 256:
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == RELAY_SCHEME and bool(parts.hostname) and parts.path in ("", "/") and not parts.query
            and not parts.fragment and not parts.username and not parts.password and port is not None
            and 0 < port < 65536)


def valid_node_address(url: str) -> bool:
    """What a descriptor may list: a direct http(s):// address or a relay+tcp:// one."""
    return valid_address(url) or valid_relay_address(url)


def safety_code(sign_public_a: bytes, sign_public_b: bytes) -> str:
    """24 digits, the same on both sides of a pair, to read aloud or compare on screen."""
    lo, hi = sorted([sign_public_a, sign_public_b])
    digest = hashlib.sha256(b"cabinet/safety-code\0" + lo + hi).digest()
    digits = f"{int.from_bytes(digest[:10], 'big') % 10**24:024d}"
    return " ".join(digits[i:i + 4] for i in range(0, 24, 4))


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """A node's public, signed self-description. Anyone can check any copy."""

    node_id: str
    sign_key: bytes
    enc_key: bytes
    name: str
    specialty: str = ""
    city: str = ""
    rpps: str = ""
    addresses: tuple[str, ...] = ()
    seq: int = 1
    issued: int = 0
    expires: int = 0
    revoked: bool = False         # a signed revocation: final, whatever comes later
    signed: bytes = field(default=b"", compare=False, repr=False)

    @property
    def enc_key_id(self) -> bytes:
        return crypto.key_id(self.enc_key)

    def _body(self) -> dict[str, Any]:
        body = {
            "v": 1, "id": node_id_bytes(self.sign_key), "sk": self.sign_key, "ek": self.enc_key,
            "name": self.name, "specialty": self.specialty, "city": self.city, "rpps": self.rpps,
            "addrs": list(self.addresses), "seq": self.seq, "issued": self.issued, "expires": self.expires,
        }
        if self.revoked:          # absent unless true: one encoding per meaning
            body["revoked"] = True
        return body

    def to_text(self) -> str:
        return DESCRIPTOR_PREFIX + base64.urlsafe_b64encode(self.signed).decode("ascii").rstrip("=")

    def expired(self, now_ms: int) -> bool:
        return self.expires <= now_ms

    @classmethod
    def from_wire(cls, data: bytes) -> "Descriptor":
        """Decode and verify a signed descriptor; any failure is one clear error.

        The same bytes give the same (immutable) descriptor: the last 1,024 decoded are kept, so a
        contact's stored descriptor read for each referral is not parsed and verified each time."""
        if cls is not Descriptor:
            return cls._decode(bytes(data))
        return _descriptor_of(bytes(data))

    @classmethod
    def _decode(cls, data: bytes) -> "Descriptor":
        what = "descriptor"
        outer = wire.unpack(data, max_size=MAX_DESCRIPTOR, what=what)
        wire.only_fields(outer if isinstance(outer, dict) else {}, {"body", "sig"}, what=what)
        body_raw = wire.field(outer, "body", bytes, what=what)
        sig = wire.field(outer, "sig", bytes, what=what, size=64)
        body = wire.unpack(body_raw, max_size=MAX_DESCRIPTOR, what=what)
        wire.only_fields(body, {"v", "id", "sk", "ek", "name", "specialty", "city", "rpps", "addrs",
                                "seq", "issued", "expires", "revoked"}, what=what)
        if "revoked" in body and body["revoked"] is not True:
            raise RemoteProtocolError("descriptor: 'revoked' is present only when true")
        if wire.field(body, "v", int, what=what) != 1:
            raise RemoteProtocolError("descriptor: unknown format version")
        sk = wire.field(body, "sk", bytes, what=what, size=32)
        if wire.field(body, "id", bytes, what=what, size=ID_BYTES) != node_id_bytes(sk):
            raise InvalidSignature("descriptor: node ID does not match its key")
        try:
            crypto.verify(sk, "descriptor", body_raw, sig)
        except InvalidSignature:
            raise InvalidSignature("descriptor: signature does not verify (altered or damaged)") from None
        ek = crypto.check_x25519_public(wire.field(body, "ek", bytes, what=what, size=32))
        addrs = wire.field(body, "addrs", list, what=what)
        if len(addrs) > 16 or not all(isinstance(a, str) and valid_node_address(a) for a in addrs):
            raise RemoteProtocolError("descriptor: bad address list")
        if not all(control_free(a) for a in addrs):
            raise RemoteProtocolError("descriptor: field 'addrs' contains a control character")

        def text(name: str) -> str:
            value: str = wire.field(body, name, str, what=what, max_len=200)
            if not control_free(value):
                raise RemoteProtocolError(f"descriptor: field {name!r} contains a control character")
            return value
        return cls(
            node_id=node_id_for(sk), sign_key=sk, enc_key=ek, name=text("name"),
            specialty=text("specialty"), city=text("city"), rpps=text("rpps"), addresses=tuple(addrs),
            seq=wire.field(body, "seq", int, what=what), issued=wire.field(body, "issued", int, what=what),
            expires=wire.field(body, "expires", int, what=what), revoked="revoked" in body, signed=bytes(data),
        )

    @classmethod
    def from_text(cls, text: str) -> "Descriptor":
        text = text.strip()
        if not text.startswith(DESCRIPTOR_PREFIX):
            raise UsageError("not a cabinet descriptor (it should start with 'cabinet-descriptor:')")
        payload = "".join(text[len(DESCRIPTOR_PREFIX):].split())
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (binascii.Error, ValueError):
            raise UsageError("descriptor text is damaged (bad base64)") from None
        return cls.from_wire(raw)


class Identity:
    """A node's private keys. Only node.py and the key file ever hold one."""

    def __init__(self, sign_seed: bytes, enc_secrets: list[bytes]) -> None:
        if len(sign_seed) != 32 or not enc_secrets:
            raise InvalidKey("identity needs a 32-byte seed and at least one encryption key")
        self.signing_key = nacl.signing.SigningKey(sign_seed)
        self._enc = [nacl.public.PrivateKey(s) for s in enc_secrets]
        self._by_kid = {crypto.key_id(bytes(k.public_key)): k for k in self._enc}

    @classmethod
    def generate(cls) -> "Identity":
        return cls(bytes(nacl.signing.SigningKey.generate()), [bytes(nacl.public.PrivateKey.generate())])

    @property
    def sign_public(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> str:
        return node_id_for(self.sign_public)

    @property
    def enc_public(self) -> bytes:
        return bytes(self._enc[-1].public_key)

    def enc_private(self, kid: bytes) -> nacl.public.PrivateKey | None:
        return self._by_kid.get(kid)

    def rotated(self) -> "Identity":
        """The same identity with a fresh encryption key; the old ones still open what was sent to them."""
        return Identity(bytes(self.signing_key), [bytes(k) for k in self._enc] + [bytes(nacl.public.PrivateKey.generate())])

    def secrets(self) -> dict[str, Any]:
        return {"sign": bytes(self.signing_key), "enc": [bytes(k) for k in self._enc]}

    def sign(self, domain: str, message: bytes) -> bytes:
        return crypto.sign(self.signing_key, domain, message)

    def descriptor(self, *, name: str, specialty: str = "", city: str = "", rpps: str = "",
                   addresses: tuple[str, ...] = (), seq: int, now_ms: int, revoked: bool = False) -> Descriptor:
        fields = {"name": name, "specialty": specialty, "city": city, "rpps": rpps}
        fields |= {"addresses": a for a in ([] if revoked else addresses) if not control_free(a)}
        for field_name, value in fields.items():
            if not control_free(value):
                raise UsageError(f"descriptor field {field_name!r} contains a control character "
                                 "(newline, tab, escape or a direction override): remove it")
        d = Descriptor(node_id=self.node_id, sign_key=self.sign_public, enc_key=self.enc_public, name=name,
                       specialty=specialty, city=city, rpps=rpps, addresses=() if revoked else tuple(addresses),
                       seq=seq, issued=now_ms, expires=now_ms + DESCRIPTOR_DAYS * 86_400_000, revoked=revoked)
        body = wire.pack(d._body())
        signed = wire.pack({"body": body, "sig": self.sign("descriptor", body)})
        return replace(d, signed=signed)


@functools.lru_cache(maxsize=1024)
def _descriptor_of(data: bytes) -> Descriptor:
    """Descriptor.from_wire, remembered (a failure raises again each time; nothing is kept of it)."""
    return Descriptor._decode(data)
