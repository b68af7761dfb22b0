"""Fuzz targets for the pure parsers: genuine seeds, mutation strategies, one-input runners.

Used by scripts/fuzz.py (long runs, atheris or Hypothesis) and tests/test_fuzz.py (the bounded run).
Each target is a list of entries; an entry feeds one input (bytes) to one parser. Inputs are random
bytes, genuine inputs with bytes flipped, inserted and deleted, and genuine structures with a field
changed and re-signed with a valid key (so the checks after the signature are reached too).

The property: only CabinetError subclasses escape, and no input runs longer than HANG_SECONDS.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from node.core import consent, wire  # noqa: E402
from node.core.envelope import (BodyParser, Decryptor, Head, Header, Manifest, Recipient, Sealer,  # noqa: E402
                                 open_bytes, plaintext_prefix, seal_bytes)
from node.core.envelope import Attachment  # noqa: E402
from node.core.errors import CabinetError  # noqa: E402
from node.core.identity import Descriptor, Identity, node_id_bytes  # noqa: E402

HANG_SECONDS = 5.0                 # generous: every parser answers in milliseconds
NOW = 1_767_225_600_000            # 2026-01-01: the pure seeds are the same on every run
USE_ALARM = True                   # atheris sets its own SIGALRM (libFuzzer -timeout); then this is off


class Hang(BaseException):
    """Raised from SIGALRM. A BaseException so that no `except Exception` in a parser swallows it."""


class PropertyFailed(AssertionError):
    """An input made a parser raise something other than a CabinetError, or run too long."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt the body after `seconds` (main thread only; elsewhere the elapsed time is still checked)."""
    armed = USE_ALARM and threading.current_thread() is threading.main_thread()
    if armed:
        def on_alarm(signum, frame):
            raise Hang(f"no answer after {seconds} s")
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - start > seconds:
        raise Hang(f"took {time.monotonic() - start:.1f} s (limit {seconds} s)")


# --- genuine inputs (the seeds mutations start from) ----------------------------------

def det_rng(label: bytes) -> Callable[[int], bytes]:
    counter = iter(range(1 << 62))

    def rng(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(label + next(counter).to_bytes(8, "big")).digest()
        return out[:n]
    return rng


@dataclass(frozen=True)
class Seeds:
    sender: Identity
    receiver: Identity
    head: bytes
    body: bytes
    header_dict: dict
    plaintext: bytes
    manifest: bytes
    descriptor: bytes
    descriptor_body: dict
    patient_secret: bytes
    patient_keys: dict
    grant: str
    grant_claims: dict
    revocation: str

    @property
    def receiver_id(self) -> str:
        return self.receiver.node_id


def recipient(identity: Identity) -> Recipient:
    return Recipient(node_id_bytes(identity.sign_public), identity.enc_public)


@functools.cache
def seeds() -> Seeds:
    sender = Identity(b"\x01" * 32, [b"\x02" * 32])
    receiver = Identity(b"\x03" * 32, [b"\x04" * 32])
    manifest = Manifest(patient="Jeanne Martin", born="1961-04-02", subject="Douleur", letter="Cher confrère",
                        attachments=(Attachment(name="ecg.pdf", size=5),))
    sealer = Sealer(sender=sender, recipients=[recipient(receiver)], kind="referral", created=NOW,
                    rng=det_rng(b"seed"))
    head, body = seal_bytes(sealer, manifest, [b"%PDF-"])
    outer = wire.unpack(head, max_size=1 << 16)
    desc = sender.descriptor(name="Dr Anne Martin", specialty="cardiologie", city="Lyon", rpps="10001234567",
                             addresses=("http://127.0.0.1:7400",), seq=3, now_ms=NOW)
    secret = b"\x05" * 32
    public = consent.public_key_for(secret)
    grant = consent.issue_grant(secret, subject="P-0042", audience=receiver.node_id, scope="all", days=30,
                                now=NOW, jti="A" * 22)
    grant_claims = json.loads(base64.urlsafe_b64decode(grant.split(".")[2] + "==")[:-64])
    return Seeds(sender=sender, receiver=receiver, head=head, body=body, header_dict=wire.unpack(outer["h"]),
                 plaintext=plaintext_prefix(manifest) + b"%PDF-", manifest=manifest.to_wire(),
                 descriptor=desc.signed, descriptor_body=wire.unpack(wire.unpack(desc.signed)["body"]),
                 patient_secret=secret, patient_keys={consent.k4_pid(public): public}, grant=grant,
                 grant_claims=grant_claims, revocation=consent.issue_revocation(secret, "A" * 22, NOW))


def seed_list() -> list[bytes]:
    s = seeds()
    return [s.head, s.body[:300], wire.unpack(s.head)["h"], s.manifest, s.descriptor,
            Descriptor.from_wire(s.descriptor).to_text().encode(), s.grant.encode(), s.revocation.encode(),
            consent.k4_public(consent.public_key_for(s.patient_secret)).encode()]


# --- strategies: random, mutated, re-signed ------------------------------------------------

INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xCC, 0xCF, 0xD3,
               0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xD4, 0xC7, 0x2E, 0x3D, 0x22, 0x7B]


