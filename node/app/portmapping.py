"""Being reachable directly: the router's open port and the interfaces' global IPv6 addresses.

A service built from ports, started by `Node.serve` once the server listens.
Each round it:

* when listening on every interface (dual stack), reads the interfaces' global
  IPv6 addresses (2000::/3, never link-local, unique-local or temporary ones);
* when port mapping is on (config.port_mapping) and the node listens beyond
  loopback (or a router is named in config.port_mapping_gateway), asks the
  router for a TCP mapping of its port: PCP, else NAT-PMP, else UPnP IGD (the
  first that works wins and is remembered until it fails), renews it before
  half its lifetime has passed, learns the public address from the answer;
* puts what it found in `config.learned` (listed in the descriptor after the
  configured addresses) and calls `on_change` when that changed, so the
  descriptor is re-signed and published.

On stop the mapping is deleted (lifetime 0). A router that does not answer, or
refuses, is asked again later; `status()` says what happened last. A public
address that is itself private (a second NAT, carrier-grade NAT) is not
advertised: nobody outside could use it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Awaitable, Callable

from ..config import is_loopback, is_wildcard
from ..core.errors import CabinetError
from ..core.portmap import SERVER_PORT, Mapped
from ..transport import netinfo
from ..transport.portmap import PortMapper
from ..transport.upnp import UpnpClient
from .loop import Loop
from .ports import Ports

log = logging.getLogger("cabinet.portmapping")
METHODS = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP IGD"}      # as status and the log name them
LIFETIME = 7200                 # s asked for (RFC 6886 §3.3 recommends two hours)
RETRY_AFTER = 300.0             # s before asking a router that failed again
RESCAN_EVERY = 60.0             # s between looks at the interfaces' IPv6 addresses
UNMAP_TIMEOUT = 3.0             # s a stopping node waits for the router to delete the mapping
# Not reachable from the Internet even when a router calls it "external".
_HIDDEN = tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
                                                   "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
                                                   "224.0.0.0/3"))


def advertisable(ip: str) -> bool:
    """A router's external IPv4 address that callers elsewhere could reach."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return not any(addr in n for n in _HIDDEN)


def gateway_of(setting: str) -> tuple[str, int] | None:
    """config.port_mapping_gateway ("HOST" or "HOST:PORT"), else the default route's router."""
    if setting:
        host, sep, port = setting.rpartition(":")
        return (host, int(port)) if sep and port.isdigit() else (setting, SERVER_PORT)
    gw = netinfo.default_gateway()
    return (gw, SERVER_PORT) if gw else None


