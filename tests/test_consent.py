"""Consent tokens: PASETO v4.public and PASERK vectors, grants, revocations, recovery phrases.

The PASETO and PASERK vectors are upstream's files, unchanged, in
tests/vectors/public/paseto/. The clock is always injected: no test sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from node.core import consent
from node.core.consent import (IMPLICIT, Grant, check_grant, check_revocation, issue_grant, issue_revocation, k4_pid,
                          k4_public, k4_sid, pae, parse_k4_public, parse_recovery_phrase, parse_rfc3339,
                          public_key_for, read_revocation, recovery_phrase, scope_allows, sign_v4_public,
                          verify_v4_public)
from node.core.errors import ConsentRefused, InvalidKey, UsageError
from node.core.identity import node_id_for

try:
    from _vectors import load_public
except ImportError:  # tests/ imported as a package
    from tests._vectors import load_public

NOW = 1_767_605_400_000                    # 2026-01-05T09:30:00Z
DAY = 86_400_000
SKEW = 60_000
PATIENT = hashlib.sha256(b"patient one").digest()
OTHER_PATIENT = hashlib.sha256(b"patient two").digest()
PATIENT_KID = k4_pid(public_key_for(PATIENT))
KEYS = {PATIENT_KID: public_key_for(PATIENT)}
DR_A = node_id_for(hashlib.sha256(b"practitioner a").digest())
DR_B = node_id_for(hashlib.sha256(b"practitioner b").digest())
RECORD = "0123456789abcdef0123456789abcdef"
JTI = "grant-0001-AAAAAAAAAA"


def load(name: str) -> list[dict]:
    return load_public(f"paseto/{name}")["tests"]


def v4(prefix: str) -> list[dict]:
    return [t for t in load("v4.json") if t["name"].startswith(prefix)]


def grant(secret: bytes = PATIENT, **kw) -> str:
    args = dict(subject="patient-42", audience=DR_A, scope="all", days=30, now=NOW, jti=JTI)
    args.update(kw)
    return issue_grant(secret, **args)


def check(token: str, **kw) -> Grant:
    args = dict(patient_public_keys=KEYS, expected_audience=DR_A, now=NOW, revoked=set())
    args.update(kw)
    return check_grant(token, **args)


def claims_of(token: str) -> dict:
    body = token.split(".")[2]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))[:-64])


def sign_claims(claims: dict, secret: bytes = PATIENT, *, footer: bytes | None = None,
                implicit: bytes = IMPLICIT) -> str:
    """A token signed by the patient's key but carrying whatever claims a buggy or hostile issuer chose."""
    kid = k4_pid(public_key_for(secret))
    footer = json.dumps({"kid": kid}, separators=(",", ":")).encode() if footer is None else footer
    return sign_v4_public(secret, json.dumps(claims).encode(), footer, implicit)


def refused(match: str, fn, *args, **kw) -> None:
    with pytest.raises(ConsentRefused, match=match):
        fn(*args, **kw)


# --- PASETO v4.public --------------------------------------------------------------

def test_pae_matches_the_spec_examples():
    assert pae() == b"\x00" * 8
    assert pae(b"") == b"\x01" + b"\x00" * 15
    assert pae(b"test") == b"\x01" + b"\x00" * 7 + b"\x04" + b"\x00" * 7 + b"test"


@pytest.mark.parametrize("vec", v4("4-S-"), ids=lambda t: t["name"])
def test_v4_public_vectors_sign_and_verify(vec):
    pk, token = bytes.fromhex(vec["public-key"]), vec["token"]
    payload, footer, implicit = (vec[k].encode() for k in ("payload", "footer", "implicit-assertion"))
    for secret in (vec["secret-key"], vec["secret-key-seed"]):
        assert sign_v4_public(bytes.fromhex(secret), payload, footer, implicit) == token
    assert verify_v4_public(pk, token, footer, implicit) == payload
    assert verify_v4_public(pk, token, None, implicit) == payload
    refused("footer does not match", verify_v4_public, pk, token, footer + b"x", implicit)
    refused("signature", verify_v4_public, pk, token, None, implicit + b"x")
    refused("signature", verify_v4_public, bytes.fromhex(vec["public-key"][:-2] + "a3"), token, None, implicit)