@st.composite
def mutated(draw, source: bytes | st.SearchStrategy) -> bytes:
    """A genuine input with 1 to 8 bytes flipped, inserted, deleted, replaced or cut off."""
    data = bytearray(draw(source) if isinstance(source, st.SearchStrategy) else source)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "byte", "cut", "dup"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "byte" and data:
            data[pos] = draw(st.sampled_from(INTERESTING))
        elif op == "cut":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


def wire_values(max_leaves: int = 8) -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                       st.sampled_from([0, 1, -1, 2**32, 2**63 - 1, -(2**63), 65536, 65553]),
                       st.text(max_size=40), st.binary(max_size=40))
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=max_leaves)


@st.composite
def changed_dict(draw, base: dict, values: st.SearchStrategy) -> dict:
    """`base` with one to three fields (possibly nested) replaced, removed or added."""
    obj = json.loads(json.dumps(base, default=lambda b: {"__b": b.hex()}), object_hook=_unhex)
    for _ in range(draw(st.integers(1, 3))):
        target = obj
        while True:
            keys = list(target) if isinstance(target, dict) else list(range(len(target)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if isinstance(target[key], (dict, list)) and target[key] and draw(st.booleans()):
                target = target[key]
                continue
            op = draw(st.sampled_from(["set", "del", "add"]))
            if op == "set" or not isinstance(target, dict):
                target[key] = draw(values)
            elif op == "del":
                del target[key]
            else:
                target[draw(st.text(max_size=6))] = draw(values)
            break
    return obj


def _unhex(d: dict):
    return bytes.fromhex(d["__b"]) if set(d) == {"__b"} else d


def packed(value) -> bytes | None:
    try:
        return wire.pack(value)
    except ValueError:
        return None


def resigned_head() -> st.SearchStrategy:
    s = seeds()

    def sign(h: dict) -> bytes:
        hraw = packed(h) or b"\xc0"
        return wire.pack({"h": hraw, "sig": s.sender.sign("envelope", hraw)})
    return changed_dict(s.header_dict, wire_values()).map(sign)


def resigned_descriptor() -> st.SearchStrategy:
    s = seeds()

    def sign(body: dict) -> bytes:
        raw = packed(body) or b"\xc0"
        return wire.pack({"body": raw, "sig": s.sender.sign("descriptor", raw)})
    return changed_dict(s.descriptor_body, wire_values()).map(sign)


def json_values() -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=40),
                       st.sampled_from(["2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0000-01-01T00:00:00Z",
                                        "2026-01-01T00:00:00+99:99", "all", "record:" + "0" * 32, "revoke",
                                        "grant", "category:x"]))
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                            max_size=3), max_leaves=4)


