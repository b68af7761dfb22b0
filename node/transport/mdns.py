"""LAN discovery: announce this node over mDNS / DNS-SD and collect hints about others.

Owns the zeroconf instance, the `_cabinet._tcp.local.` registration and the
table of hints (node ID -> where the LAN says it is). A hint is never trusted:
anyone on the LAN can announce any node ID, so `verify_hint` fetches the
self-signed descriptor at the hinted address and keeps the hint only if the ID
derived from its key is the one announced; every later request and answer is
signed, so whoever answers there must also hold the key (docs/discovery.md).

The TXT record carries `v=1`, `id=<node ID>`, `name=<display name>` and, for a
node serving TLS (every node now), `tls=1`, and nothing else: it is broadcast to everyone on the LAN, so no patient data and
nothing about the practitioner beyond what a door plate shows.

Everything runs on the event loop through python-zeroconf's `async_` API;
only the interface enumeration (getifaddrs) goes to a worker thread.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import ifaddr
from zeroconf import IPVersion, NotRunningException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..core.errors import CabinetError, TransportError, UsageError
from ..core.identity import Descriptor, normalize_node_id

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("cabinet.mdns")

SERVICE = "_cabinet._tcp.local."
TXT_VERSION = b"1"
RESOLVE_MS = 3000           # how long one SRV/TXT/A resolution may wait for answers
SETTLE = 1.5                # s: resolve again once peers' cache-flush (RFC 6762 §10.2, 1 s) is done
VERIFY_TIMEOUT = 5.0        # s: a hint pointing into a black hole must not stall a lookup
MAX_NAME_BYTES = 100        # display name in TXT (a TXT string is at most 255 bytes)
MAX_SERVICES = 256          # announcements remembered; the oldest go first
MAX_PER_NODE = 4            # announcements kept per node ID, verified ones last (a flood cannot bury a lookup)
MAX_ADDRS = 4               # addresses taken from one announcement
WATCH_EVERY = 30.0          # s: how often the interfaces' addresses are compared (DHCP renumbering)

HintCallback = Callable[[str, str], Any]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hint:
    """Where the LAN says a node is. Unproven until `verified`."""

    node_id: str
    name: str
    url: str
    last_seen: int              # ms since the epoch, when an announcement last said so
    verified: bool = False      # the descriptor fetched there carried this node ID


@dataclass(slots=True)
class _Entry:
    node_id: str
    name: str
    urls: tuple[str, ...]
    last_seen: int


# --- TXT and addresses (pure) -------------------------------------------------

def txt_record(node_id: str, name: str, tls: bool = False) -> dict[bytes, bytes]:
    """The whole TXT record: a version, the node ID, the display name (cut to fit), TLS or not."""
    raw = name.strip().encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore")
    txt = {b"v": TXT_VERSION, b"id": normalize_node_id(node_id).encode("ascii"), b"name": raw.encode("utf-8")}
    return txt | ({b"tls": b"1"} if tls else {})


def scheme_of(props: dict[bytes, bytes | None]) -> str:
    """https for a node that says it serves TLS; http for one announced before TLS."""
    return "https" if props.get(b"tls") == b"1" else "http"


def parse_txt(props: dict[bytes, bytes | None]) -> tuple[str, str] | None:
    """(node ID, display name) from a received TXT record, or None if it is not ours or not valid."""
    if props.get(b"v") != TXT_VERSION:
        return None
    raw_id = props.get(b"id")
    if not raw_id:
        return None
    try:
        node_id = normalize_node_id(raw_id.decode("ascii"))
    except (UnicodeDecodeError, UsageError):
        return None
    raw_name = (props.get(b"name") or b"")[:MAX_NAME_BYTES]
    name = "".join(ch for ch in raw_name.decode("utf-8", "replace") if ch.isprintable()).strip()
    return node_id, name


def url_for(address: str, port: int, scheme: str = "http") -> str | None:
    """scheme://host:port for a usable LAN address; None for loopback, wildcard, multicast, scoped v6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if not 0 < port < 65536 or ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        return None
    if ip.version == 6:
        if ip.is_link_local:        # needs a zone index that a URL cannot carry portably
            return None
        return f"{scheme}://[{ip}]:{port}"
    return f"{scheme}://{ip}:{port}"


