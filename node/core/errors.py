"""Every error the project raises, in one hierarchy.

Callers (the CLI, the HTTP middleware, integrators) catch `CabinetError` and
show `str(err)`: each message names the problem in one line and never carries
patient data, key material or a passphrase. Exceptions from aiohttp, nacl and
sqlite3 are translated where they are called, so nothing else leaks out.
"""

from __future__ import annotations


class CabinetError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class UsageError(CabinetError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class NotFound(UsageError):
    """An unknown contact, record or file."""


class TooLarge(UsageError):
    """An input over one of the documented size limits."""


# --- protocol -------------------------------------------------------------

class ProtocolError(CabinetError):
    """A message that breaks the wire format or the protocol rules."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something malformed, oversized or out of order."""


# --- crypto ---------------------------------------------------------------

class CryptoError(CabinetError):
    """Base of the cryptographic failures."""


class InvalidEnvelope(CryptoError):
    """One opaque error for any envelope that fails to verify or open.

    Deliberately carries no detail about *which* check failed (no oracle).
    """

    def __init__(self, message: str = "invalid envelope") -> None:
        super().__init__(message)


class InvalidKey(CryptoError):
    """A malformed or unusable public key (wrong length, low order point)."""


class InvalidSignature(CryptoError):
    """A signature over a descriptor, request or receipt that does not verify."""


class WrongPassphrase(CryptoError):
    """The key file could not be opened with the given passphrase."""


# --- consent --------------------------------------------------------------

class ConsentRefused(CabinetError):
    """A consent token was refused; the message says why."""


# --- store ----------------------------------------------------------------

class StoreError(CabinetError):
    """The local data folder could not be read or written."""


class CorruptStore(StoreError):
    """The data folder exists but is damaged or not a cabinet data folder."""


class AlreadyExists(StoreError):
    """Creating something that is already there (a node, a contact name)."""


# --- transport ------------------------------------------------------------

class TransportError(CabinetError):
    """A peer could not be reached or did not answer properly."""


class PeerUnreachable(TransportError):
    """No connection could be made to the peer."""


class PeerTimeout(TransportError):
    """The peer did not answer in time."""


class PeerRefused(TransportError):
    """The peer answered with a refusal (its status and reason are kept)."""

    def __init__(self, message: str, status: int = 0, signed: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.signed = signed          # False: the refusal could not be authenticated (maybe not the peer)


class AuthenticationFailed(TransportError):
    """A request or response did not prove the identity it claimed."""
