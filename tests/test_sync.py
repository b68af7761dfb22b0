"""The sync core and the services that drive it.

Pure tests first: the messages (round trips, every malformed field refused),
the sessions (node/sync/session.py) and the delivery state table. Then the
property test that drives the REAL services (Courier, Puller, Intake,
DeliveryEndpoints) with real stores and identities over an in-memory link that
drops, duplicates and reorders, with restarts. docs/sync.md is the prose version.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.app.courier import FAILURES, Courier, Puller
from node.app.events import EventBus, RecordReceived
from node.app.intake import Intake
from node.app.ports import Ports
from node.app.rows import place_sealed, record_row
from node.app.serving import DeliveryEndpoints
from node.core import wire
from node.core.envelope import Attachment, Head, Manifest, Recipient, Sealer, seal_bytes
from node.core.errors import (CabinetError, InvalidSignature, LocalProtocolError, PeerRefused, PeerTimeout,
                              PeerUnreachable, RemoteProtocolError)
from node.core.identity import Identity, parse_node_id
from node.store import blobs as blobstore
from node.store import records
from node.store.blobs import BlobStore
from node.store.db import Store
from node.sync import messages as m
from node.sync import outbox
from node.sync.messages import (MAX_BATCH_ITEMS, MAX_HAVE, Ack, Batch, BatchItem, Offer, PushAnswer, PushBatch,
                                PutAnswer, Receipt, Want, refusal_text)
from node.sync.session import (Attempt, Commit, Entry, Fetch, FillGap, RecipientSession, Refused, Retire,
                               ScheduleRetry, SendBatch, SendRecord, SenderSession, settle, units)
from node.transport.client import Peer
from node.transport.server import Answer

RID = "ab" * 16


def _item(seq: int, body: bytes | None = b"x") -> BatchItem:
    return BatchItem(seq=seq, record_id=f"{seq:032x}", head=b"h", size=len(body or b"xx"), body=body)


# --- messages ------------------------------------------------------------------------

def test_messages_round_trip_through_canonical_msgpack():
    msgs = [Ack(upto=3, have=(5, 9), refused=((4, "invalid-envelope"),)), Ack(upto=0),
            Batch(prev=2, last=9, items=(_item(3), _item(5, None))), Want(since=4, after=7),
            PushBatch(items=(m.PushItem(seq=1, head=b"h", body=b"b"), m.PushItem(seq=None, head=b"h", body=b""))),
            PushAnswer(results={RID: "stored"}, receipts={RID: b"r"}, ack=Ack(upto=1), reasons={}),
            PushAnswer(results={RID: "refused"}, receipts={}, ack=Ack(upto=1, refused=((1, "wrong-sender"),)),
                       reasons={RID: "wrong-sender"}),
            PutAnswer(status="stored", receipt=b"r", ack=Ack(upto=2)),
            PutAnswer(status="refused", ack=Ack(upto=2, refused=((2, "id-taken"),)), reason="id-taken")]
    for msg in msgs:
        assert type(msg).from_wire(wire.unpack(wire.pack(msg.to_wire()))) == msg


def test_existing_wire_format_is_unchanged():
    # v1 peers send and expect exactly these shapes: no `refused` key unless there is a refusal.
    assert Ack(upto=3, have=(5,)).to_wire() == {"upto": 3, "have": [5]}
    assert PutAnswer(status="duplicate", receipt=b"r", ack=None).to_wire() == {"status": "duplicate", "receipt": b"r",
                                                                              "ack": None}
    assert set(PushAnswer(results={}, receipts={}, ack=Ack(upto=0), reasons={}).to_wire()) == {"results", "receipts",
                                                                                              "ack"}
    assert _item(1).to_wire() == {"seq": 1, "id": f"{1:032x}", "head": b"h", "size": 1, "body": b"x"}


def test_ack_sends_only_the_lowest_max_have_and_accepts_up_to_10000():
    ack = Ack(upto=7, have=tuple(range(10, 10 + MAX_HAVE + 50)))
    assert Ack.from_wire(ack.to_wire()) == Ack(upto=7, have=tuple(range(10, 10 + MAX_HAVE)))
    assert len(Ack.from_wire({"upto": 0, "have": list(range(1, 10_001))}).have) == 10_000
    with pytest.raises(RemoteProtocolError):
        Ack.from_wire({"upto": 0, "have": list(range(1, 10_002))})


def test_ack_sends_the_highest_refusals():
    ack = Ack(upto=500, refused=tuple((s, "invalid-envelope") for s in range(1, 301)))
    assert [s for s, _ in Ack.from_wire(ack.to_wire()).refused] == list(range(201, 301))


BAD_WIRE = [
    (Ack, {"upto": -1, "have": []}), (Ack, {"upto": True, "have": []}), (Ack, {"upto": 1}),
    (Ack, {"upto": 1, "have": [0]}), (Ack, {"upto": 1, "have": ["2"]}), (Ack, {"upto": 1, "have": 3}),
    (Ack, {"upto": 1, "have": [], "refused": [[2]]}), (Ack, {"upto": 1, "have": [], "refused": [[2, "BAD CODE"]]}),
    (Ack, {"upto": 1, "have": [], "refused": [["2", "x"]]}), (Ack, {"upto": 1, "have": [], "extra": 1}),
    (Ack, {"upto": 2**63, "have": []}), (Ack, [1, 2]),
    (Want, {"since": -1}), (Want, {"since": 1, "after": "2"}),
    (Batch, {"prev": 0, "last": 1}), (Batch, {"prev": "0", "last": 1, "items": []}),
    (Batch, {"prev": 0, "last": 1, "items": [{"seq": 1, "id": "zz", "head": b"", "size": 0, "body": None}]}),
    (Batch, {"prev": 0, "last": 1, "items": [{"seq": 1, "id": RID, "head": b"", "size": 3, "body": b"x"}]}),
    (Batch, {"prev": 0, "last": 1, "items": [{"seq": 1, "id": RID, "head": "h", "size": 1, "body": None}]}),
    (Batch, {"prev": 0, "last": 1, "items": [{"seq": 1, "id": RID, "head": b"", "size": -1, "body": None}]}),
    (Batch, {"prev": 0, "last": 1, "items": [{"seq": 1, "id": RID, "head": b"", "size": 1, "body": None, "x": 1}]}),
    (Batch, {"prev": 1, "last": 2, "items": [_item(1).to_wire()]}),
    (Batch, {"prev": 0, "last": 2, "items": [_item(2).to_wire(), _item(1).to_wire()]}),
    (Batch, {"prev": 0, "last": 9, "items": [_item(3).to_wire(), _item(3).to_wire()]}),
    (Batch, {"prev": 0, "last": 1, "items": [_item(2).to_wire()]}),
    (PushBatch, {"items": [{"seq": 0, "head": b"", "body": b""}]}), (PushBatch, {"items": [{"head": b""}]}),
    (PushBatch, {"items": [{"seq": 1, "head": b"", "body": b"", "x": 1}]}), (PushBatch, {"items": "x"}),
    (PushBatch, {"items": [{"seq": 1, "head": b"h" * (65 * 1024), "body": b""}]}),
    (PushAnswer, {"results": {RID: "kept"}, "receipts": {}, "ack": {"upto": 0, "have": []}}),
    (PushAnswer, {"results": {}, "receipts": {RID: "r"}, "ack": {"upto": 0, "have": []}}),
    (PushAnswer, {"results": {}, "receipts": {}}),
    (PushAnswer, {"results": {}, "receipts": {}, "ack": {"upto": 0, "have": []}, "reasons": {RID: 3}}),
    (PutAnswer, {"status": "kept"}), (PutAnswer, {"status": "refused"}), (PutAnswer, {"status": "stored", "receipt": 1}),
    (PutAnswer, {"status": "stored", "ack": {"upto": -1, "have": []}}),
]


@pytest.mark.parametrize("cls, obj", BAD_WIRE)
def test_every_malformed_field_is_one_remote_protocol_error(cls, obj):
    with pytest.raises(RemoteProtocolError):
        cls.from_wire(obj)


def test_batch_refuses_too_many_items():
    items = tuple(_item(s) for s in range(1, MAX_BATCH_ITEMS + 2))
    Batch(prev=0, last=MAX_BATCH_ITEMS + 1, items=items[:MAX_BATCH_ITEMS])
    with pytest.raises(RemoteProtocolError):
        Batch(prev=0, last=MAX_BATCH_ITEMS + 1, items=items)


def test_receipt_signs_and_verifies_and_refuses_forgeries():
    me, other = Identity.generate(), Identity.generate()
    raw = Receipt.make(me, RID, "delivered", 1234)
    r = Receipt.verify(raw, me.sign_public, RID)
    assert (r.record_id, r.status, r.at, r.by) == (RID, "delivered", 1234, me.sign_public)
    with pytest.raises(InvalidSignature):
        Receipt.verify(raw, other.sign_public)
    with pytest.raises(InvalidSignature):
        Receipt.verify(raw, me.sign_public, "cd" * 16)
    forged = Receipt(record_id=RID, by=me.sign_public, status="delivered", at=1).sign(other)
    with pytest.raises(InvalidSignature):
        Receipt.verify(forged, me.sign_public)
    with pytest.raises(RemoteProtocolError):
        Receipt.verify(Receipt.make(me, RID, "lost", 1), me.sign_public)
    with pytest.raises(RemoteProtocolError):
        Receipt.verify(b"\x00" * 5000, me.sign_public)


def test_the_small_body_limit_is_the_store_s_inline_limit():
    assert m.MAX_SMALL_BODY == blobstore.INLINE_MAX


def test_every_refusal_reads_as_plain_words():
    assert all(refusal_text(c) == t for c, t in m.REFUSALS.items())
    assert "future-reason" in refusal_text("future-reason")


# --- the sender's session --------------------------------------------------------------

def _sender(seqs, last=None, size=10) -> SenderSession:
    return SenderSession("B", [Entry(seq=s, record_id=f"r{s}", size=size) for s in seqs], last=last or 0)


def test_enqueue_numbers_must_increase():
    s = _sender([1, 2])
    with pytest.raises(LocalProtocolError):
        s.enqueue(Entry(seq=2, record_id="x", size=1))
    s.enqueue(Entry(seq=3, record_id="r3", size=1))
    assert s.last == 3 and set(s.pending) == {1, 2, 3}


def test_load_keeps_the_session_in_step_with_the_store():
    s = _sender([1, 2, 3])
    s.load(Entry(seq=2, record_id="r2", size=1, state=outbox.DELIVERED))
    s.load(Entry(seq=7, record_id="r7", size=1))
    assert set(s.pending) == {1, 3, 7} and s.last == 7


def test_resync_takes_the_store_s_pending_deliveries_as_the_whole_truth():
    s = _sender([1, 2, 3])
    s.resync([Entry(seq=3, record_id="r3", size=1, attempts=2, next_try=50), Entry(seq=5, record_id="r5", size=1)])
    assert set(s.pending) == {3, 5} and s.pending[3].attempts == 2 and s.last == 5     # 1 and 2 were settled
    s.resync([])
    assert s.pending == {} and s.last == 5                                            # numbers never go back


def test_records_a_recipient_is_pulling_are_not_pushed_until_the_grace_ends():
    s = _sender([1, 2, 3])
    s.defer([1, 2, 9], until=100)                                     # 9: not pending, ignored
    assert [o.seq for u in s.due(50) for o in u.offers] == [3]
    assert [o.seq for u in s.due(100) for o in u.offers] == [1, 2, 3]
    s.defer([1], until=10)                                            # never brings a retry forward
    assert s.pending[1].next_try == 100 and s.pending[3].next_try == 0


def test_on_ack_retires_exactly_upto_and_have_and_refuses_the_refused():
    s = _sender(range(1, 8))
    effects = s.on_ack(Ack(upto=3, have=(5,), refused=((2, "invalid-envelope"), (6, "wrong-sender"))))
    assert effects == [Refused(seq=2, record_id="r2", reason="invalid-envelope"),
                       Refused(seq=6, record_id="r6", reason="wrong-sender"), Retire(seqs=(1, 3, 5))]
    assert set(s.pending) == {4, 7}
    assert s.on_ack(Ack(upto=3, have=(5,))) == []               # a repeated ack retires nothing new


def test_on_ack_above_last_is_refused_and_changes_nothing():
    s = _sender([1, 2])
    for ack in (Ack(upto=3), Ack(upto=0, refused=((3, "x"),))):
        with pytest.raises(RemoteProtocolError):
            s.on_ack(ack)
    assert set(s.pending) == {1, 2}


def test_on_want_retires_up_to_since_lists_after_after_and_respects_the_limit():
    s = _sender(range(1, 10))
    listing, effects = s.on_want(Want(since=2, after=4), limit=3)
    assert effects == [Retire(seqs=(1, 2))]
    assert (listing.prev, listing.last, [o.seq for o in listing.offers]) == (4, 9, [5, 6, 7])
    assert set(s.pending) == set(range(3, 10))                  # `after` retires nothing


@pytest.mark.parametrize("want", [Want(since=4), Want(since=0, after=4)])
def test_want_beyond_last_is_refused_and_changes_nothing(want):
    s = _sender([1, 2, 3])
    with pytest.raises(RemoteProtocolError):
        s.on_want(want)
    assert set(s.pending) == {1, 2, 3}


def test_on_want_lists_settled_records_again_for_a_recipient_that_went_back():
    # A recipient restored from a backup asks from 2; the sender holds 3..5 as delivered, 6..7 pending.
    s = _sender([6, 7])
    s.load(Entry(seq=5, record_id="r5", size=1, state=outbox.DELIVERED))
    settled = [Offer(seq=q, record_id=f"r{q}") for q in (1, 2, 3, 4, 5)]
    listing, effects = s.on_want(Want(since=2, after=2), settled=settled)
    assert effects == [] and listing.prev == 2
    assert [(o.seq, o.record_id) for o in listing.offers] == [(3, "r3"), (4, "r4"), (5, "r5"), (6, "r6"),
                                                              (7, "r7")]     # nothing at or below `since`
    listing, _ = s.on_want(Want(since=2, after=4), limit=2, settled=settled)
    assert [o.seq for o in listing.offers] == [5, 6]              # `after` and the limit hold for both kinds
    assert set(s.pending) == {6, 7}                                # listing again changes no state


def test_on_want_never_lists_a_settled_seq_inside_a_void_or_beyond_last():
    s = SenderSession("B", last=3, voids=[(4, 10)])
    s.load(Entry(seq=11, record_id="r11", size=1))
    bogus = [Offer(seq=q, record_id=f"r{q}") for q in (3, 5, 12)]
    listing, _ = s.on_want(Want(since=1), settled=bogus)
    assert [o.seq for o in listing.offers] == [3, 11] and listing.void == (4, 10)
    assert SenderSession.settled_from(Want(since=3, after=7)) == 7


def test_on_want_merges_to_the_lowest_limit_of_both_kinds():
    s = _sender(range(2, MAX_BATCH_ITEMS + 10, 2))               # even seqs pending
    settled = [Offer(seq=q, record_id=f"r{q}") for q in range(1, MAX_BATCH_ITEMS + 10, 2)]   # odd ones settled
    listing, _ = s.on_want(Want(since=0), limit=10_000, settled=settled)
    assert [o.seq for o in listing.offers] == list(range(1, MAX_BATCH_ITEMS + 1))
    assert Batch(prev=0, last=s.last, items=tuple(_item(o.seq) for o in listing.offers)).full


def test_held_unknown_leaves_out_the_top_of_a_void_where_a_skipping_cursor_lands():
    s = SenderSession("B", last=3, voids=[(4, 1_000_003)])
    assert s.held_unknown([4, 7, 1_000_003, 1_000_004, 2]) == (4, 7)


def test_due_groups_small_records_and_sends_large_ones_alone():
    s = SenderSession("B", [Entry(seq=1, record_id="r1", size=10), Entry(seq=2, record_id="r2", size=10),
                            Entry(seq=3, record_id="r3", size=m.MAX_SMALL_BODY + 1),
                            Entry(seq=4, record_id="r4", size=10), Entry(seq=5, record_id="r5", size=10, next_try=99)])
    assert s.due(now=50) == [SendBatch(offers=(Offer(seq=1, record_id="r1"), Offer(seq=2, record_id="r2"))),
                             SendRecord(offer=Offer(seq=3, record_id="r3")),
                             SendBatch(offers=(Offer(seq=4, record_id="r4"),))]
    assert s.due(now=50, only=[5]) == [SendBatch(offers=(Offer(seq=5, record_id="r5"),))]
    assert s.next_due() == 0


def test_units_respect_the_item_and_byte_limits():
    many = [Entry(seq=s, record_id=f"r{s}", size=1) for s in range(1, MAX_BATCH_ITEMS + 2)]
    assert [len(u.offers) for u in units(many)] == [MAX_BATCH_ITEMS, 1]
    heavy = [Entry(seq=s, record_id=f"r{s}", size=m.MAX_SMALL_BODY) for s in range(1, 41)]
    per = m.MAX_BATCH_BYTES // (m.MAX_SMALL_BODY + m.HEAD_ALLOWANCE)
    assert [len(u.offers) for u in units(heavy)][0] == per


def test_a_failure_schedules_a_retry_and_never_touches_a_delivered_record():
    s = _sender([1, 2])
    assert s.on_attempt(1) == [Attempt(seq=1, record_id="r1", state=outbox.SENDING)]
    s.on_ack(Ack(upto=0, have=(2,)))
    effects = s.on_failure([1, 2], "down", now=1000, jitter=0.0)
    assert effects == [ScheduleRetry(seq=1, record_id="r1", state=outbox.QUEUED, attempts=1, next_try=1000 + 2000,
                                     stale=False, newly_stale=False, why="down")]
    assert s.due(now=2999) == [] and s.next_due() == 3000


def test_on_answer_retires_the_receipted_and_refuses_the_refused():
    s = _sender([1, 2, 3])
    effects = s.on_answer(delivered={1: b"r1"}, refused={2: "id-taken"}, ack=Ack(upto=0, have=(1,)))
    assert Refused(seq=2, record_id="r2", reason="id-taken") in effects
    assert Retire(seqs=(1,), receipts={}) in effects or Retire(seqs=(1,), receipts={1: b"r1"}) in effects
    assert set(s.pending) == {3}


# --- the recipient's session -------------------------------------------------------------

def test_settle_moves_over_closed_gaps_only():
    assert settle(0, [2, 4]) == (0, (2, 4))
    assert settle(0, [1, 2, 4]) == (2, (4,))
    assert settle(5, [3, 6]) == (6, ())


def test_on_batch_commits_inline_fetches_the_rest_and_skips_what_is_here():
    r = RecipientSession("A", Ack(upto=2, have=(4,), refused=((5, "invalid-envelope"),)))
    effects = r.on_batch(Batch(prev=2, last=9, items=(_item(3), _item(4), _item(5), _item(6, None), _item(7))))
    assert effects == [Commit(items=(_item(3), _item(7))), Fetch(item=_item(6, None))]


def test_on_batch_refuses_a_batch_starting_after_what_was_asked():
    r = RecipientSession("A", Ack(upto=2))
    with pytest.raises(RemoteProtocolError):
        r.on_batch(Batch(prev=3, last=9, items=()))
    assert r.on_batch(Batch(prev=3, last=9, items=()), after=3) == []


def test_a_gap_asks_for_a_pull_and_a_closed_one_does_not():
    r = RecipientSession("A")
    assert r.on_committed(Ack(upto=0, have=(2,))) == [FillGap(since=0)]
    assert r.on_offer(Offer(seq=3, record_id="x")) == [FillGap(since=0)]
    assert r.on_committed(Ack(upto=2)) == []
    assert r.on_offer(Offer(seq=3, record_id="x")) == []
    with pytest.raises(LocalProtocolError):
        r.on_committed(Ack(upto=1))


@given(order=st.lists(st.integers(1, 30), max_size=60), refused=st.sets(st.integers(1, 30), max_size=5))
@settings(max_examples=200, deadline=None)
def test_the_cursor_is_the_highest_contiguous_settled_seq(order, refused):
    settled = set(order) | refused
    cursor, above = settle(0, settled)
    n = 0
    while n + 1 in settled:
        n += 1
    assert cursor == n and set(above) == {s for s in settled if s > n}


@given(pending=st.sets(st.integers(1, 40), max_size=25), upto=st.integers(0, 45),
       have=st.sets(st.integers(1, 45), max_size=10), refused=st.sets(st.integers(1, 45), max_size=4))
@settings(max_examples=200, deadline=None)
def test_an_ack_settles_exactly_what_it_covers(pending, upto, have, refused):
    s = _sender(pending, last=45)
    effects = s.on_ack(Ack(upto=upto, have=tuple(sorted(have)), refused=tuple((r, "x") for r in sorted(refused))))
    refused_now = {e.seq for e in effects if isinstance(e, Refused)}
    retired = {q for e in effects if isinstance(e, Retire) for q in e.seqs}
    assert refused_now == pending & refused
    assert retired == {q for q in pending - refused if q <= upto or q in have}
    assert set(s.pending) == pending - refused_now - retired


# --- the delivery state table ----------------------------------------------------------

STATES = (outbox.QUEUED, outbox.SENDING, outbox.DELIVERED, outbox.REFUSED)
EVENTS = (outbox.ATTEMPT_STARTED, outbox.RECORD_ACKED, outbox.ATTEMPT_FAILED, outbox.RECORD_REFUSED)
ALLOWED = [(s, e, t) for s, row in outbox.TRANSITIONS.items() for e, t in row.items()]
MISSING = [(s, e) for s in STATES for e in EVENTS if e not in outbox.TRANSITIONS[s]]


def test_table_shape():
    assert set(outbox.TRANSITIONS) == set(STATES)
    assert set(outbox.PENDING) | set(outbox.SETTLED) == set(STATES)
    assert {t for row in outbox.TRANSITIONS.values() for t in row.values()} <= set(STATES)
    for state in outbox.SETTLED:                 # nothing leaves a settled state
        assert set(outbox.TRANSITIONS[state].values()) == {state}


@pytest.mark.parametrize("state, event, target", ALLOWED)
def test_every_allowed_transition(state, event, target):
    assert outbox.transition(state, event) == target


@pytest.mark.parametrize("state, event", MISSING)
def test_every_missing_transition_is_a_local_protocol_error(state, event):
    with pytest.raises(LocalProtocolError):
        outbox.transition(state, event)


def test_the_spec_draws_the_same_table():
    spec = (Path(__file__).resolve().parents[1] / "docs" / "sync.md").read_text("utf-8")
    names = "|".join(STATES)
    rows = re.findall(rf"^\| ({names}) \| (\w+) \| ({names}) \|$", spec, re.M)
    assert sorted(rows) == sorted(ALLOWED)


def test_retry_delay_grows_then_stays_at_the_cap():
    assert outbox.retry_delay(0, 0.0) == outbox.BASE_DELAY_MS // 2
    assert outbox.retry_delay(1, 0.0) == outbox.BASE_DELAY_MS
    assert outbox.retry_delay(40, 0.999) <= outbox.MAX_DELAY_MS


@pytest.mark.parametrize("jitter", [-0.01, 1.0, math.nan, math.inf])
def test_retry_delay_refuses_jitter_outside_unit_interval(jitter):
    with pytest.raises(LocalProtocolError):
        outbox.retry_delay(1, jitter)


def test_after_failure_stale_flag_at_the_threshold():
    f = outbox.after_failure(state=outbox.QUEUED, attempts=0, queued_at=0, now=outbox.STALE_AFTER_MS, jitter=0.0)
    assert f.stale and f.state == outbox.QUEUED and f.attempts == 1
    assert not outbox.after_failure(state=outbox.QUEUED, attempts=0, queued_at=1, now=outbox.STALE_AFTER_MS,
                                    jitter=0.0).stale


# --- the real services over a lossy in-memory link ------------------------------------
#
# Courier, Puller, Intake and DeliveryEndpoints, built from ports over real stores (SQLite and
# blob files in temporary folders) and real identities, talk through `Link`, which stands in for
# the transport client: it calls the other side's DeliveryEndpoints directly, passes every
# message through canonical msgpack, and drops, duplicates, delays (replays late) and cuts
# answers with a seeded rng. Either side is closed and rebuilt from its folder at any time.

A_ID, B_ID, C_ID = Identity.generate(), Identity.generate(), Identity.generate()
T0 = 1_700_000_000_000


def _seal(sender: Identity, to: Identity, n: int, attachment: bytes = b"") -> tuple[bytes, bytes, Manifest]:
    atts = (Attachment(name="scan.bin", size=len(attachment), type="application/octet-stream"),) if attachment else ()
    m = Manifest(patient=f"Patient {n}", born="1970-01-01", subject=f"n{n}", letter="Cher confrère", attachments=atts)
    sealer = Sealer(sender=sender, recipients=[Recipient(parse_node_id(to.node_id), to.enc_public)],
                    kind="referral", created=T0 + n)
    head, body = seal_bytes(sealer, m, [attachment] if attachment else [])
    return head, body, m


# Eight good records (one of them large: streamed with PUT and downloaded in pieces) and one
# sealed for someone else, which the recipient must refuse for good.
RECORDS = [_seal(A_ID, B_ID, n, os.urandom(300_000) if n == 3 else b"") for n in range(8)] + [_seal(A_ID, C_ID, 8)]
BAD = Head.from_wire(RECORDS[8][0]).header.id_hex
GOOD = {Head.from_wire(h).header.id_hex for h, _, _ in RECORDS[:8]}


class Keys:
    storage_key = b"s" * 32
    index_key = b"i" * 32


class Side:
    """One practice: its folder, and its services while 'running'."""

    def __init__(self, folder: Path, identity: Identity, clock, rng: random.Random, link: "Link") -> None:
        self.folder, self.identity, self.clock, self.rng, self.link = folder, identity, clock, rng, link
        self.received = 0                         # RecordReceived events, over every restart
        self.store: Store | None = None

    def start(self) -> None:
        folder = self.folder
        folder.mkdir(exist_ok=True)
        self.store = Store(folder / "cabinet.db")
        self.events = EventBus()
        self.sub = self.events.subscribe(RecordReceived)
        self.ports = Ports(folder=folder, config=None, identity=self.identity, keys=Keys(), store=self.store,
                           blobs=BlobStore(folder), client=self.link, events=self.events, clock=self.clock,
                           rng=self.rng)
        locate = lambda c: Peer(c["node_id"], c["sign_key"], ("mem://",))
        self.intake = Intake(self.ports)
        self.courier = Courier(self.ports, locate)
        self.puller = Puller(self.ports, self.intake, locate)

        async def sign_key_for(node_id: str) -> bytes | None:
            row = await self.store.call(records.contact_by_id, node_id)
            return row["sign_key"] if row else None

        self.endpoints = DeliveryEndpoints(self.ports, self.intake, self.puller, self.courier, sign_key_for)

    async def stop(self) -> None:
        self.received += len(self.sub.pending())
        await asyncio.to_thread(self.intake.close)
        await asyncio.to_thread(self.store.close)


class Link:
    """The transport client of one side, wired to the other side's DeliveryEndpoints."""

    def __init__(self, me: Identity, rng: random.Random, faults: bool) -> None:
        self.me, self.rng, self.faults = me, rng, faults
        self.other: Side | None = None
        self.late: list[Callable[[], Awaitable[object]]] = []      # requests delivered later (reordered)

    async def _call(self, request: Callable[[], Awaitable[Answer]]) -> dict:
        if self.late and self.faults and self.rng.random() < 0.3:
            with contextlib.suppress(CabinetError):
                await self.late.pop(0)()                            # an old request arrives now
        if self.faults and self.rng.random() < 0.15:
            raise PeerUnreachable("dropped on the way there")
        if self.faults and self.rng.random() < 0.1:
            self.late.append(request)                               # it also arrives again, later
        if self.faults and self.rng.random() < 0.1:
            with contextlib.suppress(CabinetError):
                await request()                                     # duplicated at once
        answer = await request()
        if self.faults and self.rng.random() < 0.15:
            raise PeerTimeout("the answer was lost")
        body = wire.unpack(wire.pack(answer.body), max_size=10 << 20)
        if answer.status != 200:
            raise PeerRefused(f"refused: {body.get('error', answer.status)}", answer.status)
        return body

    @property
    def _ep(self) -> DeliveryEndpoints:
        return self.other.endpoints

    async def push_batch(self, peer: Peer, items: list) -> dict:
        raw = wire.unpack(wire.pack({"items": [{"seq": s, "head": h, "body": b} for s, h, b in items]}), max_size=10 << 20)
        return await self._call(lambda: self._ep.receive_batch(self.me.node_id, raw))

    async def push_record(self, peer, record_id, head_raw, body_size, read_from, progress=None, seq=None) -> dict:
        offset = 0
        for _ in range(3):
            async def put(offset=offset):
                return await self._ep.receive_record(self.me.node_id, record_id, head_raw, offset, seq, read_from(offset))
            try:
                return await self._call(put)
            except PeerRefused as exc:
                if exc.status != 409:
                    raise
            status = await self._ep.record_status(self.me.node_id, record_id)
            if status.body.get("stored"):
                return status.body | {"status": "duplicate"}
            offset = status.body["have"]
        raise PeerRefused("the peer keeps asking for a different offset", 409)

    async def fetch_outbox(self, peer: Peer, since: int, limit: int = 500, after: int = 0) -> dict:
        return await self._call(lambda: self._ep.outbox_for(self.me.node_id, since, limit, after))

    async def send_ack(self, peer: Peer, ack: dict) -> dict:
        msg = wire.unpack(wire.pack(ack))
        return await self._call(lambda: self._ep.receive_ack(self.me.node_id, msg))

    async def send_receipts(self, peer: Peer, receipts: list[bytes]) -> dict:
        return await self._call(lambda: self._ep.receive_receipts(self.me.node_id, receipts))

    async def download_body(self, peer: Peer, record_id: str, offset: int):
        if self.faults and self.rng.random() < 0.15:
            raise PeerUnreachable("dropped on the way there")
        size, pieces = await self._ep.body_for(self.me.node_id, record_id, offset)
        cut = self.faults and self.rng.random() < 0.3
        sent = 0
        async for piece in pieces:
            if cut and sent > 0:
                raise PeerUnreachable("connection cut in the middle of the body")
            sent += len(piece)
            yield piece


