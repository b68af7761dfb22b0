"""Asking for the passphrase: $CABINET_PASSPHRASE, else a systemd credential, else the terminal.

A node run as a systemd service (`cabinet service install --passphrase-from
credential`) finds its passphrase in $CREDENTIALS_DIRECTORY/cabinet-passphrase,
a file systemd decrypts into a private, unswappable folder for that service
alone. The terminal prompt never echoes.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from ..node import UsageError

CREDENTIAL = "cabinet-passphrase"
MAX_CREDENTIAL = 4096


def credential() -> str | None:
    """The passphrase from $CREDENTIALS_DIRECTORY/cabinet-passphrase, or None when not run so."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / CREDENTIAL
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CREDENTIAL + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the credential {CREDENTIAL}: {exc.strerror}") from None
    if len(raw) > MAX_CREDENTIAL:
        raise UsageError(f"the credential {CREDENTIAL} is too long to be a passphrase")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the credential {CREDENTIAL} is not UTF-8 text") from None
    # `echo ... | systemd-creds encrypt` keeps the newline: a passphrase never ends with one.
    return text[:-1] if text.endswith("\n") else text


def passphrase(confirm: bool = False) -> str:
    env = os.environ.get("CABINET_PASSPHRASE")
    if env is not None:
        return env
    cred = credential()
    if cred is not None:
        return cred
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: set CABINET_PASSPHRASE, give the service the credential "
                         f"{CREDENTIAL}, or run in a terminal")
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Passphrase again: ") != first:
        raise UsageError("the two passphrases differ")
    return first
