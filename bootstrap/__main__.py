"""`python -m bootstrap --listen HOST:PORT --data DIR [--peer URL ...] [--trust-proxy ADDR ...]`

Bad arguments or an unusable data folder get one line on stderr and a
non-zero exit. SIGTERM or SIGINT stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from node.core.errors import CabinetError, UsageError

from .ratelimit import parse_proxies
from .server import Limits
from .service import Bootstrap


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen wants HOST:PORT (got {text!r})")
    return host.strip("[]") or "0.0.0.0", int(port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bootstrap",
                                description="A cabinet bootstrap server: a directory of signed node descriptors.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any free)")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder for the database")
    p.add_argument("--peer", action="append", default=[], metavar="URL",
                   help="another bootstrap to copy descriptors from (repeat for several)")
    p.add_argument("--announce-rate", type=float, default=20, help="announces per second per client (default 20)")
    p.add_argument("--announce-burst", type=float, default=40, help="announce burst per client (default 40)")
    p.add_argument("--read-rate", type=float, default=200, help="reads per second per client (default 200)")
    p.add_argument("--read-burst", type=float, default=400, help="read burst per client (default 400)")
    p.add_argument("--new-per-block", type=int, default=20, metavar="N",
                   help="identities never seen before, per IPv4 /24 or IPv6 /56, per period (default 20)")
    p.add_argument("--new-total", type=int, default=500, metavar="N",
                   help="identities never seen before, from everyone, per period (default 500)")
    p.add_argument("--new-period", type=float, default=3600, metavar="SECONDS",
                   help="the period of the two caps above (default 3600)")
    p.add_argument("--trust-proxy", action="append", default=[], metavar="ADDR",
                   help="a reverse proxy whose X-Forwarded-For is believed (address or network; repeatable)")
    p.add_argument("--sync-wait", type=int, default=25, help="seconds a sync request to a peer long-polls")
    p.add_argument("--sync-interval", type=float, default=1.0,
                   help="pause between sync rounds that brought nothing new (seconds)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each stored descriptor")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="append every request received (method, path, body) to FILE, for audits")
    return p


async def serve(a: argparse.Namespace) -> int:
    host, port = parse_listen(a.listen)
    if min(a.announce_rate, a.read_rate) <= 0 or min(a.announce_burst, a.read_burst) < 1:
        raise UsageError("rates must be positive and bursts at least 1")
    if not 0 <= a.sync_wait <= 30 or a.sync_interval < 0:
        raise UsageError("--sync-wait must be 0..30 and --sync-interval not negative")
    if min(a.new_per_block, a.new_total) < 1 or a.new_period <= 0:
        raise UsageError("--new-per-block and --new-total must be at least 1 and --new-period positive")
    parse_proxies(a.trust_proxy)
    limits = Limits(a.announce_rate, a.announce_burst, a.read_rate, a.read_burst, new_per_block=a.new_per_block,
                    new_total=a.new_total, new_period=a.new_period, trusted_proxies=tuple(a.trust_proxy))
    b = Bootstrap(a.data, host, port, peers=tuple(a.peer), limits=limits, sync_wait=a.sync_wait,
                  sync_interval=a.sync_interval, trace=a.trace)
    await b.start()
    print(f"bootstrap listening on {b.url} ({len(b.peers)} peer(s))", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await b.stop()
    print("bootstrap stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(a))
    except CabinetError as err:
        print(f"bootstrap: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
