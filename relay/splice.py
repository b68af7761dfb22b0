"""Forwarding bytes both ways between two streams, with bounded memory.

Each direction reads at most CHUNK bytes and waits for the other side to take
them (drain) before reading more, so a session holds a few hundred KiB however
large the transfer. A side that sends nothing either way for `idle` seconds
ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

CHUNK = 256 * 1024
WRITE_HIGH = 512 * 1024          # the writer's buffer: above this, drain() waits
HALF_CLOSED = 30.0               # seconds one way may go on after the other way has ended


@dataclass(slots=True)
class Counters:
    up: int = 0                  # caller -> callee
    down: int = 0                # callee -> caller
    last: float = 0.0            # loop time of the last byte either way


def tune(writer: asyncio.StreamWriter) -> None:
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counters: Counters, up: bool,
                loop: asyncio.AbstractEventLoop) -> None:
    try:
        while True:
            piece = await src.read(CHUNK)
            if not piece:
                break
            counters.last = loop.time()
            if up:
                counters.up += len(piece)
            else:
                counters.down += len(piece)
            dst.write(piece)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()          # half-close: the other way may still be talking
    except (ConnectionError, OSError):
        dst.transport.abort()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter], *, idle: float,
                 counters: Counters | None = None) -> Counters:
    """Forward a->b and b->a until both ends are closed (or nothing moved for `idle` seconds)."""
    loop = asyncio.get_running_loop()
    counters = counters or Counters()
    counters.last = loop.time()
    for _, w in (a, b):
        tune(w)
    tasks = [asyncio.ensure_future(_pipe(a[0], b[1], counters, True, loop)),
             asyncio.ensure_future(_pipe(b[0], a[1], counters, False, loop))]
    finished, half_closed = False, None
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=min(HALF_CLOSED, idle / 4), return_when=asyncio.ALL_COMPLETED)
            if not pending:
                finished = True
                break
            now = loop.time()
            if len(pending) == 1 and half_closed is None:
                half_closed = now
            if now - counters.last > idle or (half_closed is not None and now - half_closed > HALF_CLOSED):
                break
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for _, w in (a, b):
            if finished:
                w.close()            # flushes what is still buffered, then closes
            else:
                w.transport.abort()
    return counters
