"""UPnP IGD port mapping (docs/reachability.md): the pure codecs, the client against a fake
gateway on 127.0.0.1, a node that falls back to UPnP, and miniupnpd in network namespaces.

1. node/core/upnp.py on real text: miniupnpd 2.3.1's own SSDP answer, description and SOAP
   answer (captured from the Debian package), the UDA 1.1 fault layout (§3.2.2), an IGDv1
   description in the layout of the IGD:1 device template; then malformed, hostile and huge
   inputs, and random bytes (hypothesis): always one RemoteProtocolError, never a crash.
2. UpnpClient against FakeIgd (below: an SSDP responder on UDP and an aiohttp description and
   SOAP server, on loopback addresses): 718 -> AddAnyPortMapping (IGDv2) or a clear refusal
   (IGDv1), 725 -> a permanent lease, answers from a stranger ignored, a LOCATION or control URL
   to another host refused, an oversized description refused, a gateway that never answers.
3. A node whose router speaks neither PCP nor NAT-PMP maps its port with UPnP; status names it.
4. As root, in namespaces: Debian's miniupnpd (nftables backend) as the router, a real `cabinet
   run` behind it maps its port, advertises the router's address, and a colleague on the
   "internet" side delivers a referral through the mapping; after the node stops it is gone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core import upnp as codec
from node.core.errors import PeerTimeout, RemoteProtocolError
from node.core.upnp import Service, UpnpFault
from node.transport.upnp import UpnpClient

GW = "192.168.1.1"
PUBLIC = "198.51.100.1"

# --- real text ------------------------------------------------------------------------------

# miniupnpd 2.3.1 (Debian bookworm) answering an M-SEARCH for InternetGatewayDevice:1.
MINIUPNPD_SSDP = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                  b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                  b"USN: uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b::urn:schemas-upnp-org:device:"
                  b"InternetGatewayDevice:1\r\nEXT:\r\nSERVER: Debian/6.1 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
                  b"LOCATION: http://192.168.1.1:5000/rootDesc.xml\r\n"
                  b"OPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n01-NLS: 1796087225\r\n"
                  b"BOOTID.UPNP.ORG: 1796087225\r\nCONFIGID.UPNP.ORG: 1337\r\n\r\n")


def _service(kind: str, sid: str, control: str) -> str:
    return (f"<service><serviceType>{kind}</serviceType><serviceId>{sid}</serviceId><SCPDURL>/x.xml</SCPDURL>"
            f"<controlURL>{control}</controlURL><eventSubURL>/evt</eventSubURL></service>")


def description(*services: str, url_base: str = "", device: str = "InternetGatewayDevice:2") -> bytes:
    """A root description shaped like miniupnpd's rootDesc.xml (IGD -> WANDevice -> WANConnectionDevice)."""
    base = f"<URLBase>{url_base}</URLBase>" if url_base else ""
    return (f'<?xml version="1.0"?>\r\n<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">'
            f"<specVersion><major>1</major><minor>1</minor></specVersion>{base}<device>"
            f"<deviceType>urn:schemas-upnp-org:device:{device}</deviceType><friendlyName>Debian router"
            f"</friendlyName><UDN>uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b</UDN><serviceList>"
            + _service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "urn:upnp-org:serviceId:L3Forwarding1",
                       "/ctl/L3F")
            + "</serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>"
            "<serviceList>" + _service("urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1",
                                       "urn:upnp-org:serviceId:WANCommonIFC1", "/ctl/CmnIfCfg")
            + "</serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2"
            "</deviceType><serviceList>" + "".join(services) + "</serviceList></device></deviceList></device>"
            "</deviceList><presentationURL>http://192.168.1.1/</presentationURL></device></root>").encode()


MINIUPNPD_DESC = description(
    _service(codec.WANIP2, "urn:upnp-org:serviceId:WANIPConn1", "/ctl/IPConn"),
    _service("urn:schemas-upnp-org:service:WANIPv6FirewallControl:1", "urn:upnp-org:serviceId:WANIPv6Firewall1",
             "/ctl/IP6FCtl"))
# The IGD:1 device template's shape: a WANPPPConnection and a WANIPConnection:1, URLBase given.
IGD1_DESC = description(_service(codec.WANPPP1, "urn:upnp-org:serviceId:WANPPPConn1", "/upnp/control/PPP"),
                        _service(codec.WANIP1, "urn:upnp-org:serviceId:WANIPConn1", "upnp/control/IP"),
                        url_base="http://192.168.1.1:49000/", device="InternetGatewayDevice:1")
# miniupnpd 2.3.1's answer to AddPortMapping, byte for byte.
MINIUPNPD_ADDED = (b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
                   b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMappingResponse '
                   b'xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2"/></s:Body></s:Envelope>\r\n')
