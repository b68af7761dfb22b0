"""What the node answers: the transport's Handler, backed by the store.

Part of the wiring layer. Each method is one request: it checks what only the
store can check (is the caller a recipient of this record?), calls the pure
stream logic in node/sync/stream.py, and carries out its effects.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator

from ..core.errors import AuthenticationFailed, CabinetError, NotFound, RemoteProtocolError
from ..core.identity import Descriptor
from .intake import ack_from_wire, ack_wire, check_receipt, make_receipt
from .patients import PatientEndpoints
from ..store import blobs as blobstore
from ..store import records
from ..sync.stream import SenderStream, Want
from ..transport.server import Answer

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("cabinet.serving")
DRAIN_LIMIT = 1 << 20
MAX_INLINE_ANSWER = 8 << 20


def _now() -> int:
    from ..node import now_ms
    return now_ms()


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for piece in body:
        seen += len(piece)
        if seen > limit:
            return


class NodeHandler(PatientEndpoints):
    def __init__(self, node: "Node") -> None:
        self.node = node

    @property
    def identity(self):
        return self.node.identity

    def descriptor_bytes(self) -> bytes:
        return self.node.descriptor.signed

    async def sign_key_for(self, node_id: str) -> bytes | None:
        row = await self.node.store.call(records.contact_by_id, node_id)
        # Revoked keys, and new keys not yet confirmed (held), are not let in: nothing is sent
        # to them, and nothing is taken from them.
        if row is not None and row["revoked"]:
            raise AuthenticationFailed("this key was revoked")
        if row is not None and row["held"]:
            raise AuthenticationFailed("not a confirmed contact: this practice has not confirmed your new key yet")
        return row["sign_key"] if row else None

    async def receive_descriptor(self, caller: str, raw: bytes) -> Answer:
        """A contact hands us its new descriptor (rotated key, new address, revocation)."""
        desc = Descriptor.from_wire(raw)
        if desc.node_id != caller:
            raise RemoteProtocolError("a node may only hand over its own descriptor")
        _, status = await self.node.learn_descriptor(desc)
        return Answer(200, {"status": status})

    # --- records pushed to us ---------------------------------------------------

    async def record_status(self, caller: str, record_id: str) -> Answer:
        stored = await self.node.store.call(records.stored_from, record_id)
        if stored is not None and stored[0] == caller:
            return Answer(200, {"stored": True, "have": -1})
        return Answer(200, {"stored": False, "have": self.node.intake.have(record_id)})

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int, seq: int | None,
                             body: AsyncIterator[bytes]) -> Answer:
        intake = self.node.intake
        head, key = await intake.check_head(head_raw, record_id=record_id, sender=caller)
        out = await intake.stream(caller, head, key, offset, body, seq)
        if out.status in ("stored", "duplicate"):
            if out.status == "duplicate":
                await _drain(body, DRAIN_LIMIT)
            self._after_commit(caller, out.ack)
            return Answer(200, {"status": out.status, "receipt": make_receipt(self.node, record_id, "delivered", _now()),
                                "ack": ack_wire(out.ack) if out.ack else None})
        if out.status == "busy":
            return Answer(503, {"error": "this record is already being received"})
        await _drain(body, DRAIN_LIMIT)
        return Answer(409, {"have": out.have})

    async def receive_batch(self, caller: str, items: list[tuple[int | None, bytes, bytes]]) -> Answer:
        results, ack = await self.node.intake.small(caller, items)
        receipts = {rid: make_receipt(self.node, rid, "delivered", _now())
                    for rid, r in results.items() if r in ("stored", "duplicate")}
        self._after_commit(caller, ack)
        return Answer(200, {"results": results, "receipts": receipts, "ack": ack_wire(ack)})

    def _after_commit(self, sender: str, ack) -> None:
        # Records above a gap: ask the sender for what is missing now, not at its next retry.
        if ack is not None and ack.have:
            self.node.puller.soon(sender)

    # --- our outbox, pulled by its recipients -------------------------------------

    async def outbox_for(self, caller: str, since: int, limit: int, after: int = 0) -> Answer:
        store = self.node.store
        pending = await store.call(records.pending_for, caller)
        stream = SenderStream(pending, await store.call(records.last_seq, caller))
        retired = sorted(s for s in pending if s <= since)
        batch = stream.on_want(Want(since=since, after=after), limit)
        if retired:   # the caller's cursor says it has these: they are delivered
            await store.call(records.retire, caller, retired, now=_now())
        rows = await store.call(records.outgoing, caller, [o.seq for o in batch.items])
        items, inline = [], 0
        for row in rows:
            body = row["body"]
            if body is not None and inline + len(body) <= MAX_INLINE_ANSWER:
                inline += len(body)
            else:
                body = None       # too much for one answer: the caller downloads it separately
            items.append({"seq": row["seq"], "id": row["id"], "head": row["head"], "size": row["body_size"],
                          "body": body})
        return Answer(200, {"prev": batch.prev, "last": batch.last, "items": items})

    async def body_for(self, caller: str, record_id: str, offset: int) -> tuple[int, AsyncIterator[bytes]]:
        store = self.node.store
        if not await store.call(records.is_recipient, record_id, caller):
            raise NotFound("no such record for you")
        row = await store.call(records.get_record, record_id)
        if offset > row["body_size"]:
            raise RemoteProtocolError("offset beyond the end of the record")
        source = row["body"] if row["body"] is not None else self.node.blobs.path(record_id)
        return row["body_size"], _read_async(source, offset)

    async def receive_ack(self, caller: str, msg: dict) -> Answer:
        ack = ack_from_wire(msg)
        store = self.node.store
        pending = await store.call(records.pending_for, caller)
        retire = SenderStream(pending, await store.call(records.last_seq, caller)).on_ack(ack)
        done = await store.call(records.retire, caller, list(retire.seqs), now=_now())
        return Answer(200, {"retired": len(done)})

    async def receive_receipts(self, caller: str, receipts: list[bytes]) -> Answer:
        key = await self.sign_key_for(caller)
        accepted = 0
        for raw in receipts:
            try:
                r = check_receipt(raw, key)
            except CabinetError as exc:
                log.warning("receipt from %s refused: %s", caller, exc)
                continue
            if r["status"] == "opened" and await self.node.store.call(
                    records.mark_opened_by, r["record"], caller, at=r["at"], receipt=raw, now=_now()):
                accepted += 1
        return Answer(200, {"accepted": accepted})


async def _read_async(source: blobstore.Source, offset: int) -> AsyncIterator[bytes]:
    it = blobstore.iter_source(source, offset)
    while True:
        piece = await asyncio.to_thread(next, it, None)
        if piece is None:
            return
        yield piece
