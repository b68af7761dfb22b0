"""Backups: an encrypted, consistent, incremental copy of a data folder, its check, and its restore.

A backup folder (docs/backup.md) holds:

    cabinet-backup      msgpack: the backup key wrapped twice (Argon2id of the passphrase; the recovery code)
    manifest            SecretBox(backup key) of {body, sig}: every file with size and SHA-256, signed
    keys.cabinet        the key file as it is (opens with the passphrase)
    secrets             SecretBox(backup key) of the key file's content (a restore with the recovery code)
    config.json         as it is (public details)
    db/<stamp>.NNN      cabinet.db from SQLite's online backup, secretstream-encrypted, in parts < 4 GiB
    blobs/ab/<name>     record bodies as they are (ciphertext already); only new ones are copied

The backup key is made once per node and kept in the database sealed under the
storage key, so every backup of a node opens with the same recovery code,
printed once at the first backup. Everything here blocks: the facade runs it
in a worker thread. Nothing here ever sees plaintext record data.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import nacl.bindings as B
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret
import nacl.utils

from ..config import CONFIG, Config
from ..core import crypto, wire
from ..core.errors import CabinetError, CorruptStore, InvalidSignature, ProtocolError, UsageError, WrongPassphrase
from ..core.identity import Identity, node_id_for
from ..store import backup as dbbackup
from ..store import keyfile
from ..store import records as store_records
from ..store.retention import last_backup
from ..store.db import DBFILE, connect
from .events import AuditAppended
from .ports import Ports

HEADER, MANIFEST, SECRETS = "cabinet-backup", "manifest", "secrets"
META_KEY = "backup-key"
CHUNK = 1 << 20                                   # plaintext bytes per secretstream message
ABYTES = B.crypto_secretstream_xchacha20poly1305_ABYTES
HEADERBYTES = B.crypto_secretstream_xchacha20poly1305_HEADERBYTES
PART_MAX = (4 << 30) - (64 << 20)                 # FAT32 holds files below 4 GiB
COPY = 1 << 20


class BackupDamaged(CorruptStore):
    """A backup that fails a check: the message names the file and what is wrong."""


@dataclass
class Report:
    at: int
    node_id: str
    files: int = 0
    bytes: int = 0
    blobs_copied: int = 0
    blobs_kept: int = 0
    db_parts: int = 0
    recovery_code: str | None = None            # only at the first backup of this node
    removed: list[str] = field(default_factory=list)


# --- keys ------------------------------------------------------------------------

def _code_key(code: str, salt: bytes) -> bytes:
    norm = "".join(ch for ch in code.upper() if ch.isalnum()).encode("ascii", "ignore")
    return nacl.hash.blake2b(norm, digest_size=32, salt=salt, person=b"cabinet-recover",
                             encoder=nacl.encoding.RawEncoder)


def _wrap(key: bytes, secret: bytes) -> bytes:
    return bytes(nacl.secret.SecretBox(key).encrypt(secret))


def _unwrap(key: bytes, box: bytes) -> bytes | None:
    try:
        return nacl.secret.SecretBox(key).decrypt(box)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return None


def _backup_key(ports: Ports) -> tuple[bytes, dict, str | None]:
    """The node's backup key and its recovery wrap; made (with a new code, returned once) if new."""
    sealed = ports.store.call_sync(dbbackup.get_meta, META_KEY)
    if sealed is not None:
        inner = wire.unpack(nacl.secret.SecretBox(ports.keys.storage_key).decrypt(sealed), what="backup key")
        return inner["key"], inner["code"], None
    key = nacl.utils.random(32)
    code = base64.b32encode(nacl.utils.random(20)).decode("ascii")
    code_text = "-".join(code[i:i + 4] for i in range(0, len(code), 4))
    salt = nacl.utils.random(16)
    wrap = {"salt": salt, "box": _wrap(_code_key(code_text, salt), key)}
    box = nacl.secret.SecretBox(ports.keys.storage_key).encrypt(wire.pack({"key": key, "code": wrap}))
    ports.store.call_sync(dbbackup.set_meta, META_KEY, bytes(box))
    return key, wrap, code_text


# --- files -----------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                      # some file systems (FAT, some shares) refuse: best effort
    finally:
        os.close(fd)