def url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class PortMapping(Loop):
    def __init__(self, ports: Ports, *, on_change: Callable[[], Awaitable[None]]) -> None:
        super().__init__("cabinet-portmapping", self._round)
        self.ports, self.on_change = ports, on_change
        self.port = 0
        self.scan_ipv6 = False
        self.mapping = False
        self.mapper: PortMapper | None = None
        self.upnp: UpnpClient | None = None
        self.method: str | None = None         # what worked last ("pcp", "nat-pmp", "upnp"): asked first
        self.mapped: Mapped | None = None
        self.renew_at = 0                       # ms (ports.clock)
        self.last_error: str | None = None
        self.ipv6: list[str] = []

    async def begin(self, host: str, port: int) -> None:
        """The server listens on host:port: look at the interfaces now (so the first descriptor has the
        IPv6 addresses), then keep the mapping in the background."""
        cfg = self.ports.config
        self.port = port
        self.scan_ipv6 = is_wildcard(host)
        self.mapping = bool(port) and cfg.port_mapping and (not is_loopback(host) or bool(cfg.port_mapping_gateway))
        if self.scan_ipv6:
            self.ipv6 = await asyncio.to_thread(netinfo.global_ipv6)
            if self._found() != cfg.learned:
                cfg.learned = self._found()
                await self.on_change()
        if self.mapping or self.scan_ipv6:
            self.start()

    def _found(self) -> tuple[str, ...]:
        found = [url(a, self.port) for a in self.ipv6]
        m = self.mapped
        if m is not None and m.lifetime and advertisable(m.external_ip):
            found.append(url(m.external_ip, m.external_port))
        return tuple(found)

    async def _round(self) -> float:
        delay = RESCAN_EVERY if self.scan_ipv6 else 3600.0
        if self.scan_ipv6:
            self.ipv6 = await asyncio.to_thread(netinfo.global_ipv6)
        if self.mapping:
            now = self.ports.clock()
            if now >= self.renew_at:
                await self._map()
            delay = min(delay, max(0.05, (self.renew_at - self.ports.clock()) / 1000))
        found = self._found()
        if found != self.ports.config.learned:
            log.info("reachable at %s", ", ".join(found) or "configured addresses only")
            self.ports.config.learned = found
            await self.on_change()
        return delay

    async def _map(self) -> None:
        """Ask (again) for the mapping; on failure, forget it and ask again after RETRY_AFTER."""
        try:
            if self.mapper is None:
                gw = await asyncio.to_thread(gateway_of, self.ports.config.port_mapping_gateway)
                if gw is None:
                    raise CabinetError("no default router to ask")
                self.mapper, self.upnp = PortMapper(*gw), UpnpClient(gw[0])
            previous = self.mapped.external_port if self.mapped is not None else 0
            mapped = await self._ask(previous)
        except CabinetError as exc:
            if self.last_error != str(exc):
                log.info("port mapping: %s", exc)
            self.last_error, self.mapped, self.method = str(exc), None, None
            if self.upnp is not None:
                self.upnp.forget()
            self.renew_at = self.ports.clock() + int(RETRY_AFTER * 1000)
            return
        if self.mapped is None or (mapped.external_ip, mapped.external_port) != \
                (self.mapped.external_ip, self.mapped.external_port):
            log.info("%s", self._summary(mapped))
        self.mapped, self.last_error, self.method = mapped, None, mapped.protocol
        # Renew at half the lifetime granted (RFC 6886 §3.3, RFC 6887 §11.2.1), at least a second apart.
        self.renew_at = self.ports.clock() + max(1000, mapped.lifetime * 500)

    async def _ask(self, previous: int) -> Mapped:
        """The remembered method only, or each in turn (PCP, NAT-PMP, UPnP) until one maps the port."""
        assert self.mapper is not None and self.upnp is not None
        first: CabinetError | None = None
        if self.method in (None, "pcp", "nat-pmp"):
            try:
                return await self.mapper.map(self.port, LIFETIME, external_port=previous)
            except CabinetError as exc:
                if self.method is not None:
                    raise
                first = exc
        try:
            return await self.upnp.map(self.port, LIFETIME, external_port=previous if self.method else 0)
        except CabinetError as exc:
            if first is None:
                raise
            raise CabinetError(f"PCP/NAT-PMP: {first}; UPnP: {exc}") from None

    def _summary(self, m: Mapped) -> str:
        where = f"{m.external_ip}:{m.external_port}" if m.external_ip else f"port {m.external_port}"
        permanent = " (permanent: the router accepts no lease)" if self._permanent() else ""
        hidden = "" if advertisable(m.external_ip) else " (a private address: not advertised)"
        return f"mapped by {METHODS.get(m.protocol, m.protocol)}: {where}{permanent}{hidden}"

    def _permanent(self) -> bool:
        return self.method == "upnp" and self.upnp is not None and self.upnp.permanent

    async def close(self) -> None:
        """Stop renewing and delete the mapping at the router (a bounded wait)."""
        await self.stop()
        mapped, self.mapped = self.mapped, None
        if mapped is not None and self.mapper is not None and self.upnp is not None:
            try:
                async with asyncio.timeout(UNMAP_TIMEOUT):
                    await (self.upnp if mapped.protocol == "upnp" else self.mapper).unmap(mapped)
            except (CabinetError, TimeoutError) as exc:
                log.info("port mapping not removed at the router (it expires by itself): %s", exc or "timeout")
        self.ports.config.learned = ()

    def status(self) -> dict:
        """For `cabinet status`: how the router's door stands (no secret, no patient data here)."""
        m = self.mapped
        state = "mapped" if m else ("failed" if self.last_error else ("trying" if self.mapping else "off"))
        summary = self._summary(m) if m else (f"not mapped: {self.last_error}" if self.last_error else state)
        return {"enabled": self.mapping, "state": state, "summary": summary,
                "protocol": m.protocol if m else None, "permanent": bool(m) and self._permanent(),
                "gateway": self.mapper.gateway if self.mapper else None,
                "external_address": m.external_ip if m else None, "external_port": m.external_port if m else None,
                "lifetime": m.lifetime if m else None, "renew_at": self.renew_at if m else None,
                "last_error": self.last_error, "ipv6": list(self.ipv6)}
