"""Patients in control, at the practice: enrolment, grants checked, records sent, revocations, history.

A service built from ports (node/app/ports.py): `PatientService` is the
practice's side of docs/patients.md. The token rules live in core/consent.py
(pure), the tables and the audit queries in store/patients.py, the routes in
transport/access.py; `PatientEndpoints` is the slice of the node's transport
Handler that answers them.

A record is sent to a practitioner under a grant (or an emergency) by sealing
a fresh copy for them: the holding node opens its own copy (it is always a
recipient of what it holds), streams the same plaintext and attachments into a
new envelope for the requester and itself, and queues it in the outbox like
any referral. The original's header is signed by whoever wrote it and names
its recipients, so it cannot be re-addressed; a new envelope from the holding
practice is the honest statement of who sent what to whom, and the original's
signed head rides in the copy's structured data (core/audit_docs.py) so the
reader still sees who wrote it, when, and under which ID. No plaintext touches
the disk; memory stays constant.

A grant is not an amplifier: a record already copied to a requester (under any
grant, or in an emergency) is not sealed for it again, and each grant is
used at most `grant_uses_per_hour` times in any hour.

`now` (Unix ms), when given, overrides the node's clock for one call (tests of
expiry); otherwise the node's one clock, `ports.clock`, is used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Callable, NoReturn, Protocol

from ..core import consent, wire
from ..core.audit_docs import wrap_copy_data
from ..core.card import Card, check_history, history_request, open_as_patient, read_history_request, seal_to_patient
from ..core.envelope import BodyParser, Decryptor, Head, Header, Manifest, Recipient, Sealer
from ..core.errors import ConsentRefused, InvalidEnvelope, UsageError
from ..core.identity import Descriptor, normalize_node_id, parse_node_id
from ..store import blobs as blobstore
from ..store import patients as sp
from ..store import records
from ..transport import access
from ..transport.client import Peer
from ..transport.server import Answer
from .contacts import Contacts
from .events import AuditAppended, RecordStored, Refusal
from .ports import Ports
from .rows import place_sealed, record_row

log = logging.getLogger("cabinet.patients")
MAX_REASON = 500
MIN_REASON = 10
GRANT_USES_PER_HOUR = 20
TOO_MANY_USES = "too many uses of this grant; try again later"


class Waker(Protocol):
    def wake(self) -> None: ...


class Fetcher(Protocol):
    async def pull_from(self, contact: dict) -> int: ...


def _peek_kid(token: str) -> str | None:
    """The key ID a token's footer names, unverified: only to pick the key and the revocation list."""
    try:
        obj = json.loads(consent.token_footer(token))
    except (ConsentRefused, ValueError, UnicodeDecodeError):
        return None
    kid = obj.get("kid") if isinstance(obj, dict) else None
    return kid if isinstance(kid, str) else None


def _signed_jti(token: str, public_key: bytes) -> str | None:
    """The grant ID of a token whose signature holds (for the audit of a refusal), else None."""
    try:
        claims = json.loads(consent.verify_v4_public(public_key, token, implicit=consent.IMPLICIT))
    except (ConsentRefused, ValueError):
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) and len(jti) <= 64 else None


def _narrower(want: str, scope: str, category_of: dict[str, str | None]) -> bool:
    """Is everything `want` names inside `scope`?"""
    if scope == "all" or want == scope:
        return True
    if want.startswith("record:") and scope.startswith("category:"):
        return category_of.get(want[7:]) == scope[9:]
    return False


