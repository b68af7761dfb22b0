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
import base64
import contextlib
import fcntl
import logging
import os
import random
import shutil
from pathlib import Path
from typing import AsyncGenerator, AsyncIterator, Iterable, Sequence

from .app import backup
from .app.accounts import ROLES, SCOPES, AccountService, Principal, TooManyAttempts
from .app.backup import Report as BackupReport
from .app.contacts import Contacts, OwnDescriptor, check_relay, check_url, contact_state, looks_like_node_id
from .app.courier import Courier, Puller
from .app.discovery import Discovery
from .app.events import (AuditAppended, DeliveryChanged, Event, EventBus, KeyChanged, PeerSeen, RecordOpened,
                         RecordReceived, RecordStored, Refusal, SignInFailed, Subscription)
from .app.handler import NodeHandler
from .app.intake import Intake
from .app.loop import Loop
from .app.patients import PatientEndpoints, PatientService
from .app.portmapping import PortMapping
from .app.ports import Ports, wall_clock
from .app.reachability import Reachability
from .app.records import EarlierCopy, Records, RecordView, SendResult, Summary, check_born, safe_name
from .app.serving import DeliveryEndpoints
from .config import Config, default_data_dir, parse_listen, prepare_folder
from .core import card as cards
from .core import consent
from .core.crypto import keyed_hash
from .core.card import Card
from .core.directory import Found
from .core.envelope import MAX_ATTACHMENT, MAX_ATTACHMENTS, Attachment
from .core.errors import (AlreadyExists, AuthenticationFailed, CabinetError, InvalidEnvelope, NotFound, StoreError,
                          TooLarge, UsageError, WrongPassphrase)
from .core.identity import DESCRIPTOR_PREFIX, Descriptor, normalize_node_id, valid_address
from .logsetup import clean as clean_for_log
from .store.logwriter import setup as setup_logging
from .store import backup as backup_store
from .store import keyfile, records
from .store.keyfile import write_atomic as write_private      # a file of the data folder, 0600, atomically
from .store.blobs import BlobStore
from .store.patients import ANY as ANY_REQUESTER
from .store.db import DBFILE, Store
from .transport import access
from .transport.client import Client, Peer
from .transport.server import Server
from .transport.tls import ServerTLS

