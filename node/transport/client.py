"""The node's HTTP client: signed requests to colleagues, checked answers.

aiohttp's exceptions are translated here (as httpcore's map_exceptions does),
so callers only ever see PeerUnreachable, PeerTimeout, PeerRefused or
AuthenticationFailed. A large body is streamed from an async iterator the
caller provides; the client never holds more than one piece in memory.

https:// addresses are called over TLS 1.3 and each new connection is checked
before any request byte is written: the certificate must be bound to the
identity key pinned for the contact (tls.IdentityPin). An impostor there is
AuthenticationFailed, like an answer not signed by the contact. http://
addresses (descriptors made before TLS) are still called over plain HTTP.

A local address listed in `carried` (relayed.Tunnels' tunnel addresses) is not
connected to: its dialer opens the connection (through a relay) and hands back
the socket, and TLS, the pin and the requests run over it as over any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp

from ..core import wire
from ..core.errors import (AuthenticationFailed, PeerRefused, PeerTimeout, PeerUnreachable, ProtocolError,
                      RemoteProtocolError, TransportError, UsageError)
from ..core.identity import Identity, parse_node_id
from . import auth, tls

MAX_ANSWER = 10 << 20          # an outbox answer carries up to 8 MiB of small records
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 120
RESUME_PROBE = 1 << 20          # bodies larger than this start with a status query

# (host, port) -> a dialer that opens that address's connection some other way (relayed.Tunnels);
# an OSError from it is a connection that failed, and the next address is tried.
carried: dict[tuple[str, int], Callable[[], Awaitable[socket.socket]]] = {}


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    sign_key: bytes
    addresses: tuple[str, ...]


@contextlib.contextmanager
def map_exceptions(address: str):
    try:
        yield
    except aiohttp.ServerFingerprintMismatch:
        raise AuthenticationFailed(f"the node at {address} is not the expected colleague "
                                   "(its TLS certificate is not signed by the contact's identity key)") from None
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
        raise PeerUnreachable(f"cannot reach {address}: {getattr(exc, 'strerror', None) or 'connection failed'}") from None
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        raise PeerTimeout(f"{address} did not answer in time") from None
    except aiohttp.InvalidURL:
        raise PeerUnreachable(f"not a usable address: {address}") from None
    except aiohttp.ClientError as exc:
        raise PeerUnreachable(f"transfer to {address} failed ({exc.__class__.__name__})") from None


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, with the `carried` addresses dialed by their dialer. aiohttp runs TLS
    over the socket; the pin (tls.IdentityPin) is checked here first, as aiohttp would after us:
    on a mismatch aiohttp looks for the socket's peer (the relay) among the tunnel's addresses."""

    async def _wrap_create_connection(self, *args: Any, addr_infos: Any, req: Any, timeout: Any,
                                      client_error: type[Exception] = aiohttp.ClientConnectorError, **kwargs: Any):
        dial = carried.get((req.url.raw_host, req.port))
        if dial is None:
            return await super()._wrap_create_connection(*args, addr_infos=addr_infos, req=req, timeout=timeout,
                                                         client_error=client_error, **kwargs)
        try:
            sock = await dial()
            transport, protocol = await self._loop.create_connection(*args, **kwargs, sock=sock)
        except OSError as exc:
            raise client_error(req.connection_key, exc) from exc
        if isinstance(req.ssl, aiohttp.Fingerprint):
            try:
                req.ssl.check(transport)
            except aiohttp.ServerFingerprintMismatch:
                transport.close()
                raise
        return transport, protocol


