"""`python -m relay --listen HOST:PORT [--public relay+tcp://NAME:PORT ...] [limits]`

A blind relay for cabinet nodes that cannot be reached (docs/relay.md). Bad
arguments get one line on stderr and a non-zero exit; SIGTERM or SIGINT stop
it cleanly (exit 0). It takes no data folder: it stores nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from node.core.errors import CabinetError, UsageError

from .server import Limits, Relay


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen wants HOST:PORT (got {text!r})")
    return host.strip("[]") or "0.0.0.0", int(port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m relay", description="A blind relay between cabinet nodes.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any free)")
    p.add_argument("--public", action="append", default=[], metavar="URL",
                   help="relay+tcp://NAME:PORT as nodes are configured with it (repeatable; default: --listen)")
    defaults = Limits()
    for f in dataclasses.fields(Limits):
        kind = type(getattr(defaults, f.name))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                       metavar="N" if kind is int else "SECONDS", help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per session (sizes and times only)")
    return p


async def serve(a: argparse.Namespace) -> int:
    host, port = parse_listen(a.listen)
    limits = Limits(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Limits)})
    if any(getattr(limits, f.name) <= 0 for f in dataclasses.fields(Limits)):
        raise UsageError("every limit must be positive")
    relay = Relay(host, port, public=a.public, limits=limits)
    try:
        await relay.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {a.listen}: {exc.strerror or exc}") from None
    print(f"relay listening on {host}:{relay.port} as {', '.join(sorted(relay.audiences))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    try:
        return asyncio.run(serve(a))
    except CabinetError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
