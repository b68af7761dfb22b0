"""A practice node on the LAN, driven by tests/test_mdns.py inside a network namespace.

    python tests/_mdns_node.py --data DIR --name NAME --port PORT --iface lan0 [--announce-as NODE_ID] [--watch S] [--tls]

Creates the node in DIR if needed (Node.init), serves its real HTTP server
(node.transport.server with the node's own handler) on 0.0.0.0:PORT, so it
keeps answering when the namespace's address changes, and runs a `Lan` bound
to the interface. With --announce-as it plays the impostor: it announces
another node's ID over mDNS while its HTTP server serves its own descriptor.
--watch S makes the Lan compare the interface's addresses every S seconds
(off by default here, so that only an explicit "update" re-announces).
--tls serves TLS 1.3 with the node's identity-bound certificate (as `cabinet run`
does) and announces `tls=1`, so hints are https:// addresses; without it the
server speaks plain HTTP and hints are http:// (an announcement from before TLS).

stdout: one JSON object per line ({"event": "ready" | "hint" | "log" | ...}).
stdin: one JSON command per line:
    {"cmd": "verify", "node_id": ..., "url": ...}   -> {"event": "verified", "ok": bool, ...}
    {"cmd": "hints", "node_id": ...}                -> {"event": "hints", "urls": [...]}
    {"cmd": "peers"}                                -> {"event": "peers", "peers": [...]}
    {"cmd": "update"}                               -> {"event": "updated", "addresses": [...]}
End of input (or SIGTERM) stops the node cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.node import Node  # noqa: E402
from node.transport.mdns import Lan  # noqa: E402
from node.transport.server import Server  # noqa: E402
from node.transport.tls import ServerTLS  # noqa: E402


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class EmitLogs(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, logger=record.name, msg=record.getMessage())


async def commands(lan: Lan, node: Node) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        what = cmd["cmd"]
        if what == "verify":
            desc = await lan.verify_hint(node.client, cmd["node_id"], cmd["url"])
            emit("verified", node_id=cmd["node_id"], url=cmd["url"], ok=desc is not None,
                 descriptor_id=desc.node_id if desc else None)
        elif what == "hints":
            emit("hints", node_id=cmd["node_id"], urls=lan.hints(cmd["node_id"]))
        elif what == "peers":
            emit("peers", peers=[dataclasses.asdict(h) for h in lan.peers()])
        elif what == "update":
            await lan.update()
            emit("updated", addresses=lan.announced_addresses)
        else:
            emit("error", msg=f"unknown command {what!r}")


async def main(a) -> None:
    passphrase = os.environ["CABINET_PASSPHRASE"]
    data = Path(a.data)
    if not (data / "keys.cabinet").exists():
        await Node.init(data, passphrase, name=a.name, listen=f"0.0.0.0:{a.port}")
    node = await Node.open_node(data, passphrase=passphrase)
    server_tls = ServerTLS(node.identity, node.ports.now()) if a.tls else None
    server = Server(node.handler, "0.0.0.0", a.port, tls=server_tls)
    lan = Lan(interfaces=[a.iface], watch=a.watch or None, tls=a.tls,
              on_hint=lambda node_id, url: emit("hint", node_id=node_id, url=url))
    try:
        await server.start()
        await lan.start(a.announce_as or node.node_id, a.name, server.port)
        emit("ready", node_id=node.node_id, announced_as=a.announce_as or node.node_id, port=server.port,
             addresses=lan.announced_addresses, running=lan.running)
        cmd_task = asyncio.ensure_future(commands(lan, node))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        stop_task = asyncio.ensure_future(stop.wait())
        await asyncio.wait({cmd_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        for t in (cmd_task, stop_task):
            t.cancel()
        if cmd_task.done() and not cmd_task.cancelled() and cmd_task.exception():
            raise cmd_task.exception()
    finally:
        await lan.stop()
        await server.stop()
        await node.close()
    emit("stopped")


async def debug_loop(a) -> None:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.25
    await main(a)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--iface", required=True)
    p.add_argument("--announce-as", default=None)
    p.add_argument("--watch", type=float, default=0)
    p.add_argument("--tls", action="store_true")
    args = p.parse_args()
    log = logging.getLogger("cabinet")
    log.setLevel(logging.DEBUG if os.environ.get("MDNS_NODE_DEBUG") else logging.INFO)
    log.addHandler(EmitLogs())
    # asyncio's debug mode reports any callback that holds the loop (a blocking call) on the "asyncio" logger.
    logging.getLogger("asyncio").addHandler(EmitLogs())
    asyncio.run(debug_loop(args))
