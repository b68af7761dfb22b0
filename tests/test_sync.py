"""The sync core (node/sync/): stream rules, the delivery table, backoff, and a simulated network.

Pure and fast: no asyncio, sockets or SQLite (from node.intake only the two
pure ack wire functions are used). The property test joins one SenderStream
and one RecipientStream through an in-memory link that drops, duplicates and
reorders messages both ways, while either side restarts from only what it
would have persisted; pulls are pipelined as the Puller does them (the next
Want, with `after`, goes out before the current batch is committed) and acks
carry a capped `have`. docs/sync.md is the prose version.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from node.core.errors import LocalProtocolError, RemoteProtocolError
from node.app.intake import MAX_HAVE, ack_from_wire, ack_wire
from node.sync import outbox
from node.sync.stream import (MAX_BATCH, Ack, Batch, Fetch, Offer, RecipientStream, Retire, SenderStream,
                              Want)


def _event(what: str) -> None:
    """Counted in --hypothesis-show-statistics; a no-op in the hand-written scenarios."""
    if currently_in_test_context():
        event(what)


def _ids(seqs) -> dict[int, str]:
    return {s: f"r{s}" for s in seqs}


def _contiguous(seqs) -> int:
    n = 0
    while n + 1 in seqs:
        n += 1
    return n


# --- RecipientStream ------------------------------------------------------------

def test_cursor_advances_only_over_closed_gaps():
    r = RecipientStream()
    assert r.committed(2) == Ack(upto=0, have=(2,))
    assert r.committed(4) == Ack(upto=0, have=(2, 4))
    assert r.committed(1) == Ack(upto=2, have=(4,))
    assert (r.cursor, r.above) == (2, {4})
    assert r.committed(3) == Ack(upto=4, have=())
    assert (r.cursor, r.above) == (4, set())


def test_committing_twice_changes_nothing():
    r = RecipientStream()
    r.committed(1)
    r.committed(3)
    before = (r.cursor, set(r.above))
    assert r.committed(1) == Ack(upto=1, have=(3,))
    assert r.committed(3) == Ack(upto=1, have=(3,))
    assert (r.cursor, r.above) == before


def test_has_covers_cursor_and_above():
    r = RecipientStream(cursor=3, above={5})
    assert [s for s in range(1, 8) if r.has(s)] == [1, 2, 3, 5]
    assert r.want() == Want(since=3)
    assert r.ack() == Ack(upto=3, have=(5,))


def test_on_offer_next_in_line_is_fetched():
    assert RecipientStream(cursor=3).on_offer(Offer(seq=4, record_id="r4")) == [Fetch(Offer(seq=4, record_id="r4"))]


def test_on_offer_duplicate_is_not_fetched():
    r = RecipientStream(cursor=3, above={6})
    assert r.on_offer(Offer(seq=2, record_id="r2")) == []
    assert r.on_offer(Offer(seq=3, record_id="r3")) == []
    # Already above the cursor: nothing to fetch, but the gap below it is still open.
    assert r.on_offer(Offer(seq=6, record_id="r6")) == [Want(since=3)]


def test_on_offer_above_a_gap_asks_for_the_gap():
    r = RecipientStream(cursor=3)
    assert r.on_offer(Offer(seq=6, record_id="r6")) == [Fetch(Offer(seq=6, record_id="r6")), Want(since=3)]


def test_on_offer_gap_already_filled_above_asks_nothing():
    r = RecipientStream(cursor=3, above={4, 5})
    assert r.on_offer(Offer(seq=6, record_id="r6")) == [Fetch(Offer(seq=6, record_id="r6"))]


def test_on_batch_refuses_a_batch_starting_after_the_cursor():
    with pytest.raises(RemoteProtocolError):
        RecipientStream(cursor=2).on_batch(Batch(prev=3, last=5, items=(Offer(seq=4, record_id="r4"),)))


def test_on_batch_fetches_only_what_is_missing():
    r = RecipientStream(cursor=2, above={4})
    batch = Batch(prev=1, last=6, items=tuple(Offer(seq=s, record_id=f"r{s}") for s in (2, 3, 4, 5)))
    assert [f.offer.seq for f in r.on_batch(batch)] == [3, 5]
    assert r.on_batch(Batch(prev=2, last=2, items=())) == []


def _batch(prev: int, last: int, seqs) -> Batch:
    return Batch(prev=prev, last=last, items=tuple(Offer(seq=s, record_id=f"r{s}") for s in seqs))


def test_on_batch_with_after_accepts_a_batch_starting_there():
    # Pipelined: the cursor is still 2 while the answer to Want(since=2, after=5) arrives.
    r = RecipientStream(cursor=2, above={7})
    assert [f.offer.seq for f in r.on_batch(_batch(5, 9, (6, 7, 8)), after=5)] == [6, 8]
    assert [f.offer.seq for f in r.on_batch(_batch(3, 9, (4, 6)), after=5)] == [4, 6]    # prev below after: fine
    assert [f.offer.seq for f in r.on_batch(_batch(1, 9, (2, 3)), after=5)] == [3]       # and below the cursor
    assert (r.cursor, r.above) == (2, {7})                                                # on_batch changes nothing


def test_on_batch_with_after_refuses_a_batch_starting_beyond_both():
    r = RecipientStream(cursor=2)
    with pytest.raises(RemoteProtocolError):
        r.on_batch(_batch(6, 9, (7,)), after=5)
    with pytest.raises(RemoteProtocolError):
        r.on_batch(_batch(3, 9, (4,)))                  # after defaults to 0: the cursor alone
    r = RecipientStream(cursor=6)                        # the cursor is the larger: it counts
    assert [f.offer.seq for f in r.on_batch(_batch(6, 9, (7,)), after=5)] == [7]


# --- SenderStream ----------------------------------------------------------------

def test_enqueue_numbers_must_increase():
    s = SenderStream()
    s.enqueue(1, "r1")
    s.enqueue(5, "r5")
    assert s.last == 5
    for seq in (5, 4, 0):
        with pytest.raises(RemoteProtocolError):
            s.enqueue(seq, "x")
    assert s.pending == {1: "r1", 5: "r5"}


def test_next_offer_is_the_lowest_pending():
    s = SenderStream({7: "r7", 3: "r3", 5: "r5"})
    assert s.next_offer() == Offer(seq=3, record_id="r3")
    assert s.last == 7
    assert SenderStream().next_offer() is None
    assert SenderStream(last=4).last == 4
    assert SenderStream({2: "r2"}, last=9).last == 9


def test_on_want_retires_up_to_since_and_returns_the_rest_in_order():
    s = SenderStream(_ids([1, 2, 4, 6, 7]), last=8)
    batch = s.on_want(Want(since=4))
    assert batch == Batch(prev=4, last=8, items=(Offer(seq=6, record_id="r6"), Offer(seq=7, record_id="r7")))
    assert s.pending == _ids([6, 7])


def test_on_want_respects_the_limit_and_keeps_the_rest():
    s = SenderStream(_ids(range(1, 11)))
    batch = s.on_want(Want(since=2), limit=3)
    assert [o.seq for o in batch.items] == [3, 4, 5]
    assert (batch.prev, batch.last) == (2, 10)
    assert sorted(s.pending) == list(range(3, 11))


def test_on_want_with_after_lists_only_beyond_it_and_retires_only_up_to_since():
    s = SenderStream(_ids([1, 2, 3, 5, 6, 8, 9]), last=10)
    batch = s.on_want(Want(since=2, after=6))
    assert batch == Batch(prev=6, last=10, items=(Offer(seq=8, record_id="r8"), Offer(seq=9, record_id="r9")))
    assert s.pending == _ids([3, 5, 6, 8, 9])       # 3..6 are being fetched, not yet committed: kept


def test_on_want_with_after_below_since_is_since():
    s = SenderStream(_ids([1, 2, 3, 5, 6]), last=6)
    assert s.on_want(Want(since=3, after=1)) == Batch(prev=3, last=6, items=(Offer(seq=5, record_id="r5"),
                                                                            Offer(seq=6, record_id="r6")))
    assert s.pending == _ids([5, 6])


def test_on_want_with_after_applies_the_limit_beyond_after():
    s = SenderStream(_ids(range(1, 11)))
    batch = s.on_want(Want(since=0, after=4), limit=3)
    assert ([o.seq for o in batch.items], batch.prev) == ([5, 6, 7], 4)
    assert sorted(s.pending) == list(range(1, 11))


def test_pipelined_wants_list_each_pending_seq_once():
    # What the Puller asks: since = the cursor at the start, after = the last seq of the batch before.
    s = SenderStream(_ids([2, 3, 5, 6, 7, 9, 10, 11]), last=12)
    since, after, seen = 1, 1, []
    while True:
        batch = s.on_want(Want(since=since, after=after), limit=3)
        seen += [o.seq for o in batch.items]
        if len(batch.items) < 3:
            break
        after = batch.items[-1].seq
    assert seen == [2, 3, 5, 6, 7, 9, 10, 11]


def test_on_ack_retires_exactly_upto_and_have():
    s = SenderStream(_ids(range(1, 9)))
    assert s.on_ack(Ack(upto=3, have=(5, 7))) == Retire((1, 2, 3, 5, 7))
    assert s.pending == _ids([4, 6, 8])
    assert s.on_ack(Ack(upto=3, have=(5, 7))) == Retire(())    # a repeated ack retires nothing new
    assert s.on_ack(Ack(upto=8)) == Retire((4, 6, 8))
    assert s.drained


def test_on_ack_above_last_is_refused_and_changes_nothing():
    s = SenderStream(_ids([1, 2]), last=3)
    with pytest.raises(RemoteProtocolError):
        s.on_ack(Ack(upto=4))
    assert s.pending == _ids([1, 2])


@pytest.mark.parametrize("want", [Want(since=4), Want(since=0, after=4), Want(since=4, after=4),
                                  Want(since=3, after=4), Want(since=4, after=2)])
def test_want_beyond_last_is_refused_like_an_ack_and_changes_nothing(want):
    s = SenderStream(_ids([1, 2]), last=3)
    with pytest.raises(RemoteProtocolError):
        s.on_want(want)
    assert s.pending == _ids([1, 2]) and s.last == 3


def test_want_up_to_last_is_accepted():
    s = SenderStream(_ids([1, 2]), last=3)
    assert s.on_want(Want(since=1, after=3)) == Batch(prev=3, last=3, items=())
    assert s.pending == _ids([2])
    assert s.on_want(Want(since=3, after=3)) == Batch(prev=3, last=3, items=())
    assert s.drained


@pytest.mark.parametrize("prev, last, seqs", [
    (0, 5, (2, 1)),          # out of order
    (0, 5, (1, 1)),          # repeated
    (2, 5, (2, 3)),          # at or below prev
    (0, 5, (4, 6)),          # above last
])
def test_batch_refuses_bad_sequence_numbers(prev, last, seqs):
    with pytest.raises(RemoteProtocolError):
        Batch(prev=prev, last=last, items=tuple(Offer(seq=s, record_id=f"r{s}") for s in seqs))


def test_batch_refuses_too_many_items():
    items = tuple(Offer(seq=s, record_id=f"r{s}") for s in range(1, MAX_BATCH + 2))
    Batch(prev=0, last=MAX_BATCH + 1, items=items[:MAX_BATCH])
    with pytest.raises(RemoteProtocolError):
        Batch(prev=0, last=MAX_BATCH + 1, items=items)


# --- acks on the wire: the have cap ----------------------------------------------

def test_ack_wire_sends_only_the_lowest_max_have():
    ack = Ack(upto=7, have=tuple(range(10, 10 + MAX_HAVE + 500)))
    wire = ack_wire(ack)
    assert MAX_HAVE == 1000
    assert wire == {"upto": 7, "have": list(range(10, 10 + MAX_HAVE))}
    assert ack_from_wire(wire) == Ack(upto=7, have=tuple(range(10, 10 + MAX_HAVE)))
    assert ack_wire(Ack(upto=3, have=(5, 9))) == {"upto": 3, "have": [5, 9]}


def test_ack_from_wire_still_accepts_up_to_10000():
    assert len(ack_from_wire({"upto": 0, "have": list(range(1, 10_001))}).have) == 10_000
    with pytest.raises(RemoteProtocolError):
        ack_from_wire({"upto": 0, "have": list(range(1, 10_002))})
    for bad in ({"upto": -1, "have": []}, {"upto": 0, "have": [True]}, {"upto": 0, "have": ["1"]}):
        with pytest.raises(RemoteProtocolError):
            ack_from_wire(bad)


def test_known_issue_a_refused_record_holds_the_cursor_and_the_cap_hides_the_rest():
    """docs/sync.md, Known issues: seq 1 is refused for good; 2..1501 are committed above it.

    Acks name only the lowest MAX_HAVE of them; a pull-only sender keeps the rest pending and lists
    them again at every pull (the recipient does not fetch them again: nothing is committed twice).
    Pushed, each is retired by its own delivered answer or receipt instead.
    """
    n = MAX_HAVE + 500
    r = RecipientStream()
    for seq in range(2, n + 2):
        r.committed(seq)
    s = SenderStream(_ids(range(1, n + 2)))
    for _ in range(2):                                   # acking twice changes nothing: the same lowest ones
        s.on_ack(ack_from_wire(ack_wire(r.ack())))
    assert r.cursor == 0
    assert sorted(s.pending) == [1, *range(MAX_HAVE + 2, n + 2)]
    batch = s.on_want(Want(since=r.cursor, after=r.cursor))
    assert [f.offer.seq for f in r.on_batch(batch)] == [1]
    assert len(batch.items) == MAX_BATCH                 # listed again, though committed


# --- the delivery table and backoff ------------------------------------------------

STATES = (outbox.QUEUED, outbox.SENDING, outbox.DELIVERED)
EVENTS = (outbox.ATTEMPT_STARTED, outbox.RECORD_ACKED, outbox.ATTEMPT_FAILED)
ALLOWED = [(s, e, t) for s, row in outbox.TRANSITIONS.items() for e, t in row.items()]
MISSING = [(s, e) for s in STATES for e in EVENTS if e not in outbox.TRANSITIONS[s]]


def test_table_shape():
    assert set(outbox.TRANSITIONS) == set(STATES)
    assert {e for row in outbox.TRANSITIONS.values() for e in row} <= set(EVENTS)
    assert len(ALLOWED) + len(MISSING) == len(STATES) * len(EVENTS)
    assert set(MISSING) == {(outbox.DELIVERED, outbox.ATTEMPT_STARTED), (outbox.DELIVERED, outbox.ATTEMPT_FAILED)}


def test_a_failed_batch_leaves_queued_records_queued():
    # Small records are batched without ever entering "sending"; a failed batch fails them from "queued".
    assert outbox.transition(outbox.QUEUED, outbox.ATTEMPT_FAILED) == outbox.QUEUED
    assert outbox.transition(outbox.SENDING, outbox.ATTEMPT_FAILED) == outbox.QUEUED
    with pytest.raises(LocalProtocolError):              # a delivered row is never failed back to queued
        outbox.transition(outbox.DELIVERED, outbox.ATTEMPT_FAILED)


@pytest.mark.parametrize("state, event, target", ALLOWED)
def test_every_allowed_transition(state, event, target):
    assert outbox.transition(state, event) == target


@pytest.mark.parametrize("state, event", MISSING)
def test_every_missing_transition_is_a_local_protocol_error(state, event):
    with pytest.raises(LocalProtocolError):
        outbox.transition(state, event)


def test_the_spec_draws_the_same_table():
    spec = (Path(__file__).resolve().parents[1] / "docs" / "sync.md").read_text("utf-8")
    rows = re.findall(r"^\| (queued|sending|delivered) \| (\w+) \| (queued|sending|delivered) \|$", spec, re.M)
    assert sorted(rows) == sorted(ALLOWED)


def test_unknown_state_or_event_is_a_local_protocol_error():
    with pytest.raises(LocalProtocolError):
        outbox.transition("lost", outbox.RECORD_ACKED)
    with pytest.raises(LocalProtocolError):
        outbox.transition(outbox.QUEUED, "Teleported")


def test_retry_delay_grows_then_stays_at_the_cap():
    floors = [outbox.retry_delay(a, 0.0) for a in range(40)]          # jitter 0: half the ceiling
    assert floors[:4] == [outbox.BASE_DELAY_MS // 2 * 2 ** a for a in range(4)]
    assert all(x <= y for x, y in zip(floors, floors[1:]))
    cap = floors.index(outbox.MAX_DELAY_MS // 2)
    assert all(x < y for x, y in zip(floors[:cap], floors[1:cap + 1]))   # doubles until the cap
    assert set(floors[cap:]) == {outbox.MAX_DELAY_MS // 2}
    assert outbox.retry_delay(10_000, 0.999999) <= outbox.MAX_DELAY_MS
    assert outbox.retry_delay(10_000, 0.999999) >= outbox.MAX_DELAY_MS - 2


@given(attempts=st.integers(0, 200), jitter=st.floats(0.0, 1.0, exclude_max=True))
@settings(max_examples=200, deadline=None)
def test_retry_delay_jitter_within_half_to_full_ceiling(attempts, jitter):
    ceiling = min(outbox.MAX_DELAY_MS, outbox.BASE_DELAY_MS * 2 ** min(attempts, 30))
    delay = outbox.retry_delay(attempts, jitter)
    assert ceiling * 0.5 - 1 <= delay <= ceiling


@pytest.mark.parametrize("jitter", [-0.01, 1.0, 1.5, math.nan, math.inf])
def test_retry_delay_refuses_jitter_outside_unit_interval(jitter):
    with pytest.raises(LocalProtocolError):
        outbox.retry_delay(1, jitter)


def test_after_failure_requeues_and_schedules():
    f = outbox.after_failure(state=outbox.SENDING, attempts=2, queued_at=1_000, now=5_000, jitter=0.5)
    assert f == outbox.Failure(state=outbox.QUEUED, attempts=3, next_try=5_000 + outbox.retry_delay(3, 0.5),
                               stale=False)


def test_after_failure_stale_flag_at_the_threshold():
    def stale(age: int) -> bool:
        return outbox.after_failure(state=outbox.SENDING, attempts=0, queued_at=0, now=age, jitter=0.0).stale
    assert not stale(outbox.STALE_AFTER_MS - 1)
    assert stale(outbox.STALE_AFTER_MS)
    assert stale(outbox.STALE_AFTER_MS * 10)


@pytest.mark.parametrize("state", [outbox.QUEUED, outbox.SENDING])
def test_after_failure_from_queued_or_sending(state):
    f = outbox.after_failure(state=state, attempts=4, queued_at=0, now=10_000, jitter=0.25)
    assert f == outbox.Failure(state=outbox.QUEUED, attempts=5, next_try=10_000 + outbox.retry_delay(5, 0.25),
                               stale=False)


def test_after_failure_never_from_delivered():
    with pytest.raises(LocalProtocolError):
        outbox.after_failure(state=outbox.DELIVERED, attempts=0, queued_at=0, now=0, jitter=0.0)


# --- small properties -----------------------------------------------------------------

_seqsets = st.sets(st.integers(1, 60), max_size=30)


@given(pending=_seqsets, extra=st.integers(0, 5), since=st.integers(0, 70), after=st.integers(0, 70),
       limit=st.integers(1, MAX_BATCH))
@settings(max_examples=300, deadline=None)
def test_on_want_builds_a_valid_batch(pending, extra, since, after, limit):
    last = max(pending, default=0) + extra
    since, after = since % (last + 1), after % (last + 1)
    s = SenderStream(_ids(pending), last=last)
    batch = s.on_want(Want(since=since, after=after), limit)   # Batch validates itself on construction
    assert Batch(prev=batch.prev, last=batch.last, items=batch.items) == batch
    start = max(since, after)
    assert [o.seq for o in batch.items] == sorted(p for p in pending if p > start)[:limit]
    assert all(o.record_id == f"r{o.seq}" for o in batch.items)
    assert (batch.prev, batch.last) == (start, last)
    assert set(s.pending) == {p for p in pending if p > since}   # retired: exactly <= since, never by after


@given(pending=_seqsets, since=st.integers(0, 70), after=st.integers(0, 70))
@settings(max_examples=200, deadline=None)
def test_on_want_beyond_last_changes_nothing(pending, since, after):
    last = max(pending, default=0)
    s = SenderStream(_ids(pending), last=last)
    if since <= last and after <= last:
        s.on_want(Want(since=since, after=after))
        return
    with pytest.raises(RemoteProtocolError):
        s.on_want(Want(since=since, after=after))
    assert s.pending == _ids(pending) and s.last == last


@given(committed=_seqsets, items=_seqsets, prev=st.integers(0, 60), after=st.integers(0, 60),
       last_extra=st.integers(0, 5))
@settings(max_examples=300, deadline=None)
def test_on_batch_never_asks_for_what_it_has(committed, items, prev, after, last_extra):
    cursor = _contiguous(committed)
    r = RecipientStream(cursor=cursor, above={s for s in committed if s > cursor})
    seqs = sorted(s for s in items if s > prev)
    batch = Batch(prev=prev, last=max(seqs, default=prev) + last_extra,
                  items=tuple(Offer(seq=s, record_id=f"r{s}") for s in seqs))
    if prev > max(cursor, after):
        with pytest.raises(RemoteProtocolError):
            r.on_batch(batch, after=after)
        return
    fetched = [f.offer.seq for f in r.on_batch(batch, after=after)]
    assert fetched == [s for s in seqs if s not in committed]
    assert not any(r.has(s) for s in fetched)


@given(pending=_seqsets, extra=st.integers(0, 5), cursor=st.integers(0, 65), limit=st.integers(1, 6))
@settings(max_examples=200, deadline=None)
def test_pipelined_pull_lists_what_one_unlimited_want_would(pending, extra, cursor, limit):
    last = max(pending, default=0) + extra
    cursor = min(cursor, last)
    whole = SenderStream(_ids(pending), last=last).on_want(Want(since=cursor), limit=10_000)
    s = SenderStream(_ids(pending), last=last)
    after, listed = cursor, []
    while True:                                          # as Puller.pull_from: since stays the starting cursor
        batch = s.on_want(Want(since=cursor, after=after), limit)
        assert batch.prev == after
        listed += batch.items
        if len(batch.items) < limit:
            break
        after = batch.items[-1].seq
    assert tuple(listed) == whole.items


@given(pending=_seqsets, upto=st.integers(0, 60), have=_seqsets)
@settings(max_examples=300, deadline=None)
def test_on_ack_retires_exactly_what_the_ack_covers(pending, upto, have):
    s = SenderStream(_ids(pending), last=60)
    done = s.on_ack(Ack(upto=upto, have=tuple(sorted(have))))
    assert set(done.seqs) == {p for p in pending if p <= upto or p in have}
    assert list(done.seqs) == sorted(done.seqs)
    assert set(s.pending) == set(pending) - set(done.seqs)


@given(order=st.lists(st.integers(1, 30), max_size=80))
@settings(max_examples=300, deadline=None)
def test_cursor_is_the_highest_contiguous_commit(order):
    r = RecipientStream()
    seen: set[int] = set()
    for seq in order:
        before = r.cursor
        ack = r.committed(seq)
        seen.add(seq)
        assert r.cursor >= before
        assert ack.upto == r.cursor == _contiguous(seen)
        assert set(ack.have) == r.above == {s for s in seen if s > r.cursor}


# --- the simulated network ------------------------------------------------------------
#
# Durable state is what the real node writes in one transaction:
#   sender:    the deliveries rows (pending seq -> id, and the highest seq ever given out);
#              a retire is written after the stream decides it, so a restart in between loses
#              the retire (never the record): `unsaved` models that window.
#   recipient: the records it committed with their seq, and the streams_in cursor, both in
#              the commit transaction (records.insert_received + _settle_stream).
# Everything else (the streams, fetches not yet committed, a pull under way, messages in flight)
# is lost on a restart.
#
# A pull is Puller.pull_from: Want(since=cursor, after=cursor); each full answer is followed at
# once, before its records are committed, by Want(since=<the same starting cursor>, after=<its
# last seq>); after the last (short) answer's records are committed, one Ack. Acks carry at most
# `cap` entries in `have` (the lowest; None: intake.ack_wire itself, MAX_HAVE).

@dataclass(frozen=True)
class Delivered:
    """A push answer's "stored"/"duplicate" with its signed receipt: the Courier retires that seq."""

    seq: int


