"""Asking the router for an open port: the asyncio side of NAT-PMP and PCP (codecs: node/core/portmap.py).

`PortMapper(gateway).map(internal_port, lifetime)` tries PCP first, then
NAT-PMP when the router says it only speaks that (or does not answer PCP),
and remembers which one worked. Each request is retransmitted after 250 ms,
doubling (RFC 6886 §3.1, RFC 6887 §8.1.1), a few times only: a router that
never answers is retried later by the service, not by blocking here. The
socket is connected to the router, so answers from anyone else are not read;
an answer that does not decode, or is for another mapping, is ignored.

Errors: MappingRefused (the router said no), PeerTimeout (no answer),
PeerUnreachable (nothing listens there: ICMP port unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from ..core import portmap as codec
from ..core.errors import PeerTimeout, PeerUnreachable, RemoteProtocolError
from ..core.portmap import Mapped, MappingRefused, UnsupportedVersion
from .netinfo import source_address

log = logging.getLogger("cabinet.portmap")
RETRIES = (0.25, 0.5, 1.0, 2.0)        # seconds to wait after each send: about 4 s in all


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[bytes | Exception] = asyncio.Queue(maxsize=64)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:      # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:      # type: ignore[no-untyped-def]
        if not self.answers.full():
            self.answers.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answers.full():
            self.answers.put_nowait(exc)


class PortMapper:
    """One router (host, port 5351 unless a test says otherwise); TCP mappings of one internal port."""

    def __init__(self, gateway: str, port: int = codec.SERVER_PORT, *, retries: tuple[float, ...] = RETRIES,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.gateway, self.port, self.retries = gateway, port, retries
        self._random = random_bytes
        self.protocol: str | None = None           # what the router answered last: "pcp" or "nat-pmp"
        self._nonce = random_bytes(codec.NONCE_BYTES)   # the same for renewals and the deletion (RFC 6887 §11.2)

    async def _ask(self, payload: bytes, decode: Callable[[bytes], object]) -> tuple[object, str]:
        """Send `payload` until an answer decodes; returns it and our source address."""
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.create_datagram_endpoint(_Exchange, remote_addr=(self.gateway, self.port))
        except OSError as exc:
            raise PeerUnreachable(f"router {self.gateway}: {exc.strerror or exc}") from None
        try:
            source = transport.get_extra_info("sockname")[0]
            for wait in self.retries:
                transport.sendto(payload)
                deadline = loop.time() + wait
                while (left := deadline - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(left):
                            got = await proto.answers.get()
                    except TimeoutError:
                        break
                    if isinstance(got, Exception):
                        raise PeerUnreachable(f"router {self.gateway}: no port mapping service "
                                              f"({getattr(got, 'strerror', None) or got})")
                    try:
                        return decode(got), source
                    except RemoteProtocolError as exc:
                        log.debug("ignoring an answer from %s: %s", self.gateway, exc)
            raise PeerTimeout(f"router {self.gateway} did not answer")
        finally:
            transport.close()

    async def map(self, internal_port: int, lifetime: int, external_port: int = 0) -> Mapped:
        """Open (or renew) TCP external_port (0: the router's choice; we suggest internal_port) -> internal_port."""
        suggest = external_port or internal_port
        if self.protocol != "nat-pmp":
            try:
                return await self._map_pcp(internal_port, suggest, lifetime)
            except (UnsupportedVersion, PeerTimeout) as exc:
                if self.protocol == "pcp" and isinstance(exc, PeerTimeout):
                    raise
                log.debug("router %s: no PCP (%s), trying NAT-PMP", self.gateway, exc)
        return await self._map_natpmp(internal_port, suggest, lifetime)

    async def _map_pcp(self, internal_port: int, suggest: int, lifetime: int, external_ip: str | None = None) -> Mapped:
        client_ip = await asyncio.to_thread(_source_for, self.gateway)
        payload = codec.pcp_map_request(client_ip=client_ip, internal_port=internal_port, external_port=suggest,
                                        lifetime=lifetime, nonce=self._nonce, external_ip=external_ip)
        mapped, _ = await self._ask(payload, lambda d: codec.parse_pcp_map(d, self._nonce, internal_port))
        assert isinstance(mapped, Mapped)
        self.protocol = "pcp"
        return mapped

    async def _map_natpmp(self, internal_port: int, suggest: int, lifetime: int) -> Mapped:
        mapped, _ = await self._ask(codec.natpmp_map_request(internal_port, suggest, lifetime),
                                    lambda d: codec.parse_natpmp_map(d, internal_port))
        assert isinstance(mapped, Mapped)
        self.protocol = "nat-pmp"
        if lifetime == 0:
            return mapped
        address, _ = await self.external_address()
        return Mapped(protocol="nat-pmp", internal_port=mapped.internal_port, external_port=mapped.external_port,
                      lifetime=mapped.lifetime, epoch=mapped.epoch, external_ip=address)

    async def external_address(self) -> tuple[str, int]:
        """NAT-PMP: the router's public IPv4 address and its epoch."""
        got, _ = await self._ask(codec.natpmp_address_request(), codec.parse_natpmp_address)
        assert isinstance(got, tuple)
        return got

    async def unmap(self, mapped: Mapped) -> None:
        """Remove the mapping (lifetime 0), in the protocol that made it."""
        if mapped.protocol == "pcp":
            await self._map_pcp(mapped.internal_port, mapped.external_port, 0, mapped.external_ip or None)
        else:
            await self._ask(codec.natpmp_map_request(mapped.internal_port, 0, 0),
                            lambda d: codec.parse_natpmp_map(d, mapped.internal_port))


def _source_for(gateway: str) -> str:
    return source_address(gateway) or "0.0.0.0"


__all__ = ["PortMapper", "Mapped", "MappingRefused", "UnsupportedVersion"]
