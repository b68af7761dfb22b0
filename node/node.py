"""The Node facade: the one place that wires identity, envelope, store and transport.

    async with Node.open("~/.cabinet", passphrase=...) as node:
        await node.send_referral(to="Dr Durand", patient="Jeanne Martin", born="1961-04-02",
                                 subject="Chest pain", letter="Dear colleague, ...", attachments=["ecg.pdf"])

Every public method is a coroutine; SQLite and file work run on worker
threads (the event loop never blocks on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import ipaddress
import logging
import mimetypes
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable, Sequence

from .core import envelope
from .config import Config, parse_listen, prepare_folder
from .app.courier import Courier, Puller
from .app.discovery import Discovery
from .core.envelope import Attachment, Head, Manifest, Recipient, Sealer
from .core.errors import AlreadyExists, CabinetError, NotFound, TooLarge, UsageError
from .app.intake import Intake, make_receipt
from .app.patients import PatientService
from .core.identity import DESCRIPTOR_PREFIX, Descriptor, normalize_node_id, valid_address, parse_node_id, safety_code
from .store import blobs as blobstore
from .store import keyfile, records
from .store.audit import verify as verify_audit
from .store.db import DBFILE, Store
from .transport.client import Client, Peer
from .transport.mdns import Lan
from .app.serving import NodeHandler
from .transport.server import Server

log = logging.getLogger("cabinet.node")


DESCRIPTOR_FILE = "descriptor"
DESCRIPTOR_RENEW_MS = 30 * 86_400_000       # re-sign a month before the descriptor expires


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Summary:
    """One line of the inbox, outbox or a thread: no letter text, no attachment content."""

    id: str
    direction: str
    kind: str
    sender: str
    sender_name: str
    created: int
    patient: str
    born: str
    subject: str
    attachments: tuple[tuple[str, int], ...]
    thread: str
    reply_to: str | None
    opened: int | None


@dataclass(frozen=True, slots=True)
class RecordView:
    summary: Summary
    recipients: tuple[str, ...]
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class SendResult:
    record_id: str
    deliveries: dict[str, str]      # recipient node ID -> queued / delivered
    errors: dict[str, str]          # recipient node ID -> why it is still queued


class Node:
    def __init__(self, folder: Path, secrets: keyfile.Secrets, config: Config, store: Store) -> None:
        self.folder, self.config, self.store = folder, config, store
        self.identity = secrets.identity
        self._secrets = secrets
        self.blobs = blobstore.BlobStore(folder)
        self.client = Client(self.identity)
        self.intake = Intake(self)
        self.handler = NodeHandler(self)
        self.courier = Courier(self)
        self.puller = Puller(self)
        self.patients = PatientService(self)
        self.discovery = Discovery(self)
        self.lan: Lan | None = None
        self._server: Server | None = None
        self._lock_fd: int | None = None
        self._bound_port: int | None = None
        self._descriptor = self._current_descriptor()

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
                     advertise=[_check_url(u) for u in advertise],
                     bootstraps=[_check_url(u, allow_path=True) for u in bootstraps], lan=lan)
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
        return cls(folder, secrets, config, store)

    async def close(self) -> None:
        await self.courier.stop()
        await self.puller.stop()
        await self.discovery.stop()
        if self.lan:
            await self.lan.stop()                 # goodbye packets
            self.lan = self.discovery.lan = None
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
        """Start the server (unless accept=False), the courier and the puller.

        Returns the (host, port) listened on; (host, 0) when not accepting.
        """
        self._take_run_lock()
        if pull_interval is not None:
            self.puller.interval = pull_interval
        host, port = parse_listen(listen or self.config.listen)
        if not accept:
            await self.store.call(records.log, at=now_ms(), event="node-started", detail="not listening")
            await self._start_lan(host, None)
            self.courier.start()
            self.puller.start()
            self.discovery.start()
            return host, 0
        self._server = Server(self.handler, host, port)
        await self._server.start()
        self._bound_port = self._server.port
        if listen and port and listen != self.config.listen:
            self.config.listen = listen
            self.config.save(self.folder)
        if self.config.addresses(self._bound_port) != self._descriptor.addresses and not self._descriptor.revoked:
            await self._descriptor_changed()          # peers replace older descriptors by sequence number
        await self.store.call(records.log, at=now_ms(), event="node-started")
        await self._start_lan(host, self._server.port)
        self.courier.start()
        self.puller.start()
        self.discovery.start()
        return host, self._server.port

    async def _start_lan(self, host: str, port: int | None) -> None:
        """Announce on the LAN (and browse it) unless disabled or only listening on loopback."""
        ip = None if host in ("0.0.0.0", "::", "") else host
        if not self.config.lan or (ip is not None and ipaddress.ip_address(ip).is_loopback) \
                or self._descriptor.revoked:
            return
        self.lan = Lan(interfaces=[ip] if ip else None, on_hint=self._on_lan_hint)
        await self.lan.start(self.node_id, self.config.name, port, addresses=[ip] if ip and port else None)
        self.discovery.lan = self.lan

    async def _on_lan_hint(self, node_id: str, url: str) -> None:
        """A contact announced itself on the LAN: check it is really them, learn, deliver."""
        row = await self.store.call(records.contact_by_id, node_id)
        if row is None or row["revoked"] or self.lan is None:
            return                                # strangers are listed, never fetched unasked
        desc = await self.lan.verify_hint(self.client, node_id, url)
        if desc is None:
            return
        if desc.seq > row["seq"]:
            await self.learn_descriptor(desc)
        self.courier.wake()

    def peer(self, contact: dict) -> Peer:
        """Where to reach a contact: verified LAN addresses first, then its descriptor's."""
        urls = list(Descriptor.from_wire(contact["descriptor"]).addresses)
        if self.lan is not None:
            lan = [h.url for h in self.lan.peers() if h.node_id == contact["node_id"] and h.verified]
            urls = lan + [u for u in urls if u not in lan]
        return Peer(contact["node_id"], contact["sign_key"], tuple(urls))

    def _take_run_lock(self) -> None:
        fd = os.open(self.folder / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"a node is already running on {self.folder}") from None
        self._lock_fd = fd

    # --- identity and contacts ----------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def descriptor(self) -> Descriptor:
        return self._descriptor

    def _current_descriptor(self) -> Descriptor:
        """The signed descriptor kept in the data folder, so every process shows the same
        bytes for one sequence number; a new one only when something changed."""
        try:
            stored = Descriptor.from_wire((self.folder / DESCRIPTOR_FILE).read_bytes())
        except (OSError, CabinetError):
            stored = None
        if stored is not None and stored.node_id == self.node_id:
            if stored.revoked:
                return stored                       # final, whatever the configuration says
            fresh = stored.expires - now_ms() > DESCRIPTOR_RENEW_MS
            if stored.seq == self.config.descriptor_seq and stored.enc_key == self.identity.enc_public and fresh:
                return stored
            self.config.descriptor_seq = max(self.config.descriptor_seq, stored.seq + 1)
            self.config.save(self.folder)
        return self._sign_descriptor()

    def _sign_descriptor(self, revoked: bool = False) -> Descriptor:
        c = self.config
        desc = self.identity.descriptor(name=c.name, specialty=c.specialty, city=c.city, rpps=c.rpps,
                                        addresses=c.addresses(self._bound_port), seq=c.descriptor_seq,
                                        now_ms=now_ms(), revoked=revoked)
        keyfile.write_atomic(self.folder / DESCRIPTOR_FILE, desc.signed, mode=0o600)
        return desc

    async def _descriptor_changed(self, revoked: bool = False) -> None:
        """A new descriptor (address, key, details, revocation): higher seq, signed, kept, announced."""
        self.config.descriptor_seq += 1
        self.config.save(self.folder)
        self._descriptor = self._sign_descriptor(revoked)
        self.discovery.wake()
        if self.lan is not None:
            if revoked:
                await self.lan.stop()
                self.lan = self.discovery.lan = None
            else:
                await self.lan.update(name=self.config.name)

    async def add_contact(self, source: str | bytes, *, name: str | None = None,
                          expect_id: str | None = None) -> tuple[dict, str]:
        """Add a colleague from a descriptor (bytes, text, a file path, an http:// address) or a node ID alone.

        Returns the contact and 'added', 'updated', 'unchanged', 'held' (a
        practitioner already known under another identity key: nothing is sent
        to it until confirmed) or 'revoked'.
        """
        desc = await self._load_descriptor(source, expect_id)
        if desc.node_id == self.node_id:
            raise UsageError("that descriptor is this node's own")
        if desc.expired(now_ms()):
            raise UsageError("that descriptor has expired; ask the colleague for a fresh one")
        status = await self.store.call(records.upsert_contact, desc, (name or desc.name).strip(), now_ms())
        return await self.store.call(records.find_contact, desc.node_id), status

    async def learn_descriptor(self, desc: Descriptor) -> tuple[dict, str]:
        """A newer descriptor of a known contact (from a bootstrap, the LAN, or the node itself)."""
        row = await self.store.call(records.contact_by_id, desc.node_id)
        if row is None:
            raise NotFound(f"{desc.node_id} is not a contact")
        status = await self.store.call(records.upsert_contact, desc, row["name"], now_ms())
        if status == "revoked":
            log.warning("contact %s has revoked its key: nothing more is sent to or accepted from it", desc.node_id)
        return row, status

    async def confirm_contact(self, ref: str) -> dict:
        c = await self.contact(ref)
        await self.store.call(records.confirm_contact, c["node_id"], now_ms())
        self.courier.wake()
        return await self.contact(c["node_id"])

    async def _load_descriptor(self, source: str | bytes, expect_id: str | None) -> Descriptor:
        if isinstance(source, str) and _looks_like_node_id(source):
            return await self.discovery.resolve(source)
        if isinstance(source, bytes):
            desc = Descriptor.from_wire(source)
        elif source.startswith(("http://", "https://")):
            if not expect_id:
                raise UsageError("give the colleague's node ID (--id) to check who answers at that address")
            desc = Descriptor.from_wire(await self.client.fetch_descriptor(source))
        elif source.strip().startswith(DESCRIPTOR_PREFIX):
            desc = Descriptor.from_text(source)
        else:
            path = Path(source).expanduser()
            if not path.exists() and _NODE_ID_SHAPE.match(source.strip()):
                parse_node_id(source)           # shaped like a node ID: say what is wrong with it
            try:
                text = await asyncio.to_thread(path.read_text, "utf-8")
            except FileNotFoundError:
                raise NotFound(f"no such file: {source} (give a descriptor file, its text, a node ID or an "
                               "http:// address)") from None
            except (OSError, UnicodeDecodeError):
                raise NotFound(f"cannot read a descriptor from {source!r} (not a file, text or http:// address)") from None
            desc = Descriptor.from_text(text)
        if expect_id and normalize_node_id(expect_id) != desc.node_id:
            raise UsageError(f"the descriptor is for {desc.node_id}, not the expected {normalize_node_id(expect_id)}")
        return desc

    def use_bootstraps(self, urls: Sequence[str]) -> None:
        """Add directory servers to the configuration (kept for next time)."""
        for url in (_check_url(u, allow_path=True) for u in urls):
            if url not in self.config.bootstraps:
                self.config.bootstraps.append(url)
        self.config.save(self.folder)

    async def rotate_keys(self, passphrase: str) -> tuple[Descriptor, int]:
        """A fresh encryption key, signed by the identity key; old keys still open old records.

        Returns the new descriptor and how many contacts were told at once (the
        others learn it from the bootstraps or the next refresh).
        """
        await asyncio.to_thread(keyfile.open_, self.folder, passphrase)       # the right passphrase
        self.identity = self.identity.rotated()
        self._secrets = keyfile.Secrets(self.identity, self._secrets.storage_key, self._secrets.index_key)
        await asyncio.to_thread(keyfile.save_identity, self.folder, passphrase, self._secrets)
        self.client.identity = self.identity
        await self._descriptor_changed()
        await self.store.call(records.log, at=now_ms(), event="keys-rotated")
        told = await self.discovery.tell_all(self._descriptor)
        return self._descriptor, told

    async def revoke_keys(self) -> Descriptor:
        """Publish a signed, final revocation of this node's keys (a stolen box): to the
        bootstraps and to every contact. Returns the revocation descriptor."""
        await self._descriptor_changed(revoked=True)
        await self.store.call(records.log, at=now_ms(), event="keys-revoked")
        await self.discovery.announce()
        await self.discovery.tell_all(self._descriptor)
        return self._descriptor

    async def contacts(self) -> list[dict]:
        return await self.store.call(records.list_contacts)

    async def contact(self, ref: str) -> dict:
        return await self.store.call(records.find_contact, ref)

    async def safety_code(self, ref: str) -> tuple[dict, str]:
        c = await self.contact(ref)
        return c, safety_code(self.identity.sign_public, c["sign_key"])

    async def verify_contact(self, ref: str) -> dict:
        c = await self.contact(ref)
        await self.store.call(records.mark_verified, c["node_id"], now_ms())
        return await self.contact(ref)

    # --- sending --------------------------------------------------------------

    async def send_referral(self, *, to: str | Iterable[str], patient: str, born: str = "", subject: str = "",
                            letter: str | Path = "", attachments: Sequence[str | Path] = (), data: str = "",
                            deliver: bool = True) -> SendResult:
        """Seal a referral for one or more contacts, keep it in the outbox, try to deliver it now."""
        if not patient.strip():
            raise UsageError("the patient's name must not be empty")
        born = check_born(born)
        for what, text in (("patient name", patient), ("subject", subject), ("structured data", data)):
            _check_text(what, text)
        return await self._send("referral", to=[to] if isinstance(to, str) else list(to), patient=patient,
                                born=born, subject=subject, letter=letter, attachments=attachments, data=data,
                                deliver=deliver)

    async def reply(self, ref: str, *, letter: str | Path, attachments: Sequence[str | Path] = (),
                    subject: str | None = None, deliver: bool = True) -> SendResult:
        """Send the consultation report back to the sender, in the same thread."""
        original = await self.read(ref, audit_event="read-for-reply")
        s = original.summary
        to = [s.sender] if s.direction == "in" else [r for r in original.recipients if r != self.node_id]
        return await self._send("reply", to=to, patient=s.patient, born=s.born,
                                subject=subject if subject is not None else f"Re: {s.subject}", letter=letter,
                                attachments=attachments, data="", deliver=deliver, thread=bytes.fromhex(s.thread),
                                reply_to=bytes.fromhex(s.id))

    async def _send(self, kind: str, *, to: list[str], patient: str, born: str, subject: str, letter: str | Path,
                    attachments: Sequence[str | Path], data: str, deliver: bool, thread: bytes | None = None,
                    reply_to: bytes | None = None) -> SendResult:
        if not to:
            raise UsageError("give at least one recipient")
        contacts = [await self.contact(t) for t in to]
        if len({c["node_id"] for c in contacts}) != len(contacts):
            raise UsageError("the same colleague is named twice")
        letter_text = await self._letter_text(letter)
        paths, atts = await asyncio.to_thread(_check_attachments, attachments)
        manifest = Manifest(patient=patient.strip(), born=born.strip(), subject=subject.strip(), letter=letter_text,
                            data=data, attachments=tuple(atts))
        recipients = [Recipient(parse_node_id(c["node_id"]), Descriptor.from_wire(c["descriptor"]).enc_key)
                      for c in contacts]
        sealer = Sealer(sender=self.identity, recipients=recipients, kind=kind, created=now_ms(), thread=thread,
                        reply_to=reply_to)
        record_id = sealer.record_id.hex()
        tmp = self.blobs.incoming / f"{record_id}.sealing"
        size, digest = await asyncio.to_thread(blobstore.seal_files, sealer, manifest, paths, tmp)
        head = sealer.head(body_size=size, body_sha256=digest)
        body = await asyncio.to_thread(self._place_sealed, tmp, record_id, size)
        row = dict(self._record_row(Head.from_wire(head).header, head, manifest, "out"), body=body)
        await self.store.call(records.insert_record, row, recipients=[c["node_id"] for c in contacts],
                              now=now_ms(), event="sent" if kind == "referral" else "replied")
        log.info("record %s sealed for %d recipient(s)", record_id, len(contacts))
        errors: dict[str, str] = {}
        if deliver:
            errors = await self.courier.deliver_record(record_id)
        states = {d["recipient"]: d["state"] for d in await self.store.call(records.deliveries, record_id)}
        return SendResult(record_id, states, errors)

    def _place_sealed(self, tmp: Path, record_id: str, size: int) -> bytes | None:
        if size <= blobstore.INLINE_MAX:
            data = tmp.read_bytes()
            tmp.unlink()
            return data
        self.blobs.commit(tmp, record_id)
        return None

    def _source(self, row: dict) -> blobstore.Source:
        return row["body"] if row["body"] is not None else self.blobs.path(row["id"])

    async def _letter_text(self, letter: str | Path) -> str:
        if isinstance(letter, Path):
            try:
                return await asyncio.to_thread(letter.read_text, "utf-8")
            except FileNotFoundError:
                raise NotFound(f"letter file not found: {letter}") from None
            except (OSError, UnicodeDecodeError):
                raise UsageError(f"cannot read the letter {letter.name} as UTF-8 text") from None
        return letter

    def _record_row(self, h: envelope.Header, head: bytes, m: Manifest, direction: str) -> dict:
        meta = {"patient": m.patient, "born": m.born, "subject": m.subject,
                "att": [[a.name, a.size, a.type] for a in m.attachments]}
        return {"id": h.id_hex, "direction": direction, "kind": h.kind, "sender": h.sender_id,
                "thread": h.thread.hex(), "reply_to": h.reply_to.hex() if h.reply_to else None,
                "created": h.created, "stored": now_ms(), "head": head, "body_size": h.body_size,
                "meta": records.seal_meta(self._secrets.storage_key, meta),
                "patient_ix": records.patient_index(self._secrets.index_key, m.patient, m.born)}

    async def outbox(self, record: str | None = None) -> list[dict]:
        rid = (await self.store.call(records.get_record, record))["id"] if record else None
        return await self.store.call(records.deliveries, rid)

    async def deliver_pending(self) -> int:
        """Try every due delivery once now (what `cabinet run` does in a loop)."""
        return await self.courier.run_due()

    # --- reading --------------------------------------------------------------

    async def inbox(self, *, patient: str | None = None, born: str = "") -> list[Summary]:
        return await self.list_records("in", patient=patient, born=born)

    async def list_records(self, direction: str | None = None, *, patient: str | None = None,
                           born: str = "") -> list[Summary]:
        ix = records.patient_index(self._secrets.index_key, patient, born) if patient else None
        rows = await self.store.call(records.list_records, direction, ix)
        names = {c["node_id"]: c["name"] for c in await self.contacts()}
        return [self._summary(r, names) for r in rows]

    async def thread(self, ref: str) -> list[Summary]:
        row = await self.store.call(records.get_record, ref)
        rows = await self.store.call(records.list_records, None, None, row["thread"])
        names = {c["node_id"]: c["name"] for c in await self.contacts()}
        return sorted((self._summary(r, names) for r in rows), key=lambda s: (s.created, s.id))

    def _summary(self, row: dict, names: dict[str, str]) -> Summary:
        meta = records.open_meta(self._secrets.storage_key, row["meta"])
        sender_name = "me" if row["sender"] == self.node_id else names.get(row["sender"], "unknown")
        return Summary(id=row["id"], direction=row["direction"], kind=row["kind"], sender=row["sender"],
                       sender_name=sender_name, created=row["created"], patient=meta["patient"],
                       born=meta["born"], subject=meta["subject"],
                       attachments=tuple((a[0], a[1]) for a in meta["att"]), thread=row["thread"],
                       reply_to=row["reply_to"], opened=row["opened"])

    async def read(self, ref: str, *, audit_event: str = "read") -> RecordView:
        """Open a record: its letter, structured data and attachment list. Logged in the audit."""
        row = await self.store.call(records.get_record, ref)
        head = Head.from_wire(row["head"])
        key = head.content_key(self.identity)
        manifest = await asyncio.to_thread(blobstore.read_manifest, self._source(row), head.header, key)
        await self._opened(row, audit_event)
        names = {c["node_id"]: c["name"] for c in await self.contacts()}
        return RecordView(self._summary(row, names), tuple(head.header.recipient_ids), manifest)

    async def export(self, ref: str, dest: str | Path) -> list[Path]:
        """Decrypt a record's attachments into `dest` under safe names; never overwrites."""
        row = await self.store.call(records.get_record, ref)
        head = Head.from_wire(row["head"])
        key = head.content_key(self.identity)
        dest = Path(dest).expanduser()
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {dest}: {exc.strerror}") from None
        written = await asyncio.to_thread(_export, self._source(row), head.header, key, dest)
        await self._opened(row, "export")
        return written

    async def _opened(self, row: dict, event: str) -> None:
        """Log the access; the first time a received record is opened, owe its sender a receipt."""
        receipt = None
        if row["direction"] == "in":
            receipt = (row["sender"], make_receipt(self, row["id"], "opened", now_ms()))
        if await self.store.call(records.mark_opened, row["id"], now_ms(), event, receipt) and receipt:
            self.courier.wake()

    async def audit_verify(self) -> tuple[bool, int | None]:
        return await self.store.call(verify_audit)


