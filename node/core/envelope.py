"""The envelope: one record (referral, reply) on the wire and at rest.

Pure functions over bytes: randomness and time come in as arguments, so the
known-answer vectors (tests/vectors/envelope-v1.json, written by
scripts/gen_vectors.py) are reproducible. The format is specified in
docs/envelope.md; this module and that file change together.

    head  = canonical msgpack {"h": header bytes, "sig": Ed25519 signature}
    body  = secretstream(XChaCha20-Poly1305) chunks of the plaintext below

The plaintext is a 4-byte big-endian manifest length, the manifest (canonical
msgpack: patient, subject, letter, structured data, attachment list), then
each attachment's bytes in order. Only recipients (and the sender itself,
which is always one of them) can read any of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, cast

import nacl.bindings as B

from . import crypto, wire
from .errors import InvalidEnvelope, InvalidKey, LocalProtocolError, RemoteProtocolError, TooLarge
from .identity import ID_BYTES, Identity, format_node_id, node_id_bytes

VERSION = 1
CHUNK = 64 * 1024                                   # plaintext bytes per secretstream chunk
ABYTES = B.crypto_secretstream_xchacha20poly1305_ABYTES
CT_CHUNK = CHUNK + ABYTES                           # ciphertext bytes per full chunk
KINDS = ("referral", "reply")
MAX_HEAD = 64 * 1024
MAX_RECIPIENTS = 32
MAX_MANIFEST = 8 * 1024 * 1024
MAX_ATTACHMENTS = 100
MAX_ATTACHMENT = 4 * 1024**3                        # 4 GiB each
MAX_RECORD = 16 * 1024**3                           # all attachments of one record together
MAX_NAME = 255
TAG_MESSAGE = B.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = B.crypto_secretstream_xchacha20poly1305_TAG_FINAL

Rng = Callable[[int], bytes]


def ciphertext_size(plaintext_size: int) -> int:
    chunks = max(1, -(-plaintext_size // CHUNK))
    return plaintext_size + chunks * ABYTES


MAX_BODY = ciphertext_size(4 + MAX_MANIFEST + MAX_RECORD)


def chunk_ad(record_id: bytes, sender: bytes) -> bytes:
    """Associated data of every chunk: binds the body to this record *and this sender*,
    so nobody can re-sign someone else's envelope as their own."""
    return b"cabinet/chunk\0" + record_id + sender


def key_commitment(content_key: bytes) -> bytes:
    """XChaCha20-Poly1305 does not commit to its key; this does, so a sender cannot
    give different recipients different keys (and contents) under one signature."""
    return hashlib.sha256(b"cabinet/key-commitment\0" + content_key).digest()


