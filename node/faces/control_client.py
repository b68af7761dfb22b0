"""The CLI's side of the control socket: a light client of the running node (docs/cli.md).

While `cabinet run` runs, DATA/control.sock (mode 0600) answers the CLI's commands, so that
no passphrase is asked and no key is derived. This module is imported on the CLI's fast path:
it uses the standard library only (no aiohttp, nacl, sqlite_utils, not even asyncio), so that
`cabinet inbox` costs little more than Python's own start.

The protocol, one request per connection:
  frame   = 4-byte big-endian length, then that many bytes of UTF-8 JSON (a request at most
            REQUEST_MAX bytes, an answer frame at most ANSWER_MAX);
  request = {"v": 1, "cmd": NAME, "args": {...}, "fds": N}; the N file descriptors (files the
            caller opened itself: attachments, a letter, an export or backup folder) ride with
            the request's first bytes as SCM_RIGHTS ancillary data;
  answers = zero or more {"progress": {...}} frames (send, reply), then one {"ok": DATA} or
            {"error": "one line", "exit": CODE}.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

SOCKET_NAME = "control.sock"
VERSION = 1
REQUEST_MAX = 1 << 20
ANSWER_MAX = 256 << 20
MAX_FDS = 102                   # the envelope's 100 attachments, a letter, a folder
_HEADER = struct.Struct(">I")
_UNIX_PATH_MAX = 107


class NoNode(Exception):
    """No running node answers on this folder's control socket: open the folder as before."""


class Failed(Exception):
    """The running node refused or failed the command: one line to show, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def socket_path(folder: Path) -> Path:
    return Path(folder) / SOCKET_NAME


def unix_address(path: Path) -> tuple[str, int | None]:
    """A bindable/connectable address for `path`, and a folder fd to close afterwards.

    A Unix socket path is limited to 107 bytes; a deeper data folder is reached through
    /proc/self/fd/N/control.sock, N being an O_PATH descriptor of the folder."""
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _UNIX_PATH_MAX:
        return text, None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


# --- frames --------------------------------------------------------------------------------

def encode(obj: Any) -> bytes:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    data = encode(obj)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        piece = sock.recv(min(left, 1 << 20))
        if not piece:
            raise EOFError("the connection was closed")
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


def recv_frame(sock: socket.socket, limit: int = ANSWER_MAX, first: bytes = b"") -> Any:
    head = first[:4] + (recv_exact(sock, 4 - len(first)) if len(first) < 4 else b"")
    (n,) = _HEADER.unpack(head)
    if n > limit:
        raise ValueError(f"a frame of {n} bytes is over the limit of {limit}")
    body = first[4:4 + n]
    body += recv_exact(sock, n - len(body))
    return json.loads(body.decode("utf-8"))


# --- asking the running node -------------------------------------------------------------

def connect(folder: Path, timeout: float | None = 5.0) -> socket.socket:
    """A connection to the folder's running node, or NoNode."""
    path = socket_path(folder)
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise NoNode()
    except OSError:
        raise NoNode() from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    address, dirfd = unix_address(path)
    try:
        sock.connect(address)
    except OSError:          # refused (a stale socket of a stopped node), or not ours to use
        sock.close()
        raise NoNode() from None
    finally:
        if dirfd is not None:
            os.close(dirfd)
    return sock


def ask(folder: Path, cmd: str, args: dict, *, fds: Sequence[int] = (),
        on_progress: Callable[[dict], None] | None = None, sock: socket.socket | None = None) -> Any:
    """Run `cmd` in the running node; its data, or Failed. NoNode when nothing answers."""
    sock = sock or connect(folder)
    with sock:
        try:
            # A node that refused us at once (another user) may close before we finish: its answer is below.
            with contextlib.suppress(ConnectionError):
                send_frame(sock, {"v": VERSION, "cmd": cmd, "args": args, "fds": len(fds)}, fds)
            sock.settimeout(None)            # a send to a slow colleague may take long: progress says so
            while True:
                frame = recv_frame(sock)
                if not isinstance(frame, dict):
                    raise ValueError("not an object")
                if "progress" in frame:
                    if on_progress is not None:
                        on_progress(frame["progress"])
                    continue
                if "error" in frame:
                    raise Failed(str(frame["error"]), int(frame.get("exit", 1)))
                return frame.get("ok")
        except (EOFError, ConnectionError):
            raise Failed("the running node closed the connection before answering (was it stopped?)") from None
        except (ValueError, UnicodeDecodeError, struct.error):
            raise Failed("the running node's answer could not be read") from None


def open_files(paths: Sequence[str], what: str) -> list[int]:
    """Open the caller's own files, as the caller: the node reads only what was opened here.

    The messages are those of the node's own checks (a missing or non-regular file)."""
    fds: list[int] = []
    try:
        for p in paths:
            fds.append(open_one(p, what))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def open_one(path: str, what: str) -> int:
    p = os.path.expanduser(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise Failed(f"letter file not found: {path}" if what == "letter" else f"attachment not found: {path}",
                     2) from None
    except OSError as exc:
        raise Failed(f"cannot read {what} {path}: {exc.strerror}", 2) from None
    if stat.S_ISDIR(st.st_mode):
        raise Failed(f"the letter {Path(p).name} is a folder, not a file" if what == "letter"
                     else f"attachment is not a file: {path}", 2)
    try:
        return os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Failed(f"cannot read {what} {path}: {exc.strerror}", 2) from None


def open_folder(path: str) -> int:
    """A folder the node is to write into (export, backup): made if missing, opened by the caller."""
    p = os.path.expanduser(path)
    try:
        os.makedirs(p, exist_ok=True)
        return os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise Failed(f"not a folder: {path}", 2) from None
    except OSError as exc:
        raise Failed(f"cannot use the folder {path}: {exc.strerror}", 2) from None
