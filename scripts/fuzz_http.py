"""HTTP fuzz target: a real node served by aiohttp on 127.0.0.1, sent random and mutated requests.

The node runs in its own thread and event loop (`ServedNode`); requests go over plain blocking
sockets, one connection each, so that anything can be sent: random methods, paths, queries and
headers, bodies that are random or a genuine body mutated (a sealed record, a batch, a descriptor,
a patient's grant), gzip bodies, signed by a contact or not, and raw request bytes mutated.

Properties checked for every request: an answer comes within ANSWER_SECONDS; it is never a 5xx;
an unsigned request to anything but the public descriptor gets a 4xx; an error the node itself
writes is one msgpack line {"error": ...}. After the run: a genuine signed request from a contact
that took no part in it is answered and its answer verifies, and open files and memory stayed bounded.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_targets import (NOW, PropertyFailed, Stats, changed_dict, det_rng, mutated, packed, recipient, seeds,
                          wire_values)
from node import Node
from node.core import consent, wire
from node.core.envelope import Manifest, Sealer, seal_bytes
from node.core.errors import CabinetError
from node.core.identity import Identity, node_id_bytes
from node.transport import auth

PASSPHRASE = "fuzzing passphrase"
ANSWER_SECONDS = 15.0               # generous: the node answers a complete request in milliseconds
PUBLIC = {("GET", "/v1/descriptor"), ("HEAD", "/v1/descriptor")}


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ServedNode:
    """A practice node serving on 127.0.0.1 in a background event loop; two contacts know it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.caller = Identity.generate()          # the contact whose signed requests are fuzzed
        self.witness = Identity.generate()         # a contact kept out of the run, for the final check
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-node", daemon=True)
        self.node: Node | None = None
        self.port = 0

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ServedNode":
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        await Node.init(self.folder, PASSPHRASE, name="Dr Fuzz", listen="127.0.0.1:0", lan=False)
        self.node = await Node.open_node(self.folder, passphrase=PASSPHRASE)
        now = auth.now_ms()
        for who, name in ((self.caller, "Dr Caller"), (self.witness, "Dr Witness")):
            await self.node.add_contact(who.descriptor(name=name, seq=1, now_ms=now).signed)
        await self.node.patients.enroll("P-0042", seed=seeds().patient_secret)
        _, self.port = await self.node.serve("127.0.0.1:0")

    def stop(self) -> None:
        if self.node is not None:
            self.call(self.node.close())
        self.call(self._cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    @staticmethod
    async def _cancel_leftovers() -> None:
        """Connections aiohttp was still closing when the node stopped: end their tasks before the loop."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=10) if tasks else None

    @property
    def node_id_raw(self) -> bytes:
        return node_id_bytes(self.node.identity.sign_public)

    def sealed_record(self) -> tuple[str, bytes, bytes]:
        """A genuine record from the caller to the node: (record ID hex, head, body)."""
        sealer = Sealer(sender=self.caller, recipients=[recipient(self.node.identity)], kind="referral",
                        created=auth.now_ms(), rng=det_rng(b"http"))
        head, body = seal_bytes(sealer, Manifest(patient="Jeanne Martin", letter="Cher confrère"))
        return sealer.record_id.hex(), head, body


# --- requests ------------------------------------------------------------------------------

@dataclass
class Req:
    method: str = "GET"
    target: str = "/"
    headers: list = field(default_factory=list)
    body: bytes = b""
    sign: bool = False
    skew_ms: int = 0
    encoding: str = ""                             # "", "gzip" or "deflate": the body is sent compressed
    raw: bytes = b""                               # when set, sent as it is instead of the above

    def to_json(self) -> dict:
        d = asdict(self)
        d["body"], d["raw"] = self.body.hex(), self.raw.hex()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Req":
        return cls(**{**d, "body": bytes.fromhex(d["body"]), "raw": bytes.fromhex(d["raw"])})


def encode(req: Req, served: ServedNode) -> bytes:
    if req.raw:
        return req.raw
    body = req.body
    if req.encoding == "gzip":
        body = gzip.compress(body, mtime=0)
    elif req.encoding == "deflate":
        body = zlib.compress(body)
    lines = [f"{req.method} {req.target} HTTP/1.1"]
    if not any(k.lower() == "host" for k, _ in req.headers):
        lines.append(f"Host: 127.0.0.1:{served.port}")
    lines += [f"{k}: {v}" for k, v in req.headers]
    if req.encoding:
        lines.append(f"Content-Encoding: {req.encoding}")
    if req.sign:
        signed_part = req.body
        if req.method == "PUT" and len(req.body) >= 4:
            signed_part = req.body[4:4 + int.from_bytes(req.body[:4], "big")]
        lines += [f"{k}: {v}" for k, v in auth.sign_request(
            served.caller, method=req.method, target=req.target, callee=served.node_id_raw,
            body_digest=auth.digest(signed_part), now_ms=auth.now_ms() + req.skew_ms, nonce=os.urandom(16)).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


# Nodes speak TLS 1.3 only (docs/transport.md); the fuzzer's requests go inside it. Who answers is
# checked by the signed answers, as the fuzzer's property wants, not by the certificate here.
_TLS = ssl.create_default_context()
_TLS.check_hostname, _TLS.verify_mode = False, ssl.CERT_NONE
_TLS.minimum_version = ssl.TLSVersion.TLSv1_3


def exchange(port: int, data: bytes, timeout: float = ANSWER_SECONDS, *,
             half_close: bool = False) -> tuple[int | None, dict, bytes]:
    """Send one request on a new connection; (status or None if closed unanswered, headers, body).

    `half_close` ends the sending side after the request, so that the node sees where mangled bytes
    end instead of waiting for more (aiohttp then drops the request without an answer, which is fine).
    """
    with _TLS.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass                                   # it answered (and closed) before reading everything
        chunks, size = [], 0
        try:
            while size < (2 << 20):
                piece = sock.recv(65536)
                if not piece:
                    break
                chunks.append(piece)
                size += len(piece)
        except (ConnectionResetError, ssl.SSLError):
            pass
        except socket.timeout:
            raise PropertyFailed(f"hang: no answer within {timeout} s") from None
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not raw or not lines[0].startswith("HTTP/1."):
        return None, {}, b""
    headers = dict(l.split(": ", 1) for l in lines[1:] if ": " in l)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def check_answer(req: Req, status: int | None, headers: dict, body: bytes) -> None:
    if status is None:
        if req.raw:
            return                                 # mangled framing: closing unanswered is acceptable
        raise PropertyFailed("connection closed without an answer to a well-framed request")
    if status >= 500:
        raise PropertyFailed(f"server error {status} (body {body[:120]!r})")
    public = (req.method, req.target) in PUBLIC
    if not req.sign and not req.raw and not public and not 400 <= status < 500:
        raise PropertyFailed(f"unsigned request answered {status}, not a 4xx")
    if status >= 400 and headers.get("content-type", "").startswith("application/msgpack") and req.method != "HEAD":
        try:
            msg = wire.unpack(body, what="error answer")
        except CabinetError:
            raise PropertyFailed(f"error answer is not canonical msgpack: {body[:120]!r}") from None
        text = msg.get("error") if isinstance(msg, dict) else None
        if not isinstance(text, str) or "\n" in text or len(text) > 500:
            raise PropertyFailed(f"error answer is not one line: {msg!r:.200}")


# --- strategies ------------------------------------------------------------------------------

TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
HEADER_NAMES = ["Content-Type", "Accept-Encoding", "X-Forwarded-For", "Host", "Origin", "Cookie", "Range",
                "Upgrade", "Authorization", "User-Agent", "If-None-Match", "Cabinet-Caller", "Cabinet-Time",
                "Cabinet-Nonce", "Cabinet-Digest", "Cabinet-Signature"]
TRICKY_PATHS = ["/", "//v1//descriptor", "/v1/records/../../etc/passwd", "/v1/%2e%2e/%2e%2e/etc/passwd",
                "/v1/descriptor%0a200%20record%20received", "/v1/records/%00", "/v1/records/" + "a" * 5000,
                "/v1/outbox?since=-1", "/v1/outbox?since=99999999999999999999999", "/v1/records/ABAB?offset=x",
                "*", "http://127.0.0.1/v1/descriptor", "/v1/descriptor?" + "a=1&" * 300, "/\u00e9"]


def methods() -> st.SearchStrategy:
    return st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"]),
                     st.text(TOKEN_CHARS, min_size=1, max_size=12))


def record_ids() -> st.SearchStrategy:
    return st.one_of(st.binary(min_size=16, max_size=16).map(bytes.hex), st.text(max_size=40).map(quote))


def queries() -> st.SearchStrategy:
    pair = st.tuples(st.sampled_from(["offset", "seq", "since", "after", "limit", "x"]),
                     st.one_of(st.integers(-5, 2**70).map(str), st.text(max_size=10).map(quote)))
    return st.lists(pair, max_size=3).map(lambda ps: "?" + "&".join(f"{k}={v}" for k, v in ps) if ps else "")


def paths() -> st.SearchStrategy:
    routed = st.one_of(
        st.sampled_from(["/v1/descriptor", "/v1/batch", "/v1/outbox", "/v1/acks", "/v1/receipts",
                         "/v1/access-requests", "/v1/patient-history", "/v1/revocations"]),
        record_ids().map(lambda r: f"/v1/records/{r}"),
        st.tuples(record_ids(), st.sampled_from(["status", "body", "x"])).map(lambda p: f"/v1/records/{p[0]}/{p[1]}"))
    return st.one_of(st.tuples(routed, queries()).map("".join), st.sampled_from(TRICKY_PATHS),
                     st.text(max_size=60).map(lambda t: "/" + quote(t, safe="/?=&%")))


def headers() -> st.SearchStrategy:
    name = st.one_of(st.sampled_from(HEADER_NAMES), st.text(TOKEN_CHARS, min_size=1, max_size=20))
    value = st.text(VISIBLE, max_size=80).map(str.strip)
    return st.lists(st.tuples(name, value), max_size=4, unique_by=lambda kv: kv[0].lower())


def genuine_bodies(served: ServedNode) -> dict[str, bytes]:
    rid, head, body = served.sealed_record()
    s = seeds()
    grant = consent.issue_grant(s.patient_secret, subject="P-0042", audience=served.caller.node_id, scope="all",
                                days=30, now=auth.now_ms())
    desc = served.caller.descriptor(name="Dr Caller", seq=2, now_ms=auth.now_ms()).signed
    return {
        "record": len(head).to_bytes(4, "big") + head + body,
        "batch": wire.pack({"items": [{"seq": 1, "head": head, "body": body}]}),
        "ack": wire.pack({"upto": 3, "ids": [bytes.fromhex(rid)]}),
        "receipts": wire.pack({"receipts": [head[:80]]}),
        "descriptor": desc,
        "access": wire.pack({"token": grant}),
        "emergency": wire.pack({"emergency": "patient unconscious in A&E", "patient": "P-0042"}),
        "revocation": wire.pack({"revocation": consent.issue_revocation(s.patient_secret, "B" * 22, NOW)}),
        "bomb": b"\0" * (12 << 20),             # sent gzip-compressed: 12 MiB from about 12 KiB
    }


ROUTES = {"record": ("PUT", "/v1/records/{rid}?offset=0"), "batch": ("POST", "/v1/batch"),
          "ack": ("POST", "/v1/acks"), "receipts": ("POST", "/v1/receipts"),
          "descriptor": ("POST", "/v1/descriptor"), "access": ("POST", "/v1/access-requests"),
          "emergency": ("POST", "/v1/access-requests"), "revocation": ("POST", "/v1/revocations"),
          "bomb": ("POST", "/v1/batch")}


def genuine_signed(served: ServedNode) -> list[Req]:
    """The unmutated, signed request of each route, sent before the random ones (as a fuzzer's seed
    corpus): whatever the random draws, the run covers a genuine request reaching each handler."""
    bodies = genuine_bodies(served)
    rid = wire.unpack(wire.unpack(bodies["record"][4:4 + int.from_bytes(bodies["record"][:4], "big")])["h"])["id"]
    return [Req(method, target.format(rid=rid.hex()), [], bodies[kind], True)
            for kind, (method, target) in sorted(ROUTES.items()) if kind != "bomb"]


def requests(served: ServedNode) -> st.SearchStrategy:
    bodies = genuine_bodies(served)
    rid = wire.unpack(wire.unpack(bodies["record"][4:4 + int.from_bytes(bodies["record"][:4], "big")])["h"])["id"]
    desc_body = wire.unpack(wire.unpack(bodies["descriptor"])["body"])

    def resign_descriptor(b: dict) -> bytes:
        # A revocation signed by the caller is final by design (tests/test_directory_e2e.py): fuzzing
        # one in would lock the fuzzing caller out for the rest of the run, so the flag stays off.
        if isinstance(b, dict) and "revoked" in b:
            b = {k: v for k, v in b.items() if k != "revoked"}
        raw = packed(b) or b"\xc0"
        return wire.pack({"body": raw, "sig": served.caller.sign("descriptor", raw)})

    @st.composite
    def to_route(draw) -> Req:
        kind = draw(st.sampled_from(sorted(ROUTES)))
        method, target = ROUTES[kind]
        if kind == "bomb":
            return Req(method, target, [], bodies[kind], draw(st.booleans()), encoding="gzip")
        body = draw(st.one_of(st.just(bodies[kind]), mutated(bodies[kind]),
                              changed_dict(desc_body, wire_values()).map(resign_descriptor) if kind == "descriptor"
                              else wire_values().map(lambda v: packed(v) or b"")))
        return Req(method, target.format(rid=rid.hex()), draw(headers()), body, draw(st.booleans()),
                   draw(st.sampled_from([0, 0, 0, -(10 * 60_000), 10 * 60_000])),
                   draw(st.sampled_from(["", "", "gzip", "deflate"])))

    anywhere = st.builds(Req, methods(), paths(), headers(), st.binary(max_size=2000), st.booleans())
    raw_template = (f"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/msgpack\r\n"
                    f"Content-Length: {len(bodies['ack'])}\r\nConnection: close\r\n\r\n").encode() + bodies["ack"]
    raw = st.one_of(mutated(raw_template), st.binary(min_size=1, max_size=300)).map(lambda r: Req(raw=r))
    return st.one_of(to_route(), anywhere, raw)


# --- running ------------------------------------------------------------------------------------

def send(served: ServedNode, req: Req, stats: Stats | None = None) -> int | None:
    status, headers_, body = exchange(served.port, encode(req, served), half_close=bool(req.raw))
    check_answer(req, status, headers_, body)
    if stats is not None:
        stats.examples += 1
        stats.refusals = stats.refusals or {}
        key = f"{'signed' if req.sign else 'raw' if req.raw else 'unsigned'} {status}"
        stats.refusals[key] = stats.refusals.get(key, 0) + 1
    return status


def genuine_request_works(served: ServedNode, who: Identity | None = None) -> None:
    """A contact's genuine signed request is answered 200 and the answer is signed by the node."""
    who = who or served.witness
    target, nonce = f"/v1/records/{'ab' * 16}/status", os.urandom(16)
    headers_ = auth.sign_request(who, method="GET", target=target, callee=served.node_id_raw,
                                 body_digest=auth.digest(b""), now_ms=auth.now_ms(), nonce=nonce)
    data = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers_.items()) + "\r\n").encode()
    status, headers_, body = exchange(served.port, data)
    if status != 200:
        raise PropertyFailed(f"a genuine signed request got {status} after the run: {body[:200]!r}")
    auth.verify_response(served.node.identity.sign_public, nonce=nonce, status=200, body=body,
                         headers={"Cabinet-Signature": headers_.get("cabinet-signature", "")})