# --- header ----------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Slot:
    """The content key sealed for one recipient's X25519 key."""

    to: bytes       # recipient node ID, 20 raw bytes
    kid: bytes      # 8-byte ID of the recipient's encryption key
    key: bytes      # sealed box of the 32-byte content key (80 bytes)

    def to_wire(self) -> dict[str, Any]:
        return {"to": self.to, "kid": self.kid, "key": self.key}

    @classmethod
    def from_wire(cls, obj: object) -> "Slot":
        what = "envelope slot"
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{what}: expected a map")
        wire.only_fields(obj, {"to", "kid", "key"}, what=what)
        return cls(to=wire.field(obj, "to", bytes, what=what, size=ID_BYTES),
                   kid=wire.field(obj, "kid", bytes, what=what, size=8),
                   key=wire.field(obj, "key", bytes, what=what, size=crypto.SEALED_KEY_SIZE))


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """Everything about a record that is visible without a key, all of it signed."""

    record_id: bytes
    kind: str
    sender: bytes                 # sender node ID, 20 raw bytes
    sender_key: bytes             # sender's Ed25519 public key
    created: int                  # milliseconds since the epoch, sender's clock
    thread: bytes
    reply_to: bytes | None
    slots: tuple[Slot, ...]
    body_size: int                # ciphertext bytes
    stream_header: bytes          # secretstream header, 24 bytes
    body_sha256: bytes            # SHA-256 of the whole ciphertext
    key_commit: bytes             # key_commitment(content key)

    @property
    def id_hex(self) -> str:
        return self.record_id.hex()

    @property
    def sender_id(self) -> str:
        return format_node_id(self.sender)

    @property
    def recipient_ids(self) -> list[str]:
        return [format_node_id(s.to) for s in self.slots]

    def to_wire(self) -> bytes:
        return wire.pack({
            "v": VERSION, "id": self.record_id, "kind": self.kind, "from": self.sender,
            "sk": self.sender_key, "created": self.created, "thread": self.thread,
            "reply_to": self.reply_to, "to": [s.to_wire() for s in self.slots],
            "body": {"size": self.body_size, "chunk": CHUNK, "ss": self.stream_header,
                     "sha256": self.body_sha256, "kc": self.key_commit},
        })

    @classmethod
    def from_wire(cls, raw: bytes) -> "Header":
        return cls.from_decoded(wire.unpack(raw, max_size=MAX_HEAD, what="envelope header"))

    @classmethod
    def from_decoded(cls, h: object) -> "Header":
        what = "envelope header"
        version = wire.field(h, "v", int, what=what)
        if version != VERSION:
            shown = version if 0 <= version < 1000 else "?"
            raise RemoteProtocolError(f"{what}: unknown format version {shown} (this node reads version {VERSION})")
        wire.only_fields(h, {"v", "id", "kind", "from", "sk", "created", "thread", "reply_to", "to", "body"},
                         what=what)
        kind = wire.field(h, "kind", str, what=what)
        if kind not in KINDS:
            raise RemoteProtocolError(f"{what}: unknown kind")
        slots_raw = wire.field(h, "to", list, what=what)
        if not 1 <= len(slots_raw) <= MAX_RECIPIENTS:
            raise RemoteProtocolError(f"{what}: 1 to {MAX_RECIPIENTS} recipients allowed")
        slots = tuple(Slot.from_wire(s) for s in slots_raw)
        if len({s.to for s in slots}) != len(slots):
            raise RemoteProtocolError(f"{what}: a recipient appears twice")
        if "reply_to" not in cast("dict[str, Any]", h):      # a map: wire.field checked it
            raise RemoteProtocolError(f"{what}: missing field 'reply_to'")
        sender = wire.field(h, "from", bytes, what=what, size=ID_BYTES)
        if sender not in {s.to for s in slots}:
            raise RemoteProtocolError(f"{what}: the sender must be one of the recipients")
        body = wire.field(h, "body", dict, what=what)
        wire.only_fields(body, {"size", "chunk", "ss", "sha256", "kc"}, what=what)
        if wire.field(body, "chunk", int, what=what) != CHUNK:
            raise RemoteProtocolError(f"{what}: unsupported chunk size")
        size = wire.field(body, "size", int, what=what)
        if not ABYTES < size <= MAX_BODY or 0 < size % CT_CHUNK <= ABYTES:
            raise RemoteProtocolError(f"{what}: impossible body size")
        created = wire.field(h, "created", int, what=what)
        if created < 0:
            raise RemoteProtocolError(f"{what}: negative time")
        return cls(
            record_id=wire.field(h, "id", bytes, what=what, size=16), kind=kind, sender=sender,
            sender_key=wire.field(h, "sk", bytes, what=what, size=32), created=created,
            thread=wire.field(h, "thread", bytes, what=what, size=16),
            reply_to=wire.field(h, "reply_to", bytes, what=what, size=16, optional=True),
            slots=slots, body_size=size, stream_header=wire.field(body, "ss", bytes, what=what, size=24),
            body_sha256=wire.field(body, "sha256", bytes, what=what, size=32),
            key_commit=wire.field(body, "kc", bytes, what=what, size=32),
        )


@dataclass(frozen=True, slots=True)
class Head:
    """A verified envelope head: the header and the exact bytes that were signed."""

    header: Header
    raw: bytes       # the whole head as sent: {"h": ..., "sig": ...}

    @classmethod
    def from_wire(cls, raw: bytes) -> "Head":
        """Decode and verify the sender's signature before anything else is trusted."""
        outer = wire.unpack(raw, max_size=MAX_HEAD, what="envelope")
        if not isinstance(outer, dict):
            raise RemoteProtocolError("envelope: expected a map")
        wire.only_fields(outer, {"h", "sig"}, what="envelope")
        hraw = wire.field(outer, "h", bytes, what="envelope")
        sig = wire.field(outer, "sig", bytes, what="envelope", size=64)
        # Signature first, on the raw bytes; only then is the content looked at.
        decoded = wire.unpack(hraw, max_size=MAX_HEAD, what="envelope header")
        sk = wire.field(decoded, "sk", bytes, what="envelope header", size=32)
        try:
            crypto.verify(sk, "envelope", hraw, sig)
        except Exception:
            raise InvalidEnvelope() from None
        header = Header.from_decoded(decoded)
        if header.sender != node_id_bytes(header.sender_key):
            raise InvalidEnvelope()
        return cls(header, bytes(raw))

    def content_key(self, identity: Identity) -> bytes:
        """Open our slot: the content key, or InvalidEnvelope if the record is not for us."""
        me = node_id_bytes(identity.sign_public)
        for slot in self.header.slots:
            if slot.to == me:
                private = identity.enc_private(slot.kid)
                if private is None:
                    raise InvalidEnvelope()
                key = crypto.open_sealed_key(private, slot.key)
                if not hmac.compare_digest(key_commitment(key), self.header.key_commit):
                    raise InvalidEnvelope()
                return key
        raise InvalidEnvelope()


