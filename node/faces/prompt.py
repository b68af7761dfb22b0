"""Asking a person for the passphrase: $CABINET_PASSPHRASE, else the terminal, never echoed."""

from __future__ import annotations

import getpass
import os
import sys

from ..node import UsageError


def passphrase(confirm: bool = False) -> str:
    env = os.environ.get("CABINET_PASSPHRASE")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: set CABINET_PASSPHRASE or run in a terminal")
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Passphrase again: ") != first:
        raise UsageError("the two passphrases differ")
    return first
