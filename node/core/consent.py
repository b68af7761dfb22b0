"""Patient consent: PASETO v4.public tokens, PASERK key IDs, grants and revocations.

A patient signs grants with an Ed25519 key of their own; the practice holding
the records checks them. The token format is PASETO v4.public, written here
from the specification over PyNaCl (no PASETO library), and checked against the
public test vectors. Pure: no I/O, no clock. `now` is always a parameter, in
Unix milliseconds as `node.node.now_ms()` gives it. docs/consent.md is the spec
of the grant format; this module and that file change together.

Every refusal of a token is a `ConsentRefused` whose message names the reason;
a bad key handed in by our own caller is `InvalidKey`, bad input to the issuing
side is `UsageError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Collection, Mapping

import nacl.exceptions
import nacl.signing

from .errors import ConsentRefused, InvalidKey, UsageError
from .identity import format_node_id, parse_node_id

HEADER = "v4.public."
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
MAX_TOKEN = 4096                  # characters; a grant is about 500, a QR code holds ~2900
MAX_FOOTER = 256                  # bytes, checked before the footer's JSON is parsed
IMPLICIT = b"cabinet-consent-v1"  # implicit assertion: binds tokens to this use and format version
MAX_DAYS = 3650
MAX_SUBJECT = 128
DEFAULT_SKEW = 60

_B64 = re.compile(r"[A-Za-z0-9_-]*")
_PID = re.compile(r"k4\.pid\.[A-Za-z0-9_-]{44}")
_JTI = re.compile(r"[A-Za-z0-9_-]{16,64}")
_CATEGORY = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_RECORD = re.compile(r"[0-9a-f]{32}")
_RFC3339 = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_NOW = 32_503_680_000_000     # 3000-01-01, so that now + MAX_DAYS stays a valid date
_GRANT_CLAIMS = frozenset({"iss", "sub", "aud", "scope", "iat", "nbf", "exp", "jti", "purpose"})
_REVOKE_CLAIMS = frozenset({"iss", "iat", "revokes", "purpose"})


# --- base64url, PAE ------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str, what: str, error: type[Exception] = ConsentRefused) -> bytes:
    """Strict base64url: no padding, no stray characters, trailing bits cleared (one text per value)."""
    if "=" in text:
        raise error(f"{what}: padded base64 is refused (PASETO uses base64url without '=')")
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        raise error(f"{what}: not valid base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(raw) != text:
        raise error(f"{what}: non-canonical base64url (trailing bits set)")
    return raw


def _le64(n: int) -> bytes:
    return (n & 0x7FFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def pae(*pieces: bytes) -> bytes:
    """Pre-authentication encoding: LE64(count), then LE64(length) || piece for each piece."""
    return _le64(len(pieces)) + b"".join(_le64(len(p)) + p for p in pieces)


# --- keys and PASERK ------------------------------------------------------------

def _raw_public(public_key: bytes) -> bytes:
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != PUBLIC_KEY_SIZE:
        raise InvalidKey("an Ed25519 public key is 32 bytes")
    return bytes(public_key)


def _signing_key(secret: bytes) -> nacl.signing.SigningKey:
    """A 32-byte seed, or libsodium's 64-byte secret key (seed || public key, checked)."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) not in (32, 64):
        raise InvalidKey("an Ed25519 secret key is a 32-byte seed or a 64-byte secret key")
    key = nacl.signing.SigningKey(bytes(secret[:32]))
    if len(secret) == 64 and not hmac.compare_digest(bytes(key.verify_key), bytes(secret[32:])):
        raise InvalidKey("the secret key's public half does not match its seed")
    return key


def public_key_for(secret: bytes) -> bytes:
    return bytes(_signing_key(secret).verify_key)


def new_patient_key() -> tuple[bytes, bytes]:
    """A fresh patient key: (32-byte secret seed, 32-byte public key)."""
    key = nacl.signing.SigningKey.generate()
    return bytes(key), bytes(key.verify_key)


def _paserk_id(header: str, paserk: str) -> str:
    digest = hashlib.blake2b((header + paserk).encode("ascii"), digest_size=33).digest()
    return header + b64url(digest)


def k4_public(public_key: bytes) -> str:
    return "k4.public." + b64url(_raw_public(public_key))


def parse_k4_public(text: str) -> bytes:
    """The 32-byte key of a `k4.public.` PASERK (how a patient's key is enrolled from a QR code)."""
    if not isinstance(text, str) or not text.startswith("k4.public."):
        raise InvalidKey("not a k4.public key (it should start with 'k4.public.')")
    raw = _unb64(text[len("k4.public."):], "k4.public key", InvalidKey)
    return _raw_public(raw)