# --- manifest --------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    name: str
    size: int
    type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The encrypted description of a record: who the patient is, what it is about."""

    patient: str
    born: str = ""
    subject: str = ""
    letter: str = ""
    data: str = ""                         # structured data, e.g. a FHIR resource as JSON text
    attachments: tuple[Attachment, ...] = ()

    def to_wire(self) -> bytes:
        if len(self.attachments) > MAX_ATTACHMENTS:
            raise TooLarge(f"at most {MAX_ATTACHMENTS} attachments per record")
        if sum(a.size for a in self.attachments) > MAX_RECORD:
            raise TooLarge(f"attachments together are over the {MAX_RECORD // 1024**3} GiB limit")
        for a in self.attachments:
            if not 0 <= a.size <= MAX_ATTACHMENT:
                raise TooLarge(f"attachment {a.name[:40]} is over the {MAX_ATTACHMENT // 1024**3} GiB limit")
            if len(a.name) > MAX_NAME or len(a.type) > MAX_NAME:
                raise LocalProtocolError("attachment name or type over 255 characters")
        raw = wire.pack({
            "patient": self.patient, "born": self.born, "subject": self.subject, "letter": self.letter,
            "data": self.data,
            "att": [{"name": a.name, "size": a.size, "type": a.type} for a in self.attachments],
        })
        if len(raw) > MAX_MANIFEST:
            raise TooLarge(f"letter and details are over the {MAX_MANIFEST // 2**20} MiB limit")
        return raw

    @classmethod
    def from_wire(cls, raw: bytes) -> "Manifest":
        what = "manifest"
        m = wire.unpack(raw, max_size=MAX_MANIFEST, what=what)
        wire.only_fields(m if isinstance(m, dict) else {}, {"patient", "born", "subject", "letter", "data", "att"},
                         what=what)
        atts = wire.field(m, "att", list, what=what)
        if len(atts) > MAX_ATTACHMENTS:
            raise RemoteProtocolError(f"{what}: too many attachments")
        if sum(a.get("size", 0) for a in atts if isinstance(a, dict) and isinstance(a.get("size"), int)) > MAX_RECORD:
            raise RemoteProtocolError(f"{what}: attachments over the record size limit")
        parsed = []
        for a in atts:
            wire.only_fields(a if isinstance(a, dict) else {}, {"name", "size", "type"}, what=what)
            size = wire.field(a, "size", int, what=what)
            if not 0 <= size <= MAX_ATTACHMENT:
                raise RemoteProtocolError(f"{what}: attachment size out of range")
            parsed.append(Attachment(name=wire.field(a, "name", str, what=what, max_len=255), size=size,
                                     type=wire.field(a, "type", str, what=what, max_len=255)))
        def s(k: str) -> str:
            text: str = wire.field(m, k, str, what=what)
            return text
        return cls(patient=s("patient"), born=s("born"), subject=s("subject"), letter=s("letter"),
                   data=s("data"), attachments=tuple(parsed))

    @property
    def plaintext_size(self) -> int:
        return 4 + len(self.to_wire()) + sum(a.size for a in self.attachments)


# --- sealing ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Recipient:
    node_id: bytes          # 20 raw bytes
    enc_key: bytes          # X25519 public key


def seal_slot(recipient: Recipient, content_key: bytes, rng: Rng) -> Slot:
    """libsodium's crypto_box_seal, written out so the ephemeral key can come from `rng`."""
    crypto.check_x25519_public(recipient.enc_key)
    esk = rng(32)
    epk = B.crypto_scalarmult_base(esk)
    nonce = hashlib.blake2b(epk + recipient.enc_key, digest_size=24).digest()
    try:
        sealed = epk + B.crypto_box(content_key, nonce, recipient.enc_key, esk)
    except Exception:
        raise InvalidKey("invalid recipient key") from None
    return Slot(to=recipient.node_id, kid=crypto.key_id(recipient.enc_key), key=sealed)


