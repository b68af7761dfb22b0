"""Finding colleagues and keeping their descriptors fresh: bootstraps, LAN hints, known addresses.

A service built from ports (node/app/ports.py). Every descriptor, wherever it
came from, is self-signed and checked the same way (node/core/identity.py): a
bootstrap or a LAN answer can withhold or be stale, never forge. A node ID is
resolved in this order: LAN hints first (fast, local), then the bootstraps,
then the last address we knew.

While the node runs, a loop announces its descriptor to the configured
bootstraps (at start, every ten minutes, and at once when it changes) and
refreshes its contacts' descriptors, so a colleague's new address or rotated
encryption key is learnt without anyone doing anything. `locate(contact)`
says where to reach a contact: verified LAN addresses first, then its
descriptor's.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from ..core.errors import CabinetError, NotFound, UsageError
from ..core.directory import Found
from ..core.identity import Descriptor, normalize_node_id
from ..transport import directory
from ..transport.client import Peer
from .contacts import Contacts, OwnDescriptor
from .events import PeerSeen
from .loop import Loop
from .ports import Ports

if TYPE_CHECKING:
    from ..transport.mdns import Hint, Lan

log = logging.getLogger("cabinet.discovery")
REFRESH_EVERY = 600.0
LAN_LISTEN = 2.0             # seconds a one-shot command listens for LAN announcements


class Discovery(Loop):
    def __init__(self, ports: Ports, contacts: Contacts, own: OwnDescriptor) -> None:
        super().__init__("cabinet-discovery", self.round)
        self.ports, self.contacts, self.own = ports, contacts, own
        self.lan: Lan | None = None               # while LAN discovery runs
        self.on_contact_seen = lambda node_id: None   # the facade wakes the courier
        self._tell_contacts = False

    @property
    def bootstraps(self) -> list[str]:
        return list(self.ports.config.bootstraps)

    def locate(self, contact: dict) -> Peer:
        """Where to reach a contact: verified LAN addresses first, then its descriptor's."""
        urls = list(Descriptor.from_wire(contact["descriptor"]).addresses)
        if self.lan is not None:
            lan = [h.url for h in self.lan.peers() if h.node_id == contact["node_id"] and h.verified]
            urls = lan + [u for u in urls if u not in lan]
        return Peer(contact["node_id"], contact["sign_key"], tuple(urls))

    async def start_lan(self, host: str, port: int | None) -> None:
        """Announce on the LAN (and browse it) unless disabled or only listening on loopback."""
        ip = None if host in ("0.0.0.0", "::", "") else host
        if not self.ports.config.lan or (ip is not None and ipaddress.ip_address(ip).is_loopback) \
                or self.own.current.revoked:
            return
        from ..transport import mdns          # zeroconf is loaded only when the LAN is used
        self.lan = mdns.Lan(interfaces=[ip] if ip else None, on_hint=self._on_lan_hint)
        await self.lan.start(self.ports.identity.node_id, self.ports.config.name, port,
                             addresses=[ip] if ip and port else None)

    async def stop_lan(self) -> None:
        if self.lan is not None:
            lan, self.lan = self.lan, None
            await lan.stop()                      # goodbye packets

    async def _on_lan_hint(self, node_id: str, url: str) -> None:
        """A contact announced itself on the LAN: check it is really them, learn, deliver."""
        row = await self.contacts.by_id(node_id)
        if row is None or row["revoked"] or self.lan is None:
            return                                # strangers are listed, never fetched unasked
        desc = await self.lan.verify_hint(self.ports.client, node_id, url)
        if desc is None:
            return
        self.ports.publish(PeerSeen(at=self.ports.now(), node_id=node_id, url=url, verified=True))
        if desc.seq > row["seq"]:
            await self.contacts.learn(desc)
        self.on_contact_seen(node_id)

    async def lan_peers(self, wait: float) -> list[Hint]:
        """Nodes announcing themselves on the LAN (listened to for `wait` seconds when not running)."""
        if self.lan is not None:
            return self.lan.peers()
        from ..transport import mdns
        return await mdns.browse(wait, own_id=self.ports.identity.node_id, client=self.ports.client)

    async def descriptor_changed(self, *, tell_contacts: bool = False) -> None:
        """Tell the LAN and wake the announce loop after our descriptor changed; with
        `tell_contacts` (a new address), the loop also hands it to every contact directly."""
        self._tell_contacts = self._tell_contacts or tell_contacts
        self.wake()
        if self.lan is not None:
            if self.own.current.revoked:
                await self.stop_lan()
            else:
                await self.lan.update(name=self.ports.config.name)

    async def round(self) -> float:
        if self.bootstraps:
            await self.announce()
        if self._tell_contacts:
            self._tell_contacts = False
            await self.tell_all(self.own.current)
        await self.refresh_contacts()
        return REFRESH_EVERY

    async def announce(self) -> dict[str, str]:
        """Publish our descriptor to every bootstrap; returns each one's outcome ('ok' or why not)."""
        if not self.bootstraps:
            return {}
        results = await directory.announce_all(self.bootstraps, self.own.current.signed)
        for url, r in results.items():
            if isinstance(r, CabinetError):
                log.warning("announce to %s failed: %s", url, r)
        return {url: str(r) if isinstance(r, CabinetError) else "ok" for url, r in results.items()}

    async def tell_all(self, desc: Descriptor) -> int:
        """Hand our new descriptor (rotated key, revocation) to every contact directly."""
        told = 0
        for c in await self.contacts.list():
            if c["revoked"]:
                continue
            try:
                await self.ports.client.call(self.locate(c), "POST", "/v1/descriptor", desc.signed)
                told += 1
            except CabinetError as exc:
                log.info("could not tell %s about our new descriptor: %s", c["node_id"], exc)
        return told

    async def search(self, query: str) -> list[Found]:
        """Practitioners matching `query`, each with the conflicts flagged (same RPPS, same name and city)."""
        if not self.bootstraps:
            raise UsageError("no bootstrap server configured (cabinet init/run --bootstrap URL)")
        return await directory.search_any_flagged(self.bootstraps, query)

    async def lookup(self, node_id: str, min_seq: int = 0) -> Descriptor | None:
        """Resolve a node ID: LAN hints, then bootstraps, then the last known address."""
        node_id = normalize_node_id(node_id)
        best: Descriptor | None = None
        for source in (lambda: self._from_lan(node_id), lambda: self._from_bootstraps(node_id, min_seq),
                       lambda: self._from_known_address(node_id)):
            found = await source()
            if found is not None and found.node_id == node_id and (best is None or found.seq > best.seq):
                best = found
            if best is not None and best.seq > min_seq:
                break
        return best

    async def _from_lan(self, node_id: str) -> Descriptor | None:
        if self.lan is not None:
            for url in self.lan.hints(node_id):
                desc = await self.lan.verify_hint(self.ports.client, node_id, url)
                if desc is not None:
                    return desc
            return None
        if not self.ports.config.lan:
            return None
        # Not running (a one-shot command): listen to the LAN briefly; hints come back verified.
        from ..transport import mdns
        hints = await mdns.browse(LAN_LISTEN, own_id=self.ports.identity.node_id, client=self.ports.client)
        for h in hints:
            if h.node_id == node_id and h.verified:
                try:
                    desc = Descriptor.from_wire(await self.ports.client.fetch_descriptor(h.url))
                except CabinetError:
                    continue
                if desc.node_id == node_id:
                    return desc
        return None

    async def _from_bootstraps(self, node_id: str, min_seq: int) -> Descriptor | None:
        if not self.bootstraps:
            return None
        try:
            return await directory.lookup_any(self.bootstraps, node_id, min_seq=min_seq)
        except CabinetError as exc:
            log.info("bootstrap lookup of %s failed: %s", node_id, exc)
            return None

    async def _from_known_address(self, node_id: str) -> Descriptor | None:
        row = await self.contacts.by_id(node_id)
        if row is None:
            return None
        for address in Descriptor.from_wire(row["descriptor"]).addresses:
            try:
                desc = Descriptor.from_wire(await self.ports.client.fetch_descriptor(address))
            except CabinetError:
                continue
            if desc.node_id == node_id:
                return desc
        return None

    async def resolve(self, node_id: str) -> Descriptor:
        desc = await self.lookup(node_id)
        if desc is None:
            where = "the LAN or the bootstraps" if self.bootstraps else "the LAN (no bootstrap configured)"
            raise NotFound(f"could not find node {normalize_node_id(node_id)} on {where}")
        return desc

    async def refresh_contacts(self) -> int:
        """Look for newer descriptors of every contact; returns how many changed."""
        changed = 0
        for c in await self.contacts.list():
            try:
                desc = await self.lookup(c["node_id"], min_seq=c["seq"])
                if desc is not None and desc.seq > c["seq"]:
                    _, status = await self.contacts.learn(desc)
                    changed += status == "updated"
            except CabinetError as exc:
                log.info("refreshing %s: %s", c["node_id"], exc)
        return changed
