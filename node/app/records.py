"""Referrals and replies: seal and queue them; list, read and export what was sent and received.

Sealing streams the letter and attachments through the envelope in constant
memory on a worker thread; the sealed record and its deliveries are stored
in one transaction, then the courier tries to deliver at once. Reading opens
the record with this node's key; every read and export is in the audit log,
and the first opening of a received record owes its sender an "opened"
receipt.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import errno
import logging
import mimetypes
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, Sequence

from ..core import envelope
from ..core.envelope import Attachment, Head, Manifest, Recipient, Sealer
from ..core.errors import NotFound, TooLarge, UsageError
from ..core.identity import Descriptor, parse_node_id
from ..core.names import name_words
from ..store import blobs as blobstore
from ..store import records
from ..store.audit import verify as verify_audit
from ..sync.messages import Receipt
from .contacts import Contacts
from .events import AuditAppended, RecordOpened, RecordStored
from .ports import Ports
from .rows import place_sealed, record_row

log = logging.getLogger("cabinet.records")


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


class Deliverer(Protocol):
    def wake(self) -> None: ...
    async def deliver_record(self, record_id: str) -> dict[str, str]: ...


class Records:
    def __init__(self, ports: Ports, contacts: Contacts, courier: Deliverer) -> None:
        self.ports, self.contacts, self.courier = ports, contacts, courier

    # --- sending ------------------------------------------------------------------

    async def send_referral(self, *, to: str | Sequence[str], patient: str, born: str = "", subject: str = "",
                            letter: str | Path = "", attachments: Sequence[str | Path] = (), data: str = "",
                            deliver: bool = True) -> SendResult:
        if not patient.strip():
            raise UsageError("the patient's name must not be empty")
        born = check_born(born)
        for what, text in (("patient name", patient), ("subject", subject), ("structured data", data)):
            _check_text(what, text)
        return await self.send("referral", to=[to] if isinstance(to, str) else list(to), patient=patient,
                               born=born, subject=subject, letter=letter, attachments=attachments, data=data,
                               deliver=deliver)

    async def reply(self, ref: str, *, letter: str | Path, attachments: Sequence[str | Path] = (),
                    subject: str | None = None, deliver: bool = True) -> SendResult:
        original = await self.read(ref, audit_event="read-for-reply")
        s, me = original.summary, self.ports.identity.node_id
        to = [s.sender] if s.direction == "in" else [r for r in original.recipients if r != me]
        return await self.send("reply", to=to, patient=s.patient, born=s.born,
                               subject=subject if subject is not None else f"Re: {s.subject}", letter=letter,
                               attachments=attachments, data="", deliver=deliver, thread=bytes.fromhex(s.thread),
                               reply_to=bytes.fromhex(s.id))

    async def send(self, kind: str, *, to: list[str], patient: str, born: str, subject: str, letter: str | Path,
                   attachments: Sequence[str | Path], data: str, deliver: bool, thread: bytes | None = None,
                   reply_to: bytes | None = None) -> SendResult:
        p = self.ports
        if not to:
            raise UsageError("give at least one recipient")
        contacts = [await self.contacts.get(t) for t in to]
        if len({c["node_id"] for c in contacts}) != len(contacts):
            raise UsageError("the same colleague is named twice")
        letter_text, letter_file = await _letter_text(letter)
        if letter_file is not None:            # a PDF or Word letter travels as the first attachment
            attachments = [letter_file, *attachments]
        paths, atts = await asyncio.to_thread(check_attachments, attachments)
        manifest = Manifest(patient=patient.strip(), born=born.strip(), subject=subject.strip(), letter=letter_text,
                            data=data, attachments=tuple(atts))
        recipients = [Recipient(parse_node_id(c["node_id"]), Descriptor.from_wire(c["descriptor"]).enc_key)
                      for c in contacts]
        sealer = Sealer(sender=p.identity, recipients=recipients, kind=kind, created=p.now(), thread=thread,
                        reply_to=reply_to)
        record_id = sealer.record_id.hex()
        tmp = p.blobs.incoming / f"{record_id}.sealing"
        size, digest = await asyncio.to_thread(blobstore.seal_files, sealer, manifest, paths, tmp)
        head = sealer.head(body_size=size, body_sha256=digest)
        body = await asyncio.to_thread(place_sealed, p, tmp, record_id, size)
        row = dict(record_row(p, Head.from_wire(head).header, head, manifest, "out"), body=body)
        event = "sent" if kind == "referral" else "replied"
        ids = tuple(c["node_id"] for c in contacts)
        await p.store.call(records.insert_record, row, recipients=list(ids), now=p.now(), event=event)
        p.publish(RecordStored(at=p.now(), record_id=record_id, kind=kind, recipients=ids))
        p.publish(AuditAppended(at=p.now(), event=event))
        log.info("record %s sealed for %d recipient(s)", record_id, len(contacts))
        errors: dict[str, str] = {}
        if deliver:
            errors = await self.courier.deliver_record(record_id)
        states = {d["recipient"]: d["state"] for d in await p.store.call(records.deliveries, record_id)}
        return SendResult(record_id, states, errors)

    async def outbox(self, record: str | None = None) -> list[dict]:
        rid = (await self.ports.store.call(records.get_record, record))["id"] if record else None
        return await self.ports.store.call(records.deliveries, rid)

    # --- reading ------------------------------------------------------------------

    async def list(self, direction: str | None = None, *, patient: str | None = None,
                   born: str = "") -> list[Summary]:
        """Records, newest first; with `patient`, those whose patient's name holds every word given
        (any case, accents, order), and with `born`, that date of birth too."""
        born = check_born(born or "")
        rows = await self.ports.store.call(records.list_records, direction, None)
        names = await self.contacts.names()
        summaries = [self._summary(r, names) for r in rows]   # every summary is opened anyway to list it
        if patient is not None:
            wanted = name_words(patient)
            if not wanted:
                raise UsageError("give at least one word of the patient's name")
            summaries = [s for s in summaries if wanted <= name_words(s.patient)]
        if born:
            summaries = [s for s in summaries if s.born == born]
        return summaries

    async def thread(self, ref: str) -> builtins.list[Summary]:
        store = self.ports.store
        row = await store.call(records.get_record, ref)
        rows = await store.call(records.list_records, None, None, row["thread"])
        names = await self.contacts.names()
        return sorted((self._summary(r, names) for r in rows), key=lambda s: (s.created, s.id))

    def _summary(self, row: dict, names: dict[str, str]) -> Summary:
        meta = records.open_meta(self.ports.keys.storage_key, row["meta"])
        me = self.ports.identity.node_id
        sender_name = "me" if row["sender"] == me else names.get(row["sender"], "unknown")
        return Summary(id=row["id"], direction=row["direction"], kind=row["kind"], sender=row["sender"],
                       sender_name=sender_name, created=row["created"], patient=meta["patient"],
                       born=meta["born"], subject=meta["subject"],
                       attachments=tuple((a[0], a[1]) for a in meta["att"]), thread=row["thread"],
                       reply_to=row["reply_to"], opened=row["opened"])

    async def read(self, ref: str, *, audit_event: str = "read") -> RecordView:
        """Open a record: its letter, structured data and attachment list. Logged in the audit."""
        p = self.ports
        row = await p.store.call(records.get_record, ref)
        head = Head.from_wire(row["head"])
        key = head.content_key(p.identity)
        manifest = await asyncio.to_thread(blobstore.read_manifest, self._source(row), head.header, key)
        await self._opened(row, audit_event)
        return RecordView(self._summary(row, await self.contacts.names()), tuple(head.header.recipient_ids),
                          manifest)

    async def export(self, ref: str, dest: str | Path) -> builtins.list[Path]:
        """Decrypt a record's attachments into `dest` under safe names; never overwrites."""
        p = self.ports
        row = await p.store.call(records.get_record, ref)
        head = Head.from_wire(row["head"])
        key = head.content_key(p.identity)
        dest = Path(dest).expanduser()
        try:
            await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {dest}: {exc.strerror}") from None
        written = await asyncio.to_thread(export_files, self._source(row), head.header, key, dest)
        await self._opened(row, "export")
        return written

    def _source(self, row: dict) -> blobstore.Source:
        return row["body"] if row["body"] is not None else self.ports.blobs.path(row["id"])

    async def _opened(self, row: dict, event: str) -> None:
        """Log the access; the first time a received record is opened, owe its sender a receipt."""
        p = self.ports
        receipt = None
        if row["direction"] == "in":
            receipt = (row["sender"], Receipt.make(p.identity, row["id"], "opened", p.now()))
        first = await p.store.call(records.mark_opened, row["id"], p.now(), event, receipt)
        p.publish(RecordOpened(at=p.now(), record_id=row["id"], how=event))
        p.publish(AuditAppended(at=p.now(), event=event))
        if first and receipt:
            self.courier.wake()

    async def audit_verify(self) -> tuple[bool, int | None]:
        return await self.ports.store.call(verify_audit)


