"""The data folder: where it is, its permissions, and the plain-text settings file.

config.json holds only what is public anyway (the practitioner details that go
into the signed descriptor) and where to listen. Secrets live in the key file.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .core.errors import CorruptStore, UsageError

CONFIG = "config.json"
DEFAULT_PORT = 7400
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


def default_data_dir() -> Path:
    env = os.environ.get("CABINET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cabinet"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, an IPv6 host in brackets ([::]:7400, [2001:db8::5]:7400)."""
    host, sep, port = text.rpartition(":")
    bad = host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("["))
    if not sep or not host or bad or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen expects HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} or [::]:{DEFAULT_PORT} "
                         f"(got {text!r})")
    return host.strip("[]"), int(port)


WILDCARDS = ("0.0.0.0", "::", "")


def is_wildcard(host: str) -> bool:
    """Listening on every interface: the node then binds IPv4 and IPv6 both (dual stack)."""
    return host in WILDCARDS


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


@dataclass
class Config:
    name: str
    specialty: str = ""
    city: str = ""
    rpps: str = ""
    listen: str = DEFAULT_LISTEN
    advertise: list[str] = field(default_factory=list)
    bootstraps: list[str] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)    # relay+tcp://host:port: blind relays (docs/relay.md)
    lan: bool = True                       # announce and browse on the LAN (mDNS) when not on loopback
    descriptor_seq: int = 1
    # Incoming data (docs/storage.md, "Quotas"): bytes in flight or partial per contact, free space
    # incoming data never uses (0: 5% of the disk, between 64 MiB and 1 GiB), partial bodies' lifetime.
    incoming_quota_mib: int = 2048
    disk_reserve_mib: int = 0
    partial_expiry_hours: int = 72
    # Health and abusive-access alerts (docs/operations.md): thresholds, opening hours, where IT is told.
    # Read by node/app/alerts.py (Settings); every key is optional, unknown keys are ignored.
    alerts: dict = field(default_factory=dict)
    # Ask the router to open the port (NAT-PMP / PCP, docs/reachability.md) when listening beyond loopback;
    # the router is the default route's gateway unless named here (HOST, or HOST:PORT for a test responder).
    port_mapping: bool = True
    port_mapping_gateway: str = ""
    # Scheduled backups and retention (docs/operations-box.md): where `cabinet run` backs up and how
    # often (daily, weekly, off), and how long records keep their bodies ("" keeps them for good).
    backup_dest: str = ""
    backup_schedule: str = "daily"
    retention: str = ""

    def __post_init__(self) -> None:
        # Found while running, never saved: global IPv6 addresses of the interfaces and the router's
        # mapped public address (app/portmapping.py). Listed after the configured addresses.
        self.learned: tuple[str, ...] = ()

    def save(self, folder: Path) -> None:
        from .store.keyfile import write_atomic
        write_atomic(folder / CONFIG, json.dumps(asdict(self), indent=2).encode("utf-8"), mode=0o600)

    @classmethod
    def load(cls, folder: Path) -> "Config":
        try:
            data = json.loads((folder / CONFIG).read_text("utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise UsageError(f"no cabinet node in {folder} (run 'cabinet init' first)") from None
        except (ValueError, TypeError, OSError):
            raise CorruptStore(f"{folder / CONFIG} is damaged") from None

    def addresses(self, port: int | None = None) -> tuple[str, ...]:
        """The node's addresses for its descriptor: https://, since a node serves only TLS
        (an http:// given to --advertise before TLS is announced as https:// on the same port)."""
        direct = self._direct(port)
        direct += tuple(a for a in self.learned if a not in direct)
        return direct + tuple(r for r in self.relays if r not in self.advertise)

    def _direct(self, port: int | None) -> tuple[str, ...]:
        if self.advertise:
            return tuple("https://" + a[len("http://"):] if a.startswith("http://") else a for a in self.advertise)
        host, configured = parse_listen(self.listen)
        if is_wildcard(host):
            return ()                # the interfaces' global IPv6 addresses are learned at start (self.learned)
        if self.relays and is_loopback(host):
            return ()        # reached through its relays: a loopback address would only send callers home
        host = f"[{host}]" if ":" in host else host
        port = port or configured
        return (f"https://{host}:{port}",) if port else ()      # port 0: not known until listening


def prepare_folder(folder: Path, *, create: bool) -> Path:
    """Make sure the data folder exists (when creating) and is private (0700)."""
    folder = folder.expanduser().resolve()
    if create:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise UsageError(f"no cabinet node in {folder} (run 'cabinet init' first)")
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        os.chmod(folder, 0o700)
    return folder
