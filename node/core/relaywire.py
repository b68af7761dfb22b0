"""The blind relay's handshake (docs/relay.md): pure codecs shared by relay/ and the node.

Before a relay splices two sockets it reads exactly one frame from each: a
`u32 BE length` and that many bytes of canonical msgpack (a map). A node that
waits for callers sends a signed Hello; a caller sends a signed Connect. The
relay answers with unsigned Ok / Call / Ping frames, then forwards raw bytes:
everything after the handshake is the two nodes' own TLS, which the relay
cannot read or alter unnoticed. Nothing here touches a socket or a clock.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

from . import crypto, wire
from .errors import InvalidSignature, RemoteProtocolError
from .identity import ID_BYTES, Identity, node_id_bytes

VERSION = 1
MAX_FRAME = 64 * 1024          # the largest handshake frame (a Hello with a full accept list)
MAX_ACCEPT = 2048              # node IDs a Hello may list
SKEW_MS = 5 * 60 * 1000        # a Hello or Connect is good for five minutes either way
HELLO, CONNECT = "relay-hello", "relay-connect"
SCHEME = "relay+tcp"


def frame(msg: dict[str, Any]) -> bytes:
    raw = wire.pack(msg)
    if len(raw) > MAX_FRAME:
        raise RemoteProtocolError("relay frame too large")
    return len(raw).to_bytes(4, "big") + raw


def frame_length(header: bytes) -> int:
    """The length announced by a frame's 4-byte header; refuse more than MAX_FRAME."""
    n = int.from_bytes(header, "big")
    if len(header) != 4 or n > MAX_FRAME:
        raise RemoteProtocolError("relay frame too large")
    return n


def decode(raw: bytes) -> dict[str, Any]:
    msg = wire.unpack(raw, max_size=MAX_FRAME, what="relay frame")
    if not isinstance(msg, dict) or wire.field(msg, "v", int, what="relay frame") != VERSION:
        raise RemoteProtocolError("relay frame: unknown version")
    wire.field(msg, "t", str, what="relay frame", max_len=16)
    return msg


def parse_relay_url(url: str) -> tuple[str, int]:
    """relay+tcp://host:port -> (host, port); anything else is RemoteProtocolError."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise RemoteProtocolError("not a relay address") from None
    if parts.scheme != SCHEME or not parts.hostname or not port or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise RemoteProtocolError("not a relay address (expected relay+tcp://host:port)")
    return parts.hostname, port


def audience(url: str) -> str:
    """The canonical form of a relay's address, as signed in Hello and Connect."""
    host, port = parse_relay_url(url)
    host = f"[{host}]" if ":" in host else host
    return f"{SCHEME}://{host.lower()}:{port}"


