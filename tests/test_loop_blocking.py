"""Nothing blocks the event loop for more than 50 ms during an end-to-end exchange.

Two practices run in one event loop (so a block in either is seen), in
asyncio's debug mode, whose slow-callback report names every step that held
the loop longer than `slow_callback_duration` (python-zeroconf guards its
loop the same way). The exchange covers what used to run on the loop: a
large attachment sealed and received (file writes, fsyncs, flock), a batch of
hundreds of small records (signing their receipts, hashing the batch), a
pull, receipts, a reply and an export.

A step is counted as blocking when it held the loop for more than 50 ms of
its own: the time any of the process's threads spent waiting for a CPU
during the step (Linux's per-thread schedstat) is taken off first. On a
busy 2-core machine the kernel can leave the loop, or a thread it is
handing work to, off the CPU for 100 ms; that is the machine's load, not
the node's code, and counting it made the test fail at random. Likewise the
objects of every earlier test in this process are frozen out of the garbage
collector first (gc.freeze): a node's own heap is small, the test session's
is not, and a full collection of it took 85 ms in one step.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import gc
import logging
import os
import threading
import time

from conftest import PASSPHRASE
from node import Node

LIMIT = 0.05


class SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "took" in text and "seconds" in text and text.startswith("Executing"):
            self.found.append(text)


class ThreadQueues:
    """How long, in total, the process's threads have waited for a CPU (ns), from /proc/self/task/*/schedstat."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._threads = -1

    def _refresh(self) -> None:
        if threading.active_count() == self._threads:
            return
        self._threads = threading.active_count()
        for tid in os.listdir("/proc/self/task"):
            if tid not in self._fds:
                try:
                    self._fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
                except FileNotFoundError:
                    pass

    def read(self) -> dict[str, int]:
        self._refresh()
        out = {}
        for tid, fd in self._fds.items():
            try:
                out[tid] = int(os.pread(fd, 128, 0).split()[1])
            except (OSError, IndexError, ValueError):     # the thread has ended
                pass
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


class StepWatch:
    """Wraps every loop step (Handle._run): a step over LIMIT, less the time threads waited for a CPU."""

    def __init__(self) -> None:
        self.blocked: list[str] = []
        self.excused: list[str] = []
        self.queues = ThreadQueues()
        self._run = asyncio.events.Handle._run

    def __enter__(self) -> "StepWatch":
        # The test process holds every earlier test's objects: a full collection of that heap can take
        # 80 ms, which a node (a small heap of its own) never pays. Freeze what exists now, so that
        # collections during the exchange scan only what the exchange makes, as in a node.
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._gc)
        self._gc_started, self.gc_ns = 0, 0
        watch, run = self, self._run

        def timed(handle) -> None:
            before, t0, gc0 = watch.queues.read(), time.perf_counter(), watch.gc_ns
            try:
                run(handle)
            finally:
                wall = time.perf_counter() - t0
                if wall > LIMIT:
                    after = watch.queues.read()
                    queued = sum(v - before.get(tid, 0) for tid, v in after.items()) / 1e9
                    own = wall - min(wall, queued)
                    line = (f"{handle!r}: {wall * 1000:.0f} ms, of which threads waited {queued * 1000:.0f} ms "
                            f"for a CPU and garbage collection took {(watch.gc_ns - gc0) / 1e6:.0f} ms")
                    (watch.blocked if own > LIMIT else watch.excused).append(line)

        asyncio.events.Handle._run = timed
        return self

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter_ns()
        elif self._gc_started:
            self.gc_ns += time.perf_counter_ns() - self._gc_started

    def __exit__(self, *exc) -> None:
        asyncio.events.Handle._run = self._run
        gc.callbacks.remove(self._gc)
        gc.unfreeze()
        self.queues.close()


async def _practice(tmp_path, name: str) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    return await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)


async def test_an_exchange_never_blocks_the_loop_for_more_than_50_ms(tmp_path):
    # Keys are derived (Argon2id, deliberately slow) before the watch starts: unlocking is not an exchange.
    a, b = await _practice(tmp_path, "A"), await _practice(tmp_path, "B")
    letter = tmp_path / "letter.txt"
    letter.write_text("Dear colleague, please see this patient.\n")
    scan = tmp_path / "scan.bin"
    scan.write_bytes(os.urandom(24 << 20))      # the test's own files are made before the watch starts
    loop = asyncio.get_running_loop()
    watch = SlowCallbacks()
    logging.getLogger("asyncio").addHandler(watch)
    old_debug, old_limit = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = LIMIT
    steps = StepWatch().__enter__()
    try:
        await a.serve("127.0.0.1:0")
        await b.serve("127.0.0.1:0", pull_interval=3600)
        await a.add_contact(b.descriptor.signed)
        await b.add_contact(a.descriptor.signed)
        big = await a.send_referral(to="B", patient="Jeanne Martin", born="1961-04-02", subject="Scan",
                                    letter=letter, attachments=[scan])
        assert big.deliveries[b.node_id] == "delivered", big.errors
        for i in range(300):           # queued, then pushed as batches by one delivery round
            await a.send_referral(to="B", patient=f"Patient {i}", letter=letter, deliver=False)
        await a.deliver_pending()             # the running courier may hold part of it: wait for all
        deadline = loop.time() + 60
        while len(await b.inbox()) < 301 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert len(await b.inbox()) == 301
        opened = await b.read(big.record_id)
        assert opened.summary.subject == "Scan"
        out = await b.export(big.record_id, tmp_path / "out")
        answer = await b.reply(big.record_id, letter=letter)
        assert answer.deliveries[a.node_id] == "delivered", answer.errors
        await a.puller.pull_from(await a.contact("B"))
    finally:
        steps.__exit__()
        loop.slow_callback_duration = old_limit
        loop.set_debug(old_debug)
        logging.getLogger("asyncio").removeHandler(watch)
        await a.close()
        await b.close()
    assert out[0].stat().st_size == 24 << 20
    # asyncio's report names each slow step; the watch says how much of it was the node's own.
    assert steps.blocked == [], ("the event loop was blocked:\n" + "\n".join(steps.blocked)
                                 + "\nasyncio's report:\n" + "\n".join(watch.found))
    assert len(watch.found) >= len(steps.blocked + steps.excused)    # both saw the same slow steps
