"""What the machine's network looks like: the default router, the global IPv6 addresses.

Linux: read from /proc/net (route, if_inet6), no external command; elsewhere the
functions return nothing and the node simply does not map a port or advertise
IPv6 addresses it found (it still uses the ones configured). The parsers are
plain functions over the files' text, so tests feed them any table.

Blocking (small file reads): call them through asyncio.to_thread from the loop.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

PROC_ROUTE = Path("/proc/net/route")
PROC_INET6 = Path("/proc/net/if_inet6")
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
RTF_UP, RTF_GATEWAY = 0x1, 0x2
# if_inet6 flags (linux/if_addr.h): temporary (privacy) addresses change within hours, the others do not work yet or any more.
IFA_F_TEMPORARY, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x01, 0x08, 0x20, 0x40


def parse_route(text: str) -> str | None:
    """The IPv4 default gateway from /proc/net/route's text (the first default route up), or None."""
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 4:
            continue
        try:
            dest, gateway, flags = int(cols[1], 16), int(cols[2], 16), int(cols[3], 16)
        except ValueError:
            continue
        if dest == 0 and flags & RTF_UP and flags & RTF_GATEWAY and gateway:
            return str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
    return None


def parse_inet6(text: str) -> list[str]:
    """Global unicast IPv6 addresses (2000::/3) from /proc/net/if_inet6's text: never link-local,
    unique-local, loopback, temporary, tentative or deprecated ones."""
    found = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or len(cols[0]) != 32:
            continue
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(cols[0]))
            flags = int(cols[4], 16)
        except ValueError:
            continue
        if flags & (IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE):
            continue
        if ip in GLOBAL_UNICAST:
            found.append(str(ip))
    return sorted(set(found), key=lambda a: ipaddress.IPv6Address(a))


def _read(path: Path) -> str:
    try:
        return path.read_text("ascii", "replace")
    except OSError:
        return ""


def default_gateway() -> str | None:
    return parse_route(_read(PROC_ROUTE))


def global_ipv6() -> list[str]:
    return parse_inet6(_read(PROC_INET6))


def source_address(towards: str) -> str | None:
    """The local address the system would use to reach `towards` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in towards else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((towards, 9))
            return s.getsockname()[0]
    except OSError:
        return None
