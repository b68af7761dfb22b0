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
import dataclasses
import datetime
import errno
import hashlib
import logging
import mimetypes
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, AsyncGenerator, Callable, Iterator, Protocol, Sequence

from ..core import envelope
from ..core.audit_docs import Origin, unwrap_copy_data
from ..core.envelope import Attachment, BodyParser, Decryptor, Head, Manifest, Recipient, Sealer
from ..core.errors import InvalidEnvelope, NotFound, TooLarge, UsageError
from ..core.identity import Descriptor, parse_node_id
from ..core.names import name_words
from ..store import blobs as blobstore
from ..store import records
from ..store.audit import verify as verify_audit
from ..sync.messages import Receipt
from .contacts import Contacts, contact_state
from .events import AuditAppended, RecordOpened, RecordStored
from .ports import Ports
from .retention import refuse_if_purged
from .rows import place_sealed, record_row

log = logging.getLogger("cabinet.records")
LIST_LIMIT = 500                 # a plain listing shows the newest; a search looks at every record


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
class Provenance:
    """A copy obtained with a patient's grant (or in an emergency): who wrote the original, and how it came.

    `checked` says against which key the original author's signature was checked:
    "contact" (the key of a contact with that node ID), "self" (our own key), "head"
    (only the key inside the signed head: the author is not a contact), "mismatch"
    (a contact has that node ID but another key) or "invalid" (the head does not verify).
    """

    author: str                 # node ID of the original's author ("" when the head does not verify)
    author_name: str            # a contact's name, or the node ID
    written: int                # the original's creation time (Unix ms), from its signed head
    record_id: str              # the original's record ID
    via: str                    # node ID of the practice that sealed the copy
    via_name: str
    grant: str | None
    emergency: bool
    checked: str

    def describe(self, when: Callable[[int], str] = lambda ms: datetime.datetime.fromtimestamp(
            ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")) -> str:
        how = "in an emergency access (break-glass)" if self.emergency else \
            f"with the patient's grant {self.grant}"
        if self.checked == "invalid":
            return (f"Obtained from {self.via_name} {how}; the original author's signed record it carries "
                    "does not verify: the author, date and ID are unknown")
        line = (f"Written by {self.author_name} on {when(self.written)} (record {self.record_id}); "
                f"obtained from {self.via_name} {how}")
        return line + {"contact": "; the author's signature checked against your contact's key",
                       "self": "; the author's signature checked against this practice's own key",
                       "head": "; the author is not one of your contacts: the signature was checked against "
                               "the key in the record only",
                       "mismatch": "; WARNING: the author's key is NOT the one you know for this contact"}[self.checked]


@dataclass(frozen=True, slots=True)
class RecordView:
    summary: Summary
    recipients: tuple[str, ...]
    manifest: Manifest
    provenance: Provenance | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    record_id: str
    deliveries: dict[str, str]      # recipient node ID -> queued / delivered
    errors: dict[str, str]          # recipient node ID -> why it is still queued


RESEND_WINDOW_MS = 10 * 60_000          # a second identical send within this is probably a slip


@dataclass(frozen=True, slots=True)
class EarlierCopy:
    """A referral already sent with the same recipients, patient, letter and files."""
    record_id: str
    created: int
    recipients: tuple[str, ...]


class _HashSink:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return len(data)

    def close(self) -> None:
        pass

    def digest(self) -> bytes:
        return self._h.digest()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


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
        for c in contacts:
            if c["revoked"]:
                raise UsageError(f"{c['name']}: {contact_state(c)}; nothing can be sent to this key "
                                 "(see 'cabinet contact list')")
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

    async def earlier_copy(self, *, to: Sequence[str], patient: str, born: str = "", letter: str | Path = "",
                           attachments: Sequence[str | Path] = (),
                           window_ms: int = RESEND_WINDOW_MS) -> EarlierCopy | None:
        """The same referral sent within `window_ms`: same recipients, patient, letter and files (by
        content digest). Cheap checks (recipients, patient, names and sizes) come first; the stored
        record is decrypted and hashed only for a candidate that passes them."""
        p = self.ports
        ids = frozenset([(await self.contacts.get(t))["node_id"] for t in to])
        born = check_born(born)
        since = p.now() - window_ms
        rows = [r for r in await p.store.call(records.list_records, "out", None, None, 50)
                if r["created"] >= since and r["kind"] == "referral"]
        candidates = []
        for row in rows:
            meta = records.open_meta(p.keys.storage_key, row["meta"])
            if meta["patient"] != patient.strip() or meta["born"] != born:
                continue
            if frozenset(d["recipient"] for d in await p.store.call(records.deliveries, row["id"])) == ids:
                candidates.append((row, [(a[0], a[1]) for a in meta["att"]]))
        if not candidates:
            return None
        letter_text, letter_file = await _letter_text(letter)
        files = [letter_file, *attachments] if letter_file is not None else list(attachments)
        paths, atts = await asyncio.to_thread(check_attachments, files)
        wanted = [(a.name, a.size) for a in atts]
        digests: builtins.list[bytes] | None = None
        for row, att in candidates:
            if att != wanted:
                continue
            if digests is None:
                digests = await asyncio.to_thread(lambda: [_file_digest(x) for x in paths])
            stored_letter, stored = await asyncio.to_thread(self._content_digests, row)
            if stored_letter == letter_text and stored == digests:
                return EarlierCopy(record_id=row["id"], created=row["created"], recipients=tuple(sorted(ids)))
        return None

    def _content_digests(self, row: dict) -> tuple[str, builtins.list[bytes]]:
        """The letter and the SHA-256 of each attachment of a stored record (worker thread)."""
        head = Head.from_wire(row["head"])
        key = head.content_key(self.ports.identity)
        sinks: dict[int, _HashSink] = {}

        def open_sink(i: int, manifest: Manifest) -> IO[Any]:
            sinks[i] = _HashSink()
            return sinks[i]  # type: ignore[return-value]

        manifest = blobstore.open_to_files(self._source(row), head.header, key, open_sink)
        return manifest.letter, [sinks[i].digest() for i in range(len(manifest.attachments))]

    async def outbox(self, record: str | None = None) -> list[dict]:
        rid = (await self.ports.store.call(records.get_record, record))["id"] if record else None
        return await self.ports.store.call(records.deliveries, rid)

    # --- reading ------------------------------------------------------------------

    async def list(self, direction: str | None = None, *, patient: str | None = None,
                   born: str = "") -> list[Summary]:
        """Records, newest first; with `patient`, those whose patient's name holds every word given
        (any case, accents, order), and with `born`, that date of birth too."""
        born = check_born(born or "")
        # A search looks at every record; a plain listing at the newest LIST_LIMIT.
        limit = None if (patient is not None or born) else LIST_LIMIT
        rows = await self.ports.store.call(records.list_records, direction, None, None, limit)
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
        await refuse_if_purged(p, row)
        head = Head.from_wire(row["head"])
        key = head.content_key(p.identity)
        manifest = await asyncio.to_thread(blobstore.read_manifest, self._source(row), head.header, key)
        await self._opened(row, audit_event)
        names = await self.contacts.names()
        origin, data = unwrap_copy_data(manifest.data)
        provenance = None
        if origin is not None:
            manifest = dataclasses.replace(manifest, data=data)
            provenance = await self._provenance(origin, head.header.sender_id, names)
        return RecordView(self._summary(row, names), tuple(head.header.recipient_ids), manifest, provenance)

    async def _provenance(self, origin: Origin, via: str, names: dict[str, str]) -> Provenance:
        """Check the original's signed head against what we know of its author."""
        me = self.ports.identity
        via_name = names.get(via, via)
        if origin.head is None:
            return Provenance(author="", author_name="", written=0, record_id="", via=via, via_name=via_name,
                              grant=origin.grant, emergency=origin.emergency, checked="invalid")
        h = origin.head.header
        author = origin.author
        if author == me.node_id:
            checked = "self" if h.sender_key == me.sign_public else "mismatch"
        else:
            contact = await self.ports.store.call(records.contact_by_id, author)
            checked = "head" if contact is None else ("contact" if contact["sign_key"] == h.sender_key
                                                      else "mismatch")
        name = self.ports.config.name if author == me.node_id else names.get(author, author)
        return Provenance(author=author, author_name=name, written=h.created, record_id=h.id_hex, via=via,
                          via_name=via_name, grant=origin.grant, emergency=origin.emergency, checked=checked)

    async def export(self, ref: str, dest: str | Path) -> builtins.list[Path]:
        """Decrypt a record's attachments into `dest` under safe names; never overwrites."""
        p = self.ports
        row = await p.store.call(records.get_record, ref)
        await refuse_if_purged(p, row)
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

    async def attachment(self, ref: str, index: int) -> tuple[Attachment, AsyncGenerator[bytes, None], str]:
        """Attachment `index` of a record, decrypted as it streams on a worker thread (each piece
        authenticated before it is given; the whole body checked at the end); audited as a download."""
        view = await self.read(ref, audit_event="download")
        atts = view.manifest.attachments
        if not 0 <= index < len(atts):
            raise NotFound(f"this record has {len(atts)} attachment(s)")
        row = await self.ports.store.call(records.get_record, view.summary.id)
        head = Head.from_wire(row["head"])
        pieces = _attachment_pieces(self._source(row), head.header, head.content_key(self.ports.identity), index)
        return atts[index], _in_thread(pieces), row["id"]

    def _source(self, row: dict) -> blobstore.Source:
        if row["body"] is not None:
            return row["body"]
        return self.ports.blobs.path(row["id"], row["sender"] if row["direction"] == "in" else None)

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


def _attachment_pieces(source: blobstore.Source, header: envelope.Header, key: bytes, index: int) -> Iterator[bytes]:
    """Decrypt a stored body, yielding attachment `index`'s plaintext; the whole body is checked at the end."""
    dec, parser, hasher = Decryptor(header, key), BodyParser(), hashlib.sha256()
    for piece in blobstore.iter_source(source):
        hasher.update(piece)
        for plain in dec.feed(piece):
            out = b"".join(data for i, data in parser.feed(plain) if i == index)
            if out:
                yield out
    out = b"".join(data for i, data in parser.feed(dec.finish()) if i == index)
    if out:
        yield out
    parser.finish()
    if hasher.digest() != header.body_sha256:
        raise InvalidEnvelope()


async def _in_thread(pieces: Iterator[bytes]) -> AsyncGenerator[bytes, None]:
    """A blocking generator, advanced on a worker thread one piece at a time."""
    while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
        yield piece