# UDA 1.1 §3.2.2: a fault, laid out as the spec shows it (whitespace between the elements).
UDA_FAULT = b"""<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
  s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">
  <s:Body>
    <s:Fault>
      <faultcode>s:Client</faultcode>
      <faultstring>UPnPError</faultstring>
      <detail>
        <UPnPError xmlns="urn:schemas-upnp-org:control-1-0">
          <errorCode>%d</errorCode>
          <errorDescription>%s</errorDescription>
        </UPnPError>
      </detail>
    </s:Fault>
  </s:Body>
</s:Envelope>"""
BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
                  b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><root>&lol3;</root>')


# --- 1. the codecs --------------------------------------------------------------------------

def test_msearch_is_the_uda_request():
    assert codec.msearch(codec.IGD2) == (
        b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\nUSER-AGENT: Linux UPnP/1.1 cabinet/1\r\n\r\n")
    assert b"HOST: 192.168.1.1:1900\r\n" in codec.msearch(codec.WANIP1, host="192.168.1.1:1900")
    assert set(codec.SEARCH_TARGETS) == {codec.IGD1, codec.IGD2, codec.WANIP1, codec.WANIP2, codec.WANPPP1}
    for bad in ({"st": "x\r\nEVIL: 1"}, {"st": codec.IGD1, "mx": 0}, {"st": codec.IGD1, "mx": 9}):
        with pytest.raises(ValueError):
            codec.msearch(**bad)


def test_ssdp_answers_parse_and_junk_is_refused():
    got = codec.parse_ssdp_answer(MINIUPNPD_SSDP)
    assert got.location == "http://192.168.1.1:5000/rootDesc.xml" and got.st == codec.IGD1
    assert got.usn.startswith("uuid:3d3cec3a")
    lower = b"HTTP/1.1 200 OK\nst: urn:schemas-upnp-org:service:WANIPConnection:1\nlocation: http://x/d.xml\n\n"
    assert codec.parse_ssdp_answer(lower).location == "http://x/d.xml"        # LF only, lower-case headers
    for junk in (b"", b"garbage", MINIUPNPD_SSDP.replace(b"200 OK", b"404 Not Found"),
                 MINIUPNPD_SSDP.replace(b"LOCATION", b"X-LOC"),
                 MINIUPNPD_SSDP.replace(b"InternetGatewayDevice:1\r\nUSN", b"MediaServer:1\r\nUSN"),
                 b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n", "HTTP/1.1 200 OK\r\nST: é\r\n".encode(),
                 MINIUPNPD_SSDP + b"X-PAD: " + b"a" * 3000 + b"\r\n\r\n"):
        with pytest.raises(RemoteProtocolError):
            codec.parse_ssdp_answer(junk)


def test_only_plain_http_urls_to_the_router_itself_are_followed():
    assert codec.check_url("http://192.168.1.1:5000/rootDesc.xml", GW)
    assert codec.check_url("http://192.168.1.1/d.xml", GW)
    assert codec.check_url("http://[fd00::1]:5000/d.xml", "fd00::1")
    for bad in ("https://192.168.1.1:5000/d.xml", "http://192.168.1.10:5000/d.xml", "http://router.lan/d.xml",
                "http://admin:pw@192.168.1.1/d.xml", "http://192.168.1.1:0/d.xml", "http://192.168.1.1:99999/",
                "file:///etc/passwd", "http://192.168.1.1/a b", "//192.168.1.1/d.xml", "", "http://" + "a" * 2000):
        with pytest.raises(RemoteProtocolError):
            codec.check_url(bad, GW)


def test_descriptions_give_the_preferred_service_and_its_control_url():
    assert codec.parse_description(MINIUPNPD_DESC, "http://192.168.1.1:5000/rootDesc.xml", GW) == \
        Service(service_type=codec.WANIP2, control_url="http://192.168.1.1:5000/ctl/IPConn")
    v1 = codec.parse_description(IGD1_DESC, "http://192.168.1.1:1900/igd.xml", GW)
    assert v1 == Service(service_type=codec.WANIP1, control_url="http://192.168.1.1:49000/upnp/control/IP")
    assert v1.version == 1                                       # URLBase wins over the LOCATION
    ppp = description(_service(codec.WANPPP1, "p", "/ppp"))
    assert codec.parse_description(ppp, "http://192.168.1.1/d.xml", GW).control_url == "http://192.168.1.1/ppp"
    with pytest.raises(RemoteProtocolError, match="no WANIPConnection"):
        codec.parse_description(description(), "http://192.168.1.1/d.xml", GW)
    elsewhere = description(_service(codec.WANIP2, "x", "http://10.9.9.9/ctl"))
    with pytest.raises(RemoteProtocolError, match="refused a URL"):
        codec.parse_description(elsewhere, "http://192.168.1.1/d.xml", GW)
    with pytest.raises(RemoteProtocolError, match="refused a URL"):       # a URLBase pointing away
        codec.parse_description(description(_service(codec.WANIP2, "x", "/c"), url_base="http://10.9.9.9/"),
                                "http://192.168.1.1/d.xml", GW)


def test_hostile_or_broken_xml_is_one_clear_error():
    assert codec.EXPAT_GUARDED, "expat older than 2.4.1: no entity amplification limits"
    where = "http://192.168.1.1/d.xml"
    cases = {BILLION_LAUGHS: "DOCTYPE", b'<!DOCTYPE r SYSTEM "file:///etc/passwd"><root/>': "DOCTYPE",
             MINIUPNPD_DESC[:-30]: "does not parse", b"\xff\xfe<\x00r\x00/\x00>\x00": "UTF-8",
             MINIUPNPD_DESC.decode().encode("utf-16"): "UTF-8", b"<root>\x00</root>": "NUL",
             b"<html><body>Router login</body></html>": "not a UPnP device description",
             MINIUPNPD_DESC + b"<!--" + b"x" * codec.MAX_XML + b"-->": "64 KiB", b"": "does not parse"}
    for data, why in cases.items():
        with pytest.raises(RemoteProtocolError, match=why):
            codec.parse_description(data, where, GW)
    deep = b"<root>" + b"<a>" * 5000 + b"</a>" * 5000 + b"</root>"      # deep nesting: parsed, no service
    with pytest.raises(RemoteProtocolError, match="no WANIPConnection"):
        codec.parse_description(deep, where, GW)


def test_soap_requests_and_answers():
    args = codec.add_port_mapping(external_port=7400, internal_port=7400, client="192.168.1.2", lease=7200,
                                  description="cabinet <&>")
    body, headers = codec.soap_request(codec.WANIP2, "AddPortMapping", args)
    assert headers == {"Content-Type": 'text/xml; charset="utf-8"',
                       "SOAPAction": '"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"'}
    action, got = codec.parse_soap_request(body)
    assert action == "AddPortMapping" and got == {
        "NewRemoteHost": "", "NewExternalPort": "7400", "NewProtocol": "TCP", "NewInternalPort": "7400",
        "NewInternalClient": "192.168.1.2", "NewEnabled": "1", "NewPortMappingDescription": "cabinet <&>",
        "NewLeaseDuration": "7200"}
    assert b"cabinet &lt;&amp;&gt;" in body
    assert codec.parse_soap_response(MINIUPNPD_ADDED, "AddPortMapping") == {}
    answer = codec.soap_answer(codec.WANIP1, "GetExternalIPAddress", {"NewExternalIPAddress": PUBLIC})
    assert codec.external_ip(codec.parse_soap_response(answer, "GetExternalIPAddress")) == PUBLIC
    assert codec.external_ip({"NewExternalIPAddress": ""}) == ""
    assert codec.reserved_port({"NewReservedPort": "40000"}) == 40000
    for bad in ({"NewExternalIPAddress": "not-an-ip"}, {"NewExternalIPAddress": "2001:db8::1"}):
        with pytest.raises(RemoteProtocolError):
            codec.external_ip(bad)
    for bad in ({}, {"NewReservedPort": "0"}, {"NewReservedPort": "70000"}, {"NewReservedPort": "-1"}):
        with pytest.raises(RemoteProtocolError):
            codec.reserved_port(bad)
    for bad in ({"external_port": 0}, {"internal_port": 70000}, {"lease": -1}, {"lease": 604801},
                {"client": "router.lan"}):
        with pytest.raises(ValueError):
            codec.add_port_mapping(**{"external_port": 1, "internal_port": 1, "client": "10.0.0.2", "lease": 0,
                                      **bad})


def test_faults_carry_their_code_and_name():
    for code, name in ((718, "ConflictInMappingEntry"), (725, "OnlyPermanentLeasesSupported"),
                       (606, "Action not authorized")):
        with pytest.raises(UpnpFault) as fault:
            codec.parse_soap_response(UDA_FAULT % (code, name.encode()), "AddPortMapping")
        assert fault.value.code == code and str(fault.value) == f"UPnP AddPortMapping refused: {code} {name}"
    with pytest.raises(UpnpFault, match="899 Vendor thing$"):     # an unknown code: its description, printable
        codec.parse_soap_response(codec.soap_fault(899, "Vendor thing\t\n"), "X")
    with pytest.raises(RemoteProtocolError, match="without a UPnP error code"):
        codec.parse_soap_response((UDA_FAULT % (0, b"x")).replace(b"<errorCode>0", b"<errorCode>abc"), "X")
    with pytest.raises(RemoteProtocolError, match="no DeletePortMappingResponse"):
        codec.parse_soap_response(MINIUPNPD_ADDED, "DeletePortMapping")
    with pytest.raises(RemoteProtocolError, match="not a SOAP envelope"):
        codec.parse_soap_response(b"<html><body>500</body></html>", "X")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_parsers(data):
    for parse in (codec.parse_ssdp_answer, lambda d: codec.parse_description(d, "http://192.168.1.1/", GW),
                  lambda d: codec.parse_soap_response(d, "AddPortMapping")):
        try:
            parse(data)
        except (RemoteProtocolError, UpnpFault):
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(MINIUPNPD_DESC) - 1), st.binary(min_size=1, max_size=8))
def test_damaged_descriptions_fail_cleanly(at, noise):
    damaged = MINIUPNPD_DESC[:at] + noise + MINIUPNPD_DESC[at + len(noise):]
    try:
        service = codec.parse_description(damaged, "http://192.168.1.1:5000/rootDesc.xml", GW)
    except RemoteProtocolError:
        return
    assert service.control_url.startswith("http://192.168.1.1")       # whatever parses still points home


