"""Moving records out and in: the Courier pushes, the Puller pulls.

Either alone is enough: a node that cannot accept connections still receives
by pulling, and a node nobody can reach still delivers by pushing. Each
recipient's stream is independent; within one, records go in sequence order,
small ones many to a request.

Both are thin drivers of the pure sessions (node/sync/session.py): they feed
a session what arrived and carry out the effects it returns. The Courier holds
one SenderSession per recipient for the node's life, loaded from the store
once and kept in step with it (other processes, such as `cabinet send`, queue
and deliver too). Built from the ports and explicit collaborators, never
from the Node facade; time comes from `ports.clock()`, jitter from `ports.rng`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Iterable

from ..core.errors import InvalidEnvelope, InvalidSignature, RemoteProtocolError, TransportError
from ..store import blobs as blobstore
from ..store import backup as seqs
from ..store import records
from ..sync import outbox
from ..sync.messages import (DUPLICATE, MAX_BATCH_ITEMS, REFUSED, STORED, Ack, Batch, Offer, PushAnswer,
                             PushItem, PutAnswer, Receipt, Want, refusal_text)
from ..sync.session import (Attempt, Commit, Entry, Fetch, Listing, Refused, Retire, ScheduleRetry, SendBatch,
                            SendRecord, SenderSession)
from ..transport.client import Peer
from .contacts import HELD, REPLACED, REVOKED, contact_state
from .events import DeliveryChanged
from .intake import Intake, RecordRefused
from .loop import Loop
from .ports import Ports

log = logging.getLogger("cabinet.courier")
PULL_INTERVAL = 30.0
PULL_GRACE_MS = 10_000                   # a record a recipient is pulling is not pushed for this long
PULLING_MS = 3_000                       # after a want, the rounds push nothing to that recipient (its pull
                                         # goes on with the next want, and ends with an ack) for this long
PRUNE_EVERY = 1_000                      # outbox change numbers between two prunings of old ones
FAILURES = (TransportError, InvalidSignature, RemoteProtocolError, InvalidEnvelope)
Locate = Callable[[dict], Peer]
Effect = Retire | Refused | Attempt | ScheduleRetry


class Courier(Loop):
    """The sender's side: holds the sender sessions, pushes what is due, applies acks and wants."""

    def __init__(self, ports: Ports, locate: Locate) -> None:
        super().__init__("cabinet-courier", self.round)
        self.ports, self.locate = ports, locate
        self._sessions: dict[str, SenderSession] = {}
        self._mark: int | None = None          # the last outbox change number taken in (records.stream_out)
        self._pruned = 0                       # the change number at the last pruning
        self._active: set[str] = set()         # recipients with a push in progress
        self._pulling: dict[str, int] = {}     # recipient -> until when it is taken to be pulling (Unix ms)

    # --- sessions, kept in step with the store -------------------------------------------

    async def refresh(self) -> None:
        """Load every stream once; after that, take in what changed (here or in another process).

        What changed is read from the outbox's change numbers (store/records.stream_out), so a refresh
        costs the few rows that changed, not the whole outbox of the last minute.
        """
        store = self.ports.store
        if self._mark is None:
            lasts = await store.call(records.last_seqs)
            await self._open(lasts)
        rows, mark, full = await store.call(records.stream_out, self._mark)
        await self._open({r["recipient"]: 0 for r in rows if r["recipient"] not in self._sessions})
        entries: dict[str, list[Entry]] = {}
        for r in rows:
            entries.setdefault(r["recipient"], []).append(
                Entry(seq=r["seq"], record_id=r["record_id"], size=r["body_size"], state=r["state"],
                      attempts=r["attempts"], next_try=r["next_try"], queued_at=r["created"], stale=bool(r["stale"])))
        for recipient, session in self._sessions.items():
            if full:           # every pending delivery: any other this session holds was settled meanwhile
                session.resync(entries.get(recipient, ()))
            else:
                for entry in entries.get(recipient, ()):
                    session.load(entry)
        if self._mark is not None and mark - self._pruned >= PRUNE_EVERY:
            self._pruned = mark
            await store.call(records.prune_outbox_changes, mark)
        self._mark = mark if self._mark is None else max(self._mark, mark)

    async def _open(self, lasts: dict[str, int]) -> None:
        """New sessions, with the voids a restore left in their streams (store/backup.py)."""
        fresh = [r for r in lasts if r not in self._sessions]
        if not fresh:
            return
        voids = await self.ports.store.call(seqs.voids_of, fresh)
        for r in fresh:
            self._sessions.setdefault(r, SenderSession(r, last=lasts[r], voids=voids.get(r, ())))

    async def session(self, recipient: str) -> SenderSession:
        await self.refresh()
        await self._open({recipient: 0})
        return self._sessions[recipient]

    async def apply(self, recipient: str, effects: Iterable[Effect]) -> int:
        """Carry out a session's effects in the store; returns how many deliveries were settled."""
        store, now, settled = self.ports.store, self.ports.clock(), 0
        retries: list[ScheduleRetry] = []
        for e in effects:
            if isinstance(e, Retire):
                done = await store.call(records.retire, recipient, list(e.seqs), now=now, receipts=e.receipts)
                settled += len(done)
                for rid in done:
                    self._changed(rid, recipient, outbox.DELIVERED)
                if done:
                    log.info("%d record(s) delivered to %s", len(done), recipient)
            elif isinstance(e, Refused):
                why = refusal_text(e.reason)
                if await store.call(records.refuse, recipient, e.seq, reason=why, now=now):
                    settled += 1
                    self._changed(e.record_id, recipient, outbox.REFUSED, reason=why)
                    log.warning("record %s refused by %s for good: %s", e.record_id, recipient, e.reason)
            elif isinstance(e, Attempt):
                await store.call(records.update_delivery, e.record_id, recipient, now=now, state=e.state)
            elif isinstance(e, ScheduleRetry):
                retries.append(e)
        if retries:         # a failed batch of 500: one transaction, not 500
            await store.call(records.schedule_retries, recipient, [
                (e.seq, e.state, e.attempts, e.next_try, e.why, e.newly_stale) for e in retries], now=now)
            for e in retries:
                if e.newly_stale:
                    log.warning("record %s to %s: not delivered for days; still trying", e.record_id, recipient)
                self._changed(e.record_id, recipient, e.state, reason=e.why)
        return settled

    def _changed(self, record_id: str, recipient: str, state: str, *, reason: str = "", sent: int = 0) -> None:
        self.ports.publish(DeliveryChanged(at=self.ports.clock(), record_id=record_id, recipient=recipient,
                                           state=state, reason=reason, sent_bytes=sent))

    # --- what the recipient tells us (through the delivery endpoints) -------------------

    async def on_ack(self, recipient: str, ack: Ack) -> int:
        self._pulling.pop(recipient, None)            # a pull ends with its ack: pushes may go again
        session = await self.session(recipient)
        settled = await self.apply(recipient, session.on_ack(ack))
        await self._note_held(recipient, session.held_unknown([ack.upto, *ack.have]))
        return settled

    async def on_want(self, recipient: str, want: Want, limit: int) -> Listing:
        session = await self.session(recipient)
        cap = min(limit, MAX_BATCH_ITEMS)
        settled = [Offer(seq=s, record_id=rid) for s, rid in await self.ports.store.call(
            records.settled_above, recipient, session.settled_from(want), cap)] if want.since < session.last else []
        listing, effects = session.on_want(want, limit, settled)
        # The recipient is fetching these itself: pushing them too would send (and have it verify) them twice.
        session.defer([o.seq for o in listing.offers], until=self.ports.clock() + PULL_GRACE_MS)
        self._pulling[recipient] = self.ports.clock() + PULLING_MS
        await self.apply(recipient, effects)
        await self._note_held(recipient, session.held_unknown([want.since]))
        return listing

    async def _note_held(self, recipient: str, held: tuple[int, ...]) -> None:
        """A colleague holds seqs of a void: records the lost node sent after the backup (`cabinet outbox`)."""
        if not held:
            return
        changed: int = await self.ports.store.call(seqs.note_seen, recipient, list(held))
        if changed:
            log.warning("%s holds record(s) this node sent after its last backup: not in this copy", recipient)

    # --- pushing ----------------------------------------------------------------------------

    async def round(self) -> float:
        await self.run_due()
        nxt = min((max(n, self._pulling.get(r, 0)) for r, s in self._sessions.items()
                   if (n := s.next_due()) is not None), default=None)
        return 5.0 if nxt is None else min(5.0, max(0.05, (nxt - self.ports.clock()) / 1000))

    async def run_due(self) -> int:
        """Push everything due now, one task per recipient; then send the receipts we owe."""
        await self.refresh()
        now = self.ports.clock()
        due = {r: u for r, s in self._sessions.items() if self._pulling.get(r, 0) <= now and (u := s.due(now))}
        results = await asyncio.gather(*(self._stream(r, u) for r, u in due.items()), return_exceptions=True)
        for r in results:                     # one recipient's trouble never stops the others
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r
            if isinstance(r, Exception):
                log.error("outbox: %s", r)
        await flush_receipts(self.ports, self.locate)
        return sum(len(u.offers) if isinstance(u, SendBatch) else 1 for units in due.values() for u in units)

    async def deliver_record(self, record_id: str) -> dict[str, str]:
        """Try every recipient of one record now; returns why, for those still queued."""
        await self.refresh()
        rows = [d for d in await self.ports.store.call(records.deliveries, record_id)
                if d["state"] in outbox.PENDING]
        errors: dict[str, str] = {}

        async def one(d: dict) -> None:
            session = self._sessions.get(d["recipient"])
            units = session.due(self.ports.clock(), only=[d["seq"]]) if session else []
            err = await self._stream(d["recipient"], units) if units else None
            if err:
                errors[d["recipient"]] = err

        await asyncio.gather(*(one(d) for d in rows))
        return errors

    async def _stream(self, recipient: str, units: list[SendBatch | SendRecord]) -> str | None:
        """Push units (in seq order) to one recipient; stop at the first failure."""
        if recipient in self._active:
            return None
        self._active.add(recipient)
        try:
            session = self._sessions[recipient]
            contact = await self.ports.store.call(records.contact_by_id, recipient)
            why = ("recipient is no longer a contact" if contact is None else _not_sent_because(contact))
            for i, unit in enumerate(units):
                try:
                    if why or contact is None:
                        raise RemoteProtocolError(why or "recipient is no longer a contact")
                    peer = self.locate(contact)
                    if isinstance(unit, SendRecord):
                        await self._push_large(peer, contact, session, unit)
                    else:
                        await self._push_small(peer, contact, session, unit)
                except FAILURES as exc:
                    seqs = [o.seq for u in units[i:] for o in (u.offers if isinstance(u, SendBatch) else [u.offer])]
                    effects = session.on_failure(seqs, str(exc), now=self.ports.clock(), jitter=self.ports.rng.random())
                    await self.apply(recipient, effects)
                    log.info("%d record(s) to %s still queued: %s", len(effects), recipient, exc)
                    return str(exc)
            return None
        finally:
            self._active.discard(recipient)

    async def _push_small(self, peer: Peer, contact: dict, session: SenderSession, unit: SendBatch) -> None:
        rows = await self.ports.store.call(records.outgoing, peer.node_id, [o.seq for o in unit.offers])
        items = [PushItem(seq=r["seq"], head=r["head"], body=r["body"]) for r in rows]
        answer = PushAnswer.from_wire(await self.ports.client.push_batch(
            peer, [(i.seq, i.head, i.body) for i in items]))
        by_id = {r["id"]: r["seq"] for r in rows}
        receipts = {rid: raw for rid, raw in answer.receipts.items() if rid in by_id}
        await asyncio.to_thread(_check_receipts, receipts, contact["sign_key"])   # 500 signatures: off the loop
        delivered: dict[int, bytes | None] = {by_id[rid]: raw for rid, raw in receipts.items()
                                              if answer.results.get(rid) in (STORED, DUPLICATE)}
        refused = {by_id[rid]: answer.reasons[rid] for rid, r in answer.results.items()
                   if r == REFUSED and rid in by_id and rid in answer.reasons}
        await self.apply(peer.node_id, session.on_answer(delivered=delivered, refused=refused, ack=answer.ack))
        if answer.ack is not None:
            await self._note_held(peer.node_id, session.held_unknown([answer.ack.upto, *answer.ack.have]))
        unexplained = [rid for rid, r in answer.results.items() if r == REFUSED and rid not in answer.reasons]
        if unexplained:                   # a recipient that does not say why: try again later
            raise RemoteProtocolError(f"{len(unexplained)} record(s) refused by the recipient")

    async def _push_large(self, peer: Peer, contact: dict, session: SenderSession, unit: SendRecord) -> None:
        seq, rid = unit.offer.seq, unit.offer.record_id
        row = await self.ports.store.call(records.get_record, rid, None, "out")
        await self.apply(peer.node_id, session.on_attempt(seq))
        progress = _Progress(self, rid, peer.node_id)
        answer = PutAnswer.from_wire(await self.ports.client.push_record(
            peer, rid, row["head"], row["body_size"], lambda off: self._read(rid, off), progress, seq=seq))
        if answer.status == REFUSED:
            effects = session.on_answer(delivered={}, refused={seq: answer.reason}, ack=answer.ack)
        else:
            if answer.receipt is not None:
                Receipt.verify(answer.receipt, contact["sign_key"], rid)
            effects = session.on_answer(delivered={seq: answer.receipt}, refused={}, ack=answer.ack)
        await self.apply(peer.node_id, effects)
        if answer.ack is not None:
            await self._note_held(peer.node_id, session.held_unknown([answer.ack.upto, *answer.ack.have]))

    async def _read(self, record_id: str, offset: int) -> AsyncIterator[bytes]:
        it = blobstore.iter_source(self.ports.blobs.path(record_id), offset)
        while (piece := await asyncio.to_thread(next, it, None)) is not None:
            yield piece


