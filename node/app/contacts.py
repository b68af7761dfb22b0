"""Colleagues and this node's own descriptor: add, learn, confirm, verify; sign, renew, rotate, revoke.

A contact is a colleague's signed descriptor plus a local name and trust
state (verified, held after an identity-key change, revoked). This node's own
descriptor is kept in the data folder so every process shows the same bytes
for one sequence number, and re-signed only when something changed (address,
key, details, expiry near, revocation).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from pathlib import Path
from typing import Awaitable, Callable

from ..core.errors import AuthenticationFailed, CabinetError, NotFound, UsageError
from ..core.identity import (DESCRIPTOR_PREFIX, Descriptor, normalize_node_id, parse_node_id, safety_code,
                             valid_address, valid_relay_address)
from ..core.names import name_words
from ..store import keyfile, records
from .events import AuditAppended, KeyChanged
from .ports import Ports

log = logging.getLogger("cabinet.contacts")
DESCRIPTOR_FILE = "descriptor"
DESCRIPTOR_RENEW_MS = 30 * 86_400_000       # re-sign a month before the descriptor expires
_NODE_ID_SHAPE = re.compile(r"^[A-Za-z2-7]{4}([- ]?[A-Za-z2-7]{4}){7}[- ]?[A-Za-z2-7]$")


def check_url(url: str, allow_path: bool = False) -> str:
    if not valid_address(url, allow_path=allow_path):
        raise UsageError(f"not an address: {url!r} (expected http://host:port)")
    return url.rstrip("/")


def check_relay(url: str) -> str:
    if not valid_relay_address(url):
        raise UsageError(f"not a relay address: {url!r} (expected relay+tcp://host:port)")
    return url


def looks_like_node_id(text: str) -> bool:
    try:
        parse_node_id(text)
        return True
    except UsageError:
        return False


VERIFIED = "verified"
UNVERIFIED = "unverified (trust on first use)"
HELD = "held: new identity key, waiting for 'cabinet contact confirm'"
REPLACED = "replaced by a new key (confirmed)"
REVOKED = "revoked by its owner"


def contact_state(row: dict) -> str:
    """The one name of a contact's trust state, the same in every list, message and page."""
    if row["revoked"]:
        return REVOKED if Descriptor.from_wire(row["descriptor"]).revoked else REPLACED
    if row["held"]:
        return HELD
    return VERIFIED if row["verified"] else UNVERIFIED


class OwnDescriptor:
    """This node's signed descriptor: kept in the folder, re-signed when something changes."""

    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.bound_port: int | None = None
        self.current = self._load_or_sign()

    @property
    def path(self) -> Path:
        return self.ports.folder / DESCRIPTOR_FILE

    def _load_or_sign(self) -> Descriptor:
        p, cfg = self.ports, self.ports.config
        try:
            stored: Descriptor | None = Descriptor.from_wire(self.path.read_bytes())
        except (OSError, CabinetError):
            stored = None
        if stored is not None and stored.node_id == p.identity.node_id:
            if stored.revoked:
                return stored                       # final, whatever the configuration says
            fresh = stored.expires - p.now() > DESCRIPTOR_RENEW_MS
            if stored.seq == cfg.descriptor_seq and stored.enc_key == p.identity.enc_public and fresh:
                return stored
            cfg.descriptor_seq = max(cfg.descriptor_seq, stored.seq + 1)
            cfg.save(p.folder)
        return self._sign()

    def _sign(self, revoked: bool = False) -> Descriptor:
        p, c = self.ports, self.ports.config
        desc = p.identity.descriptor(name=c.name, specialty=c.specialty, city=c.city, rpps=c.rpps,
                                     addresses=c.addresses(self.bound_port), seq=c.descriptor_seq,
                                     now_ms=p.now(), revoked=revoked)
        keyfile.write_atomic(self.path, desc.signed, mode=0o600)
        return desc

    def reload(self) -> Descriptor:
        """The descriptor kept in the folder, as another command (a key rotation) left it."""
        return self._load_or_sign()

    def changed(self, revoked: bool = False) -> Descriptor:
        """A new descriptor (address, key, details, revocation): higher seq, signed, kept."""
        self.ports.config.descriptor_seq += 1
        self.ports.config.save(self.ports.folder)
        self.current = self._sign(revoked)
        return self.current

    def addresses_changed(self) -> bool:
        return self.ports.config.addresses(self.bound_port) != self.current.addresses


