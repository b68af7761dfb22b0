"""The patient's side: the card that holds their key, and what they sign or check with it.

A card names the practice (its node ID), the patient's reference there
(pseudonymous) and the patient's Ed25519 key: the 32-byte seed, written as the
recovery phrase of consent.py, or only the public key when the patient keeps
the secret elsewhere. It is a small text file and the same content as a QR
code. With it the patient, on any computer with `cabinet` (no node needed),
signs grants and revocations, and history requests bound to the node that
carries them; and checks the history the practice signs.

    cabinet patient card v1
    practice: XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-XXXX-C
    patient: P-7K2MQ4XA
    key: k4.pid.…
    public: k4.public.…
    recovery: VGOJ 46OM VLNL … DZQE
    qr: CABINET-CARD:1:<practice>:<patient>:<recovery phrase without spaces>
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings as B
import nacl.exceptions

from . import consent
from .audit_docs import HISTORY_KIND, check_ref, open_signed
from .errors import ConsentRefused, InvalidKey, UsageError
from .identity import normalize_node_id

HEADER = "cabinet patient card v1"
QR_PREFIX = "CABINET-CARD:1:"
HISTORY_IMPLICIT = b"cabinet-history-request-v1"   # a history request never verifies as a grant, nor back
HISTORY_CLAIMS = frozenset({"iss", "sub", "aud", "by", "iat", "jti", "purpose"})
HISTORY_WINDOW = 5 * 60_000                         # a history request is good for 5 minutes either way
MAX_CARD = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class Card:
    practice: str                 # the holding practice's node ID
    patient_ref: str              # the patient's reference there
    public_key: bytes
    seed: bytes | None = None     # None: the secret key lives elsewhere (the patient brought their own)

    @property
    def key_id(self) -> str:
        return consent.k4_pid(self.public_key)

    @property
    def phrase(self) -> str | None:
        return consent.recovery_phrase(self.seed) if self.seed else None

    def secret(self) -> bytes:
        if self.seed is None:
            raise UsageError("this card holds only the public key: sign with the patient's own key")
        return self.seed

    @classmethod
    def create(cls, practice: str, patient_ref: str, *, seed: bytes | None = None,
               public_key: bytes | None = None) -> "Card":
        if seed is not None:
            derived = consent.public_key_for(seed)
            if public_key is not None and public_key != derived:
                raise InvalidKey("the card's public key does not match its recovery phrase")
            public_key = derived
        if public_key is None:
            raise InvalidKey("a card needs the patient's key")
        return cls(practice=normalize_node_id(practice), patient_ref=check_ref(patient_ref),
                   public_key=bytes(public_key), seed=seed)

    def qr_payload(self) -> str:
        last = (self.phrase or "").replace(" ", "") or consent.k4_public(self.public_key)
        return f"{QR_PREFIX}{self.practice}:{self.patient_ref}:{last}"

    def to_text(self) -> str:
        lines = [HEADER, f"practice: {self.practice}", f"patient: {self.patient_ref}", f"key: {self.key_id}",
                 f"public: {consent.k4_public(self.public_key)}"]
        if self.seed:
            lines += [f"recovery: {self.phrase}",
                      "Keep this card private: it signs grants to your medical records."]
        return "\n".join(lines + [f"qr: {self.qr_payload()}", ""])

    @classmethod
    def parse(cls, text: str) -> "Card":
        """A card from its text file or its QR content; every problem is one UsageError."""
        text = text.strip()
        if len(text) > MAX_CARD:
            raise UsageError("not a patient card (too long)")
        if text.upper().startswith(QR_PREFIX):
            parts = text[len(QR_PREFIX):].split(":", 2)
            if len(parts) != 3:
                raise UsageError("not a patient card (damaged QR content)")
            practice, ref, last = parts
            fields = {"practice": practice, "patient": ref}
            fields["public" if last.startswith("k4.public.") else "recovery"] = last
        else:
            lines = text.splitlines()
            if not lines or lines[0].strip() != HEADER:
                raise UsageError(f"not a patient card (it should start with '{HEADER}')")
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        if "practice" not in fields or "patient" not in fields:
            raise UsageError("patient card: the practice or the patient reference is missing")
        seed = consent.parse_recovery_phrase(fields["recovery"]) if "recovery" in fields else None
        public = consent.parse_k4_public(fields["public"]) if "public" in fields else None
        return cls.create(fields["practice"], fields["patient"].strip(), seed=seed, public_key=public)

    @classmethod
    def load(cls, source: str | Path) -> "Card":
        """From a card file, or the card's QR content given as text."""
        text = str(source)
        if not text.upper().startswith(QR_PREFIX):
            try:
                text = Path(source).expanduser().read_text("utf-8")
            except FileNotFoundError:
                raise UsageError(f"no patient card at {source}") from None
            except (OSError, UnicodeDecodeError):
                raise UsageError(f"cannot read the patient card {source}") from None
        return cls.parse(text)

    def write(self, folder: Path, stem: str | None = None) -> list[Path]:
        """card-REF.txt (0600) and, when segno is installed, card-REF.png; never overwrites."""
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / (stem or f"card-{self.patient_ref}")
        txt = base.with_suffix(".txt")
        try:
            fd = os.open(txt, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{txt} already exists; not overwritten") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self.to_text())
        return [txt, write_qr(self.qr_payload(), base.with_suffix(".png"))]


def write_qr(payload: str, path: Path) -> Path:
    """Write a PNG QR code with owner-only permissions; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; not overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        import segno                  # loaded only when a QR code is drawn (it weighs ~9 MiB)
        segno.make(payload, error="m", micro=False).save(fh, kind="png", scale=5, border=4)
    return path


# --- what the patient signs and checks ---------------------------------------------------

def grant(card: Card, *, to: str, scope: str, days: int, now: int, jti: str | None = None) -> str:
    """A PASETO v4.public grant for the practitioner node `to` (see docs/consent.md)."""
    return consent.issue_grant(card.secret(), subject=card.patient_ref, audience=normalize_node_id(to),
                               scope=scope, days=days, now=now, jti=jti)


def revocation(card: Card, jti: str, *, now: int) -> str:
    return consent.issue_revocation(card.secret(), jti, now)


def history_request(card: Card, *, by: str, now: int) -> str:
    """Ask the card's practice for this patient's history, carried by node `by` (bound to it)."""
    claims = {"iss": card.key_id, "sub": card.patient_ref, "aud": card.practice, "by": normalize_node_id(by),
              "iat": consent.rfc3339(now), "jti": consent.new_token_id(), "purpose": "history"}
    payload = json.dumps(claims, separators=(",", ":")).encode("ascii")
    footer = json.dumps({"kid": card.key_id}, separators=(",", ":")).encode("ascii")
    return consent.sign_v4_public(card.secret(), payload, footer, HISTORY_IMPLICIT)


def read_history_request(token: str, *, public_key: bytes, patient_ref: str, practice: str, caller: str,
                         now: int) -> dict[str, Any]:
    """The practice's check of a history request; refusals are ConsentRefused with the reason."""
    payload = consent.verify_v4_public(public_key, token, implicit=HISTORY_IMPLICIT)
    try:
        claims = json.loads(payload)
    except ValueError:
        claims = None
    if not isinstance(claims, dict) or set(claims) != HISTORY_CLAIMS or claims["purpose"] != "history":
        raise ConsentRefused("malformed history request")
    if claims["iss"] != consent.k4_pid(public_key) or claims["sub"] != patient_ref:
        raise ConsentRefused("the history request names another patient than the one whose key signed it")
    if claims["aud"] != practice:
        raise ConsentRefused(f"wrong audience: this history request is for practice {claims['aud']}")
    if claims["by"] != caller:
        raise ConsentRefused(f"this history request was made for node {claims['by']}, not {caller}")
    try:
        iat = consent.parse_rfc3339(claims["iat"])
    except (ValueError, TypeError):
        raise ConsentRefused("malformed history request: iat") from None
    if abs(now - iat) > HISTORY_WINDOW:
        raise ConsentRefused("history request is stale or from the future (good for 5 minutes): check the clocks")
    return claims


def seal_to_patient(public_key: bytes, data: bytes) -> bytes:
    """Seal `data` for the holder of a patient's card only (the card's Ed25519 key, as X25519):
    whichever nodes carry it, only the card opens it (libsodium's sealed box)."""
    try:
        x25519 = B.crypto_sign_ed25519_pk_to_curve25519(public_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidKey("the patient's key cannot be used to seal") from None
    return bytes(B.crypto_box_seal(data, x25519))


def open_as_patient(card: Card, sealed: bytes) -> bytes:
    """Open what was sealed to this card's key (a history); one clear error otherwise."""
    seed = card.secret()
    try:
        secret = B.crypto_sign_ed25519_sk_to_curve25519(seed + card.public_key)
        public = B.crypto_sign_ed25519_pk_to_curve25519(card.public_key)
        return bytes(B.crypto_box_seal_open(sealed, public, secret))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise ConsentRefused("this answer was not sealed to this patient's card") from None


def check_history(raw: bytes, card: Card) -> dict[str, Any]:
    """Verify a history against the card's practice; returns {"entries": [...], "seq", "hash", "at"}."""
    body = open_signed(raw, practice=card.practice, kind=HISTORY_KIND)
    if body.get("patient") != card.patient_ref:
        raise ConsentRefused("this history is about another patient")
    return body
