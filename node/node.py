"""The Node facade: the one module that assembles the services (node/app/) and owns their tasks.

    async with Node.open("~/.cabinet", passphrase=...) as node:
        await node.send_referral(to="Dr Durand", patient="Jeanne Martin", born="1961-04-02",
                                 subject="Chest pain", letter="Dear colleague, ...", attachments=["ecg.pdf"])

Every public method is a coroutine; SQLite and file work run on worker
threads (the event loop never blocks on them). Faces (the CLI, later the web
app and local API) import only this module and `node`; what they need from
the layers below is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
from pathlib import Path
from typing import AsyncIterator, Iterable, Sequence

from .app.contacts import Contacts, OwnDescriptor, check_url, contact_state
from .app.courier import Courier, Puller
from .app.discovery import Discovery
from .app.events import (AuditAppended, DeliveryChanged, Event, EventBus, KeyChanged, PeerSeen, RecordOpened,
                         RecordReceived, RecordStored, Refusal, Subscription)
from .app.handler import NodeHandler
from .app.intake import Intake
from .app.loop import Loop
from .app.patients import PatientEndpoints, PatientService
from .app.ports import Ports, wall_clock
from .app.records import Records, RecordView, SendResult, Summary, check_born, safe_name
from .app.serving import DeliveryEndpoints
from .config import Config, default_data_dir, parse_listen, prepare_folder
from .core import card as cards
from .core import consent
from .core.card import Card
from .core.directory import Found
from .core.errors import AlreadyExists, CabinetError, NotFound, UsageError
from .core.identity import Descriptor, normalize_node_id, valid_address
from .store import keyfile, records
from .store.patients import ANY as ANY_REQUESTER
from .logsetup import setup as setup_logging
from .store.blobs import BlobStore
from .store.db import DBFILE, Store
from .transport import access
from .transport.client import Client, Peer
from .transport.server import Server

__all__ = [
    "Node", "Config", "CabinetError", "UsageError", "NotFound", "Summary", "RecordView", "SendResult", "Card",
    "cards", "consent", "ANY_REQUESTER", "default_data_dir", "valid_address", "normalize_node_id", "now_ms",
    "check_born", "safe_name", "contact_state", "Descriptor", "Found", "setup_logging", "Event", "EventBus", "Subscription", "RecordReceived", "RecordStored",
    "DeliveryChanged", "RecordOpened", "Refusal", "AuditAppended", "KeyChanged", "PeerSeen",
]

log = logging.getLogger("cabinet.node")
now_ms = wall_clock
KEY_WATCH_EVERY = 1.0


class Node:
    def __init__(self, folder: Path, secrets: keyfile.Secrets, config: Config, store: Store) -> None:
        self.folder, self.config, self.store = folder, config, store
        self._secrets = secrets
        self.events = EventBus()
        self.client = Client(secrets.identity)
        self.ports = Ports(folder=folder, config=config, identity=secrets.identity, keys=secrets, store=store,
                           blobs=BlobStore(folder), client=self.client, events=self.events, clock=wall_clock,
                           rng=random.Random())
        self.own = OwnDescriptor(self.ports)
        self.contacts_service = Contacts(self.ports, self.own)
        self.discovery = Discovery(self.ports, self.contacts_service, self.own)
        self.contacts_service.resolve = self.discovery.resolve
        self.intake = Intake(self.ports)
        self.courier = Courier(self.ports, locate=self.discovery.locate)
        self.puller = Puller(self.ports, intake=self.intake, locate=self.discovery.locate)
        self.discovery.on_contact_seen = lambda node_id: self.courier.wake()
        self.records = Records(self.ports, self.contacts_service, self.courier)
        self.patients = PatientService(self.ports, self.contacts_service, locate=self.discovery.locate,
                                       courier=self.courier, puller=self.puller,
                                       serving=lambda: self._lock_fd is not None)
        self.handler = NodeHandler(
            self.ports, self.own, self.contacts_service,
            DeliveryEndpoints(self.ports, intake=self.intake, puller=self.puller, courier=self.courier,
                              sign_key_for=self.contacts_service.sign_key_for),
            PatientEndpoints(self.patients))
        self._server: Server | None = None
        self._lock_fd: int | None = None
        self._key_stamp: tuple[int, int] | None = None
        self._key_watch = Loop("cabinet-keys", self._watch_keys)

    # --- lifecycle ----------------------------------------------------------

    @staticmethod
    async def init(folder: str | Path, passphrase: str, *, name: str, specialty: str = "", city: str = "",
                   rpps: str = "", listen: str | None = None, advertise: Sequence[str] = (),
                   bootstraps: Sequence[str] = (), lan: bool = True) -> str:
        """Create a practice node in `folder`; returns its node ID."""
        folder = prepare_folder(Path(folder), create=True)
        if (folder / keyfile.KEYFILE).exists():
            raise AlreadyExists(f"a cabinet node already exists in {folder}")
        if not name.strip():
            raise UsageError("the practitioner's display name must not be empty")
        cfg = Config(name=name.strip(), specialty=specialty, city=city, rpps=rpps,
                     advertise=[check_url(u) for u in advertise],
                     bootstraps=[check_url(u, allow_path=True) for u in bootstraps], lan=lan)
        if listen:
            parse_listen(listen)
            cfg.listen = listen
        secrets = await asyncio.to_thread(keyfile.create, folder, passphrase)
        cfg.save(folder)
        await asyncio.to_thread(lambda: Store(folder / DBFILE).close())
        return secrets.identity.node_id

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, folder: str | Path, *, passphrase: str) -> AsyncIterator["Node"]:
        node = await cls.open_node(folder, passphrase=passphrase)
        try:
            yield node
        finally:
            await node.close()

    @classmethod
    async def open_node(cls, folder: str | Path, *, passphrase: str) -> "Node":
        folder = prepare_folder(Path(folder), create=False)
        config = Config.load(folder)
        secrets = await asyncio.to_thread(keyfile.open_, folder, passphrase)
        store = await asyncio.to_thread(Store, folder / DBFILE)
        return await asyncio.to_thread(cls, folder, secrets, config, store)

    async def close(self) -> None:
        await self._key_watch.stop()
        await self.courier.stop()
        await self.puller.stop()
        await self.discovery.stop()
        await self.discovery.stop_lan()
        if self._server:
            await self._server.stop()
            self._server = None
        await self.client.close()
        await asyncio.to_thread(self.intake.close)
        await asyncio.to_thread(self.store.close)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def serve(self, listen: str | None = None, *, accept: bool = True,
                    pull_interval: float | None = None) -> tuple[str, int]:
        """Start the server (unless accept=False), the courier, the puller and discovery.

        Returns the (host, port) listened on; (host, 0) when not accepting.
        """
        await asyncio.to_thread(self._take_run_lock)
        self._key_stamp = await asyncio.to_thread(self._key_file_stamp)
        if pull_interval is not None:
            self.puller.interval = pull_interval
        host, port = parse_listen(listen or self.config.listen)
        bound = 0
        if accept:
            self._server = Server(self.handler, host, port, routes=[access.add_routes])
            await self._server.start()
            bound = self.own.bound_port = self._server.port
            if listen and port and listen != self.config.listen:
                self.config.listen = listen
                await asyncio.to_thread(self.config.save, self.folder)
            if self.own.addresses_changed() and not self.own.current.revoked:
                await self._descriptor_changed()      # peers replace older descriptors by sequence number
        await self._audit("node-started", detail=None if accept else "not listening")
        await self.discovery.start_lan(host, bound or None)
        self.courier.start()
        self.puller.start()
        self.discovery.start()
        self._key_watch.start()
        return host, bound

    def _take_run_lock(self) -> None:
        fd = os.open(self.folder / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"a node is already running on {self.folder}") from None
        self._lock_fd = fd

    async def _audit(self, event: str, **fields: object) -> None:
        await self.store.call(records.log, at=self.ports.now(), event=event, **fields)
        self.events.publish(AuditAppended(at=self.ports.now(), event=event))

    def subscribe(self, *types: type[Event], size: int = 1000) -> Subscription:
        """The node's event stream (app/events.py), from now on."""
        return self.events.subscribe(*types, size=size)

    # --- identity and contacts ----------------------------------------------

    @property
    def identity(self):
        return self.ports.identity

    @property
    def node_id(self) -> str:
        return self.ports.identity.node_id

    @property
    def descriptor(self) -> Descriptor:
        return self.own.current

    @property
    def blobs(self) -> BlobStore:
        return self.ports.blobs

    @property
    def lan(self):
        return self.discovery.lan

    def peer(self, contact: dict) -> Peer:
        return self.discovery.locate(contact)

    async def _descriptor_changed(self, revoked: bool = False) -> None:
        await asyncio.to_thread(self.own.changed, revoked)
        await self.discovery.descriptor_changed()

    async def add_contact(self, source: str | bytes, *, name: str | None = None,
                          expect_id: str | None = None) -> tuple[dict, str]:
        """Add a colleague from a descriptor (bytes, text, a file path, an http:// address) or a node ID alone."""
        return await self.contacts_service.add(source, name=name, expect_id=expect_id)

    async def learn_descriptor(self, desc: Descriptor) -> tuple[dict, str]:
        return await self.contacts_service.learn(desc)

    async def confirm_contact(self, ref: str) -> dict:
        c = await self.contacts_service.confirm(ref)
        self.courier.wake()
        return c

    def use_bootstraps(self, urls: Sequence[str]) -> None:
        """Add directory servers to the configuration (kept for next time)."""
        for url in (check_url(u, allow_path=True) for u in urls):
            if url not in self.config.bootstraps:
                self.config.bootstraps.append(url)
        self.config.save(self.folder)

    async def rotate_keys(self, passphrase: str) -> tuple[Descriptor, int]:
        """A fresh encryption key, signed by the identity key; old keys still open old records.

        Returns the new descriptor and how many contacts were told at once (the
        others learn it from the bootstraps or the next refresh).
        """
        await asyncio.to_thread(keyfile.open_, self.folder, passphrase)       # the right passphrase
        identity = self.ports.identity.rotated()
        self._secrets = keyfile.Secrets(identity, self._secrets.storage_key, self._secrets.index_key,
                                        self._secrets.kek)
        await asyncio.to_thread(keyfile.save_identity, self.folder, passphrase, self._secrets)
        self.ports.identity = self.client.identity = identity
        await self._descriptor_changed()
        await self._audit("keys-rotated")
        self.events.publish(KeyChanged(at=self.ports.now(), node_id=self.node_id, status="rotated"))
        if self._lock_fd is None and await asyncio.to_thread(self._running_elsewhere):
            # `cabinet run` holds this folder: it takes the new key within a second and tells the
            # contacts itself, so that no colleague seals for a key the running node does not hold yet.
            return self.own.current, -1
        told = await self.discovery.tell_all(self.own.current)
        return self.own.current, told

    def _running_elsewhere(self) -> bool:
        fd = os.open(self.folder / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _key_file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.folder / keyfile.KEYFILE)
        return st.st_mtime_ns, st.st_size

    async def _watch_keys(self) -> float:
        """While running: take a key rotation made by another command (`cabinet keys rotate`) at once."""
        stamp = await asyncio.to_thread(self._key_file_stamp)
        if stamp == self._key_stamp:
            return KEY_WATCH_EVERY
        self._key_stamp = stamp
        secrets = await asyncio.to_thread(keyfile.reopen, self.folder, self._secrets.kek)
        if secrets.identity.enc_public == self.ports.identity.enc_public:
            return KEY_WATCH_EVERY
        self._secrets = secrets
        self.ports.identity = self.client.identity = secrets.identity
        fresh = await asyncio.to_thread(Config.load, self.folder)
        self.config.descriptor_seq = max(self.config.descriptor_seq, fresh.descriptor_seq)
        self.own.current = await asyncio.to_thread(self.own.reload)
        await self.discovery.descriptor_changed()
        log.info("a new encryption key was made by another command: in use now, contacts told")
        self.events.publish(KeyChanged(at=self.ports.now(), node_id=self.node_id, status="rotated"))
        await self.discovery.tell_all(self.own.current)
        return KEY_WATCH_EVERY

    async def revoke_keys(self) -> Descriptor:
        """Publish a signed, final revocation of this node's keys (a stolen box): to the
        bootstraps and to every contact. Returns the revocation descriptor."""
        await self._descriptor_changed(revoked=True)
        await self._audit("keys-revoked")
        await self.discovery.announce()
        await self.discovery.tell_all(self.own.current)
        return self.own.current

    async def contacts(self) -> list[dict]:
        return await self.contacts_service.list()

    async def contact(self, ref: str) -> dict:
        return await self.contacts_service.get(ref)

    async def safety_code(self, ref: str) -> tuple[dict, str]:
        return await self.contacts_service.safety_code(ref)

    async def verify_contact(self, ref: str) -> dict:
        return await self.contacts_service.verify(ref)

    # --- directory and LAN ----------------------------------------------------

    async def directory_search(self, query: str) -> list[Found]:
        return await self.discovery.search(query)

    async def directory_lookup(self, node_id: str) -> Descriptor:
        return await self.discovery.resolve(node_id)

    async def announce(self) -> dict[str, str]:
        return await self.discovery.announce()

    async def lan_peers(self, wait: float) -> list:
        return await self.discovery.lan_peers(wait)

    # --- sending and reading ------------------------------------------------------

    async def send_referral(self, *, to: str | Iterable[str], patient: str, born: str = "", subject: str = "",
                            letter: str | Path = "", attachments: Sequence[str | Path] = (), data: str = "",
                            deliver: bool = True) -> SendResult:
        """Seal a referral for one or more contacts, keep it in the outbox, try to deliver it now."""
        return await self.records.send_referral(to=to if isinstance(to, str) else list(to), patient=patient,
                                                born=born, subject=subject, letter=letter,
                                                attachments=attachments, data=data, deliver=deliver)

    async def reply(self, ref: str, *, letter: str | Path, attachments: Sequence[str | Path] = (),
                    subject: str | None = None, deliver: bool = True) -> SendResult:
        """Send the consultation report back to the sender, in the same thread."""
        return await self.records.reply(ref, letter=letter, attachments=attachments, subject=subject,
                                        deliver=deliver)

    async def outbox(self, record: str | None = None) -> list[dict]:
        return await self.records.outbox(record)

    async def deliver_pending(self) -> int:
        """Try every due delivery once now (what `cabinet run` does in a loop)."""
        return await self.courier.run_due()

    async def inbox(self, *, patient: str | None = None, born: str = "") -> list[Summary]:
        return await self.records.list("in", patient=patient, born=born)

    async def list_records(self, direction: str | None = None, *, patient: str | None = None,
                           born: str = "") -> list[Summary]:
        return await self.records.list(direction, patient=patient, born=born)

    async def thread(self, ref: str) -> list[Summary]:
        return await self.records.thread(ref)

    async def read(self, ref: str, *, audit_event: str = "read") -> RecordView:
        """Open a record: its letter, structured data and attachment list. Logged in the audit."""
        return await self.records.read(ref, audit_event=audit_event)

    async def export(self, ref: str, dest: str | Path) -> list[Path]:
        """Decrypt a record's attachments into `dest` under safe names; never overwrites."""
        return await self.records.export(ref, dest)

    async def audit_verify(self) -> tuple[bool, int | None]:
        return await self.records.audit_verify()