# --- 2. a fake gateway on loopback ------------------------------------------------------------

class _Ssdp(asyncio.DatagramProtocol):
    def __init__(self, igd: FakeIgd) -> None:
        self.igd = igd

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.igd.searches += 1
        st = next((line[3:].strip() for line in data.decode("ascii", "replace").split("\r\n")
                   if line.upper().startswith("ST:")), "")
        if not data.startswith(b"M-SEARCH") or st not in codec.SEARCH_TARGETS or self.igd.silent:
            return
        answer = (f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\nUSN: uuid:fake::{st}\r\nEXT:\r\n"
                  f"LOCATION: {self.igd.location or self.igd.url('/rootDesc.xml')}\r\n\r\n").encode()
        (self.igd.answer_via or self.transport).sendto(answer, addr)


class FakeIgd:
    """A gateway on a loopback address: SSDP (unicast searches) on UDP, the description and the SOAP
    control URL over aiohttp, a mapping table. Knobs: the service version, ports already taken by
    another client (718), permanent leases only (725), what the description or the SSDP answer says."""

    def __init__(self, host: str = "127.0.0.1", *, version: int = 2, taken: tuple[int, ...] = (),
                 permanent_only: bool = False, desc: bytes | None = None, location: str | None = None,
                 silent: bool = False, stall: bool = False) -> None:
        self.host, self.version, self.taken, self.permanent_only = host, version, taken, permanent_only
        self.desc, self.location, self.silent, self.stall = desc, location, silent, stall
        self.answer_via: asyncio.DatagramTransport | None = None        # answer searches from another address
        self.mappings: dict[int, dict[str, str]] = {}
        self.actions: list[tuple[str, dict[str, str]]] = []
        self.http_requests = 0
        self.searches = 0
        self.release = asyncio.Event()

    @property
    def service_type(self) -> str:
        return codec.WANIP2 if self.version == 2 else codec.WANIP1

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    async def start(self) -> FakeIgd:
        app = web.Application()
        app.router.add_get("/rootDesc.xml", self._description)
        app.router.add_post("/ctl/IPConn", self._control)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        self.udp, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Ssdp(self), local_addr=(self.host, 0))
        self.ssdp_port = self.udp.get_extra_info("sockname")[1]
        return self

    async def close(self) -> None:
        self.release.set()
        self.udp.close()
        await self.runner.cleanup()

    def client(self, **kw) -> UpnpClient:
        return UpnpClient(self.host, ssdp_port=self.ssdp_port, multicast=False, waits=(0.2, 0.3), **kw)

    async def _description(self, request: web.Request) -> web.StreamResponse:
        self.http_requests += 1
        if self.stall:
            await self.release.wait()
        if self.desc is not None:
            return web.Response(body=self.desc, content_type="text/xml")
        return web.Response(body=description(_service(self.service_type, "urn:upnp-org:serviceId:WANIPConn1",
                                                      "/ctl/IPConn")), content_type="text/xml")

    async def _control(self, request: web.Request) -> web.Response:
        self.http_requests += 1
        action, args = codec.parse_soap_request(await request.read())
        assert request.headers["SOAPAction"] == f'"{self.service_type}#{action}"'
        self.actions.append((action, args))
        try:
            values = self._act(action, args)
        except UpnpFault as fault:
            return web.Response(status=500, body=codec.soap_fault(fault.code, "fault"), content_type="text/xml")
        return web.Response(body=codec.soap_answer(self.service_type, action, values), content_type="text/xml")

    def _act(self, action: str, args: dict[str, str]) -> dict[str, str]:
        port = int(args.get("NewExternalPort") or 0)
        if action == "GetExternalIPAddress":
            return {"NewExternalIPAddress": PUBLIC}
        if action in ("AddPortMapping", "AddAnyPortMapping"):
            if action == "AddAnyPortMapping" and self.version < 2:
                raise UpnpFault(action, 401)
            if self.permanent_only and args["NewLeaseDuration"] != "0":
                raise UpnpFault(action, 725)
            if port in self.taken:
                if action == "AddPortMapping":
                    raise UpnpFault(action, 718)
                port = next(p for p in itertools.count(40000) if p not in self.taken and p not in self.mappings)
            self.mappings[port] = args
            return {"NewReservedPort": str(port)} if action == "AddAnyPortMapping" else {}
        if action in ("DeletePortMapping", "GetSpecificPortMappingEntry"):
            if port not in self.mappings:
                raise UpnpFault(action, 714)
            entry = self.mappings.pop(port) if action == "DeletePortMapping" else self.mappings[port]
            return {} if action == "DeletePortMapping" else {
                k: entry[k] for k in ("NewInternalPort", "NewInternalClient", "NewEnabled",
                                      "NewPortMappingDescription", "NewLeaseDuration")}
        raise UpnpFault(action, 401)