def _create(path: Path):
    """A new file, 0600 where the file system keeps modes (FAT and many shares do not)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_file(path: Path, data: bytes) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _create(tmp) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _publish(tmp, path)
    return len(data), hashlib.sha256(data).hexdigest()


def _copy_file(src: Path, dest: Path) -> tuple[int, str]:
    """Copy in pieces through a temporary name; returns size and SHA-256 of what was written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, h, n = dest.with_name(dest.name + ".tmp"), hashlib.sha256(), 0
    with open(src, "rb") as fi, _create(tmp) as fo:
        while piece := fi.read(COPY):
            h.update(piece)
            fo.write(piece)
            n += len(piece)
        fo.flush()
        os.fsync(fo.fileno())
    _publish(tmp, dest)
    return n, h.hexdigest()


def _blob_files(folder: Path) -> Iterator[Path]:
    root = folder / "blobs"
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir():
                yield from (p for p in sorted(sub.iterdir()) if p.is_file() and not p.name.endswith(".tmp"))


def chunk_for(part_max: int) -> int:
    """Plaintext bytes per secretstream message: 1 MiB, less when parts are tiny (tests)."""
    return max(4096, min(CHUNK, part_max // 4))


def _encrypt_parts(plain: Path, dest: Path, stem: str, key: bytes, part_max: int) -> dict[str, tuple[int, str]]:
    """Encrypt `plain` with secretstream into dest/db/<stem>.NNN, a new part before `part_max` bytes."""
    state = B.crypto_secretstream_xchacha20poly1305_state()
    header = B.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    chunk = chunk_for(part_max)
    part_max = max(part_max, HEADERBYTES + chunk + ABYTES)
    out: dict[str, tuple[int, str]] = {}
    size = plain.stat().st_size
    done, fo, name, h, n = 0, None, "", hashlib.sha256(), 0

    def close_part() -> None:
        assert fo is not None
        fo.flush()
        os.fsync(fo.fileno())
        fo.close()
        _publish(dest / "db" / (name + ".tmp"), dest / "db" / name)
        out[name] = (n, h.hexdigest())

    (dest / "db").mkdir(parents=True, exist_ok=True)
    with open(plain, "rb") as fi:
        pending = header
        while True:
            piece = fi.read(chunk)
            done += len(piece)
            last = done >= size
            tag = B.crypto_secretstream_xchacha20poly1305_TAG_FINAL if last else \
                B.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
            data = pending + B.crypto_secretstream_xchacha20poly1305_push(state, piece, None, tag)
            pending = b""
            if fo is None or n + len(data) > part_max:
                if fo is not None:
                    close_part()
                name, h, n = f"{stem}.{len(out):03d}", hashlib.sha256(), 0
                fo = _create(dest / "db" / (name + ".tmp"))
            fo.write(data)
            h.update(data)
            n += len(data)
            if last:
                break
    close_part()
    return out


def _decrypt_parts(parts: list[Path], key: bytes, out: Path, chunk: int) -> None:
    """The database from its parts; any cut, swap or flipped byte is refused."""
    def stream() -> Iterator[bytes]:
        for p in parts:
            with open(p, "rb") as fh:
                while piece := fh.read(COPY):
                    yield piece

    buf, state, final = b"", None, False
    with open(out, "wb") as fo:
        for piece in stream():
            buf += piece
            if state is None:
                if len(buf) < HEADERBYTES:
                    continue
                state = B.crypto_secretstream_xchacha20poly1305_state()
                B.crypto_secretstream_xchacha20poly1305_init_pull(state, buf[:HEADERBYTES], key)
                buf = buf[HEADERBYTES:]
            while len(buf) >= chunk + ABYTES and not final:
                final = _pull(state, buf[:chunk + ABYTES], fo)
                buf = buf[chunk + ABYTES:]
        if state is not None and buf and not final:
            final = _pull(state, buf, fo)
            buf = b""
        if state is None or not final or buf:
            raise BackupDamaged("backup damaged: the database copy is cut short or has extra bytes")
        fo.flush()
        os.fsync(fo.fileno())


def _pull(state, data: bytes, fo) -> bool:
    try:
        plain, tag = B.crypto_secretstream_xchacha20poly1305_pull(state, data, None)
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError):
        raise BackupDamaged("backup damaged: the database copy does not decrypt (altered or not this backup's)") \
            from None
    fo.write(plain)
    return tag == B.crypto_secretstream_xchacha20poly1305_TAG_FINAL


# --- making a backup -----------------------------------------------------------------

def make(ports: Ports, dest: Path, passphrase: str | None, *, part_max: int = PART_MAX,
         kek: bytes | None = None) -> Report:
    """Write (or bring up to date) the backup of this node in `dest`.

    The backup key is wrapped under the passphrase; a running node that was
    not given it again (a scheduled backup) wraps it under `kek`, the key its
    key file's Argon2id derived at unlock, with that file's salt and cost.
    """
    if passphrase is None and not kek:
        raise UsageError("a backup needs the passphrase (or the unlocked node's key)")
    folder, identity = ports.folder, ports.identity
    dest = Path(dest).expanduser()
    if dest.resolve() == folder.resolve() or folder.resolve() in dest.resolve().parents:
        raise UsageError("the backup folder must be outside the data folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use {dest} for a backup: {exc.strerror}") from None
    key, code_wrap, new_code = _backup_key(ports)
    header = _read_header(dest)
    if header is not None and header.get("node") != identity.node_id:
        raise UsageError(f"{dest} holds the backup of another node: choose another folder")
    previous = _previous_files(dest, key) if header is not None else {}
    report = Report(at=ports.clock(), node_id=identity.node_id, recovery_code=new_code)
    files: dict[str, list] = {}

    tmp = folder / f".backup-{os.getpid()}-{nacl.utils.random(4).hex()}.db"
    try:
        dbbackup.snapshot(folder / DBFILE, tmp)          # first: every blob it names exists already
        stem = time.strftime("%Y%m%dT%H%M%S", time.gmtime(report.at / 1000)) + f"-{nacl.utils.random(3).hex()}"
        parts = _encrypt_parts(tmp, dest, stem, key, part_max)
    finally:
        for p in (tmp, tmp.with_name(tmp.name + "-journal")):
            p.unlink(missing_ok=True)
    files.update({f"db/{name}": list(v) for name, v in parts.items()})
    report.db_parts = len(parts)

    files["keys.cabinet"] = list(_copy_file(folder / keyfile.KEYFILE, dest / "keys.cabinet"))
    files[CONFIG] = list(_copy_file(folder / CONFIG, dest / CONFIG))
    secrets = identity.secrets() | {"storage": ports.keys.storage_key, "index": ports.keys.index_key}
    files[SECRETS] = list(_write_file(dest / SECRETS, _wrap(key, wire.pack(secrets))))
    for src in _blob_files(folder):
        rel = f"blobs/{src.parent.name}/{src.name}"
        size = src.stat().st_size
        old = previous.get(rel)
        if old is not None and old[0] == size and _size(dest / rel) == size:
            files[rel] = list(old)
            report.blobs_kept += 1
        else:
            files[rel] = list(_copy_file(src, dest / rel))
            report.blobs_copied += 1

    if passphrase is not None:
        ops, mem = keyfile.kdf_cost(folder)
        salt = nacl.utils.random(16)
        pass_wrap = {"salt": salt, "ops": ops, "mem": mem,
                     "box": _wrap(keyfile.derive(passphrase, salt, ops, mem), key)}
    else:
        assert kek is not None
        pass_wrap = _kek_wrap(folder, kek, key)
    _write_file(dest / HEADER, wire.pack({"v": 1, "kind": "cabinet-backup", "node": identity.node_id,
                                          "pass": pass_wrap, "code": code_wrap}))
    body = wire.pack({"v": 1, "node": identity.node_id, "sign_key": identity.sign_public, "at": report.at,
                      "db": sorted(parts), "chunk": chunk_for(part_max), "files": files})
    signed = wire.pack({"body": body, "sig": identity.sign("backup-manifest", body)})
    _write_file(dest / MANIFEST, _wrap(key, signed))          # the backup is this manifest from now on
    report.removed = _sweep(dest, set(files))
    report.files = len(files)
    report.bytes = sum(v[0] for v in files.values())
    return report


def _kek_wrap(folder: Path, kek: bytes, key: bytes) -> dict:
    """The backup key wrapped under the key file's derived key, with the key file's salt and cost:
    `unlock` derives the same key from the passphrase. Refused if the passphrase changed since unlock."""
    outer = wire.unpack((folder / keyfile.KEYFILE).read_bytes(), max_size=1 << 16, what="key file")
    if _unwrap(kek, outer["box"]) is None:
        raise WrongPassphrase("the passphrase was changed since the node was unlocked: restart it "
                              "(or run 'cabinet backup DEST' by hand)")
    return {"salt": outer["salt"], "ops": outer["ops"], "mem": outer["mem"], "box": _wrap(kek, key)}


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _previous_files(dest: Path, key: bytes) -> dict[str, tuple[int, str]]:
    """What the last backup in `dest` listed (to copy only new blobs); empty if unreadable."""
    try:
        body = _manifest_body(dest, key)
    except CabinetError:
        return {}
    return {k: (v[0], v[1]) for k, v in body["files"].items()}


def _sweep(dest: Path, keep: set[str]) -> list[str]:
    """Remove from db/ and blobs/ what the new manifest no longer lists (older database copies)."""
    removed = []
    for sub in ("db", "blobs"):
        root = dest / sub
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and rel not in keep:
                p.unlink()
                removed.append(rel)
    return removed


# --- opening one ---------------------------------------------------------------------

def _read_header(src: Path) -> dict | None:
    try:
        raw = (src / HEADER).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BackupDamaged(f"backup damaged: cannot read {HEADER} ({exc.strerror})") from None
    try:
        h = wire.unpack(raw, max_size=1 << 16, what="backup header")
        ok = (isinstance(h, dict) and h.get("v") == 1 and h.get("kind") == "cabinet-backup"
              and isinstance(h.get("pass"), dict) and isinstance(h.get("code"), dict))
    except ProtocolError:
        ok = False
    if not ok:
        raise BackupDamaged(f"backup damaged: {HEADER} is not a cabinet backup header")
    return h


def unlock(src: Path, *, passphrase: str | None = None, recovery_code: str | None = None) -> tuple[bytes, dict]:
    """The backup key, opened with the passphrase or the recovery code; and the header."""
    header = _read_header(src)
    if header is None:
        raise UsageError(f"no cabinet backup in {src}")
    try:
        if recovery_code is not None:
            w = header["code"]
            key = _unwrap(_code_key(recovery_code, w["salt"]), w["box"])
            if key is None:
                raise WrongPassphrase("wrong recovery code for this backup")
        else:
            w = header["pass"]
            key = _unwrap(keyfile.derive(passphrase or "", w["salt"], w["ops"], w["mem"]), w["box"])
            if key is None:
                raise WrongPassphrase("wrong passphrase for this backup (the recovery code opens it too)")
    except (KeyError, TypeError, ValueError, nacl.exceptions.CryptoError):
        raise BackupDamaged(f"backup damaged: {HEADER} is malformed") from None
    return key, header


def _manifest_body(src: Path, key: bytes) -> dict:
    try:
        sealed = (src / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise BackupDamaged("backup damaged: the manifest is missing") from None
    signed = _unwrap(key, sealed)
    if signed is None:
        raise BackupDamaged("backup damaged: the manifest does not decrypt (altered or cut)")
    try:
        outer = wire.unpack(signed, max_size=1 << 30, what="backup manifest")
        body = wire.unpack(outer["body"], max_size=1 << 30, what="backup manifest")
        crypto.verify(body["sign_key"], "backup-manifest", outer["body"], outer["sig"])
        if node_id_for(body["sign_key"]) != body["node"] or not isinstance(body["files"], dict):
            raise InvalidSignature("the manifest's signer is not its node")
    except (ProtocolError, KeyError, TypeError, InvalidSignature):
        raise BackupDamaged("backup damaged: the manifest's signature does not verify") from None
    return body


def _verified(src: Path, rel: str, size: int, digest: str, copy_to: Path | None) -> None:
    path = src / rel
    got = _size(path)
    if got is None:
        raise BackupDamaged(f"backup damaged: {rel} is missing")
    if got != size:
        raise BackupDamaged(f"backup damaged: {rel} has {got} bytes, the manifest says {size} (cut short?)")
    h = hashlib.sha256()
    fo = open(copy_to, "wb") if copy_to is not None else None
    try:
        with open(path, "rb") as fi:
            while piece := fi.read(COPY):
                h.update(piece)
                if fo is not None:
                    fo.write(piece)
        if fo is not None:
            fo.flush()
            os.fsync(fo.fileno())
    finally:
        if fo is not None:
            fo.close()
    if h.hexdigest() != digest:
        raise BackupDamaged(f"backup damaged: {rel} does not match its checksum (altered)")


def _secrets(src: Path, key: bytes, sign_key: bytes) -> keyfile.Secrets:
    inner = _unwrap(key, (src / SECRETS).read_bytes())
    if inner is None:
        raise BackupDamaged(f"backup damaged: {SECRETS} does not decrypt")
    d = wire.unpack(inner, max_size=1 << 16, what="backup secrets")
    secrets = keyfile.Secrets(Identity(d["sign"], list(d["enc"])), d["storage"], d["index"])
    if secrets.identity.sign_public != sign_key:
        raise BackupDamaged("backup damaged: its keys are not those of the node that signed it")
    return secrets


def _unpack(src: Path, key: bytes, into: Path, restoring: bool) -> tuple[dict, keyfile.Secrets]:
    """Check every file of the backup (copying blobs, the key file and config into `into` when
    restoring) and decrypt the database into `into`."""
    body = _manifest_body(src, key)
    for rel, (size, digest) in sorted(body["files"].items()):
        if not rel.startswith("db/"):
            target = None
            if restoring and (rel.startswith("blobs/") or rel in ("keys.cabinet", CONFIG)):
                target = into / rel
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _verified(src, rel, size, digest, target)
    for rel in body["db"]:
        size, digest = body["files"][f"db/{rel}"]
        _verified(src, f"db/{rel}", size, digest, None)
    secrets = _secrets(src, key, body["sign_key"])
    db = into / DBFILE
    fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    chunk = body.get("chunk", CHUNK)
    if not isinstance(chunk, int) or not 0 < chunk <= CHUNK:
        raise BackupDamaged("backup damaged: the manifest names an impossible chunk size")
    _decrypt_parts([src / "db" / p for p in body["db"]], key, db, chunk)
    problem = dbbackup.integrity(db)
    if problem != "ok":
        raise BackupDamaged(f"backup damaged: the database fails its integrity check ({problem[:120]})")
    return body, secrets


def check(src: Path, *, passphrase: str | None = None, recovery_code: str | None = None) -> dict:
    """Verify a backup without restoring: hashes, signature, the database opens and is intact."""
    src = Path(src).expanduser()
    key, _ = unlock(src, passphrase=passphrase, recovery_code=recovery_code)
    with tempfile.TemporaryDirectory(prefix="cabinet-check-") as tmp:     # 0700, removed whatever happens
        body, _ = _unpack(src, key, Path(tmp), restoring=False)
    return {"node_id": body["node"], "at": body["at"], "files": len(body["files"]),
            "bytes": sum(v[0] for v in body["files"].values())}


# --- restoring -------------------------------------------------------------------------

def restore(src: Path, data: Path, *, now: int, passphrase: str | None = None, recovery_code: str | None = None,
            new_passphrase: str | None = None) -> dict:
    """Rebuild a node in `data` (which must not hold one) from the backup in `src`.

    Everything is written into DATA.partial and renamed at the end: a failure
    leaves nothing. With the recovery code, the key file is written anew under
    `new_passphrase`. The restored database records the restore (voids in every
    outgoing stream, and a "restored" audit entry).
    """
    src, data = Path(src).expanduser(), Path(data).expanduser().absolute()
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise UsageError(f"{data} is not empty: restore into a new folder (it must not hold a node)")
    if recovery_code is not None and not new_passphrase:
        raise UsageError("with the recovery code, give the new passphrase for the restored node")
    key, _ = unlock(src, passphrase=passphrase, recovery_code=recovery_code)
    partial = data.with_name(data.name + ".partial")
    if partial.exists():
        if not (partial / ".cabinet-restore").exists():
            raise UsageError(f"{partial} exists and is not an unfinished restore: move it away first")
        shutil.rmtree(partial)
    partial.mkdir(mode=0o700, parents=True)
    (partial / ".cabinet-restore").touch(mode=0o600)
    try:
        body, secrets = _unpack(src, key, partial, restoring=True)
        if recovery_code is not None:
            assert new_passphrase is not None
            (partial / keyfile.KEYFILE).unlink(missing_ok=True)
            keyfile.write_secrets(partial, new_passphrase, secrets)
        elif keyfile.open_(partial, passphrase or "").identity.sign_public != body["sign_key"]:
            raise BackupDamaged("backup damaged: its key file is not that of the node that signed it")
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(body["at"] / 1000))
        db = connect(partial / DBFILE)                  # brings an older backup's schema up to date too
        try:
            dbbackup.record_restore(db, at=now, backup_at=body["at"], detail=f"backup of {date}")
        finally:
            db.conn.close()
        for p in partial.rglob("*"):
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
        (partial / ".cabinet-restore").unlink()
        _fsync_dir(partial)
        if data.exists():
            data.rmdir()                               # empty, checked above
        os.rename(partial, data)
        _fsync_dir(data.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"node_id": body["node"], "at": body["at"], "files": len(body["files"])}


# --- scheduled backups (cabinet run) -------------------------------------------------------

log = logging.getLogger("cabinet.backup")
SCHEDULES = {"daily": 24 * 3600 * 1000, "weekly": 7 * 24 * 3600 * 1000, "off": 0}
RETRY_S = 3600.0


def check_schedule(text: str) -> str:
    if text not in SCHEDULES:
        raise UsageError(f"--schedule: daily, weekly or off (got {text!r})")
    return text


class Scheduled:
    """The running node's backups to `config.backup_dest`, made when due without the passphrase
    (under the key derived at unlock, `kek()`); a failure is logged, audited and retried hourly.

    The destination and schedule are re-read from config.json each round (`cabinet backup DEST
    --schedule` sets them while the node runs). Any backup of this node counts (its "backup-made"
    audit entry), so a backup made by hand postpones the next scheduled one.
    """

    def __init__(self, ports: Ports, kek: Callable[[], bytes]) -> None:
        self.ports, self._kek = ports, kek
        self.last_error: str | None = None

    async def round(self) -> float:
        p = self.ports
        fresh = await asyncio.to_thread(Config.load, p.folder)
        p.config.backup_dest, p.config.backup_schedule = fresh.backup_dest, fresh.backup_schedule
        period = SCHEDULES.get(p.config.backup_schedule, SCHEDULES["daily"])
        if not p.config.backup_dest or not period:
            return RETRY_S
        if await p.store.call(dbbackup.get_meta, META_KEY) is None:
            # The first backup prints the recovery code: it must be made by a person, who keeps it.
            self.last_error = "no backup made by hand yet"
            log.warning("scheduled backup: run 'cabinet backup DEST' once by hand first (it shows the recovery code)")
            return RETRY_S
        last = await p.store.call(last_backup)
        now = p.now()
        if last is not None and now - last < period:
            return min((last + period - now) / 1000, RETRY_S)
        return await self._make(Path(p.config.backup_dest))

    async def _make(self, dest: Path) -> float:
        p = self.ports
        try:
            report = await asyncio.to_thread(make, p, dest, None, kek=self._kek())
        except (CabinetError, OSError) as exc:
            reason = str(exc) if isinstance(exc, CabinetError) else (exc.strerror or exc.__class__.__name__)
            self.last_error = reason
            log.error("scheduled backup to %s failed: %s; next try in an hour", dest, reason)
            await self._audit("backup-failed", f"scheduled: {reason}"[:300])
            return RETRY_S
        self.last_error = None
        log.info("scheduled backup written to %s: %d files, %d new record bodies", dest, report.files,
                 report.blobs_copied)
        await self._audit("backup-made", f"scheduled: {report.files} files, {report.blobs_copied} new")
        return RETRY_S

    async def _audit(self, event: str, detail: str) -> None:
        p = self.ports
        await p.store.call(store_records.log, at=p.now(), event=event, detail=detail)
        p.publish(AuditAppended(at=p.now(), event=event))