def _not_sent_because(contact: dict) -> str | None:
    """Why nothing goes to this contact, named by its state (contacts.contact_state), or None."""
    state = contact_state(contact)
    if state == REPLACED:
        return f"{REPLACED}: nothing more is sent to the old key"
    if state == REVOKED:
        return f"{REVOKED}: nothing is sent"
    if state == HELD:
        return f"{HELD}: check the safety code first"
    return None


def _check_receipts(receipts: dict[str, bytes], sign_key: bytes) -> None:
    for rid, raw in receipts.items():
        Receipt.verify(raw, sign_key, rid)


async def send_receipts(ports: Ports, locate: Locate, node_id: str, rows: list[dict] | None = None) -> None:
    """Send the "opened" receipts owed to one contact; kept for later if it cannot be reached."""
    rows = rows if rows is not None else await ports.store.call(records.receipts_due, node_id)
    contact = await ports.store.call(records.contact_by_id, node_id)
    if not rows or contact is None:
        return
    try:
        await ports.client.send_receipts(locate(contact), [r["receipt"] for r in rows])
    except FAILURES as exc:
        log.info("receipts to %s not sent yet: %s", node_id, exc)
        return
    await ports.store.call(records.receipts_sent, [(r["record_id"], r["to_node"], r["status"]) for r in rows],
                           ports.clock())