def _stream_state(key: bytes, stream_header: bytes) -> B.crypto_secretstream_xchacha20poly1305_state:
    # init_pull derives exactly the state init_push would from this header, which
    # lets the header come from `rng` (reproducible vectors) instead of libsodium.
    state = B.crypto_secretstream_xchacha20poly1305_state()
    B.crypto_secretstream_xchacha20poly1305_init_pull(state, stream_header, key)
    return state


class Sealer:
    """Encrypts a plaintext stream chunk by chunk; the caller hashes the ciphertext.

    Hashing is left to the caller so that I/O code can run it on another core
    while this one encrypts; `seal_bytes` shows the whole sequence in one place.
    """

    def __init__(self, *, sender: Identity, recipients: Sequence[Recipient], kind: str, created: int,
                 rng: Rng = os.urandom, record_id: bytes | None = None, thread: bytes | None = None,
                 reply_to: bytes | None = None) -> None:
        if kind not in KINDS:
            raise LocalProtocolError(f"unknown record kind {kind!r}")
        me = Recipient(node_id_bytes(sender.sign_public), sender.enc_public)
        everyone = [me] + [r for r in recipients if r.node_id != me.node_id]
        if len({r.node_id for r in everyone}) != len(everyone) or len(everyone) > MAX_RECIPIENTS:
            raise LocalProtocolError("recipients must be distinct and at most 32")
        self.record_id = record_id or rng(16)
        thread = thread or self.record_id
        if len(self.record_id) != 16 or len(thread) != 16 or (reply_to is not None and len(reply_to) != 16):
            raise LocalProtocolError("record, thread and reply-to IDs are 16 bytes")
        if created < 0:
            raise LocalProtocolError("negative creation time")
        self._sender, self._kind, self._created = sender, kind, created
        self._thread, self._reply_to = thread, reply_to
        key = rng(32)
        self._key_commit = key_commitment(key)
        self._slots = tuple(seal_slot(r, key, rng) for r in everyone)
        self._ss_header = rng(24)
        self._state = _stream_state(key, self._ss_header)
        self._pending = b""
        self._ad = chunk_ad(self.record_id, me.node_id)

    def push(self, data: bytes) -> list[bytes]:
        """Add plaintext; return the ciphertext chunks that are now complete."""
        buf = memoryview(self._pending + data if self._pending else data)
        out, pos = [], 0
        # Keep at least one byte back: the last chunk must carry the FINAL tag.
        while len(buf) - pos > CHUNK:
            out.append(B.crypto_secretstream_xchacha20poly1305_push(
                self._state, bytes(buf[pos:pos + CHUNK]), self._ad, TAG_MESSAGE))
            pos += CHUNK
        self._pending = bytes(buf[pos:])
        return out

    def finish(self) -> bytes:
        """The last ciphertext chunk, tagged FINAL."""
        last = B.crypto_secretstream_xchacha20poly1305_push(self._state, self._pending, self._ad, TAG_FINAL)
        self._pending = b""
        return last

    def head(self, *, body_size: int, body_sha256: bytes) -> bytes:
        if body_size > MAX_BODY:
            raise TooLarge("record over the size limit")
        header = Header(record_id=self.record_id, kind=self._kind, sender=node_id_bytes(self._sender.sign_public),
                        sender_key=self._sender.sign_public, created=self._created, thread=self._thread,
                        reply_to=self._reply_to, slots=self._slots, body_size=body_size,
                        stream_header=self._ss_header, body_sha256=body_sha256, key_commit=self._key_commit)
        hraw = header.to_wire()
        return wire.pack({"h": hraw, "sig": self._sender.sign("envelope", hraw)})


def plaintext_prefix(manifest: Manifest) -> bytes:
    raw = manifest.to_wire()
    return len(raw).to_bytes(4, "big") + raw