class Contacts:
    def __init__(self, ports: Ports, own: OwnDescriptor,
                 resolve: Callable[[str], Awaitable[Descriptor]] | None = None) -> None:
        self.ports, self.own = ports, own
        self.resolve = resolve              # node ID -> descriptor (discovery), set by the facade

    async def list(self) -> list[dict]:
        return await self.ports.store.call(records.list_contacts)

    async def get(self, ref: str) -> dict:
        """A contact by name or node ID; else by words of its name if they name one contact only."""
        try:
            return await self.ports.store.call(records.find_contact, ref)
        except NotFound:
            own = self.own.current
            if ref.strip().casefold() == own.name.casefold() or (looks_like_node_id(ref)
                                                                and normalize_node_id(ref) == own.node_id):
                raise UsageError("that is this practice itself: name a colleague") from None
            rows = await self.list()
            wanted = name_words(ref)
            partial = [r for r in rows if wanted and wanted <= name_words(r["name"])]
            if len(partial) == 1:
                return partial[0]
            if partial:
                raise UsageError(f"{ref!r} could be " + ", ".join(repr(r["name"]) for r in partial[:5])
                                 + ": give more of the name") from None
            close = difflib.get_close_matches(ref.strip().casefold(), [r["name"].casefold() for r in rows], n=1)
            hint = next((f"; did you mean {r['name']!r}?" for r in rows if close and r["name"].casefold() == close[0]),
                        " (see 'cabinet contact list')")
            raise NotFound(f"unknown contact {ref!r}{hint}") from None

    async def by_id(self, node_id: str) -> dict | None:
        return await self.ports.store.call(records.contact_by_id, node_id)

    async def names(self) -> dict[str, str]:
        return {c["node_id"]: c["name"] for c in await self.list()}

    async def add(self, source: str | bytes, *, name: str | None = None,
                  expect_id: str | None = None) -> tuple[dict, str]:
        """Add a colleague from a descriptor (bytes, text, a file path, an http:// address) or a node ID alone.

        Returns the contact and 'added', 'updated', 'unchanged', 'held' (a
        practitioner already known under another identity key: nothing is sent
        to it until confirmed) or 'revoked'.
        """
        p = self.ports
        desc = await self._load_descriptor(source, expect_id)
        if desc.node_id == p.identity.node_id:
            raise UsageError("that descriptor is this node's own")
        if desc.expired(p.now()):
            raise UsageError("that descriptor has expired; ask the colleague for a fresh one")
        before = await p.store.call(records.contact_by_id, desc.node_id)
        status = await p.store.call(records.upsert_contact, desc, (name or desc.name).strip(), p.now())
        self._key_event(before, desc, status)
        return await p.store.call(records.find_contact, desc.node_id), status

    async def learn(self, desc: Descriptor) -> tuple[dict, str]:
        """A newer descriptor of a known contact (from a bootstrap, the LAN, or the node itself)."""
        p = self.ports
        row = await p.store.call(records.contact_by_id, desc.node_id)
        if row is None:
            raise NotFound(f"{desc.node_id} is not a contact")
        status = await p.store.call(records.upsert_contact, desc, row["name"], p.now())
        if status == "revoked":
            log.warning("contact %s has revoked its key: nothing more is sent to or accepted from it", desc.node_id)
        self._key_event(row, desc, status)
        return row, status

    def _key_event(self, before: dict | None, desc: Descriptor, status: str) -> None:
        """KeyChanged only when a key changed: a new identity (held), a revocation, or a new
        encryption key; a new address or new details are not a key change."""
        if status == "updated" and before is not None:
            status = "rotated" if Descriptor.from_wire(before["descriptor"]).enc_key != desc.enc_key else ""
        if status in ("rotated", "held", "revoked"):
            self.ports.publish(KeyChanged(at=self.ports.now(), node_id=desc.node_id, status=status))

    async def confirm(self, ref: str) -> dict:
        c = await self.get(ref)
        await self.ports.store.call(records.confirm_contact, c["node_id"], self.ports.now())
        self.ports.publish(AuditAppended(at=self.ports.now(), event="contact-confirmed"))
        return await self.get(c["node_id"])

    async def safety_code(self, ref: str) -> tuple[dict, str]:
        c = await self.get(ref)
        return c, safety_code(self.ports.identity.sign_public, c["sign_key"])

    async def verify(self, ref: str) -> dict:
        c = await self.get(ref)
        await self.ports.store.call(records.mark_verified, c["node_id"], self.ports.now())
        return await self.get(ref)

    async def pinned_key(self, node_id: str) -> tuple[bytes | None, str | None]:
        """The key a caller must sign with (None: a stranger), and why a caller proven with it is
        refused anyway (held, revoked), or None. The transport tells that reason only to a caller
        whose signature verifies, so a stranger learns nothing about who the contacts are."""
        row = await self.by_id(node_id)
        if row is None:
            return None, None
        if row["revoked"]:
            return row["sign_key"], "this key was revoked"
        if row["held"]:
            return row["sign_key"], "not a confirmed contact: this practice has not confirmed your new key yet"
        return row["sign_key"], None

    async def sign_key_for(self, node_id: str) -> bytes | None:
        """The key a contact signs with; held and revoked keys are let in for nothing."""
        key, refusal = await self.pinned_key(node_id)
        if refusal is not None:
            raise AuthenticationFailed(refusal)
        return key

    async def _load_descriptor(self, source: str | bytes, expect_id: str | None) -> Descriptor:
        if isinstance(source, str) and looks_like_node_id(source):
            if self.resolve is None:
                raise UsageError("cannot look up a node ID here")
            return await self.resolve(source)
        if isinstance(source, bytes):
            desc = Descriptor.from_wire(source)
        elif source.startswith(("http://", "https://")):
            if not expect_id:
                raise UsageError("give the colleague's node ID (--id) to check who answers at that address")
            desc = Descriptor.from_wire(await self.ports.client.fetch_descriptor(source))
        elif DESCRIPTOR_PREFIX in source:
            desc = descriptor_in_text(source)
        else:
            desc = descriptor_in_text(await _read_descriptor_file(source))
        if expect_id and normalize_node_id(expect_id) != desc.node_id:
            raise UsageError(f"the descriptor is for {desc.node_id}, not the expected {normalize_node_id(expect_id)}")
        return desc


