"""`cabinet run`: the node, its web app, and its control socket; or, started locked, the unlock page first.

With a passphrase (CABINET_PASSPHRASE or a terminal), the node opens at once. With `--locked`, or
with neither (a systemd service), it starts *locked*: no key is derived and no store opened; the
web port serves only the unlock page (web/unlock.py) and the control socket answers "locked".
Once the passphrase is given there, the node opens, serves and starts everything as usual, the
full web app replacing the unlock page on the same port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from . import control
from .web import cert as webcert
from .web import lock
from .web.server import PortInUse, is_loopback, start_web
from .web.unlock import start_unlock
from ..node import Node, UsageError, parse_listen, valid_address

DEFAULT_WEB = "127.0.0.1:7480"


def _url(text: str) -> str:
    if not valid_address(text):
        raise UsageError(f"not an address: {text!r} (expected http://host:port)")
    return text.rstrip("/")


def _starts_locked(a) -> bool:
    if a.locked:
        return True
    return os.environ.get("CABINET_PASSPHRASE") is None and not sys.stdin.isatty()


async def run(a) -> int:
    locked = _starts_locked(a)
    if locked and a.no_web:
        raise UsageError("a locked node is unlocked in the web app: --locked needs the web app (drop --no-web)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if locked:
        node = await _wait_unlocked(a, stop)
        if node is None:
            print("stopped", flush=True)
            return 0
    else:
        from .prompt import passphrase
        node = await Node.open_node(a.data, passphrase=passphrase())
    try:
        await _serve(a, node, stop)
    finally:
        await node.close()
    print("stopped", flush=True)
    return 0


async def _wait_unlocked(a, stop: asyncio.Event) -> Node | None:
    """Serve the unlock page (and a control socket that says "locked") until the passphrase opens the node."""
    if not (Path(a.data) / "keys.cabinet").is_file():
        raise UsageError(f"no cabinet node in {a.data}: 'cabinet init' makes one")
    host, port = parse_listen(a.web or DEFAULT_WEB)
    if _tls(a) is None and not is_loopback(host):
        raise UsageError("a locked node cannot serve its own web certificate before it is unlocked (the "
                         "certificate's key opens only with the passphrase): unlock it on this computer "
                         "(--web 127.0.0.1:PORT, or through ssh -L), or give --web-cert FILE and --web-key FILE")
    try:
        page = await start_unlock(a.data, host, port, tls=_tls(a))
    except PortInUse:
        if a.web:
            raise
        page = await start_unlock(a.data, host, 0, tls=_tls(a))
    ctl = control.ControlServer(a.data, locked_hint=page.url)
    try:
        await ctl.start()
        print(f"cabinet node locked: unlock it at {page.url}/unlock", flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopping, page.opened}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        a.failed_unlocks = list(page.failed_at)      # recorded and alerted on once the node serves (_serve)
        return page.opened.result() if page.opened in done else None
    finally:
        await ctl.close()
        await page.close()
        a.web = f"{host}:{page.port}"


async def _serve(a, node: Node, stop: asyncio.Event) -> None:
    if a.bootstrap:
        node.use_bootstraps(a.bootstrap)
    if a.no_lan:
        node.config.lan = False
    if a.no_port_mapping:
        node.config.port_mapping = False
    if a.advertise:
        node.config.advertise = [_url(u) for u in a.advertise]
        node.config.save(node.folder)
    if a.relay:
        node.use_relays(a.relay)
    host, port = await node.serve(a.listen, accept=not a.no_listen, pull_interval=a.pull_every)
    await node.note_failed_unlocks(getattr(a, "failed_unlocks", []))      # typed while it was locked
    ctl = control.ControlServer(node.folder)
    ctl.node = node
    await ctl.start()
    where = f"listening on https://{host}:{port}" if port else "not listening (delivering and pulling only)"
    print(f"cabinet node {node.node_id} ({node.config.name}) {where}", flush=True)
    web, own = (None, None) if a.no_web else await _start_web(node, a)
    if web is not None:
        print(f"web app and local API on {web.url}  ('cabinet user add NAME' makes an account)", flush=True)
    if web is not None and own is not None:
        print(f"web certificate SHA-256 fingerprint {own.sha256}  (compare it with the one the browser shows; "
              f"names: {', '.join(own.dns + own.ips)}; 'cabinet web-cert' prints it again)", flush=True)
    try:
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await ctl.close()
        if web is not None:
            await web.close()


def _tls(a):
    tls = (a.web_cert, a.web_key) if a.web_cert or a.web_key else None
    if tls is not None and not (a.web_cert and a.web_key):
        raise UsageError("give both --web-cert FILE and --web-key FILE")
    return tls


async def _start_web(node: Node, a):
    """The web app on --web HOST:PORT (default 127.0.0.1:7480); if the default port is taken (a second
    node on this computer), any free port, said so."""
    host, port = parse_listen(a.web or DEFAULT_WEB)
    tls, own = _tls(a), None
    if tls is None and not is_loopback(host):       # beyond loopback: the node's own certificate (web/cert.py)
        own = await webcert.ensure(node, host)
        tls = own.context
    names = own.hosts if own is not None else ()
    try:
        web = await start_web(node, host, port, tls=tls, names=names)
    except PortInUse:
        if a.web:
            raise
        web = await start_web(node, host, 0, tls=tls, names=names)
        print(f"note: {DEFAULT_WEB} is taken (another node on this computer?); web app on port {web.port}",
              file=sys.stderr, flush=True)
    # --web-lock-minutes N: the page locks after N minutes without activity (0: never; default 5)
    lock.configure(web.runner.app, a.web_lock_minutes)
    return web, own