def resigned_token() -> st.SearchStrategy:
    s = seeds()

    def sign(pair) -> bytes:
        claims, footer = pair
        payload = json.dumps(claims, separators=(",", ":")).encode()
        try:
            return consent.sign_v4_public(s.patient_secret, payload, footer, consent.IMPLICIT).encode()
        except CabinetError:
            return b"v4.public."
    kid = next(iter(s.patient_keys))
    footers = st.one_of(st.just(json.dumps({"kid": kid}).encode()), st.binary(max_size=40),
                        mutated(json.dumps({"kid": kid}).encode()))
    return st.tuples(changed_dict(s.grant_claims, json_values()), footers).map(sign)


def bytes_cases(*sources: st.SearchStrategy | bytes) -> st.SearchStrategy:
    """Random bytes, and each source mutated; sources that are strategies are also used as they are."""
    options: list[st.SearchStrategy] = [st.binary(max_size=600)]
    for src in sources:
        options.append(mutated(src))
        if isinstance(src, st.SearchStrategy):
            options.append(src)
    return st.one_of(options)


# --- targets --------------------------------------------------------------------------------

def wire_unpack(data: bytes) -> None:
    obj = wire.unpack(data, max_size=1 << 16, what="fuzz")
    if isinstance(obj, dict):
        wire.only_fields(obj, {"h", "sig", "body", "v"}, what="fuzz")
        for name in list(obj)[:8]:
            for kind in (bytes, str, list, dict, (bytes, str)):
                with contextlib.suppress(CabinetError):
                    wire.field(obj, name, kind, what="fuzz", size=None if kind is dict else 32,
                               max_len=None if kind is dict else 64)
            with contextlib.suppress(CabinetError):
                wire.field(obj, name, int, what="fuzz", optional=True)


def head_then_open(data: bytes) -> None:
    Head.from_wire(data)
    open_bytes(data, seeds().body, seeds().receiver)


def open_body(data: bytes) -> None:
    open_bytes(seeds().head, data, seeds().receiver)


def decrypt_stream(data: bytes) -> None:
    """Ciphertext past the digest check (as if the head were re-signed over it), fed in odd pieces."""
    s = seeds()
    head = Head.from_wire(s.head)
    dec = Decryptor(head.header, head.content_key(s.receiver))
    step = 1 + (data[0] if data else 0) * 97
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
    dec.finish()


def seal_and_open(data: bytes) -> None:
    """A contact can encrypt any plaintext: seal `data` validly, then open it as the receiver would."""
    s = seeds()
    sealer = Sealer(sender=s.sender, recipients=[recipient(s.receiver)], kind="reply", created=NOW,
                    rng=det_rng(b"plain"))
    chunks = sealer.push(data) + [sealer.finish()]
    body = b"".join(chunks)
    head = sealer.head(body_size=len(body), body_sha256=hashlib.sha256(body).digest())
    open_bytes(head, body, s.receiver)
    parser = BodyParser()                           # and the parser alone, fed a byte at a time
    for i in range(0, min(len(data), 4096)):
        parser.feed(data[i:i + 1])
    parser.finish()


def descriptor_text(data: bytes) -> None:
    Descriptor.from_text(data.decode("utf-8", "replace"))


def token_verify(data: bytes) -> None:
    s = seeds()
    consent.token_footer(data)
    consent.verify_v4_public(consent.public_key_for(s.patient_secret), data, implicit=consent.IMPLICIT)


def token_grant(data: bytes) -> None:
    s = seeds()
    consent.check_grant(data, patient_public_keys=s.patient_keys, expected_audience=s.receiver_id, now=NOW,
                        revoked=())


def token_revocation(data: bytes) -> None:
    consent.read_revocation(data, seeds().patient_keys, NOW)


def paserk(data: bytes) -> None:
    consent.parse_k4_public(data.decode("utf-8", "replace"))


