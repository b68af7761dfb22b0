"""The systemd unit that runs a practice's node as a service (`cabinet service install`).

Pure text: given the command that starts the node, the data folder, the
service user and where the passphrase comes from, `unit_text` returns the
unit. The node runs as its own unprivileged user, sees the file system
read-only except its data folder, has no capabilities, only the address
families and system calls a network daemon needs, and restarts on failure.
The passphrase is either typed once through the web page after boot (the
node starts locked) or read from a systemd credential
($CREDENTIALS_DIRECTORY/cabinet-passphrase, docs/operations-box.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

UNIT_NAME = "cabinet.service"
CREDENTIAL = "cabinet-passphrase"
ENCRYPTED_CREDENTIAL = PurePosixPath("/etc/credstore.encrypted") / CREDENTIAL
PLAIN_CREDENTIAL = PurePosixPath("/etc/credstore") / CREDENTIAL
HOME_TREES = ("/home", "/root", "/run/user")
PASSPHRASE_FROM = ("web", "credential", "plain-credential")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,30}\$?$")


@dataclass(frozen=True, kw_only=True)
class UnitSpec:
    command: Sequence[str]              # what starts cabinet, e.g. (python, "-m", "node")
    data: str                           # the data folder, absolute
    user: str
    web: str | None = None              # HOST:PORT of the web app (where a locked node is unlocked)
    passphrase_from: str = "web"        # web | credential (LoadCredentialEncrypted) | plain-credential
    writable: Sequence[str] = ()        # more folders the node writes: the scheduled backups' destination


def check_user(name: str) -> str:
    if not _USER.match(name):
        raise ValueError(f"not a valid user name: {name!r}")
    return name


def under_home(path: str) -> bool:
    p = PurePosixPath(path)
    return any(p == PurePosixPath(t) or PurePosixPath(t) in p.parents for t in HOME_TREES)


def quote(word: str, *, command: bool = True) -> str:
    """One word of a setting: '%' doubled (systemd specifiers), quoted when it holds spaces or
    quotes; in a command line '$' doubled too (ExecStart= expands variables)."""
    word = word.replace("%", "%%")
    if word and not re.search(r"[\s\"'\\;$]", word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped.replace("$", "$$") if command else escaped}"'


def exec_start(spec: UnitSpec) -> str:
    words = [*spec.command, "run", "--data", spec.data]
    if spec.web:
        words += ["--web", spec.web]
    if spec.passphrase_from == "web":
        words.append("--locked")          # unlocked once through the web page after each boot
    return " ".join(quote(w) for w in words)


def unit_text(spec: UnitSpec) -> str:
    if spec.passphrase_from not in PASSPHRASE_FROM:
        raise ValueError(f"passphrase from {spec.passphrase_from!r}: expected one of {', '.join(PASSPHRASE_FROM)}")
    if not spec.data.startswith("/"):
        raise ValueError("the data folder must be an absolute path")
    check_user(spec.user)
    # ProtectHome=yes hides /home, /root and /run/user entirely: a data folder or a virtual
    # environment there would be unreachable, so those trees are made read-only instead.
    home = "read-only" if under_home(spec.data) or under_home(spec.command[0]) else "yes"
    lines = [
        "# Written by 'cabinet service install'; 'cabinet service uninstall' removes it.",
        "[Unit]",
        "Description=cabinet practice node (encrypted referrals between practices)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={spec.user}",
        f"Group={spec.user}",
        f"ExecStart={exec_start(spec)}",
        "Environment=PYTHONUNBUFFERED=1",
        "UMask=0077",
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=30",
        "",
        "# Hardening: the node needs its data folder, the network and nothing else.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={home}",
        f"ReadWritePaths={quote(spec.data, command=False)}",
        # '-': a backup stick or share not mounted at start does not stop the node (the backup fails, retried).
        *(f"ReadWritePaths=-{quote(w, command=False)}" for w in spec.writable if w.startswith("/")),
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        # AF_NETLINK: mDNS on the LAN enumerates the network interfaces.
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        # Python, PyNaCl's cffi bindings, SQLite and OpenSSL run with writable
        # memory never made executable (tests/test_service.py runs the node under the kernel's
        # equivalent, prctl PR_SET_MDWE).
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
    ]
    if spec.passphrase_from == "credential":
        lines += ["", "# The passphrase, encrypted for this machine: systemd-creds encrypt (docs/operations-box.md).",
                  f"LoadCredentialEncrypted={CREDENTIAL}:{ENCRYPTED_CREDENTIAL}"]
    elif spec.passphrase_from == "plain-credential":
        lines += ["", "# The passphrase in a root-only file (0600): prefer the encrypted form where systemd-creds works.",
                  f"LoadCredential={CREDENTIAL}:{PLAIN_CREDENTIAL}"]
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
