"""Plain functions over the database: contacts, records, the outbox.

Each function takes the sqlite_utils.Database as its first argument and runs
on the database thread (see db.Store). What the inbox lists about a record
(patient, subject, attachment names) is sealed under the local storage key;
the patient can be searched through a keyed blind index.

A record is its sender's ID and its own: (id, sender) is the key, so a record
another sender pushes under the same ID is another record and never keeps the
genuine one out. This node's own records are those with direction 'out'.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import nacl.exceptions
import nacl.secret
import sqlite_utils

from ..core import crypto, wire
from ..core.errors import AlreadyExists, CorruptStore, NotFound, ProtocolError, UsageError
from ..core.identity import Descriptor
from . import audit
from . import backup as seqs
from ..sync.messages import MAX_REFUSED, Ack
from ..sync.outbox import DELIVERED, PENDING, QUEUED, REFUSED, SETTLED
from ..sync.session import settle
from .tx import transaction

_PENDING = "('" + "', '".join(PENDING) + "')"      # for SQL: the states still to be sent
# A record is looked up by its key's first column, `id`, with `+direction` (the unary plus keeps
# SQLite from using an index on direction there): without statistics, SQLite's planner otherwise
# takes records_listing (direction, stored) and reads every outgoing record for each one it joins.
_SETTLED = "('" + "', '".join(SETTLED) + "')"

# --- encrypted metadata ------------------------------------------------------

def seal_meta(storage_key: bytes, meta: dict) -> bytes:
    return bytes(nacl.secret.SecretBox(storage_key).encrypt(wire.pack(meta)))


def open_meta(storage_key: bytes, sealed: bytes) -> dict:
    try:
        return wire.unpack(nacl.secret.SecretBox(storage_key).decrypt(sealed), max_size=1 << 24, what="metadata")
    except (nacl.exceptions.CryptoError, ProtocolError):
        raise CorruptStore("a record's stored details are damaged") from None


def patient_index(index_key: bytes, patient: str, born: str) -> bytes:
    """Blind index: equal (name, birth date) match, whatever the case or accents typed."""
    norm = unicodedata.normalize("NFKD", f"{patient}|{born}")
    norm = "".join(ch for ch in norm if not unicodedata.combining(ch)).casefold()
    return crypto.keyed_hash(index_key, " ".join(norm.split()).encode("utf-8"))


# --- contacts ----------------------------------------------------------------

def _same_practitioner(conn, desc: Descriptor) -> dict | None:
    """An existing contact that this descriptor claims to be, under another identity key."""
    for node_id, raw in conn.execute("SELECT node_id, descriptor FROM contacts WHERE node_id != ? AND revoked = 0",
                                     (desc.node_id,)):
        other = Descriptor.from_wire(raw)
        if desc.rpps and other.rpps:
            same = other.rpps == desc.rpps
        else:
            same = other.name.casefold() == desc.name.casefold() and other.city.casefold() == desc.city.casefold()
        if same:
            return {"node_id": node_id, "name": other.name}
    return None


def upsert_contact(db: sqlite_utils.Database, desc: Descriptor, name: str, now: int) -> str:
    """Add or refresh a contact; returns 'added', 'updated', 'unchanged', 'held' or 'revoked'.

    'held': the descriptor is for a practitioner we already know under another
    identity key (a reinstalled box, or someone impersonating them). It is kept
    but nothing is sent to it until the practitioner confirms.
    """
    with transaction(db) as conn:
        row = conn.execute("SELECT seq, name, revoked FROM contacts WHERE node_id = ?", (desc.node_id,)).fetchone()
        if row is not None and row[2]:
            return "revoked"                       # a revocation is final
        if row is None:
            previous = _same_practitioner(conn, desc)
            taken = conn.execute("SELECT 1 FROM contacts WHERE name = ? COLLATE NOCASE", (name,)).fetchone()
            if taken and previous is None:
                raise AlreadyExists(f"another contact is already named {name!r}; choose one with --name")
            if taken:
                name = f"{name} (new key)"
            conn.execute("INSERT INTO contacts (node_id, name, sign_key, descriptor, seq, verified, held, replaces, "
                         "revoked, added, updated) VALUES (?,?,?,?,?,0,?,?,?,?,?)",
                         (desc.node_id, name, desc.sign_key, desc.signed, desc.seq, int(previous is not None),
                          previous and previous["node_id"], int(desc.revoked), now, now))
            audit.append(db, at=now, event="contact-held" if previous else "contact-added", peer=desc.node_id,
                         detail=f"same practitioner as {previous['node_id']}" if previous else None)
            return "held" if previous else "added"
        if desc.seq < row[0]:
            raise UsageError("this descriptor is older than the one already known (rolled back); not used")
        if desc.seq == row[0]:
            return "unchanged"
        conn.execute("UPDATE contacts SET descriptor = ?, seq = ?, revoked = ?, updated = ? WHERE node_id = ?",
                     (desc.signed, desc.seq, int(desc.revoked), now, desc.node_id))
        if desc.revoked:
            audit.append(db, at=now, event="contact-revoked", peer=desc.node_id)
            return "revoked"
        return "updated"


def confirm_contact(db: sqlite_utils.Database, node_id: str, now: int) -> str | None:
    """The practitioner confirmed a held contact's new key: release it, retire the old one."""
    with transaction(db) as conn:
        row = conn.execute("SELECT replaces FROM contacts WHERE node_id = ? AND held = 1", (node_id,)).fetchone()
        if row is None:
            raise UsageError("that contact is not waiting for a confirmation")
        old = conn.execute("SELECT name FROM contacts WHERE node_id = ?", (row[0],)).fetchone() if row[0] else None
        if old:
            # The old key is retired under another name; the new one takes the name everyone uses.
            conn.execute("UPDATE contacts SET revoked = 1, name = name || ' (replaced)', updated = ? "
                         "WHERE node_id = ?", (now, row[0]))
            conn.execute("UPDATE contacts SET name = ? WHERE node_id = ? AND name = ? || ' (new key)'",
                         (old[0], node_id, old[0]))
        conn.execute("UPDATE contacts SET held = 0, replaces = NULL, updated = ? WHERE node_id = ?", (now, node_id))
        audit.append(db, at=now, event="contact-confirmed", peer=node_id, detail=row[0])
        return row[0]