@dataclass(frozen=True)
class Entry:
    name: str
    run: Callable[[bytes], None]
    cases: Callable[[], st.SearchStrategy]        # built lazily: the seeds need crypto


def _msgpack_seed() -> st.SearchStrategy:
    return wire_values(16).map(lambda v: packed(v) or b"")


PURE: dict[str, list[Entry]] = {
    "wire": [Entry("unpack", wire_unpack, lambda: bytes_cases(_msgpack_seed(), *seed_list()[:5]))],
    "envelope": [
        Entry("head", head_then_open, lambda: bytes_cases(seeds().head, resigned_head())),
        Entry("header", lambda d: Header.from_wire(d), lambda: bytes_cases(wire.unpack(seeds().head)["h"])),
        Entry("manifest", lambda d: Manifest.from_wire(d), lambda: bytes_cases(
            seeds().manifest, wire_values().map(lambda v: packed({"patient": "x", "born": "", "subject": "",
                                                                  "letter": "", "data": "", "att": [v]}) or b""))),
        Entry("body", open_body, lambda: bytes_cases(seeds().body)),
        Entry("stream", decrypt_stream, lambda: bytes_cases(seeds().body)),
        Entry("plaintext", seal_and_open, lambda: bytes_cases(seeds().plaintext)),
    ],
    "descriptor": [
        Entry("wire", lambda d: Descriptor.from_wire(d), lambda: bytes_cases(seeds().descriptor, resigned_descriptor())),
        Entry("text", descriptor_text, lambda: bytes_cases(Descriptor.from_wire(seeds().descriptor).to_text().encode())),
    ],
    "token": [
        Entry("verify", token_verify, lambda: bytes_cases(seeds().grant.encode(), seeds().revocation.encode())),
        Entry("grant", token_grant, lambda: bytes_cases(seeds().grant.encode(), resigned_token())),
        Entry("revocation", token_revocation, lambda: bytes_cases(seeds().revocation.encode(), resigned_token())),
        Entry("paserk", paserk, lambda: bytes_cases(
            consent.k4_public(consent.public_key_for(seeds().patient_secret)).encode())),
    ],
}


# --- running one input, recording what happened ------------------------------------------------

@dataclass
class Stats:
    examples: int = 0
    accepted: int = 0
    refusals: dict | None = None                      # error message -> count: how deep inputs got

    def note(self, err: CabinetError | None) -> None:
        self.examples += 1
        if err is None:
            self.accepted += 1
        else:
            self.refusals = self.refusals or {}
            key = f"{type(err).__name__}: {str(err)[:60]}"
            self.refusals[key] = self.refusals.get(key, 0) + 1


def run_case(entry: Entry, data: bytes, stats: Stats | None = None, *, limit: float = HANG_SECONDS) -> None:
    """Run one input; PropertyFailed (with a one-line reason) if anything but a CabinetError escapes."""
    err = None
    try:
        with time_limit(limit):
            try:
                entry.run(data)
            except CabinetError as exc:
                err = exc
    except Hang as exc:
        raise PropertyFailed(f"{entry.name}: hang: {exc}") from None
    except Exception as exc:
        raise PropertyFailed(f"{entry.name}: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    if stats is not None:
        stats.note(err)


def cases_for(target: str) -> st.SearchStrategy:
    return st.one_of([st.tuples(st.just(i), e.cases()) for i, e in enumerate(PURE[target])])


def fuzz_pure(target: str, cfg: settings, stats: Stats, failures: list) -> None:
    """One Hypothesis run over a pure target; a failure is recorded (last = shrunk) and re-raised."""
    entries = PURE[target]

    @cfg
    @given(cases_for(target))
    def check(case):
        index, data = case
        try:
            run_case(entries[index], data, stats)
        except PropertyFailed as exc:
            failures.append({"target": target, "entry": entries[index].name, "data": data.hex(), "error": str(exc),
                             "traceback": traceback.format_exc(limit=-6)})
            raise
    check()


