"""How this node is reached, and how it reaches its contacts (docs/relay.md, "Reachability").

A service built from ports. While the node serves, it keeps registrations open
at the relays in `config.relays`, accepting the contacts that are neither held
nor revoked (the list is renewed when it changes).

Reaching a contact is measured, not guessed: `observe()` is told, for every
address tried, whether it answered, and keeps per contact which address last
worked (node/store/reachability.py, so it survives restarts). `peer(p)` orders
a contact's addresses by that memory, cheapest first (LAN, direct IPv6, direct
IPv4 or a mapped port, relay); an address that failed more recently than it
worked goes after the others until a recheck delay has passed (growing with its
failures, 1 min to 1 h), then it is tried first again, so a path that comes
back is found. relay+tcp:// addresses become local tunnel addresses last.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from urllib.parse import urlsplit

from ..core.errors import CabinetError
from ..core.identity import RELAY_SCHEME, parse_node_id
from ..store import reachability as table
from ..store.reachability import Seen
from ..transport.client import Peer
from ..transport.relayed import Registrar, RelayState, Tunnels
from .contacts import Contacts
from .loop import Loop
from .ports import Ports

log = logging.getLogger("cabinet.reachability")
ACCEPT_CHECK_EVERY = 30.0
RECHECK_MS = 60_000              # a failed cheaper path is tried first again after this (doubling) ...
RECHECK_MAX_MS = 3_600_000       # ... up to an hour
RESAVE_OK_MS = 600_000           # a path that keeps working: its success is written at most this often
LAN, DIRECT_V6, DIRECT_V4, RELAYED = 0, 1, 2, 3
# A practice's own network (RFC 1918, IPv6 unique-local, link-local). Not ipaddress's is_private,
# which also counts documentation and test ranges that are public addresses in a test's network.
LAN_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                     "169.254.0.0/16", "fc00::/7", "fe80::/10"))


def cost(address: str) -> int:
    """How cheap a path is: LAN, then direct IPv6, then direct IPv4 (a mapped port too), then a relay."""
    if address.startswith(RELAY_SCHEME + "://"):
        return RELAYED
    host = urlsplit(address).hostname or ""
    if host.endswith(".local"):
        return LAN
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return DIRECT_V4                          # a name: as a public address
    if any(ip.version == n.version and ip in n for n in LAN_NETS):
        return LAN
    return DIRECT_V6 if ip.version == 6 else DIRECT_V4


def suspect(seen: Seen | None, now: int) -> bool:
    """Failed more recently than it worked, and not yet due for a recheck."""
    if seen is None or seen.fails == 0 or seen.failed_at <= seen.ok_at:
        return False
    return now - seen.failed_at < min(RECHECK_MAX_MS, RECHECK_MS * 2 ** min(seen.fails - 1, 16))


def order(addresses: tuple[str, ...], memory: dict[str, Seen], now: int) -> tuple[str, ...]:
    """The addresses in the order to try them: working or unknown paths by cost, then suspect ones
    (the one that worked last first among them); the descriptor's order breaks ties."""
    def key(item: tuple[int, str]) -> tuple:
        i, a = item
        seen = memory.get(a)
        if suspect(seen, now):
            return (1, -(seen.ok_at if seen else 0), cost(a), i)
        return (0, 0, cost(a), i)
    return tuple(a for _, a in sorted(enumerate(addresses), key=key))


