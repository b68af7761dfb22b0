"""Request and response authentication between nodes.

Every request is signed by the calling node over (method, path with query,
the callee's node ID, the caller's node ID, time, nonce, body digest). The
callee refuses unknown callers and bad signatures (alike: no oracle on who its
contacts are), times more than five minutes off, and nonces it has seen. All
of this is checked on the headers alone, before any body is read. Every answer
is signed by the callee over the request's nonce, the status and the body's
digest, so a caller knows it reached the node it meant and that the answer was
made for this request.

For a record upload the "body digest" is the SHA-256 of the envelope head
sent first in the body; the ciphertext after it is bound by the digest inside
that signed head. See docs/transport.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import nacl.signing

from ..core import crypto, wire
from ..core.errors import AuthenticationFailed, InvalidSignature, UsageError
from ..core.identity import Identity, node_id_bytes, parse_node_id

MAX_SKEW_MS = 5 * 60 * 1000
NOT_AUTHENTICATED = "not authenticated: unknown caller or a signature that does not verify"
_DECOY = nacl.signing.SigningKey.generate().verify_key.encode()     # checked against for unknown callers
H_CALLER, H_TIME, H_NONCE, H_DIGEST, H_SIG = (
    "Cabinet-Caller", "Cabinet-Time", "Cabinet-Nonce", "Cabinet-Digest", "Cabinet-Signature")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise AuthenticationFailed("malformed authentication header") from None
    if len(raw) != size:
        raise AuthenticationFailed("malformed authentication header")
    return raw


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def _request_message(method: str, target: str, callee: bytes, caller: bytes, ts: int, nonce: bytes,
                     body_digest: bytes) -> bytes:
    return wire.pack([method.upper(), target, callee, caller, ts, nonce, body_digest])


def sign_request(identity: Identity, *, method: str, target: str, callee: bytes, body_digest: bytes,
                 now_ms: int, nonce: bytes) -> dict[str, str]:
    caller = node_id_bytes(identity.sign_public)
    msg = _request_message(method, target, callee, caller, now_ms, nonce, body_digest)
    return {H_CALLER: identity.node_id, H_TIME: str(now_ms), H_NONCE: b64(nonce), H_DIGEST: b64(body_digest),
            H_SIG: b64(identity.sign("request", msg))}


class ReplayGuard:
    """Remembers nonces for the skew window; a nonce seen twice is a replay."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._capacity = capacity

    def check(self, caller: bytes, nonce: bytes, now_ms: int) -> None:
        while self._seen and (next(iter(self._seen.values())) < now_ms - 2 * MAX_SKEW_MS
                              or len(self._seen) >= self._capacity):
            self._seen.popitem(last=False)
        key = caller + nonce
        if key in self._seen:
            raise AuthenticationFailed("replayed request refused")
        self._seen[key] = now_ms


@dataclass(frozen=True, slots=True)
class Claims:
    caller: str
    caller_raw: bytes
    ts: int
    nonce: bytes
    body_digest: bytes
    sig: bytes


def parse_request(headers: Mapping[str, str]) -> Claims:
    try:
        caller = headers[H_CALLER]
        return Claims(caller=caller, caller_raw=parse_node_id(caller), ts=int(headers[H_TIME]),
                      nonce=unb64(headers[H_NONCE], 16), body_digest=unb64(headers[H_DIGEST], 32),
                      sig=unb64(headers[H_SIG], 64))
    except (KeyError, ValueError, UsageError):
        raise AuthenticationFailed("missing or malformed authentication headers") from None


def check_request(claims: Claims, *, method: str, target: str, me: Identity, sign_key: bytes | None,
                  guard: ReplayGuard, now_ms: int) -> None:
    """Refuse unknown callers, bad signatures, stale times and replayed nonces.

    An unknown caller and a bad signature take the same path (a signature is checked against
    a throw-away key when the caller is unknown) and get the same words, so a stranger cannot
    tell which node IDs are this practice's contacts.
    """
    if abs(now_ms - claims.ts) > MAX_SKEW_MS:
        raise AuthenticationFailed("request time is more than 5 minutes off; check the clocks")
    msg = _request_message(method, target, node_id_bytes(me.sign_public), claims.caller_raw, claims.ts,
                           claims.nonce, claims.body_digest)
    try:
        crypto.verify(sign_key if sign_key is not None else _DECOY, "request", msg, claims.sig)
        if sign_key is None:
            raise InvalidSignature("unknown caller")
    except InvalidSignature:
        raise AuthenticationFailed(NOT_AUTHENTICATED) from None
    guard.check(claims.caller_raw, claims.nonce, now_ms)


def sign_response(identity: Identity, *, nonce: bytes, status: int, body: bytes) -> dict[str, str]:
    msg = wire.pack([nonce, status, digest(body)])
    return {H_SIG: b64(identity.sign("response", msg))}


def verify_response(sign_key: bytes, *, nonce: bytes, status: int, body: bytes, headers: Mapping[str, str]) -> None:
    if H_SIG not in headers:
        raise AuthenticationFailed("the peer's answer is not signed: is this really a cabinet node?")
    sig = unb64(headers[H_SIG], 64)
    try:
        crypto.verify(sign_key, "response", wire.pack([nonce, status, digest(body)]), sig)
    except InvalidSignature:
        raise AuthenticationFailed("the peer's answer is not signed by the expected node") from None


async def read_limited(stream, limit: int) -> bytes:
    """Read a whole body, but never more than limit + 1 bytes (so the caller can tell it was too big).

    aiohttp's StreamReader.read(n) returns what has arrived so far, not n bytes.
    """
    parts, size = [], 0
    while size <= limit:
        piece = await stream.read(limit + 1 - size)
        if not piece:
            break
        parts.append(piece)
        size += len(piece)
    return b"".join(parts)


def now_ms() -> int:
    return int(time.time() * 1000)