@dataclass(frozen=True)
class Answer:
    """The outbox answer to one Want: a request and its answer travel as a pair, as in HTTP."""

    want: Want
    batch: Batch


# Weighted by repetition: progress (enqueue, send, deliver, commit) is common, faults rarer.
ACTIONS = ("enqueue", "enqueue", "push", "push", "want", "to_r", "to_r", "to_r", "to_s", "to_s", "to_s",
           "commit", "commit", "commit", "ack", "persist", "persist",
           "drop_r", "drop_s", "dup_r", "dup_s", "restart_s", "restart_r", "settle")
_action = st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7))


@dataclass
class Sim:
    limit: int                                                    # the batch size, both ends (500 in the code)
    cap: int | None = None                                        # entries of `have` an ack carries
    enqueued: dict[int, str] = field(default_factory=dict)
    s_pending: dict[int, str] = field(default_factory=dict)       # sender, durable
    s_last: int = 0                                               # sender, durable
    unsaved: set[int] = field(default_factory=set)                # sender: retired, not yet written
    sender: SenderStream = field(default_factory=SenderStream)
    r_committed: dict[int, str] = field(default_factory=dict)     # recipient, durable
    r_cursor: int = 0                                             # recipient, durable (streams_in)
    commits: Counter = field(default_factory=Counter)
    recipient: RecipientStream = field(default_factory=RecipientStream)
    fetches: list[tuple[str, Offer]] = field(default_factory=list)   # recipient: (mode, offer) to commit
    ack_owed: bool = False                                        # recipient: a pull's final ack is due
    to_r: list = field(default_factory=list)                      # in flight, sender -> recipient
    to_s: list = field(default_factory=list)                      # in flight, recipient -> sender
    high_cursor: int = 0

    # -- the two ends -------------------------------------------------------------

    def ack(self) -> Ack:
        """What the recipient sends: its stream, `have` capped as on the wire."""
        full = self.recipient.ack()
        if self.cap is None:
            return ack_from_wire(ack_wire(full))
        if len(full.have) > self.cap:
            _event("an ack left out some of have")
        return Ack(upto=full.upto, have=full.have[:self.cap])

    def enqueue(self) -> None:
        seq = self.sender.last + 1
        self.sender.enqueue(seq, f"r{seq}")
        self.enqueued[seq] = self.s_pending[seq] = f"r{seq}"      # insert_record: one transaction
        self.s_last = seq

    def push(self, k: int) -> None:
        if not self.sender.pending:
            return
        if k == 0:
            offer = self.sender.next_offer()
        else:                                  # a retry of any pending one, e.g. a record pushed alone
            seq = sorted(self.sender.pending)[k % len(self.sender.pending)]
            offer = Offer(seq=seq, record_id=self.sender.pending[seq])
        self.to_r.append(offer)

    def pull(self) -> None:
        cursor = self.recipient.cursor                # records.stream_in at the start of pull_from
        self.to_s.append(Want(since=cursor, after=cursor))

    def at_sender(self, msg) -> None:
        if isinstance(msg, Delivered):             # Courier._retire(also=[seq], receipts=...)
            if self.sender.pending.pop(msg.seq, None) is not None:
                self.unsaved.add(msg.seq)
        elif isinstance(msg, Ack):
            self.unsaved.update(self.sender.on_ack(msg).seqs)
        else:
            assert isinstance(msg, Want)
            before = set(self.sender.pending)
            self.to_r.append(Answer(msg, self.sender.on_want(msg, self.limit)))
            gone = before - set(self.sender.pending)
            assert all(s <= msg.since for s in gone), "a Want retired more than its since"
            if gone:
                _event("a Want retired records")
            if msg.after > msg.since and gone:
                _event("a pipelined Want retired records")
            self.unsaved.update(gone)

    def at_recipient(self, msg) -> None:
        if isinstance(msg, Offer):                 # push: the upload itself
            out = self.recipient.on_offer(msg)
            if not any(isinstance(e, Fetch) for e in out):   # a duplicate is answered at once
                self.to_s += [self.ack(), Delivered(msg.seq)]
            for e in out:
                if isinstance(e, Fetch):
                    self.fetches.append(("push", e.offer))
                else:
                    _event("gap: the recipient sent a Want")
                    self.to_s.append(e)
            return
        assert isinstance(msg, Answer)             # pull: Puller.pull_from and _take
        want, batch = msg.want, msg.batch
        assert batch.prev == max(want.since, want.after), "the answer does not start where it was asked"
        fetch = self.recipient.on_batch(batch, after=want.after)
        if len(batch.items) >= self.limit:         # full: ask for the next one before committing this one
            self.to_s.append(Want(since=want.since, after=batch.items[-1].seq))
            _event("pipelined: the next Want went out before this batch was committed")
            if any(not self.recipient.has(s) for s in range(want.since + 1, batch.items[-1].seq + 1)):
                _event("pipelined: asked beyond records not committed yet")
        else:
            self.ack_owed = True                   # the last answer: one ack once it is committed
        self.fetches.extend(("pull", f.offer) for f in fetch)
        self.end_pull()

    def end_pull(self) -> None:
        if self.ack_owed and not any(mode == "pull" for mode, _ in self.fetches):
            self.to_s.append(self.ack())           # POST /v1/acks, the pull's one explicit ack
            self.ack_owed = False

    def commit(self, i: int) -> None:
        mode, offer = self.fetches.pop(i % len(self.fetches))
        assert offer.record_id == self.enqueued[offer.seq], "a sequence number carried another record"
        if not self.recipient.has(offer.seq):      # intake: has_record first; a duplicate changes nothing
            self.r_committed[offer.seq] = offer.record_id
            self.commits[offer.seq] += 1
            ack = self.recipient.committed(offer.seq)
            self.r_cursor = ack.upto               # same transaction as the record
        else:
            _event("a fetched record was already committed")
        if mode == "push":                         # the PUT's answer, after the commit
            self.to_s += [self.ack(), Delivered(offer.seq)]
        self.end_pull()

    def persist(self) -> None:
        for seq in self.unsaved:
            self.s_pending.pop(seq, None)
        self.unsaved.clear()

    def restart_sender(self) -> None:
        if self.unsaved:
            _event("the sender restarted before writing a retire")
        if max(self.s_pending, default=0) < self.s_last:
            _event("the sender restarted with its newest record delivered")
        self.sender = SenderStream(dict(self.s_pending), self.s_last)
        self.unsaved.clear()

    def restart_recipient(self) -> None:
        # As records._settle_stream: the stored cursor, the committed seqs above it, settle.
        if self.recipient.above:
            _event("the recipient restarted with records above its cursor")
        r = RecipientStream(cursor=self.r_cursor)
        r.above = {s for s in self.r_committed if s > self.r_cursor}
        r.committed(r.cursor)
        self.recipient = r
        self.fetches.clear()
        self.ack_owed = False

    # -- the schedule ---------------------------------------------------------------

    def step(self, name: str, k: int) -> None:
        link = {"r": self.to_r, "s": self.to_s}
        if name == "enqueue":
            self.enqueue()
        elif name == "push":
            self.push(k)
        elif name == "want":
            self.pull()
        elif name in ("to_r", "to_s") and link[name[-1]]:
            msg = link[name[-1]].pop(k % len(link[name[-1]]))       # any one: reordering
            (self.at_recipient if name == "to_r" else self.at_sender)(msg)
        elif name.startswith("drop_") and link[name[-1]]:
            link[name[-1]].pop(k % len(link[name[-1]]))
        elif name.startswith("dup_") and link[name[-1]]:
            q = link[name[-1]]
            q.append(q[k % len(q)])
        elif name == "commit" and self.fetches:
            self.commit(k)
        elif name == "ack":
            self.to_s.append(self.ack())
        elif name == "persist":
            self.persist()
        elif name == "restart_s":
            self.restart_sender()
        elif name == "restart_r":
            self.restart_recipient()
        elif name == "settle":                     # a calm moment: everything in flight arrives
            self.flush()
        self.check()

    def check(self) -> None:
        r = self.recipient
        for seq in self.enqueued:
            # No loss: a record leaves the outbox (in memory or on disk) only once committed.
            assert seq in self.sender.pending or seq in self.r_committed, f"seq {seq} retired, never committed"
            assert seq in self.s_pending or seq in self.r_committed, f"seq {seq} retired on disk, never committed"
        assert all(n == 1 for n in self.commits.values()), f"committed twice: {self.commits}"
        assert all(self.enqueued.get(s) == rid for s, rid in self.r_committed.items())
        assert r.cursor >= self.high_cursor, f"cursor went back from {self.high_cursor} to {r.cursor}"
        self.high_cursor = r.cursor
        assert r.cursor == self.r_cursor == _contiguous(self.r_committed)
        assert {s for s in range(1, self.s_last + 2) if r.has(s)} == set(self.r_committed)
        assert self.sender.last == self.s_last == max(self.enqueued, default=0)

    # -- the quiet phase: no drops, no restarts, every message delivered in order -------

    def flush(self) -> None:
        while self.to_r or self.to_s or self.fetches:
            for name in ("to_s", "to_r", "commit"):
                self.step(name, 0)
        self.step("ack", 0)
        self.step("to_s", 0)
        while self.to_r or self.to_s or self.fetches:
            for name in ("to_s", "to_r", "commit"):
                self.step(name, 0)
        self.persist()

    def quiet(self, mode: str) -> None:
        self.flush()
        for _ in range(2 * len(self.enqueued) + 5):
            if self.quiescent():
                return
            if mode in ("push", "both"):
                self.step("push", 0)
                self.flush()
            if mode in ("pull", "both"):
                self.step("want", 0)
                self.flush()
        assert self.quiescent(), "no progress in the quiet phase"

    def quiescent(self) -> bool:
        return (not self.sender.pending and not self.s_pending and not self.to_r and not self.to_s
                and not self.fetches and self.recipient.cursor == self.s_last)


