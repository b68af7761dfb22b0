"""The sync protocol's messages and limits: the only codecs of these messages.

Each message is a frozen, slotted, keyword-only dataclass with `to_wire()`
(a dict for canonical msgpack, or query parameters) and `from_wire()`, which
checks every field and raises RemoteProtocolError for anything malformed. The
transport passes dicts; the services turn them into these. docs/sync.md is the
prose version; the wire format is unchanged from v1 except the new `refused`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..core import crypto, wire
from ..core.envelope import MAX_HEAD
from ..core.errors import InvalidSignature, RemoteProtocolError
from ..core.identity import Identity

MAX_BATCH_ITEMS = 500            # records per push batch and per outbox answer
MAX_BATCH_BYTES = 8 << 20        # bodies (+ HEAD_ALLOWANCE each) per push batch
HEAD_ALLOWANCE = 4096            # an envelope head with its key slots, rounded up
MAX_INLINE_ANSWER = 8 << 20      # inline bodies per outbox answer
MAX_SMALL_BODY = 256 << 10       # a body sent inside a batch (store.blobs.INLINE_MAX)
MAX_HAVE = 1000                  # `have` entries an ack carries (the lowest)
MAX_HAVE_ACCEPTED = 10_000       # `have` entries an ack may carry when received
MAX_REFUSED = 100                # refusals an ack carries (the highest seqs)
MAX_RECEIPTS = 1000              # receipts per POST /v1/receipts
MAX_RECEIPT_BYTES = 4096
MAX_SEQ = 2**63 - 1

# Why a recipient refused a record for good, as short codes on the wire and plain words on screen.
REFUSALS = {
    "invalid-envelope": "the recipient could not verify or open it (invalid envelope)",
    "wrong-sender": "it does not say it comes from this practice",
    "id-taken": "the recipient already holds another record under this ID",
    "too-large": "its body is too large to be sent in a batch",
}
_CODE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_RECORD_ID = re.compile(r"^[0-9a-f]{32}$")


def refusal_text(code: str) -> str:
    return REFUSALS.get(code, f"refused by the recipient ({code})")


def _seq(value: Any, what: str, name: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= MAX_SEQ:
        raise RemoteProtocolError(f"{what}: {name} must be an integer from {low} to 2^63-1")
    return value


def _record_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _RECORD_ID.match(value):
        raise RemoteProtocolError(f"{what}: a record ID is 32 lowercase hex characters")
    return value


def _code(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _CODE.match(value):
        raise RemoteProtocolError(f"{what}: malformed refusal reason")
    return value


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a map")
    return obj


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """Sender to recipient: record `record_id` is number `seq` in your stream."""

    seq: int
    record_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Want:
    """Recipient to sender (GET /v1/outbox): I have everything up to `since`, and am fetching up to `after`."""

    since: int
    after: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"since": self.since, "after": self.after}

    @classmethod
    def from_wire(cls, obj: Any) -> "Want":
        m = _map(obj, "want")
        return cls(since=_seq(m.get("since", 0), "want", "since"), after=_seq(m.get("after", 0), "want", "after"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """Recipient to sender: every seq <= upto is settled here; `have` are committed above it;
    `refused` are (seq, reason) the recipient refused for good (settled too, never stored)."""

    upto: int
    have: tuple[int, ...] = ()
    refused: tuple[tuple[int, str], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"upto": self.upto, "have": list(self.have[:MAX_HAVE])}
        if self.refused:
            out["refused"] = [[s, c] for s, c in sorted(self.refused)[-MAX_REFUSED:]]
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> "Ack":
        m = _map(obj, "ack")
        wire.only_fields(m, {"upto", "have", "refused"}, what="ack")
        upto = _seq(wire.field(m, "upto", int, what="ack"), "ack", "upto")
        have = wire.field(m, "have", list, what="ack")
        if len(have) > MAX_HAVE_ACCEPTED:
            raise RemoteProtocolError("ack: too many entries in have")
        have = tuple(_seq(s, "ack", "have", 1) for s in have)
        raw = wire.field(m, "refused", list, what="ack", optional=True) or []
        if len(raw) > MAX_HAVE_ACCEPTED:
            raise RemoteProtocolError("ack: too many refusals")
        refused = []
        for pair in raw:
            if not isinstance(pair, list) or len(pair) != 2:
                raise RemoteProtocolError("ack: a refusal is [seq, reason]")
            refused.append((_seq(pair[0], "ack", "refused seq", 1), _code(pair[1], "ack")))
        return cls(upto=upto, have=have, refused=tuple(refused))


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchItem:
    """One record of an outbox answer; `body` is None when it must be downloaded."""

    seq: int
    record_id: str
    head: bytes
    size: int
    body: bytes | None = None

    @property
    def offer(self) -> Offer:
        return Offer(seq=self.seq, record_id=self.record_id)

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.record_id, "head": self.head, "size": self.size, "body": self.body}

    @classmethod
    def from_wire(cls, obj: Any) -> "BatchItem":
        w = "outbox item"
        m = _map(obj, w)
        wire.only_fields(m, {"seq", "id", "head", "size", "body"}, what=w)
        body = wire.field(m, "body", bytes, what=w, optional=True)
        size = _seq(wire.field(m, "size", int, what=w), w, "size")
        if body is not None and len(body) != size:
            raise RemoteProtocolError(f"{w}: the inline body does not have the stated size")
        return cls(seq=_seq(wire.field(m, "seq", int, what=w), w, "seq", 1),
                   record_id=_record_id(wire.field(m, "id", str, what=w), w),
                   head=wire.field(m, "head", bytes, what=w, max_len=MAX_HEAD), size=size, body=body)


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """Sender to recipient, the answer to a Want: the lowest pending records after `prev`."""

    prev: int
    last: int
    items: tuple[BatchItem, ...] = ()
    void: tuple[int, int] | None = None     # (lo, hi): seqs the sender will never send (restored from a backup)

    def __post_init__(self) -> None:
        seqs = [i.seq for i in self.items]
        if seqs != sorted(set(seqs)) or any(s <= self.prev or s > self.last for s in seqs):
            raise RemoteProtocolError("batch: sequence numbers out of order or out of range")
        if len(seqs) > MAX_BATCH_ITEMS:
            raise RemoteProtocolError("batch: too many items")
        if self.void is not None:
            lo, hi = self.void
            if not 1 <= lo <= hi <= self.last or any(lo <= s <= hi for s in seqs):
                raise RemoteProtocolError("batch: a void out of range or holding records")

    @property
    def full(self) -> bool:
        return len(self.items) >= MAX_BATCH_ITEMS

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prev": self.prev, "last": self.last, "items": [i.to_wire() for i in self.items]}
        if self.void is not None:
            out["void"] = list(self.void)
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> "Batch":
        m = _map(obj, "outbox answer")
        items = wire.field(m, "items", list, what="outbox answer")
        if len(items) > MAX_BATCH_ITEMS:
            raise RemoteProtocolError("batch: too many items")
        return cls(prev=_seq(wire.field(m, "prev", int, what="outbox answer"), "outbox answer", "prev"),
                   last=_seq(wire.field(m, "last", int, what="outbox answer"), "outbox answer", "last"),
                   items=tuple(BatchItem.from_wire(i) for i in items), void=_void(m.get("void")))


def _void(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise RemoteProtocolError("outbox answer: void must be [lo, hi]")
    return _seq(value[0], "outbox answer", "void", 1), _seq(value[1], "outbox answer", "void", 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class PushItem:
    """One small record of POST /v1/batch."""

    seq: int | None
    head: bytes
    body: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "head": self.head, "body": self.body}

    @classmethod
    def from_wire(cls, obj: Any) -> "PushItem":
        w = "batch item"
        wire.only_fields(obj, {"seq", "head", "body"}, what=w)
        seq = wire.field(obj, "seq", int, what=w, optional=True)
        return cls(seq=None if seq is None else _seq(seq, w, "seq", 1),
                   head=wire.field(obj, "head", bytes, what=w, max_len=MAX_HEAD),
                   body=wire.field(obj, "body", bytes, what=w))


@dataclass(frozen=True, slots=True, kw_only=True)
class PushBatch:
    """POST /v1/batch: many small records in one request."""

    items: tuple[PushItem, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"items": [i.to_wire() for i in self.items]}

    @classmethod
    def from_wire(cls, obj: Any) -> "PushBatch":
        items = wire.field(obj, "items", list, what="batch")
        if len(items) > MAX_BATCH_ITEMS:
            raise RemoteProtocolError(f"batch: at most {MAX_BATCH_ITEMS} records")
        return cls(items=tuple(PushItem.from_wire(i) for i in items))


STORED, DUPLICATE, REFUSED = "stored", "duplicate", "refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class PushAnswer:
    """The answer to POST /v1/batch: per record stored/duplicate/refused, receipts, the ack."""

    results: dict[str, str]
    receipts: dict[str, bytes]
    ack: Ack
    reasons: dict[str, str]

    def to_wire(self) -> dict[str, Any]:
        out = {"results": dict(self.results), "receipts": dict(self.receipts), "ack": self.ack.to_wire()}
        if self.reasons:
            out["reasons"] = dict(self.reasons)
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> "PushAnswer":
        w = "batch answer"
        m = _map(obj, w)
        results = _str_map(wire.field(m, "results", dict, what=w), w)
        if any(v not in (STORED, DUPLICATE, REFUSED) for v in results.values()):
            raise RemoteProtocolError(f"{w}: unknown result")
        receipts = wire.field(m, "receipts", dict, what=w)
        if not all(isinstance(v, bytes) and len(v) <= MAX_RECEIPT_BYTES for v in receipts.values()):
            raise RemoteProtocolError(f"{w}: malformed receipt")
        reasons = {k: _code(v, w) for k, v in (wire.field(m, "reasons", dict, what=w, optional=True) or {}).items()}
        return cls(results=results, receipts=receipts, ack=Ack.from_wire(wire.field(m, "ack", dict, what=w)),
                   reasons=reasons)


@dataclass(frozen=True, slots=True, kw_only=True)
class PutAnswer:
    """The answer to PUT /v1/records/{id} (200), or a status probe that found it stored."""

    status: str                       # stored, duplicate, refused
    receipt: bytes | None = None
    ack: Ack | None = None
    reason: str = ""                  # for refused

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "receipt": self.receipt,
                     "ack": self.ack.to_wire() if self.ack else None}
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> "PutAnswer":
        w = "record answer"
        m = _map(obj, w)
        status = wire.field(m, "status", str, what=w)
        if status not in (STORED, DUPLICATE, REFUSED):
            raise RemoteProtocolError(f"{w}: unknown status")
        ack = wire.field(m, "ack", dict, what=w, optional=True)
        reason = wire.field(m, "reason", str, what=w, optional=True)
        if status == REFUSED and reason is None:
            raise RemoteProtocolError(f"{w}: a refusal without a reason")
        return cls(status=status, receipt=wire.field(m, "receipt", bytes, what=w, optional=True,
                                                      max_len=MAX_RECEIPT_BYTES),
                   ack=None if ack is None else Ack.from_wire(ack),
                   reason="" if reason is None else _code(reason, w))


def _str_map(m: dict[str, Any], what: str) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise RemoteProtocolError(f"{what}: malformed map")
    return m


RECEIPT_STATUSES = ("delivered", "opened")


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """A statement signed by a recipient: record R was delivered/opened at `at` (Unix ms).

        raw  = msgpack {"body": bin, "sig": bin(64)}
        body = msgpack {"record": bin(16), "by": bin(32), "status": str, "at": int}
    """

    record_id: str
    by: bytes
    status: str
    at: int

    def body(self) -> bytes:
        return wire.pack({"record": bytes.fromhex(self.record_id), "by": self.by, "status": self.status,
                          "at": self.at})

    @classmethod
    def make(cls, identity: Identity, record_id: str, status: str, at: int) -> bytes:
        return cls(record_id=record_id, by=identity.sign_public, status=status, at=at).sign(identity)

    def sign(self, identity: Identity) -> bytes:
        body = self.body()
        return wire.pack({"body": body, "sig": identity.sign("receipt", body)})

    @classmethod
    def verify(cls, raw: bytes, sign_key: bytes, record_id: str | None = None) -> "Receipt":
        outer = wire.unpack(raw, max_size=MAX_RECEIPT_BYTES, what="receipt")
        wire.only_fields(outer, {"body", "sig"}, what="receipt")
        body_raw = wire.field(outer, "body", bytes, what="receipt")
        crypto.verify(sign_key, "receipt", body_raw, wire.field(outer, "sig", bytes, what="receipt", size=64))
        body = wire.unpack(body_raw, max_size=MAX_RECEIPT_BYTES, what="receipt")
        wire.only_fields(body, {"record", "by", "status", "at"}, what="receipt")
        rid = wire.field(body, "record", bytes, what="receipt", size=16).hex()
        if record_id is not None and rid != record_id:
            raise InvalidSignature("receipt is for another record")
        status = wire.field(body, "status", str, what="receipt")
        if status not in RECEIPT_STATUSES:
            raise RemoteProtocolError("receipt: unknown status")
        return cls(record_id=rid, by=wire.field(body, "by", bytes, what="receipt", size=32), status=status,
                   at=_seq(wire.field(body, "at", int, what="receipt"), "receipt", "at"))