def wait_for_fds(limit: int, timeout: float = 15.0) -> int:
    """Wait (on the condition, with a deadline) until this process holds at most `limit` open files."""
    deadline = time.monotonic() + timeout
    while (n := open_fds()) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def fuzz(cfg: settings, stats: Stats, failures: list, *, seconds: float = 0, on_failure=None,
         max_rss_growth: int = 96 << 20, max_fd_growth: int = 8) -> dict:
    """Start one node, run Hypothesis over requests to it (again and again for `seconds`, calling
    `on_failure` for each failure instead of stopping), check it still serves; returns measurements."""
    with tempfile.TemporaryDirectory(prefix="cabinet-fuzz-") as tmp:
        served = ServedNode(Path(tmp) / "node").start()
        try:
            strategy = requests(served)
            for _ in range(5):                       # warm up: first allocations are not growth
                genuine_request_works(served)
            fds0, rss0 = open_fds(), rss_bytes()
            for req in genuine_signed(served):       # explicit seeds: every route's genuine request, signed
                send(served, req, stats)

            @cfg
            @given(strategy)
            def check(req: Req) -> None:
                try:
                    send(served, req, stats)
                except PropertyFailed as exc:
                    failures.append({"target": "http", "entry": "request", "request": req.to_json(),
                                     "error": str(exc)})
                    raise
            deadline = time.monotonic() + seconds
            while True:
                try:
                    check()
                except PropertyFailed:
                    if on_failure is None:
                        raise
                    on_failure(failures[-1])
                if time.monotonic() >= deadline:
                    break
            genuine_request_works(served)
            fds1, rss1 = wait_for_fds(fds0 + max_fd_growth), rss_bytes()
            if fds1 > fds0 + max_fd_growth:
                raise PropertyFailed(f"open files grew from {fds0} to {fds1}")
            if rss1 - rss0 > max_rss_growth:
                raise PropertyFailed(f"memory grew by {(rss1 - rss0) >> 20} MiB")
            return {"fds": (fds0, fds1), "rss": (rss0, rss1)}
        finally:
            served.stop()


def replay(case: dict) -> int:
    if case.get("request") is None:
        print(f"not one request: {case['error']} (run the http target again to see it)")
        return 1
    req = Req.from_json(case["request"])
    with tempfile.TemporaryDirectory(prefix="cabinet-fuzz-") as tmp:
        served = ServedNode(Path(tmp) / "node").start()
        try:
            send(served, req)
            print(f"no failure: answered cleanly now ({req.method} {req.target[:80]})")
            return 0
        except PropertyFailed as exc:
            print(f"reproduced: {exc}")
            return 1
        finally:
            served.stop()