# Which check refuses each failure vector, by name: a regression test for the refusal order.
F_REASONS = {"4-F-1": "v4.local", "4-F-2": "signature does not verify", "4-F-3": "unsupported PASETO version v3",
             "4-F-4": "v4.local", "4-F-5": "v4.local"}


@pytest.mark.parametrize("vec", v4("4-F-"), ids=lambda t: t["name"])
def test_v4_failure_vectors_are_refused(vec):
    key = bytes.fromhex(vec.get("public-key") or vec["key"])
    footer, implicit = vec["footer"].encode(), vec["implicit-assertion"].encode()
    refused(F_REASONS[vec["name"]], verify_v4_public, key, vec["token"], footer, implicit)
    refused(".", verify_v4_public, key, vec["token"], None, implicit)


def test_every_failure_vector_has_a_known_reason():
    assert {t["name"] for t in v4("4-F-")} == set(F_REASONS)


def test_padding_refused_even_once_the_header_says_public():
    padded = next(t for t in v4("4-F-5"))["token"].replace("v4.local.", "v4.public.", 1)
    refused("padded base64", verify_v4_public, bytes(32), padded)
    token = v4("4-S-1")[0]["token"]
    refused("padded base64", verify_v4_public, bytes(32), token + "=" * (-len(token.split(".")[2]) % 4 or 4))


@pytest.mark.parametrize("mangle, reason", [
    (lambda t: t.replace("v4.public.", "v2.public.", 1), "unsupported PASETO version v2"),
    (lambda t: t.replace("v4.public.", "V4.public.", 1), "unsupported PASETO version:"),
    (lambda t: t.replace("v4.public.", "v4.secret.", 1), "unknown PASETO purpose"),
    (lambda t: t.replace("v4.public.", "v4.public", 1), "not a PASETO token"),
    (lambda t: t + ".", "empty footer"),
    (lambda t: t + ".abc.def", "too many"),
    (lambda t: t[:12] + "*" + t[13:], "not valid base64url"),
    (lambda t: t[:-1], "not valid base64url|non-canonical|signature"),
    (lambda t: t + "B", "non-canonical"),          # the 4-S-1 body ends with trailing bits set by one char
    (lambda t: "v4.public." + consent.b64url(b"x" * 63), "too short"),
    (lambda t: "v4.public." + "A" * consent.MAX_TOKEN, "too long"),
    (lambda t: t.replace("A", "\u0410", 1), "not valid base64url"),
])
def test_malformed_tokens_refused_with_reason(mangle, reason):
    vec = v4("4-S-1")[0]
    refused(reason, verify_v4_public, bytes.fromhex(vec["public-key"]), mangle(vec["token"]))


def test_trailing_bits_must_be_clear():
    vec = v4("4-S-1")[0]
    body = vec["token"].split(".")[2]
    assert len(body) % 4 == 2                      # the last char carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(body[-1])
    assert i % 16 == 0
    sloppy = vec["token"][:-1] + alphabet[i + 1]   # decodes to the same bytes in a lax decoder
    refused("non-canonical", verify_v4_public, bytes.fromhex(vec["public-key"]), sloppy)


def test_tokens_as_ascii_bytes_are_accepted_and_other_bytes_refused():
    vec = v4("4-S-1")[0]
    pk = bytes.fromhex(vec["public-key"])
    assert verify_v4_public(pk, vec["token"].encode()) == vec["payload"].encode()
    refused("non-ASCII", verify_v4_public, pk, vec["token"].encode() + b"\xff")
    refused("not a PASETO token", verify_v4_public, pk, 42)


def test_bad_keys_are_invalid_key():
    vec = v4("4-S-1")[0]
    with pytest.raises(InvalidKey):
        verify_v4_public(b"\x01" * 31, vec["token"])
    with pytest.raises(InvalidKey, match="does not match"):
        sign_v4_public(bytes.fromhex(vec["secret-key-seed"]) + bytes(32), b"{}")
    with pytest.raises(InvalidKey):
        sign_v4_public(b"short", b"{}")


