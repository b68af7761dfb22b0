"""Finding colleagues and keeping their descriptors fresh: bootstraps, LAN hints, known addresses.

Part of the wiring layer. Every descriptor, wherever it came from, is
self-signed and checked the same way (node/identity.py): a bootstrap or a LAN
answer can withhold or be stale, never forge. A node ID is resolved in this
order: LAN hints first (fast, local), then the bootstraps, then the last
address we knew.

While the node runs, a loop announces its descriptor to the configured
bootstraps (at start, every ten minutes, and at once when it changes) and
refreshes its contacts' descriptors, so a colleague's new address or rotated
encryption key is learnt without anyone doing anything.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .courier import _Loop
from ..core.errors import CabinetError, NotFound, UsageError
from ..core.identity import Descriptor, normalize_node_id
from ..store import records
from ..transport import directory, mdns

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("cabinet.discovery")
REFRESH_EVERY = 600.0
LAN_LISTEN = 2.0             # seconds a one-shot command listens for LAN announcements


class Discovery(_Loop):
    def __init__(self, node: "Node") -> None:
        super().__init__("cabinet-discovery", self.round)
        self.node = node
        self.lan = None                 # set by node.serve when LAN discovery runs

    @property
    def bootstraps(self) -> list[str]:
        return list(self.node.config.bootstraps)

    async def round(self) -> float:
        if self.bootstraps:
            await self.announce()
        await self.refresh_contacts()
        return REFRESH_EVERY

    async def announce(self) -> dict[str, str]:
        """Publish our descriptor to every bootstrap; returns each one's outcome ('ok' or why not)."""
        if not self.bootstraps:
            return {}
        results = await directory.announce_all(self.bootstraps, self.node.descriptor.signed)
        for url, r in results.items():
            if isinstance(r, CabinetError):
                log.warning("announce to %s failed: %s", url, r)
        return {url: str(r) if isinstance(r, CabinetError) else "ok" for url, r in results.items()}

    async def tell_all(self, desc: Descriptor) -> int:
        """Hand our new descriptor (rotated key, revocation) to every contact directly."""
        told = 0
        for c in await self.node.store.call(records.list_contacts):
            if c["revoked"]:
                continue
            try:
                await self.node.client.call(self.node.peer(c), "POST", "/v1/descriptor", desc.signed)
                told += 1
            except CabinetError as exc:
                log.info("could not tell %s about our new descriptor: %s", c["node_id"], exc)
        return told

    async def search(self, query: str) -> list[Descriptor]:
        if not self.bootstraps:
            raise UsageError("no bootstrap server configured (cabinet init/run --bootstrap URL)")
        return await directory.search_any(self.bootstraps, query)

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
                desc = await self.lan.verify_hint(self.node.client, node_id, url)
                if desc is not None:
                    return desc
            return None
        if not self.node.config.lan:
            return None
        # Not running (a one-shot command): listen to the LAN briefly; hints come back verified.
        hints = await mdns.browse(LAN_LISTEN, own_id=self.node.node_id, client=self.node.client)
        for h in hints:
            if h.node_id == node_id and h.verified:
                try:
                    desc = Descriptor.from_wire(await self.node.client.fetch_descriptor(h.url))
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
        row = await self.node.store.call(records.contact_by_id, node_id)
        if row is None:
            return None
        for address in Descriptor.from_wire(row["descriptor"]).addresses:
            try:
                desc = Descriptor.from_wire(await self.node.client.fetch_descriptor(address))
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
        for c in await self.node.store.call(records.list_contacts):
            try:
                desc = await self.lookup(c["node_id"], min_seq=c["seq"])
                if desc is not None and desc.seq > c["seq"]:
                    _, status = await self.node.learn_descriptor(desc)
                    changed += status == "updated"
            except CabinetError as exc:
                log.info("refreshing %s: %s", c["node_id"], exc)
        return changed
