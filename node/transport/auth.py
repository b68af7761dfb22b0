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
    """Refuses a request whose nonce this node has seen, or that was signed before it started.

    Nonces are remembered per caller, for as long as a request carrying them could
    still pass the clock check (twice the skew), and never evicted to make room: a
    caller that sends more than `per_caller` requests in that window is refused
    until its oldest ones age out, so no contact can push another's nonces out
    of memory. Only callers whose signature verified get here, so the callers
    are the practice's contacts and the memory is bounded by them.

    Nothing is kept across restarts; instead a request signed before this guard
    was made is refused (it may have been accepted by the process before). A
    colleague whose clock is behind ours by d is refused for d after our start,
    and its courier retries.
    """

    def __init__(self, per_caller: int = 20_000, *, started: int | None = None) -> None:
        self._seen: dict[bytes, OrderedDict[bytes, int]] = {}
        self._per_caller = per_caller
        self.started = now_ms() if started is None else started

    def check(self, caller: bytes, nonce: bytes, now_ms: int, ts: int | None = None) -> None:
        if ts is not None and ts < self.started:
            raise AuthenticationFailed("request signed before this node started: refused as a possible "
                                       "replay; send it again")
        self._forget(now_ms)
        seen = self._seen.setdefault(caller, OrderedDict())
        if nonce in seen:
            raise AuthenticationFailed("replayed request refused")
        if len(seen) >= self._per_caller:
            raise AuthenticationFailed("too many requests from this node in the last 10 minutes; "
                                       "try again later")
        seen[nonce] = now_ms

    def _forget(self, now_ms: int) -> None:
        """Drop every nonce too old to pass the clock check again, and callers left with none."""
        for caller in list(self._seen):
            seen = self._seen[caller]
            while seen and next(iter(seen.values())) < now_ms - 2 * MAX_SKEW_MS:
                seen.popitem(last=False)
            if not seen:
                del self._seen[caller]

    def remembered(self, caller: bytes | None = None) -> int:
        """How many nonces are held (for one caller, or in all)."""
        if caller is not None:
            return len(self._seen.get(caller, ()))
        return sum(len(s) for s in self._seen.values())


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
    guard.check(claims.caller_raw, claims.nonce, now_ms, claims.ts)


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
