"""Common helpers for the envelope, wire, identity, consent and Wycheproof tests.

Public vectors (Wycheproof, PASETO/PASERK, the msgpack test suite) live in
tests/vectors/public/<source>/, copied unchanged from upstream, each folder with
its upstream LICENSE and a SOURCE.md that lists every file and its SHA-256;
`load_public` refuses a file whose bytes no longer match that list. The
envelope's own known-answer vectors are tests/vectors/envelope-v1.json, written
by scripts/gen_vectors.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from node.core import envelope, wire
from node.core.identity import Identity, node_id_bytes

REPO = Path(__file__).resolve().parents[1]
PUBLIC_VECTORS = REPO / "tests" / "vectors" / "public"
ENVELOPE_VECTORS = REPO / "tests" / "vectors" / "envelope-v1.json"
_LISTED = re.compile(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", re.MULTILINE)


def listed_hashes(source: str) -> dict[str, str]:
    """File name -> SHA-256 as listed in tests/vectors/public/<source>/SOURCE.md."""
    text = (PUBLIC_VECTORS / source / "SOURCE.md").read_text(encoding="utf-8")
    return dict(_LISTED.findall(text))


def load_public(relative: str) -> Any:
    """A JSON file from tests/vectors/public ("wycheproof/x25519_test.json", "paseto/v4.json", ...).

    The bytes must hash to what the folder's SOURCE.md lists: the copies are
    upstream's files unchanged, and a test would mean nothing on an edited one.
    """
    source, name = relative.split("/", 1)
    raw = (PUBLIC_VECTORS / relative).read_bytes()
    want = listed_hashes(source).get(name)
    if want is None or hashlib.sha256(raw).hexdigest() != want:
        raise AssertionError(f"tests/vectors/public/{relative} is not listed in SOURCE.md or was changed")
    return json.loads(raw.decode("utf-8"))


def counter_rng(seed: bytes) -> Callable[[int], bytes]:
    """The vectors' deterministic rng: SHA-256(seed || counter as 8-byte big-endian), concatenated.

    Written independently of scripts/gen_vectors.py on purpose: docs/envelope.md
    defines it, and the test checks the generator against that definition.
    """
    counter = 0
    pool = b""

    def rng(n: int) -> bytes:
        nonlocal counter, pool
        while len(pool) < n:
            pool += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        out, pool = pool[:n], pool[n:]
        return out

    return rng


# --- the envelope known-answer vectors -----------------------------------

@lru_cache(maxsize=1)
def envelope_vectors() -> dict:
    return json.loads(ENVELOPE_VECTORS.read_text(encoding="utf-8"))


def identity(name: str) -> Identity:
    spec = envelope_vectors()["identities"][name]
    return Identity(bytes.fromhex(spec["sign_seed"]), [bytes.fromhex(s) for s in spec["enc_secrets"]])


def recipient_of(ident: Identity) -> envelope.Recipient:
    return envelope.Recipient(node_id_bytes(ident.sign_public), ident.enc_public)


def case(name: str) -> dict:
    for c in envelope_vectors()["cases"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def manifest_of(c: dict) -> envelope.Manifest:
    m = c["manifest"]
    return envelope.Manifest(
        patient=m["patient"], born=m["born"], subject=m["subject"], letter=m["letter"], data=m["data"],
        attachments=tuple(envelope.Attachment(name=a["name"], size=a["size"], type=a["type"])
                          for a in m["attachments"]),
    )


def attachments_of(c: dict) -> list[bytes]:
    """Each attachment's contents: `size` bytes of the counter rng over its seed (docs/envelope.md)."""
    return [counter_rng(bytes.fromhex(seed))(a["size"])
            for seed, a in zip(c["attachment_seeds"], c["manifest"]["attachments"], strict=True)]


def _opt_hex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def seal_case(c: dict) -> tuple[bytes, bytes]:
    """Seal one vector case from its inputs alone; returns (head, body)."""
    sealer = envelope.Sealer(
        sender=identity(c["sender"]), recipients=[recipient_of(identity(n)) for n in c["recipients"]],
        kind=c["kind"], created=c["created"], rng=counter_rng(bytes.fromhex(c["rng_seed"])),
        thread=_opt_hex(c["thread"]), reply_to=_opt_hex(c["reply_to"]),
    )
    return envelope.seal_bytes(sealer, manifest_of(c), attachments_of(c))


def expected(c: dict) -> tuple[bytes, bytes]:
    """The expected head and body of a case.

    A large body is not in the file, only its SHA-256 (and each chunk's): it is
    sealed again from the case's inputs and must hash to the committed value.
    """
    e = c["expected"]
    return bytes.fromhex(e["head"]), (bytes.fromhex(e["body"]) if e["body"] is not None else _resealed_body(c["name"]))


@lru_cache(maxsize=None)
def _resealed_body(name: str) -> bytes:
    c = case(name)
    body = seal_case(c)[1]
    if hashlib.sha256(body).hexdigest() != c["expected"]["body_sha256"]:
        raise AssertionError(f"{name}: the code no longer seals the committed body (SHA-256 differs)")
    return body


# --- forging heads, as a buggy or hostile sender would -------------------

def split_head(head: bytes) -> tuple[dict, bytes]:
    """The decoded header map and the signature of an envelope head."""
    outer = wire.unpack(head)
    return wire.unpack(outer["h"]), outer["sig"]


def make_head(header: dict, signer: Identity | None = None, sig: bytes | None = None) -> bytes:
    """Re-encode a (possibly altered) header, signed by `signer` or carrying `sig` as is."""
    hraw = wire.pack(header)
    if signer is not None:
        sig = signer.sign("envelope", hraw)
    return wire.pack({"h": hraw, "sig": sig})


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]
