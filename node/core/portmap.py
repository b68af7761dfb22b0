"""Router port mapping on the wire: NAT-PMP (RFC 6886) and PCP (RFC 6887), pure codecs.

Bytes in, values out; no socket and no clock (node/transport/portmap.py sends
and receives, node/app/portmapping.py decides when). Every decoder checks the
length, version, opcode and, for PCP, the mapping nonce of its answer, and
raises RemoteProtocolError for anything else; a well-formed refusal is a
MappingRefused carrying the result code and its RFC name.

NAT-PMP (RFC 6886 §3): version 0, big-endian.
    address request   [0][0]
    address answer    [0][128][result u16][epoch u32][external IPv4]                        12 bytes
    map request       [0][op 1 UDP | 2 TCP][0 u16][internal port][suggested port][lifetime u32]   12 bytes
    map answer        [0][128+op][result u16][epoch u32][internal port][external port][lifetime u32] 16 bytes
A lifetime of 0 (and suggested port 0) deletes the mapping.

PCP (RFC 6887 §7, §11): version 2, big-endian.
    request header    [2][R=0|op][0 u16][lifetime u32][client IP, 16 bytes (IPv4-mapped)]   24 bytes
    answer header     [2][R=1|op][0][result][lifetime u32][epoch u32][0 x 12]               24 bytes
    MAP payload       [nonce 12][protocol][0 x 3][internal port][external port][external IP 16]  36 bytes
A NAT-PMP-only router answers a PCP request with a 4-byte or longer NAT-PMP-style
answer whose version is 0 and result 1 (unsupported version): UnsupportedVersion.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from .errors import CabinetError, RemoteProtocolError

SERVER_PORT = 5351
NATPMP_VERSION, PCP_VERSION = 0, 2
NATPMP_OP_ADDRESS, NATPMP_OP_UDP, NATPMP_OP_TCP = 0, 1, 2
PCP_OP_ANNOUNCE, PCP_OP_MAP = 0, 1
PROTO_TCP = 6
NONCE_BYTES = 12
PCP_MAX = 1100
MAX_LIFETIME = 0xFFFFFFFF

NATPMP_RESULTS = {0: "success", 1: "unsupported version", 2: "not authorized or refused",
                  3: "network failure", 4: "out of resources", 5: "unsupported opcode"}
PCP_RESULTS = {0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST",
               4: "UNSUPP_OPCODE", 5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE",
               8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL", 10: "USER_EX_QUOTA", 11: "CANNOT_PROVIDE_EXTERNAL",
               12: "ADDRESS_MISMATCH", 13: "EXCESSIVE_REMOTE_PEERS"}


class MappingRefused(CabinetError):
    """The router answered, and said no (result code kept)."""

    def __init__(self, protocol: str, code: int) -> None:
        names = PCP_RESULTS if protocol == "pcp" else NATPMP_RESULTS
        super().__init__(f"{protocol} refused: {names.get(code, f'result {code}')}")
        self.protocol, self.code = protocol, code


class UnsupportedVersion(MappingRefused):
    """The router does not speak this protocol version (a NAT-PMP router asked in PCP, or the reverse)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Mapped:
    """What a router granted: a TCP port on its external address, for `lifetime` seconds."""

    protocol: str               # "pcp" or "nat-pmp"
    internal_port: int
    external_port: int
    lifetime: int               # seconds; 0 after a deletion
    epoch: int                  # the router's seconds since its mapping table started (a drop: it restarted)
    external_ip: str = ""       # PCP says it in the answer; NAT-PMP in a separate address answer


def _check_port(port: int, zero_ok: bool = False) -> None:
    if not (0 if zero_ok else 1) <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")


def _check_lifetime(lifetime: int) -> None:
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime out of range: {lifetime}")


def _ip16(address: str) -> bytes:
    """An address as PCP's 128-bit field (IPv4 as ::ffff:a.b.c.d, RFC 6887 §5)."""
    ip = ipaddress.ip_address(address)
    return (ipaddress.IPv6Address(f"::ffff:{ip}") if ip.version == 4 else ip).packed


