"""What `cabinet send` adds around the facade's send_referral: a second copy asked for, a progress
bar that follows the real transfer, and a plain account of a Ctrl-C.

- The same referral (recipients, patient, letter and files by content) sent within the last few
  minutes is a slip more often than not: on a terminal the practitioner is asked; otherwise the
  send is refused, and `--again` sends it all the same.
- The bar is drawn on stderr, only on a terminal, from the node's DeliveryChanged events (bytes
  actually sent), only for a record large enough to travel in pieces.
- A record is sealed and stored before delivery starts: interrupted after that, it is kept and the
  node finishes delivering it; interrupted before, nothing was kept and nothing sent.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from .text import shown
from ..node import DeliveryChanged, Node, RecordStored, Subscription, UsageError


def _hhmm(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000))


async def check_resend(node: Node, to: Sequence[str], *, patient: str, born: str, letter: Path,
                       attachments: Sequence[str]) -> None:
    """Ask (terminal) or refuse (no terminal) when this exact referral was sent minutes ago."""
    earlier = await node.earlier_copy(to=list(to), patient=patient, born=born, letter=letter,
                                      attachments=attachments)
    if earlier is None:
        return
    names = {c["node_id"]: c["name"] for c in await node.contacts()}
    who = " and ".join(shown(names.get(r, r)) for r in earlier.recipients)
    what = f"the same referral was sent to {who} at {_hhmm(earlier.created)} (record {earlier.record_id[:10]})"
    if not sys.stdin.isatty():
        raise UsageError(f"{what}; add --again to send a second copy")
    answer = input(f"{what[0].upper()}{what[1:]}; send it again? [y/N] ")     # nothing else runs meanwhile
    if answer.strip().lower() not in ("y", "yes", "o", "oui"):
        raise UsageError("not sent again")


async def after_interrupt(node: Node, stored: Subscription, started: int) -> str:
    """What a Ctrl-C left behind, in one sentence."""
    ids = [e.record_id for e in stored.pending() if isinstance(e, RecordStored)]
    try:
        # An insert under way when Ctrl-C came is finished by the store's one writer before this read.
        rows = await asyncio.wait_for(node.outbox(), timeout=10)
    except Exception:                   # a store that cannot answer now: say what is known
        rows = []
    if not ids:
        ids = list(dict.fromkeys(r["record_id"] for r in rows if r["created"] >= started))
    if not ids:
        return "the record was not stored yet: nothing was kept and nothing sent; run the same command again"
    rid = ids[0]
    states = [r["state"] for r in rows if r["record_id"] == rid]
    if states and all(s == "delivered" for s in states):
        return f"record {rid} had already been delivered"
    return (f"record {rid} is kept in the outbox and the node will finish delivering it ('cabinet run', or "
            f"the node already running); 'cabinet outbox {rid[:10]}' shows where it is")


class ProgressBar:
    """One line on stderr, redrawn as bytes are sent: `sending  42% [#####.....] 11.0 MB of 26.2 MB`."""

    WIDTH = 30

    def __init__(self, node: Node, out: TextIO = sys.stderr) -> None:
        self.node, self.out = node, out
        self.events = node.subscribe(RecordStored, DeliveryChanged)
        self.record: str | None = None
        self.total, self.recipients = 0, 1
        self.sent: dict[str, int] = {}
        self.drawn = False
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        async for e in self.events:
            if isinstance(e, RecordStored) and self.record is None:
                self.record, self.recipients = e.record_id, max(1, len(e.recipients))
                rows = await self.node.outbox(e.record_id)
                self.total = rows[0]["body_size"] if rows else 0
            elif isinstance(e, DeliveryChanged) and e.record_id == self.record and self.total:
                if e.state == "sending":
                    self.sent[e.recipient] = e.sent_bytes
                elif e.state == "delivered" and self.drawn:
                    self.sent[e.recipient] = self.total
                else:
                    continue
                self.draw()

    def draw(self) -> None:
        whole = self.total * self.recipients
        done = min(sum(self.sent.values()), whole)
        pct = 100 * done // whole if whole else 100
        filled = self.WIDTH * done // whole if whole else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.out.write(f"\rsending {pct:3d}% [{bar}] {_size(done)} of {_size(whole)} ")
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        self._task.cancel()
        self.events.close()
        if self.drawn:
            self.drawn = False
            self.out.write("\n")
            self.out.flush()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