def _names(igd: FakeIgd) -> list[str]:
    return [a for a, _ in igd.actions]


async def test_client_maps_renews_and_deletes():
    igd = await FakeIgd().start()
    try:
        client = igd.client()
        mapped = await client.map(7400, 7200)
        assert (mapped.protocol, mapped.external_ip, mapped.external_port, mapped.lifetime) == ("upnp", PUBLIC,
                                                                                                 7400, 7200)
        assert client.service == Service(service_type=codec.WANIP2, control_url=igd.url("/ctl/IPConn"))
        assert igd.mappings[7400] == {"NewRemoteHost": "", "NewExternalPort": "7400", "NewProtocol": "TCP",
                                      "NewInternalPort": "7400", "NewInternalClient": "127.0.0.1", "NewEnabled": "1",
                                      "NewPortMappingDescription": "cabinet", "NewLeaseDuration": "7200"}
        assert (await client.entry(7400))["NewInternalClient"] == "127.0.0.1"
        searches = igd.searches
        again = await client.map(7400, 7200, external_port=7400)            # a renewal: no new search
        assert again == mapped and igd.searches == searches
        await client.unmap(again)
        assert igd.mappings == {} and await client.entry(7400) is None
        assert _names(igd) == ["GetExternalIPAddress", "AddPortMapping", "GetSpecificPortMappingEntry",
                               "GetExternalIPAddress", "AddPortMapping", "DeletePortMapping",
                               "GetSpecificPortMappingEntry"]
    finally:
        await igd.close()