# --- checks on what a practitioner gives -----------------------------------------------

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


LETTER_TEXT_MAX = 1 << 20


async def _letter_text(letter: str | Path) -> tuple[str, Path | None]:
    """The letter's text; a letter file that is not text (a PDF, a Word file) is attached instead."""
    if not isinstance(letter, Path):
        return letter, None
    try:
        raw = await asyncio.to_thread(_read_head, letter, LETTER_TEXT_MAX + 1)
    except FileNotFoundError:
        raise NotFound(f"letter file not found: {letter}") from None
    except IsADirectoryError:
        raise UsageError(f"the letter {letter.name} is a folder, not a file") from None
    except OSError as exc:
        raise UsageError(f"cannot read the letter {letter.name}: {exc.strerror}") from None
    if len(raw) <= LETTER_TEXT_MAX and b"\0" not in raw:
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            pass
    return f"The letter is attached: {letter.name}", letter


def _read_head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def check_attachments(items: Sequence[str | Path]) -> tuple[list[Path], list[Attachment]]:
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


# --- export ----------------------------------------------------------------------------

MAX_NAME_BYTES = 240            # file systems allow 255 bytes; room for " (99)"


def _cut(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` that fits in `max_bytes` of UTF-8, never splitting a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def safe_name(name: str, taken: set[str]) -> str:
    """A file name that cannot escape the folder or hide, and fits any file system: no separators,
    no leading dots, at most MAX_NAME_BYTES bytes of UTF-8 (the extension kept)."""
    base = "".join(ch if ch.isprintable() and ch not in '/\\:*?"<>|' else "_" for ch in name)
    base = base.strip().lstrip(".").strip() or "attachment"
    stem, dot, ext = base.rpartition(".")
    if not dot or len(ext.encode("utf-8")) > 16:
        stem, ext = base, ""
    suffix = f".{ext}" if ext else ""
    stem = _cut(stem, MAX_NAME_BYTES - len(suffix.encode("utf-8"))).rstrip() or "attachment"
    candidate, n = stem + suffix, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{stem} ({n}){suffix}"
    taken.add(candidate.lower())
    return candidate


def export_files(source: blobstore.Source, header: envelope.Header, key: bytes, dest: Path) -> list[Path]:
    taken = {p.name.lower() for p in dest.iterdir()}
    tmp_files: dict[int, tuple[Path, Path]] = {}

    def open_sink(i: int, manifest: Manifest) -> IO[Any]:
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