def _check_ips(addresses: Iterable[str]) -> list[str]:
    out = []
    for a in addresses:
        try:
            out.append(str(ipaddress.ip_address(a)))
        except ValueError:
            raise UsageError(f"not an IP address to announce on the LAN: {a!r}") from None
    return out


Bind = list  # of str (an IPv4 address) and int (an IPv6 interface index, as zeroconf joins ff02::fb per interface)


def _usable_v6(ip: ipaddress.IPv6Address) -> bool:
    """An IPv6 address worth announcing: not loopback, link-local (no zone in a URL) or multicast."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def interface_addresses(interfaces: Sequence[str] | None, ipv6: bool = True) -> tuple[Bind, list[str]]:
    """(what to bind mDNS to, the addresses to announce) for interface names or addresses (None = every
    non-loopback interface): IPv4 addresses, and with `ipv6` each interface with an IPv6 address by index
    (link-local is enough to browse) and its global or unique-local IPv6 addresses to announce.

    Blocking (getifaddrs): call it through asyncio.to_thread.
    """
    adapters = [ad for ad in ifaddr.get_adapters()]
    wanted_names = set(interfaces or ())
    bind: Bind = []
    announce: list[str] = []
    for ad in adapters:
        v4 = [ip.ip for ip in ad.ips if isinstance(ip.ip, str)]
        v6 = [ipaddress.IPv6Address(ip.ip[0].split("%")[0]) for ip in ad.ips if not isinstance(ip.ip, str)]
        if interfaces is None:
            if any(ipaddress.ip_address(a).is_loopback for a in v4) or any(a.is_loopback for a in v6):
                continue
            take_v4, take_v6 = v4, v6
        elif ad.name in wanted_names or ad.nice_name in wanted_names:
            take_v4, take_v6 = v4, v6
        else:                               # addresses named one by one
            take_v4 = [a for a in v4 if a in wanted_names]
            take_v6 = [a for a in v6 if str(a) in wanted_names or a.compressed in wanted_names]
        bind.extend(take_v4)
        announce.extend(take_v4)
        if ipv6 and take_v6 and ad.index is not None:
            bind.append(ad.index)
            announce.extend(str(a) for a in take_v6 if _usable_v6(a))
    return list(dict.fromkeys(bind)), list(dict.fromkeys(announce))


def ip_version_of(bind: Bind) -> IPVersion:
    v4, v6 = any(isinstance(b, str) for b in bind), any(isinstance(b, int) for b in bind)
    return IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)


def _show(bind: Bind) -> str:
    return ", ".join(b if isinstance(b, str) else f"IPv6 on interface {b}" for b in bind)


def _where(info: AsyncServiceInfo) -> tuple:
    return info.port, sorted(info.parsed_addresses())


# --- the LAN service ----------------------------------------------------------

class Lan:
    """Announce one node on the LAN and keep hints about the others.

        lan = Lan(interfaces=["eth0"], on_hint=callback)
        await lan.start(node_id, "Dr Anne Martin", 7400)      # port None: browse only
        ...
        await lan.update(port=7401)                           # re-announce (moves are also noticed alone)
        await lan.stop()

    `interfaces`: interface names or IP addresses to bind to (default: every
    non-loopback interface). Every `watch` seconds the interfaces' addresses
    are compared with the bound ones; a change (the box was renumbered)
    re-announces at once. None disables the watch.
    """

    def __init__(self, *, interfaces: Sequence[str] | None = None, on_hint: HintCallback | None = None,
                 watch: float | None = WATCH_EVERY, clock: Callable[[], int] = now_ms, tls: bool = True,
                 ipv6: bool = True) -> None:
        self.interfaces = list(interfaces) if interfaces is not None else None
        self.ipv6 = ipv6                        # announce and browse over IPv6 too (ff02::fb), where there is any
        self.tls = tls                          # what the announced server speaks (a node: always TLS)
        self.watch = watch
        self.callbacks: list[HintCallback] = [on_hint] if on_hint else []
        self._clock = clock
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._bound: Bind = []
        self._found: list[str] = []              # the interfaces' addresses to announce (IPv4, global/ULA IPv6)
        self._node_id = ""
        self._name = ""
        self._port: int | None = None
        self._addresses: list[str] | None = None
        self._host = f"cabinet-{os.urandom(4).hex()}.local."
        self._services: dict[str, _Entry] = {}          # service instance name (lower case) -> entry
        self._verified: set[tuple[str, str]] = set()     # (node ID, url)
        self._resolving: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()             # start, update and the watcher, one at a time

    @property
    def running(self) -> bool:
        return self._zc is not None

    @property
    def announced_addresses(self) -> list[str]:
        return self._info.parsed_addresses() if self._info is not None else []

    # --- lifecycle --------------------------------------------------------------

    async def start(self, node_id: str, name: str, port: int | None, addresses: list[str] | None = None) -> None:
        """Start browsing and, when `port` is given, announce this node on `addresses` (default: the interfaces).

        Without a usable interface this logs a warning and stays off (`running`
        is False) until the watch sees one: discovery is a convenience, never
        a reason for the node not to start.
        """
        if self._zc is not None:
            raise UsageError("LAN discovery is already running")
        if port and not node_id:
            raise UsageError("announcing on the LAN needs the node ID")
        self._node_id = normalize_node_id(node_id) if node_id else ""
        self._name = name
        self._port = port or None
        self._addresses = _check_ips(addresses) if addresses is not None else None
        async with self._lock:
            await self._open()
        if self.watch and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="cabinet-mdns-watch")

    async def _open(self) -> None:
        bind, found = await asyncio.to_thread(interface_addresses, self.interfaces, self.ipv6)
        if not bind:
            log.warning("no LAN interface with an IP address%s: LAN discovery is off",
                        f" among {', '.join(self.interfaces)}" if self.interfaces else "")
            return
        try:
            self._zc = AsyncZeroconf(interfaces=bind, ip_version=ip_version_of(bind))
        except OSError as exc:
            log.warning("cannot open the mDNS sockets (%s): LAN discovery is off", exc.strerror or exc)
            return
        self._bound, self._found = bind, found
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[self._on_change])
        if self._port and (self._addresses or found):
            self._info = self._service_info(self._node_id, found)
            # allow_name_change: someone squatting on our instance name cannot keep us off the LAN.
            await self._zc.async_register_service(self._info, allow_name_change=True)
        log.info("LAN discovery on %s%s", _show(bind),
                 f", announcing port {self._port}" if self._port else " (browsing only)")

    async def update(self, *, port: int | None = None, addresses: list[str] | None = None,
                     name: str | None = None) -> None:
        """The node moved (new address or port) or was renamed: rebind to the interfaces' addresses, re-announce."""
        if port is not None:
            self._port = port or None
        if addresses is not None:
            self._addresses = _check_ips(addresses)
        if name is not None:
            self._name = name
        async with self._lock:
            await self._update()

    async def _update(self) -> None:
        if self._zc is None:
            await self._open()
            return
        bind, found = await asyncio.to_thread(interface_addresses, self.interfaces, self.ipv6)
        if not bind:
            log.warning("LAN interfaces have no IP address any more: announcement withdrawn")
            await self._withdraw()
            self._bound, self._found = [], []
            return
        if bind != self._bound:
            await self._zc.async_update_interfaces(bind, ip_version_of(bind))
        self._bound, self._found = bind, found
        new = self._service_info(self._node_id, found) if self._port and (self._addresses or found) else None
        if self._info is not None and (new is None or _where(new) != _where(self._info)):
            # Goodbye first (TTL 0 expires the old address at every peer within a second,
            # however recently they heard it), then announce the new place afresh.
            await self._withdraw()
        if new is not None and self._info is None:
            self._info = new
            await self._zc.async_register_service(new, allow_name_change=True)
        elif new is not None:
            assert self._info is not None        # the branch above took the case of none held
            new.name = self._info.name           # the name we hold (renamed if someone squatted on it)
            self._info = new
            await self._zc.async_update_service(new)
        log.info("LAN announcement updated: %s", ", ".join(self.announced_addresses) or "browsing only")

    async def _watch(self) -> None:
        while True:
            assert self.watch is not None        # the watcher only runs when watch is set
            await asyncio.sleep(self.watch)
            try:
                bind, found = await asyncio.to_thread(interface_addresses, self.interfaces, self.ipv6)
                if (bind, found) != (self._bound, self._found):
                    log.info("LAN addresses changed (%s): re-announcing", ", ".join(found) or "none left")
                    async with self._lock:
                        await self._update()
            except (OSError, CabinetError, NotRunningException) as exc:
                log.warning("LAN discovery could not follow an address change: %s", exc)

    async def stop(self) -> None:
        """Say goodbye on the LAN and stop browsing; the hints are kept (they are only hints)."""
        if self._browser is not None:       # first, so no new resolution starts meanwhile
            await self._browser.async_cancel()
            self._browser = None
        pending = [*self._resolving.values(), *self._tasks, *([self._watcher] if self._watcher else [])]
        self._watcher = None
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._resolving.clear()
        self._tasks.clear()
        if self._zc is not None:
            await self._zc.async_close()        # unregisters: goodbye packets for our service
            self._zc = None
        self._info = None

    async def _withdraw(self) -> None:
        if self._info is not None and self._zc is not None:
            await (await self._zc.async_unregister_service(self._info))     # the goodbyes are sent
        self._info = None

    def _service_info(self, instance_or_name: str, found: list[str]) -> AsyncServiceInfo:
        name = instance_or_name if instance_or_name.endswith(SERVICE) else f"{instance_or_name}.{SERVICE}"
        addresses = self._addresses if self._addresses is not None else found
        return AsyncServiceInfo(SERVICE, name, port=self._port, properties=txt_record(self._node_id, self._name, self.tls),
                                server=self._host, parsed_addresses=addresses)

    # --- browsing ---------------------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Called by the browser on the event loop; must not block, so resolution is a task."""
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        if name in self._resolving:
            self._again.add(name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve_loop(name))
        self._resolving[name] = task

        def resolved(t: asyncio.Task, n: str = name) -> None:
            self._resolving.pop(n, None)
            self._task_failed(t, "resolving")
        task.add_done_callback(resolved)

    async def _resolve_loop(self, name: str) -> None:
        while True:
            self._again.discard(name)
            await self._resolve(name)
            await asyncio.sleep(SETTLE)         # a moved node's old address is flushed by now
            await self._resolve(name)
            if name not in self._again:
                return

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE, name)
        try:
            if not await info.async_request(self._zc.zeroconf, RESOLVE_MS):
                return
        except NotRunningException:         # stopping
            return
        parsed = parse_txt(info.properties)
        if parsed is None:
            log.debug("ignoring %s: not a cabinet v1 announcement", name)
            return
        node_id, display = parsed
        if node_id == self._node_id:
            return
        scheme = scheme_of(info.properties)
        urls = [u for a in info.parsed_addresses() if info.port and (u := url_for(a, info.port, scheme))]
        log.debug("%s resolved: %s at %s", name, node_id, ", ".join(urls) or "no usable address")
        if urls:
            self.record(name, node_id, display, urls[:MAX_ADDRS])

    # --- the hint table -----------------------------------------------------------

    def record(self, service: str, node_id: str, name: str, urls: Sequence[str]) -> None:
        """Remember what one announcement says now (replacing what it said before)."""
        key = service.lower()
        old = self._services.pop(key, None)
        known = set(old.urls) if old is not None and old.node_id == node_id else set()
        self._services[key] = _Entry(node_id, name, tuple(dict.fromkeys(urls)), self._clock())
        self._trim(node_id)
        fresh = [u for u in self._services.get(key, _Entry("", "", (), 0)).urls if u not in known]
        for url in fresh:
            self._fire(node_id, url)

    def _forget(self, service: str) -> None:
        if self._services.pop(service.lower(), None) is not None:
            self._prune_verified()

    def _drop(self, node_id: str, url: str) -> None:
        for key, e in list(self._services.items()):
            if e.node_id == node_id and url in e.urls:
                rest = tuple(u for u in e.urls if u != url)
                if rest:
                    e.urls = rest
                else:
                    del self._services[key]
        self._verified.discard((node_id, url))

    def _trim(self, node_id: str) -> None:
        """Bound memory against a flood of announcements; verified places are kept longest."""
        def age(item):
            key, e = item
            return (any((e.node_id, u) in self._verified for u in e.urls), e.last_seen)
        same = sorted(((k, e) for k, e in self._services.items() if e.node_id == node_id), key=age)
        for key, _ in same[:max(0, len(same) - MAX_PER_NODE)]:
            del self._services[key]
        if len(self._services) > MAX_SERVICES:
            for key, _ in sorted(self._services.items(), key=age)[:len(self._services) - MAX_SERVICES]:
                del self._services[key]
        self._prune_verified()

    def _prune_verified(self) -> None:
        live = {(e.node_id, u) for e in self._services.values() for u in e.urls}
        self._verified &= live

    def _fire(self, node_id: str, url: str) -> None:
        for cb in self.callbacks:
            try:
                result = cb(node_id, url)
            except Exception:
                log.exception("LAN hint callback failed")
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._hint_done)

    def _hint_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        self._task_failed(t, "hint callback")

    @staticmethod
    def _task_failed(task: asyncio.Task, what: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("LAN discovery: %s failed", what, exc_info=task.exception())

    def hints(self, node_id: str) -> list[str]:
        """URLs the LAN gave for `node_id`: verified first, then the most recently announced."""
        node_id = normalize_node_id(node_id)
        seen: dict[str, tuple[bool, int]] = {}
        for e in reversed(self._services.values()):         # ties: the latest announcement first
            if e.node_id != node_id:
                continue
            for u in e.urls:
                rank = ((node_id, u) in self._verified, e.last_seen)
                seen[u] = max(seen.get(u, rank), rank)
        return sorted(seen, key=lambda u: seen[u], reverse=True)

    def peers(self) -> list[Hint]:
        """Every hint the LAN gave (one per node and address), sorted by name then node ID."""
        out: dict[tuple[str, str], Hint] = {}
        for e in self._services.values():
            for u in e.urls:
                h = Hint(node_id=e.node_id, name=e.name, url=u, last_seen=e.last_seen,
                         verified=(e.node_id, u) in self._verified)
                prev = out.get((e.node_id, u))
                if prev is None or prev.last_seen < h.last_seen:
                    out[(e.node_id, u)] = h
        return sorted(out.values(), key=lambda h: (h.name.casefold(), h.node_id, -h.last_seen, h.url))

    # --- trust ----------------------------------------------------------------------

    async def verify_hint(self, client: "Client", node_id: str, url: str) -> Descriptor | None:
        """The descriptor at `url` if it is `node_id`'s own; None (and the hint dropped) if not.

        This stops a LAN answer from sending us, or our contacts' addresses,
        to another node. That whoever answers there also holds the key is
        proven by the client's signed requests and the signed answers.
        """
        node_id = normalize_node_id(node_id)
        try:
            async with asyncio.timeout(VERIFY_TIMEOUT):
                raw = await client.fetch_descriptor(url)
        except (TransportError, TimeoutError) as exc:
            log.info("LAN hint %s for %s did not answer: %s", url, node_id, str(exc) or "timeout")
            return None
        except UsageError as exc:
            log.info("LAN hint %s for %s is not usable: %s", url, node_id, exc)
            return None
        except CabinetError:
            raw = b""
        try:
            desc = Descriptor.from_wire(raw)
        except CabinetError:
            desc = None
        if desc is None or desc.node_id != node_id:
            log.warning("spoofed mDNS answer for %s at %s ignored", node_id, url)
            self._drop(node_id, url)
            return None
        if desc.expired(self._clock()):
            log.info("LAN hint %s for %s serves an expired descriptor", url, node_id)
            return None
        if any(node_id == e.node_id and url in e.urls for e in self._services.values()):
            self._verified.add((node_id, url))
        return desc


async def browse(seconds: float, *, interfaces: Sequence[str] | None = None, own_id: str | None = None,
                 client: "Client | None" = None) -> list[Hint]:
    """One-shot: listen on the LAN for `seconds`, then return the peers (verified when a client is given)."""
    lan = Lan(interfaces=interfaces, watch=None)
    await lan.start(own_id or "", "", None)
    try:
        await asyncio.sleep(seconds)
        if client is not None:
            await asyncio.gather(*(lan.verify_hint(client, h.node_id, h.url) for h in lan.peers()))
        return lan.peers()
    finally:
        await lan.stop()