def k4_pid(public_key: bytes) -> str:
    """PASERK key ID of a v4.public key: 'k4.pid.' || b64(BLAKE2b-264('k4.pid.' || k4_public(pk)))."""
    return _paserk_id("k4.pid.", k4_public(public_key))


def k4_sid(secret: bytes) -> str:
    """PASERK key ID of a v4.public secret key (never put the secret itself anywhere)."""
    key = _signing_key(secret)
    return _paserk_id("k4.sid.", "k4.secret." + b64url(bytes(key) + bytes(key.verify_key)))


# --- PASETO v4.public -------------------------------------------------------------

def _as_bytes(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise UsageError(f"{what} must be bytes")


def _split(token: str | bytes) -> tuple[bytes, bytes, bytes]:
    """(message, signature, footer) of a v4.public token, not yet verified; refuse anything else."""
    if isinstance(token, (bytes, bytearray)):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise ConsentRefused("not a PASETO token (non-ASCII bytes)") from None
    if not isinstance(token, str):
        raise ConsentRefused("not a PASETO token")
    if len(token) > MAX_TOKEN:
        raise ConsentRefused(f"token is too long (over {MAX_TOKEN} characters)")
    parts = token.split(".")
    if len(parts) < 3:
        raise ConsentRefused("not a PASETO token (expected version.purpose.payload[.footer])")
    version, purpose = parts[0], parts[1]
    if version != "v4":
        shown = f" {version}" if re.fullmatch(r"v[0-9]{1,3}", version) else ""
        raise ConsentRefused(f"unsupported PASETO version{shown}: only v4.public tokens are accepted")
    if purpose == "local":
        raise ConsentRefused("v4.local tokens are refused: consent tokens are signed v4.public tokens")
    if purpose != "public":
        raise ConsentRefused("unknown PASETO purpose: only v4.public tokens are accepted")
    if len(parts) > 4:
        raise ConsentRefused("malformed token: too many '.'-separated parts")
    body = _unb64(parts[2], "token payload")
    footer = _unb64(parts[3], "token footer") if len(parts) == 4 else b""
    if len(parts) == 4 and not footer:
        raise ConsentRefused("malformed token: empty footer after the last '.'")
    if len(body) < SIGNATURE_SIZE:
        raise ConsentRefused("token is too short to carry a signature")
    return body[:-SIGNATURE_SIZE], body[-SIGNATURE_SIZE:], footer


def token_footer(token: str | bytes) -> bytes:
    """The footer of a v4.public token, NOT verified: only for choosing the key to verify with."""
    return _split(token)[2]


def sign_v4_public(secret_key: bytes, payload: bytes, footer: bytes = b"", implicit: bytes = b"") -> str:
    """PASETO v4.public Sign: Ed25519 over PAE(header, m, f, i)."""
    key = _signing_key(secret_key)
    m, f, i = _as_bytes(payload, "payload"), _as_bytes(footer, "footer"), _as_bytes(implicit, "implicit assertion")
    sig = key.sign(pae(HEADER.encode("ascii"), m, f, i)).signature
    token = HEADER + b64url(m + sig) + ("." + b64url(f) if f else "")
    if len(token) > MAX_TOKEN:
        raise UsageError(f"token would be over {MAX_TOKEN} characters")
    return token


def verify_v4_public(public_key: bytes, token: str | bytes, footer: bytes | None = None,
                     implicit: bytes = b"") -> bytes:
    """PASETO v4.public Verify; returns the payload bytes.

    `footer=None` accepts whatever footer the token carries (it is still signed);
    bytes (b"" included) require exactly that footer.
    """
    pk = _raw_public(public_key)
    m, sig, found = _split(token)
    if footer is not None and not hmac.compare_digest(found, _as_bytes(footer, "footer")):
        raise ConsentRefused("token footer does not match the expected footer")
    try:
        nacl.signing.VerifyKey(pk).verify(pae(HEADER.encode("ascii"), m, found,
                                              _as_bytes(implicit, "implicit assertion")), sig)
    except (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError):
        raise ConsentRefused("signature does not verify: the token is forged or was altered") from None
    return m


# --- times ---------------------------------------------------------------------

def rfc3339(ms: int) -> str:
    """Unix milliseconds -> '2026-01-05T09:30:00Z' (whole seconds, as PASETO recommends)."""
    return (_EPOCH + timedelta(seconds=ms // 1000)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> int:
    """RFC 3339 date-time (uppercase T and Z, any offset, any fraction) -> Unix milliseconds."""
    m = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("not an RFC 3339 date-time")
    frac = (m[2] or "")[:6].ljust(6, "0")
    offset = "+00:00" if m[3] == "Z" else m[3]
    try:
        return (datetime.fromisoformat(f"{m[1]}.{frac}{offset}") - _EPOCH) // timedelta(milliseconds=1)
    except OverflowError:
        raise ValueError("date-time out of range") from None


def _now(now: int) -> int:
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now < _MAX_NOW:
        raise UsageError("now must be Unix time in milliseconds (a non-negative int before year 3000)")
    return now


# --- scopes ----------------------------------------------------------------------

def _scope_problem(scope: Any) -> str | None:
    if scope == "all":
        return None
    if isinstance(scope, str) and scope.startswith("category:") and _CATEGORY.fullmatch(scope[9:]):
        return None
    if isinstance(scope, str) and scope.startswith("record:") and _RECORD.fullmatch(scope[7:]):
        return None
    return "scope must be 'all', 'category:NAME' or 'record:HEXID' (32 lowercase hex digits)"


def scope_allows(scope: str, *, record_id: str | bytes | None, category: str | None) -> bool:
    """Does a grant with this scope cover this record (its 16-byte ID, or hex) in this category?"""
    problem = _scope_problem(scope)
    if problem:
        raise ConsentRefused(f"malformed scope: {problem}")
    if scope == "all":
        return True
    if scope.startswith("category:"):
        return category == scope[9:]
    rid = record_id.hex() if isinstance(record_id, (bytes, bytearray)) else str(record_id or "").lower()
    return rid == scope[7:]


# --- grants ----------------------------------------------------------------------

def _ok_subject(subject: Any) -> bool:
    return (isinstance(subject, str) and 0 < len(subject) <= MAX_SUBJECT
            and subject.isprintable() and subject == subject.strip())


def _formatted_node_id(text: Any) -> str | None:
    try:
        return format_node_id(parse_node_id(text)) if isinstance(text, str) else None
    except UsageError:
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """A checked consent grant. Times are the token's RFC 3339 strings."""

    issuer: str      # the patient's key ID, k4.pid.
    subject: str     # the patient reference at the practice (pseudonymous, never a name)
    audience: str    # the practitioner's node ID, formatted
    scope: str       # "all" | "category:NAME" | "record:HEXID"
    iat: str
    nbf: str
    exp: str
    jti: str         # unique token ID, what a revocation names

    def allows(self, *, record_id: str | bytes | None, category: str | None) -> bool:
        return scope_allows(self.scope, record_id=record_id, category=category)

    @property
    def expires_ms(self) -> int:
        return parse_rfc3339(self.exp)

    def to_claims(self) -> dict[str, Any]:
        return {"iss": self.issuer, "sub": self.subject, "aud": self.audience, "scope": self.scope,
                "iat": self.iat, "nbf": self.nbf, "exp": self.exp, "jti": self.jti, "purpose": "grant"}

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> "Grant":
        problem = _grant_problem(claims)
        if problem:
            raise ConsentRefused(f"malformed claims: {problem}")
        return cls(issuer=claims["iss"], subject=claims["sub"], audience=claims["aud"], scope=claims["scope"],
                   iat=claims["iat"], nbf=claims["nbf"], exp=claims["exp"], jti=claims["jti"])


def _grant_problem(c: dict[str, Any]) -> str | None:
    if set(c) != _GRANT_CLAIMS:
        return f"expected exactly the claims {sorted(_GRANT_CLAIMS)}"
    if c["purpose"] != "grant":
        return "purpose must be 'grant'"
    if not isinstance(c["iss"], str) or not _PID.fullmatch(c["iss"]):
        return "iss must be the patient's k4.pid key ID"
    if not _ok_subject(c["sub"]):
        return f"sub must be a printable patient reference of 1 to {MAX_SUBJECT} characters"
    if _formatted_node_id(c["aud"]) != c["aud"]:
        return "aud must be a node ID in its formatted form"
    if (problem := _scope_problem(c["scope"])):
        return problem
    if not isinstance(c["jti"], str) or not _JTI.fullmatch(c["jti"]):
        return "jti must be 16 to 64 base64url characters"
    try:
        iat, nbf, exp = (parse_rfc3339(c[k]) for k in ("iat", "nbf", "exp"))
    except ValueError:
        return "iat, nbf and exp must be RFC 3339 date-times"
    if not (nbf < exp and iat < exp):
        return "exp must come after iat and nbf"
    return None


def _issue(key: nacl.signing.SigningKey, claims: dict[str, Any]) -> str:
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    footer = json.dumps({"kid": claims["iss"]}, separators=(",", ":")).encode("ascii")
    return sign_v4_public(bytes(key), payload, footer, IMPLICIT)


def new_token_id() -> str:
    """A random token ID (128 bits, base64url) that never starts with "-": people type it on
    command lines (`cabinet patient revoke ID`), where a leading dash reads as an option."""
    while (jti := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return jti


def issue_grant(patient_secret: bytes, *, subject: str, audience: str, scope: str, days: int, now: int,
                jti: str | None = None) -> str:
    """Sign a grant valid from `now` (whole seconds) for `days` days; returns the token."""
    key = _signing_key(patient_secret)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise UsageError(f"days must be a whole number from 1 to {MAX_DAYS}")
    start = _now(now) // 1000 * 1000
    grant = Grant(issuer=k4_pid(bytes(key.verify_key)), subject=subject, scope=scope,
                  audience=_formatted_node_id(audience) or str(audience),
                  iat=rfc3339(start), nbf=rfc3339(start), exp=rfc3339(start + days * 86_400_000),
                  jti=new_token_id() if jti is None else jti)
    problem = _grant_problem(grant.to_claims())
    if problem:
        raise UsageError(f"cannot issue this grant: {problem}")
    return _issue(key, grant.to_claims())


def _footer_kid(footer: bytes) -> str:
    if not footer:
        raise ConsentRefused("token carries no key ID (its footer should be {\"kid\": \"k4.pid...\"})")
    if len(footer) > MAX_FOOTER:
        raise ConsentRefused(f"token footer is too long (over {MAX_FOOTER} bytes)")
    obj = _json_object(footer, "footer")
    if set(obj) != {"kid"} or not isinstance(obj["kid"], str) or not _PID.fullmatch(obj["kid"]):
        raise ConsentRefused("malformed footer: expected exactly {\"kid\": \"k4.pid...\"}")
    return obj["kid"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys and NaN/Infinity (a signer and a checker must agree)."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise ConsentRefused(f"malformed {what}: not a JSON object")
    return obj


def _open(token: str | bytes, patient_public_keys: Mapping[str, bytes]) -> tuple[dict[str, Any], str]:
    """Pick the key named in the footer, verify, decode the claims; returns (claims, kid)."""
    kid = _footer_kid(_split(token)[2])
    public = patient_public_keys.get(kid)
    if public is None:
        raise ConsentRefused(f"unknown patient key {kid}: it is not enrolled at this practice")
    if k4_pid(public) != kid:
        raise InvalidKey(f"patient key table: the key filed under {kid} does not have that ID")
    claims = _json_object(verify_v4_public(public, token, implicit=IMPLICIT), "claims")
    if claims.get("iss") != kid:
        raise ConsentRefused("malformed claims: iss does not match the key ID in the footer")
    return claims, kid


def _skew(skew_seconds: int) -> int:
    if isinstance(skew_seconds, bool) or not isinstance(skew_seconds, int) or not 0 <= skew_seconds <= 3600:
        raise UsageError("skew_seconds must be a whole number from 0 to 3600")
    return skew_seconds * 1000


def check_grant(token: str | bytes, *, patient_public_keys: Mapping[str, bytes], expected_audience: str,
                now: int, revoked: Collection[str], skew_seconds: int = DEFAULT_SKEW) -> Grant:
    """Check a grant presented by `expected_audience` at time `now`; returns it or refuses with the reason.

    Checked in this order: token form, key ID, signature, claims, audience,
    revocation, not-before / issued-at, expiry.
    """
    audience = _formatted_node_id(expected_audience)
    if audience is None:
        raise UsageError("expected_audience is not a node ID")
    now, skew = _now(now), _skew(skew_seconds)
    claims, _ = _open(token, patient_public_keys)
    if claims.get("purpose") == "revoke":
        raise ConsentRefused("this token is a revocation, not a grant")
    grant = Grant.from_claims(claims)
    if grant.audience != audience:
        raise ConsentRefused(f"wrong audience: this grant is for practitioner {grant.audience}, not {audience}")
    if grant.jti in revoked:
        raise ConsentRefused(f"grant {grant.jti} has been revoked by the patient")
    if parse_rfc3339(grant.nbf) > now + skew:
        raise ConsentRefused(f"grant is not yet valid: it starts at {grant.nbf}")
    if parse_rfc3339(grant.iat) > now + skew:
        raise ConsentRefused(f"grant is not yet valid: it was issued in the future ({grant.iat}); check the clocks")
    if now >= parse_rfc3339(grant.exp) + skew:
        raise ConsentRefused(f"grant expired at {grant.exp}")
    return grant


# --- revocations -----------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Revocation:
    """A patient's signed withdrawal of one grant. It never expires."""

    issuer: str      # the patient's key ID, k4.pid.
    revokes: str     # the jti of the grant withdrawn
    iat: str

    def to_claims(self) -> dict[str, Any]:
        return {"iss": self.issuer, "iat": self.iat, "revokes": self.revokes, "purpose": "revoke"}

    @classmethod
    def from_claims(cls, c: dict[str, Any]) -> "Revocation":
        if set(c) != _REVOKE_CLAIMS or c["purpose"] != "revoke":
            raise ConsentRefused(f"malformed claims: a revocation has exactly {sorted(_REVOKE_CLAIMS)}")
        if not isinstance(c["revokes"], str) or not _JTI.fullmatch(c["revokes"]):
            raise ConsentRefused("malformed claims: revokes must be a grant's jti")
        try:
            parse_rfc3339(c["iat"])
        except ValueError:
            raise ConsentRefused("malformed claims: iat must be an RFC 3339 date-time") from None
        return cls(issuer=c["iss"], revokes=c["revokes"], iat=c["iat"])


def issue_revocation(patient_secret: bytes, jti: str, now: int) -> str:
    key = _signing_key(patient_secret)
    if not isinstance(jti, str) or not _JTI.fullmatch(jti):
        raise UsageError("jti must be a grant's token ID (16 to 64 base64url characters)")
    rev = Revocation(issuer=k4_pid(bytes(key.verify_key)), revokes=jti, iat=rfc3339(_now(now)))
    return _issue(key, rev.to_claims())


def read_revocation(token: str | bytes, patient_public_keys: Mapping[str, bytes], now: int,
                    skew_seconds: int = DEFAULT_SKEW) -> Revocation:
    """Check a revocation; the caller files `.revokes` under `.issuer` (only that patient's grants)."""
    now, skew = _now(now), _skew(skew_seconds)
    claims, _ = _open(token, patient_public_keys)
    if claims.get("purpose") == "grant":
        raise ConsentRefused("this token is a grant, not a revocation")
    rev = Revocation.from_claims(claims)
    if parse_rfc3339(rev.iat) > now + skew:
        raise ConsentRefused(f"revocation is not yet valid: it was issued in the future ({rev.iat})")
    return rev


def check_revocation(token: str | bytes, patient_public_keys: Mapping[str, bytes], now: int,
                     skew_seconds: int = DEFAULT_SKEW) -> str:
    """Check a revocation; returns the jti of the grant it withdraws."""
    return read_revocation(token, patient_public_keys, now, skew_seconds).revokes


# --- recovery phrase ---------------------------------------------------------------

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MISREAD = str.maketrans({"0": "O", "1": "I", "8": "B"})
PHRASE_CHARS = 56


def _luhn32(text: str) -> str:
    """Luhn mod 32 check character: catches every single substitution and most swaps."""
    factor, total = 2, 0
    for ch in reversed(text):
        addend = factor * _ALPHABET.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _ALPHABET[(32 - total % 32) % 32]


def _phrase_check(seed: bytes) -> bytes:
    return hashlib.sha256(b"cabinet/recovery\0" + seed).digest()[:2]


def recovery_phrase(seed: bytes) -> str:
    """A 32-byte seed as 14 groups of 4 base32 characters (seed, 16-bit hash, Luhn check character)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
        raise InvalidKey("a patient key seed is 32 bytes")
    body = base64.b32encode(bytes(seed) + _phrase_check(bytes(seed))).decode("ascii").rstrip("=")
    text = body + _luhn32(body)
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


def parse_recovery_phrase(text: str) -> bytes:
    """The seed back from a typed phrase (any case, spaces and dashes ignored, 0/1/8 read as O/I/B)."""
    compact = "".join(ch for ch in str(text).upper() if ch not in " -\t\r\n").translate(_MISREAD)
    if len(compact) != PHRASE_CHARS or any(ch not in _ALPHABET for ch in compact):
        raise UsageError(f"not a recovery phrase (expected {PHRASE_CHARS} letters and digits 2-7, in groups)")
    body, check = compact[:-1], compact[-1]
    if _luhn32(body) != check:
        raise UsageError("recovery phrase check character does not match: is there a typo?")
    try:
        raw = base64.b32decode(body + "=")
    except (binascii.Error, ValueError):
        raise UsageError("recovery phrase does not decode: is there a typo?") from None
    seed, check_bytes = raw[:32], raw[32:]
    if base64.b32encode(raw).decode("ascii").rstrip("=") != body or _phrase_check(seed) != check_bytes:
        raise UsageError("recovery phrase checksum does not match: is there a typo?")
    return seed
