"""Thin wrappers over PyNaCl that speak only the project's errors.

Every signature in the project is domain-separated: the signed bytes are
`b"cabinet/" + domain + b"\\0" + message`, so a signature made for one purpose
(a descriptor, a request, a receipt, an envelope) can never be replayed as
another.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings as B
import nacl.exceptions
import nacl.public
import nacl.signing

from .errors import InvalidEnvelope, InvalidKey, InvalidSignature

SIGN_PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64
X25519_SIZE = 32
SEALED_KEY_SIZE = 32 + B.crypto_box_SEALBYTES


def _domain(domain: str, message: bytes) -> bytes:
    if "\0" in domain:
        raise ValueError("a signature domain must not contain NUL")
    return b"cabinet/" + domain.encode("ascii") + b"\0" + message


def sign(key: nacl.signing.SigningKey, domain: str, message: bytes) -> bytes:
    return key.sign(_domain(domain, message)).signature


def verify(public: bytes, domain: str, message: bytes, signature: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `public`'s over (domain, message)."""
    if len(public) != SIGN_PUBLIC_SIZE or len(signature) != SIGNATURE_SIZE:
        raise InvalidSignature("signature or key has the wrong length")
    try:
        nacl.signing.VerifyKey(public).verify(_domain(domain, message), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError):
        raise InvalidSignature("signature does not verify") from None


def check_x25519_public(public: bytes) -> bytes:
    """Refuse keys that cannot be used for encryption (wrong size, low order)."""
    if not isinstance(public, bytes) or len(public) != X25519_SIZE:
        raise InvalidKey("encryption key must be 32 bytes")
    x25519(b"\x01" * 32, public)
    return public


def x25519(private: bytes, public: bytes) -> bytes:
    """Raw X25519; a low-order or otherwise unusable peer key is InvalidKey."""
    if len(private) != X25519_SIZE or len(public) != X25519_SIZE:
        raise InvalidKey("X25519 keys must be 32 bytes")
    try:
        return B.crypto_scalarmult(private, public)
    except (RuntimeError, nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidKey("invalid peer key (low-order point)") from None


def seal_key(recipient_public: bytes, content_key: bytes) -> bytes:
    """Seal a content key for one recipient (anonymous sealed box)."""
    check_x25519_public(recipient_public)
    try:
        return B.crypto_box_seal(content_key, recipient_public)
    except (RuntimeError, nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidKey("invalid recipient key") from None


def open_sealed_key(private: nacl.public.PrivateKey, sealed: bytes) -> bytes:
    try:
        key = nacl.public.SealedBox(private).decrypt(sealed)
    except (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError):
        raise InvalidEnvelope() from None
    if len(key) != 32:
        raise InvalidEnvelope()
    return key


def key_id(public: bytes) -> bytes:
    """8-byte identifier of an encryption key, used to pick the right private key."""
    return hashlib.sha256(b"cabinet/kid\0" + public).digest()[:8]


def keyed_hash(key: bytes, data: bytes) -> bytes:
    """Blind index: HMAC-SHA256 under a local key, so equal inputs match without revealing them."""
    return hmac.new(key, data, hashlib.sha256).digest()