async def _world(tmp: Path, seed: int, faults: bool):
    rng = random.Random(seed)
    now = [T0]
    clock = lambda: now[0]
    la, lb = Link(A_ID, rng, faults), Link(B_ID, rng, faults)
    tmp = Path(tempfile.mkdtemp(dir=tmp))           # hypothesis runs many examples in one tmp_path
    a = Side(tmp / "a", A_ID, clock, random.Random(seed + 1), la)
    b = Side(tmp / "b", B_ID, clock, random.Random(seed + 2), lb)
    la.other, lb.other = b, a
    a.start(), b.start()
    for me, other in ((a, B_ID), (b, A_ID)):
        desc = other.descriptor(name=f"Dr {other.node_id[:4]}", seq=1, now_ms=T0)
        await me.store.call(records.upsert_contact, desc, desc.name, T0)
    return a, b, now


async def _queue(a: Side, n: int) -> None:
    head_raw, body, manifest = RECORDS[n]
    header = Head.from_wire(head_raw).header
    tmp = a.ports.blobs.incoming / f"{header.id_hex}.sealing"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(body)
    inline = place_sealed(a.ports, tmp, header.id_hex, len(body))
    row = dict(record_row(a.ports, header, head_raw, manifest, "out"), body=inline)
    await a.store.call(records.insert_record, row, recipients=[B_ID.node_id], now=a.clock(), event="sent")