async def test_a_taken_port_is_mapped_elsewhere_on_igd2_and_refused_clearly_on_igd1():
    igd = await FakeIgd(taken=(7400,)).start()
    try:
        mapped = await igd.client().map(7400, 7200)
        assert mapped.external_port == 40000 and igd.mappings[40000]["NewInternalPort"] == "7400"
        assert _names(igd)[1:] == ["AddPortMapping", "AddAnyPortMapping"]
    finally:
        await igd.close()
    old = await FakeIgd(version=1, taken=(7400,)).start()
    try:
        with pytest.raises(UpnpFault) as refused:
            await old.client().map(7400, 7200)
        assert str(refused.value) == ("UPnP AddPortMapping refused: 718 ConflictInMappingEntry (port 7400 is taken "
                                      "at the router, and its WANIPConnection:1 cannot choose another)")
        assert old.mappings == {} and "AddAnyPortMapping" not in _names(old)
    finally:
        await old.close()


async def test_a_router_with_permanent_leases_only_gets_lease_zero():
    igd = await FakeIgd(version=1, permanent_only=True).start()
    try:
        client = igd.client()
        mapped = await client.map(7400, 7200)
        assert client.permanent and mapped.external_port == 7400
        assert [a["NewLeaseDuration"] for n, a in igd.actions if n == "AddPortMapping"] == ["7200", "0"]
        await client.map(7400, 7200, external_port=7400)
        assert [a["NewLeaseDuration"] for n, a in igd.actions if n == "AddPortMapping"] == ["7200", "0", "0"]
        await client.unmap(mapped)
        assert igd.mappings == {}
    finally:
        await igd.close()


