"""Benchmark: many small referrals (5 KB letter, no attachment) sent one after another.

    .venv/bin/python scripts/bench_small.py [--count 1000] [--time-limit 900] [--profile DIR]

The receiver is a real `python -m node run` process on 127.0.0.1. The
sender is driven in this process through the Python API: `Node.open` on its
data folder (no `cabinet run` owns it), then `send_referral(...)` in a loop.
`send_referral` returns once the record is sealed, stored in the outbox, pushed
and acknowledged with a signed receipt, so each call's duration is the
latency of one referral, end to end.

Measured in the same run, each --count times, one after another, after 20
uncounted warm-up calls:

  cabinet     send_referral to the running receiver (the number that matters)
  local only  send_referral(deliver=False) to a contact that is offline: seal,
              fsync + rename of the body, SQLite insert, audit entry. No network.
              The difference to "cabinet" is the delivery.
  auth RTT    Client.record_status to the running receiver: one signed request,
              verified by the receiver (signature, contact lookup, replay
              guard, SQLite lookup) and a signed answer verified by the sender.
              The floor of one authenticated round trip between two nodes.
  bare HTTP   aiohttp POST of a 5 KB body to a bare aiohttp server process that
              reads it with iter_any and answers 200 (scripts/bench_common.py
              sink). The floor of one HTTP round trip on this machine.

Ratios are cabinet's referrals/s over each baseline's operations/s. The issue
sets no target for this one; the ratios show where a small send's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True          # no scripts/__pycache__ left behind
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

RECEIVER = "Dr Paul Durand"
OFFLINE = "Dr Offline"
WARMUP = 20


def letter_text(i: int) -> str:
    para = (f"Dear colleague, I am referring patient number {i} for a cardiology opinion: exertional chest "
            "pain for three weeks, ECG attached in the structured data, no known allergies. ")
    text = (para * (5000 // len(para) + 1))[:5000]
    return text


async def timed(n: int, op) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t0)
    return out


def describe(name: str, lat: list[float]) -> tuple[str, float]:
    total = sum(lat)
    per_s = len(lat) / total
    line = (f"   {name:12} {per_s:9.1f}/s   p50 {1000 * bc.percentile(lat, 50):7.2f} ms   "
            f"p99 {1000 * bc.percentile(lat, 99):7.2f} ms   max {1000 * max(lat):7.2f} ms")
    return line, per_s


def blobs_module():
    """node.store.blobs, whichever layout this checkout has."""
    import importlib
    return importlib.import_module("node.store.blobs")


class Breakdown:
    """Wall-clock time of the parts of send_referral, by wrapping (in this process only) the calls it makes.

    Nothing in node/ is changed: the wrappers are set on the live objects and
    module attributes of this process for the instrumented pass, then removed.
    """

    def __init__(self, node) -> None:
        import node.node as node_module
        self.node, self.mod = node, node_module
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self._undo: list = []

    def _add(self, label: str, dt: float) -> None:
        self.t[label] = self.t.get(label, 0.0) + dt
        self.n[label] = self.n.get(label, 0) + 1

    def _wrap_async(self, obj, name: str, label_of) -> None:
        orig = getattr(obj, name)

        async def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return await orig(*args, **kw)
            finally:
                self._add(label_of(args), time.perf_counter() - t0)

        setattr(obj, name, wrapper)
        self._undo.append((obj, name, orig))

    def _wrap_sync(self, obj, name: str, label: str) -> None:
        orig = getattr(obj, name)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                self._add(label, time.perf_counter() - t0)

        setattr(obj, name, wrapper)
        self._undo.append((obj, name, orig))

    def __enter__(self):
        node = self.node
        self._wrap_async(node.store, "call", lambda args: f"sqlite: {args[0].__name__}")
        for name in ("push_batch", "push_record", "record_status", "send_receipts", "send_ack"):
            if hasattr(node.client, name):      # whichever of these this checkout's courier uses
                self._wrap_async(node.client, name, lambda args, name=name: f"network: Client.{name} "
                                 "(request, the receiver's work, signed answer)")
        self._wrap_sync(blobs_module(), "seal_files", "files: seal_files (in a thread)")
        if hasattr(node, "_place_sealed"):                  # checkouts before node/app/ existed
            self._wrap_sync(node, "_place_sealed", "files: Node._place_sealed (read back or commit)")
        else:
            import node.app.records as records_service
            self._wrap_sync(records_service, "place_sealed", "files: place_sealed (read back or commit)")
        self._wrap_sync(node.blobs, "commit", "files: BlobStore.commit (fsync, rename, fsync dir)")
        return self

    def __exit__(self, *exc):
        for obj, name, orig in reversed(self._undo):
            if obj in (self.node, self.node.store, self.node.client, self.node.blobs):
                delattr(obj, name)          # back to the class attribute
            else:
                setattr(obj, name, orig)

    def report(self, count: int, total_s: float) -> str:
        lines = [f"   where one referral's {1000 * total_s / count:.2f} ms go (mean over {count} instrumented sends; "
                 "parts can overlap, the rest is Python in between):"]
        for label, t in sorted(self.t.items(), key=lambda kv: -kv[1]):
            lines.append(f"     {1000 * t / count:7.2f} ms  {label}  ({self.n[label] / count:.1f} call(s))")
        rest = total_s - sum(self.t.values())
        lines.append(f"     {1000 * rest / count:7.2f} ms  everything else")
        return "\n".join(lines)


async def run(a, tmp: Path) -> None:
    from aiohttp import ClientSession

    from node.core.identity import Descriptor
    from node.node import Node
    from node.transport.client import Peer

    gp, cardio = bc.make_pair(tmp, receiver_name=RECEIVER)
    offline = bc.NodeProc(tmp / "offline", OFFLINE, bc.free_port()).init()
    f = offline.data.parent / "offline.descriptor"
    bc.cli(offline.data, "id", "--export", str(f))
    bc.cli(gp.data, "contact", "add", str(f), "--id", offline.node_id)

    sink = bc.start_sink()
    wrap = None
    if a.profile:
        wrap = bc.pyspy_wrap(a.profile / "receiver-small.txt")
    receiver = cardio.start(wrap=wrap)
    rpid = receiver.node_pid()
    results: dict[str, list[float]] = {}
    breakdown, bd_total = None, 0.0
    try:
        async with Node.open(gp.data, passphrase=bc.PASSPHRASE) as node, ClientSession() as http:
            contact = await node.contact(RECEIVER)
            peer = Peer(contact["node_id"], contact["sign_key"], Descriptor.from_wire(contact["descriptor"]).addresses)
            body5k = os.urandom(5000)

            async def referral(i: int) -> None:
                r = await node.send_referral(to=RECEIVER, patient=f"Patient {i:05d}", born="1961-04-02",
                                             subject=f"Chest pain {i}", letter=letter_text(i))
                if r.errors or list(r.deliveries.values()) != ["delivered"]:
                    raise RuntimeError(f"referral {i} not delivered: {r}")

            async def local(i: int) -> None:
                await node.send_referral(to=OFFLINE, patient=f"Patient {i:05d}", born="1961-04-02",
                                         subject=f"Chest pain {i}", letter=letter_text(i), deliver=False)

            async def auth_rtt(i: int) -> None:
                ans = await node.client.record_status(peer.addresses[0], peer, os.urandom(16).hex())
                if ans.get("stored"):
                    raise RuntimeError("unexpected answer")

            async def bare(i: int) -> None:
                async with http.post(sink.url + "/post", data=body5k) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"bare POST answered {resp.status}")

            ops = {"bare HTTP": bare, "auth RTT": auth_rtt, "local only": local, "cabinet": referral}
            for name, op in ops.items():
                await timed(WARMUP, op)
            for name, op in ops.items():
                prof = a.profile / f"sender-{name.replace(' ', '-')}.txt" if a.profile and name == "cabinet" else None
                with bc.SelfProfile(prof):
                    results[name] = await timed(a.count, op)
                print(f"   done: {name}", flush=True)
            breakdown = None
            if a.breakdown:
                n = min(a.count, 200)
                with Breakdown(node) as breakdown:
                    t0 = time.perf_counter()
                    await timed(n, referral)
                    bd_total = time.perf_counter() - t0
                print(f"   done: {n} instrumented referrals", flush=True)
        results["_receiver_peak"] = [bc.peak_rss_mib(rpid)]
    finally:
        receiver.stop()
        sink.stop()

    print()
    lines = {}
    for name in ("cabinet", "local only", "auth RTT", "bare HTTP"):
        line, per_s = describe(name, results[name])
        lines[name] = per_s
        print(line)
    print()
    c = lines["cabinet"]
    print(f"   ratio cabinet / bare HTTP POST 5 KB:     {c / lines['bare HTTP']:.3f}")
    print(f"   ratio cabinet / authenticated round trip: {c / lines['auth RTT']:.3f}")
    lm = bc.percentile(results["local only"], 50)
    cm = bc.percentile(results["cabinet"], 50)
    print(f"   median split of one referral: local part (seal + store) {1000 * lm:.2f} ms, "
          f"delivery {1000 * (cm - lm):.2f} ms of {1000 * cm:.2f} ms")
    print(f"   receiver peak RSS: {results['_receiver_peak'][0]:.0f} MiB")
    if breakdown is not None:
        print(breakdown.report(min(a.count, 200), bd_total))
    if a.profile:
        for f in sorted(a.profile.glob("*-small.txt")) + sorted(a.profile.glob("sender-*.txt")):
            if f.name.endswith(".summary.txt") or not f.exists():
                continue
            text = bc.summarize_pyspy(f)
            f.with_suffix(".summary.txt").write_text(text)
            print(f"\n   py-spy {f.name}:\n{text}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--time-limit", type=float, default=900, help="abort after this many seconds (default 900)")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="wait up to this many seconds for the CPUs to be idle before starting (default 120)")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="py-spy (pip install py-spy) on the receiver and on the sender loop; raw stacks to DIR")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the extra instrumented pass that splits a referral's time into its parts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)
    bc.use_bench_env()
    bc.header(f"bench_small: {a.count} referrals with a 5 KB letter, one after another, node -> node on 127.0.0.1",
              a.quiet_wait)
    with bc.time_limit(a.time_limit), bc.temp_dir(keep=a.keep) as tmp:
        asyncio.run(run(a, tmp))
    bc.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
