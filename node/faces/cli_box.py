"""`cabinet backup`, `cabinet restore` and `cabinet keys passphrase`: looking after a practice's box.

Secrets never come on the command line (shell history, `ps`): the passphrase
from $CABINET_PASSPHRASE or a prompt, a new one from $CABINET_NEW_PASSPHRASE
or a prompt (twice), the recovery code from $CABINET_RECOVERY_CODE or a prompt.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time

from .prompt import passphrase
from ..node import Node, UsageError


def _secret(env: str, prompt: str, confirm: bool = False) -> str:
    value = os.environ.get(env)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise UsageError(f"no {prompt.lower()}: set {env} or run in a terminal")
    first = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"{prompt} again: ") != first:
        raise UsageError(f"the two entries of the {prompt.lower()} differ")
    return first


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


async def cmd_backup(a) -> int:
    if a.check:
        code = _secret("CABINET_RECOVERY_CODE", "Recovery code") if a.recovery_code else None
        info = await Node.check_backup(a.dest, passphrase=None if code else passphrase(), recovery_code=code)
        print(f"backup OK: node {info['node_id']}, made {_when(info['at'])}, {info['files']} files, "
              f"{info['bytes']} bytes; every file matches, signature valid, database intact")
        return 0
    secret = passphrase()
    async with Node.open(a.data, passphrase=secret) as node:
        if a.schedule == "off":
            node.set_backup_schedule(None, "off")
            print("scheduled backups off ('cabinet run' makes none; this command still does)")
            return 0
        part = int(a.part_mib * (1 << 20)) if a.part_mib else None
        r = await node.backup(a.dest, secret, part_max=part)
        if a.schedule:
            node.set_backup_schedule(a.dest, a.schedule)
    print(f"backup written to {a.dest}: {r.files} files ({r.bytes} bytes), database in {r.db_parts} part(s), "
          f"{r.blobs_copied} new record bodies copied, {r.blobs_kept} already there")
    if a.schedule:
        print(f"'cabinet run' now backs up to {a.dest} {a.schedule} (a failure is logged and retried hourly); "
              "a running node takes this within the hour")
    if r.recovery_code:
        print(f"Recovery code: {r.recovery_code}; keep it on paper, away from the box. With it a backup "
              "restores even without the passphrase. It is shown only this once.")
    return 0


async def cmd_restore(a) -> int:
    if a.recovery_code:
        code = _secret("CABINET_RECOVERY_CODE", "Recovery code")
        new = _secret("CABINET_NEW_PASSPHRASE", "New passphrase", confirm=True)
        info = await Node.restore(a.src, a.data, recovery_code=code, new_passphrase=new)
    else:
        info = await Node.restore(a.src, a.data, passphrase=passphrase())
    print(f"node {info['node_id']} restored into {a.data} from the backup of {_when(info['at'])}")
    print("Next: 'cabinet run'. What colleagues sent since the backup comes again; what this node sent "
          "since is listed by 'cabinet outbox' once colleagues answer. If the box's address changed, "
          "run with --advertise so that colleagues learn the new one.")
    return 0


async def cmd_keys_passphrase(a) -> int:
    old = passphrase()
    new = _secret("CABINET_NEW_PASSPHRASE", "New passphrase", confirm=True)
    await Node.change_passphrase(a.data, old, new, kdf=a.kdf)
    print("passphrase changed" + (f" (key derivation cost: {a.kdf})" if a.kdf else "")
          + "; a running node keeps running. Backups made from now on open with the new passphrase "
            "(older ones with the old passphrase or the recovery code).")
    return 0


def _keys_group(sub) -> argparse._SubParsersAction | None:
    keys = sub.choices.get("keys")
    if keys is None:
        return None
    return next((act for act in keys._actions if isinstance(act, argparse._SubParsersAction)), None)


def register(sub, add, keys=None) -> None:
    """Add the commands to cabinet's parser (`add(name, fn, help_, parent)` as in cli.py)."""
    sp = add("backup", cmd_backup, "write an encrypted backup of this node into a folder (stick, NAS share)")
    sp.add_argument("dest", help="the backup folder; later backups to it copy only what is new")
    sp.add_argument("--check", action="store_true", help="verify the backup in DEST instead of writing one")
    sp.add_argument("--recovery-code", action="store_true",
                    help="with --check: open it with the recovery code ($CABINET_RECOVERY_CODE or a prompt)")
    sp.add_argument("--schedule", choices=("daily", "weekly", "off"),
                    help="also keep DEST as where 'cabinet run' backs up, daily or weekly (off: stop)")
    sp.add_argument("--part-mib", type=float, default=None, help=argparse.SUPPRESS)
    sp = add("restore", cmd_restore, "rebuild a node from a backup into --data DIR (which must not hold a node)")
    sp.add_argument("src", help="the backup folder")
    sp.add_argument("--recovery-code", action="store_true",
                    help="the passphrase is lost: use the recovery code, then choose a new passphrase")
    keys = keys or _keys_group(sub)
    if keys is not None:
        sp = add("passphrase", cmd_keys_passphrase, "change the passphrase (and the key derivation cost)", keys)
        sp.add_argument("--kdf", choices=("moderate", "interactive"),
                        help="moderate (256 MiB, default at init) or interactive (64 MiB, small boxes)")