async def test_only_the_router_can_steer_the_client():
    stranger = await FakeIgd("127.0.0.2").start()
    gateway = FakeIgd()
    gateway.answer_via = stranger.udp              # the gateway's searches answered from another address
    await gateway.start()
    try:
        with pytest.raises(PeerTimeout, match=r"no UPnP answer from the router 127.0.0.1 \(\d+ answer\(s\) from "
                                              r"other hosts ignored\)"):
            await gateway.client().map(7400, 7200)
        gateway.answer_via, gateway.location = None, stranger.url("/rootDesc.xml")     # LOCATION elsewhere
        with pytest.raises(RemoteProtocolError, match="refused a URL that is not http:// to the router 127.0.0.1"):
            await gateway.client().map(7400, 7200)
        gateway.location = None                   # a description whose control URL points elsewhere
        gateway.desc = description(_service(codec.WANIP2, "x", stranger.url("/ctl/IPConn")))
        with pytest.raises(RemoteProtocolError, match="refused a URL"):
            await gateway.client().map(7400, 7200)
        assert stranger.http_requests == 0 and stranger.mappings == {}          # never contacted
        assert gateway.mappings == {}
    finally:
        await gateway.close()
        await stranger.close()


async def test_broken_gateways_give_one_clear_error():
    huge = MINIUPNPD_DESC.replace(b"</root>", b"<!--" + b"x" * (codec.MAX_XML + 10) + b"--></root>")
    cases = [({"desc": huge}, RemoteProtocolError, "over 64 KiB"),
             ({"desc": b"<html>login</html>"}, RemoteProtocolError, "not a UPnP device description"),
             ({"desc": BILLION_LAUGHS}, RemoteProtocolError, "DOCTYPE"),
             ({"silent": True}, PeerTimeout, r"no UPnP answer from the router 127.0.0.1$"),
             ({"stall": True}, PeerTimeout, "no HTTP answer in 0.3 s")]
    for knobs, error, why in cases:
        igd = await FakeIgd(**knobs).start()
        try:
            with pytest.raises(error, match=why) as got:
                await igd.client(http_timeout=0.3).map(7400, 7200)
            assert "\n" not in str(got.value) and igd.mappings == {}
        finally:
            await igd.close()


async def test_oversized_answers_without_a_length_are_cut_off():
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()                 # chunked: no Content-Length to refuse up front
        await resp.prepare(request)
        for _ in range(200):
            await resp.write(b"<root>" + b" " * 4096)
        return resp

    app = web.Application()
    app.router.add_get("/rootDesc.xml", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        client = UpnpClient("127.0.0.1")
        with pytest.raises(RemoteProtocolError, match="over 64 KiB"):
            await client._describe(f"http://127.0.0.1:{port}/rootDesc.xml")
        with pytest.raises(RemoteProtocolError, match="refused a URL"):
            await client._describe(f"http://127.0.0.2:{port}/rootDesc.xml")
    finally:
        await runner.cleanup()


# --- 3. a node whose router speaks only UPnP ----------------------------------------------------

async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.05)
    return value


def _closed_udp_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _node(tmp_path: Path, monkeypatch, igd: FakeIgd | None):
    """A node on loopback whose named router has no PCP/NAT-PMP (a closed port) and, at the SSDP port
    of `igd`, a UPnP gateway (the service's UpnpClient is pointed there: no multicast on loopback)."""
    from node.app import portmapping
    from node.config import Config
    from node.node import Node
    if igd is not None:
        monkeypatch.setattr(portmapping, "UpnpClient", functools.partial(
            UpnpClient, ssdp_port=igd.ssdp_port, multicast=False, waits=(0.2, 0.3)))
    else:
        monkeypatch.setattr(portmapping, "UpnpClient", functools.partial(
            UpnpClient, ssdp_port=_closed_udp_port(), multicast=False, waits=(0.2, 0.3)))
    folder = tmp_path / "node"
    await Node.init(folder, "pass phrase", name="Dr Upnp", listen="127.0.0.1:0")
    cfg = Config.load(folder)
    cfg.port_mapping, cfg.port_mapping_gateway = True, f"127.0.0.1:{_closed_udp_port()}"
    cfg.save(folder)
    return await Node.open_node(folder, passphrase="pass phrase")


@pytest.mark.parametrize("permanent", [False, True])
async def test_a_node_falls_back_to_upnp_advertises_and_deletes_its_mapping(tmp_path, monkeypatch, permanent):
    igd = await FakeIgd(permanent_only=permanent).start()
    node = await _node(tmp_path, monkeypatch, igd)
    try:
        _, bound = await node.serve()
        public = f"https://{PUBLIC}:{bound}"
        await _until(lambda: public in node.descriptor.addresses, 20, "the public address in the descriptor")
        status = node.port_mapping_status()
        extra = " (permanent: the router accepts no lease)" if permanent else ""
        assert status["summary"] == f"mapped by UPnP IGD: {PUBLIC}:{bound}{extra}"
        assert (status["state"], status["protocol"], status["permanent"], status["last_error"]) == (
            "mapped", "upnp", permanent, None)
        assert igd.mappings[bound]["NewLeaseDuration"] == ("0" if permanent else "7200")
    finally:
        await node.close()
        await igd.close()
    assert igd.mappings == {} and _names(igd)[-1] == "DeletePortMapping"