_NODE_ID_SHAPE = re.compile(r"^[A-Za-z2-7]{4}([- ]?[A-Za-z2-7]{4}){7}[- ]?[A-Za-z2-7]$")


def check_born(born: str) -> str:
    """A date of birth as YYYY-MM-DD, a real date, not in the future (or empty)."""
    born = born.strip()
    if not born:
        return born
    try:
        day = datetime.date.fromisoformat(born)
    except ValueError:
        raise UsageError("the date of birth is not a date written YYYY-MM-DD") from None
    if len(born) != 10 or day > datetime.date.today():
        raise UsageError("the date of birth must be written YYYY-MM-DD and not be in the future")
    return born


def _check_text(what: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"the {what} is not valid text (UTF-8)") from None


def _looks_like_node_id(text: str) -> bool:
    try:
        parse_node_id(text)
        return True
    except UsageError:
        return False


def _check_url(url: str, allow_path: bool = False) -> str:
    if not valid_address(url, allow_path=allow_path):
        raise UsageError(f"not an address: {url!r} (expected http://host:port)")
    return url.rstrip("/")


def _check_attachments(items: Sequence[str | Path]) -> tuple[list[Path], list[Attachment]]:
    paths, atts = [], []
    if len(items) > envelope.MAX_ATTACHMENTS:
        raise TooLarge(f"at most {envelope.MAX_ATTACHMENTS} attachments per record")
    for item in items:
        p = Path(item).expanduser()
        try:
            st = p.stat()
        except FileNotFoundError:
            raise NotFound(f"attachment not found: {item}") from None
        except OSError as exc:
            raise UsageError(f"cannot read attachment {item}: {exc.strerror}") from None
        if not p.is_file():
            raise UsageError(f"attachment is not a file: {item}")
        if st.st_size > envelope.MAX_ATTACHMENT:
            raise TooLarge(f"attachment {p.name} is {st.st_size / 2**30:.1f} GiB, over the "
                           f"{envelope.MAX_ATTACHMENT // 2**30} GiB limit")
        paths.append(p)
        name = p.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:255]
        atts.append(Attachment(name=name, size=st.st_size,
                               type=mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
    return paths, atts


def safe_name(name: str, taken: set[str]) -> str:
    """A file name that cannot escape the folder or hide: no separators, no leading dots."""
    base = "".join(ch if ch.isprintable() and ch not in '/\\:*?"<>|' else "_" for ch in name)
    base = base.strip().lstrip(".").strip() or "attachment"
    base = base[:200]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    candidate, n = base, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"
    taken.add(candidate.lower())
    return candidate


def _export(source: blobstore.Source, header: envelope.Header, key: bytes, dest: Path) -> list[Path]:
    taken = {p.name.lower() for p in dest.iterdir()}
    tmp_files: dict[int, tuple[Path, Path]] = {}

    def open_sink(i: int, manifest: Manifest):
        final = dest / safe_name(manifest.attachments[i].name, taken)
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=".", suffix=".cabinet-partial")
        tmp_files[i] = (Path(tmp), final)
        return os.fdopen(fd, "wb")

    out: list[Path] = []
    try:
        blobstore.open_to_files(source, header, key, open_sink)
        for i in sorted(tmp_files):
            tmp, final = tmp_files[i]
            _place_new(tmp, final)
            out.append(final)
    except OSError as exc:
        raise UsageError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in tmp_files.values():
            tmp.unlink(missing_ok=True)          # nothing decrypted is left behind under a temporary name
    return out


def _place_new(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final`, never replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        # No hard links (a USB stick in FAT or exFAT): claim the name, then move onto it.
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(tmp, final)
