"""`cabinet patient …`, `cabinet request`, `cabinet audit head|check-head`: the commands of docs/patients.md.

cli.build_parser calls `register(sub, add, audit)` with its subparsers, its
`add` helper and the `audit` action group, so these commands take --data and
-v like every other and report errors the same way (one line, non-zero exit).
`patient grant` needs only the patient's card: no node, no passphrase.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
import time
from pathlib import Path

from .prompt import passphrase
from .text import shown
from ..node import ANY_REQUESTER, Card, Node, UsageError, cards, consent, normalize_node_id, now_ms

HEAD_PREFIX, HISTORY_PREFIX = "cabinet-audit-head:", "cabinet-history:"


def _passphrase() -> str:
    return passphrase()


def _carrier(a, command: str) -> None:
    """Revocations and history requests travel through a practice node: say so where there is none."""
    if not Path(a.data).is_dir():
        raise UsageError(f"no practice node in {a.data}: 'patient {command}' is carried by a practice's node (the "
                         "card's practice, or one that knows it), so run it there with the card; the patient "
                         "alone, with the card, signs grants ('patient grant')")


def service(node: Node):
    return node.patients


def to_text(raw: bytes, prefix: str) -> str:
    return prefix + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def from_text(text: str) -> bytes:
    text = "".join(text.split())
    for prefix in (HEAD_PREFIX, HISTORY_PREFIX):
        if text.startswith(prefix):
            body = text[len(prefix):]
            try:
                return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            except (binascii.Error, ValueError):
                break
    raise UsageError(f"not a signed audit head or history (it should start with {HEAD_PREFIX!r} "
                     f"or {HISTORY_PREFIX!r})")


def _read_arg(value: str) -> str:
    """A token given inline, or the name of a file that holds it."""
    if re.match(r"v[0-9]+\.[a-z]+\.", value.strip()):
        return value.strip()
    try:
        return Path(value).expanduser().read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise UsageError(f"{value[:40]!r} is neither a token nor a readable file") from None


def when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# --- at the practice ---------------------------------------------------------------

async def cmd_enroll(a) -> int:
    seed = Card.load(a.card).secret() if a.card else None
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        card = await service(node).enroll(a.patient, public_key=a.public_key, seed=seed, replace=a.replace)
    print(f"Patient {card.patient_ref} enrolled at {card.practice}")
    print(f"Key ID   {card.key_id}")
    if card.seed is None:
        print("The patient keeps their own key: no card was written.")
        return 0
    paths = card.write(Path(a.out))
    print(f"Recovery {card.phrase}")
    for p in paths:
        print(f"Card     {p}")
    print("Hand the card to the patient; this practice keeps only the public key.")
    return 0


async def cmd_link(a) -> int:
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        rid = await service(node).link(a.id, a.patient, a.category)
    print(f"Record {rid} linked to patient {a.patient}" + (f" ({a.category})" if a.category else ""))
    return 0


async def cmd_break_glass(a) -> int:
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        svc = service(node)
        for who, allowed in [(w, True) for w in a.allow or ()] + [(w, False) for w in a.deny or ()]:
            await svc.allow_break_glass(who, allowed)
        policy = await node.patients.break_glass_policy()
        print("Emergency access without a grant: " + (", ".join(
            "any contact" if r["requester"] == ANY_REQUESTER else r["requester"] for r in policy) or "nobody"))
        for e in await node.patients.flagged():
            d = json.loads(e["detail"] or "{}")
            print(f"  {when(e['at'])}  {shown(e['event']):20}  by {shown(e['peer'] or '-')}  {shown(d.get('reason') or d.get('why', ''))}")
    return 0


async def cmd_audit_head(a) -> int:
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        text = to_text(await service(node).signed_head(), HEAD_PREFIX)
    if a.save:
        Path(a.save).write_text(text + "\n", encoding="utf-8")
        print(f"Signed head written to {a.save}")
    print(text)
    return 0


async def cmd_audit_check(a) -> int:
    raw = from_text(_read_arg(a.file))
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        ok, why = await service(node).verify_against_head(raw)
    if not ok:
        print(f"audit log: {shown(why)}", file=sys.stderr)
        return 3
    print(f"audit log: {why}")
    return 0


# --- with the patient's card ------------------------------------------------------------

async def cmd_grant(a) -> int:
    card = Card.load(a.card)
    now = now_ms()
    token = cards.grant(card, to=a.to, scope=a.scope, days=a.days, now=now)
    g = consent.check_grant(token, patient_public_keys={card.key_id: card.public_key}, expected_audience=a.to,
                            now=now, revoked=())
    print(token)
    print(f"\nGrant {g.jti}: {g.scope} of patient {g.subject} to {g.audience}, until {g.exp}", file=sys.stderr)
    if a.qr:
        print(f"QR code written to {cards.write_qr(token, Path(a.qr))}", file=sys.stderr)
    return 0


async def cmd_revoke(a) -> int:
    card = Card.load(a.card)
    token = cards.revocation(card, a.jti, now=now_ms())
    if a.print_only:
        print(token)
        return 0
    _carrier(a, "revoke")
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        jti = await service(node).send_revocation(card.practice, token)
    print(f"Grant {shown(jti)} revoked at {card.practice}")
    return 0


def _describe(e: dict) -> str:
    try:
        d = json.loads(e["detail"]) if (e.get("detail") or "").startswith("{") else {}
    except ValueError:
        d = {}
    parts = [f"grant {d['grant']}" if d.get("grant") else "", "EMERGENCY" if d.get("emergency") else "",
             f"reason: {d['reason']}" if d.get("reason") else "", f"refused: {d['why']}" if d.get("why") else "",
             f"copy {d['copy'][:10]}" if d.get("copy") else "", f"scope {d['scope']}" if d.get("scope") else ""]
    return "  ".join(p for p in parts if p)


async def _practice_id(node: Node, ref: str) -> str:
    try:
        if normalize_node_id(ref) == node.node_id:
            return node.node_id
    except UsageError:
        pass
    return node.node_id if ref == node.config.name else (await node.contact(ref))["node_id"]


async def cmd_history(a) -> int:
    card = Card.load(a.card)
    _carrier(a, "history")
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        if a.from_ and await _practice_id(node, a.from_) != card.practice:
            raise UsageError(f"this card is for practice {card.practice}, not {a.from_}")
        raw, body = await service(node).fetch_history(card)
    print(f"History of patient {card.patient_ref} at {card.practice}, signed by the practice "
          f"(verified), as of {when(body['at'])}, audit entry {body['seq']}:")
    for e in body["entries"]:
        rec = (e.get("record") or "-")[:10]
        print(f"  {when(e['at'])}  #{e['seq']:<5} {shown(e['event']):20} record {shown(rec):10}  by {shown(e.get('peer') or 'the practice')}"
              f"  {_describe(e)}".rstrip())
    if a.save:
        Path(a.save).write_text(to_text(raw, HISTORY_PREFIX) + "\n", encoding="utf-8")
        print(f"Signed history written to {a.save} (the practice's audit can be checked against it)")
    return 0


# --- the requesting practitioner -------------------------------------------------------

async def cmd_request(a) -> int:
    if (a.token is None) == (a.emergency is None):
        raise UsageError("give --token (the patient's grant) or --emergency REASON with --patient")
    token = _read_arg(a.token) if a.token else None
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        ids = await service(node).request(a.from_, token=token, emergency=a.emergency, patient=a.patient,
                                          want=a.want, pull=not a.no_pull)
    if not ids:
        print("Access granted, but no records of this patient are in scope.")
    for rid in ids:
        print(f"Record {rid}")
    if ids:
        print(f"{len(ids)} record(s) sealed for this node: see 'cabinet inbox'.")
    return 0


# --- parser -----------------------------------------------------------------------------

def _subparsers_of(parser: argparse.ArgumentParser | None):
    for action in getattr(parser, "_actions", ()):
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(sub, add, audit=None) -> None:
    """Add the patient commands to cabinet's parser (`add(name, fn, help_, parent)` as in cli.py)."""
    patient = sub.add_parser("patient", help="patients: enroll, link, grant, revoke, history").add_subparsers(
        dest="patient_command", required=True, metavar="ACTION")
    sp_ = add("enroll", cmd_enroll, "enrol a patient: a new key on a card (or a key they bring)", patient)
    sp_.add_argument("--patient", help="the practice's patient number (default: a new random reference)")
    sp_.add_argument("--public-key", help="a key the patient brings, as k4.public.… (no card is written)")
    sp_.add_argument("--card", help="a card the patient already has (same key, a new card for this practice)")
    sp_.add_argument("--out", default=".", help="folder for the card files (default: here)")
    sp_.add_argument("--replace", action="store_true", help="re-key a patient whose card was lost")
    sp_ = add("link", cmd_link, "file a stored record under a patient (and a category)", patient)
    sp_.add_argument("id", help="the record ID (or at least 6 characters of it)")
    sp_.add_argument("--patient", required=True)
    sp_.add_argument("--category", help="e.g. cardiology, lab-results")
    sp_ = add("grant", cmd_grant, "sign a grant with the patient's card (prints the token)", patient)
    sp_.add_argument("--card", required=True, help="the patient's card file (or its QR content)")
    sp_.add_argument("--to", required=True, help="the practitioner's node ID")
    sp_.add_argument("--scope", default="all", help="all, category:NAME or record:ID (default all)")
    sp_.add_argument("--days", type=int, default=30, help="how long it lasts (default 30)")
    sp_.add_argument("--qr", metavar="PNG", help="also write the token as a QR code image")
    sp_ = add("revoke", cmd_revoke, "withdraw a grant, signed with the patient's card", patient)
    sp_.add_argument("jti", metavar="TOKEN_ID", help="the grant's ID (printed by 'patient grant')")
    sp_.add_argument("--card", required=True)
    sp_.add_argument("--print-only", action="store_true", help="print the signed revocation instead of sending it")
    sp_ = add("history", cmd_history, "who accessed the patient's records, signed by the practice", patient)
    sp_.add_argument("--card", required=True)
    sp_.add_argument("--from", dest="from_", help="the practice (default: the card's)")
    sp_.add_argument("--save", metavar="FILE", help="keep the signed history, to check the practice's log later")
    sp_ = add("break-glass", cmd_break_glass, "emergency access without a grant: policy and log", patient)
    sp_.add_argument("--allow", action="append", metavar="CONTACT", help="a contact, or 'any' (repeatable)")
    sp_.add_argument("--deny", action="append", metavar="CONTACT", help="a contact, or 'any' (repeatable)")

    sp_ = add("request", cmd_request, "ask a practice for a patient's records, with their grant")
    sp_.add_argument("--from", dest="from_", required=True, help="the practice holding the records (a contact)")
    sp_.add_argument("--token", help="the patient's grant (text, or a file holding it)")
    sp_.add_argument("--emergency", metavar="REASON", help="break-glass: no grant, a written reason")
    sp_.add_argument("--patient", help="with --emergency: the patient's reference at that practice")
    sp_.add_argument("--want", help="only part of what the grant allows: category:NAME or record:ID")
    sp_.add_argument("--no-pull", action="store_true", help="do not fetch the records now ('cabinet run' will)")

    audit = audit or _subparsers_of(sub.choices.get("audit"))
    if audit is not None:
        sp_ = add("head", cmd_audit_head, "print the audit chain's head, signed by this practice", audit)
        sp_.add_argument("--save", metavar="FILE")
        sp_ = add("check-head", cmd_audit_check, "check the log against a signed head or history given out earlier",
                  audit)
        sp_.add_argument("file", help="a saved head or history (or its text)")
