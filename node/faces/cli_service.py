"""`cabinet service install|uninstall` (a systemd unit for the box) and `cabinet purge` (retention).

`service install` writes /etc/systemd/system/cabinet.service (or prints it with
--print): the node runs as its own user (`cabinet`, made when missing if run
as root), hardened, restarted on failure, its passphrase typed once through
the web page after boot (the node starts locked) or read from a systemd
credential. `purge` removes the bodies of old records and keeps their rows
and audit trail (docs/operations-box.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path


UNIT = "cabinet.service"
DEFAULT_USER = "cabinet"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_SERVICE_WEB = "127.0.0.1:7480"


def _refuse(message: str) -> Exception:
    """A UsageError (one line, exit 2), the facade imported only now: `cabinet --help` stays light."""
    from ..node import UsageError
    return UsageError(message)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ms / 1000))


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _ensure_user(name: str, data: Path, *, create: bool) -> None:
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if not create:
        raise _refuse(f"no user {name!r} on this system: create it, or run as root to let cabinet create it")
    useradd = shutil.which("useradd")
    if useradd is None:
        raise _refuse(f"no user {name!r} and no useradd to create it: create the user first")
    done = subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(data), "--no-create-home",
                           "--shell", "/usr/sbin/nologin", "--comment", "cabinet practice node", name],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise _refuse(f"could not create the user {name!r}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    print(f"created the system user {name}")


def _give_to(data: Path, user: str) -> None:
    """The data folder and everything in it to the service user (0700 folders, files as they are)."""
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(data):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _command() -> list[str]:
    """How the unit starts cabinet: this Python (its virtual environment) running the `node` package."""
    return [sys.executable, "-m", "node"]


async def cmd_service_install(a) -> int:
    from ..node import Node, parse_listen
    data = Path(a.data).expanduser().absolute()
    if a.web:
        parse_listen(a.web)
    if not (data / "config.json").exists():
        raise _refuse(f"no cabinet node in {data}: run 'cabinet init --data {data} ...' first")
    is_root = os.geteuid() == 0
    user = a.user or DEFAULT_USER
    text = Node.service_unit(command=_command(), data=data, user=user, web=a.web or DEFAULT_SERVICE_WEB,
                             passphrase_from=a.passphrase_from)
    if a.print:
        sys.stdout.write(text)
        return 0
    _ensure_user(user, data, create=is_root and a.user is None)
    unit_dir = Path(a.unit_dir)
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = unit_dir / (UNIT + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, unit_dir / UNIT)
    except PermissionError:
        raise _refuse(f"cannot write {unit_dir / UNIT}: run as root (sudo), or use --print") from None
    if is_root:
        _give_to(data, user)
    print(f"wrote {unit_dir / UNIT}: runs 'cabinet run --data {data}' as the user {user}")
    if a.passphrase_from == "web":
        print(f"After each boot the node starts locked: open http://{a.web or DEFAULT_SERVICE_WEB}/ and type the "
              "passphrase once.")
    elif a.passphrase_from == "credential":
        print("The passphrase is read from the encrypted credential /etc/credstore.encrypted/cabinet-passphrase; "
              "make it with:  systemd-creds encrypt --name=cabinet-passphrase - "
              "/etc/credstore.encrypted/cabinet-passphrase   (type the passphrase, Enter, then Ctrl-D)")
    else:
        print("The passphrase is read from /etc/credstore/cabinet-passphrase (root only, 0600).")
    if _systemd_running() and unit_dir == DEFAULT_UNIT_DIR:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    print("Next: systemctl enable --now cabinet   (status: systemctl status cabinet; log: journalctl -u cabinet)")
    return 0


async def cmd_service_uninstall(a) -> int:
    unit = Path(a.unit_dir) / UNIT
    if not unit.exists():
        raise _refuse(f"no {UNIT} in {a.unit_dir}: nothing to uninstall")
    if _systemd_running() and Path(a.unit_dir) == DEFAULT_UNIT_DIR:
        subprocess.run(["systemctl", "disable", "--now", UNIT], check=False)
    try:
        unit.unlink()
    except PermissionError:
        raise _refuse(f"cannot remove {unit}: run as root (sudo)") from None
    if _systemd_running() and Path(a.unit_dir) == DEFAULT_UNIT_DIR:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    print(f"removed {unit}; the data folder and the service user are kept")
    return 0


async def cmd_purge(a) -> int:
    from .prompt import passphrase
    from ..node import Node
    chosen = [x for x in (a.before, a.older_than, a.retention) if x]
    if len(chosen) != 1:
        raise _refuse("give one of --before DATE, --older-than PERIOD or --retention PERIOD|off")
    before = Node.parse_date(a.before) if a.before else None
    if (a.before or a.older_than) and not a.yes:
        raise _refuse("purging removes record bodies for good (backups keep theirs): add --yes")
    async with Node.open(a.data, passphrase=passphrase()) as node:
        if a.retention:
            kept = node.set_retention(a.retention)
            print(f"retention: {kept}; 'cabinet run' purges older record bodies daily" if kept
                  else "retention: off (record bodies are kept for good)")
            return 0
        r = await node.purge(before=before, older_than=a.older_than)
    print(f"purged the bodies of {r.purged} record(s) created before {_when(r.before)} "
          f"({r.blobs_removed} file(s) removed); their rows and audit trail are kept")
    if r.held_back:
        print(f"{r.held_back} older record(s) still waiting to be delivered keep their bodies until then")
    return 0


def register(sub, add) -> None:
    """Add `service` and `purge` to cabinet's parser (`add(name, fn, help_, parent)` as in cli.py)."""
    service = sub.add_parser("service", help="run this node as a systemd service").add_subparsers(
        dest="service_command", required=True, metavar="ACTION")
    sp = add("install", cmd_service_install, "write the systemd unit (as root), or print it", service)
    sp.add_argument("--user", help=f"the user the node runs as (default: {DEFAULT_USER}, made if missing when root)")
    sp.add_argument("--web", metavar="HOST:PORT",
                    help=f"where the web app listens, where a locked node is unlocked (default {DEFAULT_SERVICE_WEB})")
    sp.add_argument("--passphrase-from", choices=("web", "credential", "plain-credential"), default="web",
                    help="web: typed once on the web page after boot (default); credential: an encrypted "
                         "systemd credential; plain-credential: a root-only file")
    sp.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIR), help=f"where to write {UNIT} (default %(default)s)")
    sp.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    sp = add("uninstall", cmd_service_uninstall, "stop and remove the systemd unit (keeps the data)", service)
    sp.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIR), help=f"where {UNIT} is (default %(default)s)")

    sp = add("purge", cmd_purge, "retention: remove the bodies of old records, keep their rows and audit trail")
    sp.add_argument("--before", metavar="YYYY-MM-DD", help="records created before this date")
    sp.add_argument("--older-than", metavar="PERIOD", help="records older than e.g. 10y, 18m, 52w, 400d")
    sp.add_argument("--retention", metavar="PERIOD",
                    help="keep PERIOD (at least 1y) as what 'cabinet run' applies daily; off: never")
    sp.add_argument("--yes", action="store_true", help="confirm: bodies removed cannot be brought back")