def test_low_order_public_key_is_refused_not_crashing():
    vec = v4("4-S-1")[0]
    refused("signature", verify_v4_public, bytes(32), vec["token"])


# --- PASERK ---------------------------------------------------------------------

@pytest.mark.parametrize("name, fn", [("k4.pid.json", k4_pid), ("k4.public.json", k4_public), ("k4.sid.json", k4_sid)])
def test_paserk_vectors(name, fn):
    tests = load(name)
    assert any(t["expect-fail"] for t in tests) and any(not t["expect-fail"] for t in tests)
    for t in tests:
        if t["expect-fail"]:
            with pytest.raises(InvalidKey):
                fn(bytes.fromhex(t["key"]))
        else:
            assert fn(bytes.fromhex(t["key"])) == t["paserk"], t["name"]


def test_k4_sid_from_seed_matches_full_secret_key():
    for t in load("k4.sid.json"):
        if not t["expect-fail"]:
            assert k4_sid(bytes.fromhex(t["seed"])) == t["paserk"]


def test_k4_public_parses_back():
    for t in load("k4.public.json"):
        if not t["expect-fail"]:
            assert parse_k4_public(t["paserk"]) == bytes.fromhex(t["key"])
    good = next(t for t in load("k4.public.json") if not t["expect-fail"])["paserk"]
    for bad in ("k3.public." + good[10:], good + "=", good[:-1], "k4.public.AAAA", good.replace("k4.public.", "")):
        with pytest.raises(InvalidKey):
            parse_k4_public(bad)


# --- grants ---------------------------------------------------------------------

def test_grant_round_trip():
    token = grant(scope="category:cardiology", jti=None)
    g = check(token)
    assert g.issuer == PATIENT_KID and g.subject == "patient-42" and g.audience == DR_A
    assert (g.iat, g.nbf, g.exp) == ("2026-01-05T09:30:00Z", "2026-01-05T09:30:00Z", "2026-02-04T09:30:00Z")
    assert g.expires_ms == NOW + 30 * DAY
    assert len(g.jti) >= 16 and g.jti != check(grant(jti=None)).jti
    assert g.allows(record_id=RECORD, category="cardiology") and not g.allows(record_id=RECORD, category="gp")
    assert token.count(".") == 3 and len(token) < 600
    assert json.loads(consent.token_footer(token)) == {"kid": PATIENT_KID}
    assert claims_of(token)["purpose"] == "grant"


def test_the_example_in_the_docs_is_what_the_code_produces():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "consent.md").read_text(encoding="utf-8")
    example = [line for line in doc.splitlines() if line.startswith("v4.public.")]
    assert example == [grant(scope="category:cardiology")]
    assert recovery_phrase(PATIENT) in doc


def test_grant_is_deterministic_with_a_given_jti():
    assert grant() == grant()
    assert grant(now=NOW + 999) == grant()                 # times are whole seconds


def test_audience_typed_any_way_is_normalised():
    assert check(grant(audience=DR_A.lower().replace("-", " ")), expected_audience=DR_A.lower()).audience == DR_A


def test_expired_refused_after_skew_only():
    token = grant(days=1)
    check(token, now=NOW + DAY)                             # the skew tolerates a slow clock
    check(token, now=NOW + DAY + SKEW - 1)
    refused("expired at 2026-01-06T09:30:00Z", check, token, now=NOW + DAY + SKEW)
    refused("expired", check, token, now=NOW + DAY, skew_seconds=0)
    refused("expired", check, token, now=NOW + 400 * DAY)


def test_not_yet_valid_beyond_skew():
    token = grant(now=NOW + 10 * 60_000)
    refused("not yet valid: it starts at 2026-01-05T09:40:00Z", check, token)
    check(token, now=NOW + 10 * 60_000 - SKEW)
    check(grant(now=NOW + 30_000))                          # within the skew


def test_issued_in_the_future_refused():
    c = claims_of(grant())
    c.update(nbf="2026-01-05T09:00:00Z", iat="2026-01-05T10:00:00Z")
    refused("issued in the future", check, sign_claims(c))


