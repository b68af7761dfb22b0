"""Taking records in: verify, store, commit, acknowledge. Used by push and by pull alike.

Built from the ports (store, blobs, identity, clock, events) and nothing else.
The order is always the same: the head's signature first, then that the
claimed sender is who we are talking to and that one key slot opens with our
key; the body is hashed and decrypted as it arrives; only a body that passed
every check is made durable and committed, and only then is it acknowledged.
A partial body waits in incoming/ for the rest and is never listed.

A record that can never be taken (a head that does not verify, not for us,
from someone else, an ID another record holds, or a whole signed body that
does not open) is *refused for good* when it has a place in the sender's
stream: the refusal is stored with the stream's cursor (which moves past it)
and the sender is told in the answer and in every ack. A body streamed in
pieces that fails its digest is refused only for now: the pieces are not
signed as a whole, so a broken connection must not cost the record.

The Intake holds one RecipientSession per sender (node/sync/session.py),
loaded from the store on first use and kept in step with every commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

from ..core import wire
from ..core.envelope import Head, Manifest, open_bytes
from ..core.errors import InvalidEnvelope, ProtocolError, StoreError
from ..store import blobs as blobstore
from ..store import records
from ..sync.messages import DUPLICATE, MAX_SMALL_BODY, REFUSED, STORED, Ack, PushItem
from ..sync.session import FillGap, RecipientSession
from .events import RecordReceived, Refusal
from .ports import Ports
from .rows import place_sealed, record_row

log = logging.getLogger("cabinet.intake")
WRITE_BATCH = 1 << 20
IN_FLIGHT = 3
DISK_MARGIN = 64 << 20


class RecordRefused(InvalidEnvelope):
    """This record is refused for good (`code`, from messages.REFUSALS); `ack` is the stream after
    the refusal was stored (None when the record had no place in a stream)."""

    def __init__(self, code: str, ack: Ack | None = None) -> None:
        super().__init__()
        self.code, self.ack = code, ack


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str          # stored, duplicate, refused, partial, busy, offset
    have: int = 0
    ack: Ack | None = None
    reason: str = ""     # for refused
    gap: bool = False    # records sit above a hole in the stream: pull from the sender now


@dataclass(slots=True)
class BatchOutcome:
    results: dict[str, str] = field(default_factory=dict)     # record ID -> stored / duplicate / refused
    reasons: dict[str, str] = field(default_factory=dict)     # record ID -> refusal code
    ack: Ack = field(default_factory=lambda: Ack(upto=0))
    gap: bool = False


class Intake:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self._busy: set[str] = set()
        self._sessions: dict[str, RecipientSession] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-intake")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def session(self, sender: str) -> RecipientSession:
        """The stream from `sender`, loaded from the store once."""
        if sender not in self._sessions:
            ack = await self.ports.store.call(records.stream_in, sender)
            self._sessions.setdefault(sender, RecipientSession(sender, ack))
        return self._sessions[sender]

    async def _committed(self, sender: str, ack: Ack) -> bool:
        """The store settled the stream: keep the session in step; True when a gap asks for a pull."""
        return any(isinstance(e, FillGap) for e in (await self.session(sender)).on_committed(ack))

    async def refused(self, record_id: str, sender: str, exc: Exception, *, seq: int | None = None,
                      code: str | None = None) -> Ack | None:
        """Log a refusal; when it is for good and the record has a place in the stream, store it."""
        log.warning("record %s from %s refused: %s%s", record_id, sender, code or exc, "" if code else " (for now)")
        now = self.ports.clock()
        await self.ports.store.call(records.log, at=now, event="refused", record=record_id, peer=sender,
                                    detail=(code or str(exc))[:200])
        self.ports.publish(Refusal(at=now, peer=sender, reason=code or "invalid-envelope", record_id=record_id))
        if code is None or seq is None:
            return None
        ack = await self.ports.store.call(records.refuse_received, sender, seq, record_id, code, now=now)
        await self._committed(sender, ack)
        return ack

    async def check_head(self, head_raw: bytes, *, record_id: str, sender: str,
                         seq: int | None = None) -> tuple[Head, bytes]:
        """Signature first; then: this record, from this sender, for us. A failure is for good
        (the head is signed by the caller, or comes in a signed answer): RecordRefused."""
        code = "invalid-envelope"
        try:
            head = Head.from_wire(head_raw)
            if head.header.id_hex != record_id:
                raise InvalidEnvelope()
            if head.header.sender_id != sender:
                code = "wrong-sender"
                raise InvalidEnvelope()
            return head, head.content_key(self.ports.identity)
        except (InvalidEnvelope, ProtocolError) as exc:
            raise RecordRefused(code, await self.refused(record_id, sender, exc, seq=seq, code=code)) from None

    async def refusal_of(self, sender: str, seq: int | None) -> str | None:
        """If this stream position was already refused for good, why (a retry gets the same answer)."""
        if seq is None:
            return None
        session = await self.session(sender)
        if seq in session.refused:
            return session.refused[seq]
        return await self.ports.store.call(records.refused_from, sender, seq)

    def have(self, record_id: str) -> int:
        try:
            return self.ports.blobs.incoming_path(record_id).stat().st_size
        except FileNotFoundError:             # none, or just moved into place
            return 0

    async def stream(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                     seq: int | None) -> Outcome:
        """Receive a body from `offset` on; commit it when complete."""
        store, rid = self.ports.store, head.header.id_hex
        stored = await store.call(records.stored_from, rid)
        if stored is not None:
            if stored != (sender, head.raw):        # another record already holds this ID
                raise RecordRefused("id-taken", await self.refused(rid, sender, InvalidEnvelope(), seq=seq,
                                                                   code="id-taken"))
            if not seq:
                return Outcome(DUPLICATE)
            _, ack = await store.call(records.insert_received, [self._row(head, None, seq, None)],
                                      sender=sender, now=self.ports.clock())
            return Outcome(DUPLICATE, ack=ack, gap=await self._committed(sender, ack))
        if rid in self._busy:
            return Outcome("busy")
        self._busy.add(rid)
        try:
            with _exclusive(self.ports.blobs.incoming_path(rid)) as mine:
                if not mine:                   # another process (cabinet run, or a command) is on it
                    return Outcome("busy")
                return await self._receive(sender, head, key, offset, body, seq)
        finally:
            self._busy.discard(rid)

    async def _receive(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                       seq: int | None) -> Outcome:
        ports, h, rid = self.ports, head.header, head.header.id_hex
        have = self.have(rid)
        if offset != have:
            return Outcome("offset", have=have)
        free = await asyncio.to_thread(lambda: shutil.disk_usage(ports.folder).free)
        if free < (h.body_size - have) + DISK_MARGIN:
            exc = StoreError("not enough disk space for this record; try again later")
            await self.refused(rid, sender, exc)
            raise exc
        inbound = await self._run(blobstore.Inbound, ports.blobs.incoming_path(rid), h, key)
        try:
            await self._pump(inbound, body)
            log.info("record %s: %d body bytes received from offset %d", rid, inbound.size - have, have)
        except (InvalidEnvelope, StoreError) as exc:
            await self._discard(inbound, rid, sender, exc)
            raise
        except BaseException:
            # The other side went away mid-transfer: keep what arrived, for resuming.
            await asyncio.shield(self._run(inbound.close))
            log.info("record %s: transfer interrupted at %d of %d bytes", rid, inbound.size, h.body_size)
            raise
        if not inbound.complete:
            await self._run(inbound.close)
            return Outcome("partial", have=inbound.size)
        try:
            manifest = await self._run(inbound.finish)
        except InvalidEnvelope as exc:
            await self._discard(inbound, rid, sender, exc)
            raise
        inline = await self._run(place_sealed, ports, inbound.path, rid, h.body_size)
        row = self._row(head, manifest, seq, inline)
        new, ack = await ports.store.call(records.insert_received, [row], sender=sender, now=ports.clock())
        if new[0] is None:                        # another record took this ID meanwhile
            raise RecordRefused("id-taken", await self.refused(rid, sender, InvalidEnvelope(), seq=seq,
                                                               code="id-taken"))
        log.info("record %s received from %s (%d bytes)", rid, sender, h.body_size)
        self._received(row)
        return Outcome(STORED, ack=ack, gap=await self._committed(sender, ack))

    async def small(self, sender: str, items: list[PushItem]) -> BatchOutcome:
        """Verify and commit a batch of small records in one transaction (push, or inline pull).

        The items come in a signed request or a signed answer, whole: a failure is for good.
        """
        out = BatchOutcome()
        checked = await self._run(self._verify_all, sender, items)
        rows = []
        for item, row in zip(items, checked):
            if isinstance(row, dict):
                rows.append(row)
                continue
            rid = _peek_id(item.head)
            code = row if isinstance(row, str) else "invalid-envelope"
            out.results[rid], out.reasons[rid] = REFUSED, code
            await self.refused(rid, sender, InvalidEnvelope(), seq=item.seq, code=code)
        stored, out.ack = await self.ports.store.call(records.insert_received, rows, sender=sender,
                                                      now=self.ports.clock())
        for row, new in zip(rows, stored):
            if new is None:
                out.results[row["id"]], out.reasons[row["id"]] = REFUSED, "id-taken"
                out.ack = await self.refused(row["id"], sender, InvalidEnvelope(), seq=row["seq"],
                                             code="id-taken") or out.ack
                continue
            out.results[row["id"]] = STORED if new else DUPLICATE
            if new:
                self._received(row)
        if not rows:
            out.ack = await self.ports.store.call(records.stream_in, sender)
        out.gap = await self._committed(sender, out.ack)
        return out

    def _verify_all(self, sender: str, items: list[PushItem]) -> list[dict | str]:
        """In the intake's worker thread: hash, verify and open every body (the CPU-heavy part)."""
        out: list[dict | str] = []
        for item in items:
            try:
                if len(item.body) > MAX_SMALL_BODY:
                    out.append("too-large")
                    continue
                header, manifest, _ = open_bytes(item.head, item.body, self.ports.identity)
                if header.sender_id != sender:
                    out.append("wrong-sender")
                    continue
                out.append(self._row(Head(header, item.head), manifest, item.seq, item.body))
            except (InvalidEnvelope, ProtocolError):
                out.append("invalid-envelope")
        return out

    def _row(self, head: Head, manifest: Manifest | None, seq: int | None, body: bytes | None) -> dict:
        if manifest is None:       # only used for duplicates, where just id/sender/head/seq matter
            return {"id": head.header.id_hex, "direction": "in", "sender": head.header.sender_id, "seq": seq,
                    "head": head.raw}
        return dict(record_row(self.ports, head.header, head.raw, manifest, "in"), seq=seq, body=body)

    def _received(self, row: dict) -> None:
        self.ports.publish(RecordReceived(at=self.ports.clock(), record_id=row["id"], sender=row["sender"],
                                          kind=row["kind"], size=row["body_size"]))

    async def _discard(self, inbound: blobstore.Inbound, rid: str, sender: str, exc: Exception) -> None:
        await self._run(inbound.close)
        inbound.path.unlink(missing_ok=True)
        await self.refused(rid, sender, exc)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _pump(self, inbound: blobstore.Inbound, body: AsyncIterator[bytes]) -> None:
        """Read from the network while earlier pieces are written and hashed (a few MiB behind)."""
        pending: collections.deque[asyncio.Future] = collections.deque()
        buf: list[bytes] = []
        size = 0
        try:
            async for piece in body:
                buf.append(piece)
                size += len(piece)
                if size >= WRITE_BATCH:
                    pending.append(asyncio.ensure_future(self._run(inbound.write, b"".join(buf))))
                    buf, size = [], 0
                    while len(pending) >= IN_FLIGHT:
                        await pending.popleft()
            if buf:
                pending.append(asyncio.ensure_future(self._run(inbound.write, b"".join(buf))))
        finally:
            while pending:                      # whatever happens, no write is left running behind us
                await asyncio.shield(pending.popleft())




@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """One writer per incoming body, across processes: yields False if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            if path.exists() and path.stat().st_size == 0:
                path.unlink()                  # nothing arrived: leave no empty partial behind
    finally:
        os.close(fd)


def _peek_id(head_raw: bytes) -> str:
    try:
        outer = wire.unpack(head_raw, max_size=1 << 16, what="envelope")
        h = wire.unpack(outer["h"], max_size=1 << 16, what="envelope")
        return h["id"].hex() if isinstance(h.get("id"), bytes) else "?"
    except (ProtocolError, KeyError, TypeError, AttributeError):
        return "?"