def find_contact(db: sqlite_utils.Database, ref: str) -> dict:
    from ..core.identity import normalize_node_id
    row = next(db.query("SELECT * FROM contacts WHERE name = ? COLLATE NOCASE", [ref.strip()]), None)
    if row is None:
        try:
            row = next(db.query("SELECT * FROM contacts WHERE node_id = ?", [normalize_node_id(ref)]), None)
        except UsageError:
            row = None
    if row is None:
        raise NotFound(f"unknown contact {ref!r} (see 'cabinet contact list')")
    return row


def contact_by_id(db: sqlite_utils.Database, node_id: str) -> dict | None:
    return next(db.query("SELECT * FROM contacts WHERE node_id = ?", [node_id]), None)


def list_contacts(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query("SELECT * FROM contacts ORDER BY name COLLATE NOCASE"))


def mark_verified(db: sqlite_utils.Database, node_id: str, now: int) -> None:
    with transaction(db):
        db.conn.execute("UPDATE contacts SET verified = 1, updated = ? WHERE node_id = ?", (now, node_id))
        audit.append(db, at=now, event="contact-verified", peer=node_id)


# --- records -----------------------------------------------------------------

RECORD_FIELDS = ("id", "direction", "kind", "sender", "thread", "reply_to", "created", "stored", "head",
                 "body_size", "meta", "patient_ix", "seq", "body")
_INSERT = f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES ({', '.join('?' * len(RECORD_FIELDS))})"


