"""Asking the router for an open port in UPnP IGD: the asyncio side (codecs: node/core/upnp.py).

`UpnpClient(gateway).map(internal_port, lifetime)` finds the router's
connection service (SSDP search from the interface facing the router, then its
description), learns the external address (GetExternalIPAddress) and adds a TCP
mapping to our LAN address. Only the router may steer us: SSDP answers from any
other address are ignored, and the description and control URLs must be plain
http:// to the router's own address. Everything read is size-capped and bounded
in time; aiohttp never follows a redirect and ignores proxy settings here.

Router quirks handled: a port already taken (718 ConflictInMappingEntry) is
mapped with AddAnyPortMapping where the service has it (IGDv2), else refused
clearly; a router that accepts only permanent leases (725, some IGDv1) gets
lease 0, and `permanent` says so (the service still renews, which re-creates a
mapping a router restart lost).

Errors: UpnpFault (the router said no), PeerTimeout (no answer),
PeerUnreachable (HTTP failed), RemoteProtocolError (garbage).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import aiohttp

from ..core import upnp as codec
from ..core.errors import CabinetError, PeerTimeout, PeerUnreachable, RemoteProtocolError
from ..core.portmap import Mapped
from ..core.upnp import Service, UpnpFault
from .netinfo import source_address

log = logging.getLogger("cabinet.upnp")
SEARCH_WAIT = (0.5, 1.0, 1.5)      # s to listen after each search round: 3 s in all
HTTP_TIMEOUT = 3.0                 # s for one description fetch or SOAP action


class _Answers(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr) -> None:      # type: ignore[no-untyped-def]
        if not self.queue.full():
            self.queue.put_nowait((data, addr[0]))


class UpnpClient:
    """The IGD behind one router address; TCP mappings of one internal port to our LAN address."""

    def __init__(self, gateway: str, *, ssdp_port: int = codec.SSDP_PORT, multicast: bool = True,
                 waits: tuple[float, ...] = SEARCH_WAIT, http_timeout: float = HTTP_TIMEOUT) -> None:
        self.gateway, self.ssdp_port, self.multicast = gateway, ssdp_port, multicast
        self.waits, self.http_timeout = waits, http_timeout
        self.service: Service | None = None
        self.local_ip = ""
        self.permanent = False             # the router accepts only lease 0 (725)

    # --- discovery ---------------------------------------------------------------------

    async def discover(self) -> Service:
        """The router's connection service (cached until forget())."""
        if self.service is not None:
            return self.service
        local = await asyncio.to_thread(source_address, self.gateway)
        if not local:
            raise PeerUnreachable(f"router {self.gateway}: no route to it")
        self.local_ip = local
        loop = asyncio.get_running_loop()
        sock = self._socket()
        transport, proto = await loop.create_datagram_endpoint(_Answers, sock=sock)
        tried: set[str] = set()
        ignored, problems = 0, list[CabinetError]()
        try:
            for wait in self.waits:
                self._search(transport)
                deadline = loop.time() + wait
                while (left := deadline - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(left):
                            data, sender = await proto.queue.get()
                    except TimeoutError:
                        break
                    if not _same_host(sender, self.gateway):
                        ignored += 1           # a LAN stranger, or another device: never followed
                        continue
                    try:
                        location = codec.check_url(codec.parse_ssdp_answer(data).location, self.gateway)
                    except RemoteProtocolError as exc:
                        problems.append(exc)
                        continue
                    if location in tried:
                        continue
                    tried.add(location)
                    try:
                        self.service = await self._describe(location)
                        return self.service
                    except CabinetError as exc:
                        problems.append(exc)
        finally:
            transport.close()
        if problems:
            raise problems[-1]                  # the router answered, but what it said was of no use
        others = f" ({ignored} answer(s) from other hosts ignored)" if ignored else ""
        raise PeerTimeout(f"no UPnP answer from the router {self.gateway}{others}")

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.local_ip))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            sock.bind((self.local_ip, 0))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise PeerUnreachable(f"router {self.gateway}: {exc.strerror or exc}") from None
        return sock

    def _search(self, transport: asyncio.DatagramTransport) -> None:
        """One round: each search target to the SSDP group on the router's side, and to the router
        itself (a unicast search, UDA 1.1 §1.3.3: some routers answer only one of the two)."""
        for st in codec.SEARCH_TARGETS:
            if self.multicast:
                transport.sendto(codec.msearch(st), (codec.SSDP_ADDR, self.ssdp_port))
            transport.sendto(codec.msearch(st, host=f"{self.gateway}:{self.ssdp_port}"),
                             (self.gateway, self.ssdp_port))

    async def _describe(self, location: str) -> Service:
        status, data = await self._http("GET", location, b"", {})
        if status != 200:
            raise RemoteProtocolError(f"UPnP description: HTTP {status}")
        return codec.parse_description(data, location, self.gateway)

    def forget(self) -> None:
        """Search again next time (the router may have restarted elsewhere)."""
        self.service = None

    # --- HTTP --------------------------------------------------------------------------

    async def _http(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request to the router, the answer read up to MAX_XML bytes."""
        codec.check_url(url, self.gateway)
        timeout = aiohttp.ClientTimeout(total=self.http_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.request(method, url, data=body or None, headers=headers,
                                           allow_redirects=False) as resp:
                    if (resp.content_length or 0) > codec.MAX_XML:
                        raise RemoteProtocolError(f"the router's answer is over {codec.MAX_XML // 1024} KiB")
                    data = await resp.content.read(codec.MAX_XML + 1)
                    while len(data) <= codec.MAX_XML and not resp.content.at_eof():
                        more = await resp.content.read(codec.MAX_XML + 1 - len(data))
                        if not more:
                            break
                        data += more
                    if len(data) > codec.MAX_XML:
                        raise RemoteProtocolError(f"the router's answer is over {codec.MAX_XML // 1024} KiB")
                    return resp.status, data
        except TimeoutError:
            raise PeerTimeout(f"router {self.gateway}: no HTTP answer in {self.http_timeout:g} s") from None
        except aiohttp.ClientError as exc:
            why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise PeerUnreachable(f"router {self.gateway}: {why}") from None

    async def action(self, action: str, args: list[tuple[str, str]]) -> dict[str, str]:
        """One SOAP action on the connection service: its output arguments, or UpnpFault."""
        service = await self.discover()
        body, headers = codec.soap_request(service.service_type, action, args)
        status, data = await self._http("POST", service.control_url, body, headers)
        try:
            values = codec.parse_soap_response(data, action)
        except RemoteProtocolError:
            if status != 200:
                raise RemoteProtocolError(f"UPnP {action}: HTTP {status}") from None
            raise
        return values

    # --- mapping -----------------------------------------------------------------------

    async def external_address(self) -> str:
        return codec.external_ip(await self.action("GetExternalIPAddress", []))

    async def map(self, internal_port: int, lifetime: int, external_port: int = 0) -> Mapped:
        """Add (or renew) TCP external_port (0: we ask for internal_port) -> our LAN address:internal_port."""
        await self.discover()
        address = await self.external_address()
        port = external_port or internal_port
        try:
            port = await self._add(port, internal_port, lifetime)
        except UpnpFault as exc:
            if exc.code != codec.CONFLICT:
                raise
            assert self.service is not None
            if self.service.version < 2 or self.service.service_type == codec.WANPPP1:
                raise UpnpFault("AddPortMapping", exc.code, detail=f"port {port} is taken at the router, and "
                                f"its {self.service.service_type.rsplit(':', 2)[1]}:{self.service.version} "
                                "cannot choose another") from None
            port = await self._add(port, internal_port, lifetime, any_port=True)
        log.debug("UPnP mapping %s:%d -> %s:%d", address, port, self.local_ip, internal_port)
        return Mapped(protocol="upnp", internal_port=internal_port, external_port=port, lifetime=lifetime,
                      epoch=0, external_ip=address)

    async def _add(self, external_port: int, internal_port: int, lifetime: int, any_port: bool = False) -> int:
        """AddPortMapping (or AddAnyPortMapping): the external port granted; 725 -> a permanent lease."""
        name = "AddAnyPortMapping" if any_port else "AddPortMapping"
        for _ in range(2):
            lease = 0 if self.permanent else lifetime
            args = codec.add_port_mapping(external_port=external_port, internal_port=internal_port,
                                          client=self.local_ip, lease=lease)
            try:
                values = await self.action(name, args)
            except UpnpFault as exc:
                if exc.code == codec.ONLY_PERMANENT and not self.permanent:
                    log.info("router %s accepts only permanent UPnP mappings: mapping permanently", self.gateway)
                    self.permanent = True
                    continue
                raise
            return codec.reserved_port(values) if any_port else external_port
        raise RemoteProtocolError(f"UPnP {name}: the router refused a permanent lease too")

    async def unmap(self, mapped: Mapped) -> None:
        await self.action("DeletePortMapping", codec.mapping_key(mapped.external_port))

    async def entry(self, external_port: int) -> dict[str, str] | None:
        """GetSpecificPortMappingEntry: the mapping of this external TCP port, or None (714)."""
        try:
            return await self.action("GetSpecificPortMappingEntry", codec.mapping_key(external_port))
        except UpnpFault as exc:
            if exc.code == codec.NO_SUCH_ENTRY:
                return None
            raise


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


__all__ = ["UpnpClient", "UpnpFault", "Mapped"]