_B64URL = re.compile(r"^[A-Za-z0-9_=-]+$")


def descriptor_in_text(text: str) -> Descriptor:
    """The descriptor in a text, even pasted inside an e-mail: wrapped, quoted ("> "), between other lines."""
    start = text.find(DESCRIPTOR_PREFIX)
    if start < 0:
        return Descriptor.from_text(text)             # says what a descriptor should look like
    lines = text[start + len(DESCRIPTOR_PREFIX):].splitlines()
    pieces: list[str] = []
    for i, line in enumerate(lines):
        bare = line.strip().lstrip(">").strip() if i else line.strip()
        if not bare or not _B64URL.match(bare):
            break
        pieces.append(bare)
    error: CabinetError | None = None
    for n in range(len(pieces), 0, -1):               # a wrapped signature line may follow the last piece
        try:
            return Descriptor.from_text(DESCRIPTOR_PREFIX + "".join(pieces[:n]))
        except CabinetError as exc:
            error = error or exc
    raise error or UsageError("descriptor text is damaged (nothing after 'cabinet-descriptor:')")


async def _read_descriptor_file(source: str) -> str:
    path = Path(source).expanduser()
    if not path.exists() and _NODE_ID_SHAPE.match(source.strip()):
        parse_node_id(source)           # shaped like a node ID: say what is wrong with it
    try:
        return await asyncio.to_thread(path.read_text, "utf-8")
    except FileNotFoundError:
        raise NotFound(f"no such file: {source} (give a descriptor file, its text, a node ID or an "
                       "http:// address)") from None
    except (OSError, UnicodeDecodeError):
        raise NotFound(f"cannot read a descriptor from {source!r} (not a file, text or http:// address)") from None
