"""Where the node's logs go, and the rule that nothing from outside can forge or flood a log line.

store/logwriter.py's `setup(folder, verbose)` installs the handlers for the "cabinet" loggers:
stderr when verbose, and DIR/node.log rotated by size (10 MiB x 5, files 0600). Every handler it installs uses
`SafeFormatter`, which escapes control characters (newlines, escape sequences, bidi overrides)
in the whole line and caps its length, so a request path or header logged by any module stays
one line that cannot pretend to be another. Tracebacks (our own bugs) keep one line per frame,
each behind the record's own prefix and a "| " mark.

`kv(event, **fields)` makes the stable key=value form of one event's line
(`event=record-received record=ID peer=NODEID size=N`) that log shippers parse: values
that hold a space, a quote, a backslash or "=" are double-quoted with \" and \\ escaped.
Callers pass identifiers, states, counts and reason codes only (never a patient name,
subject, file name, token or key).

`RefusalSummary` counts refused requests per source address and writes one line per source per
period instead of one per request (a stranger's flood costs a few lines a minute).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path

LOG_NAME = "node.log"
MAX_BYTES = 10 << 20
BACKUPS = 5
MAX_LINE = 2000                         # characters of one message, after escaping
FORMAT = "%(asctime)s %(levelname)s %(name)s: "
TIME_PATTERN = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: "

# C0 and C1 controls, DEL, line and paragraph separators, and the format characters that
# reorder or hide text (bidi overrides and isolates, zero-width marks, BOM).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]")


def _escape_one(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str, limit: int = MAX_LINE) -> str:
    """One printable line: control characters shown as \\xNN / \\uNNNN, at most `limit` characters."""
    text = _UNSAFE.sub(_escape_one, text)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit} more)"
    return text


_BARE = re.compile(r"^[^\s\"\\=]*$")


def kv(event: str, /, **fields: object) -> str:
    """`event=NAME key=value ...` in the order given; None values left out; one line, capped."""
    parts = [f"event={_value(event)}"]
    for key, value in fields.items():
        if value is not None:
            parts.append(f"{key}={_value(value)}")
    return " ".join(parts)


def _value(value: object) -> str:
    text = clean(str(value).lower() if isinstance(value, bool) else str(value), 300)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SafeFormatter(logging.Formatter):
    """"TIME LEVEL NAME: message", with everything escaped; a traceback as "| " lines."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:                # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.asctime = self.formatTime(record)
        prefix = clean(self.formatMessage(record), 200)
        lines = [prefix + clean(message)]
        if record.exc_info:
            lines += [f"{prefix}| {clean(l)}" for l in self.formatException(record.exc_info).splitlines()]
        if record.stack_info:
            lines += [f"{prefix}| {clean(l)}" for l in self.formatStack(record.stack_info).splitlines()]
        return "\n".join(lines)


class HoldFlush:
    """A stream handler that can hold its flushes while the writer thread writes a burst of lines."""

    hold = False

    def flush(self) -> None:
        if not self.hold:
            super().flush()  # type: ignore[misc]


class Stream(HoldFlush, logging.StreamHandler):
    """stderr under `cabinet run`, flushed once per burst by the log writer (store/logwriter.py)."""


class _PrivateRotatingFile(HoldFlush, logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created 0600 (logs name contacts and record IDs)."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(self.baseFilename, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


def file_handler(folder: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> logging.Handler:
    h = _PrivateRotatingFile(folder / LOG_NAME, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    h.setFormatter(SafeFormatter())
    return h


class RefusalSummary:
    """Counts refusals per source and logs one line per source per `period` seconds.

    Sources beyond `max_sources` in one period are counted together as "other sources", so
    a flood from many addresses still costs a bounded number of lines.
    """

    def __init__(self, log: logging.Logger, period: float = 60.0, max_sources: int = 200,
                 clock=time.monotonic) -> None:
        self._log, self.period, self._max, self._clock = log, period, max_sources, clock
        self._counts: dict[str, list] = {}
        self._since = clock()

    def note(self, source: str | None, reason: str) -> None:
        source = clean(source or "unknown", 64)
        if source not in self._counts and len(self._counts) >= self._max:
            source = "other sources"
        entry = self._counts.setdefault(source, [0, {}])
        entry[0] += 1
        reasons = entry[1]
        reason = clean(reason, 80)
        if reason in reasons or len(reasons) < 5:
            reasons[reason] = reasons.get(reason, 0) + 1
        if self._clock() - self._since >= self.period:
            self.flush()

    def flush(self) -> None:
        """Write the lines for what was counted since the last flush (called on a timer and at stop)."""
        counts, self._counts, self._since = self._counts, {}, self._clock()
        for source, (n, reasons) in counts.items():
            why = ", ".join(f"{r} x{k}" if k > 1 else r for r, k in reasons.items())
            self._log.warning("refused %d request%s from %s (reasons: %s)", n, "" if n == 1 else "s", source, why)
