#!/usr/bin/env python3
"""Write tests/vectors/envelope-v1.json: known-answer vectors for the envelope format.

Everything is fixed: the keys come from labelled SHA-256 hashes, and every
random byte the sealer asks for comes from a counter rng over a fixed seed,
so the output is the same on every machine and in every language that
implements docs/envelope.md. The JSON holds the inputs, the intermediate
values (content key, key commitment, ephemeral keys, stream header, chunk
associated data, signed header) and the expected head and body, all in hex.

To keep the file small, attachment contents are given by their counter-rng
seed (and SHA-256), not in full, and a body over BODY_HEX_LIMIT bytes (the
exact-two-chunks case) by its SHA-256 and each chunk's SHA-256 only.

    python scripts/gen_vectors.py           # (re)write the file
    python scripts/gen_vectors.py --check   # exit 1 if the file is not what the code produces
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.core import crypto, envelope, wire  # noqa: E402
from node.core.identity import Identity, node_id_bytes, node_id_for  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "envelope-v1.json"
DAY = 86_400_000
BODY_HEX_LIMIT = 16 * 1024             # bodies up to this size are written out in full
JAN_5_2026 = 1_767_605_400_000          # 2026-01-05T09:30:00Z

RNG_DOC = ("rng(seed): the concatenation of SHA-256(seed || i) for i = 0, 1, 2, ... "
           "(i as 8-byte big-endian), consumed front to back")
DRAW_ORDER = ("record_id (16, only when not given), content_key (32), one ephemeral X25519 "
              "secret (32) per slot in slot order (sender first), stream_header (24)")


ATTACHMENT_DOC = ("each attachment's contents are the first `size` bytes of rng(seed), seed from "
                  "attachment_seeds (SHA-256 in attachment_sha256)")
BODY_DOC = (f"expected.body is null when the body is over {BODY_HEX_LIMIT} bytes: seal the case from its "
            "inputs and compare with body_sha256 and chunk_sha256")


def label(text: str) -> bytes:
    return hashlib.sha256(b"cabinet test vectors/" + text.encode("utf-8")).digest()


def counter_rng(seed: bytes) -> Callable[[int], bytes]:
    counter, pool = 0, b""

    def rng(n: int) -> bytes:
        nonlocal counter, pool
        while len(pool) < n:
            pool += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        out, pool = pool[:n], pool[n:]
        return out

    return rng


def recording(rng: Callable[[int], bytes], draws: list[bytes]) -> Callable[[int], bytes]:
    def wrapped(n: int) -> bytes:
        draws.append(rng(n))
        return draws[-1]
    return wrapped


# --- identities ------------------------------------------------------------

IDENTITIES = {
    # name: number of encryption keys (the cardiologist has rotated once: old key kept for reading)
    "gp": 1,
    "cardiologist": 2,
    "radiologist": 1,
    "outsider": 1,
}


def identity_spec(name: str) -> dict:
    seeds = {"sign_seed": label(f"{name}/sign"),
             "enc_secrets": [label(f"{name}/enc/{i}") for i in range(1, IDENTITIES[name] + 1)]}
    ident = Identity(seeds["sign_seed"], seeds["enc_secrets"])
    return {
        "sign_seed": seeds["sign_seed"].hex(),
        "enc_secrets": [s.hex() for s in seeds["enc_secrets"]],
        "sign_public": ident.sign_public.hex(),
        "node_id": node_id_for(ident.sign_public),
        "enc_public": ident.enc_public.hex(),
        "enc_key_id": crypto.key_id(ident.enc_public).hex(),
    }


def identity(name: str) -> Identity:
    return Identity(label(f"{name}/sign"), [label(f"{name}/enc/{i}") for i in range(1, IDENTITIES[name] + 1)])


# --- cases -------------------------------------------------------------------

FHIR_REQUEST = json.dumps({
    "resourceType": "ServiceRequest", "status": "active", "intent": "order",
    "code": {"text": "Cardiology consultation"},
    "subject": {"display": "Camille Martin"}, "reasonCode": [{"text": "Exertional chest pain"}],
}, separators=(",", ":"), sort_keys=True)


def attachment_seed(name: str) -> bytes:
    return label(f"attachment/{name}")


def att(name: str, size: int, type_: str) -> tuple[envelope.Attachment, bytes]:
    return envelope.Attachment(name=name, size=size, type=type_), counter_rng(attachment_seed(name))(size)


def exact_two_chunk_attachment(manifest_without: dict) -> int:
    """The attachment size that makes the plaintext exactly 2 * CHUNK bytes."""
    size = 2 * envelope.CHUNK
    for _ in range(8):      # the size is inside the manifest, so iterate to the fixed point
        m = envelope.Manifest(**manifest_without, attachments=(
            envelope.Attachment(name="echo.dcm", size=size, type="application/dicom"),))
        new = size + 2 * envelope.CHUNK - m.plaintext_size
        if new == size:
            return size
        size = new
    raise RuntimeError("no fixed point for the attachment size")


def cases() -> list[dict]:
    letter = ("Dear colleague,\nI would be grateful if you could see Ms Martin, 58, for exertional chest "
              "pain over the last three weeks. Resting ECG attached.\nBest regards,\nDr Lefebvre")
    patient = {"patient": "Camille Martin", "born": "1967-03-14"}
    two_chunk_fields = {**patient, "subject": "Echocardiogram for review", "letter": "Images attached.",
                        "data": ""}
    ecg, ecg_bytes = att("ecg.pdf", 3000, "application/pdf")
    empty, empty_bytes = att("notes.txt", 0, "text/plain")
    lab, lab_bytes = att("lipids.csv", 517, "text/csv")
    echo, echo_bytes = att("echo.dcm", exact_two_chunk_attachment(two_chunk_fields), "application/dicom")
    report, report_bytes = att("report.pdf", 1200, "application/pdf")
    return [
        {"name": "referral-one-recipient",
         "comment": "GP to cardiologist, letter and structured data, no attachment: one FINAL chunk",
         "sender": "gp", "recipients": ["cardiologist"], "kind": "referral", "created": JAN_5_2026,
         "thread": None, "reply_to": None,
         "manifest": envelope.Manifest(**patient, subject="Chest pain, cardiology opinion", letter=letter,
                                       data=FHIR_REQUEST), "attachments": []},
        {"name": "referral-two-recipients-attachments",
         "comment": "GP to cardiologist and radiologist, three attachments, one of them empty",
         "sender": "gp", "recipients": ["cardiologist", "radiologist"], "kind": "referral",
         "created": JAN_5_2026 + 3_600_000, "thread": None, "reply_to": None,
         "manifest": envelope.Manifest(**patient, subject="ECG and lipids", letter="Results attached.",
                                       attachments=(ecg, empty, lab)),
         "attachments": [ecg_bytes, empty_bytes, lab_bytes]},
        {"name": "referral-exact-two-chunks",
         "comment": "plaintext exactly 2 * CHUNK bytes: a full MESSAGE chunk, then a full FINAL chunk",
         "sender": "gp", "recipients": ["cardiologist"], "kind": "referral",
         "created": JAN_5_2026 + 2 * 3_600_000, "thread": None, "reply_to": None,
         "manifest": envelope.Manifest(**two_chunk_fields, attachments=(echo,)), "attachments": [echo_bytes]},
        {"name": "reply",
         "comment": "the cardiologist's consultation report, in the thread of referral-one-recipient",
         "sender": "cardiologist", "recipients": ["gp"], "kind": "reply", "created": JAN_5_2026 + 2 * DAY,
         "thread": "referral-one-recipient", "reply_to": "referral-one-recipient",
         "manifest": envelope.Manifest(**patient, subject="Consultation report",
                                       letter="Dear colleague,\nStress test negative. Report attached.",
                                       attachments=(report,)),
         "attachments": [report_bytes]},
    ]


# --- building the file --------------------------------------------------------

def build_case(spec: dict, record_ids: dict[str, bytes]) -> dict:
    sender = identity(spec["sender"])
    recipients = [envelope.Recipient(node_id_bytes(identity(n).sign_public), identity(n).enc_public)
                  for n in spec["recipients"]]
    thread = record_ids[spec["thread"]] if spec["thread"] else None
    reply_to = record_ids[spec["reply_to"]] if spec["reply_to"] else None
    seed = label(f"rng/{spec['name']}")
    draws: list[bytes] = []
    sealer = envelope.Sealer(sender=sender, recipients=recipients, kind=spec["kind"], created=spec["created"],
                             rng=recording(counter_rng(seed), draws), thread=thread, reply_to=reply_to)
    manifest: envelope.Manifest = spec["manifest"]
    head, body = envelope.seal_bytes(sealer, manifest, spec["attachments"])
    outer = wire.unpack(head)
    header = envelope.Head.from_wire(head).header
    record_id, content_key, *esks, stream_header = draws
    assert record_id == header.record_id and stream_header == header.stream_header
    assert len(esks) == len(header.slots)
    assert header.key_commit == envelope.key_commitment(content_key)
    chunks = [body[i:i + envelope.CT_CHUNK] for i in range(0, len(body), envelope.CT_CHUNK)]
    record_ids[spec["name"]] = record_id
    m = manifest
    return {
        "name": spec["name"],
        "comment": spec["comment"],
        "sender": spec["sender"],
        "recipients": spec["recipients"],
        "rng_seed": seed.hex(),
        "kind": spec["kind"],
        "created": spec["created"],
        "thread": thread.hex() if thread else None,
        "reply_to": reply_to.hex() if reply_to else None,
        "manifest": {"patient": m.patient, "born": m.born, "subject": m.subject, "letter": m.letter,
                     "data": m.data,
                     "attachments": [{"name": a.name, "size": a.size, "type": a.type} for a in m.attachments]},
        "attachment_seeds": [attachment_seed(a.name).hex() for a in m.attachments],
        "attachment_sha256": [hashlib.sha256(a).hexdigest() for a in spec["attachments"]],
        "expected": {
            "record_id": record_id.hex(),
            "thread": header.thread.hex(),
            "content_key": content_key.hex(),
            "key_commitment": header.key_commit.hex(),
            "slots": [{"to": s.to.hex(), "kid": s.kid.hex(), "ephemeral_secret": esk.hex(),
                       "ephemeral_public": s.key[:32].hex(), "key": s.key.hex()}
                      for s, esk in zip(header.slots, esks)],
            "stream_header": stream_header.hex(),
            "chunk_ad": envelope.chunk_ad(record_id, header.sender).hex(),
            "manifest_wire": m.to_wire().hex(),
            "plaintext_size": m.plaintext_size,
            "chunks": max(1, -(-m.plaintext_size // envelope.CHUNK)),
            "header": outer["h"].hex(),
            "signature": outer["sig"].hex(),
            "head": head.hex(),
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "chunk_sha256": [hashlib.sha256(ch).hexdigest() for ch in chunks],
            "body": body.hex() if len(body) <= BODY_HEX_LIMIT else None,
        },
    }


def build() -> dict:
    record_ids: dict[str, bytes] = {}
    return {
        "format": "cabinet envelope, version 1 (docs/envelope.md)",
        "generated_by": "scripts/gen_vectors.py",
        "version": envelope.VERSION,
        "chunk": envelope.CHUNK,
        "signature_domain": "envelope",
        "rng": RNG_DOC,
        "rng_draw_order": DRAW_ORDER,
        "attachment_contents": ATTACHMENT_DOC,
        "body_omitted": BODY_DOC,
        "identities": {name: identity_spec(name) for name in IDENTITIES},
        "cases": [build_case(spec, record_ids) for spec in cases()],
    }


def render(vectors: dict) -> str:
    return json.dumps(vectors, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.relative_to(ROOT)}: {'up to date' if same else 'DIFFERS from what the code produces'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