async def _step(action: str, a: Side, b: Side, now: list[int], queued: list[int]) -> None:
    if action == "queue" and queued[0] < len(RECORDS):
        await _queue(a, queued[0])                # as another process (`cabinet send`) would
        queued[0] += 1
    elif action == "push":
        await a.courier.run_due()
    elif action == "deliver" and queued[0]:
        rid = Head.from_wire(RECORDS[queued[0] - 1][0]).header.id_hex
        await a.courier.deliver_record(rid)
    elif action == "pull":
        contact = await b.store.call(records.contact_by_id, A_ID.node_id)
        with contextlib.suppress(*FAILURES):
            await b.puller.pull_from(contact)
    elif action == "gap":                          # a pull the endpoints asked for (Puller.soon)
        for node_id in list(b.puller._soon):
            b.puller._soon.discard(node_id)
            with contextlib.suppress(*FAILURES):
                await b.puller.pull_from(await b.store.call(records.contact_by_id, node_id))
    elif action == "time":
        now[0] += 10 * 60 * 1000
    elif action in ("restart-a", "restart-b"):
        side = a if action == "restart-a" else b
        await side.stop()
        side.start()


async def _run(tmp: Path, seed: int, schedule: list[str]) -> None:
    a, b, now = await _world(tmp, seed, faults=True)
    queued = [0]
    for n in range(3):
        await _step("queue", a, b, now, queued)
    for action in schedule:
        await _step(action, a, b, now, queued)
    # Then the network heals: everything queued ends up delivered (or refused) by push or pull.
    a.link.faults = b.link.faults = False
    while queued[0] < len(RECORDS):
        await _step("queue", a, b, now, queued)
    for round_ in range(4):
        now[0] += 2 * 3600 * 1000
        await _step("push" if round_ % 2 == 0 else "pull", a, b, now, queued)
    await _step("pull", a, b, now, queued)

    got = {r["id"] for r in b.store.call_sync(records.list_records, "in")}
    assert got == GOOD                                         # exactly the sender's records
    states = {d["record_id"]: d["state"] for d in a.store.call_sync(records.deliveries)}
    assert {rid for rid, s in states.items() if s == outbox.DELIVERED} == GOOD
    assert states[BAD] == outbox.REFUSED
    bad_row = [d for d in a.store.call_sync(records.deliveries) if d["record_id"] == BAD][0]
    assert bad_row["last_error"] == refusal_text("invalid-envelope")
    ack = b.store.call_sync(records.stream_in, A_ID.node_id)
    assert ack.upto == len(RECORDS) and ack.have == ()         # the cursor moved past the refusal
    await a.stop()
    await b.stop()
    assert b.received == len(GOOD)                             # each stored once, over every restart


