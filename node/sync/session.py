"""Long-lived sync sessions, one per stream: messages and `now` in, effects out.

In the manner of h11 and aioquic: a session never reads a clock, touches a
socket or a database. The I/O layer (node/app/courier.py, intake.py,
serving.py) feeds it what arrived and carries out the effects it returns:

    SenderSession (one per recipient, held by the Courier for the node's life)
        due(now)            -> SendBatch / SendRecord units, in sequence order
        on_attempt(seq)     -> Attempt                 (a large upload starts)
        on_answer(...)      -> Retire, Refused         (a push answer: receipts, ack, refusals)
        on_ack(ack)         -> Retire, Refused         (POST /v1/acks, or the ack inside an answer)
        on_want(want, settled) -> Listing + Retire     (GET /v1/outbox: `since` retires; settled seqs above
                                                        it are listed again, for a recipient restored from a backup)
        on_failure(...)     -> ScheduleRetry           (backoff, stale flag)
    RecipientSession (one per sender, held by the Intake)
        on_batch(batch)     -> Commit (inline bodies, one transaction) + Fetch (downloads)
        on_committed(ack)   -> FillGap                 (records above a hole: pull now)

Every change of a delivery's state goes through node/sync/outbox.py's table.
docs/sync.md is the prose version of this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..core.errors import LocalProtocolError, RemoteProtocolError
from . import outbox
from .messages import (HEAD_ALLOWANCE, MAX_BATCH_BYTES, MAX_BATCH_ITEMS, MAX_SMALL_BODY, Ack, Batch, BatchItem,
                       Offer, Want)


# --- effects ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Retire:
    """Sender: these are delivered (state `delivered`, keep the receipts); stop sending them."""

    seqs: tuple[int, ...]
    receipts: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Sender: the recipient refused this record for good; state `refused`, never sent again."""

    seq: int
    record_id: str
    reason: str                         # a code of messages.REFUSALS


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """Sender: an upload starts (state `sending`)."""

    seq: int
    record_id: str
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRetry:
    """Sender: the attempt failed; write the state, the count and when to try again."""

    seq: int
    record_id: str
    state: str
    attempts: int
    next_try: int
    stale: bool
    newly_stale: bool
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SendBatch:
    """Sender: push these small records in one request."""

    offers: tuple[Offer, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRecord:
    """Sender: push this large record alone (resumable upload)."""

    offer: Offer


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """Sender: what an outbox answer lists (the I/O layer adds heads and bodies)."""

    prev: int
    last: int
    offers: tuple[Offer, ...]
    void: tuple[int, int] | None = None    # seqs this node will never send (a void left by a restore)


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """Recipient: verify these records (inline bodies) and commit them in one transaction."""

    items: tuple[BatchItem, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetch:
    """Recipient: download this record's body, verify it, commit it."""

    item: BatchItem


@dataclass(frozen=True, slots=True, kw_only=True)
class FillGap:
    """Recipient: records sit above a hole in the stream; ask the sender now (a pull from `since`)."""

    since: int


# --- the sender ------------------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class Entry:
    """One delivery as the sender's session holds it."""

    seq: int
    record_id: str
    size: int
    state: str = outbox.QUEUED
    attempts: int = 0
    next_try: int = 0
    queued_at: int = 0
    stale: bool = False


class SenderSession:
    """The sender's view of one recipient's stream: what is pending, and the highest seq given out."""

    def __init__(self, recipient: str, entries: Iterable[Entry] = (), last: int = 0,
                 voids: Iterable[tuple[int, int]] = ()) -> None:
        self.recipient = recipient
        self.pending: dict[int, Entry] = {}
        # After a restore from a backup: (lo, hi) ranges the lost node may have used; never used again.
        self.voids = sorted(voids)
        self.last = max([last, *(hi for _, hi in self.voids)])
        for e in entries:
            self.load(e)

    # kept in step with the store -----------------------------------------------------

    def load(self, entry: Entry) -> None:
        """The store's word on one delivery (at start, or after another process changed it)."""
        self.last = max(self.last, entry.seq)
        if entry.state in outbox.SETTLED:
            self.pending.pop(entry.seq, None)
        elif entry.state in outbox.PENDING:
            self.pending[entry.seq] = entry
        else:
            raise LocalProtocolError(f"unknown delivery state {entry.state}")

    def resync(self, pending: Iterable[Entry]) -> None:
        """The store's word on every pending delivery of this stream: any other held as pending was settled."""
        fresh = {e.seq: e for e in pending}
        for seq in [s for s in self.pending if s not in fresh]:
            del self.pending[seq]
        for entry in fresh.values():
            self.load(entry)

    def enqueue(self, entry: Entry) -> None:
        """A record newly queued for this recipient."""
        if entry.seq <= self.last:
            raise LocalProtocolError("sequence numbers must increase")
        self.load(entry)

    # push ------------------------------------------------------------------------------

    def due(self, now: int, only: Iterable[int] | None = None) -> list[SendBatch | SendRecord]:
        """What to push now, in sequence order: runs of small records batched, each large one alone."""
        if only is not None:
            picked = [self.pending[s] for s in sorted(set(only)) if s in self.pending]
        else:
            picked = [e for s, e in sorted(self.pending.items()) if e.next_try <= now]
        return units(picked)

    def defer(self, seqs: Iterable[int], *, until: int) -> None:
        """Push none of these before `until` (the recipient is pulling them); only in memory."""
        for seq in seqs:
            e = self.pending.get(seq)
            if e is not None and e.next_try < until:
                e.next_try = until

    def next_due(self) -> int | None:
        return min((e.next_try for e in self.pending.values()), default=None)

    def on_attempt(self, seq: int) -> list[Attempt]:
        e = self.pending.get(seq)
        if e is None:
            return []
        e.state = outbox.transition(e.state, outbox.ATTEMPT_STARTED)
        return [Attempt(seq=seq, record_id=e.record_id, state=e.state)]

    def on_answer(self, *, delivered: dict[int, bytes | None], refused: dict[int, str],
                  ack: Ack | None) -> list[Retire | Refused]:
        """A push answer: records it said are here (with their receipt, if any), refusals, its ack."""
        effects: list[Retire | Refused] = []
        if ack is not None:
            ack = Ack(upto=ack.upto, have=ack.have, refused=tuple({**dict(ack.refused), **refused}.items()))
            effects += self.on_ack(ack)
        elif refused:
            effects += self._refuse(refused)
        receipts = {s: r for s, r in delivered.items() if r is not None}
        effects += self._retire([s for s in delivered if s not in refused], receipts)
        return effects

    def on_ack(self, ack: Ack) -> list[Retire | Refused]:
        if ack.upto > self.last or any(s > self.last for s, _ in ack.refused):
            raise RemoteProtocolError("ack for a sequence number never sent")
        refused = dict(ack.refused)
        effects: list[Retire | Refused] = list(self._refuse(refused))
        have = set(ack.have)
        effects += self._retire([s for s in self.pending if s <= ack.upto or s in have], {})
        return effects

    def on_failure(self, seqs: Iterable[int], why: str, *, now: int, jitter: float) -> list[ScheduleRetry]:
        out = []
        for seq in sorted(seqs):
            e = self.pending.get(seq)
            if e is None:
                continue                      # delivered meanwhile: a failure never undoes that
            f = outbox.after_failure(state=e.state, attempts=e.attempts, queued_at=e.queued_at, now=now,
                                     jitter=jitter)
            newly = f.stale and not e.stale
            e.state, e.attempts, e.next_try, e.stale = f.state, f.attempts, f.next_try, f.stale or e.stale
            out.append(ScheduleRetry(seq=seq, record_id=e.record_id, state=e.state, attempts=e.attempts,
                                     next_try=e.next_try, stale=e.stale, newly_stale=newly, why=why[:300]))
        return out

    # pull ------------------------------------------------------------------------------

    def on_want(self, want: Want, limit: int = MAX_BATCH_ITEMS,
                settled: Iterable[Offer] = ()) -> tuple[Listing, list[Retire]]:
        """The recipient has everything up to `since` (retire those) and is fetching up to `after`.

        `settled`: the I/O layer's answer to `settled_from(want)` (the lowest seqs above it that the store
        holds as delivered or refused). They are listed again beside the pending ones: a recipient asks
        from below them only when it lost them (restored from a backup); one that holds them skips them.
        """
        if want.since > self.last or want.after > self.last:
            raise RemoteProtocolError("want for sequence numbers never sent")
        retire = self._retire([s for s in self.pending if s <= want.since], {})
        start, cap = self.settled_from(want), min(limit, MAX_BATCH_ITEMS)
        listed = {o.seq: o for o in settled if start < o.seq <= self.last and not self._in_void(o.seq)}
        listed.update((s, Offer(seq=s, record_id=e.record_id)) for s, e in self.pending.items() if s > start)
        offers = tuple(listed[s] for s in sorted(listed)[:cap])
        void = next((v for v in self.voids if v[1] > want.since), None)
        return Listing(prev=start, last=self.last, offers=offers, void=void), retire

    @staticmethod
    def settled_from(want: Want) -> int:
        """Where a Want's listing starts: settled seqs above this are listed again (at most MAX_BATCH_ITEMS)."""
        return max(want.since, want.after)

    def held_unknown(self, seqs: Iterable[int]) -> tuple[int, ...]:
        """Of the seqs a recipient says it holds (an ack's upto and have, a want's since), those inside a
        void: records the lost node sent after the backup, which this copy does not have. A void's top
        is left out: it is where a recipient's cursor lands when it skips the void (`RecipientSession.skip`)."""
        return tuple(sorted(s for s in set(seqs) if any(lo <= s < hi for lo, hi in self.voids)))

    def _in_void(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self.voids)

    # ------------------------------------------------------------------------------------

    def _retire(self, seqs: Iterable[int], receipts: dict[int, bytes]) -> list[Retire]:
        done = tuple(sorted(s for s in set(seqs) if s in self.pending))
        for s in done:
            outbox.transition(self.pending.pop(s).state, outbox.RECORD_ACKED)
        return [Retire(seqs=done, receipts={s: r for s, r in receipts.items() if s in done})] if done else []

    def _refuse(self, refused: dict[int, str]) -> list[Refused]:
        out = []
        for seq, reason in sorted(refused.items()):
            e = self.pending.pop(seq, None)
            if e is not None:
                outbox.transition(e.state, outbox.RECORD_REFUSED)
                out.append(Refused(seq=seq, record_id=e.record_id, reason=reason))
        return out


def units(entries: list[Entry]) -> list[SendBatch | SendRecord]:
    """Group a stream's entries (in seq order): runs of small ones into batches, each large one alone."""
    out: list[SendBatch | SendRecord] = []
    run: list[Offer] = []
    size = 0
    for e in entries:
        offer = Offer(seq=e.seq, record_id=e.record_id)
        if e.size > MAX_SMALL_BODY:
            if run:
                out.append(SendBatch(offers=tuple(run)))
                run, size = [], 0
            out.append(SendRecord(offer=offer))
            continue
        weight = e.size + HEAD_ALLOWANCE
        if run and (len(run) >= MAX_BATCH_ITEMS or size + weight > MAX_BATCH_BYTES):
            out.append(SendBatch(offers=tuple(run)))
            run, size = [], 0
        run.append(offer)
        size += weight
    if run:
        out.append(SendBatch(offers=tuple(run)))
    return out


# --- the recipient ---------------------------------------------------------------

def settle(cursor: int, above: Iterable[int]) -> tuple[int, tuple[int, ...]]:
    """Move the cursor over every gap that has closed; `above` holds settled seqs (committed or
    refused) beyond it. Returns the new cursor and what is still above it."""
    rest = {s for s in above if s > cursor}
    while cursor + 1 in rest:
        cursor += 1
        rest.discard(cursor)
    return cursor, tuple(sorted(rest))


class RecipientSession:
    """The recipient's view of one sender's stream: a cursor, what is committed above it, and
    the refusals. The store settles the cursor in the commit transaction (with `settle`); the
    session is told the result (`on_committed`)."""

    def __init__(self, sender: str, ack: Ack | None = None) -> None:
        self.sender = sender
        self.cursor = 0
        self.above: set[int] = set()
        self.refused: dict[int, str] = {}
        if ack is not None:
            self._take(ack)

    def has(self, seq: int) -> bool:
        return seq <= self.cursor or seq in self.above or seq in self.refused

    def on_batch(self, batch: Batch, after: int = 0) -> list[Commit | Fetch]:
        """An outbox answer to Want(since=cursor, after): commit inline bodies, fetch the others."""
        if batch.prev > max(self.cursor, after):
            raise RemoteProtocolError("batch starts after what we asked for")
        new = [i for i in batch.items if not self.has(i.seq)]
        inline = tuple(i for i in new if i.body is not None)
        effects: list[Commit | Fetch] = [Commit(items=inline)] if inline else []
        return effects + [Fetch(item=i) for i in new if i.body is None]

    def skip(self, batch: Batch) -> tuple[int, int] | None:
        """The void a sender's answer names, when the cursor has reached it: the store moves the cursor
        over it (`records.skip_void`), since those seqs will never come."""
        if batch.void is None:
            return None
        lo, hi = batch.void
        return batch.void if lo - 1 <= self.cursor < hi else None

    def on_offer(self, offer: Offer) -> list[FillGap]:
        """A pushed record arrives: if something below it is missing, ask for it now."""
        if offer.seq > self.cursor + 1 and not all(self.has(s) for s in range(self.cursor + 1, offer.seq)):
            return [FillGap(since=self.cursor)]
        return []

    def on_committed(self, ack: Ack) -> list[FillGap]:
        """The store committed records (and settled the cursor): this is the stream now."""
        self._take(ack)
        return [FillGap(since=self.cursor)] if self.above else []

    def want(self) -> Want:
        return Want(since=self.cursor, after=self.cursor)

    def ack(self) -> Ack:
        return Ack(upto=self.cursor, have=tuple(sorted(self.above)), refused=tuple(sorted(self.refused.items())))

    def _take(self, ack: Ack) -> None:
        if ack.upto < self.cursor:
            raise LocalProtocolError("a stream's cursor never goes back")
        self.cursor = ack.upto
        self.above = set(ack.have)
        self.refused.update(ack.refused)
