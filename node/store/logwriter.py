"""The node's log written on a thread of its own: the event loop never waits on a file or a pipe.

`setup(folder, verbose)` installs, for the "cabinet" loggers, one `Background` handler that
queues each record; the "cabinet-log" thread formats it (logsetup.SafeFormatter: escaped, one
line, capped) and writes it to stderr (verbose) and to DIR/node.log (rotated, 0600). What a
line may hold is logsetup's rule; this module only moves the writing off the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from pathlib import Path

from ..logsetup import HoldFlush, SafeFormatter, Stream, file_handler


class Background(logging.Handler):
    """Hands each record to a writer thread, which formats and writes it to `handlers`.

    The event loop only queues the record: formatting, escaping, the writes, the flushes and
    the rotation's checks happen on the "cabinet-log" thread, a burst of lines (a batch of 500
    records received) written with one flush per handler. Lines keep their order. `close()`
    (run by logging.shutdown at exit) writes what is queued first; a process killed outright
    loses at most the lines of its last moments.
    """

    BURST = 512

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.handlers = handlers
        # a record; an Event, set once what came before it is written (flush); None: stop
        self._queue: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cabinet-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self._queue.put(record)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.BURST:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if isinstance(r, logging.LogRecord)]
            for h in self.handlers:
                if isinstance(h, HoldFlush):
                    h.hold = True
                try:
                    for record in records:
                        if record.levelno >= h.level:
                            h.handle(record)
                finally:
                    if isinstance(h, HoldFlush):
                        h.hold = False
                    h.flush()
            for r in batch:
                if isinstance(r, threading.Event):
                    r.set()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait (at most 2 s) until every line queued before this call is written."""
        if self._thread.is_alive():
            written = threading.Event()
            self._queue.put(written)
            written.wait(2.0)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)
        for h in self.handlers:
            h.close()
        super().close()


def setup(folder: Path | None, verbose: bool) -> None:
    """Log "cabinet.*" to stderr (verbose) and, in an initialised data folder, to node.log,
    both written on a thread of their own (`Background`)."""
    root = logging.getLogger("cabinet")
    root.setLevel(logging.INFO)
    handlers: list[logging.Handler] = []
    if verbose:
        h = Stream(sys.stderr)
        h.setFormatter(SafeFormatter())
        handlers.append(h)
    if folder is not None and (folder / "keys.cabinet").is_file():
        handlers.append(file_handler(folder))
    if handlers:
        root.addHandler(Background(handlers))