class Reachability(Loop):
    def __init__(self, ports: Ports, contacts: Contacts) -> None:
        super().__init__("cabinet-reachability", self._check_accept)
        self.ports, self.contacts = ports, contacts
        # Handshakes carry wall-clock time, as request signatures do (the relay checks the skew).
        self.tunnels = Tunnels(identity=lambda: self.ports.identity)
        self.registrar: Registrar | None = None
        self._accepting: frozenset[bytes] | None = None
        self.memory: dict[str, dict[str, Seen]] = {}
        self._via: dict[str, str] = {}            # local tunnel address -> the relay address it stands for
        self._loaded = False
        self._saving: set[asyncio.Task] = set()
        self._written: dict[tuple[str, str], int] = {}   # (contact, address) -> the ok_at last written
        if hasattr(ports.client, "on_attempt"):    # the client reports every address it tries
            ports.client.on_attempt = self.observe

    async def load(self) -> None:
        """Read the memory kept in the data folder (once; peer() orders by cost until then)."""
        if not self._loaded:
            self._loaded = True
            await self.ports.store.call(table.ensure_schema)
            stored = await self.ports.store.call(table.load)
            for node_id, seen in stored.items():     # what was observed while loading wins
                self.memory[node_id] = {**seen, **self.memory.get(node_id, {})}

    def peer(self, peer: Peer) -> Peer:
        """The same peer, its addresses in the order to try them, relay addresses as local tunnels."""
        if not self._loaded:
            self._background(self.load())
        addrs = order(peer.addresses, self.memory.get(peer.node_id, {}), self.ports.clock())
        if any(a.startswith(RELAY_SCHEME + "://") for a in addrs):
            addrs = tuple(self._tunnel(a, peer.node_id) if a.startswith(RELAY_SCHEME + "://") else a for a in addrs)
        return Peer(peer.node_id, peer.sign_key, addrs)

    def _tunnel(self, relay: str, node_id: str) -> str:
        local = self.tunnels.address(relay, node_id)
        if len(self._via) >= 4096:
            self._via.clear()
        self._via[local] = relay
        return local

    def observe(self, node_id: str, address: str, ok: bool) -> None:
        """One address of a contact answered (ok) or not: remember it, in memory at once, on disk soon."""
        address = self._via.get(address, address)
        mine = self.memory.setdefault(node_id, {})
        before, switched = mine.get(address), self.last_worked(node_id) != address
        seen = mine[address] = (before or Seen()).after(ok, self.ports.clock())
        if len(mine) > table.MAX_PER_NODE:
            del mine[min(mine, key=lambda a: max(mine[a].ok_at, mine[a].failed_at))]
        # A path that keeps working is written again only now and then (each write is a commit and an
        # fsync, and a busy practice calls a colleague every few seconds); a failure, a path working
        # again, or another path becoming the one that worked last is written at once.
        key = (node_id, address)
        if (ok and before is not None and before.fails == 0 and not switched
                and seen.ok_at - self._written.get(key, 0) < RESAVE_OK_MS):
            return
        if ok:
            self._written[key] = seen.ok_at
        self._background(self._save(node_id, address, seen))

    def _background(self, work) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:
            work.close()                             # no loop running: memory only
            return
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _save(self, node_id: str, address: str, seen: Seen) -> None:
        try:
            await self.load()
            await self.ports.store.call(table.record, node_id, address, seen)
        except CabinetError as exc:
            log.info("could not keep which address of %s worked: %s", node_id, exc)

    def last_worked(self, node_id: str) -> str | None:
        """The address of this contact that answered last (for `cabinet status`), if any."""
        worked = [(s.ok_at, a) for a, s in self.memory.get(node_id, {}).items() if s.ok_at]
        return max(worked)[1] if worked else None

    async def accepted(self) -> frozenset[bytes]:
        """The callers a registration lets through: contacts not held and not revoked."""
        ids = frozenset(parse_node_id(c["node_id"]) for c in await self.contacts.list()
                        if not c["revoked"] and not c.get("held"))
        self._accepting = ids
        return ids

    def start_registrations(self, local_port: int) -> None:
        """Register at the configured relays; joined connections go to 127.0.0.1:local_port."""
        if self.registrar is not None or not self.ports.config.relays:
            return
        self.registrar = Registrar(list(self.ports.config.relays), identity=lambda: self.ports.identity,
                                   accept=self.accepted, local_port=local_port,
                                   rng=self.ports.rng)
        self.registrar.start()
        self.start()

    async def _check_accept(self) -> float:
        await self.refresh_accept()
        return ACCEPT_CHECK_EVERY

    async def refresh_accept(self) -> bool:
        """A contact added, held or revoked: renew the registrations so the relays learn it (True if so)."""
        if self.registrar is not None and self._accepting is not None:
            before = self._accepting
            if await self.accepted() != before:
                self.registrar.renew()
                return True
        return False

    def status(self) -> list[RelayState]:
        return list(self.registrar.state.values()) if self.registrar is not None else []

    async def close(self) -> None:
        await self.stop()
        if self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)
        if self.registrar is not None:
            await self.registrar.stop()
            self.registrar = None
        await self.tunnels.close()