@given(schedule=st.lists(_action, min_size=20, max_size=160), limit=st.integers(1, 4),
       cap=st.sampled_from([None, 1, 2]), quiet=st.sampled_from(["push", "pull", "both"]))
@settings(max_examples=1000, deadline=None)
def test_sync_over_a_lossy_link_with_restarts(schedule, limit, cap, quiet):
    sim = Sim(limit=limit, cap=cap)
    for name, k in schedule:
        sim.step(name, k)
    sim.quiet(quiet)
    assert set(sim.r_committed) == set(sim.enqueued)
    assert all(sim.commits[s] == 1 for s in sim.enqueued)
    assert sim.sender.drained and not sim.s_pending
    assert sim.recipient.cursor == sim.s_last and not sim.recipient.above


def test_sync_scenario_gap_closed_by_a_want_after_restarts():
    sim = Sim(limit=2)
    for _ in range(3):
        sim.step("enqueue", 0)
    sim.step("push", 2)            # seq 3 first: a gap below it
    sim.step("to_r", 0)            # recipient fetches 3 and asks Want(since=0)
    assert sim.to_s == [Want(since=0)]
    sim.step("commit", 0)          # 3 committed; ack upto=0 have=(3,)
    sim.step("restart_r", 0)
    assert (sim.recipient.cursor, sim.recipient.above) == (0, {3})
    sim.step("to_s", 0)            # the Want: batch 1, 2
    sim.step("restart_s", 0)       # nothing persisted at the sender, nothing lost
    sim.step("to_s", 0)            # the ack: retires 3 (in memory)
    assert sim.sender.pending == _ids([1, 2]) and sim.s_pending == _ids([1, 2, 3])
    sim.step("to_r", 0)            # a full batch: the next Want goes out before 1 and 2 are committed
    assert sim.to_s[-1] == Want(since=0, after=2)
    sim.step("commit", 0)
    sim.step("commit", 0)
    assert sim.recipient.cursor == 3
    sim.quiet("pull")
    assert sim.commits == Counter({1: 1, 2: 1, 3: 1})


