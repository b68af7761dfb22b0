"""Benchmark: deliver one large attachment between two nodes on loopback, against bare aiohttp.

    .venv/bin/python scripts/bench_delivery.py [--sizes 256,1024] [--repeat 1] [--time-limit 2400]
                                                [--profile DIR]

What is timed, and why this way
-------------------------------
The receiver is a real `python -m node run` process. The sender is the
sender's data folder opened with the Python API (`Node.open`) in a separate
worker process (this script re-run with `_send`), while no `cabinet run`
process owns that folder. The worker first seals the referral with
`send_referral(..., deliver=False)` (timed separately, reported for
information: sealing speed is what bench_envelope.py measures), then times
only `node.courier.deliver_record(record_id)`: the status probe, the signed PUT
streaming the ciphertext from disk, the receiver hashing, decrypting and
writing it, the fsync + rename into blobs/, the SQLite commit and the signed
receipt, until the outbox says "delivered". That is the transfer and nothing
else. Timing `cabinet send` from the CLI instead would add process start-up,
the passphrase KDF and the whole sealing pass to the number, hiding the
transfer. The sender runs in its own process so its peak RSS (VmHWM, reset
after sealing with /proc/self/clear_refs) is the sender node's own.

Baseline (same run, same file): a bare aiohttp server process on 127.0.0.1
(scripts/bench_common.py sink) whose handler reads the body with iter_any and
discards it; an aiohttp client in its own process uploads the file with a PUT
whose body is an async generator of 1 MiB pieces. Best of --repeat (at least
3 for the baseline, which is quick). Nodes speak only TLS 1.3 to each other
(docs/transport.md), so the same upload is also timed against the same server
behind the node's own TLS server context (informational: "cabinet / bare over
TLS" is what the node costs beyond TLS itself).

Targets: cabinet >= 0.5 x baseline throughput; each node process's peak RSS
under 150 MiB, and not growing with the file size. A fresh receiver process is
started for every run so its VmHWM belongs to that size alone.
Throughput is the attachment size (MiB) over the seconds (the ciphertext is
0.03% larger).

Also printed, for understanding: the bare server writing + fsyncing the body
(a floor for "receive and store durably"), when the sender handed its last
byte to aiohttp, and CPU seconds per MiB of the bare server and of both nodes.
Before each timed run the page cache is primed (see
bench_common.prime_page_cache; --no-prime to skip). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True          # no scripts/__pycache__ left behind
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

TARGET_RATIO = 0.5
TARGET_RSS_MIB = 150
RECEIVER = "Dr Paul Durand"


# --- workers (run as subprocesses of this script) ----------------------------------

async def _send_worker(data: str, to: str, file: str) -> dict:
    from node.node import Node
    from node.store import records
    bc.use_bench_env()
    out: dict = {"rss_start": bc.rss_mib()}
    async with Node.open(data, passphrase=bc.PASSPHRASE) as node:
        t0 = time.perf_counter()
        res = await node.send_referral(to=to, patient="Jeanne Martin", born="1961-04-02", subject="CT scan",
                                       letter="Dear colleague, the scan is attached.", attachments=[file],
                                       deliver=False)
        t1 = time.perf_counter()
        out.update(record_id=res.record_id, seal_s=t1 - t0, peak_seal=bc.peak_rss_mib())
        if os.environ.get("BENCH_PRIME_DIR"):          # right before the timed part (see prime_page_cache)
            bc.prime_page_cache(Path(os.environ["BENCH_PRIME_DIR"]), int(os.environ["BENCH_PRIME_BYTES"]))
        bc.reset_peak_rss()
        out["rss_before_deliver"] = bc.rss_mib()
        # Note when the courier has handed the last ciphertext piece to aiohttp: what follows
        # is the receiver finishing (last batch, fsync, rename, SQLite commit, signed receipt).
        marks: dict[str, float] = {}
        read = getattr(node.courier, "_read", None)

        async def timed_read(record_id: str, offset: int):
            async for piece in read(record_id, offset):
                yield piece
            marks["last_piece"] = time.perf_counter()

        if read is not None:            # a private hook: skip the timeline if the courier has changed
            node.courier._read = timed_read
        with bc.SelfProfile(os.environ.get("BENCH_PYSPY_OUT")):    # --profile: the delivery only
            cpu0, total0 = bc.thread_cpu(), bc.process_cpu()
            t2 = time.perf_counter()
            errors = await node.courier.deliver_record(res.record_id)
            t3 = time.perf_counter()
            out["cpu"] = bc.cpu_delta(cpu0, bc.thread_cpu(), os.getpid())
            out["cpu_total"] = bc.process_cpu() - total0
        out["stream_s"] = marks.get("last_piece", t3) - t2
        out.update(deliver_s=t3 - t2, peak_deliver=bc.peak_rss_mib(), errors=errors)
        rows = await node.outbox(res.record_id)
        out["states"] = [r["state"] for r in rows]
        out["body_size"] = (await node.store.call(records.get_record, res.record_id))["body_size"]
    return out


async def _upload_worker(url: str, file: str, route: str = "/upload") -> dict:
    import aiohttp

    async def pieces():
        with open(file, "rb") as fh:
            while piece := fh.read(bc.MiB):
                yield piece

    bc.reset_peak_rss()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=120)) as s:
        t0 = time.perf_counter()
        async with s.put(url + route, data=pieces(), ssl=False,           # https: TLS 1.3, certificate not checked
                         headers={"Content-Type": "application/octet-stream"}) as resp:
            body = await resp.read()
            status = resp.status
        t1 = time.perf_counter()
    return {"seconds": t1 - t0, "status": status, "received": int(body or 0), "peak": bc.peak_rss_mib()}


def run_worker(args: list[str], timeout: float, profile: Path | None = None, extra_env: dict | None = None) -> dict:
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = bc.base_env(**({"BENCH_PYSPY_OUT": str(profile)} if profile else {}), **(extra_env or {}))
    p = subprocess.run(cmd, cwd=bc.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return json.loads(lines[-1])


# --- the benchmark ---------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="attachment sizes in MiB, comma separated (default 256,1024)")
    ap.add_argument("--repeat", type=int, default=1, help="node deliveries per size (best is kept; default 1)")
    ap.add_argument("--time-limit", type=float, default=2400, help="abort after this many seconds (default 2400)")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="wait up to this many seconds for the CPUs to be idle before starting (default 120)")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="run the receiver and the sender worker under py-spy (pip install py-spy), "
                         "raw stacks and a summary written to DIR")
    ap.add_argument("--no-prime", dest="prime", action="store_false",
                    help="do not prime the page cache before each timed run (see bench_common.prime_page_cache)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)

    bc.header(f"bench_delivery: one attachment of {', '.join(map(str, sizes))} MiB node -> node on 127.0.0.1",
              a.quiet_wait)
    results = []
    tls_best: dict[int, dict] = {}
    sink = tls_sink = None
    receiver = None
    with bc.time_limit(a.time_limit), bc.temp_dir(keep=a.keep) as tmp:
        try:
            gp, cardio = bc.make_pair(tmp, receiver_name=RECEIVER)
            (tmp / "sink").mkdir()
            sink = bc.start_sink(tmp / "sink")
            tls_sink = bc.start_sink(tls=True)
            for mib in sizes:
                size = mib * bc.MiB
                src = bc.make_file(tmp / f"scan-{mib}.bin", size)
                bc.warm(src)
                worker_timeout = max(120.0, mib * 1.0)

                base = []
                for _ in range(max(3, a.repeat)):
                    cpu0 = bc.process_cpu(sink.proc.pid)
                    b = run_worker(["_upload", sink.url, str(src)], worker_timeout)
                    b["server_cpu"] = bc.process_cpu(sink.proc.pid) - cpu0
                    base.append(b)
                for b in base:
                    if b["status"] != 200 or b["received"] != size:
                        raise RuntimeError(f"baseline upload failed: {b}")
                b_best = min(base, key=lambda b: b["seconds"])
                over_tls = [run_worker(["_upload", tls_sink.url, str(src)], worker_timeout) for _ in range(max(3, a.repeat))]
                if any(t["status"] != 200 or t["received"] != size for t in over_tls):
                    raise RuntimeError(f"baseline upload over TLS failed: {over_tls}")
                t_best = min(over_tls, key=lambda b: b["seconds"])
                print(f"   {mib} MiB baseline over TLS 1.3: "
                      + ", ".join(f"{bc.rate(size, b['seconds']):.0f}" for b in over_tls) + " MiB/s", flush=True)
                print(f"   {mib} MiB baseline: " + ", ".join(f"{bc.rate(size, b['seconds']):.0f}" for b in base)
                      + " MiB/s", flush=True)
                prime = {"BENCH_PRIME_DIR": str(tmp), "BENCH_PRIME_BYTES": str(size + 256 * bc.MiB)} if a.prime else {}

                disk = []
                for _ in range(2):
                    os.sync()
                    if a.prime:
                        bc.prime_page_cache(tmp, size + 256 * bc.MiB)
                    disk.append(run_worker(["_upload", sink.url, str(src), "/store"], worker_timeout))
                d_best = min(disk, key=lambda b: b["seconds"])
                print(f"   {mib} MiB baseline + write + fsync (informational): "
                      + ", ".join(f"{bc.rate(size, b['seconds']):.0f}" for b in disk) + " MiB/s", flush=True)

                runs = []
                for r in range(a.repeat):
                    prof = a.profile / f"receiver-{mib}-{r}.txt" if a.profile else None
                    receiver = cardio.start(wrap=bc.pyspy_wrap(prof) if prof else None)
                    rpid = receiver.node_pid()
                    time.sleep(0.3)
                    idle = bc.rss_mib(rpid)
                    rcpu0, rtotal0 = bc.thread_cpu(rpid), bc.process_cpu(rpid)
                    bc.warm(src)
                    os.sync()
                    sprof = a.profile / f"sender-{mib}-{r}.txt" if a.profile else None
                    s = run_worker(["_send", str(gp.data), RECEIVER, str(src)], worker_timeout * 4, sprof, prime)
                    s["receiver_peak"] = bc.peak_rss_mib(rpid)
                    s["receiver_idle"] = idle
                    rcpu1 = bc.thread_cpu(rpid)
                    s["receiver_cpu"] = bc.cpu_delta(rcpu0, rcpu1, rpid)
                    s["receiver_cpu_total"] = bc.process_cpu(rpid) - rtotal0
                    receiver.stop()
                    receiver = None
                    if s["errors"] or s["states"] != ["delivered"]:
                        raise RuntimeError(f"delivery failed: {s}")
                    runs.append(s)
                    print(f"   {mib} MiB cabinet : {bc.rate(size, s['deliver_s']):.0f} MiB/s "
                          f"(seal {s['seal_s']:.1f} s, deliver {s['deliver_s']:.1f} s; peak RSS sender "
                          f"{s['peak_deliver']:.0f} MiB, receiver {s['receiver_peak']:.0f} MiB)", flush=True)
                    print(f"      last byte sent after {s['stream_s']:.2f} s, receiver finished "
                          f"{s['deliver_s'] - s['stream_s']:.2f} s later; CPU by thread: sender {s['cpu']}; "
                          f"receiver {s['receiver_cpu']}", flush=True)
                best = min(runs, key=lambda s: s["deliver_s"])
                results.append((mib, size, b_best, best, d_best))
                tls_best[mib] = t_best
                for path in (tmp / "gp" / "blobs", tmp / "cardio" / "blobs"):
                    for f in path.rglob("*"):              # free the disk for the next size
                        if f.is_file():
                            f.unlink()
                src.unlink()
        finally:
            if receiver is not None:
                receiver.stop()
            if sink is not None:
                sink.stop()
            if tls_sink is not None:
                tls_sink.stop()

    print()
    print(f"   {'size':>6}  {'baseline MiB/s':>14}  {'cabinet MiB/s':>13}  {'ratio':>5}  {'target':>6}  "
          f"{'peak RSS sender':>15}  {'peak RSS receiver':>17}  {'seal s':>6}")
    for mib, size, b, s, _ in results:
        ratio = b["seconds"] / s["deliver_s"]
        print(f"   {mib:>3} MiB  {bc.rate(size, b['seconds']):14.0f}  {bc.rate(size, s['deliver_s']):13.0f}  "
              f"{ratio:5.2f}  {bc.verdict(ratio, TARGET_RATIO):>6}  "
              f"{s['peak_deliver']:11.0f} MiB  {s['receiver_peak']:13.0f} MiB  {s['seal_s']:6.1f}")
    print()
    for mib, size, b, s, d in results:
        print(f"   {mib} MiB: informational floor with the body written + fsynced by the bare server: "
              f"{bc.rate(size, d['seconds']):.0f} MiB/s; cabinet / that = {d['seconds'] / s['deliver_s']:.2f}")
    for mib, size, b, s, _ in results:
        t = tls_best[mib]
        print(f"   {mib} MiB over TLS: bare aiohttp upload over TLS 1.3 {bc.rate(size, t['seconds']):.0f} MiB/s "
              f"({b['seconds'] / t['seconds']:.2f} of plain HTTP's rate); cabinet / bare over TLS = "
              f"{t['seconds'] / s['deliver_s']:.2f}")
    for mib, size, b, s, _ in results:
        print(f"   {mib} MiB: CPU per MiB: bare aiohttp server {1000 * b['server_cpu'] / mib:.2f} ms, "
              f"cabinet receiver {1000 * s['receiver_cpu_total'] / mib:.2f} ms, cabinet sender "
              f"{1000 * s['cpu_total'] / mib:.2f} ms (all threads; sender and receiver share "
              f"{len(os.sched_getaffinity(0))} CPUs)")
    for mib, size, b, s, _ in results:
        print(f"   {mib} MiB: sender RSS {s['rss_before_deliver']:.0f} MiB before delivery, peak "
              f"{s['peak_deliver']:.0f} MiB while delivering, peak {s['peak_seal']:.0f} MiB while sealing; "
              f"receiver idle {s['receiver_idle']:.0f} MiB, peak {s['receiver_peak']:.0f} MiB; "
              f"baseline client peak {b['peak']:.0f} MiB")
    peaks = [max(s["peak_deliver"], s["peak_seal"], s["receiver_peak"]) for _, _, _, s, _ in results]
    rss_ok = all(p < TARGET_RSS_MIB for p in peaks)
    print(f"   peak RSS of every node process < {TARGET_RSS_MIB} MiB: {'MET' if rss_ok else 'MISSED'}"
          f" (max {max(peaks):.0f} MiB)")
    if len(results) > 1:
        lo, hi = results[0][3], results[-1][3]
        growth = max(hi["receiver_peak"] - lo["receiver_peak"], hi["peak_deliver"] - lo["peak_deliver"])
        print(f"   peak RSS growth from {results[0][0]} to {results[-1][0]} MiB: {growth:+.0f} MiB "
              f"({'flat' if growth < 16 else 'GROWS with size'})")
    if a.profile:
        for f in sorted(a.profile.glob("*.txt")):
            if f.name.endswith(".summary.txt"):
                continue
            text = bc.summarize_pyspy(f)
            f.with_suffix(".summary.txt").write_text(text)
            print(f"\n   py-spy {f.name}:\n{text}")
    bc.footer()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_send":
        print(json.dumps(asyncio.run(_send_worker(*sys.argv[2:5]))))
    elif len(sys.argv) >= 2 and sys.argv[1] == "_upload":
        print(json.dumps(asyncio.run(_upload_worker(*sys.argv[2:5]))))
    else:
        sys.exit(main())