def seal_bytes(sealer: Sealer, manifest: Manifest, attachments: Sequence[bytes] = ()) -> tuple[bytes, bytes]:
    """Seal a record held in memory; returns (head, body). For small records and tests."""
    if [len(a) for a in attachments] != [a.size for a in manifest.attachments]:
        raise LocalProtocolError("attachment sizes do not match the manifest")
    chunks = sealer.push(plaintext_prefix(manifest))
    for a in attachments:
        chunks += sealer.push(a)
    chunks.append(sealer.finish())
    body = b"".join(chunks)
    return sealer.head(body_size=len(body), body_sha256=hashlib.sha256(body).digest()), body


# --- opening ---------------------------------------------------------------

class Decryptor:
    """Decrypts a ciphertext stream in arbitrary pieces; refuses truncation and reordering."""

    def __init__(self, header: Header, content_key: bytes) -> None:
        self._state = _stream_state(content_key, header.stream_header)
        self._ad = chunk_ad(header.record_id, header.sender)
        self._buf = b""
        self._done = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = memoryview(self._buf + data if self._buf else data)
        out, pos = [], 0
        while len(buf) - pos >= CT_CHUNK:
            out.append(self._pull(bytes(buf[pos:pos + CT_CHUNK])))
            pos += CT_CHUNK
        self._buf = bytes(buf[pos:])
        return out

    def finish(self) -> bytes:
        """Decrypt the last piece; InvalidEnvelope unless the stream ended exactly on FINAL."""
        last = self._pull(self._buf) if self._buf else b""
        self._buf = b""
        if not self._done:
            raise InvalidEnvelope()
        return last

    def _pull(self, chunk: bytes) -> bytes:
        if self._done:
            raise InvalidEnvelope()
        try:
            plain, tag = B.crypto_secretstream_xchacha20poly1305_pull(self._state, chunk, self._ad)
        except Exception:
            raise InvalidEnvelope() from None
        if tag == TAG_FINAL:
            self._done = True
        elif tag != TAG_MESSAGE:
            raise InvalidEnvelope()
        return plain


@dataclass
class BodyParser:
    """Splits the decrypted plaintext into the manifest and each attachment's bytes.

    Feed plaintext in any pieces; `feed` yields (index, bytes) for attachment
    data once the manifest is known. `finish` checks every declared byte came.
    """

    manifest: Manifest | None = None
    _buf: bytes = b""
    _need: int = -1
    _index: int = 0
    _left: int = 0
    _sizes: list[int] = field(default_factory=list)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        return list(self._feed(data))

    def _feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if self.manifest is None:
            self._buf += data
            if self._need < 0 and len(self._buf) >= 4:
                self._need = int.from_bytes(self._buf[:4], "big")
                if self._need > MAX_MANIFEST:
                    raise InvalidEnvelope()
            if self._need < 0 or len(self._buf) < 4 + self._need:
                return
            try:
                self.manifest = Manifest.from_wire(self._buf[4:4 + self._need])
            except RemoteProtocolError:
                raise InvalidEnvelope() from None
            data, self._buf = self._buf[4 + self._need:], b""
            self._sizes = [a.size for a in self.manifest.attachments]
            self._index, self._left = 0, (self._sizes[0] if self._sizes else 0)
        while data:
            while self._index < len(self._sizes) and self._left == 0:
                self._advance()
            if self._index >= len(self._sizes):
                raise InvalidEnvelope()      # more bytes than the manifest declares
            take = data[:self._left]
            data = data[len(take):]
            self._left -= len(take)
            yield self._index, take

    def _advance(self) -> None:
        self._index += 1
        self._left = self._sizes[self._index] if self._index < len(self._sizes) else 0

    def finish(self) -> Manifest:
        if self.manifest is None or self._left or any(self._sizes[self._index + 1:]):
            raise InvalidEnvelope()
        return self.manifest


def open_bytes(head_raw: bytes, body: bytes, identity: Identity) -> tuple[Header, Manifest, list[bytes]]:
    """Verify and open a record held in memory: header, manifest, attachment contents."""
    head = Head.from_wire(head_raw)
    h = head.header
    if len(body) != h.body_size or hashlib.sha256(body).digest() != h.body_sha256:
        raise InvalidEnvelope()
    dec = Decryptor(h, head.content_key(identity))
    parser = BodyParser()
    parts: dict[int, list[bytes]] = {}
    for piece in dec.feed(body) + [dec.finish()]:
        for i, data in parser.feed(piece):
            parts.setdefault(i, []).append(data)
    manifest = parser.finish()
    return h, manifest, [b"".join(parts.get(i, [])) for i in range(len(manifest.attachments))]
