"""Taking records in: verify, store, commit, acknowledge. Used by push and by pull alike.

Built from the ports (store, blobs, identity, clock, events) and nothing else.
The order is always the same: the head's signature first, then that the
claimed sender is who we are talking to and that one key slot opens with our
key; the body is hashed and decrypted as it arrives; only a body that passed
every check is made durable and committed, and only then is it acknowledged.
A partial body waits in incoming/<sender>-<id>.body for the rest and is never
listed; a record is its sender's ID and its own, so no other sender can take
its place or touch its partial body.

Every upload and batch first reserves its bytes (quota.py): over the sender's
quota or into the disk's reserve, it is refused for now (507, never an ack).
A partial body with no progress for the configured time is collected by the
sweep (`sweep`, run by the node at start and then periodically).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

from ..core import wire
from ..core.envelope import Head, Manifest, open_bytes
from ..core.errors import CabinetError, InvalidEnvelope, ProtocolError, StoreError
from ..store import blobs as blobstore
from ..store import records
from ..sync.messages import DUPLICATE, MAX_SMALL_BODY, REFUSED, STORED, Ack, PushItem
from ..sync.session import FillGap, RecipientSession
from .events import RecordReceived, Refusal
from .loop import Loop
from .ports import Ports
from .quota import Quota, QuotaFull, Reservation, disk_of, limits_of
from .rows import record_row

log = logging.getLogger("cabinet.intake")
WRITE_BATCH = 1 << 20
IN_FLIGHT = 3
SEALING_STALE_MS = 3600_000           # a sealing untouched this long was interrupted
SWEEP_EVERY = 3600.0            # seconds between sweeps of incoming/


class RecordRefused(InvalidEnvelope):
    """This record is refused for good (`code`, from messages.REFUSALS); `ack` is the stream after
    the refusal was stored (None when the record had no place in a stream)."""

    def __init__(self, code: str, ack: Ack | None = None) -> None:
        super().__init__()
        self.code, self.ack = code, ack


class Interrupted(CabinetError):
    """The sender went away mid-upload; what arrived is kept for resuming (logged in one line)."""


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
        self._busy: set[tuple[str, str]] = set()            # (sender, record ID) being received
        self._sessions: dict[str, RecipientSession] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-intake")
        self.quota = Quota(limits_of(ports.config), disk_of(ports.folder))
        self.quota.load(p for p in ports.blobs.partials() if p.sender)
        self.sweeper = Loop("cabinet-sweep", self.sweep)      # started by the running node (Node.serve)

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
        except InvalidEnvelope as exc:
            raise RecordRefused(code, await self.refused(record_id, sender, exc, seq=seq, code=code)) from None
        except ProtocolError as exc:
            # Malformed rather than unverifiable: the refusal is kept for this stream position all
            # the same (the cursor moves on; the next ack says so), and the caller is told why (400).
            await self.refused(record_id, sender, exc, seq=seq, code=code)
            raise

    async def refusal_of(self, sender: str, seq: int | None) -> str | None:
        """If this stream position was already refused for good, why (a retry gets the same answer)."""
        if seq is None:
            return None
        session = await self.session(sender)
        if seq in session.refused:
            return session.refused[seq]
        return await self.ports.store.call(records.refused_from, sender, seq)

    def have(self, record_id: str, sender: str | None = None) -> int:
        """Bytes of `sender`'s partial body for this record (without a sender: the only one there is)."""
        if sender is None:
            found = list(self.ports.blobs.incoming.glob(f"*-{record_id}.body"))
            if len(found) != 1:
                return 0
            path = found[0]
        else:
            path = self.ports.blobs.incoming_path(record_id, sender)
        try:
            return path.stat().st_size
        except FileNotFoundError:             # none, or just moved into place
            return 0

    async def stream(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                     seq: int | None) -> Outcome:
        """Receive a body from `offset` on; commit it when complete."""
        store, rid = self.ports.store, head.header.id_hex
        stored = await store.call(records.stored_from, rid, sender)
        if stored is not None:
            if stored != head.raw:                  # the sender's other record under this ID
                raise RecordRefused("id-taken", await self.refused(rid, sender, InvalidEnvelope(), seq=seq,
                                                                   code="id-taken"))
            if not seq:
                return Outcome(DUPLICATE)
            _, ack = await store.call(records.insert_received, [self._row(head, None, seq, None)],
                                      sender=sender, now=self.ports.clock())
            return Outcome(DUPLICATE, ack=ack, gap=await self._committed(sender, ack))
        if (sender, rid) in self._busy:
            return Outcome("busy")
        self._busy.add((sender, rid))
        try:
            with _exclusive(self.ports.blobs.incoming_path(rid, sender)) as mine:
                if not mine:                   # another process (cabinet run, or a command) is on it
                    return Outcome("busy")
                return await self._reserved(sender, head, key, offset, body, seq)
        finally:
            self._busy.discard((sender, rid))

    async def _reserved(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                        seq: int | None) -> Outcome:
        """Hold the body's bytes against the sender's quota for as long as the upload runs."""
        rid, size = head.header.id_hex, head.header.body_size
        have = self.have(rid, sender)
        if offset != have:
            return Outcome("offset", have=have)
        try:
            held = self.quota.reserve(sender, size, record_id=rid, have=have)
        except QuotaFull as exc:
            await self.refused(rid, sender, exc)
            raise
        try:
            return await self._receive(sender, head, key, have, body, seq, held)
        finally:
            held.release(kept=self.have(rid, sender))

    async def _receive(self, sender: str, head: Head, key: bytes, have: int, body: AsyncIterator[bytes],
                       seq: int | None, held: Reservation) -> Outcome:
        ports, h, rid = self.ports, head.header, head.header.id_hex
        inbound = await self._run(blobstore.Inbound, ports.blobs.incoming_path(rid, sender), h, key)
        try:
            await self._pump(inbound, body)
            log.info("record %s: %d body bytes received from offset %d", rid, inbound.size - have, have)
        except (InvalidEnvelope, StoreError) as exc:
            await self._discard(inbound, rid, sender, exc)
            raise
        except BaseException as exc:
            # The other side went away mid-transfer: keep what arrived, for resuming. One line,
            # never a traceback: a cut connection is an everyday event.
            await asyncio.shield(self._run(inbound.close))
            log.info("record %s from %s: transfer interrupted at %d of %d bytes; kept for resuming",
                     rid, sender, inbound.size, h.body_size)
            if isinstance(exc, Exception) and not isinstance(exc, CabinetError):
                raise Interrupted("transfer interrupted") from None
            raise
        if not inbound.complete:
            await self._run(inbound.close)
            return Outcome("partial", have=inbound.size)
        try:
            manifest = await self._run(inbound.finish)
        except InvalidEnvelope as exc:
            await self._discard(inbound, rid, sender, exc)
            raise
        inline = await self._run(_place_received, ports, inbound.path, rid, sender, h.body_size)
        row = self._row(head, manifest, seq, inline)
        new, ack = await ports.store.call(records.insert_received, [row], sender=sender, now=ports.clock())
        if new[0] is None:                        # the sender's other record took this ID meanwhile
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
        held = self.quota.reserve(sender, sum(len(i.body) + len(i.head) for i in items))
        try:
            return await self._small(sender, items, out)
        finally:
            held.release()

    async def _small(self, sender: str, items: list[PushItem], out: BatchOutcome) -> BatchOutcome:
        session = await self.session(sender)        # only seqs it knows committed can be held: no store call else
        maybe = [(i.seq, i.head) for i in items
                 if i.seq is not None and (i.seq <= session.cursor or i.seq in session.above)]
        held = await self.ports.store.call(records.held_exactly, sender, maybe) if maybe else set()
        if held:            # byte for byte what is stored (and was verified then): a duplicate, as before
            for item in items:
                if item.seq in held:
                    out.results[_peek_id(item.head)] = DUPLICATE
            items = [i for i in items if i.seq not in held]
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

    async def sweep(self) -> float:
        """Collect partial bodies with no progress for the configured time (and unreadable
        leftovers); returns the delay until the next sweep (a Loop round)."""
        expiry, now = self.quota.limits.expiry_ms, self.ports.clock()
        for p in await asyncio.to_thread(self.ports.blobs.partials):
            if now - p.mtime_ms < expiry or (p.sender, p.record_id) in self._busy:
                continue
            if await asyncio.to_thread(_collect, p.path):
                self.quota.forget(p.sender, p.record_id)
                log.info("record %s from %s: partial body of %d bytes expired and removed",
                         p.record_id, p.sender or "an earlier version", p.size)
        # A body this node was sealing when its command was interrupted: never stored, never listed.
        for leftover in await asyncio.to_thread(self.ports.blobs.stale_sealing, now - SEALING_STALE_MS):
            log.info("an interrupted sealing left %s behind: removed", leftover.name)
        return SWEEP_EVERY

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


def _collect(path: Path) -> bool:
    """Remove a partial body unless someone (another process) is writing it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def _place_received(ports: Ports, tmp: Path, record_id: str, sender: str, size: int) -> bytes | None:
    """A small received body goes into SQLite with its row (returned); a large one into blobs/
    under its sender's name, durably. Blocks: run it in a worker thread."""
    if size <= blobstore.INLINE_MAX:
        data = tmp.read_bytes()
        tmp.unlink()
        return data
    ports.blobs.commit(tmp, record_id, sender)
    return None


def _peek_id(head_raw: bytes) -> str:
    try:
        outer = wire.unpack(head_raw, max_size=1 << 16, what="envelope")
        h = wire.unpack(outer["h"], max_size=1 << 16, what="envelope")
        return h["id"].hex() if isinstance(h.get("id"), bytes) else "?"
    except (ProtocolError, KeyError, TypeError, AttributeError):
        return "?"
