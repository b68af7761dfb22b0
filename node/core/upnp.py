"""UPnP IGD port mapping on the wire, pure: SSDP search and answers, device descriptions, SOAP.

Bytes in, values out; no socket, no HTTP, no clock (node/transport/upnp.py does
the I/O, node/app/portmapping.py decides when). Everything from the router is
untrusted: every input is size-capped, XML is parsed by xml.etree on UTF-8 text
with no NUL, no DOCTYPE and no ENTITY declaration (a router's description never
has one; expat >= 2.4.1 also limits entity amplification: EXPAT_GUARDED), and
every failure is one RemoteProtocolError line. A URL from the router is used
only when it is plain http:// to the router's own address (check_url): a LAN
stranger cannot send us elsewhere.

SSDP (UDA 1.1 §1.3): an M-SEARCH to 239.255.255.250:1900, answered over unicast
UDP by "HTTP/1.1 200 OK" with ST, USN and LOCATION (the description's URL).
The description lists services; the one we use is WANIPConnection:2 (it has
AddAnyPortMapping), else WANIPConnection:1, else WANPPPConnection:1. Its
controlURL takes SOAP actions: POST, SOAPAction: "service-type#Action", an
envelope whose body is <u:Action xmlns:u="service-type"> with one child per
argument; the answer is <u:ActionResponse> or a Fault carrying a UPnPError
(errorCode, errorDescription).
"""

from __future__ import annotations

import ipaddress
import pyexpat
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from .errors import CabinetError, RemoteProtocolError

SSDP_ADDR, SSDP_PORT = "239.255.255.250", 1900
IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
WANIP1, WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:1", "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
SEARCH_TARGETS = (IGD1, IGD2, WANIP1, WANIP2, WANPPP1)
SERVICES = (WANIP2, WANIP1, WANPPP1)          # the order of preference
MAX_SSDP = 2048                # bytes: an SSDP answer is a few hundred
MAX_XML = 64 * 1024            # bytes: a description or a SOAP answer
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
EXPAT_GUARDED = pyexpat.version_info >= (2, 4, 1)      # billion-laughs protection built into expat

FAULTS = {401: "Invalid Action", 402: "Invalid Args", 501: "Action Failed", 606: "Action not authorized",
          714: "NoSuchEntryInArray", 715: "WildCardNotPermittedInSrcIP", 716: "WildCardNotPermittedInExtPort",
          718: "ConflictInMappingEntry", 724: "SamePortValuesRequired", 725: "OnlyPermanentLeasesSupported",
          726: "RemoteHostOnlySupportsWildcard", 727: "ExternalPortOnlySupportsWildcard",
          728: "NoPortMapsAvailable", 729: "ConflictWithOtherMechanisms", 732: "WildCardNotPermittedInIntPort"}
NO_SUCH_ENTRY, CONFLICT, ONLY_PERMANENT = 714, 718, 725


class UpnpFault(CabinetError):
    """The router answered the action with a UPnP error (code kept)."""

    def __init__(self, action: str, code: int, description: str = "", detail: str = "") -> None:
        name = FAULTS.get(code) or "".join(c for c in description[:80] if c.isprintable()) or "error"
        super().__init__(f"UPnP {action} refused: {code} {name}" + (f" ({detail})" if detail else ""))
        self.action, self.code = action, code


@dataclass(frozen=True, slots=True, kw_only=True)
class SsdpAnswer:
    st: str
    usn: str
    location: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """The router's connection service: its type (which version) and its SOAP control URL."""

    service_type: str
    control_url: str

    @property
    def version(self) -> int:
        return int(self.service_type.rsplit(":", 1)[1])


# --- SSDP ------------------------------------------------------------------------------

def msearch(st: str, mx: int = 1, host: str = f"{SSDP_ADDR}:{SSDP_PORT}") -> bytes:
    """An M-SEARCH request (UDA 1.1 §1.3.2); `host` is the multicast group or, unicast, the router."""
    if not 1 <= mx <= 5 or any(c in st for c in "\r\n"):
        raise ValueError("bad M-SEARCH parameters")
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {host}\r\nMAN: \"ssdp:discover\"\r\nMX: {mx}\r\n"
            f"ST: {st}\r\nUSER-AGENT: Linux UPnP/1.1 cabinet/1\r\n\r\n").encode("ascii")


def parse_ssdp_answer(data: bytes) -> SsdpAnswer:
    """A search answer: status 200, with LOCATION and an ST we asked for."""
    if len(data) > MAX_SSDP:
        raise RemoteProtocolError("SSDP answer too large")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("SSDP answer is not ASCII") from None
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise RemoteProtocolError("not an SSDP search answer")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().upper(), value.strip())
    st, location = headers.get("ST", ""), headers.get("LOCATION", "")
    if st not in SEARCH_TARGETS:
        raise RemoteProtocolError("SSDP answer for something else than a gateway")
    if not location:
        raise RemoteProtocolError("SSDP answer without LOCATION")
    return SsdpAnswer(st=st, usn=headers.get("USN", ""), location=location)


def check_url(url: str, gateway: str) -> str:
    """`url` if it is plain http:// to the router's own address (any port), else RemoteProtocolError."""
    if len(url) > 1024 or any(ord(c) < 33 for c in url):
        raise RemoteProtocolError("a malformed URL from the router")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port       # .port raises ValueError when out of range
        same = host is not None and port != 0 and ipaddress.ip_address(host) == ipaddress.ip_address(gateway)
    except ValueError:
        same = False
    if not same or parts.scheme != "http" or parts.username is not None or parts.password is not None:
        raise RemoteProtocolError(f"refused a URL that is not http:// to the router {gateway}: {url[:120]}")
    return url


