"""Ciphertext bodies on disk: sealing from files, receiving in pieces, opening for export.

All functions here block; callers run them in a worker thread. Memory stays
constant whatever the file size: data moves in pieces of a few hundred KiB.
Hashing and writing run on a second thread while the calling thread encrypts
or decrypts, so sealing and receiving use both cores of a small box.

Layout under the data folder (every file 0600, whatever the umask):
    blobs/ab/abcdef....            committed bodies of this node's own records, named by record ID
    blobs/ab/abcdef....<sender>    committed bodies of received records (a record is its sender's
                                   ID and its own: another sender's record under the same ID is
                                   another file); received before schema 3: named by ID alone
    incoming/<sender>-<id>.body    a body being received (resumable), never listed
    incoming/<id>.sealing          a body being sealed by this node
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable, Iterator, NamedTuple

from ..core.envelope import CT_CHUNK, BodyParser, Decryptor, Header, Manifest, Sealer, plaintext_prefix
from ..core.errors import InvalidEnvelope, StoreError, UsageError

READ_SIZE = 16 * CT_CHUNK          # about 1 MiB, a whole number of ciphertext chunks
_MAX_INFLIGHT = 4
INLINE_MAX = 256 * 1024             # bodies up to this size live in SQLite, not in files
FILE_MODE = 0o600
Source = bytes | Path               # a stored body: inline bytes or a blob file


def iter_source(source: Source, offset: int = 0) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray)):
        for i in range(offset, len(source), READ_SIZE):
            yield bytes(source[i:i + READ_SIZE])
        return
    try:
        fh = open(source, "rb")
    except FileNotFoundError:
        raise StoreError("a record's body file is missing from the data folder") from None
    with fh:
        fh.seek(offset)
        while piece := fh.read(READ_SIZE):
            yield piece


class _Behind:
    """Runs calls in order on a helper thread, a bounded number behind the caller.

    hashlib and libsodium release the GIL, so hashing and writing there while
    the calling thread encrypts or decrypts uses both cores of a small box.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cabinet-io")
        self._inflight: deque[Future] = deque()

    def run(self, fn: Callable, *args) -> None:
        self._inflight.append(self._pool.submit(fn, *args))
        while len(self._inflight) > _MAX_INFLIGHT:
            self._inflight.popleft().result()

    def drain(self) -> None:
        """Wait for everything submitted; re-raise the first failure."""
        try:
            while self._inflight:
                self._inflight.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


def _hash_and_write(hasher, fh, pieces: list[bytes]) -> None:
    for p in pieces:
        hasher.update(p)
        fh.write(p)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror(exc: OSError, what: str) -> StoreError:
    return StoreError(f"could not {what}: {exc.strerror or exc}")