def test_wrong_audience_refused():
    refused(f"wrong audience: this grant is for practitioner {DR_A}, not {DR_B}", check, grant(), expected_audience=DR_B)


def test_unknown_key_refused():
    refused("unknown patient key k4.pid.", check, grant(secret=OTHER_PATIENT))
    refused("unknown patient key", check, grant(), patient_public_keys={})


def test_forged_grant_refused():
    # Another key signs, but the footer names the enrolled patient's key.
    c = claims_of(grant())
    footer = json.dumps({"kid": PATIENT_KID}).encode()
    refused("signature does not verify", check, sign_claims(c, OTHER_PATIENT, footer=footer))


def test_altered_grant_refused():
    token = grant(scope="record:" + RECORD)
    head, body, footer = token.rsplit(".", 2)
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    old = b'"record:' + RECORD.encode() + b'"'
    altered = raw.replace(old, b'"all"'.ljust(len(old)))   # widen the scope, keep the length
    assert altered != raw and len(altered) == len(raw)
    refused("forged or was altered", check, f"{head}.{consent.b64url(altered)}.{footer}")
    other_footer = consent.b64url(json.dumps({"kid": k4_pid(public_key_for(OTHER_PATIENT))}).encode())
    keys = {**KEYS, k4_pid(public_key_for(OTHER_PATIENT)): public_key_for(OTHER_PATIENT)}
    refused("forged or was altered", check, f"{head}.{body}.{other_footer}", patient_public_keys=keys)


def test_grant_without_the_consent_implicit_assertion_refused():
    refused("signature does not verify", check, sign_claims(claims_of(grant()), implicit=b""))


def test_revoked_refused():
    refused(f"grant {JTI} has been revoked", check, grant(), revoked={JTI})
    check(grant(), revoked={"some-other-grant-id"})


def test_v4_local_and_padded_refused():
    refused("v4.local tokens are refused", check, grant().replace("v4.public.", "v4.local.", 1))
    head, body, footer = grant().rsplit(".", 2)
    assert len(body) % 4
    refused("padded base64", check, f"{head}.{body}{'=' * (-len(body) % 4)}.{footer}")
    refused("padded base64", check, f"{head}.{body}.{footer}==")


@pytest.mark.parametrize("change, reason", [
    ({"exp": "2026-02-04 09:30:00Z"}, "RFC 3339"),
    ({"exp": "2026-02-04T09:30:00z"}, "RFC 3339"),
    ({"exp": "2026-13-04T09:30:00Z"}, "RFC 3339"),
    ({"exp": 1770000000}, "RFC 3339"),
    ({"exp": "2026-01-01T00:00:00Z"}, "exp must come after"),
    ({"aud": "not a node"}, "aud must be a node ID"),
    ({"aud": DR_A.lower()}, "formatted form"),
    ({"scope": "everything"}, "scope must be"),
    ({"scope": "record:ABCDEF"}, "scope must be"),
    ({"scope": "category:Cardio"}, "scope must be"),
    ({"sub": ""}, "sub must be"),
    ({"sub": "x\n"}, "sub must be"),
    ({"jti": "short"}, "jti must be"),
    ({"jti": None}, "jti must be"),
    ({"extra": 1}, "expected exactly the claims"),
    ({"purpose": "other"}, "purpose must be 'grant'"),
    ({"iss": k4_pid(public_key_for(OTHER_PATIENT))}, "iss does not match"),
])
def test_malformed_claims_refused(change, reason):
    c = claims_of(grant())
    c.update(change)
    refused(reason, check, sign_claims(c))


def test_missing_claim_and_non_object_payloads_refused():
    c = claims_of(grant())
    del c["nbf"]
    refused("malformed claims: expected exactly", check, sign_claims(c))
    footer = json.dumps({"kid": PATIENT_KID}).encode()
    for payload in (b"[1,2]", b"", b"\xff\xfe", b'{"a":1,"a":2}', b'{"a":NaN}', b"[" * 2000):
        refused("malformed claims: not a JSON object", check, sign_v4_public(PATIENT, payload, footer, IMPLICIT))