_ACTIONS = st.sampled_from(["queue", "push", "push", "deliver", "pull", "pull", "gap", "time", "restart-a",
                            "restart-b"])


@given(seed=st.integers(0, 2**32), schedule=st.lists(_ACTIONS, min_size=4, max_size=14))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_real_services_over_a_lossy_link_with_restarts(tmp_path, seed, schedule):
    asyncio.run(_run(tmp_path, seed, schedule))


async def _restored_recipient_pulls_again(tmp: Path) -> None:
    import shutil
    a, b, now = await _world(tmp, 7, faults=False)
    queued = [0]
    for action in ("queue", "queue", "push"):
        await _step(action, a, b, now, queued)
    await b.stop()
    shutil.copytree(b.folder, b.folder.with_name("backup"))      # the recipient's backup: records 0 and 1
    b.start()
    for action in ("queue", "queue", "queue", "push", "pull"):    # 2, 3 (large) and 4 after the backup
        await _step(action, a, b, now, queued)
    states = {d["record_id"]: d["state"] for d in a.store.call_sync(records.deliveries)}
    assert len(states) == 5 and set(states.values()) == {outbox.DELIVERED}
    await b.stop()
    shutil.rmtree(b.folder)
    shutil.copytree(b.folder.with_name("backup"), b.folder)      # the disk died; restored
    b.start()
    assert b.store.call_sync(records.stream_in, A_ID.node_id).upto == 2
    await _step("pull", a, b, now, queued)
    rows = b.store.call_sync(records.list_records, "in")
    want = {Head.from_wire(RECORDS[n][0]).header.id_hex for n in range(5)}
    assert sorted(r["id"] for r in rows) == sorted(want)        # each exactly once
    assert b.store.call_sync(records.stream_in, A_ID.node_id).upto == 5
    assert a.store.call_sync(records.deliveries) and \
        {d["state"] for d in a.store.call_sync(records.deliveries)} == {outbox.DELIVERED}
    assert len(a.store.call_sync(records.deliveries)) == 5      # nothing queued twice at the sender
    await _step("pull", a, b, now, queued)                        # a later pull lists nothing new
    assert len(b.store.call_sync(records.list_records, "in")) == 5
    await a.stop()
    await b.stop()