class _Rewriter:
    """Passes a record's plaintext through, with its manifest's structured data replaced by `data_of(old)`."""

    def __init__(self, data_of: Callable[[str], str]) -> None:
        self.data_of, self.parser, self._held = data_of, BodyParser(), b""
        self.manifest: Manifest | None = None

    def feed(self, plain: bytes) -> bytes:
        self.parser.feed(plain)
        if self.manifest is not None:
            return plain
        self._held += plain
        if self.parser.manifest is None:
            return b""
        old = self.parser.manifest
        self.manifest = dataclasses.replace(old, data=self.data_of(old.data))
        raw = self.manifest.to_wire()
        rest = self._held[4 + int.from_bytes(self._held[:4], "big"):]
        self._held = b""
        return len(raw).to_bytes(4, "big") + raw + rest

    def finish(self) -> Manifest:
        self.parser.finish()
        assert self.manifest is not None
        return self.manifest


def reseal(source: blobstore.Source, header: Header, key: bytes, sealer: Sealer, dest: Path,
           data_of: Callable[[str], str] = lambda d: d) -> tuple[Manifest, int, bytes]:
    """Stream a stored record's plaintext into a new envelope at `dest`, the structured data
    rewritten by `data_of`; returns (the new manifest, size, SHA-256)."""
    dec, rewriter = Decryptor(header, key), _Rewriter(data_of)
    src_hash, out_hash = hashlib.sha256(), hashlib.sha256()
    try:
        with open(dest, "wb") as out:
            def emit(chunks: list[bytes]) -> None:
                for c in chunks:
                    out_hash.update(c)
                    out.write(c)
            for piece in blobstore.iter_source(source):
                src_hash.update(piece)
                for plain in dec.feed(piece):
                    emit(sealer.push(rewriter.feed(plain)))
            emit(sealer.push(rewriter.feed(dec.finish())) + [sealer.finish()])
            manifest = rewriter.finish()
            if src_hash.digest() != header.body_sha256:
                raise InvalidEnvelope()
            size = out.tell()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return manifest, size, out_hash.digest()