async def test_a_node_whose_router_maps_nothing_says_why_in_one_line(tmp_path, monkeypatch):
    node = await _node(tmp_path, monkeypatch, None)
    try:
        await node.serve()
        status = await _until(lambda: (s := node.port_mapping_status())["state"] == "failed" and s, 20, "a failure")
        assert status["last_error"].startswith("PCP/NAT-PMP: router 127.0.0.1: ") and "\n" not in status["last_error"]
        assert "; UPnP: no UPnP answer from the router 127.0.0.1" in status["last_error"]
        assert status["summary"] == f"not mapped: {status['last_error']}"
    finally:
        await node.close()


# --- 4. miniupnpd in network namespaces ------------------------------------------------------------
# practice 192.168.1.2 ── lan0 192.168.1.1 [router: miniupnpd, nftables masquerade] wan0 11.0.0.1
#                                                                             └── colleague 11.0.0.2
# miniupnpd refuses to map on a reserved external address (TEST-NET ranges included: "Port forwarding is
# impossible"), so this closed network uses 11.0.0.0/24, never routed on the Internet; nothing leaves the
# namespaces. The colleague has no route to 192.168.1.0/24: only the router's mapping reaches the practice.

WAN_IP = "11.0.0.1"
_RUNS = itertools.count(1)
# miniupnpd's nftables backend adds rules to existing chains (upnp_table_name / upnp_nat_table_name default
# "filter", chains miniupnpd, prerouting_miniupnpd, postrouting_miniupnpd, family inet): the router's
# ruleset provides them, forwards nothing inwards by itself, and masquerades the LAN.
ROUTER_RULES = """
table inet filter {
    counter inbound { }
    chain forward { type filter hook forward priority 0; policy drop;
                    iifname "wan0" ip daddr 192.168.1.2 tcp dport 7400 counter name inbound;
                    iifname "lan0" accept; ct state established,related accept; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd;
                        oifname "wan0" masquerade; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
"""
MINIUPNPD_CONF = """ext_ifname=wan0
listening_ip=lan0
http_port=5000
enable_upnp=yes
enable_natpmp=no
secure_mode=yes
ipv6_disable=yes
system_uptime=no
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
lease_file={leases}
allow 1024-65535 192.168.1.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def _sh(*cmd: str, what: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, input=stdin)
    if check and proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        pytest.fail(f"{what}: `{' '.join(cmd)}` failed: {why[0] if why else proc.returncode}", pytrace=False)
    return proc


def _miniupnpd() -> str:
    if os.geteuid() != 0:
        pytest.fail("the miniupnpd test of tests/test_upnp.py must run as root (ip netns, nft)", pytrace=False)
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    binary = shutil.which("miniupnpd") or ("/usr/sbin/miniupnpd" if os.access("/usr/sbin/miniupnpd", os.X_OK) else "")
    if missing or not binary:
        pytest.fail(f"missing {', '.join(missing + ([] if binary else ['miniupnpd']))}: source scripts/_netns.sh "
                    "(as root) to install them", pytrace=False)
    version = _sh(binary, "--version", what="miniupnpd --version", check=False)
    if "nftables" not in version.stdout + version.stderr:
        pytest.fail(f"this test sets up the router for miniupnpd's nftables backend; {binary} says: "
                    f"{(version.stdout + version.stderr).strip()}", pytrace=False)
    return binary


def _wait(cond, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _descriptor(data: Path) -> tuple[str, ...]:
    from node.core.identity import Descriptor
    try:
        return Descriptor.from_wire((data / "descriptor").read_bytes()).addresses
    except Exception:                   # not written yet, or being replaced
        return ()


def test_behind_miniupnpd_the_practice_maps_its_port_and_a_colleague_delivers_through_it(tmp_path):
    binary = _miniupnpd()
    from conftest import ROOT, base_env
    prefix = f"cbu{os.getpid() % 100000}-{next(_RUNS)}"
    router, practice, inet = f"{prefix}-r", f"{prefix}-p", f"{prefix}-i"
    made: list[str] = []
    procs: list[subprocess.Popen] = []
    leases, logs = tmp_path / "upnp.leases", {k: tmp_path / f"{k}.log" for k in ("router", "practice", "colleague")}

    def start(ns: str, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *args], cwd=ROOT, env=base_env(), stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    def cab(ns: str, data: Path, *args: str) -> str:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "node", *args, "--data", str(data)],
                           cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"cabinet {args[0]}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    try:
        for ns in (router, practice, inet):
            _sh("ip", "netns", "add", ns, what="creating a network namespace")
            made.append(ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up", what="bringing up loopback")
        _sh("ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", practice,
            what="creating the practice's LAN")
        _sh("ip", "-n", router, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", inet,
            what="creating the router's uplink")
        for ns, link, addr in ((router, "lan0", "192.168.1.1/24"), (router, "wan0", f"{WAN_IP}/24"),
                               (practice, "eth0", "192.168.1.2/24"), (inet, "eth0", "11.0.0.2/24")):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", link, what="addressing an interface")
            _sh("ip", "-n", ns, "link", "set", link, "up", what="bringing up an interface")
        _sh("ip", "-n", practice, "route", "add", "default", "via", "192.168.1.1", what="routing the practice")
        _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1", what="enabling forwarding")
        _sh("ip", "netns", "exec", router, "nft", "-f", "-", stdin=ROUTER_RULES,
            what="the kernel refused the router's nftables ruleset (NAT, conntrack)")
        conf = tmp_path / "miniupnpd.conf"
        conf.write_text(MINIUPNPD_CONF.format(leases=leases))
        upnpd = start(router, [binary, "-d", "-f", str(conf), "-P", str(tmp_path / "miniupnpd.pid")], logs["router"])
        _wait(lambda: "HTTP listening on port 5000" in logs["router"].read_text() or upnpd.poll() is not None, 20,
              "miniupnpd to start", logs["router"])
        assert upnpd.poll() is None, logs["router"].read_text()

        doc, colleague = tmp_path / "practice", tmp_path / "colleague"
        cab(practice, doc, "init", "--name", "Dr Behind UPnP", "--listen", "0.0.0.0:7400", "--no-lan")
        cab(inet, colleague, "init", "--name", "Dr Out There", "--listen", "11.0.0.2:7400", "--no-lan")
        run = start(practice, [sys.executable, "-m", "node", "run", "--data", str(doc), "--no-web", "--no-lan"],
                    logs["practice"])
        want = f"https://{WAN_IP}:7400"
        _wait(lambda: want in _descriptor(doc) or run.poll() is not None, 40, "the mapped address in the descriptor",
              logs["practice"])
        assert _descriptor(doc) == (want,), (_descriptor(doc), logs["practice"].read_text())   # the mapping, only
        assert f"mapped by UPnP IGD: {WAN_IP}:7400" in logs["practice"].read_text()
        assert "TCP:7400:192.168.1.2:7400:" in leases.read_text()                  # miniupnpd holds it
        other = start(inet, [sys.executable, "-m", "node", "run", "--data", str(colleague), "--no-web", "--no-lan",
                             "--no-port-mapping"], logs["colleague"])
        _wait(lambda: "listening on" in logs["colleague"].read_text() or other.poll() is not None, 30,
              "the colleague to start", logs["colleague"])
        ids = {}
        for ns, data, to_ns, to_data in ((practice, doc, inet, colleague), (inet, colleague, practice, doc)):
            exported = tmp_path / f"{data.name}.descriptor"
            out = cab(ns, data, "id", "--export", str(exported))
            ids[data.name] = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("Node ID"))
            cab(to_ns, to_data, "contact", "add", exported.read_text("utf-8").strip(), "--id", ids[data.name])
        letter = tmp_path / "lettre.txt"
        letter.write_text("Cher confrère, merci de voir Mme Upnp.", encoding="utf-8")
        sent = cab(inet, colleague, "send", "--to", "Dr Behind UPnP", "--patient", "Jeanne Upnp", "--born",
                   "1961-04-02", "--subject", "Avis", "--letter", str(letter))
        assert "delivered" in sent, sent                   # through 11.0.0.1:7400, the only way in
        assert "Jeanne Upnp" in cab(practice, doc, "inbox")
        counter = _sh("ip", "netns", "exec", router, "nft", "list", "counter", "inet", "filter", "inbound",
                      what="reading the router's counter").stdout
        assert int(counter.split("packets ")[1].split()[0]) > 0, counter      # forwarded in, to the practice

        assert _stop(run) == 0, logs["practice"].read_text()
        assert "TCP:7400" not in leases.read_text(), leases.read_text()            # deleted on stop
        chain = _sh("ip", "netns", "exec", router, "nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd",
                    what="listing the router's mappings").stdout
        assert "dnat" not in chain, chain
    finally:
        for p in reversed(procs):
            _stop(p)
        for ns in reversed(made):
            _sh("ip", "netns", "del", ns, what="removing a namespace", check=False)
