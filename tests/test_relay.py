"""The blind relay on loopback: two real nodes that advertise no address but the relay's.

Real nodes (TLS, signed requests, SQLite in temp folders), a real relay.Relay on
127.0.0.1, real sockets. The nodes listen on 127.0.0.1 with a port nobody is
told: their descriptors list only relay+tcp://, so every byte between them goes
through the relay (its session counters show it).
"""

from __future__ import annotations

import asyncio
import os

from conftest import PASSPHRASE
from node import Node
from node.config import Config
from node.core import relaywire
from node.core.identity import Identity, node_id_bytes
from node.store import records
from relay import splice
from relay.server import Limits, Relay

CANARY = "Zoé CANARY-77ab Quintero"


async def until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def make(tmp_path, name: str, relay_url: str) -> Node:
    folder = tmp_path / name
    await Node.init(folder, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    cfg = Config.load(folder)
    cfg.relays = [relay_url]
    cfg.save(folder)
    node = await Node.open_node(folder, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


async def pair(tmp_path, relay: Relay) -> tuple[Node, Node]:
    url = f"relay+tcp://127.0.0.1:{relay.port}"
    a, b = await make(tmp_path, "A", url), await make(tmp_path, "B", url)
    assert a.descriptor.addresses == (url,) and b.descriptor.addresses == (url,)
    await a.add_contact(b.descriptor.signed)
    await b.add_contact(a.descriptor.signed)
    await a.start_relays()
    await b.start_relays()
    await accepting(relay, a, b)
    await accepting(relay, b, a)
    return a, b


async def accepting(relay: Relay, node: Node, *callers: Node) -> None:
    """Wait until `node` is registered at the relay (twice) accepting each of `callers` (serve() registers
    before the test adds contacts: the registrations are renewed with the new accept list)."""
    await node.reachability.refresh_accept()
    me, them = node_id_bytes(node.identity.sign_public), [node_id_bytes(c.identity.sign_public) for c in callers]
    await until(lambda: len(relay.waiting.get(me, [])) >= 2 and all(
        all(t in r.accept for t in them) for r in relay.waiting[me]), what="registrations accepting the callers")


async def close(*nodes: Node) -> None:
    for n in nodes:
        await n.stop_relays()
        await n.close()


def state(outbox: list[dict], node: Node) -> str:
    return {d["recipient"]: d["state"] for d in outbox}[node.node_id]


async def test_a_referral_with_5_mb_and_the_report_go_through_the_relay_which_then_holds_nothing(tmp_path):
    relay = Relay("127.0.0.1", 0)
    await relay.start()
    a, b = await pair(tmp_path, relay)
    try:
        scan = tmp_path / "irm.bin"
        scan.write_bytes(os.urandom(5 << 20))
        res = await a.send_referral(to="B", patient=CANARY, subject="Douleur thoracique",
                                    letter="Cher confrère", attachments=[scan], deliver=False)
        assert await a.courier.deliver_record(res.record_id) == {}
        assert state(await a.outbox(res.record_id), b) == "delivered"
        exported = await b.export(res.record_id, tmp_path / "out")
        assert exported[0].read_bytes() == scan.read_bytes()
        up_before = sum(s.counters.up for s in relay.sessions.values())
        assert up_before > 5 << 20              # the 5 MB crossed the relay (the session is still open)
        rep = await b.reply(res.record_id, letter="Compte rendu: rien d'inquiétant.", deliver=False)
        assert await b.courier.deliver_record(rep.record_id) == {}
        assert state(await b.outbox(rep.record_id), a) == "delivered"
        assert "rien d'inquiétant" in (await a.read(rep.record_id)).manifest.letter
        # Connections end (pooled ones are closed): the relay keeps no session, nothing waits.
        await a.client.close()
        await b.client.close()
        await until(lambda: not relay.sessions and relay.pending == 0, what="sessions to end")
    finally:
        await close(a, b)
        await until(lambda: relay.state() == {"sessions": 0, "pending": 0, "registrations": 0, "nodes": 0,
                                              "connections": 0, "unproven": 0}, what="the relay to be empty")
        await relay.stop()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(15):
        return await reader.read()


async def test_strangers_and_callers_not_accepted_get_nothing(tmp_path):
    relay = Relay("127.0.0.1", 0, limits=Limits(handshake_timeout=2))
    await relay.start()
    url = f"relay+tcp://127.0.0.1:{relay.port}"
    a, b = await pair(tmp_path, relay)
    mallory = Identity.generate()
    to_b = node_id_bytes(b.identity.sign_public)
    try:
        attempts = []
        # A Connect that claims A's ID, signed with another key.
        forged = relaywire.Connect.make(mallory, relay=url, to=to_b, now_ms=relaywire_now(), nonce=os.urandom(16))
        attempts.append(relaywire.frame({"v": 1, "t": "connect", "id": node_id_bytes(a.identity.sign_public),
                                         "sk": a.identity.sign_public, "to": to_b, "time": forged.time,
                                         "nonce": forged.nonce, "aud": forged.audience, "sig": forged.sig}))
        # A correctly signed Connect from a node B never accepted.
        attempts.append(relaywire.Connect.make(mallory, relay=url, to=to_b, now_ms=relaywire_now(),
                                               nonce=os.urandom(16)).to_frame())
        # A's genuine Connect, replayed.
        genuine = relaywire.Connect.make(a.identity, relay=url, to=to_b, now_ms=relaywire_now(), nonce=os.urandom(16))
        # A genuine Connect meant for another relay.
        attempts.append(relaywire.Connect.make(a.identity, relay="relay+tcp://198.51.100.1:7600", to=to_b,
                                               now_ms=relaywire_now(), nonce=os.urandom(16)).to_frame())
        # A Hello for B's ID from Mallory's key (to steal B's callers), junk, and silence.
        attempts.append(relaywire.frame({"v": 1, "t": "hello", "id": to_b, "sk": mallory.sign_public,
                                         "time": forged.time, "nonce": os.urandom(16), "aud": forged.audience,
                                         "accept": [], "sig": bytes(64)}))
        attempts += [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff\xff\xff\xff" + b"x" * 100, b""]
        before = relay.state()["registrations"]
        for data in attempts:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(data)
            assert await read_all(reader) == b"", data[:40]
            writer.close()
        assert relay.state()["registrations"] == before and not relay.sessions
        # The genuine request is answered; the same bytes again are not.
        for expected_ok in (True, False):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(genuine.to_frame())
            got = await (reader.readexactly(4) if expected_ok else read_all(reader))
            assert (got == relaywire.ok()[:4]) if expected_ok else got == b""
            writer.close()
    finally:
        await close(a, b)
        await relay.stop()


def relaywire_now() -> int:
    from node.app.ports import wall_clock
    return wall_clock()


class FlippingRelay(Relay):
    """A relay that flips one byte of what the caller sends, a megabyte into each session."""

    flip = True

    async def _session(self, caller, caller_id, callee, callee_id, finished) -> None:
        if not self.flip:
            return await super()._session(caller, caller_id, callee, callee_id, finished)
        callee.writer.write(relaywire.call(caller_id))
        caller.writer.write(relaywire.ok())
        self.sessions[0] = sess = splice_session(caller_id, callee_id)
        seen = 0

        async def up() -> None:
            nonlocal seen
            while piece := await caller.reader.read(65536):
                if seen <= (1 << 20) < seen + len(piece):
                    i = (1 << 20) - seen
                    piece = piece[:i] + bytes([piece[i] ^ 0x01]) + piece[i + 1:]
                seen += len(piece)
                callee.writer.write(piece)
                await callee.writer.drain()
            callee.writer.close()

        async def down() -> None:
            while piece := await callee.reader.read(65536):
                caller.writer.write(piece)
                await caller.writer.drain()
            caller.writer.close()
        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        finally:
            self.sessions.pop(0, None)
            del sess
            self._forget(caller)
            self._forget(callee)
            caller.abort()
            callee.abort()
            finished.set_result(None)


def splice_session(caller: bytes, callee: bytes):
    from relay.server import Session
    return Session(caller, callee, 0.0, splice.Counters())


async def test_a_relay_that_flips_a_byte_is_caught_nothing_wrong_is_stored_and_the_retry_gets_through(tmp_path):
    relay = FlippingRelay("127.0.0.1", 0)
    await relay.start()
    a, b = await pair(tmp_path, relay)
    try:
        scan = tmp_path / "scan.bin"
        scan.write_bytes(os.urandom(3 << 20))
        res = await a.send_referral(to="B", patient=CANARY, letter="Cher confrère", attachments=[scan],
                                    deliver=False)
        errors = await a.courier.deliver_record(res.record_id)
        assert b.node_id in errors
        assert state(await a.outbox(res.record_id), b) != "delivered"
        assert not await b.store.call(records.has_record, res.record_id)
        assert await b.inbox() == []
        # An honest relay again: the courier retries (an hour later) and the record arrives intact.
        relay.flip = False
        real = a.ports.clock
        a.ports.clock = lambda: real() + 3_600_000
        try:
            assert await a.courier.deliver_record(res.record_id) == {}
        finally:
            a.ports.clock = real
        assert state(await a.outbox(res.record_id), b) == "delivered"
        assert (await b.export(res.record_id, tmp_path / "out"))[0].read_bytes() == scan.read_bytes()
    finally:
        await close(a, b)
        await relay.stop()


async def test_a_flood_of_junk_connections_does_not_stop_a_genuine_session(tmp_path):
    relay = Relay("127.0.0.1", 0, limits=Limits(per_source=64, unproven=128, handshake_timeout=2))
    await relay.start()
    a, b = await pair(tmp_path, relay)
    junk: list[asyncio.StreamWriter] = []
    refused_before = relay.refused

    async def flood() -> None:
        while len(junk) < 300:                   # 300 connections, about 3 s
            try:
                _, w = await asyncio.open_connection("127.0.0.1", relay.port)
            except OSError:
                continue
            if len(junk) % 2:
                w.write(os.urandom(3))            # the start of a frame that never completes
            junk.append(w)
            await asyncio.sleep(0.01)
    try:
        flooding = asyncio.create_task(flood())
        await until(lambda: len(junk) >= 50, what="the flood to start")
        res = await a.send_referral(to="B", patient=CANARY, letter="Cher confrère", deliver=False)
        assert await a.courier.deliver_record(res.record_id) == {}
        assert state(await a.outbox(res.record_id), b) == "delivered"
        await flooding
        assert len(junk) == 300
        await until(lambda: relay.state()["unproven"] == 0, what="junk connections to be dropped")
        assert relay.refused - refused_before >= 300
        assert relay.state()["connections"] <= 64
    finally:
        for w in junk:
            w.close()
        await close(a, b)
        await relay.stop()


# --- relays that misbehave: test-only behaviours, each caught by the nodes' own checks ----------

class MeddlingRelay(Relay):
    """A relay whose sessions run `meddle(session number, bytes seen so far, piece)` on what the
    caller sends (the piece to forward, possibly changed or b"" to drop it). Honest when `honest`."""

    honest = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0

    def meddle(self, n: int, seen: int, piece: bytes) -> bytes:
        return piece

    def meddle_down(self, n: int, seen: int, piece: bytes) -> bytes:
        return piece

    async def _session(self, caller, caller_id, callee, callee_id, finished) -> None:
        self.count += 1
        if self.honest:
            return await super()._session(caller, caller_id, callee, callee_id, finished)
        n = self.count
        callee.writer.write(relaywire.call(caller_id))
        caller.writer.write(relaywire.ok())
        self.sessions[-n] = splice_session(caller_id, callee_id)

        async def up() -> None:
            seen = 0
            while piece := await caller.reader.read(65536):
                out = self.meddle(n, seen, piece)
                seen += len(piece)
                if out:
                    callee.writer.write(out)
                    await callee.writer.drain()
            callee.writer.close()

        async def down() -> None:
            seen = 0
            while piece := await callee.reader.read(65536):
                out = self.meddle_down(n, seen, piece)
                seen += len(piece)
                if out:
                    caller.writer.write(out)
                    await caller.writer.drain()
            caller.writer.close()
        try:
            await asyncio.gather(up(), down(), return_exceptions=True)
        finally:
            self.sessions.pop(-n, None)
            self._forget(caller)
            self._forget(callee)
            caller.abort()
            callee.abort()
            if not finished.done():
                finished.set_result(None)


class DroppingRelay(MeddlingRelay):
    """Drops one piece each way, a megabyte into each session (so a pull by the recipient breaks too)."""

    def meddle(self, n: int, seen: int, piece: bytes) -> bytes:
        return b"" if seen <= (1 << 20) < seen + len(piece) else piece

    meddle_down = meddle


class ReplayingRelay(MeddlingRelay):
    """Records what the caller sent in one session, then feeds it to the callee in later sessions
    instead of what the caller sends (an old request replayed)."""

    recording = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tape: list[bytes] = []
        self.replayed = 0

    def meddle(self, n: int, seen: int, piece: bytes) -> bytes:
        if self.recording:
            self.tape.append(piece)
            return piece
        if seen == 0:
            self.replayed += 1
            return b"".join(self.tape)
        return b""


class WrongNodeRelay(Relay):
    """Joins a caller to another node's registration that accepts it (answers for the wrong node)."""

    honest = False
    joined_wrong = 0

    def _take(self, node: bytes, caller: bytes):
        if not self.honest:
            for other, regs in self.waiting.items():
                for reg in regs:
                    if other != node and caller in reg.accept and not reg.taken.done():
                        regs.remove(reg)
                        self.joined_wrong += 1
                        return reg
        return super()._take(node, caller)


async def retry(node: Node, record_id: str) -> dict:
    real = node.ports.clock
    node.ports.clock = lambda: real() + 3_600_000
    try:
        return await node.courier.deliver_record(record_id)
    finally:
        node.ports.clock = real


async def refused_then_delivered(tmp_path, a: Node, b: Node, relay, *, size: int = 3 << 20) -> str:
    """A record A sends to B is refused while the relay misbehaves (nothing stored, nothing delivered),
    then delivered intact once it is honest; returns its ID."""
    scan = tmp_path / f"scan-{os.urandom(4).hex()}.bin"
    scan.write_bytes(os.urandom(size))
    res = await a.send_referral(to="B", patient=CANARY, letter="Cher confrère", attachments=[scan], deliver=False)
    errors = await a.courier.deliver_record(res.record_id)
    assert b.node_id in errors
    assert state(await a.outbox(res.record_id), b) != "delivered"
    assert not await b.store.call(records.has_record, res.record_id)
    relay.honest = True
    assert await retry(a, res.record_id) == {}
    assert state(await a.outbox(res.record_id), b) == "delivered"
    assert (await b.export(res.record_id, tmp_path / res.record_id))[0].read_bytes() == scan.read_bytes()
    return res.record_id


async def test_a_relay_that_drops_a_chunk_is_caught_and_the_retry_gets_through(tmp_path):
    relay = DroppingRelay("127.0.0.1", 0)
    await relay.start()
    a, b = await pair(tmp_path, relay)
    try:
        record_id = await refused_then_delivered(tmp_path, a, b, relay)
        assert [s.id for s in await b.inbox()] == [record_id]                 # stored once
    finally:
        await close(a, b)
        await relay.stop()


async def test_a_relay_that_replays_an_old_session_gets_nothing_stored_twice_and_nothing_marked(tmp_path):
    relay = ReplayingRelay("127.0.0.1", 0)
    await relay.start()
    a, b = await pair(tmp_path, relay)
    try:
        first = await a.send_referral(to="B", patient=CANARY, letter="Première lettre", deliver=False)
        assert await a.courier.deliver_record(first.record_id) == {}      # recorded by the relay
        await a.client.close()                                             # the next request opens a new session
        relay.recording = False
        second = await refused_then_delivered(tmp_path, a, b, relay)
        assert relay.replayed >= 1 and relay.tape
        ids = sorted(s.id for s in await b.inbox())
        assert ids == sorted([first.record_id, second])                   # each once, nothing replayed in
        assert "Première lettre" in (await b.read(first.record_id)).manifest.letter
    finally:
        await close(a, b)
        await relay.stop()


async def test_a_relay_that_answers_for_the_wrong_node_is_caught_by_the_tls_pin(tmp_path):
    relay = WrongNodeRelay("127.0.0.1", 0)
    await relay.start()
    url = f"relay+tcp://127.0.0.1:{relay.port}"
    a, b = await pair(tmp_path, relay)
    c = await make(tmp_path, "C", url)
    try:
        await a.add_contact(c.descriptor.signed)
        await c.add_contact(a.descriptor.signed)
        await c.start_relays()
        await accepting(relay, c, a)
        await accepting(relay, a, b, c)
        await refused_then_delivered(tmp_path, a, b, relay, size=2 << 20)
        assert relay.joined_wrong >= 1
        assert await c.inbox() == []                                       # C was given nothing
    finally:
        await close(a, b, c)
        await relay.stop()


# --- reachability: which address last worked (node/app/reachability.py) ----------------------

async def test_the_path_that_worked_is_tried_first_and_a_direct_address_that_works_again_goes_back_first(tmp_path):
    from node.app import reachability as reach_mod
    from node.transport.client import Peer

    await Node.init(tmp_path / "A", PASSPHRASE, name="A", listen="127.0.0.1:0", lan=False)
    node = await Node.open_node(tmp_path / "A", passphrase=PASSPHRASE)
    b = Identity.generate()
    direct, relay_url = "https://203.0.113.9:7400", "relay+tcp://127.0.0.1:9"
    peer = Peer(b.node_id, b.sign_public, (relay_url, direct))            # a descriptor listing the relay first
    now = [1_700_000_000_000]
    reach = node.reachability
    node.ports.clock = lambda: now[0]
    try:
        first = reach.peer(peer).addresses
        assert first[0] == direct and first[1].startswith("https://127.0.0.1:")     # cheapest first: direct
        tunnel = first[1]
        reach.observe(b.node_id, direct, False)                             # direct fails ...
        reach.observe(b.node_id, tunnel, True)                              # ... the relay works
        assert reach.peer(peer).addresses == (tunnel, direct)
        assert reach.last_worked(b.node_id) == relay_url                    # remembered as the relay, not the port
        now[0] += 30_000
        assert reach.peer(peer).addresses[0] == tunnel                      # still the relay first
        now[0] += reach_mod.RECHECK_MS                                      # time to look at the direct path again
        assert reach.peer(peer).addresses[0] == direct
        reach.observe(b.node_id, direct, False)                             # still down: longer before the next look
        assert reach.peer(peer).addresses[0] == tunnel
        now[0] += reach_mod.RECHECK_MS
        assert reach.peer(peer).addresses[0] == tunnel
        now[0] += reach_mod.RECHECK_MS * 2
        assert reach.peer(peer).addresses[0] == direct
        reach.observe(b.node_id, direct, True)                              # back: direct first again
        now[0] += 1_000
        assert reach.peer(peer).addresses == (direct, tunnel)
        reach.observe(b.node_id, direct, False)                             # a failure after ...
        reach.observe(b.node_id, tunnel, True)                              # ... and the relay working
        assert reach.peer(peer).addresses[0] == tunnel
        await reach.close()
    finally:
        await node.close()
    # Kept across restarts, in the data folder.
    node = await Node.open_node(tmp_path / "A", passphrase=PASSPHRASE)
    try:
        node.ports.clock = lambda: now[0]
        reach = node.reachability
        await reach.load()
        assert reach.last_worked(b.node_id) == relay_url
        assert reach.peer(peer).addresses[0].startswith("https://127.0.0.1:")
        await reach.close()
    finally:
        await node.close()


async def test_a_path_that_keeps_working_is_written_now_and_then_and_a_change_at_once(tmp_path):
    from node.app import reachability as reach_mod
    from node.store import reachability as table

    await Node.init(tmp_path / "A", PASSPHRASE, name="A", listen="127.0.0.1:0", lan=False)
    node = await Node.open_node(tmp_path / "A", passphrase=PASSPHRASE)
    b, direct = Identity.generate(), "https://203.0.113.9:7400"
    now = [1_700_000_000_000]
    node.ports.clock = lambda: now[0]
    reach = node.reachability

    async def on_disk():
        await asyncio.gather(*list(reach._saving))
        return (await node.store.call(table.load)).get(b.node_id, {}).get(direct)
    try:
        await reach.load()
        reach.observe(b.node_id, direct, True)
        assert await on_disk() == table.Seen(ok_at=now[0])                  # first success: written
        t0 = now[0]
        for _ in range(5):                                                  # a call every few seconds
            now[0] += 5_000
            reach.observe(b.node_id, direct, True)
        assert await on_disk() == table.Seen(ok_at=t0)                      # not rewritten each time
        assert reach.memory[b.node_id][direct].ok_at == now[0]              # memory is exact
        now[0] += reach_mod.RESAVE_OK_MS
        reach.observe(b.node_id, direct, True)
        assert await on_disk() == table.Seen(ok_at=now[0])                  # now and then
        now[0] += 1_000
        reach.observe(b.node_id, direct, False)                             # a failure: at once
        assert await on_disk() == table.Seen(ok_at=now[0] - 1_000, failed_at=now[0], fails=1)
        now[0] += 1_000
        reach.observe(b.node_id, direct, True)                              # working again: at once
        assert await on_disk() == table.Seen(ok_at=now[0], failed_at=now[0] - 1_000, fails=0)
        await reach.close()
    finally:
        await node.close()


def test_paths_are_ordered_by_cost_lan_ipv6_ipv4_relay():
    from node.app.reachability import order
    addrs = ("relay+tcp://198.51.100.1:7600", "https://203.0.113.9:7400", "https://[2001:db8::9]:7400",
             "https://192.168.1.20:7400", "https://cabinet.example:7400")
    assert order(addrs, {}, 0) == ("https://192.168.1.20:7400", "https://[2001:db8::9]:7400",
                                   "https://203.0.113.9:7400", "https://cabinet.example:7400",
                                   "relay+tcp://198.51.100.1:7600")