async def flush_receipts(ports: Ports, locate: Locate) -> None:
    by_node: dict[str, list[dict]] = {}
    for r in await ports.store.call(records.receipts_due):
        by_node.setdefault(r["to_node"], []).append(r)
    for node_id, rows in by_node.items():
        await send_receipts(ports, locate, node_id, rows)


class _Progress:
    """Records bytes sent for `cabinet outbox` (and the event stream), at most once a second."""

    def __init__(self, courier: Courier, record_id: str, recipient: str) -> None:
        self.courier, self.record_id, self.recipient = courier, record_id, recipient
        self._last = 0

    def __call__(self, sent: int) -> None:
        ports = self.courier.ports
        now = ports.clock()
        if now - self._last >= 1000:
            self._last = now
            self.courier._changed(self.record_id, self.recipient, outbox.SENDING, sent=sent)
            asyncio.ensure_future(ports.store.call(records.update_delivery, self.record_id, self.recipient,
                                                   now=now, sent_bytes=sent))


class Puller(Loop):
    """The recipient's side: asks each contact "anything for me since N?"."""

    def __init__(self, ports: Ports, intake: Intake, locate: Locate, interval: float = PULL_INTERVAL) -> None:
        super().__init__("cabinet-puller", self.round)
        self.ports, self.intake, self.locate = ports, intake, locate
        self.interval = interval
        self._backoff: dict[str, tuple[int, int]] = {}      # node ID -> (failures, not before, Unix ms)
        self._soon: set[str] = set()
        self._active: set[str] = set()

    def soon(self, node_id: str) -> None:
        self._soon.add(node_id)
        self.wake()

    async def round(self) -> float:
        contacts = await self.ports.store.call(records.list_contacts)
        now = self.ports.clock()
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
            delay = max(outbox.retry_delay(failures, self.ports.rng.random()), int(self.interval * 1000))
            self._backoff[node_id] = (failures, self.ports.clock() + delay)
            log.info("pull from %s failed (%s); next try in %.0f s", node_id, exc, delay / 1000)

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
        client = self.ports.client
        try:
            await send_receipts(self.ports, self.locate, node_id)
            peer, total = self.locate(contact), 0
            session = await self.intake.session(node_id)
            if session.refused:     # tell our refusals before `since` moves past them
                await client.send_ack(peer, session.ack().to_wire())
            start = after = session.cursor
            fetch = asyncio.ensure_future(client.fetch_outbox(peer, start, MAX_BATCH_ITEMS, after))
            while fetch is not None:
                batch, asked_after = Batch.from_wire(await fetch), after
                fetch = None
                if batch.full:
                    after = batch.items[-1].seq
                    fetch = asyncio.ensure_future(client.fetch_outbox(peer, start, MAX_BATCH_ITEMS, after))
                total += await self._take(peer, batch, asked_after)
            final = await self.ports.store.call(records.stream_in, node_id)
            session.on_committed(final)
            await client.send_ack(peer, final.to_wire())
            if total:
                log.info("pulled %d record(s) from %s", total, node_id)
            return total
        finally:
            if fetch is not None:
                fetch.cancel()
            self._active.discard(node_id)

    async def _take(self, peer: Peer, batch: Batch, asked_after: int) -> int:
        """Commit what one outbox answer lists and we do not have yet."""
        session, new = await self.intake.session(peer.node_id), 0
        for effect in session.on_batch(batch, after=asked_after):
            if isinstance(effect, Commit):
                out = await self.intake.small(peer.node_id, [PushItem(seq=i.seq, head=i.head, body=i.body or b"")
                                                              for i in effect.items])
                new += sum(r == STORED for r in out.results.values())
            elif isinstance(effect, Fetch):
                try:
                    new += await self._download(peer, effect)
                except (InvalidEnvelope, RemoteProtocolError) as exc:
                    # Refused (and logged) by the intake: go on with the others.
                    log.warning("record %s from %s not taken: %s", effect.item.record_id, peer.node_id,
                                exc.code if isinstance(exc, RecordRefused) else exc)
        void = session.skip(batch)        # the sender was restored: seqs it will never send
        if void is not None:
            session.on_committed(await self.ports.store.call(records.skip_void, peer.node_id, *void))
            log.info("%s was restored from a backup: sequence numbers %d..%d skipped", peer.node_id, *void)
        return new

    async def _download(self, peer: Peer, fetch: Fetch) -> int:
        item, intake = fetch.item, self.intake
        head, key = await intake.check_head(item.head, record_id=item.record_id, sender=peer.node_id, seq=item.seq)
        offset = intake.have(item.record_id, peer.node_id)
        out = await intake.stream(peer.node_id, head, key, offset,
                                  self.ports.client.download_body(peer, item.record_id, offset), item.seq)
        return 1 if out.status == STORED else 0