def _from_ip16(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


# --- NAT-PMP ------------------------------------------------------------------------

def natpmp_address_request() -> bytes:
    return struct.pack("!BB", NATPMP_VERSION, NATPMP_OP_ADDRESS)


def natpmp_map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A TCP mapping request; lifetime 0 with external port 0 deletes the mapping (RFC 6886 §3.4)."""
    _check_port(internal_port)
    _check_port(external_port, zero_ok=True)
    _check_lifetime(lifetime)
    return struct.pack("!BBHHHI", NATPMP_VERSION, NATPMP_OP_TCP, 0, internal_port, external_port, lifetime)


def _natpmp_head(data: bytes, op: int) -> tuple[int, int]:
    if len(data) < 4:
        raise RemoteProtocolError("NAT-PMP answer too short")
    version, opcode, result = struct.unpack_from("!BBH", data)
    if version != NATPMP_VERSION:
        raise RemoteProtocolError(f"NAT-PMP answer of version {version}")
    if opcode != 128 + op:
        raise RemoteProtocolError(f"NAT-PMP answer to opcode {opcode - 128}, not {op}")
    if result == 1:
        raise UnsupportedVersion("nat-pmp", result)
    if len(data) < 8:
        raise RemoteProtocolError("NAT-PMP answer too short")
    if result != 0:
        raise MappingRefused("nat-pmp", result)
    return result, struct.unpack_from("!I", data, 4)[0]


def parse_natpmp_address(data: bytes) -> tuple[str, int]:
    """(external IPv4 address, epoch) from an address answer."""
    _, epoch = _natpmp_head(data, NATPMP_OP_ADDRESS)
    if len(data) != 12:
        raise RemoteProtocolError("NAT-PMP address answer is not 12 bytes")
    return str(ipaddress.IPv4Address(data[8:12])), epoch


def parse_natpmp_map(data: bytes, internal_port: int) -> Mapped:
    _, epoch = _natpmp_head(data, NATPMP_OP_TCP)
    if len(data) != 16:
        raise RemoteProtocolError("NAT-PMP mapping answer is not 16 bytes")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if internal != internal_port:
        raise RemoteProtocolError(f"NAT-PMP answer for port {internal}, not {internal_port}")
    return Mapped(protocol="nat-pmp", internal_port=internal, external_port=external, lifetime=lifetime,
                  epoch=epoch)


# --- PCP ----------------------------------------------------------------------------

def pcp_map_request(*, client_ip: str, internal_port: int, external_port: int, lifetime: int, nonce: bytes,
                    external_ip: str | None = None) -> bytes:
    """A PCP MAP request for TCP (RFC 6887 §11.1); lifetime 0 deletes. 60 bytes."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError("a PCP mapping nonce is 12 bytes")
    _check_port(internal_port)
    _check_port(external_port, zero_ok=True)
    _check_lifetime(lifetime)
    suggested = _ip16(external_ip) if external_ip else _ip16("0.0.0.0")
    head = struct.pack("!BBHI", PCP_VERSION, PCP_OP_MAP, 0, lifetime) + _ip16(client_ip)
    body = nonce + struct.pack("!B3xHH", PROTO_TCP, internal_port, external_port) + suggested
    return head + body


def parse_pcp_map(data: bytes, nonce: bytes, internal_port: int) -> Mapped:
    """The router's answer to our MAP request (the same nonce, protocol and internal port)."""
    if len(data) >= 2 and data[0] == NATPMP_VERSION:        # a NAT-PMP-only router (RFC 6887 §9)
        raise UnsupportedVersion("pcp", 1)
    if len(data) < 24 or len(data) > PCP_MAX or len(data) % 4:
        raise RemoteProtocolError("PCP answer of a wrong length")
    version, op, result, lifetime, epoch = struct.unpack_from("!BBxBII", data)
    if version != PCP_VERSION:
        raise RemoteProtocolError(f"PCP answer of version {version}")
    if op != 0x80 | PCP_OP_MAP:
        raise RemoteProtocolError(f"PCP answer to opcode {op & 0x7F}, not MAP")
    if result == 1:
        raise UnsupportedVersion("pcp", result)
    if len(data) < 60:
        raise RemoteProtocolError("PCP MAP answer too short")
    if data[24:36] != nonce:
        raise RemoteProtocolError("PCP answer for another mapping (nonce)")
    proto, internal, external = struct.unpack_from("!B3xHH", data, 36)
    if result != 0:
        raise MappingRefused("pcp", result)
    if proto != PROTO_TCP or internal != internal_port:
        raise RemoteProtocolError("PCP answer for another protocol or port")
    return Mapped(protocol="pcp", internal_port=internal, external_port=external, lifetime=lifetime, epoch=epoch,
                  external_ip=_from_ip16(data[44:60]))


# --- the router's side (what a test responder, or a router, writes) -------------------

def natpmp_address_answer(external_ip: str, epoch: int, result: int = 0) -> bytes:
    return struct.pack("!BBHI", NATPMP_VERSION, 128 + NATPMP_OP_ADDRESS, result, epoch) + \
        ipaddress.IPv4Address(external_ip).packed


def natpmp_map_answer(request: bytes, *, external_port: int, lifetime: int, epoch: int, result: int = 0) -> bytes:
    _, op, _, internal, _, _ = struct.unpack("!BBHHHI", request)
    return struct.pack("!BBHIHHI", NATPMP_VERSION, 128 + op, result, epoch, internal, external_port, lifetime)


def pcp_map_answer(request: bytes, *, external_ip: str, external_port: int, lifetime: int, epoch: int,
                   result: int = 0) -> bytes:
    nonce, (proto, internal) = request[24:36], struct.unpack_from("!B3xH", request, 36)
    head = struct.pack("!BBxBII12x", PCP_VERSION, 0x80 | PCP_OP_MAP, result, lifetime, epoch)
    return head + nonce + struct.pack("!B3xHH", proto, internal, external_port) + _ip16(external_ip)


def parse_request(data: bytes) -> dict[str, Any]:
    """A router's view of a request: which protocol, op, ports, lifetime (for test responders)."""
    if len(data) >= 2 and data[0] == NATPMP_VERSION:
        if data[1] == NATPMP_OP_ADDRESS and len(data) == 2:
            return {"protocol": "nat-pmp", "op": "address"}
        if len(data) == 12 and data[1] in (NATPMP_OP_UDP, NATPMP_OP_TCP):
            _, op, _, internal, external, lifetime = struct.unpack("!BBHHHI", data)
            return {"protocol": "nat-pmp", "op": "map", "internal_port": internal, "external_port": external,
                    "lifetime": lifetime}
    if len(data) == 60 and data[0] == PCP_VERSION and data[1] == PCP_OP_MAP:
        lifetime, = struct.unpack_from("!I", data, 4)
        proto, internal, external = struct.unpack_from("!B3xHH", data, 36)
        return {"protocol": "pcp", "op": "map", "client_ip": _from_ip16(data[8:24]), "nonce": data[24:36],
                "proto": proto, "internal_port": internal, "external_port": external, "lifetime": lifetime}
    raise RemoteProtocolError("not a NAT-PMP or PCP request")
