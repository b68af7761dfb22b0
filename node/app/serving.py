"""The delivery endpoints: what a node answers about records (push, pull, acks, receipts).

`DeliveryEndpoints` implements the delivery part of the transport's Handler
protocol (node/transport/server.py); node/app/handler.py composes it with the
patient and descriptor endpoints. Each method is one request: it decodes the
message (node/sync/messages.py), hands it to the intake or to the courier's
sender session for the caller, and encodes the answer. CPU-heavy work
(signing up to 500 receipts) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable

from ..core.errors import CabinetError, NotFound, RemoteProtocolError
from ..core.identity import Identity
from ..store import blobs as blobstore
from ..store import records
from ..sync.messages import (DUPLICATE, MAX_INLINE_ANSWER, REFUSED, STORED, Ack, Batch, BatchItem, PushAnswer,
                             PushBatch, PushItem, PutAnswer, Receipt, Want)
from ..transport.server import Answer
from .courier import Courier, Puller
from .events import RecordOpened
from .intake import Intake, Interrupted, RecordRefused
from .ports import Ports

log = logging.getLogger("cabinet.serving")
DRAIN_LIMIT = 1 << 20
SignKeyFor = Callable[[str], Awaitable[bytes | None]]


async def _drain(body: AsyncIterator[bytes], limit: int) -> None:
    seen = 0
    async for piece in body:
        seen += len(piece)
        if seen > limit:
            return


def _sign_all(identity: Identity, record_ids: list[str], status: str, at: int) -> dict[str, bytes]:
    return {rid: Receipt.make(identity, rid, status, at) for rid in record_ids}


class DeliveryEndpoints:
    def __init__(self, ports: Ports, intake: Intake, puller: Puller, courier: Courier,
                 sign_key_for: SignKeyFor) -> None:
        self.ports, self.intake, self.puller, self.courier = ports, intake, puller, courier
        self.sign_key_for = sign_key_for

    # --- records pushed to us ---------------------------------------------------

    async def record_status(self, caller: str, record_id: str) -> Answer:
        if await self.ports.store.call(records.stored_from, record_id, caller) is not None:
            return Answer(200, {"stored": True, "have": -1})
        return Answer(200, {"stored": False, "have": self.intake.have(record_id, caller)})

    async def receive_record(self, caller: str, record_id: str, head_raw: bytes, offset: int, seq: int | None,
                             body: AsyncIterator[bytes]) -> Answer:
        intake = self.intake
        try:
            reason = await intake.refusal_of(caller, seq)
            if reason is not None:                 # refused before: the same answer again
                raise RecordRefused(reason, (await intake.session(caller)).ack())
            head, key = await intake.check_head(head_raw, record_id=record_id, sender=caller, seq=seq)
            out = await intake.stream(caller, head, key, offset, body, seq)
        except Interrupted as exc:                  # logged by the intake; the caller is gone anyway
            return Answer(400, {"error": str(exc)})
        except RecordRefused as exc:
            if seq is None:
                raise                               # no place in a stream: a plain refusal (422)
            await _drain(body, DRAIN_LIMIT)
            return Answer(200, PutAnswer(status=REFUSED, ack=exc.ack, reason=exc.code).to_wire())
        if out.status in (STORED, DUPLICATE):
            if out.status == DUPLICATE:
                await _drain(body, DRAIN_LIMIT)
            self._after_commit(caller, out)
            receipt = Receipt.make(self.ports.identity, record_id, "delivered", self.ports.clock())
            return Answer(200, PutAnswer(status=out.status, receipt=receipt, ack=out.ack).to_wire())
        if out.status == "busy":
            return Answer(503, {"error": "this record is already being received"})
        await _drain(body, DRAIN_LIMIT)
        return Answer(409, {"have": out.have})

    async def receive_batch(self, caller: str, items: dict | list) -> Answer:
        """`items`: the request as a dict ({"items": [...]}) or, from today's server, (seq, head, body) tuples."""
        batch = (PushBatch.from_wire(items) if isinstance(items, dict) else
                 PushBatch(items=tuple(PushItem(seq=s, head=h, body=b) for s, h, b in items)))
        out = await self.intake.small(caller, list(batch.items))
        done = [rid for rid, r in out.results.items() if r in (STORED, DUPLICATE)]
        receipts = await asyncio.to_thread(_sign_all, self.ports.identity, done, "delivered", self.ports.clock())
        self._after_commit(caller, out)
        answer = PushAnswer(results=out.results, receipts=receipts, ack=out.ack, reasons=out.reasons)
        return Answer(200, answer.to_wire())

    def _after_commit(self, sender: str, out) -> None:
        # Records above a gap: ask the sender for what is missing now, not at its next retry.
        if out.gap:
            self.puller.soon(sender)

    # --- our outbox, pulled by its recipients -------------------------------------

    async def outbox_for(self, caller: str, since: int, limit: int, after: int = 0) -> Answer:
        want = Want.from_wire({"since": since, "after": after})
        listing = await self.courier.on_want(caller, want, limit)
        rows = await self.ports.store.call(records.outgoing, caller, [o.seq for o in listing.offers])
        items, inline = [], 0
        for row in rows:
            body = row["body"]
            if body is not None and inline + len(body) <= MAX_INLINE_ANSWER:
                inline += len(body)
            else:
                body = None       # too much for one answer: the caller downloads it separately
            items.append(BatchItem(seq=row["seq"], record_id=row["id"], head=row["head"], size=row["body_size"],
                                   body=body))
        return Answer(200, Batch(prev=listing.prev, last=listing.last, items=tuple(items),
                                  void=listing.void).to_wire())

    async def body_for(self, caller: str, record_id: str, offset: int) -> tuple[int, AsyncIterator[bytes]]:
        store = self.ports.store
        if not await store.call(records.is_recipient, record_id, caller):
            raise NotFound("no such record for you")
        row = await store.call(records.get_record, record_id, None, "out")
        if offset > row["body_size"]:
            raise RemoteProtocolError("offset beyond the end of the record")
        source = row["body"] if row["body"] is not None else self.ports.blobs.path(record_id)
        return row["body_size"], _read_async(source, offset)

    async def receive_ack(self, caller: str, msg: dict) -> Answer:
        return Answer(200, {"retired": await self.courier.on_ack(caller, Ack.from_wire(msg))})

    async def receive_receipts(self, caller: str, receipts: list[bytes]) -> Answer:
        key = await self.sign_key_for(caller)
        accepted = 0
        for raw in receipts:
            try:
                r = Receipt.verify(raw, key or b"")
            except CabinetError as exc:
                log.warning("receipt from %s refused: %s", caller, exc)
                continue
            if r.status == "opened" and await self.ports.store.call(
                    records.mark_opened_by, r.record_id, caller, at=r.at, receipt=raw, now=self.ports.clock()):
                accepted += 1
                self.ports.publish(RecordOpened(at=self.ports.clock(), record_id=r.record_id, how="receipt",
                                                by=caller))
        return Answer(200, {"accepted": accepted})


async def _read_async(source: blobstore.Source, offset: int) -> AsyncIterator[bytes]:
    it = blobstore.iter_source(source, offset)
    while True:
        piece = await asyncio.to_thread(next, it, None)
        if piece is None:
            return
        yield piece
