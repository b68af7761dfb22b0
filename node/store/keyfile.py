"""The passphrase-protected key file: identity keys plus the local storage keys.

Argon2id (libsodium's crypto_pwhash) derives a key from the passphrase; the
secrets are sealed with XSalsa20-Poly1305 (SecretBox). The file is written
atomically with mode 0600. Wrong passphrase and damaged file are different,
clear errors.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from ..core import wire
from ..core.errors import CorruptStore, ProtocolError, UsageError, WrongPassphrase
from ..core.identity import Identity

KEYFILE = "keys.cabinet"
# Profiles: "moderate" (256 MiB, default: a stolen disk must not fall to a GPU
# farm), "interactive" (64 MiB, small boxes), "min" (tests only; weak).
PROFILES = {
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "min": (nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN),
}
MIN_PASSPHRASE = 8


@dataclass(frozen=True)
class Secrets:
    identity: Identity
    storage_key: bytes     # SecretBox key for list metadata at rest
    index_key: bytes       # HMAC key for the blind index
    kek: bytes = b""       # the key derived from the passphrase: lets a running node re-read its key file


def _derive(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), salt, opslimit=ops, memlimit=mem)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    # One temporary name per process and thread: two writers at once never share (and corrupt) it.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def create(folder: Path, passphrase: str, profile: str | None = None) -> Secrets:
    if len(passphrase) < MIN_PASSPHRASE:
        raise UsageError(f"passphrase too short: use at least {MIN_PASSPHRASE} characters")
    profile = profile or os.environ.get("CABINET_KDF", "moderate")
    if profile not in PROFILES:
        raise UsageError(f"unknown CABINET_KDF profile {profile!r} (moderate, interactive, min)")
    ops, mem = PROFILES[profile]
    secrets = Secrets(Identity.generate(), nacl.utils.random(32), nacl.utils.random(32))
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    inner = secrets.identity.secrets() | {"storage": secrets.storage_key, "index": secrets.index_key}
    box = nacl.secret.SecretBox(_derive(passphrase, salt, ops, mem)).encrypt(wire.pack(inner))
    write_atomic(folder / KEYFILE, wire.pack({"v": 1, "kdf": "argon2id13", "ops": ops, "mem": mem,
                                              "salt": salt, "box": bytes(box)}))
    return secrets


def save_identity(folder: Path, passphrase: str, secrets: Secrets) -> None:
    """Rewrite the key file with the same KDF settings (after a key rotation)."""
    outer = _read_outer(folder)
    inner = secrets.identity.secrets() | {"storage": secrets.storage_key, "index": secrets.index_key}
    key = _derive(passphrase, outer["salt"], outer["ops"], outer["mem"])
    outer["box"] = bytes(nacl.secret.SecretBox(key).encrypt(wire.pack(inner)))
    write_atomic(folder / KEYFILE, wire.pack(outer))


def write_secrets(folder: Path, passphrase: str, secrets: Secrets, profile: str | None = None) -> Secrets:
    """Seal `secrets` under a (new) passphrase with a fresh salt, atomically; returns them with the new KEK.

    `profile` is a KDF cost name; None keeps the current file's cost (or the
    CABINET_KDF default when there is no file yet, as after a restore).
    """
    if len(passphrase) < MIN_PASSPHRASE:
        raise UsageError(f"passphrase too short: use at least {MIN_PASSPHRASE} characters")
    if profile is not None:
        if profile not in PROFILES:
            raise UsageError(f"unknown KDF cost {profile!r} (moderate, interactive)")
        ops, mem = PROFILES[profile]
    elif (folder / KEYFILE).exists():
        outer = _read_outer(folder)
        ops, mem = outer["ops"], outer["mem"]
    else:
        ops, mem = PROFILES.get(os.environ.get("CABINET_KDF", "moderate"), PROFILES["moderate"])
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    key = _derive(passphrase, salt, ops, mem)
    inner = secrets.identity.secrets() | {"storage": secrets.storage_key, "index": secrets.index_key}
    box = nacl.secret.SecretBox(key).encrypt(wire.pack(inner))
    write_atomic(folder / KEYFILE, wire.pack({"v": 1, "kdf": "argon2id13", "ops": ops, "mem": mem,
                                              "salt": salt, "box": bytes(box)}))
    return Secrets(secrets.identity, secrets.storage_key, secrets.index_key, key)


def change_passphrase(folder: Path, old: str, new: str, profile: str | None = None) -> None:
    """Re-wrap the same keys under a new passphrase (and KDF cost); nothing else changes.

    The old passphrase must open the file first; the new file replaces the old
    one atomically (a crash leaves one or the other, never a mix).
    """
    if len(new) < MIN_PASSPHRASE:
        raise UsageError(f"new passphrase too short: use at least {MIN_PASSPHRASE} characters")
    secrets = open_(folder, old)
    write_secrets(folder, new, secrets, profile)


def kdf_cost(folder: Path) -> tuple[int, int]:
    """The key file's Argon2id (opslimit, memlimit): a backup wraps its key at the same cost."""
    outer = _read_outer(folder)
    return outer["ops"], outer["mem"]


def derive(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    return _derive(passphrase, salt, ops, mem)


def _read_outer(folder: Path) -> dict:
    path = folder / KEYFILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"no cabinet node in {folder} (run 'cabinet init' first)") from None
    except OSError as exc:
        raise CorruptStore(f"cannot read the key file: {exc.strerror}") from None
    try:
        outer = wire.unpack(raw, max_size=1 << 16, what="key file")
        ok = (isinstance(outer, dict) and outer.get("v") == 1 and outer.get("kdf") == "argon2id13"
              and isinstance(outer.get("salt"), bytes) and isinstance(outer.get("box"), bytes)
              and isinstance(outer.get("ops"), int) and isinstance(outer.get("mem"), int))
    except ProtocolError:
        ok = False
    if not ok:
        raise CorruptStore(f"the key file {path} is damaged or not a cabinet key file")
    return outer


def open_(folder: Path, passphrase: str) -> Secrets:
    outer = _read_outer(folder)
    return _unbox(outer, _derive(passphrase, outer["salt"], outer["ops"], outer["mem"]))


def reopen(folder: Path, kek: bytes) -> Secrets:
    """Read the key file again with the key already derived (a rotation by another command)."""
    return _unbox(_read_outer(folder), kek)


def _unbox(outer: dict, key: bytes) -> Secrets:
    try:
        plain = nacl.secret.SecretBox(key).decrypt(outer["box"])
    except nacl.exceptions.CryptoError:
        raise WrongPassphrase("wrong passphrase for this data folder") from None
    try:
        inner = wire.unpack(plain, max_size=1 << 16, what="key file")
        return Secrets(Identity(inner["sign"], list(inner["enc"])), inner["storage"], inner["index"], key)
    except (ProtocolError, KeyError, TypeError):
        raise CorruptStore("the key file opened but its content is damaged") from None
