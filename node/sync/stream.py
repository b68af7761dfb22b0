"""One sender->recipient stream: sequence numbers, cursors, batches, acks, gaps.

Sans-IO, as h11 and aioquic are: the two classes below take messages and
return messages to send and effects to carry out; they never read a clock,
touch a socket or a database. docs/sync.md is the prose version of this file.

The sender numbers its records for each recipient 1, 2, 3, ... and keeps each
one until an ack covers it. The recipient keeps a *cursor*: the highest N such
that it has committed every record 1..N. Records may arrive out of order (a
big one still uploading while small ones are pushed); ones above the cursor
are remembered in `above` until the gap closes.

    push:  sender --Offer(seq, id)--> recipient   (the record upload itself)
           sender <--Ack(upto=cursor, have)----- recipient   (after commit, or for a duplicate)
    pull:  recipient --Want(since=cursor)--> sender
           recipient <--Batch(prev, last, items)-- sender
           recipient --Ack(upto=cursor)--> sender            (after committing what it fetched)

A Batch carries `prev` (the `since` it answers) and `last` (the sender's
highest sequence number), so the recipient sees at once whether anything is
missing; an Offer above cursor+1 means a gap, which the recipient closes by
asking (Want) rather than waiting for the sender's next retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import RemoteProtocolError

MAX_BATCH = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    seq: int
    record_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    upto: int                            # every seq <= upto is committed at the recipient
    have: tuple[int, ...] = ()           # and these above it too


@dataclass(frozen=True, slots=True, kw_only=True)
class Want:
    since: int           # the recipient's cursor: it has everything up to here
    after: int = 0       # and is already fetching up to here: list only what comes later


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    prev: int
    last: int
    items: tuple[Offer, ...]

    def __post_init__(self) -> None:
        seqs = [i.seq for i in self.items]
        if seqs != sorted(set(seqs)) or any(s <= self.prev or s > self.last for s in seqs):
            raise RemoteProtocolError("batch: sequence numbers out of order or out of range")
        if len(seqs) > MAX_BATCH:
            raise RemoteProtocolError("batch: too many items")


# --- effects the I/O layer carries out ------------------------------------------

@dataclass(frozen=True, slots=True)
class Fetch:
    """Recipient: download and commit this record, then call `committed(seq)`."""

    offer: Offer


@dataclass(frozen=True, slots=True)
class Retire:
    """Sender: these sequence numbers are delivered; stop sending them."""

    seqs: tuple[int, ...]


class SenderStream:
    """The sender's view of one recipient's stream."""

    def __init__(self, pending: dict[int, str] | None = None, last: int | None = None) -> None:
        self.pending: dict[int, str] = dict(pending or {})     # seq -> record ID, not yet acked
        self.last = max(max(self.pending, default=0), last or 0)  # highest number ever given out

    def enqueue(self, seq: int, record_id: str) -> None:
        if seq <= self.last:
            raise RemoteProtocolError("sequence numbers must increase")
        self.pending[seq] = record_id
        self.last = seq

    def next_offer(self) -> Offer | None:
        """Push mode: the lowest record not yet acknowledged."""
        if not self.pending:
            return None
        seq = min(self.pending)
        return Offer(seq=seq, record_id=self.pending[seq])

    def on_want(self, want: Want, limit: int = MAX_BATCH) -> Batch:
        """Pull mode: everything after the recipient's cursor that is still pending."""
        if want.since > self.last or want.after > self.last:
            raise RemoteProtocolError("want for sequence numbers never sent")
        retire = [s for s in self.pending if s <= want.since]
        for s in retire:                     # the recipient says it has these: they are delivered
            del self.pending[s]
        start = max(want.since, want.after)
        items = tuple(Offer(seq=s, record_id=self.pending[s]) for s in sorted(self.pending) if s > start)[:limit]
        return Batch(prev=start, last=self.last, items=items)

    def on_ack(self, ack: Ack) -> Retire:
        if ack.upto > self.last:
            raise RemoteProtocolError("ack for a sequence number never sent")
        done = tuple(sorted(s for s in self.pending if s <= ack.upto or s in ack.have))
        for s in done:
            del self.pending[s]
        return Retire(done)

    @property
    def drained(self) -> bool:
        return not self.pending


@dataclass
class RecipientStream:
    """The recipient's view of one sender's stream: a cursor and what is above it."""

    cursor: int = 0
    above: set[int] = field(default_factory=set)

    def on_offer(self, offer: Offer) -> list[Fetch | Want]:
        """A pushed record is arriving. Store it unless already here; ask for a gap."""
        out: list[Fetch | Want] = []
        if not self.has(offer.seq):
            out.append(Fetch(offer))
        if offer.seq > self.cursor + 1 and not all(self.has(s) for s in range(self.cursor + 1, offer.seq)):
            out.append(Want(since=self.cursor))
        return out

    def on_batch(self, batch: Batch, after: int = 0) -> list[Fetch]:
        if batch.prev > max(self.cursor, after):
            raise RemoteProtocolError("batch starts after what we asked for")
        return [Fetch(o) for o in batch.items if not self.has(o.seq)]

    def has(self, seq: int) -> bool:
        return seq <= self.cursor or seq in self.above

    def committed(self, seq: int) -> Ack:
        """A record is durably stored: advance the cursor over any closed gap."""
        if seq > self.cursor:
            self.above.add(seq)
        while self.cursor + 1 in self.above:
            self.cursor += 1
            self.above.discard(self.cursor)
        return self.ack()

    def ack(self) -> Ack:
        return Ack(upto=self.cursor, have=tuple(sorted(self.above)))

    def want(self) -> Want:
        return Want(since=self.cursor)
