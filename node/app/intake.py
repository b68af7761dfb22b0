"""Taking records in: verify, store, commit, acknowledge. Used by push and by pull alike.

Part of the wiring layer (it uses the store; node.py owns it). The order is
always the same: the head's signature first, then that the claimed sender is
who we are talking to and that one key slot opens with our key; the body is
hashed and decrypted as it arrives; only a body that passed every check is
made durable and committed, and only then is it acknowledged. A partial body
waits in incoming/ for the rest and is never listed.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from ..core import crypto, wire
from ..core.envelope import Head, open_bytes
from ..core.errors import InvalidEnvelope, InvalidSignature, ProtocolError, RemoteProtocolError, StoreError
from ..store import blobs as blobstore
from ..store import records
from ..sync.stream import Ack

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("cabinet.intake")
WRITE_BATCH = 1 << 20
IN_FLIGHT = 3
DISK_MARGIN = 64 << 20


def make_receipt(node: "Node", record_id: str, status: str, at: int) -> bytes:
    """A signed statement by this node: record R was `status` (delivered, opened) at `at`."""
    body = wire.pack({"record": bytes.fromhex(record_id), "by": node.identity.sign_public, "status": status, "at": at})
    return wire.pack({"body": body, "sig": node.identity.sign("receipt", body)})


def check_receipt(raw: bytes, sign_key: bytes, record_id: str | None = None) -> dict:
    """Verify a receipt made by the holder of `sign_key`; returns its fields."""
    outer = wire.unpack(raw, max_size=4096, what="receipt")
    body_raw = wire.field(outer, "body", bytes, what="receipt")
    crypto.verify(sign_key, "receipt", body_raw, wire.field(outer, "sig", bytes, what="receipt", size=64))
    body = wire.unpack(body_raw, max_size=4096, what="receipt")
    rid = wire.field(body, "record", bytes, what="receipt", size=16).hex()
    if record_id is not None and rid != record_id:
        raise InvalidSignature("receipt is for another record")
    if wire.field(body, "status", str, what="receipt") not in ("delivered", "opened"):
        raise RemoteProtocolError("receipt: unknown status")
    return {"record": rid, "status": body["status"], "at": wire.field(body, "at", int, what="receipt")}


MAX_HAVE = 1000


def ack_wire(ack: Ack) -> dict:
    # Only the lowest MAX_HAVE above the cursor: the rest are acked again later (duplicates are cheap).
    return {"upto": ack.upto, "have": list(ack.have[:MAX_HAVE])}


def ack_from_wire(obj: object) -> Ack:
    upto = wire.field(obj, "upto", int, what="ack")
    have = wire.field(obj, "have", list, what="ack")
    if upto < 0 or len(have) > 10_000 or not all(isinstance(s, int) and not isinstance(s, bool) for s in have):
        raise RemoteProtocolError("ack: malformed")
    return Ack(upto=upto, have=tuple(have))


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str          # stored, duplicate, partial, busy, offset
    have: int = 0
    ack: Ack | None = None


class Intake:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self._busy: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-intake")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def refused(self, record_id: str, sender: str, exc: Exception) -> None:
        from ..node import now_ms
        log.warning("record %s from %s refused: %s", record_id, sender, exc)
        await self.node.store.call(records.log, at=now_ms(), event="refused", record=record_id, peer=sender,
                                   detail=str(exc)[:200])

    async def check_head(self, head_raw: bytes, *, record_id: str, sender: str) -> tuple[Head, bytes]:
        """Signature first; then: this record, from this sender, for us. Refusals are logged."""
        try:
            head = Head.from_wire(head_raw)
            if head.header.id_hex != record_id or head.header.sender_id != sender:
                raise InvalidEnvelope()
            return head, head.content_key(self.node.identity)
        except (InvalidEnvelope, RemoteProtocolError) as exc:
            await self.refused(record_id, sender, exc)
            raise

    def have(self, record_id: str) -> int:
        try:
            return self.node.blobs.incoming_path(record_id).stat().st_size
        except FileNotFoundError:             # none, or just moved into place
            return 0

    async def stream(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                     seq: int | None) -> Outcome:
        """Receive a body from `offset` on; commit it when complete."""
        from ..node import now_ms
        node, rid = self.node, head.header.id_hex
        stored = await node.store.call(records.stored_from, rid)
        if stored is not None:
            if stored != (sender, head.raw):
                exc = InvalidEnvelope()          # another record already holds this ID
                await self.refused(rid, sender, exc)
                raise exc
            stored, ack = await node.store.call(records.insert_received, [self._row(head, None, seq, None)],
                                                sender=sender, now=now_ms()) if seq else ([False], None)
            return Outcome("duplicate", ack=ack)
        if rid in self._busy:
            return Outcome("busy")
        self._busy.add(rid)
        try:
            with _exclusive(node.blobs.incoming_path(rid)) as mine:
                if not mine:                   # another process (cabinet run, or a command) is on it
                    return Outcome("busy")
                return await self._receive(sender, head, key, offset, body, seq)
        finally:
            self._busy.discard(rid)

    async def _receive(self, sender: str, head: Head, key: bytes, offset: int, body: AsyncIterator[bytes],
                       seq: int | None) -> Outcome:
        from ..node import now_ms
        node, h, rid = self.node, head.header, head.header.id_hex
        have = self.have(rid)
        if offset != have:
            return Outcome("offset", have=have)
        free = await asyncio.to_thread(lambda: shutil.disk_usage(node.folder).free)
        if free < (h.body_size - have) + DISK_MARGIN:
            exc = StoreError("not enough disk space for this record; try again later")
            await self.refused(rid, sender, exc)
            raise exc
        inbound = await self._run(blobstore.Inbound, node.blobs.incoming_path(rid), h, key)
        try:
            await self._pump(inbound, body)
            log.info("record %s: %d body bytes received from offset %d", rid, inbound.size - have, have)
        except (InvalidEnvelope, StoreError) as exc:
            await self._discard(inbound, rid, sender, exc)
            raise
        except BaseException:
            # The other side went away mid-transfer: keep what arrived, for resuming.
            await asyncio.shield(self._run(inbound.close))
            log.info("record %s: %d body bytes received from offset %d", rid, inbound.size - have, have)
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
        inline = await self._run(self._place, inbound.path, rid, h.body_size)
        row = self._row(head, manifest, seq, inline)
        new, ack = await node.store.call(records.insert_received, [row], sender=sender, now=now_ms())
        if new[0] is None:                        # another record took this ID meanwhile
            await self.refused(rid, sender, InvalidEnvelope())
            raise InvalidEnvelope()
        log.info("record %s received from %s (%d bytes)", rid, sender, h.body_size)
        return Outcome("stored", ack=ack)

    def _place(self, path, record_id: str, size: int) -> bytes | None:
        """Small bodies go into SQLite with their row; large ones into blobs/, durably, first."""
        if size <= blobstore.INLINE_MAX:
            data = path.read_bytes()
            path.unlink()
            return data
        self.node.blobs.commit(path, record_id)
        return None

    async def small(self, sender: str, items: list[tuple[int | None, bytes, bytes]]) -> tuple[dict[str, str], Ack]:
        """Verify and commit a batch of small records (seq, head, body) in one transaction."""
        from ..node import now_ms
        checked = await self._run(self._verify_all, sender, items)
        rows = [row for row in checked if isinstance(row, dict)]
        results = {}
        for item, row in zip(items, checked):
            if isinstance(row, Exception):
                rid = _peek_id(item[1])
                results[rid] = "refused"
                await self.refused(rid, sender, row)
        stored, ack = await self.node.store.call(records.insert_received, rows, sender=sender, now=now_ms())
        for row, new in zip(rows, stored):
            results[row["id"]] = "stored" if new else "duplicate" if new is False else "refused"
            if new is None:
                await self.refused(row["id"], sender, InvalidEnvelope())
        return results, ack

    def _verify_all(self, sender: str, items) -> list[dict | Exception]:
        out: list[dict | Exception] = []
        for seq, head_raw, body in items:
            try:
                header, manifest, _ = open_bytes(head_raw, body, self.node.identity)
                if header.sender_id != sender or len(body) > blobstore.INLINE_MAX:
                    raise InvalidEnvelope()
                out.append(self._row(Head(header, head_raw), manifest, seq, body))
            except (InvalidEnvelope, ProtocolError) as exc:
                out.append(exc)
        return out

    def _row(self, head: Head, manifest, seq: int | None, body: bytes | None) -> dict:
        if manifest is None:       # only used for duplicates, where just id/sender/head/seq matter
            return {"id": head.header.id_hex, "direction": "in", "sender": head.header.sender_id, "seq": seq,
                    "head": head.raw}
        row = self.node._record_row(head.header, head.raw, manifest, "in")
        return dict(row, seq=seq, body=body)

    async def _discard(self, inbound, rid: str, sender: str, exc: Exception) -> None:
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
