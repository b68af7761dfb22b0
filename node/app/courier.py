"""Moving records out and in: the Courier pushes, the Puller pulls.

Part of the wiring layer. Either alone is enough: a node that cannot accept
connections still receives by pulling, and a node nobody can reach still
delivers by pushing. Each recipient's stream is independent; within one,
records go in sequence order, small ones many to a request.

Retries back off with jitter (node/sync/outbox.py) and the schedule is kept in
the outbox table, so it survives restarts. A delivery pending for days is
reported in `cabinet outbox` and the log, never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, AsyncIterator

from ..core.errors import CabinetError, InvalidEnvelope, InvalidSignature, RemoteProtocolError, TransportError
from .intake import ack_from_wire, ack_wire, check_receipt
from ..store import blobs as blobstore
from ..store import records
from ..sync import outbox
from ..sync.stream import Batch, Offer, RecipientStream, SenderStream
from ..transport.client import Peer

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("cabinet.courier")
MAX_BATCH_ITEMS = 500
MAX_BATCH_BYTES = 8 << 20
HEAD_ALLOWANCE = 4096            # an envelope head with its key slots, rounded up
PULL_INTERVAL = 30.0
FAILURES = (TransportError, InvalidSignature, RemoteProtocolError, InvalidEnvelope)


def _now() -> int:
    from ..node import now_ms
    return now_ms()


class _Loop:
    """A background task that runs `round()` now, then whenever woken or its delay passes."""

    def __init__(self, name: str, round_fn) -> None:
        self._name, self._round = name, round_fn
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

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

    async def _run(self) -> None:
        while True:
            try:
                delay = await self._round()
            except CabinetError as exc:
                log.error("%s: %s", self._name, exc)
                delay = 5.0
            except Exception:   # a bug: log it, keep the node running, try again later
                log.exception("%s: unexpected error", self._name)
                delay = 30.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass


class Courier(_Loop):
    """The sender's side: delivers due outbox entries."""

    def __init__(self, node: "Node") -> None:
        super().__init__("cabinet-courier", self.round)
        self.node = node
        self._rng = random.Random()
        self._active: set[str] = set()        # recipients with a stream in progress

    async def round(self) -> float:
        await self.run_due()
        nxt = await self.node.store.call(records.next_due)
        return 5.0 if nxt is None else min(5.0, max(0.05, (nxt - _now()) / 1000))

    async def run_due(self) -> int:
        due = await self.node.store.call(records.due, _now())
        by_recipient: dict[str, list[dict]] = {}
        for d in due:
            by_recipient.setdefault(d["recipient"], []).append(d)
        results = await asyncio.gather(*(self._stream(rcpt, rows) for rcpt, rows in by_recipient.items()),
                                       return_exceptions=True)
        for r in results:                     # one recipient's trouble never stops the others
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
            if isinstance(r, Exception):
                log.error("outbox: %s", r)
        await self._flush_receipts()
        return len(due)

    async def deliver_record(self, record_id: str) -> dict[str, str]:
        """Try every recipient of one record now; returns why, for those still queued."""
        rows = [d for d in await self.node.store.call(records.deliveries, record_id) if d["state"] != "delivered"]
        errors: dict[str, str] = {}

        async def one(d: dict) -> None:
            err = await self._stream(d["recipient"], [d])
            if err:
                errors[d["recipient"]] = err

        await asyncio.gather(*(one(d) for d in rows))
        return errors

    async def _stream(self, recipient: str, rows: list[dict]) -> str | None:
        """Deliver rows (in seq order) to one recipient; stop at the first failure."""
        if recipient in self._active:
            return None
        self._active.add(recipient)
        try:
            contact = await self.node.store.call(records.contact_by_id, recipient)
            why = ("recipient is no longer a contact" if contact is None else
                   "this colleague's keys were revoked: nothing is sent" if contact["revoked"] else
                   "held: this colleague's identity key changed; check it and run 'cabinet contact confirm'"
                   if contact["held"] else None)
            if why:
                await self._failed(recipient, rows, why)
                return why
            peer = self.node.peer(contact)
            for unit in _units(rows):
                try:
                    if len(unit) == 1 and unit[0]["body_size"] > blobstore.INLINE_MAX:
                        await self._push_large(peer, contact, unit[0])
                    else:
                        await self._push_small(peer, contact, unit)
                except FAILURES as exc:
                    await self._failed(recipient, [d for d in rows if d["seq"] >= unit[0]["seq"]], str(exc))
                    return str(exc)
            return None
        finally:
            self._active.discard(recipient)

    async def _push_small(self, peer: Peer, contact: dict, unit: list[dict]) -> None:
        store = self.node.store
        rows = await store.call(records.outgoing, peer.node_id, [d["seq"] for d in unit])
        answer = await self.node.client.push_batch(peer, [(r["seq"], r["head"], r["body"]) for r in rows])
        receipts = answer.get("receipts") if isinstance(answer.get("receipts"), dict) else {}
        by_id = {r["id"]: r["seq"] for r in rows}
        checked = {}
        for rid, raw in receipts.items():
            if rid in by_id and isinstance(raw, bytes):
                check_receipt(raw, contact["sign_key"], rid)
                checked[by_id[rid]] = raw
        await self._retire(peer.node_id, answer.get("ack"), checked)
        refused = [rid for rid, r in (answer.get("results") or {}).items() if r == "refused"]
        if refused:
            raise RemoteProtocolError(f"{len(refused)} record(s) refused by the recipient")

    async def _push_large(self, peer: Peer, contact: dict, d: dict) -> None:
        store, rid = self.node.store, d["record_id"]
        row = await store.call(records.get_record, rid)
        await store.call(records.update_delivery, rid, peer.node_id, now=_now(),
                         state=outbox.transition(d["state"], outbox.ATTEMPT_STARTED))
        progress = _Progress(self.node, rid, peer.node_id)
        answer = await self.node.client.push_record(peer, rid, row["head"], row["body_size"],
                                                    lambda off: self._read(rid, off), progress, seq=d["seq"])
        receipt = answer.get("receipt")
        if isinstance(receipt, bytes):
            check_receipt(receipt, contact["sign_key"], rid)
        await self._retire(peer.node_id, answer.get("ack"), {d["seq"]: receipt} if isinstance(receipt, bytes) else {},
                           also=[d["seq"]])

    async def _retire(self, recipient: str, ack_raw, receipts: dict[int, bytes], also: list[int] = ()) -> None:
        store = self.node.store
        pending = await store.call(records.pending_for, recipient)
        seqs = set(also) | set(receipts)
        if ack_raw is not None:
            seqs |= set(SenderStream(pending, await store.call(records.last_seq, recipient))
                        .on_ack(ack_from_wire(ack_raw)).seqs)
        done = await store.call(records.retire, recipient, sorted(seqs), now=_now(), receipts=receipts)
        if done:
            log.info("%d record(s) delivered to %s", len(done), recipient)

    async def _failed(self, recipient: str, rows: list[dict], why: str) -> None:
        still = await self.node.store.call(records.pending_for, recipient)
        rows = [d for d in rows if d["seq"] in still]     # some may have been delivered meanwhile
        for d in rows:
            state = outbox.SENDING if d["body_size"] > blobstore.INLINE_MAX else outbox.QUEUED
            f = outbox.after_failure(state=state, attempts=d["attempts"], queued_at=d["created"],
                                     now=_now(), jitter=self._rng.random())
            fields = dict(state=f.state, attempts=f.attempts, next_try=f.next_try, last_error=why[:300])
            if f.stale and not d.get("stale"):
                fields["stale"] = 1
                log.warning("record %s to %s: not delivered for %d days; still trying", d["record_id"], recipient,
                            (_now() - d["created"]) // 86_400_000)
            await self.node.store.call(records.update_delivery, d["record_id"], recipient, now=_now(),
                                       unless_delivered=True, **fields)
        log.info("%d record(s) to %s still queued: %s", len(rows), recipient, why)

    async def _flush_receipts(self) -> None:
        due = await self.node.store.call(records.receipts_due)
        by_node: dict[str, list[dict]] = {}
        for r in due:
            by_node.setdefault(r["to_node"], []).append(r)
        for node_id, rows in by_node.items():
            await send_receipts(self.node, node_id, rows)

    async def _read(self, record_id: str, offset: int) -> AsyncIterator[bytes]:
        it = blobstore.iter_source(self.node.blobs.path(record_id), offset)
        while (piece := await asyncio.to_thread(next, it, None)) is not None:
            yield piece


async def send_receipts(node: "Node", node_id: str, rows: list[dict] | None = None) -> None:
    rows = rows if rows is not None else await node.store.call(records.receipts_due, node_id)
    contact = await node.store.call(records.contact_by_id, node_id)
    if not rows or contact is None:
        return
    try:
        await node.client.send_receipts(node.peer(contact), [r["receipt"] for r in rows])
    except FAILURES as exc:
        log.info("receipts to %s not sent yet: %s", node_id, exc)
        return
    await node.store.call(records.receipts_sent, [(r["record_id"], r["to_node"], r["status"]) for r in rows], _now())


class _Progress:
    """Records bytes sent for `cabinet outbox`, at most once a second."""

    def __init__(self, node: "Node", record_id: str, recipient: str) -> None:
        self.node, self.record_id, self.recipient = node, record_id, recipient
        self._last = 0.0

    def __call__(self, sent: int) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            asyncio.ensure_future(self.node.store.call(records.update_delivery, self.record_id, self.recipient,
                                                       now=_now(), sent_bytes=sent))


def _units(rows: list[dict]) -> list[list[dict]]:
    """Group a stream's rows: runs of small records into batches, each large one alone."""
    units: list[list[dict]] = []
    run: list[dict] = []
    size = 0
    for d in rows:
        if d["body_size"] > blobstore.INLINE_MAX:
            if run:
                units.append(run)
                run, size = [], 0
            units.append([d])
            continue
        weight = d["body_size"] + HEAD_ALLOWANCE
        if run and (len(run) >= MAX_BATCH_ITEMS or size + weight > MAX_BATCH_BYTES):
            units.append(run)
            run, size = [], 0
        run.append(d)
        size += weight
    if run:
        units.append(run)
    return units


class Puller(_Loop):
    """The recipient's side: asks each contact "anything for me since N?"."""

    def __init__(self, node: "Node", interval: float = PULL_INTERVAL) -> None:
        super().__init__("cabinet-puller", self.round)
        self.node = node
        self.interval = interval
        self._rng = random.Random()
        self._backoff: dict[str, tuple[int, float]] = {}      # node ID -> (failures, not before)
        self._soon: set[str] = set()
        self._active: set[str] = set()

    def soon(self, node_id: str) -> None:
        self._soon.add(node_id)
        self.wake()

    async def round(self) -> float:
        contacts = await self.node.store.call(records.list_contacts)
        now = time.monotonic()
        todo = [c for c in contacts if c["node_id"] in self._soon or self._backoff.get(c["node_id"], (0, 0))[1] <= now]
        self._soon.clear()
        for r in await asyncio.gather(*(self._pull_guarded(c) for c in todo), return_exceptions=True):
            if isinstance(r, Exception):
                log.error("pull: %s", r)
        return self.interval

    async def _pull_guarded(self, contact: dict) -> None:
        node_id = contact["node_id"]
        try:
            await self.pull_from(contact)
            self._backoff.pop(node_id, None)
        except FAILURES as exc:
            failures = self._backoff.get(node_id, (0, 0))[0] + 1
            delay = outbox.retry_delay(failures, self._rng.random()) / 1000
            self._backoff[node_id] = (failures, time.monotonic() + max(delay, self.interval))
            log.info("pull from %s failed (%s); next try in %.0f s", node_id, exc, max(delay, self.interval))

    async def pull_from(self, contact: dict) -> int:
        """Fetch everything `contact` has queued for us; returns how many records were new.

        While one batch is verified and committed, the next is already being
        fetched (asked with after=its last seq, so nothing is listed twice).
        """
        node_id = contact["node_id"]
        if node_id in self._active:
            return 0
        self._active.add(node_id)
        fetch: asyncio.Future | None = None
        try:
            await send_receipts(self.node, node_id)
            peer, total = self.node.peer(contact), 0
            start = await self.node.store.call(records.stream_in, node_id)
            after = start.upto
            fetch = asyncio.ensure_future(self.node.client.fetch_outbox(peer, start.upto, MAX_BATCH_ITEMS, after))
            while fetch is not None:
                answer, asked_after = await fetch, after
                fetch = None
                items = _batch_items(answer)
                if len(items) >= MAX_BATCH_ITEMS:
                    after = items[-1]["seq"]
                    fetch = asyncio.ensure_future(
                        self.node.client.fetch_outbox(peer, start.upto, MAX_BATCH_ITEMS, after))
                total += await self._take(peer, answer, items, asked_after)
            final = await self.node.store.call(records.stream_in, node_id)
            await self.node.client.send_ack(peer, ack_wire(final))
            if total:
                log.info("pulled %d record(s) from %s", total, node_id)
            return total
        finally:
            if fetch is not None:
                fetch.cancel()
            self._active.discard(node_id)

    async def _take(self, peer: Peer, answer: dict, items: list[dict], asked_after: int) -> int:
        """Commit what one outbox answer lists and we do not have yet."""
        node, sender = self.node, peer.node_id
        ack = await node.store.call(records.stream_in, sender)
        prev, last = answer.get("prev"), answer.get("last")
        if not isinstance(prev, int) or not isinstance(last, int):
            raise RemoteProtocolError("outbox answer: prev and last must be integers")
        batch = Batch(prev=prev, last=last, items=tuple(Offer(seq=i["seq"], record_id=i["id"]) for i in items))
        wanted = {f.offer.seq for f in RecipientStream(ack.upto, set(ack.have)).on_batch(batch, after=asked_after)}
        small = [(i["seq"], i["head"], i["body"]) for i in items if i["seq"] in wanted and i["body"] is not None]
        new = 0
        if small:
            results, _ = await node.intake.small(sender, small)
            new += sum(r == "stored" for r in results.values())
        for i in items:
            if i["seq"] in wanted and i["body"] is None:
                try:
                    new += await self._download(peer, i)
                except (InvalidEnvelope, RemoteProtocolError) as exc:
                    # Refused (and logged) by the intake: go on with the others.
                    log.warning("record %s from %s not taken: %s", i["id"], sender, exc)
        return new

    async def _download(self, peer: Peer, item: dict) -> int:
        intake = self.node.intake
        head, key = await intake.check_head(item["head"], record_id=item["id"], sender=peer.node_id)
        offset = intake.have(item["id"])
        out = await intake.stream(peer.node_id, head, key, offset,
                                  self.node.client.download_body(peer, item["id"], offset), item["seq"])
        return 1 if out.status == "stored" else 0


def _batch_items(answer: dict) -> list[dict]:
    items = answer.get("items")
    if not isinstance(items, list):
        raise RemoteProtocolError("outbox answer: expected a list of items")
    ok = []
    for i in items:
        if not (isinstance(i, dict) and isinstance(i.get("seq"), int) and isinstance(i.get("id"), str)
                and isinstance(i.get("head"), bytes) and isinstance(i.get("size"), int)
                and (i.get("body") is None or isinstance(i.get("body"), bytes))):
            raise RemoteProtocolError("outbox answer: malformed item")
        ok.append(i)
    return ok