@pytest.mark.parametrize("footer, reason", [
    (b"", "carries no key ID"),
    (b"not json", "malformed footer: not a JSON object"),
    (b'{"kid":"k4.public.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}', "malformed footer"),
    (b'{"kid":"x","wpk":"y"}', "malformed footer"),
    (b'{"kid":"' + b"k" * 300 + b'"}', "footer is too long"),
])
def test_bad_footers_refused(footer, reason):
    refused(reason, check, sign_claims(claims_of(grant()), footer=footer))


def test_revocation_presented_as_grant_refused():
    refused("is a revocation, not a grant", check, issue_revocation(PATIENT, JTI, NOW))


def test_key_table_with_a_wrong_id_is_a_caller_error():
    with pytest.raises(InvalidKey):
        check(grant(), patient_public_keys={PATIENT_KID: public_key_for(OTHER_PATIENT)})


def test_issue_refuses_bad_input():
    for kw in ({"scope": "some"}, {"audience": "ABCD"}, {"days": 0}, {"days": 10_000}, {"days": 1.5},
               {"subject": ""}, {"jti": "tiny"}, {"now": -1}, {"now": True}):
        with pytest.raises(UsageError):
            grant(**kw)
    with pytest.raises(InvalidKey):
        grant(secret=b"short")


def test_check_refuses_bad_caller_input():
    for kw in ({"expected_audience": "nobody"}, {"now": 1.5}, {"skew_seconds": -1}):
        with pytest.raises(UsageError):
            check(grant(), **kw)


def test_rfc3339_parsing():
    assert parse_rfc3339("2026-01-05T09:30:00Z") == NOW
    assert parse_rfc3339("2026-01-05T10:30:00+01:00") == NOW
    assert parse_rfc3339("2026-01-05T09:30:00.123456789Z") == NOW + 123
    assert parse_rfc3339("2022-01-01T00:00:00+00:00") == 1_640_995_200_000
    for bad in ("2026-01-05t09:30:00Z", "2026-01-05T09:30:00", "2026-01-05T09:30:00+24:00", "２026-01-05T09:30:00Z"):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)


# --- scopes ----------------------------------------------------------------------

def test_scope_allows():
    rid = bytes.fromhex(RECORD)
    assert scope_allows("all", record_id=rid, category=None)
    assert scope_allows("category:lab-results", record_id=None, category="lab-results")
    assert not scope_allows("category:lab-results", record_id=rid, category="imaging")
    assert not scope_allows("category:lab-results", record_id=rid, category=None)
    assert scope_allows("record:" + RECORD, record_id=rid, category=None)
    assert scope_allows("record:" + RECORD, record_id=RECORD.upper(), category="x")
    assert not scope_allows("record:" + RECORD, record_id=bytes(16), category=None)
    assert not scope_allows("record:" + RECORD, record_id=None, category=None)
    for bad in ("", "ALL", "category:", "record:xyz", "record:" + RECORD.upper(), None):
        refused("malformed scope", scope_allows, bad, record_id=rid, category="x")


# --- revocations -----------------------------------------------------------------

def test_revocation_round_trip_then_grant_refused():
    token = grant()
    rev = issue_revocation(PATIENT, check(token).jti, NOW + DAY)
    assert check_revocation(rev, KEYS, NOW + DAY) == JTI
    r = read_revocation(rev, KEYS, NOW + DAY)
    assert (r.issuer, r.revokes, r.iat) == (PATIENT_KID, JTI, "2026-01-06T09:30:00Z")
    refused("revoked", check, token, now=NOW + DAY, revoked={check_revocation(rev, KEYS, NOW + DAY)})


def test_revocation_refusals():
    rev = issue_revocation(PATIENT, JTI, NOW)
    refused("is a grant, not a revocation", check_revocation, grant(), KEYS, NOW)
    refused("unknown patient key", check_revocation, issue_revocation(OTHER_PATIENT, JTI, NOW), KEYS, NOW)
    refused("issued in the future", check_revocation, rev, KEYS, NOW - 10 * 60_000)
    assert check_revocation(rev, KEYS, NOW + 3650 * DAY) == JTI          # revocations do not expire
    refused("signature", check_revocation, sign_claims(claims_of(rev), implicit=b""), KEYS, NOW)
    c = claims_of(rev)
    c["revokes"] = "?"
    refused("malformed claims: revokes", check_revocation, sign_claims(c), KEYS, NOW)
    c = claims_of(rev) | {"exp": "2030-01-01T00:00:00Z"}
    refused("malformed claims", check_revocation, sign_claims(c), KEYS, NOW)
    with pytest.raises(UsageError):
        issue_revocation(PATIENT, "not a jti!", NOW)