def test_a_recipient_restored_from_a_backup_pulls_what_the_sender_holds_as_delivered(tmp_path):
    asyncio.run(_restored_recipient_pulls_again(tmp_path))


# --- an existing data folder opens with the new schema ----------------------------------------

def test_a_database_made_with_schema_1_is_migrated_and_keeps_its_outbox(tmp_path):
    import sqlite3
    from node.store import db as dbmod
    old = dbmod.SCHEMA.replace("    refused    INTEGER,\n", "")
    old = old[:old.index("CREATE TABLE IF NOT EXISTS refused_in")] + old[old.index("CREATE TABLE IF NOT EXISTS receipts_out"):]
    path = tmp_path / "cabinet.db"
    conn = sqlite3.connect(path)
    conn.executescript(old)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', 1)")
    conn.execute("INSERT INTO records (id, direction, kind, sender, thread, created, stored, head, body_size, meta, "
                 "patient_ix) VALUES (?, 'out', 'referral', 'me', 't', 1, 1, x'00', 3, x'00', x'00')", (RID,))
    conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                 "VALUES (?, 'B', 1, 'queued', 0, 0)", (RID,))
    conn.commit()
    conn.close()
    assert "refused" not in [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(deliveries)")]

    store = Store(path)
    try:
        assert store.call_sync(lambda db: db.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]) == dbmod.SCHEMA_VERSION
        assert store.call_sync(records.pending_for, "B") == {1: RID}
        assert store.call_sync(records.refuse, "B", 1, reason="refused: test", now=5) == RID
        row = store.call_sync(records.deliveries, RID)[0]
        assert (row["state"], row["refused"], row["last_error"]) == (outbox.REFUSED, 5, "refused: test")
        ack = store.call_sync(records.refuse_received, "A", 1, RID, "invalid-envelope", now=5)
        assert ack == Ack(upto=1, refused=((1, "invalid-envelope"),))
    finally:
        store.close()
    Store(path).close()                           # and opens again, already migrated