class Client:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.on_attempt: Callable[[str, str, bool], None] | None = None    # (node ID, address, answered)
        self._session: aiohttp.ClientSession | None = None
        self._pins: dict[bytes, tls.IdentityPin] = {}

    def pin(self, sign_key: bytes) -> tls.IdentityPin:
        """The certificate check for one identity key (one per key: aiohttp pools connections by it)."""
        pin = self._pins.get(sign_key)
        if pin is None:
            if len(self._pins) >= 4096:
                self._pins.clear()
            pin = self._pins[sign_key] = tls.IdentityPin(sign_key, auth.now_ms)
        return pin

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
            self._session = aiohttp.ClientSession(connector=_Connector(), timeout=timeout, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_descriptor(self, address: str) -> bytes:
        """The public descriptor at `address`. An http:// address that does not answer in plain
        HTTP is asked again over TLS (a node typed with the scheme it had before TLS)."""
        if not address.startswith(("http://", "https://")):
            raise UsageError("a node address starts with http:// or https://")
        try:
            return await self._fetch_descriptor(address)
        except PeerUnreachable as first:
            if not address.startswith("http://"):
                raise
            try:
                return await self._fetch_descriptor("https://" + address[len("http://"):])
            except TransportError:
                raise first from None                # the address as the user typed it

    async def _fetch_descriptor(self, address: str) -> bytes:
        url = address.rstrip("/") + "/v1/descriptor"
        with map_exceptions(address):
            # Public and self-signed: whoever serves it, the caller checks the descriptor's ID.
            async with self._http().get(url, timeout=aiohttp.ClientTimeout(total=20), ssl=False) as resp:
                if resp.status != 200:
                    raise PeerRefused(f"{address} answered {resp.status} instead of a descriptor", resp.status)
                body = await auth.read_limited(resp.content, 64 * 1024)
        if len(body) > 64 * 1024:
            raise RemoteProtocolError("descriptor too large")
        return body

    async def _each_address(self, peer: Peer, attempt):
        """Try the peer's addresses in order; the first that answers wins."""
        if not peer.addresses:
            raise PeerUnreachable("no known address for this contact")
        last: TransportError | None = None
        for address in peer.addresses:
            try:
                answer = await attempt(address)
            except (PeerUnreachable, PeerTimeout, AuthenticationFailed) as exc:
                self._observed(peer, address, False)
                last = exc                      # an impostor or a dead address: try the next one
                continue
            except PeerRefused as exc:
                if exc.signed:
                    self._observed(peer, address, True)
                    raise                       # the peer itself said no: that is the answer
                last = exc
                continue
            self._observed(peer, address, True)
            return answer
        assert last is not None
        raise last

    def _observed(self, peer: Peer, address: str, ok: bool) -> None:
        """Tell whoever measures reachability (app/reachability.py) which address answered."""
        if self.on_attempt is not None:
            self.on_attempt(peer.node_id, address, ok)

    async def call(self, peer: Peer, method: str, target: str, body: bytes = b"") -> dict:
        """A small signed request with a signed msgpack answer; non-200 is PeerRefused."""
        async def attempt(address: str) -> dict:
            nonce = os.urandom(16)
            headers = auth.sign_request(self.identity, method=method, target=target,
                                        callee=parse_node_id(peer.node_id), body_digest=auth.digest(body),
                                        now_ms=auth.now_ms(), nonce=nonce)
            with map_exceptions(address):
                async with self._http().request(method, address.rstrip("/") + target, data=body or None,
                                                headers=headers, ssl=self.pin(peer.sign_key)) as resp:
                    raw = await auth.read_limited(resp.content, MAX_ANSWER)
                    status, resp_headers = resp.status, resp.headers
            answer = self._answer(peer, nonce, status, raw, resp_headers)
            if status != 200:
                raise PeerRefused(f"{peer.node_id} refused: {answer.get('error', status)}", status)
            return answer
        return await self._each_address(peer, attempt)

    async def push_batch(self, peer: Peer, items: list[tuple[int, bytes, bytes]]) -> dict:
        body = wire.pack({"items": [{"seq": s, "head": h, "body": b} for s, h, b in items]})
        return await self.call(peer, "POST", "/v1/batch", body)

    async def fetch_outbox(self, peer: Peer, since: int, limit: int = 500, after: int = 0) -> dict:
        return await self.call(peer, "GET", f"/v1/outbox?since={since}&limit={limit}&after={after}")

    async def send_ack(self, peer: Peer, ack: dict) -> dict:
        return await self.call(peer, "POST", "/v1/acks", wire.pack(ack))

    async def send_receipts(self, peer: Peer, receipts: list[bytes]) -> dict:
        return await self.call(peer, "POST", "/v1/receipts", wire.pack({"receipts": receipts}))

    async def download_body(self, peer: Peer, record_id: str, offset: int) -> AsyncIterator[bytes]:
        """Stream a record's ciphertext from `offset`; integrity comes from the signed head."""
        if not peer.addresses:
            raise PeerUnreachable("no known address for this contact")
        target = f"/v1/records/{record_id}/body?offset={offset}"
        address = await self._each_address(peer, lambda a: self._probe(a, peer, record_id))
        nonce = os.urandom(16)
        headers = auth.sign_request(self.identity, method="GET", target=target, callee=parse_node_id(peer.node_id),
                                    body_digest=auth.digest(b""), now_ms=auth.now_ms(), nonce=nonce)
        with map_exceptions(address):
            async with self._http().get(address.rstrip("/") + target, headers=headers,
                                        ssl=self.pin(peer.sign_key)) as resp:
                if resp.status != 200:
                    raw = await auth.read_limited(resp.content, MAX_ANSWER)
                    answer = self._answer(peer, nonce, resp.status, raw, resp.headers)
                    raise PeerRefused(f"{peer.node_id} refused: {answer.get('error', resp.status)}", resp.status)
                async for piece in resp.content.iter_chunked(1 << 20):
                    yield piece

    async def _probe(self, address: str, peer: Peer, record_id: str) -> str:
        """The first address that answers as the peer (signed) for a body download."""
        await self.call(Peer(peer.node_id, peer.sign_key, (address,)), "GET", f"/v1/records/{record_id}/status")
        return address

    async def push_record(self, peer: Peer, record_id: str, head_raw: bytes, body_size: int,
                          read_from: Callable[[int], AsyncIterator[bytes]],
                          progress: Callable[[int], None] | None = None, seq: int | None = None) -> dict:
        """Upload a record; resume from the offset the peer says it has. Returns the peer's answer."""
        return await self._each_address(peer, lambda address: self._push_to(
            address, peer, record_id, head_raw, body_size, read_from, progress, seq))

    async def _push_to(self, address, peer, record_id, head_raw, body_size, read_from, progress, seq) -> dict:
        offset = 0
        if body_size > RESUME_PROBE:
            # Ask first, so an interrupted upload resumes instead of starting again.
            probe = await self.record_status(address, peer, record_id)
            if probe.get("stored"):
                return probe | {"status": "duplicate"}
            offset = probe.get("have", 0) if isinstance(probe.get("have"), int) else 0
        for _ in range(3):
            status, answer = await self._put(address, peer, record_id, head_raw, offset, read_from, progress, seq)
            if status == 409 and isinstance(answer.get("have"), int) and 0 <= answer["have"] <= body_size:
                offset = answer["have"]          # the peer kept a partial upload: send only the rest
                continue
            if status != 200:
                raise PeerRefused(f"{peer.node_id} refused the record: {answer.get('error', status)}", status)
            return answer
        raise PeerRefused("the peer keeps asking for a different offset", 409)

    async def record_status(self, address: str, peer: Peer, record_id: str) -> dict:
        target = f"/v1/records/{record_id}/status"
        nonce = os.urandom(16)
        headers = auth.sign_request(self.identity, method="GET", target=target, callee=parse_node_id(peer.node_id),
                                    body_digest=auth.digest(b""), now_ms=auth.now_ms(), nonce=nonce)
        with map_exceptions(address):
            async with self._http().get(address.rstrip("/") + target, headers=headers,
                                        ssl=self.pin(peer.sign_key)) as resp:
                raw = await auth.read_limited(resp.content, MAX_ANSWER)
                status, resp_headers = resp.status, resp.headers
        answer = self._answer(peer, nonce, status, raw, resp_headers)
        if status != 200:
            raise PeerRefused(f"{peer.node_id} refused: {answer.get('error', status)}", status)
        return answer

    async def _put(self, address, peer, record_id, head_raw, offset, read_from, progress, seq) -> tuple[int, dict]:
        target = f"/v1/records/{record_id}?offset={offset}" + (f"&seq={seq}" if seq is not None else "")
        nonce = os.urandom(16)
        headers = auth.sign_request(self.identity, method="PUT", target=target, callee=parse_node_id(peer.node_id),
                                    body_digest=auth.digest(head_raw), now_ms=auth.now_ms(), nonce=nonce)
        headers["Content-Type"] = "application/octet-stream"

        async def body() -> AsyncIterator[bytes]:
            yield len(head_raw).to_bytes(4, "big") + head_raw
            sent = offset
            async for piece in read_from(offset):
                yield piece
                sent += len(piece)
                if progress:
                    progress(sent)

        with map_exceptions(address):
            async with self._http().put(address.rstrip("/") + target, data=body(), headers=headers,
                                        ssl=self.pin(peer.sign_key)) as resp:
                raw = await auth.read_limited(resp.content, MAX_ANSWER)
                status = resp.status
                resp_headers = resp.headers
        return status, self._answer(peer, nonce, status, raw, resp_headers)

    def _answer(self, peer: Peer, nonce: bytes, status: int, raw: bytes, headers) -> dict:
        if len(raw) > MAX_ANSWER:
            raise RemoteProtocolError(f"answer from {peer.node_id} is over {MAX_ANSWER >> 20} MiB")
        if auth.H_SIG not in headers and status >= 400:
            # Refused before it could sign (it did not recognise us, or aiohttp itself refused):
            # the reason is shown for diagnosis but marked as unverified.
            raise PeerRefused(f"{peer.node_id} refused the request (HTTP {status}{_unsigned_reason(raw)})", status,
                              signed=False)
        auth.verify_response(peer.sign_key, nonce=nonce, status=status, body=raw, headers=headers)
        try:
            answer = wire.unpack(raw, max_size=MAX_ANSWER, what="answer")
        except ProtocolError:
            raise AuthenticationFailed("malformed answer from peer") from None
        if not isinstance(answer, dict):
            raise RemoteProtocolError("answer: expected a map")
        return answer


def _unsigned_reason(raw: bytes) -> str:
    try:
        reason = wire.unpack(raw, max_size=4096, what="answer").get("error", "")
    except (ProtocolError, AttributeError):
        return ""
    reason = "".join(ch for ch in str(reason)[:160] if ch.isprintable())
    return f", unverified reason: {reason}" if reason else ""
