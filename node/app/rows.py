"""A record's row for the store, and where its sealed body goes: shared by every service that
writes records (sending, replying, intake, re-sealing for a patient's grant).

Both are plain functions over the ports: the row's listing details are sealed
under the local storage key and indexed by the keyed patient hash.
"""

from __future__ import annotations

from pathlib import Path

from ..core.envelope import Header, Manifest
from ..store import blobs as blobstore
from ..store import records
from .ports import Ports


def record_row(ports: Ports, header: Header, head: bytes, manifest: Manifest, direction: str) -> dict:
    """The `records` row of a record (without `seq` and `body`)."""
    meta = {"patient": manifest.patient, "born": manifest.born, "subject": manifest.subject,
            "att": [[a.name, a.size, a.type] for a in manifest.attachments]}
    return {"id": header.id_hex, "direction": direction, "kind": header.kind, "sender": header.sender_id,
            "thread": header.thread.hex(), "reply_to": header.reply_to.hex() if header.reply_to else None,
            "created": header.created, "stored": ports.clock(), "head": head, "body_size": header.body_size,
            "meta": records.seal_meta(ports.keys.storage_key, meta),
            "patient_ix": records.patient_index(ports.keys.index_key, manifest.patient, manifest.born)}


def place_sealed(ports: Ports, tmp: Path, record_id: str, size: int) -> bytes | None:
    """Small bodies go into SQLite with their row (returned); large ones into blobs/, durably.

    Blocks (file reads, fsync): run it in a worker thread.
    """
    if size <= blobstore.INLINE_MAX:
        data = tmp.read_bytes()
        tmp.unlink()
        return data
    ports.blobs.commit(tmp, record_id)
    return None