# --- mutations: anything but the exact token is refused, always as ConsentRefused -------

TOKEN = grant(scope="record:" + RECORD)
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="


@st.composite
def mutated(draw, original: str):
    text = original
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap"]))
        pos = draw(st.integers(0, max(0, len(text) - 1)))
        ch = draw(st.one_of(st.sampled_from(TOKEN_CHARS), st.characters()))
        if op == "replace":
            text = text[:pos] + ch + text[pos + 1:]
        elif op == "insert":
            text = text[:pos] + ch + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + 1:]
        elif op == "truncate":
            text = text[:pos]
        elif pos + 1 < len(text):
            text = text[:pos] + text[pos + 1] + text[pos] + text[pos + 2:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(TOKEN))
def test_mutated_grant_refused(text):
    assume(text != TOKEN)
    with pytest.raises(ConsentRefused):
        check(text)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_grant_bytes_refused(data):
    raw = bytearray(TOKEN.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    assume(bytes(raw) != TOKEN.encode())
    with pytest.raises(ConsentRefused):
        check(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(mutated(v4("4-S-3")[0]["token"]))
def test_mutated_vector_refused(text):
    vec = v4("4-S-3")[0]
    assume(text != vec["token"])
    with pytest.raises(ConsentRefused):
        verify_v4_public(bytes.fromhex(vec["public-key"]), text, None, vec["implicit-assertion"].encode())


# --- patient keys and recovery phrases -------------------------------------------

def test_new_patient_key():
    seed, public = consent.new_patient_key()
    assert len(seed) == 32 and public_key_for(seed) == public
    assert consent.new_patient_key()[0] != seed


@given(st.binary(min_size=32, max_size=32))
def test_recovery_phrase_round_trip(seed):
    phrase = recovery_phrase(seed)
    assert parse_recovery_phrase(phrase) == seed
    assert parse_recovery_phrase(phrase.lower().replace(" ", "-")) == seed


def test_recovery_phrase_shape_and_misreadings():
    phrase = recovery_phrase(PATIENT)
    groups = phrase.split(" ")
    assert len(groups) == 14 and all(len(g) == 4 for g in groups)
    assert parse_recovery_phrase(phrase.replace("O", "0").replace("I", "1").replace("B", "8")) == PATIENT
    with pytest.raises(InvalidKey):
        recovery_phrase(b"short")


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@pytest.mark.parametrize("seed", [PATIENT, OTHER_PATIENT, bytes(32)])
def test_every_single_substitution_and_swap_in_a_phrase_is_caught(seed):
    compact = recovery_phrase(seed).replace(" ", "")
    for pos in range(len(compact)):
        for ch in ALPHABET:
            if ch != compact[pos]:
                with pytest.raises(UsageError, match="typo"):
                    parse_recovery_phrase(compact[:pos] + ch + compact[pos + 1:])
        if pos + 1 < len(compact) and compact[pos] != compact[pos + 1]:
            with pytest.raises(UsageError, match="typo"):
                parse_recovery_phrase(compact[:pos] + compact[pos + 1] + compact[pos] + compact[pos + 2:])


def test_phrase_of_wrong_length_or_alphabet_refused():
    compact = recovery_phrase(PATIENT).replace(" ", "")
    for bad in (compact[:-1], compact + "A", compact[:-1] + "!", ""):
        with pytest.raises(UsageError, match="not a recovery phrase"):
            parse_recovery_phrase(bad)


def test_token_ids_never_start_with_a_dash_so_a_command_line_takes_them():
    ids = [consent.new_token_id() for _ in range(3000)]        # a leading "-" would be 1 in 64 otherwise
    assert not any(i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)