def open_private(path: Path, mode: str = "wb") -> IO[bytes]:
    """Open for writing a file only this user can read (0600 whatever the umask, even if it existed)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


class Partial(NamedTuple):
    """A body being received, as found in incoming/."""
    path: Path
    sender: str
    record_id: str
    size: int
    mtime_ms: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.incoming = root / "incoming"
        for d in (self.blobs, self.incoming):
            d.mkdir(mode=0o700, exist_ok=True)

    def path(self, record_id: str, sender: str | None = None) -> Path:
        """A committed body: this node's own (sender None), or one received from `sender`.

        Without a sender, a received body is found by ID alone when only one sender has one.
        """
        plain = self.blobs / record_id[:2] / record_id
        if sender is not None:
            own = self.received_path(record_id, sender)
            return own if own.exists() or not plain.exists() else plain
        if plain.exists():
            return plain
        found = sorted(plain.parent.glob(f"{record_id}.*")) if plain.parent.is_dir() else []
        return found[0] if len(found) == 1 else plain

    def received_path(self, record_id: str, sender: str) -> Path:
        return self.blobs / record_id[:2] / f"{record_id}.{sender}"

    def incoming_path(self, record_id: str, sender: str) -> Path:
        return self.incoming / f"{sender}-{record_id}.body"

    def stale_sealing(self, before_ms: int) -> list[Path]:
        """Remove bodies this node began sealing and never finished (untouched since `before_ms`)."""
        gone = []
        for p in self.incoming.glob("*.sealing"):
            try:
                if p.stat().st_mtime * 1000 < before_ms:
                    p.unlink()
                    gone.append(p)
            except FileNotFoundError:
                continue
        return gone

    def partials(self) -> list[Partial]:
        """Every body being received (incoming/<sender>-<id>.body, and <id>.body from before schema 3)."""
        out = []
        for p in self.incoming.glob("*.body"):
            sender, _, rid = p.name[:-5].rpartition("-")
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append(Partial(p, sender, rid, st.st_size, int(st.st_mtime * 1000)))
        return out

    def exists(self, record_id: str) -> bool:
        return self.path(record_id).exists()

    def commit(self, tmp: Path, record_id: str, sender: str | None = None) -> None:
        """Move a finished body into place, durably (fsync file, rename, fsync dir); `sender` for
        a received body."""
        dest = self.path(record_id) if sender is None else self.received_path(record_id, sender)
        try:
            dest.parent.mkdir(mode=0o700, exist_ok=True)
            with open(tmp, "rb") as fh:
                os.fchmod(fh.fileno(), FILE_MODE)
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise _oserror(exc, "store the record body") from None

    def remove_incoming(self, record_id: str, sender: str) -> None:
        self.incoming_path(record_id, sender).unlink(missing_ok=True)




def seal_files(sealer: Sealer, manifest: Manifest, sources: list[Path], dest: Path) -> tuple[int, bytes]:
    """Encrypt manifest + attachment files into `dest`; returns (ciphertext size, SHA-256)."""
    hasher = hashlib.sha256()
    try:
        with open_private(dest) as out:
            behind = _Behind()
            try:
                behind.run(_hash_and_write, hasher, out, sealer.push(plaintext_prefix(manifest)))
                for src, att in zip(sources, manifest.attachments):
                    _seal_one(sealer, lambda pieces: behind.run(_hash_and_write, hasher, out, pieces), src, att.size)
                behind.run(_hash_and_write, hasher, out, [sealer.finish()])
            finally:
                behind.drain()
            size = out.tell()
    except OSError as exc:
        dest.unlink(missing_ok=True)
        raise _oserror(exc, "write the sealed record") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size, hasher.digest()


def _seal_one(sealer: Sealer, emit: Callable[[list[bytes]], None], src: Path, size: int) -> None:
    done = 0
    try:
        fh = open(src, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read attachment {src.name}: {exc.strerror}") from None
    with fh:
        while piece := fh.read(READ_SIZE):
            done += len(piece)
            if done > size:
                break
            emit(sealer.push(piece))
    if done != size:
        raise UsageError(f"attachment {src.name} changed while it was being sealed")


class Inbound:
    """A body being received: written and hashed piece by piece, its manifest decrypted.

    The recipient checks on arrival everything that can be checked without
    decrypting every attachment byte: the exact size, the SHA-256 the sender
    signed (so these are the bytes the sender sealed, no one else's), and the
    manifest (so the key and stream open). Attachments are decrypted, and
    their authentication tags checked, when they are read or exported; a
    sender that sealed a broken stream is found out then (docs/design.md).

    Resumable: opening an existing partial file re-reads it to rebuild the
    hash, then the sender continues from its size. Nothing is visible anywhere
    until `finish` has checked everything.
    """

    def __init__(self, path: Path, header: Header, content_key: bytes) -> None:
        self.path, self.header = path, header
        self._hash = hashlib.sha256()
        self._dec: Decryptor | None = Decryptor(header, content_key)
        self._parser = BodyParser()
        self.size = 0
        try:
            if path.exists():
                with open(path, "rb") as fh:
                    while piece := fh.read(READ_SIZE):
                        self._absorb(piece)
            self._fh = open_private(path, "ab")
        except OSError as exc:
            raise _oserror(exc, "open the incoming record") from None
        except InvalidEnvelope:
            path.unlink(missing_ok=True)
            raise

    def _absorb(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.header.body_size:
            raise InvalidEnvelope()
        self._hash.update(data)
        if self._dec is not None:
            for plain in self._dec.feed(data):
                self._parser.feed(plain)
            if self._parser.manifest is not None:
                self._dec = None                # the rest is pinned by the signed digest

    def write(self, data: bytes) -> None:
        self._absorb(data)
        try:
            self._fh.write(data)
        except OSError as exc:
            raise _oserror(exc, "write the incoming record") from None

    @property
    def complete(self) -> bool:
        return self.size == self.header.body_size

    def finish(self) -> Manifest:
        """Check size, digest and manifest; flush to disk; return the manifest."""
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise _oserror(exc, "write the incoming record") from None
        finally:
            self._fh.close()
        if not self.complete or self._hash.digest() != self.header.body_sha256:
            raise InvalidEnvelope()
        if self._dec is not None:               # a small body: all of it is the manifest's chunk
            self._parser.feed(self._dec.finish())
            return self._parser.finish()
        if self._parser.manifest is None:
            raise InvalidEnvelope()
        return self._parser.manifest

    def close(self) -> None:
        self._fh.close()


def read_manifest(source: Source, header: Header, content_key: bytes) -> Manifest:
    """Decrypt just enough of a stored body to read its manifest (letter and details)."""
    dec, parser = Decryptor(header, content_key), BodyParser()
    for piece in iter_source(source):
        for plain in dec.feed(piece):
            parser.feed(plain)
            if parser.manifest is not None:
                return parser.manifest
    parser.feed(dec.finish())
    return parser.finish()


def open_to_files(source: Source, header: Header, content_key: bytes,
                  open_sink: Callable[[int, Manifest], IO[bytes]]) -> Manifest:
    """Decrypt a stored body, verifying all of it, and hand each attachment's bytes to a sink.

    `open_sink(i, manifest)` returns a writable file for attachment i; the
    caller renames its files into place only after this returns. The helper
    thread hashes the ciphertext and writes the plaintext while this one decrypts.
    """
    dec, parser = Decryptor(header, content_key), BodyParser()
    hasher = hashlib.sha256()
    sinks: dict[int, IO[bytes]] = {}
    behind = _Behind()

    def route(plain: bytes) -> None:
        for i, data in parser.feed(plain):
            if i not in sinks:
                assert parser.manifest is not None      # attachment bytes come only after the manifest
                sinks[i] = open_sink(i, parser.manifest)
            behind.run(sinks[i].write, data)

    try:
        try:
            for piece in iter_source(source):
                behind.run(hasher.update, piece)
                for plain in dec.feed(piece):
                    route(plain)
            route(dec.finish())
            manifest = parser.finish()
        finally:
            behind.drain()
        if hasher.digest() != header.body_sha256:
            raise InvalidEnvelope()
        for i in range(len(manifest.attachments)):
            if i not in sinks:          # empty attachment: no bytes ever routed
                sinks[i] = open_sink(i, manifest)
        return manifest
    finally:
        for fh in sinks.values():
            fh.close()