# --- XML -------------------------------------------------------------------------------

def _parse_xml(data: bytes) -> ET.Element:
    if len(data) > MAX_XML:
        raise RemoteProtocolError(f"XML from the router over {MAX_XML // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("XML from the router is not UTF-8") from None
    if "\x00" in text or "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise RemoteProtocolError("XML from the router with a DOCTYPE, an entity or a NUL: refused")
    try:
        return ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError) as exc:
        raise RemoteProtocolError(f"XML from the router does not parse: {str(exc)[:80]}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def parse_description(data: bytes, location: str, gateway: str) -> Service:
    """The preferred connection service in a device description, its control URL made absolute
    (against URLBase when the description has one, else the LOCATION) and checked to be the router's."""
    root = _parse_xml(data)
    if _local(root.tag) != "root":
        raise RemoteProtocolError("not a UPnP device description")
    base = _child_text(root, "URLBase") or location
    found: dict[str, str] = {}
    for element in root.iter():
        if _local(element.tag) == "service":
            kind, control = _child_text(element, "serviceType"), _child_text(element, "controlURL")
            if kind in SERVICES and control and kind not in found:
                found[kind] = control
    for kind in SERVICES:
        if kind in found:
            return Service(service_type=kind, control_url=check_url(urljoin(base, found[kind]), gateway))
    raise RemoteProtocolError("the router's description has no WANIPConnection or WANPPPConnection service")


# --- SOAP ------------------------------------------------------------------------------

def soap_request(service_type: str, action: str, args: list[tuple[str, str]]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a SOAP action (UDA 1.1 §3.2.1)."""
    inner = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    body = (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENV}" '
            f's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{escape(service_type)}">{inner}</u:{action}></s:Body></s:Envelope>\r\n')
    headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service_type}#{action}"'}
    return body.encode("utf-8"), headers


def parse_soap_response(data: bytes, action: str) -> dict[str, str]:
    """The output arguments of `action`, or UpnpFault when the router answered with a fault."""
    root = _parse_xml(data)
    body = next((e for e in root if _local(e.tag) == "Body"), None)
    if _local(root.tag) != "Envelope" or body is None:
        raise RemoteProtocolError(f"UPnP {action}: the answer is not a SOAP envelope")
    for element in body:
        name = _local(element.tag)
        if name == "Fault":
            error = next((e for e in element.iter() if _local(e.tag) == "UPnPError"), None)
            code = _child_text(error, "errorCode") if error is not None else ""
            if not code.isdigit() or len(code) > 4:
                raise RemoteProtocolError(f"UPnP {action}: a SOAP fault without a UPnP error code")
            raise UpnpFault(action, int(code), _child_text(error, "errorDescription") if error is not None else "")
        if name == f"{action}Response":
            return {_local(child.tag): (child.text or "").strip()[:256] for child in element}
    raise RemoteProtocolError(f"UPnP {action}: no {action}Response in the answer")


def add_port_mapping(*, external_port: int, internal_port: int, client: str, lease: int,
                     description: str = "cabinet") -> list[tuple[str, str]]:
    """AddPortMapping's (and AddAnyPortMapping's) arguments for TCP, in the order the spec lists them."""
    for port in (external_port, internal_port):
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
    if not 0 <= lease <= 604800:        # IGDv2 caps a lease at a week
        raise ValueError(f"lease out of range: {lease}")
    ipaddress.IPv4Address(client)
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP"),
            ("NewInternalPort", str(internal_port)), ("NewInternalClient", client), ("NewEnabled", "1"),
            ("NewPortMappingDescription", description), ("NewLeaseDuration", str(lease))]


def mapping_key(external_port: int) -> list[tuple[str, str]]:
    """DeletePortMapping's and GetSpecificPortMappingEntry's arguments."""
    if not 1 <= external_port <= 0xFFFF:
        raise ValueError(f"port out of range: {external_port}")
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "TCP")]


def external_ip(values: dict[str, str]) -> str:
    """GetExternalIPAddress's answer: an IPv4 address ("" when the router has none yet)."""
    text = values.get("NewExternalIPAddress", "")
    if not text:
        return ""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise RemoteProtocolError("UPnP GetExternalIPAddress: not an IPv4 address") from None


def reserved_port(values: dict[str, str]) -> int:
    """AddAnyPortMapping's answer: the external port the router chose."""
    text = values.get("NewReservedPort", "")
    if not text.isdigit() or not 1 <= int(text) <= 0xFFFF:
        raise RemoteProtocolError("UPnP AddAnyPortMapping: no valid NewReservedPort")
    return int(text)


# --- the router's side (what a test's fake gateway writes) -------------------------------

def parse_soap_request(data: bytes) -> tuple[str, dict[str, str]]:
    """(action, arguments) of a SOAP request."""
    root = _parse_xml(data)
    body = next((e for e in root if _local(e.tag) == "Body"), None)
    if body is None or len(body) != 1:
        raise RemoteProtocolError("not a SOAP request")
    return _local(body[0].tag), {_local(c.tag): (c.text or "").strip() for c in body[0]}


def soap_answer(service_type: str, action: str, values: dict[str, str]) -> bytes:
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in values.items())
    return (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><u:{action}Response '
            f'xmlns:u="{escape(service_type)}">{inner}</u:{action}Response></s:Body></s:Envelope>').encode()


def soap_fault(code: int, description: str) -> bytes:
    return (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><s:Fault>'
            f'<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>'
            f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
            f'<errorDescription>{escape(description)}</errorDescription></UPnPError></detail>'
            f'</s:Fault></s:Body></s:Envelope>').encode()
