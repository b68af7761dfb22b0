"""Moving records between nodes: the sender's Courier and the recipient's Receiver.

Part of the wiring layer with node.py (it uses both the store and the
transport). The rules themselves (states, backoff) are in node/sync/outbox.py.

Receiver: verify the head (signature first), check the caller is the sender
and that the record is for us, stream the body into incoming/ while hashing
and decrypting it, and only when every check passed move it into blobs/ and
commit the row; then answer with a signed receipt. A crash at any point leaves
either nothing or a resumable partial, never a half record in the inbox.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, AsyncIterator

from . import crypto, wire
from .envelope import Head
from .errors import CabinetError, InvalidEnvelope, InvalidSignature, RemoteProtocolError, StoreError, TransportError
from .identity import Descriptor
from .store import blobs as blobstore
from .store import records
from .sync import outbox
from .transport.client import Peer
from .transport.server import Answer

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("cabinet.delivery")
WRITE_BATCH = 1 << 20
DRAIN_LIMIT = 1 << 20


def _now() -> int:
    from .node import now_ms
    return now_ms()


def make_receipt(node: "Node", record_id: str, status: str, at: int) -> bytes:
    body = wire.pack({"record": bytes.fromhex(record_id), "by": node.identity.sign_public, "status": status, "at": at})
    return wire.pack({"body": body, "sig": node.identity.sign("receipt", body)})


def check_receipt(raw: bytes, record_id: str, sign_key: bytes) -> dict:
    outer = wire.unpack(raw, max_size=4096, what="receipt")
    body_raw = wire.field(outer, "body", bytes, what="receipt")
    crypto.verify(sign_key, "receipt", body_raw, wire.field(outer, "sig", bytes, what="receipt", size=64))
    body = wire.unpack(body_raw, max_size=4096, what="receipt")
    if wire.field(body, "record", bytes, what="receipt") != bytes.fromhex(record_id):
        raise InvalidSignature("receipt is for another record")
    return body


class Receiver:
    """What the server calls (the transport's Handler)."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.identity = node.identity
        self._busy: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-recv")

    def descriptor_bytes(self) -> bytes:
        return self.node.descriptor.signed

    async def sign_key_for(self, node_id: str) -> bytes | None:
        row = await self.node.store.call(records.contact_by_id, node_id)
        return row["sign_key"] if row else None

    async def record_status(self, caller: str, record_id: str) -> Answer:
        if await self.node.store.call(records.has_record, record_id):
            return Answer(200, {"stored": True, "have": -1})
        path = self.node.blobs.incoming_path(record_id)
        return Answer(200, {"stored": False, "have": path.stat().st_size if path.exists() else 0})

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int,
                             body: AsyncIterator[bytes]) -> Answer:
        node = self.node
        try:
            head = Head.from_wire(head_raw)
            h = head.header
            if h.id_hex != record_id or h.sender_id != caller:
                raise InvalidEnvelope()
            key = head.content_key(self.identity)
        except (InvalidEnvelope, RemoteProtocolError) as exc:
            await self._refused(record_id, caller, exc)
            raise
        if await node.store.call(records.has_record, record_id):
            await _drain(body, DRAIN_LIMIT)
            return Answer(200, {"status": "duplicate", "receipt": make_receipt(node, record_id, "delivered", _now())})
        if record_id in self._busy:
            return Answer(503, {"error": "this record is already being received"})
        self._busy.add(record_id)
        try:
            return await self._receive(caller, record_id, head, key, offset, body)
        finally:
            self._busy.discard(record_id)

    async def _receive(self, caller, record_id, head, key, offset, body) -> Answer:
        node, h = self.node, head.header
        path = node.blobs.incoming_path(record_id)
        have = path.stat().st_size if path.exists() else 0
        if offset != have:
            await _drain(body, DRAIN_LIMIT)
            return Answer(409, {"have": have})
        free = await asyncio.to_thread(lambda: shutil.disk_usage(node.folder).free)
        if free < (h.body_size - have) + (64 << 20):
            await _drain(body, DRAIN_LIMIT)
            raise StoreError("not enough disk space for this record; try again later")
        loop = asyncio.get_running_loop()
        try:
            inbound = await loop.run_in_executor(self._pool, blobstore.Inbound, path, h, key)
        except InvalidEnvelope as exc:
            await self._refused(record_id, caller, exc)
            raise
        try:
            await self._pump(inbound, body)
        except (InvalidEnvelope, StoreError) as exc:
            await loop.run_in_executor(self._pool, inbound.close)
            path.unlink(missing_ok=True)
            await self._refused(record_id, caller, exc)
            raise
        except BaseException as exc:
            # The sender went away mid-transfer: keep what arrived, for resuming.
            await asyncio.shield(loop.run_in_executor(self._pool, inbound.close))
            log.info("record %s: transfer interrupted at %d of %d bytes", record_id, inbound.size, h.body_size)
            if isinstance(exc, (ConnectionError, OSError)) or type(exc).__module__.startswith("aiohttp"):
                raise RemoteProtocolError("transfer interrupted") from None
            raise
        if not inbound.complete:
            await loop.run_in_executor(self._pool, inbound.close)
            return Answer(409, {"have": inbound.size})
        try:
            manifest = await loop.run_in_executor(self._pool, inbound.finish)
        except InvalidEnvelope as exc:
            path.unlink(missing_ok=True)
            await self._refused(record_id, caller, exc)
            raise
        await loop.run_in_executor(self._pool, node.blobs.commit, path, record_id)
        row = node._record_row(h, head.raw, manifest, "in")
        await node.store.call(records.insert_record, row, now=_now(), event="received", peer=caller)
        log.info("record %s received from %s (%d bytes)", record_id, caller, h.body_size)
        return Answer(200, {"status": "stored", "receipt": make_receipt(node, record_id, "delivered", _now())})

    async def _pump(self, inbound: blobstore.Inbound, body: AsyncIterator[bytes]) -> None:
        """Read from the network while the previous batch is written, hashed and decrypted."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Future | None = None
        buf: list[bytes] = []
        size = 0
        async for piece in body:
            buf.append(piece)
            size += len(piece)
            if size >= WRITE_BATCH:
                if pending:
                    await pending
                pending = loop.run_in_executor(self._pool, inbound.write, b"".join(buf))
                buf, size = [], 0
        if pending:
            await pending
        if buf:
            await loop.run_in_executor(self._pool, inbound.write, b"".join(buf))

    async def _refused(self, record_id: str, caller: str, exc: Exception) -> None:
        log.warning("record %s from %s refused: %s", record_id, caller, exc)
        await self.node.store.call(records.log, at=_now(), event="refused", record=record_id, peer=caller,
                                   detail=str(exc)[:200])


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for piece in body:
        seen += len(piece)
        if seen > limit:
            return


class Courier:
    """The sender's side: delivers due outbox entries, one stream per recipient."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random()
        self._active: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cabinet-courier")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
                nxt = await self.node.store.call(records.next_due)
            except CabinetError as exc:
                log.error("outbox: %s", exc)
                nxt = None
            delay = 5.0 if nxt is None else min(5.0, max(0.05, (nxt - _now()) / 1000))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def run_due(self) -> int:
        due = await self.node.store.call(records.due, _now())
        by_recipient: dict[str, list[dict]] = {}
        for d in due:
            by_recipient.setdefault(d["recipient"], []).append(d)
        await asyncio.gather(*(self._stream(items) for items in by_recipient.values()))
        return len(due)

    async def _stream(self, items: list[dict]) -> None:
        for d in items:                      # in sequence order, one at a time per recipient
            ok = await self._attempt(d["record_id"], d["recipient"])
            if not ok:
                return                       # peer unreachable: leave the rest for the next round

    async def deliver_record(self, record_id: str) -> dict[str, str]:
        """Try every recipient of one record now, in parallel; returns errors by recipient."""
        rows = await self.node.store.call(records.deliveries, record_id)
        errors: dict[str, str] = {}

        async def one(d: dict) -> None:
            if d["state"] != outbox.DELIVERED:
                err = await self._attempt(record_id, d["recipient"], report=True)
                if isinstance(err, str):
                    errors[d["recipient"]] = err

        await asyncio.gather(*(one(d) for d in rows))
        return errors

    async def _attempt(self, record_id: str, recipient: str, report: bool = False) -> bool | str:
        key = (record_id, recipient)
        if key in self._active:
            return True
        self._active.add(key)
        try:
            return await self._push(record_id, recipient, report)
        finally:
            self._active.discard(key)

    async def _push(self, record_id: str, recipient: str, report: bool) -> bool | str:
        node = self.node
        store = node.store
        row = await store.call(records.get_record, record_id)
        contact = await store.call(records.contact_by_id, recipient)
        d = (await store.call(records.deliveries, record_id))
        d = next(x for x in d if x["recipient"] == recipient)
        if contact is None:
            return await self._failed(d, "recipient is no longer a contact", report)
        desc = Descriptor.from_wire(contact["descriptor"])
        peer = Peer(recipient, contact["sign_key"], desc.addresses)
        await store.call(records.update_delivery, record_id, recipient, now=_now(),
                         state=outbox.transition(d["state"], outbox.ATTEMPT_STARTED))
        sent = {"bytes": 0}
        try:
            answer = await node.client.push_record(peer, record_id, row["head"], row["body_size"],
                                                   lambda off: self._read(record_id, off),
                                                   lambda n: sent.__setitem__("bytes", n))
            receipt = answer.get("receipt")
            if isinstance(receipt, bytes):
                check_receipt(receipt, record_id, contact["sign_key"])
        except (TransportError, InvalidSignature, RemoteProtocolError) as exc:
            return await self._failed(d, str(exc), report, sent["bytes"])
        await store.call(records.update_delivery, record_id, recipient, now=_now(), event="delivered",
                         state=outbox.transition(outbox.SENDING, outbox.RECORD_ACKED), delivered=_now(),
                         receipt=receipt if isinstance(receipt, bytes) else None, sent_bytes=row["body_size"],
                         last_error=None)
        log.info("record %s delivered to %s", record_id, recipient)
        return True

    async def _failed(self, d: dict, why: str, report: bool, sent: int = 0) -> bool | str:
        f = outbox.after_failure(state=outbox.SENDING, attempts=d["attempts"], queued_at=d["created"],
                                 now=_now(), jitter=self._rng.random())
        await self.node.store.call(records.update_delivery, d["record_id"], d["recipient"], now=_now(),
                                   state=f.state, attempts=f.attempts, next_try=f.next_try, last_error=why[:300],
                                   sent_bytes=max(sent, d["sent_bytes"]))
        log.warning("record %s to %s still queued (attempt %d): %s", d["record_id"], d["recipient"], f.attempts, why)
        return why if report else False

    async def _read(self, record_id: str, offset: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        fh = await loop.run_in_executor(None, open, self.node.blobs.path(record_id), "rb")
        try:
            await loop.run_in_executor(None, fh.seek, offset)
            while piece := await loop.run_in_executor(None, fh.read, blobstore.READ_SIZE):
                yield piece
        finally:
            fh.close()