def insert_record(db: sqlite_utils.Database, row: dict, *, recipients: Sequence[str] = (), now: int,
                  event: str, peer: str | None = None) -> bool:
    """Store a record (and queue it for `recipients`) in one transaction.

    Returns False, changing nothing, if the record is already stored: a
    duplicate delivery is acknowledged again and dropped.
    """
    with transaction(db) as conn:
        if not _insert(conn, row, now=now, event=event, peer=peer, db=db):
            return False
        for to in recipients:
            seq = seqs.next_seq(conn, to)          # above every seq given out, and every restore's void
            conn.execute("INSERT INTO deliveries (record_id, recipient, seq, state, next_try, updated) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (row["id"], to, seq, QUEUED, now, now))
        return True


def insert_received(db: sqlite_utils.Database, rows: list[dict], *, sender: str,
                    now: int) -> tuple[list[bool | None], Ack]:
    """Commit records received from one sender's stream, all in one transaction.

    Returns, per row, True (new), False (a duplicate: changes nothing, acked
    again) or None (this sender already has another record under this ID:
    refused), and the stream's ack (its cursor moved over any gap these rows closed).
    """
    with transaction(db) as conn:
        stored = [_insert(conn, dict(r, seq=r.get("seq"), body=r.get("body")), now=now, event="received",
                          peer=sender, db=db) for r in rows]
        return stored, _settle_stream(conn, sender)


def _insert(conn, row: dict, *, now: int, event: str, peer: str | None, db) -> bool | None:
    existing = conn.execute("SELECT head, direction FROM records WHERE id = ? AND sender = ?",
                            (row["id"], row["sender"])).fetchone()
    if existing:
        if (bytes(existing[0]), existing[1]) != (row.get("head"), row["direction"]):
            return None                  # another record of this sender's under this ID: never "a duplicate"
        if row.get("seq") is not None and row["direction"] == "in":
            # Already here (e.g. pushed before); remember its place in this stream.
            conn.execute("UPDATE records SET seq = ? WHERE id = ? AND sender = ? AND seq IS NULL AND NOT EXISTS "
                         "(SELECT 1 FROM records WHERE sender = ? AND seq = ? AND direction = 'in')",
                         (row["seq"], row["id"], row["sender"], row["sender"], row["seq"]))
        return False
    if row.get("seq") is not None and conn.execute(
            "SELECT 1 FROM records WHERE direction = 'in' AND sender = ? AND seq = ? UNION ALL "
            "SELECT 1 FROM refused_in WHERE sender = ? AND seq = ?",
            (row["sender"], row["seq"], row["sender"], row["seq"])).fetchone():
        row = dict(row, seq=None)          # a sender reusing a number: keep the record, not the claim
    conn.execute(_INSERT, [row.get(f) for f in RECORD_FIELDS])
    audit.append(db, at=now, event=event, record=row["id"], peer=peer)
    return True


def _settle_stream(conn, sender: str) -> Ack:
    """Move the cursor over closed gaps (committed or refused seqs), in the caller's transaction."""
    row = conn.execute("SELECT cursor FROM streams_in WHERE sender = ?", (sender,)).fetchone()
    cursor = row[0] if row else 0
    have = {s for (s,) in conn.execute(
        "SELECT seq FROM records WHERE direction = 'in' AND sender = ? AND seq > ?", (sender, cursor))}
    refused = {s: r for s, r in conn.execute(
        "SELECT seq, reason FROM refused_in WHERE sender = ? ORDER BY seq DESC LIMIT ?", (sender, MAX_REFUSED))}
    cursor, above = settle(cursor, have | set(refused))
    conn.execute("INSERT INTO streams_in (sender, cursor) VALUES (?, ?) "
                 "ON CONFLICT (sender) DO UPDATE SET cursor = excluded.cursor", (sender, cursor))
    return Ack(upto=cursor, have=tuple(s for s in above if s in have), refused=tuple(sorted(refused.items())))


def held_exactly(db: sqlite_utils.Database, sender: str, items: Sequence[tuple[int, bytes]]) -> set[int]:
    """Of these (seq, head) of `sender`'s stream, the seqs held here with that very head: a record pushed
    and pulled at once, or pushed again after a lost answer, needs no second verification."""
    heads = dict(items)
    if not heads:
        return set()
    marks = ",".join("?" * len(heads))
    return {seq for seq, head in db.conn.execute(
        f"SELECT seq, head FROM records WHERE direction = 'in' AND sender = ? AND seq IN ({marks})",
        [sender, *heads]) if bytes(head) == heads[seq]}


def stream_in(db: sqlite_utils.Database, sender: str) -> Ack:
    """Where this node stands in `sender`'s stream: its cursor, what is above it, its refusals."""
    with transaction(db) as conn:
        return _settle_stream(conn, sender)


def skip_void(db: sqlite_utils.Database, sender: str, lo: int, hi: int) -> Ack:
    """The sender says seqs lo..hi of its stream will never come (it was restored from a backup): once
    the cursor has reached lo - 1, it moves to hi (and on over what is above)."""
    with transaction(db) as conn:
        row = conn.execute("SELECT cursor FROM streams_in WHERE sender = ?", (sender,)).fetchone()
        if row and lo - 1 <= row[0] < hi:
            conn.execute("UPDATE streams_in SET cursor = ? WHERE sender = ?", (hi, sender))
        return _settle_stream(conn, sender)


def refuse_received(db: sqlite_utils.Database, sender: str, seq: int, record_id: str, reason: str, *,
                    now: int) -> Ack:
    """Remember for good that `seq` of `sender`'s stream was refused, so the cursor moves past it."""
    with transaction(db) as conn:
        taken = conn.execute("SELECT 1 FROM records WHERE direction = 'in' AND sender = ? AND seq = ?",
                             (sender, seq)).fetchone()
        if not taken:                      # a number a stored record holds is never refused
            conn.execute("INSERT OR IGNORE INTO refused_in (sender, seq, record_id, reason, at) VALUES (?,?,?,?,?)",
                         (sender, seq, record_id, reason, now))
        return _settle_stream(conn, sender)


def body_of(db: sqlite_utils.Database, record_id: str, sender: str | None = None) -> bytes | None:
    row = db.conn.execute("SELECT body FROM records WHERE id = ? AND (? IS NULL OR sender = ?) "
                          "ORDER BY direction = 'out' DESC", (record_id, sender, sender)).fetchone()
    return row[0] if row else None


ID_HEX = 32


def get_record(db: sqlite_utils.Database, ref: str, sender: str | None = None, direction: str | None = None) -> dict:
    """By full ID or an unambiguous prefix of at least 6 characters (optionally: from `sender`,
    or only this node's own records, direction 'out').

    Records of different senders may share an ID: a prefix matching several is ambiguous and
    the error names their senders. A full ID names this node's own record first (what the
    courier sends); received records under it are reached with their sender.
    """
    ref = ref.strip().lower()
    if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
        raise NotFound(f"no record {ref!r} (give at least 6 hex characters of its ID)")
    rows = list(db.query("SELECT * FROM records WHERE id >= ? AND id < ? AND (? IS NULL OR sender = ?) "
                         "AND (? IS NULL OR direction = ?) LIMIT 10",
                         [ref, ref + "g", sender, sender, direction, direction]))
    if not rows:
        raise NotFound(f"no record {ref!r}")
    own = [r for r in rows if r["direction"] == "out"]
    if len(rows) > 1 and len(ref) == ID_HEX and len({r["id"] for r in rows}) == 1 and len(own) == 1:
        return own[0]
    if len(rows) > 1:
        if len({r["id"] for r in rows}) == 1:
            raise UsageError(f"record ID {ref!r} is held by records from several senders "
                             f"({_senders(db, rows)}); see 'cabinet inbox'")
        raise UsageError(f"record ID {ref!r} is ambiguous ({_senders(db, rows)}); give more characters")
    return rows[0]


def _senders(db: sqlite_utils.Database, rows: list[dict]) -> str:
    names = []
    for r in rows:
        if r["direction"] == "out":
            names.append("this practice")
            continue
        c = db.conn.execute("SELECT name FROM contacts WHERE node_id = ?", (r["sender"],)).fetchone()
        names.append(f"from {c[0] if c else r['sender']}")
    return ", ".join(dict.fromkeys(names))


def has_record(db: sqlite_utils.Database, record_id: str, sender: str | None = None) -> bool:
    return db.conn.execute("SELECT 1 FROM records WHERE id = ? AND (? IS NULL OR sender = ?)",
                           (record_id, sender, sender)).fetchone() is not None


def refused_from(db: sqlite_utils.Database, sender: str, seq: int) -> str | None:
    """The reason `seq` of `sender`'s stream was refused for good, if it was."""
    row = db.conn.execute("SELECT reason FROM refused_in WHERE sender = ? AND seq = ?", (sender, seq)).fetchone()
    return row[0] if row else None


def stored_from(db: sqlite_utils.Database, record_id: str, sender: str) -> bytes | None:
    """The signed head of `sender`'s stored record under this ID: a duplicate only if it matches."""
    row = db.conn.execute("SELECT head FROM records WHERE id = ? AND sender = ? AND direction = 'in'",
                          (record_id, sender)).fetchone()
    return bytes(row[0]) if row else None


def list_records(db: sqlite_utils.Database, direction: str | None = None, patient_ix: bytes | None = None,
                 thread: str | None = None, limit: int | None = 500) -> list[dict]:
    """Records, newest first; at most `limit` (None: all of them)."""
    where, args = [], []
    for col, val in (("direction", direction), ("patient_ix", patient_ix), ("thread", thread)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    sql = "SELECT * FROM records" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created DESC, id" + (f" LIMIT {int(limit)}" if limit is not None else "")
    return list(db.query(sql, args))


def mark_opened(db: sqlite_utils.Database, record_id: str, now: int, event: str = "read",
                receipt_for: tuple[str, bytes] | None = None) -> bool:
    """Log a read; the first time, also queue the signed "opened" receipt for the sender
    (`receipt_for` names it: only that sender's record under this ID is marked)."""
    sender = receipt_for[0] if receipt_for is not None else None
    with transaction(db) as conn:
        first = conn.execute("UPDATE records SET opened = ? WHERE id = ? AND (? IS NULL OR sender = ?) "
                             "AND opened IS NULL", (now, record_id, sender, sender)).rowcount > 0
        if first and receipt_for is not None:
            queue_receipt(db, record_id, receipt_for[0], "opened", receipt_for[1])
        audit.append(db, at=now, event=event, record=record_id)
        return first


def log(db: sqlite_utils.Database, *, at: int, event: str, record: str | None = None, peer: str | None = None,
        detail: str | None = None) -> None:
    with transaction(db):
        audit.append(db, at=at, event=event, record=record, peer=peer, detail=detail)


# --- outbox ------------------------------------------------------------------

def deliveries(db: sqlite_utils.Database, record_id: str | None = None, state: str | None = None) -> list[dict]:
    where, args = [], []
    if record_id:
        where.append("d.record_id = ?")
        args.append(record_id)
    if state:
        where.append("d.state = ?")
        args.append(state)
    sql = ("SELECT d.*, r.created, r.body_size, c.name AS recipient_name FROM deliveries d "
           "JOIN records r ON r.id = d.record_id AND +r.direction = 'out' LEFT JOIN contacts c ON c.node_id = d.recipient")
    sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.created DESC, d.recipient"
    return list(db.query(sql, args))


def due(db: sqlite_utils.Database, now: int, limit: int = 2000) -> list[dict]:
    return list(db.query("SELECT d.*, r.created, r.body_size FROM deliveries d "
                         "JOIN records r ON r.id = d.record_id AND +r.direction = 'out' "
                         f"WHERE d.state IN {_PENDING} AND d.next_try <= ? "
                         "ORDER BY d.recipient, d.seq LIMIT ?", [now, limit]))


def pending_for(db: sqlite_utils.Database, recipient: str) -> dict[int, str]:
    """The sender's open stream to `recipient`: seq -> record ID, not yet delivered."""
    return {seq: rid for seq, rid in db.conn.execute(
        f"SELECT seq, record_id FROM deliveries WHERE recipient = ? AND state IN {_PENDING}", (recipient,))}


def last_seq(db: sqlite_utils.Database, recipient: str) -> int:
    return db.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM deliveries WHERE recipient = ?", (recipient,)).fetchone()[0]


def outgoing(db: sqlite_utils.Database, recipient: str, seqs: list[int]) -> list[dict]:
    """What to send for these stream positions: head, size, and the body when it is kept inline."""
    if not seqs:
        return []
    marks = ",".join("?" * len(seqs))
    return list(db.query(f"SELECT d.seq, d.record_id AS id, r.head, r.body_size, r.body FROM deliveries d "
                         f"JOIN records r ON r.id = d.record_id AND +r.direction = 'out' "
                         f"WHERE d.recipient = ? AND d.seq IN ({marks}) "
                         f"ORDER BY d.seq", [recipient, *seqs]))


def settled_above(db: sqlite_utils.Database, recipient: str, start: int, limit: int) -> list[tuple[int, str]]:
    """The lowest `limit` settled (delivered or refused) positions of the stream to `recipient` above
    `start`, as (seq, record ID): what an outbox answer lists again for a recipient restored from a backup."""
    return [(seq, rid) for seq, rid in db.conn.execute(
        f"SELECT seq, record_id FROM deliveries WHERE recipient = ? AND seq > ? AND state IN {_SETTLED} "
        "ORDER BY seq LIMIT ?", (recipient, start, max(0, int(limit))))]


def is_recipient(db: sqlite_utils.Database, record_id: str, node_id: str) -> bool:
    return db.conn.execute("SELECT 1 FROM deliveries WHERE record_id = ? AND recipient = ?",
                           (record_id, node_id)).fetchone() is not None


def retire(db: sqlite_utils.Database, recipient: str, seqs: list[int], *, now: int,
           receipts: dict[int, bytes] | None = None) -> list[str]:
    """Mark these stream positions delivered; returns the record IDs that changed."""
    done = []
    with transaction(db) as conn:
        for seq in seqs:
            row = conn.execute("SELECT record_id FROM deliveries WHERE recipient = ? AND seq = ? "
                               f"AND state IN {_PENDING}", (recipient, seq)).fetchone()
            if row is None:
                continue
            conn.execute("UPDATE deliveries SET state = ?, delivered = ?, updated = ?, last_error = NULL, "
                         "sent_bytes = (SELECT body_size FROM records WHERE id = ? AND +direction = 'out'), "
                         "receipt = COALESCE(?, receipt) WHERE recipient = ? AND seq = ?",
                         (DELIVERED, now, now, row[0], (receipts or {}).get(seq), recipient, seq))
            audit.append(db, at=now, event="delivered", record=row[0], peer=recipient)
            done.append(row[0])
    return done


def refuse(db: sqlite_utils.Database, recipient: str, seq: int, *, reason: str, now: int) -> str | None:
    """The recipient refused this delivery for good: state refused, the reason kept; returns its record ID."""
    with transaction(db) as conn:
        row = conn.execute(f"SELECT record_id FROM deliveries WHERE recipient = ? AND seq = ? AND state IN {_PENDING}",
                           (recipient, seq)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE deliveries SET state = ?, refused = ?, updated = ?, last_error = ? "
                     "WHERE recipient = ? AND seq = ?", (REFUSED, now, now, reason[:300], recipient, seq))
        audit.append(db, at=now, event="delivery-refused", record=row[0], peer=recipient, detail=reason[:200])
        return row[0]


_STREAM_COLS = ("SELECT d.recipient, d.seq, d.record_id, d.state, d.attempts, d.next_try, d.stale, "
                "r.created, r.body_size FROM deliveries d "
                "JOIN records r ON r.id = d.record_id AND +r.direction = 'out' ")
# CROSS JOIN keeps SQLite's planner to this order: the few changed rows first, each looked up by key
# (left to itself, with no statistics, it scans every outgoing record).
_CHANGED_SINCE = ("FROM (SELECT DISTINCT recipient, seq FROM outbox_changes WHERE n > ?) c "
                  "CROSS JOIN deliveries d ON d.recipient = c.recipient AND d.seq = c.seq CROSS ")
KEEP_CHANGES = 10_000       # outbox_changes rows kept behind the newest (prune_outbox_changes)


def stream_out(db: sqlite_utils.Database, since: int | None = None) -> tuple[list[dict], int, bool]:
    """Deliveries for the sender's sessions, and the outbox change number they bring a reader to.

    `since` None (at start): every pending delivery. Otherwise every delivery changed after change
    number `since` (outbox_changes), here or in another process. The third value says the rows are
    a full reload: at start, or because the changes after `since` were pruned meanwhile (then the
    rows are every pending delivery, and any other the reader holds as pending was settled).
    Read in one transaction, so the rows and the number agree.
    """
    conn = db.conn
    conn.execute("BEGIN")
    try:
        mark = conn.execute("SELECT COALESCE(MAX(n), 0) FROM outbox_changes").fetchone()[0]
        if since is not None:
            oldest = conn.execute("SELECT MIN(n) FROM outbox_changes").fetchone()[0]
            if since == mark:
                return [], since, False
            if since < mark and oldest is not None and oldest <= since + 1:
                rows = list(db.query(_STREAM_COLS.replace("FROM deliveries d ", _CHANGED_SINCE), [since]))
                return rows, mark, False
        return list(db.query(_STREAM_COLS + f"WHERE d.state IN {_PENDING}")), mark, True
    finally:
        conn.execute("COMMIT")


def prune_outbox_changes(db: sqlite_utils.Database, upto: int) -> None:
    """Forget change numbers at least KEEP_CHANGES behind `upto` (the newest a reader saw)."""
    with transaction(db) as conn:
        conn.execute("DELETE FROM outbox_changes WHERE n <= ?", (upto - KEEP_CHANGES,))


def last_seqs(db: sqlite_utils.Database) -> dict[str, int]:
    """Per recipient: the highest seq ever given out (after a restore, its voids count as given out)."""
    out: dict[str, int] = dict(db.conn.execute("SELECT recipient, MAX(seq) FROM deliveries GROUP BY recipient"))
    for r, floor in seqs.floors(db.conn).items():
        out[r] = max(out.get(r, 0), floor)
    return out


def mark_opened_by(db: sqlite_utils.Database, record_id: str, recipient: str, *, at: int, receipt: bytes,
                   now: int) -> bool:
    with transaction(db) as conn:
        cur = conn.execute("UPDATE deliveries SET opened = ?, opened_receipt = ?, updated = ? "
                           "WHERE record_id = ? AND recipient = ? AND opened IS NULL",
                           (at, receipt, now, record_id, recipient))
        if cur.rowcount:
            audit.append(db, at=now, event="opened-by-recipient", record=record_id, peer=recipient)
        return bool(cur.rowcount)


# --- receipts this node owes its senders -----------------------------------------

def queue_receipt(db: sqlite_utils.Database, record_id: str, to_node: str, status: str, receipt: bytes) -> None:
    db.conn.execute("INSERT OR IGNORE INTO receipts_out (record_id, to_node, status, receipt) VALUES (?,?,?,?)",
                    (record_id, to_node, status, receipt))


def receipts_due(db: sqlite_utils.Database, to_node: str | None = None) -> list[dict]:
    where, args = ("AND to_node = ?", [to_node]) if to_node else ("", [])
    return list(db.query(f"SELECT * FROM receipts_out WHERE sent IS NULL {where} ORDER BY to_node LIMIT 500", args))


def receipts_sent(db: sqlite_utils.Database, keys: list[tuple[str, str, str]], now: int) -> None:
    with transaction(db) as conn:
        conn.executemany("UPDATE receipts_out SET sent = ? WHERE record_id = ? AND to_node = ? AND status = ?",
                         [(now, *k) for k in keys])


def next_due(db: sqlite_utils.Database) -> int | None:
    row = db.conn.execute(f"SELECT MIN(next_try) FROM deliveries WHERE state IN {_PENDING}").fetchone()
    return row[0]


def schedule_retries(db: sqlite_utils.Database, recipient: str,
                     rows: Sequence[tuple[int, str, int, int, str, bool]], *, now: int) -> None:
    """Failed attempts of one stream, in one transaction: (seq, state, attempts, next_try, why,
    newly_stale) each; a delivery settled meanwhile is left as it is."""
    with transaction(db) as conn:
        for seq, state, attempts, next_try, why, newly_stale in rows:
            conn.execute("UPDATE deliveries SET state = ?, attempts = ?, next_try = ?, last_error = ?, updated = ?"
                         + (", stale = 1" if newly_stale else "")
                         + f" WHERE recipient = ? AND seq = ? AND state NOT IN {_SETTLED}",
                         (state, attempts, next_try, why, now, recipient, seq))


def update_delivery(db: sqlite_utils.Database, record_id: str, recipient: str, *, now: int,
                    event: str | None = None, **fields) -> None:
    fields["updated"] = now
    cols = ", ".join(f"{k} = ?" for k in fields)
    with transaction(db):
        db.conn.execute(f"UPDATE deliveries SET {cols} WHERE record_id = ? AND recipient = ?",
                        [*fields.values(), record_id, recipient])
        if event:
            audit.append(db, at=now, event=event, record=record_id, peer=recipient)