class PatientService:
    def __init__(self, ports: Ports, contacts: Contacts, *, locate: Callable[[dict], Peer], courier: Waker,
                 puller: Fetcher, serving: Callable[[], bool]) -> None:
        self.ports, self.contacts, self.locate = ports, contacts, locate
        self.courier, self.puller, self._serving = courier, puller, serving
        self.store = ports.store
        self.skew_seconds = consent.DEFAULT_SKEW
        self.grant_uses_per_hour = int(getattr(ports.config, "grant_uses_per_hour", GRANT_USES_PER_HOUR))
        self._schema = False
        self._busy: dict[str, asyncio.Lock] = {}       # one request at a time per requester

    @property
    def vault(self) -> sp.Vault:
        """The folder's storage and index keys, which seal and index what is stored about patients."""
        return sp.Vault(self.ports.keys.storage_key, self.ports.keys.index_key)

    @property
    def clock(self) -> Callable[[], int]:
        """The node's one clock (tests move it to check expiry)."""
        return self.ports.clock

    @clock.setter
    def clock(self, fn: Callable[[], int]) -> None:
        self.ports.clock = fn

    @property
    def node_id(self) -> str:
        return self.ports.identity.node_id

    async def _now(self, now: int | None) -> int:
        """`now`, or the consent clock's; and the tables exist (whether or not db.SCHEMA has them yet)."""
        if not self._schema:
            await self.store.call(sp.ensure_schema, self.vault)
            self._schema = True
        return self.ports.now() if now is None else now

    # --- enrolment and records ---------------------------------------------------

    async def enroll(self, patient_ref: str | None = None, *, public_key: bytes | str | None = None,
                     seed: bytes | None = None, replace: bool = False, now: int | None = None) -> Card:
        """Enrol a patient: a fresh key (the card holds its seed), or a key they bring (public or seed)."""
        ref = patient_ref or "P-" + secrets.token_hex(5).upper()
        if isinstance(public_key, str):
            public_key = consent.parse_k4_public(public_key.strip())
        if seed is None and public_key is None:
            seed, _ = consent.new_patient_key()
        card = Card.create(self.node_id, ref, seed=seed, public_key=public_key)
        await self.store.call(sp.enroll, self.vault, ref, card.public_key, card.key_id, await self._now(now), replace=replace)
        return card

    async def link(self, record_ref: str, patient_ref: str, category: str | None = None, *,
                   now: int | None = None) -> str:
        record_id = (await self.store.call(records.get_record, record_ref))["id"]
        await self.store.call(sp.link, self.vault, record_id, patient_ref, category, await self._now(now))
        return record_id

    # --- revocation ----------------------------------------------------------------

    async def apply_revocation(self, token: str, *, caller: str | None = None, now: int | None = None) -> str:
        """File a patient-signed revocation under the key that signed it; returns the revoked grant ID."""
        now = await self._now(now)
        kid = _peek_kid(token)
        row = await self.store.call(sp.patient_by_key, self.vault, kid) if kid else None
        try:
            rev = consent.read_revocation(token, {kid: row["public_key"]} if kid and row else {}, now,
                                          self.skew_seconds)
        except ConsentRefused as exc:
            await self.store.call(sp.log, self.vault, at=now, event="revocation-refused", peer=caller,
                                  patient=row["patient_ref"] if row else None, why=str(exc)[:300])
            raise
        await self.store.call(sp.add_revocation, self.vault, key_id=rev.issuer, jti=rev.revokes, token=token, now=now, peer=caller)
        return rev.revokes

    # --- access requests ----------------------------------------------------------------

    async def handle_request(self, requester: str, *, token: str | None = None, reason: str | None = None,
                             patient_ref: str | None = None, want: str | None = None,
                             now: int | None = None) -> list[str]:
        """Check a grant (or an emergency request) from `requester`, the node the transport
        authenticated; seal the records in scope for it; return the IDs of the copies queued."""
        now, requester = await self._now(now), normalize_node_id(requester)
        if (token is None) == (reason is None):
            await self._refuse(requester, now, "give either a grant token or an emergency reason")
        contact = await self.store.call(records.contact_by_id, requester)
        if contact is None or contact.get("held") or contact.get("revoked"):
            await self._refuse(requester, now, f"{requester} is not a confirmed contact of this practice: "
                                               "nothing is sent to it")
        lock = self._busy.setdefault(requester, asyncio.Lock())
        async with lock:       # two requests at once must not both see a record as not yet sent
            if token is None:
                return await self._break_glass(requester, reason, patient_ref, want, now)
            return await self._granted(requester, token, want, now)

    async def _granted(self, requester: str, token: str, want: str | None, now: int) -> list[str]:
        grant, patient = await self._check(requester, token, now)
        ref = patient["patient_ref"]
        if not await self.store.call(sp.take_grant_use, self.vault, jti=grant.jti, now=now,
                                     per_hour=self.grant_uses_per_hour):
            await self._refuse(requester, now, TOO_MANY_USES, patient=ref, grant=grant.jti)
        chosen = await self._new_in_scope(requester, ref, grant.scope, want, now, grant=grant.jti)
        await self.store.call(sp.grant_used, self.vault, key_id=patient["key_id"], jti=grant.jti, ref=ref,
                              audience=requester, scope=want or grant.scope, expires=grant.exp, count=len(chosen),
                              now=now)
        return await self._send(requester, ref, chosen, now, grant=grant.jti)

    async def _new_in_scope(self, requester: str, ref: str, scope: str, want: str | None, now: int, *,
                            grant: str | None) -> list[str]:
        """The records in scope that were not already sent to this requester, however they were."""
        chosen = await self._in_scope(requester, ref, scope, want, now, grant=grant)
        sent = await self.store.call(sp.sent_to, self.vault, ref, requester)
        return [rid for rid in chosen if rid not in sent]

    async def _refuse(self, requester: str, now: int, why: str, *, patient: str | None = None,
                      grant: str | None = None, event: str = "access-refused") -> NoReturn:
        await self.store.call(sp.log, self.vault, at=now, event=event, peer=requester, patient=patient, grant=grant,
                              why=why[:300])
        self.ports.publish(Refusal(at=self.ports.now(), peer=requester, reason="consent"))
        self.ports.publish(AuditAppended(at=self.ports.now(), event=event))
        log.warning("access request from %s refused: %s", requester, why)
        raise ConsentRefused(why)

    async def _check(self, requester: str, token: str, now: int) -> tuple[consent.Grant, dict]:
        kid = _peek_kid(token)
        row = await self.store.call(sp.patient_by_key, self.vault, kid) if kid else None
        keys = {kid: row["public_key"]} if kid and row else {}
        revoked = await self.store.call(sp.revoked, self.vault, kid) if row else set()
        try:
            grant = consent.check_grant(token, patient_public_keys=keys, expected_audience=requester, now=now,
                                        revoked=revoked, skew_seconds=self.skew_seconds)
            assert row is not None      # no key on file: check_grant has refused already
            if grant.subject != row["patient_ref"]:
                raise ConsentRefused("another patient's records: the grant names a patient other than the "
                                     "one whose key signed it")
        except ConsentRefused as exc:
            await self._refuse(requester, now, str(exc), patient=row["patient_ref"] if row else None,
                               grant=_signed_jti(token, row["public_key"]) if row else None)
        return grant, row

    async def _in_scope(self, requester: str, ref: str, scope: str, want: str | None, now: int, *,
                        grant: str | None) -> list[str]:
        rows = await self.store.call(sp.records_of, self.vault, ref)
        category_of = {r["record_id"]: r["category"] for r in rows}
        for asked in (scope, want):
            if asked and asked.startswith("record:") and asked[7:] not in category_of:
                await self._refuse(requester, now, f"record {asked[7:]} is not one of this patient's records here",
                                   patient=ref, grant=grant)
        if want is not None:
            try:
                consent.scope_allows(want, record_id=None, category=None)
            except ConsentRefused as exc:
                await self._refuse(requester, now, f"what was asked for: {exc}", patient=ref, grant=grant)
            if not _narrower(want, scope, category_of):
                await self._refuse(requester, now, f"out of scope: the grant covers {scope}, not {want}",
                                   patient=ref, grant=grant)
        return [rid for rid, cat in category_of.items()
                if consent.scope_allows(scope, record_id=rid, category=cat)
                and (want is None or consent.scope_allows(want, record_id=rid, category=cat))]

    async def _break_glass(self, requester: str, reason: str | None, ref: str | None, want: str | None,
                           now: int) -> list[str]:
        reason = " ".join((reason or "").split())
        flag = dict(event="break-glass-refused")
        if not MIN_REASON <= len(reason) <= MAX_REASON:
            await self._refuse(requester, now, f"an emergency request needs a written reason "
                                               f"({MIN_REASON} to {MAX_REASON} characters)", **flag)
        try:
            patient = await self.store.call(sp.patient, self.vault, sp.check_ref(ref or ""))
        except UsageError:
            await self._refuse(requester, now, "an emergency request names an enrolled patient reference", **flag)
        ref = patient["patient_ref"]
        if not await self.store.call(sp.break_glass_allowed, requester):
            await self._refuse(requester, now, f"emergency access without a grant is not allowed for {requester} "
                                               "at this practice", patient=ref, **flag)
        chosen = await self._new_in_scope(requester, ref, "all", want, now, grant=None)
        await self.store.call(sp.log, self.vault, at=now, event="break-glass", peer=requester, patient=ref, reason=reason,
                              scope=want or "all", records=len(chosen))
        log.warning("BREAK-GLASS access by %s to a patient's records (%d record(s))", requester, len(chosen))
        return await self._send(requester, ref, chosen, now, emergency=True)

    async def _send(self, requester: str, ref: str, originals: list[str], now: int, *, grant: str | None = None,
                    emergency: bool = False) -> list[str]:
        copies = [await self._copy(requester, ref, rid, now, grant, emergency) for rid in originals]
        if copies:
            self.courier.wake()
        return copies

    async def _copy(self, requester: str, ref: str, original: str, now: int, grant: str | None,
                    emergency: bool) -> str:
        p = self.ports
        row = await self.store.call(records.get_record, original)
        head = Head.from_wire(row["head"])
        key = head.content_key(p.identity)
        contact = await self.store.call(records.contact_by_id, requester)
        assert contact is not None      # handle_request refused a requester that is not a contact
        recipient = Recipient(parse_node_id(requester), Descriptor.from_wire(contact["descriptor"]).enc_key)
        sealer = Sealer(sender=p.identity, recipients=[recipient], kind="referral", created=p.now())
        copy_id = sealer.record_id.hex()
        tmp = p.blobs.incoming / f"{copy_id}.sealing"
        source = row["body"] if row["body"] is not None else p.blobs.path(
            row["id"], row["sender"] if row["direction"] == "in" else None)
        data_of = lambda d: wrap_copy_data(d, original_head=head.raw, grant=grant, emergency=emergency)  # noqa: E731
        manifest, size, digest = await asyncio.to_thread(reseal, source, head.header, key, sealer, tmp, data_of)
        new_head = sealer.head(body_size=size, body_sha256=digest)
        # Logged before it is queued: an audit may over-report a send after a crash, never hide one.
        await self.store.call(sp.link_copy, self.vault, copy=copy_id, original=original, ref=ref, requester=requester, now=now,
                              grant=grant, emergency=emergency)
        body = await asyncio.to_thread(place_sealed, p, tmp, copy_id, size)
        new_row = dict(record_row(p, Head.from_wire(new_head).header, new_head, manifest, "out"), body=body)
        await self.store.call(records.insert_record, new_row, recipients=[requester], now=p.now(),
                              event="copy-sent", peer=requester)
        p.publish(RecordStored(at=p.now(), record_id=copy_id, kind="referral", recipients=(requester,)))
        return copy_id

    # --- history, heads, policy ----------------------------------------------------------

    async def history(self, patient_ref: str, *, caller: str | None = None, now: int | None = None) -> bytes:
        """The patient's history, signed by this practice; giving it out is logged (and listed in it)."""
        now = await self._now(now)
        await self.store.call(sp.patient, self.vault, patient_ref)
        await self.store.call(sp.log, self.vault, at=now, event="history-given", peer=caller, patient=patient_ref)
        return await self.store.call(sp.signed_history, self.vault, self.ports.identity, patient_ref, now)

    async def history_for(self, request_token: str, *, caller: str, now: int | None = None) -> bytes:
        """Answer a patient-signed history request carried by node `caller`."""
        now = await self._now(now)
        kid = _peek_kid(request_token)
        row = await self.store.call(sp.patient_by_key, self.vault, kid) if kid else None
        try:
            if row is None:
                raise ConsentRefused("unknown patient key: it is not enrolled at this practice")
            read_history_request(request_token, public_key=row["public_key"], patient_ref=row["patient_ref"],
                                 practice=self.node_id, caller=caller, now=now)
        except ConsentRefused as exc:
            await self.store.call(sp.log, self.vault, at=now, event="history-refused", peer=caller,
                                  patient=row["patient_ref"] if row else None, why=str(exc)[:300])
            raise
        signed = await self.history(row["patient_ref"], caller=caller, now=now)
        # Sealed to the patient's card: the nodes that carry it (and anyone watching) cannot read it.
        return seal_to_patient(row["public_key"], signed)

    async def signed_head(self, now: int | None = None) -> bytes:
        return await self.store.call(sp.signed_head, self.ports.identity, await self._now(now))

    async def verify_against_head(self, signed: bytes) -> tuple[bool, str]:
        await self._now(None)
        return await self.store.call(sp.verify_against_head, signed, practice=self.node_id)

    async def break_glass_policy(self) -> list[dict]:
        await self._now(None)
        return await self.store.call(sp.break_glass_policy)

    async def flagged(self) -> list[dict]:
        """Emergency accesses and refusals, for the practice to review."""
        await self._now(None)
        return await self.store.call(sp.flagged, self.vault)

    async def allow_break_glass(self, who: str, allowed: bool = True, *, now: int | None = None) -> None:
        who = sp.ANY if who in ("*", "any") else (await self.contacts.get(who))["node_id"]
        await self.store.call(sp.set_break_glass, self.vault, who, allowed, await self._now(now))

    # --- the requesting side ---------------------------------------------------------------

    async def request(self, practice: str, *, token: str | None = None, emergency: str | None = None,
                      patient: str | None = None, want: str | None = None, pull: bool = True) -> list[str]:
        """Ask `practice` (a contact) for records; with pull=True, fetch what it queued for us now."""
        contact = await self.contacts.get(practice)
        answer = await access.request_access(self.ports.client, self.locate(contact), token=token, emergency=emergency,
                                             patient=patient, want=want)
        ids = answer.get("records")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ConsentRefused("the practice's answer lists no records")
        if pull and ids and not self._served_by_another_process():
            await self.puller.pull_from(contact)
        return ids

    def _served_by_another_process(self) -> bool:
        """Is `cabinet run` holding this folder? Then its server takes the records the practice
        pushes; pulling them here as well would race it for the same incoming files."""
        if self._serving():
            return False
        fd = os.open(self.ports.folder / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    async def fetch_history(self, card: Card, *, now: int | None = None) -> tuple[bytes, dict]:
        """The card's history from its practice (here, or a contact); checked against the practice's key."""
        token = history_request(card, by=self.node_id, now=await self._now(now))
        if card.practice == self.node_id:
            raw = await self.history_for(token, caller=self.node_id, now=now)
        else:
            peer = self.locate(await self.contacts.get(card.practice))
            raw = await access.fetch_history(self.ports.client, peer, token)
        signed = open_as_patient(card, raw)
        return signed, check_history(signed, card)

    async def send_revocation(self, card_practice: str, token: str) -> str:
        """Apply a revocation here if this is the card's practice, else carry it there."""
        if normalize_node_id(card_practice) == self.node_id:
            return await self.apply_revocation(token, caller=None)
        peer = self.locate(await self.contacts.get(card_practice))
        answer = await access.send_revocation(self.ports.client, peer, token)
        return str(answer.get("revoked", ""))


class PatientEndpoints:
    """The slice of the node's transport Handler (app/handler.py) that answers transport/access.py's routes."""

    def __init__(self, service: PatientService) -> None:
        self.service = service

    async def access_request(self, caller: str, msg: dict) -> Answer:
        what = "access request"
        wire.only_fields(msg, {"token", "emergency", "patient", "want"}, what=what)
        field = lambda name, n: wire.field(msg, name, str, what=what, optional=True, max_len=n)  # noqa: E731
        sent = await self.service.handle_request(
            caller, token=field("token", consent.MAX_TOKEN), reason=field("emergency", 2 * MAX_REASON),
            patient_ref=field("patient", 64), want=field("want", 64))
        return Answer(200, {"records": sent})

    async def patient_history(self, caller: str, msg: dict) -> Answer:
        wire.only_fields(msg, {"request"}, what="history request")
        token = wire.field(msg, "request", str, what="history request", max_len=consent.MAX_TOKEN)
        return Answer(200, {"history": await self.service.history_for(token, caller=caller)})

    async def patient_revocation(self, caller: str, msg: dict) -> Answer:
        wire.only_fields(msg, {"revocation"}, what="revocation")
        token = wire.field(msg, "revocation", str, what="revocation", max_len=consent.MAX_TOKEN)
        return Answer(200, {"revoked": await self.service.apply_revocation(token, caller=caller)})