def test_sync_scenario_pipelined_pull_interrupted_by_a_restart():
    sim = Sim(limit=2)
    for _ in range(5):
        sim.step("enqueue", 0)
    sim.step("want", 0)
    assert sim.to_s == [Want(since=0, after=0)]
    sim.step("to_s", 0)
    sim.step("to_r", 0)            # answer 1, 2 (full): Want(since=0, after=2) goes out at once
    assert sim.to_s == [Want(since=0, after=2)] and [o.seq for _, o in sim.fetches] == [1, 2]
    sim.step("commit", 1)          # 2 commits; 1 does not yet
    sim.step("to_s", 0)            # retires nothing (since=0), lists 3, 4
    assert sim.to_r == [Answer(Want(since=0, after=2), _batch(2, 5, (3, 4)))]
    assert sim.sender.pending == _ids(range(1, 6))
    sim.step("to_r", 0)            # full again: Want(since=0, after=4)
    assert sim.to_s == [Want(since=0, after=4)]
    assert [o.seq for _, o in sim.fetches] == [1, 3, 4]
    sim.step("commit", 2)          # 4
    sim.step("restart_r", 0)       # 1 and 3 were fetched, never committed: lost with the pull
    assert (sim.recipient.cursor, sim.recipient.above, sim.fetches) == (0, {2, 4}, [])
    sim.step("to_s", 0)            # the pipelined Want still arrives: lists 5 only
    sim.step("to_r", 0)            # a short answer: the pull would end here, with one ack
    sim.step("commit", 0)          # 5; the ack says upto=0 have=(2, 4, 5)
    assert sim.to_s == [Ack(upto=0, have=(2, 4, 5))]
    sim.step("to_s", 0)
    assert sim.sender.pending == _ids([1, 3])    # 1 and 3 were never committed: still queued
    sim.step("want", 0)            # the next pull starts from the cursor and finds them
    sim.flush()
    assert sim.quiescent() and sim.commits == Counter({s: 1 for s in range(1, 6)})


def test_sync_scenario_capped_acks_still_drain():
    # cap=1: each ack names one record above the cursor; pushes and the cursor do the rest.
    sim = Sim(limit=3, cap=1)
    for _ in range(4):
        sim.step("enqueue", 0)
    for k in (3, 2, 1):            # 4, 3, 2 pushed alone, committed above a gap
        sim.step("push", k)
        sim.step("to_r", 0)
        sim.step("commit", 0)
    assert sim.recipient.above == {2, 3, 4}
    assert all(len(m.have) <= 1 for m in sim.to_s if isinstance(m, Ack))
    sim.quiet("pull")
    assert sim.commits == Counter({s: 1 for s in range(1, 5)})
