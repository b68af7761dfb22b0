"""The door under abuse by a stranger: logs, bodies, connections, and no oracle on the contacts.

The transport tests run the real aiohttp server (node/transport/server.py) on 127.0.0.1 with
a small in-test Handler (the port the node implements) and real signatures; the flood test
runs a real `python -m node run` process and reads its node.log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import ssl
import stat
import threading
import time

import pytest

from node import logsetup
from node.store import logwriter
from node.core import wire
from node.core.errors import PeerRefused
from node.core.identity import Identity, parse_node_id
from node.transport import auth, door, server
from node.transport.client import Client, Peer
from node.transport.server import Answer

LINE = re.compile(logsetup.TIME_PATTERN)


# --- logs: escaping, summaries, rotation (pure) --------------------------------------------

def test_clean_escapes_every_control_character_and_caps_the_length():
    assert logsetup.clean("a\nb\rc\x1b[31md\x00e\x7f\x85\u2028\u202ef") == \
        "a\\x0ab\\x0dc\\x1b[31md\\x00e\\x7f\\x85\\u2028\\u202ef"
    assert logsetup.clean("é ü 中 ok") == "é ü 中 ok"
    long = logsetup.clean("x" * 5000, 100)
    assert long.startswith("x" * 100) and long.endswith("...(4900 more)")


def _record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("cabinet.server", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_a_forged_line_stays_inside_its_own_line():
    fmt = logsetup.SafeFormatter()
    forged = "/v1/x\n2025-01-01 00:00:00,000 INFO cabinet.app.intake: record ab received from X"
    out = fmt.format(_record("refused GET %s", forged))
    assert "\n" not in out and LINE.match(out)
    assert "\\x0a2025-01-01" in out
    try:
        raise ValueError("bad\nvalue\x1b]0;title\x07")
    except ValueError:
        import sys
        out = fmt.format(_record("internal error", exc_info=sys.exc_info()))
    lines = out.split("\n")
    assert len(lines) > 2 and all(LINE.match(l) for l in lines)
    assert all("| " in l for l in lines[1:]) and "\x1b" not in out and "\x07" not in out


def test_refusals_are_summarised_per_source_and_bounded():
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    log = logging.getLogger("cabinet.test.refusals")
    log.addHandler(Keep())
    log.propagate = False
    now = [0.0]
    summary = logsetup.RefusalSummary(log, period=60, max_sources=3, clock=lambda: now[0])
    for i in range(1000):
        summary.note("10.0.0.1", "not authenticated" if i % 2 else "malformed HTTP request")
    for i in range(50):
        summary.note(f"10.0.1.{i}", "too many connections")
    assert seen == []                       # nothing is logged one by one
    now[0] = 61
    summary.note("10.0.0.1", "not authenticated")       # the period is over: one line per source
    assert len(seen) == 4
    assert seen[0] == ("refused 1001 requests from 10.0.0.1 (reasons: malformed HTTP request x500, "
                       "not authenticated x501)")
    assert any(s.startswith("refused 48 requests from other sources") for s in seen)
    summary.note("10.0.0.9", "not authenticated")
    summary.flush()
    assert seen[4:] == ["refused 1 request from 10.0.0.9 (reasons: not authenticated)"]


def test_log_lines_are_written_on_their_own_thread_in_order_a_burst_with_one_flush(tmp_path):
    file = logsetup.file_handler(tmp_path)
    threads, flushes = set(), [0]
    emit, flush = file.emit, file.flush
    file.emit = lambda r: (threads.add(threading.current_thread().name), emit(r))[1]

    def counted():
        flushes[0] += not file.hold
        flush()
    file.flush = counted
    bg = logwriter.Background([file])
    log = logging.getLogger("cabinet.test.background")
    log.addHandler(bg)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i in range(2000):
            log.info("line %d", i)
        bg.flush()                                           # waits for what was queued before it
        lines = (tmp_path / "node.log").read_text().splitlines()
        assert [int(l.rsplit(" ", 1)[1]) for l in lines] == list(range(2000))
        assert threads == {"cabinet-log"}                    # never written by the caller's thread
        assert flushes[0] <= 2000 // logwriter.Background.BURST + 3      # a burst: one flush, not one a line
        log.warning("the last one")
    finally:
        log.removeHandler(bg)
        bg.close()                                           # what is queued is written before it stops
    assert (tmp_path / "node.log").read_text().splitlines()[-1].endswith("the last one")
    assert not bg._thread.is_alive()


def test_node_log_rotates_by_size_and_stays_private(tmp_path):
    h = logsetup.file_handler(tmp_path, max_bytes=4096, backups=2)
    log = logging.getLogger("cabinet.test.rotation")
    log.addHandler(h)
    log.propagate = False
    try:
        for i in range(500):
            log.warning("line %d %s", i, "x" * 80)
    finally:
        log.removeHandler(h)
        h.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2"]
    for name in files:
        st = (tmp_path / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size <= 4096 + 200


# --- the gate and the budget (pure) --------------------------------------------------------

class Conn:
    closed = False

    def force_close(self):
        self.closed = True


def test_the_gate_evicts_the_oldest_idle_connection_of_a_full_source():
    refused = []
    gate = door.ConnectionGate(per_source=3, total=5, on_refuse=lambda s, r: refused.append((s, r)))
    a = [Conn() for _ in range(4)]
    for c in a[:3]:
        assert gate.admit("10.0.0.1", c)
    gate.busy(a[0], True)                   # handling a request: not evicted
    assert gate.admit("10.0.0.1", a[3])
    assert not a[0].closed and a[1].closed and gate.open_connections == 3
    gate.release("10.0.0.1", a[1])          # its connection_lost comes later: counted once
    assert gate.open_connections == 3
    for c in (a[2], a[3]):
        gate.busy(c, True)
    assert not gate.admit("10.0.0.1", Conn())          # all busy: the new one is refused
    assert refused == [("10.0.0.1", "too many connections from this address")]
    assert gate.admit("10.0.0.2", Conn()) and gate.admit("10.0.0.3", Conn())
    assert not gate.admit("10.0.0.4", Conn())          # the total
    for c in a:
        gate.release("10.0.0.1", c)
    assert gate.open_connections == 2


def test_the_body_budget_bounds_each_caller_and_the_total():
    budget = door.BodyBudget(per_caller=10, total=15)
    budget.reserve("A", 10)
    with pytest.raises(door.Busy):
        budget.reserve("A", 1)
    budget.reserve("B", 5)
    with pytest.raises(door.Busy):
        budget.reserve("C", 1)
    budget.release("A", 10)
    budget.reserve("C", 1)
    assert budget.in_flight == 6


def test_the_open_file_limit_is_raised_with_headroom():
    allowed = door.raise_file_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= min(hard, 65536) if hard != resource.RLIM_INFINITY else soft >= 65536
    assert allowed == max(door.PER_SOURCE, soft - door.HEADROOM)


# --- a real server on 127.0.0.1 -------------------------------------------------------------

class Callee:
    """The Handler port, as small as the door needs: one contact, a status and an outbox."""

    def __init__(self, identity: Identity, contacts: dict[str, bytes]) -> None:
        self.identity, self.contacts = identity, contacts
        self.refusals: dict[str, str] = {}          # held or revoked contacts: node ID -> reason

    def descriptor_bytes(self) -> bytes:
        return b"descriptor"

    async def pinned_key(self, node_id: str) -> tuple[bytes | None, str | None]:
        return self.contacts.get(node_id), self.refusals.get(node_id)

    async def record_status(self, caller, record_id):
        return Answer(200, {"stored": False, "have": 0})

    async def outbox_for(self, caller, since, limit, after=0):
        return Answer(200, {"prev": since, "last": since, "items": []})

    async def receive_ack(self, caller, ack):
        return Answer(200, {"retired": 0})

    async def receive_record(self, caller, record_id, head_raw, offset, seq, body):
        n = 0
        async for piece in body:
            n += len(piece)
        return Answer(200, {"status": "stored", "got": n})


@pytest.fixture
async def door_server():
    me, colleague = Identity.generate(), Identity.generate()
    srv = server.Server(Callee(me, {colleague.node_id: colleague.sign_public}), "127.0.0.1", 0)
    await srv.start()
    client = Client(colleague)
    peer = Peer(me.node_id, me.sign_public, (f"http://127.0.0.1:{srv.port}",))
    yield srv, me, colleague, client, peer
    await client.close()
    await srv.stop()


def any_certificate() -> ssl.SSLContext:
    """A TLS client that checks no certificate: a stranger talking to a node's TLS door."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def raw_exchange(port: int, request: bytes, local: str = "127.0.0.1", deadline: float = 10,
                       tls: bool = False) -> bytes:
    """Send raw bytes (inside TLS if asked), read until the server closes (it must, within the deadline)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0),
                                                   ssl=any_certificate() if tls else None)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(deadline):
            return await reader.read()
    finally:
        writer.close()


def signed_head(caller: Identity, callee: Identity, method: str, target: str, digest_of: bytes,
                extra: str = "", sig: bytes | None = None) -> bytes:
    h = auth.sign_request(caller, method=method, target=target, callee=parse_node_id(callee.node_id),
                          body_digest=auth.digest(digest_of), now_ms=auth.now_ms(), nonce=os.urandom(16))
    if sig is not None:
        h[auth.H_SIG] = auth.b64(sig)
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in h.items()]
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


def status_and_body(raw: bytes) -> tuple[int, bytes, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = "\n".join(sorted(l for l in lines[1:] if not l.lower().startswith("date:")))
    return int(lines[0].split()[1]), body, headers


async def test_unknown_caller_and_bad_signature_get_byte_identical_answers(door_server):
    srv, me, colleague, _, _ = door_server
    stranger = Identity.generate()
    target = f"/v1/records/{'ab' * 16}/status"
    # A stranger naming the colleague (a public node ID) with its own signature ...
    forged = signed_head(stranger, me, "GET", target, b"").replace(
        stranger.node_id.encode(), colleague.node_id.encode())
    # ... and the same stranger under its own, unknown ID.
    unknown = signed_head(stranger, me, "GET", target, b"")
    answers = [status_and_body(await raw_exchange(srv.port, r)) for r in (forged, unknown)]
    assert answers[0] == answers[1]
    assert answers[0][0] == 401 and wire.unpack(answers[0][1]) == {"error": auth.NOT_AUTHENTICATED}


@pytest.mark.parametrize("reason", ["not a confirmed contact: this practice has not confirmed your new key yet",
                                    "this key was revoked"])
async def test_held_and_revoked_contacts_look_like_strangers_until_their_signature_verifies(door_server, reason):
    srv, me, colleague, client, peer = door_server
    srv._app[server.HANDLER].refusals[colleague.node_id] = reason
    stranger = Identity.generate()
    target = f"/v1/records/{'ab' * 16}/status"
    forged = signed_head(stranger, me, "GET", target, b"").replace(
        stranger.node_id.encode(), colleague.node_id.encode())
    bad_sig = signed_head(colleague, me, "GET", target, b"", sig=bytes(64))
    unknown = signed_head(stranger, me, "GET", target, b"")
    raws = [await raw_exchange(srv.port, r) for r in (forged, bad_sig, unknown)]
    answers = [status_and_body(r) for r in raws]
    assert answers[0] == answers[1] == answers[2]                # status, body and every header but Date
    assert [r.partition(b"\r\n\r\n")[2] for r in raws] == [raws[2].partition(b"\r\n\r\n")[2]] * 3
    assert answers[0][0] == 401 and wire.unpack(answers[0][1]) == {"error": auth.NOT_AUTHENTICATED}
    assert reason.encode() not in b"".join(raws)
    # The contact itself, with a valid signature, is told why, in a signed answer.
    with pytest.raises(PeerRefused, match=reason.split(":")[0]) as info:
        await client.call(peer, "GET", target)
    assert info.value.status == 401 and info.value.signed
    assert auth.H_SIG.lower() not in answers[0][2].lower()          # nothing signed for a stranger


async def test_no_body_is_read_before_the_signature_is_checked(door_server):
    srv, me, colleague, _, _ = door_server
    head = signed_head(colleague, me, "POST", "/v1/batch", b"x" * 100, sig=bytes(64),
                       extra="\r\nContent-Length: 9000000")
    started = time.monotonic()
    raw = await raw_exchange(srv.port, head + b"x" * 1000)     # 8.99 MB never come: answered at once
    assert time.monotonic() - started < 5
    assert status_and_body(raw)[0] == 401
    assert srv.budget.in_flight == 0


async def test_a_trickled_small_body_times_out(door_server, monkeypatch):
    srv, me, colleague, _, _ = door_server
    monkeypatch.setattr(server, "BODY_TIMEOUT", 1)
    body = wire.pack({"upto": 1, "have": []})
    head = signed_head(colleague, me, "POST", "/v1/acks", body, extra=f"\r\nContent-Length: {len(body)}")
    raw = await raw_exchange(srv.port, head + body[:1])        # then nothing, as a slow loris would
    status, answer, _ = status_and_body(raw)
    assert status == 400 and "did not arrive in time" in wire.unpack(answer)["error"]
    assert srv.budget.in_flight == 0              # what it held is given back


async def test_a_stalled_upload_is_cut_off(door_server, monkeypatch):
    srv, me, colleague, _, _ = door_server
    monkeypatch.setattr(server, "PIECE_TIMEOUT", 1)
    head_raw = b"head"
    req = signed_head(colleague, me, "PUT", f"/v1/records/{'cd' * 16}?offset=0", head_raw,
                      extra="\r\nContent-Length: 1000000")
    raw = await raw_exchange(srv.port, req + len(head_raw).to_bytes(4, "big") + head_raw + b"x" * 10)
    status, answer, _ = status_and_body(raw)
    assert status == 400 and "did not arrive in time" in wire.unpack(answer)["error"]


async def test_incomplete_headers_and_idle_connections_are_closed(door_server, monkeypatch):
    srv, _, _, _, _ = door_server
    monkeypatch.setattr(server, "KEEPALIVE_TIMEOUT", 1)
    started = time.monotonic()
    assert await raw_exchange(srv.port, b"GET /v1/descriptor HTTP/1.1\r\nHost: x\r\nX-Slow: 1", deadline=8) == b""
    assert await raw_exchange(srv.port, b"", deadline=8) == b""
    assert time.monotonic() - started < 12


async def open_idle(port: int, n: int, local: str) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0)) for _ in range(n)]


async def closed_by_server(conns) -> int:
    async def eof(reader):
        try:
            return await asyncio.wait_for(reader.read(1), 0.2) == b""
        except (TimeoutError, ConnectionError):
            return False
    return sum(await asyncio.gather(*(eof(r) for r, _ in conns)))


async def test_a_stranger_holding_many_connections_does_not_keep_a_colleague_out(door_server):
    srv, me, colleague, client, peer = door_server
    idle = await open_idle(srv.port, 300, "127.0.0.1")         # from the colleague's own address
    other = await open_idle(srv.port, 100, "127.0.0.2")
    try:
        assert srv.gate.open_connections <= 2 * door.PER_SOURCE
        answer = await client.call(peer, "GET", "/v1/outbox?since=0")
        assert answer == {"prev": 0, "last": 0, "items": []}
        closed = await closed_by_server(idle)
        assert closed >= 300 - door.PER_SOURCE + 1                     # the excess, closed at once
        assert await closed_by_server(other) == 100 - door.PER_SOURCE
    finally:
        for _, w in idle + other:
            w.close()


async def test_the_small_body_budget_answers_busy_not_memory(door_server):
    srv, me, colleague, client, peer = door_server
    srv.budget.per_caller = 100
    body = wire.pack({"upto": 1, "have": [b"x" * 200]})
    with pytest.raises(PeerRefused, match="busy") as info:
        await client.call(peer, "POST", "/v1/acks", body)
    assert info.value.status == 503 and info.value.signed
    assert srv.budget.in_flight == 0


# --- a flood against a real node ------------------------------------------------------------

FORGED = "record 0123456789abcdef0123456789abcdef received from KWJS"


def hostile_requests(node_id: str) -> list[bytes]:
    evil = f"/v1/records/x%0a2025-01-01 00:00:00,000 INFO cabinet.app.intake: {FORGED}".replace(" ", "%20")
    stranger = Identity.generate()
    return [
        f"GET {evil} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET /v1/outbox%1b]0;pwned%07%0d%0a HTTP/1.1\r\nHost: x\r\nCabinet-Caller: {node_id}\r\n\r\n".encode(),
        b"GET /v1/outbox HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 20000 + b"\r\n\r\n",
        b"GET /v1/outbox HTTP/1.1\r\nHost: x\r\nCabinet-Caller: \x1b[2J" + b"B" * 4000 + b"\r\n\r\n",
        signed_head(stranger, stranger, "GET", "/v1/outbox?since=0", b""),
    ]


async def flood(port: int, requests: list[bytes], seconds: float, workers: int = 8) -> int:
    stop = time.monotonic() + seconds
    sent = 0

    async def worker(i: int) -> None:
        nonlocal sent
        while time.monotonic() < stop:
            try:
                await raw_exchange(port, requests[sent % len(requests)], deadline=5, tls=True)
            except (ConnectionError, TimeoutError, ssl.SSLError):
                pass
            sent += 1
    await asyncio.gather(*(worker(i) for i in range(workers)))
    return sent


def test_a_flood_of_hostile_requests_neither_grows_nor_forges_the_log(practice):
    node = practice("Dr Anne Martin").start()
    sent = asyncio.run(flood(node.port, hostile_requests(node.node_id), seconds=3))
    assert sent > 100
    assert node.stop() == 0
    log = node.data / "node.log"
    size = log.stat().st_size
    assert size < 64 * 1024, f"node.log grew to {size} bytes for {sent} requests"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines and all(LINE.match(l) for l in lines), [l for l in lines if not LINE.match(l)][:3]
    assert not any(FORGED in l for l in lines)          # a stranger's path is never written at all
    assert not any("\x1b" in l or "\x07" in l for l in lines)
    summary = [l for l in lines if "requests from 127.0.0.1" in l]
    assert summary and int(re.search(r"refused (\d+) requests", summary[0]).group(1)) >= sent // 2