def _check_time(ts: int, now_ms: int, what: str) -> None:
    if abs(now_ms - ts) > SKEW_MS:
        raise RemoteProtocolError(f"{what}: time is more than five minutes off")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """"I am node `node`, reachable here, for these callers": registers one waiting connection."""

    node: bytes
    sign_key: bytes
    time: int
    nonce: bytes
    audience: str
    accept: frozenset[bytes]
    sig: bytes = b""

    def _signed(self) -> bytes:
        return wire.pack([self.node, self.time, self.nonce, self.audience, sorted(self.accept)])

    @classmethod
    def make(cls, identity: Identity, *, relay: str, accept: frozenset[bytes], now_ms: int, nonce: bytes) -> "Hello":
        if len(accept) > MAX_ACCEPT:
            raise RemoteProtocolError(f"a relay registration lists at most {MAX_ACCEPT} callers")
        h = cls(node=node_id_bytes(identity.sign_public), sign_key=identity.sign_public, time=now_ms,
                nonce=nonce, audience=audience(relay), accept=accept)
        return cls(node=h.node, sign_key=h.sign_key, time=h.time, nonce=h.nonce, audience=h.audience,
                   accept=h.accept, sig=identity.sign(HELLO, h._signed()))

    def to_frame(self) -> bytes:
        return frame({"v": VERSION, "t": "hello", "id": self.node, "sk": self.sign_key, "time": self.time,
                      "nonce": self.nonce, "aud": self.audience, "accept": sorted(self.accept), "sig": self.sig})

    @classmethod
    def from_msg(cls, msg: dict[str, Any], *, audiences: frozenset[str], now_ms: int) -> "Hello":
        what = "relay hello"
        wire.only_fields(msg, {"v", "t", "id", "sk", "time", "nonce", "aud", "accept", "sig"}, what=what)
        accept = wire.field(msg, "accept", list, what=what)
        if len(accept) > MAX_ACCEPT or not all(isinstance(a, bytes) and len(a) == ID_BYTES for a in accept):
            raise RemoteProtocolError(f"{what}: bad accept list")
        h = cls(node=wire.field(msg, "id", bytes, what=what, size=ID_BYTES),
                sign_key=wire.field(msg, "sk", bytes, what=what, size=32),
                time=wire.field(msg, "time", int, what=what), nonce=wire.field(msg, "nonce", bytes, what=what, size=16),
                audience=wire.field(msg, "aud", str, what=what, max_len=300), accept=frozenset(accept),
                sig=wire.field(msg, "sig", bytes, what=what, size=64))
        _verify(h.node, h.sign_key, h.audience, audiences, h.time, now_ms, HELLO, h._signed(), h.sig, what)
        return h


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    """"I am node `node`; join me to node `to`": one caller's request for one session."""

    node: bytes
    sign_key: bytes
    to: bytes
    time: int
    nonce: bytes
    audience: str
    sig: bytes = b""

    def _signed(self) -> bytes:
        return wire.pack([self.node, self.to, self.time, self.nonce, self.audience])

    @classmethod
    def make(cls, identity: Identity, *, relay: str, to: bytes, now_ms: int, nonce: bytes) -> "Connect":
        c = cls(node=node_id_bytes(identity.sign_public), sign_key=identity.sign_public, to=to, time=now_ms,
                nonce=nonce, audience=audience(relay))
        return cls(node=c.node, sign_key=c.sign_key, to=to, time=now_ms, nonce=nonce, audience=c.audience,
                   sig=identity.sign(CONNECT, c._signed()))

    def to_frame(self) -> bytes:
        return frame({"v": VERSION, "t": "connect", "id": self.node, "sk": self.sign_key, "to": self.to,
                      "time": self.time, "nonce": self.nonce, "aud": self.audience, "sig": self.sig})

    @classmethod
    def from_msg(cls, msg: dict[str, Any], *, audiences: frozenset[str], now_ms: int) -> "Connect":
        what = "relay connect"
        wire.only_fields(msg, {"v", "t", "id", "sk", "to", "time", "nonce", "aud", "sig"}, what=what)
        c = cls(node=wire.field(msg, "id", bytes, what=what, size=ID_BYTES),
                sign_key=wire.field(msg, "sk", bytes, what=what, size=32),
                to=wire.field(msg, "to", bytes, what=what, size=ID_BYTES),
                time=wire.field(msg, "time", int, what=what), nonce=wire.field(msg, "nonce", bytes, what=what, size=16),
                audience=wire.field(msg, "aud", str, what=what, max_len=300),
                sig=wire.field(msg, "sig", bytes, what=what, size=64))
        _verify(c.node, c.sign_key, c.audience, audiences, c.time, now_ms, CONNECT, c._signed(), c.sig, what)
        return c


def _verify(node: bytes, sign_key: bytes, aud: str, audiences: frozenset[str], ts: int, now_ms: int,
            domain: str, message: bytes, sig: bytes, what: str) -> None:
    if node_id_bytes(sign_key) != node:
        raise InvalidSignature(f"{what}: node ID does not match its key")
    if aud not in audiences:
        raise RemoteProtocolError(f"{what}: meant for another relay")
    _check_time(ts, now_ms, what)
    crypto.verify(sign_key, domain, message, sig)


def ok() -> bytes:
    return frame({"v": VERSION, "t": "ok"})


def call(caller: bytes) -> bytes:
    return frame({"v": VERSION, "t": "call", "from": caller})


def ping() -> bytes:
    return frame({"v": VERSION, "t": "ping"})