# What the faces (CLI, web app, local API) may use: they import nothing else of the project.
__all__ = [
    "Node", "Config", "Summary", "RecordView", "SendResult", "EarlierCopy", "Card", "Descriptor", "Found",
    "Attachment", "Principal", "BackupReport", "ROLES", "SCOPES", "ANY_REQUESTER", "MAX_ATTACHMENT",
    "MAX_ATTACHMENTS", "cards", "consent", "default_data_dir", "parse_listen", "valid_address", "normalize_node_id",
    "now_ms", "check_born", "safe_name", "contact_state", "setup_logging", "clean_for_log", "write_private",
    "CabinetError", "UsageError", "NotFound", "AlreadyExists", "AuthenticationFailed", "InvalidEnvelope",
    "StoreError", "TooLarge", "TooManyAttempts", "WrongPassphrase", "DESCRIPTOR_PREFIX",
    "Event", "EventBus", "Subscription", "RecordReceived", "RecordStored", "DeliveryChanged", "RecordOpened",
    "Refusal", "AuditAppended", "KeyChanged", "PeerSeen", "SignInFailed",
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
        self.reachability = Reachability(self.ports, self.contacts_service)
        self.accounts = AccountService(self.ports)
        self.intake = Intake(self.ports)
        self.courier = Courier(self.ports, locate=self.locate)
        self.puller = Puller(self.ports, intake=self.intake, locate=self.locate)
        self.discovery.on_contact_seen = lambda node_id: self.courier.wake()
        self.records = Records(self.ports, self.contacts_service, self.courier)
        self.patients = PatientService(self.ports, self.contacts_service, locate=self.locate,
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
                   bootstraps: Sequence[str] = (), lan: bool = True, relays: Sequence[str] = ()) -> str:
        """Create a practice node in `folder`; returns its node ID."""
        folder = prepare_folder(Path(folder), create=True)
        if (folder / keyfile.KEYFILE).exists():
            raise AlreadyExists(f"a cabinet node already exists in {folder}")
        if not name.strip():
            raise UsageError("the practitioner's display name must not be empty")
        cfg = Config(name=name.strip(), specialty=specialty, city=city, rpps=rpps,
                     advertise=[check_url(u) for u in advertise],
                     bootstraps=[check_url(u, allow_path=True) for u in bootstraps], lan=lan,
                     relays=[check_relay(u) for u in relays])
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
        await self._stop_health()
        await self.reachability.close()
        await self._stop_upkeep()
        await self._key_watch.stop()
        await self.intake.sweeper.stop()
        await self.courier.stop()
        await self.puller.stop()
        await self.discovery.stop()
        await self.discovery.stop_lan()
        await self._stop_port_mapping()
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
            server_tls = await asyncio.to_thread(ServerTLS, self.ports.identity, self.ports.now())
            self._server = Server(self.handler, host, port, routes=[access.add_routes, self._health_route()],
                                  tls=server_tls)
            await self._server.start()
            bound = self.own.bound_port = self._server.port
            if listen and port and listen != self.config.listen:
                self.config.listen = listen
                await asyncio.to_thread(self.config.save, self.folder)
            if self.own.addresses_changed() and not self.own.current.revoked:
                await self._descriptor_changed()      # peers replace older descriptors by sequence number
            await self._start_port_mapping(host, bound)     # IPv6 addresses now, the router's port soon
        await self._audit("node-started", detail=None if accept else "not listening")
        await self.discovery.start_lan(host, bound or None)
        self.courier.start()
        self.puller.start()
        self.discovery.start()
        await self.reachability.load()                                   # which address worked, per colleague
        if self._server is not None:
            self.reachability.start_registrations(self._server.port)     # config.relays, if any
        self._key_watch.start()
        self.intake.sweeper.start()            # collects expired partial bodies, now and then hourly
        self._start_upkeep()                   # scheduled backups and retention
        await self._start_health()             # event log lines, metrics, alerts
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

    async def _descriptor_changed(self, revoked: bool = False, *, tell_contacts: bool = False) -> None:
        await asyncio.to_thread(self.own.changed, revoked)
        await self.discovery.descriptor_changed(tell_contacts=tell_contacts)

    async def add_contact(self, source: str | bytes, *, name: str | None = None,
                          expect_id: str | None = None) -> tuple[dict, str]:
        """Add a colleague from a descriptor (bytes, text, a file path, an http:// address) or a node ID alone."""
        added = await self.contacts_service.add(source, name=name, expect_id=expect_id)
        await self.reachability.refresh_accept()       # the relays let the new colleague call at once
        return added

    async def learn_descriptor(self, desc: Descriptor) -> tuple[dict, str]:
        return await self.contacts_service.learn(desc)

    async def confirm_contact(self, ref: str) -> dict:
        c = await self.contacts_service.confirm(ref)
        await self.reachability.refresh_accept()
        self.courier.wake()
        return c

    def use_bootstraps(self, urls: Sequence[str]) -> None:
        """Add directory servers to the configuration (kept for next time)."""
        for url in (check_url(u, allow_path=True) for u in urls):
            if url not in self.config.bootstraps:
                self.config.bootstraps.append(url)
        self.config.save(self.folder)

    def use_relays(self, urls: Sequence[str]) -> None:
        """Add blind relays to the configuration (kept for next time): reached through when nothing else works."""
        for url in (check_relay(u) for u in urls):
            if url not in self.config.relays:
                self.config.relays.append(url)
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
        from .core.errors import WrongPassphrase
        try:
            secrets = await asyncio.to_thread(keyfile.reopen, self.folder, self._secrets.kek)
        except WrongPassphrase:         # `cabinet keys passphrase` re-wrapped it: our derived key no longer opens it
            log.warning("the passphrase was changed by another command; restart the node to take later key changes")
            return KEY_WATCH_EVERY
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

    async def earlier_copy(self, *, to: str | Iterable[str], patient: str, born: str = "", letter: str | Path = "",
                           attachments: Sequence[str | Path] = ()) -> EarlierCopy | None:
        """The same referral (recipients, patient, letter and files by content) sent in the last minutes."""
        return await self.records.earlier_copy(to=[to] if isinstance(to, str) else list(to), patient=patient,
                                               born=born, letter=letter, attachments=attachments)

    # --- for the web app and local API ---------------------------------------------
    # What node/faces/web/ and `cabinet user|token` need; each call names the account
    # (or token) that acted in the audit log, beside the entry the service writes.

    @property
    def incoming(self) -> Path:
        """Where the local API streams uploads before they are sealed (on the data folder's disk)."""
        return self.ports.blobs.incoming

    async def read_as(self, who: Principal, ref: str) -> RecordView:
        view = await self.read(ref)
        await self.accounts.audit(who, "read-by", record=view.summary.id)
        return view

    async def attachment_as(self, who: Principal, ref: str, index: int
                            ) -> tuple[Attachment, AsyncGenerator[bytes, None]]:
        """One attachment of a record, decrypted as it streams (each chunk authenticated before it is given)."""
        attachment, pieces, record_id = await self.records.attachment(ref, index)
        await self.accounts.audit(who, "download-by", record=record_id, attachment=index)
        return attachment, pieces

    async def send_as(self, who: Principal, **fields) -> SendResult:
        """Seal and queue a referral; the courier delivers it in the background (answers at once)."""
        result = await self.send_referral(deliver=False, **fields)
        await self.accounts.audit(who, "sent-by", record=result.record_id)
        self.courier.wake()
        return result

    async def reply_as(self, who: Principal, ref: str, **fields) -> SendResult:
        result = await self.reply(ref, deliver=False, **fields)
        await self.accounts.audit(who, "replied-by", record=result.record_id)
        self.courier.wake()
        return result

    async def add_contact_as(self, who: Principal, source: str, *, name: str | None = None,
                             expect_id: str | None = None) -> tuple[dict, str]:
        """A node ID, a descriptor's text (even inside an e-mail) or an http(s) address; never a file path."""
        source = source.strip()
        if not (source.startswith(("http://", "https://")) or DESCRIPTOR_PREFIX in source
                or looks_like_node_id(source)):
            raise UsageError("give a node ID, a descriptor's text, or an http:// address with the node ID")
        contact, status = await self.add_contact(source, name=name, expect_id=expect_id)
        await self.accounts.audit(who, "contact-added-by", peer=contact["node_id"], status=status)
        return contact, status

    def seal_secret(self, purpose: str, secret: bytes) -> bytes:
        """A small local secret (the web certificate key's password) sealed under a key derived from
        the storage key for `purpose`: the data folder alone does not open it."""
        return records.seal_meta(self._purpose_key(purpose), {"secret": secret})

    def open_secret(self, purpose: str, sealed: bytes) -> bytes:
        """What `seal_secret` sealed; CorruptStore (a StoreError) when it does not open."""
        return bytes(records.open_meta(self._purpose_key(purpose), sealed).get("secret", b""))

    def _purpose_key(self, purpose: str) -> bytes:
        return keyed_hash(self._secrets.storage_key, b"cabinet/local-secret/" + purpose.encode())

    async def record_size(self, record_id: str) -> int | None:
        rows = await self.store.call(lambda db: db.conn.execute(
            "SELECT body_size FROM records WHERE id = ?", (record_id,)).fetchone())
        return rows[0] if rows else None

    async def status(self) -> dict:
        """The node at a glance: identity, addresses, what waits to be delivered, disk space left."""
        pending = [d for d in await self.outbox() if d["state"] in ("queued", "sending")]
        usage = await asyncio.to_thread(shutil.disk_usage, self.folder)
        return {"node_id": self.node_id, "name": self.config.name, "addresses": list(self.descriptor.addresses),
                "queued": len(pending), "oldest_undelivered": min((d["created"] for d in pending), default=None),
                "disk_free": usage.free, "serving": self._server is not None}

    async def signed_audit_head(self) -> str:
        """The audit chain's head signed by this practice, as the text `cabinet audit head` prints."""
        raw = await self.patients.signed_head()
        return "cabinet-audit-head:" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    async def inbox_page(self, offset: int = 0, limit: int = 100) -> tuple[list[Summary], int, int]:
        """One page of the inbox, unread first then newest: (summaries, how many in all, how many unread).
        Only the page's summaries are decrypted, so a page costs the same at 100 or 10,000 records."""
        def page(db) -> tuple[list[dict], int, int]:
            conn = db.conn
            total, unread = conn.execute("SELECT COUNT(*), COUNT(*) - COUNT(opened) FROM records "
                                         "WHERE direction = 'in'").fetchone()
            # sort narrow columns first: sorting whole rows would carry every small record's body along
            ids = [r[0] for r in conn.execute(
                "SELECT rowid FROM records WHERE direction = 'in' ORDER BY opened IS NOT NULL, created DESC, id "
                "LIMIT ? OFFSET ?", (max(1, int(limit)), max(0, int(offset))))]
            by_id = {r["rowid"]: r for r in db.query(
                f"SELECT rowid, * FROM records WHERE rowid IN ({','.join('?' * len(ids))})", ids)} if ids else {}
            return [by_id[i] for i in ids], total, unread
        rows, total, unread = await self.store.call(page)
        names = await self.contacts_service.names()
        return [self.records._summary(r, names) for r in rows], total, unread

    async def unread_count(self) -> int:
        return await self.store.call(lambda db: db.conn.execute(
            "SELECT COUNT(*) FROM records WHERE direction = 'in' AND opened IS NULL").fetchone()[0])

    # patients, from the web app: the service writes its own (sealed) entry, and each action also
    # names the account that acted (never the patient's reference: that stays sealed in the service's)

    async def patients_list(self) -> list[dict]:
        """The enrolled patients: reference, key ID, enrolled, updated (references opened with the vault)."""
        await self.patients._now(None)                 # the patient tables exist
        vault = self.patients.vault
        rows = await self.store.call(lambda db: list(db.query(
            "SELECT ref, key_id, enrolled, updated FROM patient_keys ORDER BY enrolled DESC")))
        return [{"patient_ref": vault.open(r["ref"])["ref"], "key_id": r["key_id"], "enrolled": r["enrolled"],
                 "updated": r["updated"]} for r in rows]

    async def enroll_as(self, who: Principal, patient_ref: str | None = None, *, replace: bool = False) -> Card:
        card = await self.patients.enroll(patient_ref or None, replace=replace)
        await self.accounts.audit(who, "patient-enrolled-by", key=card.key_id)
        return card

    async def link_as(self, who: Principal, ref: str, patient_ref: str, category: str | None = None) -> str:
        record_id = await self.patients.link(ref, patient_ref, category or None)
        await self.accounts.audit(who, "patient-linked-by", record=record_id)
        return record_id

    async def patient_view(self, who: Principal, patient_ref: str) -> dict:
        """What the practice sees of one patient: their records, the grants used (and revoked), and the
        signed access history, opened (giving it out is itself logged, as `history-given`)."""
        from .core.audit_docs import open_signed
        from .store import patients as sp
        vault = self.patients.vault
        await self.patients._now(None)
        patient = await self.store.call(sp.patient, vault, patient_ref)
        linked = await self.store.call(sp.records_of, vault, patient_ref)
        grants = await self.store.call(sp.grants_of, vault, patient_ref)
        history = open_signed(await self.patients.history(patient_ref), practice=self.node_id)
        await self.accounts.audit(who, "history-viewed-by", key=patient["key_id"])
        return {"patient": patient, "records": linked, "grants": grants, "history": history}

    async def break_glass_as(self, who: Principal, contact: str, allowed: bool) -> None:
        """Allow (or stop allowing) emergency requests without a grant from one contact, or any ("*")."""
        await self.patients.allow_break_glass(contact, allowed)
        await self.accounts.audit(who, "break-glass-allowed-by" if allowed else "break-glass-denied-by",
                                  peer=None if contact in ("*", "any") else (await self.contact(contact))["node_id"])

    async def status_report(self) -> dict:
        """Everything the web app's status page shows: status(), the audit chain, reachability (router
        door, relays), bootstraps, LAN peers (when this node runs its LAN), open alerts."""
        ok, bad = await self.audit_verify()
        lan = ([dict(node_id=h.node_id, name=h.name, url=h.url, verified=h.verified, last_seen=h.last_seen)
                for h in await self.lan_peers(0)] if self.discovery.lan is not None else None)
        relays = [dict(url=r.url, registered=r.registered, sessions=r.sessions, last_error=r.last_error)
                  for r in self.reachability.status()]
        return dict(await self.status(), audit_ok=ok, audit_bad=bad, port_mapping=self.port_mapping_status(),
                    relays=relays, bootstraps=list(self.config.bootstraps), lan=lan,
                    alerts=await self.alerts())

    # --- backup and restore ---
    # node/app/backup.py does the work (blocking, in a worker thread); docs/backup.md.

    async def backup(self, dest: str | Path, passphrase: str, *, part_max: int | None = None) -> BackupReport:
        """Write or bring up to date the encrypted backup of this node in `dest` (while it runs)."""
        await asyncio.to_thread(keyfile.open_, self.folder, passphrase)          # the node's passphrase
        report = await asyncio.to_thread(backup.make, self.ports, Path(dest), passphrase,
                                         part_max=part_max or backup.PART_MAX)
        await self._audit("backup-made", detail=f"{report.files} files, {report.blobs_copied} new")
        return report

    @staticmethod
    async def check_backup(src: str | Path, *, passphrase: str | None = None,
                           recovery_code: str | None = None) -> dict:
        """Verify a backup without restoring it (hashes, signature, the database's integrity)."""
        return await asyncio.to_thread(backup.check, Path(src), passphrase=passphrase, recovery_code=recovery_code)

    @staticmethod
    async def restore(src: str | Path, data: str | Path, *, passphrase: str | None = None,
                      recovery_code: str | None = None, new_passphrase: str | None = None) -> dict:
        """Rebuild a node in `data` (which must not hold one) from a backup; nothing is left on failure."""
        return await asyncio.to_thread(backup.restore, Path(src), Path(data), now=wall_clock(),
                                       passphrase=passphrase, recovery_code=recovery_code,
                                       new_passphrase=new_passphrase)

    @staticmethod
    async def change_passphrase(folder: str | Path, old: str, new: str, *, kdf: str | None = None) -> None:
        """Re-wrap the key file under a new passphrase (and KDF cost); nothing else changes."""
        folder = prepare_folder(Path(folder), create=False)
        await asyncio.to_thread(keyfile.change_passphrase, folder, old, new, kdf)

    async def sent_after_backup(self) -> list[dict]:
        """After a restore: per recipient, how many records the lost node sent after the backup."""
        return await self.store.call(backup_store.sent_after_backup)

    async def restores(self) -> list[dict]:
        return await self.store.call(backup_store.restores)


    # --- relays ---------------------------------------------------------------------

    def locate(self, contact: dict) -> Peer:
        """Where to reach a contact: LAN, its descriptor's addresses, then its relays (as local tunnels)."""
        return self.reachability.peer(self.discovery.locate(contact))

    async def start_relays(self) -> None:
        """Register at config.relays (serve() does it; again is harmless)."""
        if self._server is not None:
            self.reachability.start_registrations(self._server.port)

    async def stop_relays(self) -> None:
        await self.reachability.close()

    # --- health, metrics, alerts ---
    # node/app/health.py (event log lines, metrics, disk and clock samples) and node/app/alerts.py
    # (rules over the audit log and the events); built on first use, started by serve(). docs/operations.md.

    def _health_services(self):
        from .app.alerts import AlertService
        from .app.health import HealthService
        if getattr(self, "_alert_svc", None) is None:
            self._alert_svc = AlertService(self.ports)
            self._health_svc = HealthService(self.ports)
        return self._health_svc, self._alert_svc

    def _health_route(self):
        """A `routes` adder for the node's server: times requests, measures the callers' clocks."""
        from .app.health import server_hook
        return server_hook(lambda *a: self._health_services()[0].observe_request(*a))

    async def _start_health(self) -> None:
        health, alerts = self._health_services()
        await health.start()
        await alerts.start()

    async def _stop_health(self) -> None:
        if getattr(self, "_alert_svc", None) is not None:
            await self._alert_svc.stop()
            await self._health_svc.stop()

    @property
    def metrics(self):
        """The running node's counters and request-time histogram (app/health.py's Metrics)."""
        return self._health_services()[0].metrics

    async def alerts(self, *, include_acked: bool = False) -> list[dict]:
        return await self._health_services()[1].list(include_acked)

    async def ack_alert(self, alert_id: int, by: str) -> dict:
        row = await self._health_services()[1].ack(alert_id, by)
        if row is None:
            raise NotFound(f"no open alert {alert_id} ('cabinet alerts' lists them)")
        self.events.publish(AuditAppended(at=self.ports.now(), event="alert-acknowledged"))
        return row

    async def note_failed_unlocks(self, times_ms: list[int]) -> None:
        """Wrong passphrases typed on the unlock page before this unlock (a locked node can record
        nothing): one audit entry, and each counted by the failed sign-in alert rule, at its time."""
        if not times_ms:
            return
        await self.accounts.audit(Principal(account="unlock-page", role="system", via="web"), "unlock-failed",
                                  count=len(times_ms))
        for at in times_ms:
            self.events.publish(SignInFailed(at=at, account="(passphrase)", retry_after_ms=0))

    async def raise_alert(self, rule: str, subject: str, count: int, detail: str) -> dict:
        """Raise an alert from outside the rules (a face noticing something that needs a person)."""
        return await self._health_services()[1].raise_alert(rule, subject, count, detail)

    async def verify_audit_for_alerts(self) -> bool:
        return await self._health_services()[1].verify_chain()

    @property
    def alert_settings(self):
        return self._health_services()[1].settings

    async def health(self, *, check_reach: bool = True) -> dict:
        """Everything `cabinet status` shows (app/health.py's `gather`), and what needs a person."""
        from .app.health import gather
        _, alerts = self._health_services()
        await alerts.ensure()
        running = self._lock_fd is not None or await asyncio.to_thread(self._running_elsewhere)
        lan = ([dict(node_id=h.node_id, url=h.url, verified=h.verified) for h in self.discovery.lan.peers()]
               if self.discovery.lan is not None else None)
        relays = ([dict(url=r.url, registered=r.registered, last_error=r.last_error)
                   for r in self.reachability.status()] if self._lock_fd is not None else None)
        h = await gather(self.ports, alerts, base=await self.status(), running=running,
                         in_process=self._lock_fd is not None, lan=lan, relays=relays,
                         reach=self._check_reach if check_reach else None)
        h["port_mapping"] = self.port_mapping_status() if self._lock_fd is not None else None
        return h

    async def _check_reach(self) -> dict:
        """Our descriptor fetched from each advertised address, and looked up at each bootstrap."""
        from .transport import directory
        out: dict[str, dict[str, str]] = {"addresses": {}, "bootstraps": {}}
        for address in (a for a in self.descriptor.addresses if a.startswith(("http://", "https://"))):
            try:
                desc = Descriptor.from_wire(await self.client.fetch_descriptor(address))
                out["addresses"][address] = "ok" if desc.node_id == self.node_id else "another node answers"
            except CabinetError as exc:
                out["addresses"][address] = str(exc).splitlines()[0][:200]
        for url in self.config.bootstraps:
            try:
                found = await directory.lookup_any([url], self.node_id)
                out["bootstraps"][url] = "ok" if found is not None else "reached, but it does not list this node"
            except CabinetError as exc:
                out["bootstraps"][url] = str(exc).splitlines()[0][:200]
        return out

    # --- port mapping ---------------------------------------------------------------
    # app/portmapping.py: the router's open port (NAT-PMP / PCP) and the global IPv6 addresses,
    # listed in the descriptor after the configured ones (docs/reachability.md).

    _portmap: PortMapping | None = None

    async def _start_port_mapping(self, host: str, port: int) -> None:
        self._portmap = PortMapping(self.ports, on_change=self._addresses_learned)
        await self._portmap.begin(host, port)

    async def _addresses_learned(self) -> None:
        """The router's public address or the IPv6 addresses changed: a new descriptor, published."""
        if self.own.addresses_changed() and not self.own.current.revoked:
            await self._descriptor_changed()

    async def _stop_port_mapping(self) -> None:
        if self._portmap is not None:
            portmap, self._portmap = self._portmap, None
            await portmap.close()                     # the router's mapping is deleted

    def port_mapping_status(self) -> dict:
        """How the router's door stands: protocol, external address and port, lifetime, last error,
        and the global IPv6 addresses found (for `cabinet status`)."""
        if self._portmap is None:
            state = "off" if not self.config.port_mapping else "not serving"
            return {"enabled": False, "state": state, "summary": state, "permanent": False,
                    "protocol": None, "gateway": None, "external_address": None, "external_port": None,
                    "lifetime": None, "renew_at": None, "last_error": None, "ipv6": []}
        return self._portmap.status()

    # --- scheduled backups and retention ---
    # node/app/backup.py (Scheduled) and node/app/retention.py; docs/operations-box.md.

    def _upkeep(self) -> tuple[Loop, Loop]:
        loops = getattr(self, "_upkeep_loops", None)
        if loops is None:
            from .app.backup import Scheduled
            from .app.retention import Retention
            self.scheduled_backups = Scheduled(self.ports, lambda: self._secrets.kek)
            self.retention = Retention(self.ports)
            loops = (Loop("cabinet-backups", self.scheduled_backups.round),
                     Loop("cabinet-retention", self.retention.round))
            self._upkeep_loops = loops
        return loops

    def _start_upkeep(self) -> None:
        for loop in self._upkeep():
            loop.start()

    async def _stop_upkeep(self) -> None:
        for loop in getattr(self, "_upkeep_loops", ()):
            await loop.stop()

    def set_backup_schedule(self, dest: str | Path | None, schedule: str) -> None:
        """Keep where `cabinet run` backs up and how often (daily, weekly, off) in the config."""
        from .app.backup import check_schedule
        self.config.backup_schedule = check_schedule(schedule)
        if dest is not None:
            self.config.backup_dest = str(Path(dest).expanduser().absolute())
        self.config.save(self.folder)

    async def purge(self, *, before: int | None = None, older_than: str | None = None):
        """Remove the bodies of records created before a date (or older than a period); audited.
        Returns node/app/retention.PurgeReport."""
        from .app.retention import cutoff
        self._upkeep()
        if (before is None) == (older_than is None):
            raise UsageError("give either a date (--before) or a period (--older-than)")
        return await self.retention.purge(before if before is not None else cutoff(self.ports.now(), older_than or ""))

    def set_retention(self, period: str) -> str:
        """The period the running node applies daily ("off": none); returns it as kept."""
        from .app.retention import check_configured
        self.config.retention = "" if period == "off" else check_configured(period)
        self.config.save(self.folder)
        return self.config.retention

    async def purged_on(self, ref: str) -> int | None:
        """When a record's body was purged under retention (Unix ms), or None."""
        row = await self.store.call(records.get_record, ref)
        self._upkeep()
        return await self.retention.purged_on(row["id"], row["sender"])

    @staticmethod
    def parse_date(text: str) -> int:
        from .app.retention import parse_date
        return parse_date(text)

    @staticmethod
    def service_unit(*, command: Sequence[str], data: str | Path, user: str, web: str | None = None,
                     passphrase_from: str = "web") -> str:
        """The systemd unit that runs this node as a service (node/app/service.py); the configured
        backup destination is writable too."""
        from .app import service
        backup_dest = Config.load(Path(data)).backup_dest
        try:
            return service.unit_text(service.UnitSpec(command=tuple(command), data=str(data), user=user, web=web,
                                                      passphrase_from=passphrase_from,
                                                      writable=(backup_dest,) if backup_dest else ()))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    async def gauges(self) -> dict:
        """What /metrics reads on each scrape: disk, backup, open alerts, deliveries by state."""
        from .app.health import disk
        from .store import health as health_table
        _, alerts = self._health_services()
        free, total = await asyncio.to_thread(disk, self.folder)
        backup_at = await self.store.call(health_table.last_backup)
        states = await self.store.call(lambda db: dict(db.conn.execute(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()))
        return dict(disk_free=free, disk_total=total, backup_at=backup_at, now=self.ports.now(),
                    alerts=await alerts.list(), deliveries=states)
