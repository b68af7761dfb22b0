"""GET /api/events: the node's event stream as Server-Sent Events, for live pages and scripts.

Only identifiers, states, sizes and percents are sent (events carry no patient
data by construction, and `reason` texts are left out). The caller's
credentials are checked again every few seconds, so a revoked token or an
expired session stops receiving at once rather than when it disconnects.
A comment line every KEEPALIVE seconds keeps proxies from closing the stream.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from ...node import DeliveryChanged, Event, KeyChanged, RecordOpened, RecordReceived, RecordStored
from . import auth
from .keys import CLOSING, NODE

KEEPALIVE = 15.0
RECHECK = 5.0
TYPES = (RecordReceived, RecordStored, DeliveryChanged, RecordOpened, KeyChanged)


async def as_json(event: Event, sizes: dict[str, int | None], node) -> dict:
    out: dict = {"type": type(event).__name__, "at": event.at}
    if isinstance(event, RecordReceived):
        out |= {"record_id": event.record_id, "sender": event.sender, "kind": event.kind, "size": event.size}
    elif isinstance(event, RecordStored):
        out |= {"record_id": event.record_id, "kind": event.kind, "recipients": list(event.recipients)}
    elif isinstance(event, DeliveryChanged):
        if event.record_id not in sizes:
            sizes[event.record_id] = await node.record_size(event.record_id)
        size = sizes[event.record_id] or 0
        percent = 100 if event.state == "delivered" else (min(99, event.sent_bytes * 100 // size) if size else 0)
        out |= {"record_id": event.record_id, "recipient": event.recipient, "state": event.state,
                "sent_bytes": event.sent_bytes, "percent": percent}
    elif isinstance(event, RecordOpened):
        out |= {"record_id": event.record_id, "how": event.how, "by": event.by}
    elif isinstance(event, KeyChanged):
        out |= {"node_id": event.node_id, "status": event.status}
    return out


async def events(request: web.Request) -> web.StreamResponse:
    node, closing = request.app[NODE], request.app[CLOSING]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "X-Accel-Buffering": "no"})
    sizes: dict[str, int | None] = {}
    with node.subscribe(*TYPES) as sub:
        await resp.prepare(request)
        await resp.write(b"retry: 3000\n\n")
        checked, n = time.monotonic(), 0
        while not closing.is_set():
            getter = asyncio.ensure_future(sub.get())
            stopper = asyncio.ensure_future(closing.wait())
            done, _ = await asyncio.wait({getter, stopper}, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
            for task in (getter, stopper):
                if task not in done:
                    task.cancel()
            if time.monotonic() - checked > RECHECK:
                if await auth.principal(request) is None:
                    break                 # revoked token or expired session: the stream ends
                checked = time.monotonic()
            if getter in done:
                n += 1
                data = json.dumps(await as_json(getter.result(), sizes, node), separators=(",", ":"))
                await resp.write(f"id: {n}\nevent: {type(getter.result()).__name__}\ndata: {data}\n\n".encode())
            elif stopper not in done:
                await resp.write(b": keepalive\n\n")
            if sub.missed:
                await resp.write(f"event: Missed\ndata: {{\"missed\": {sub.missed}}}\n\n".encode())
                sub.missed = 0
    return resp
