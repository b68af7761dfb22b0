"""The running node's control socket: the CLI's commands answered by `cabinet run` (docs/cli.md).

`ControlServer` listens on DATA/control.sock (mode 0600) while `cabinet run` runs. Each
connection carries one request (control_client.py holds the frame format). Before reading a
byte, the caller's uid is taken from the kernel (SO_PEERCRED) and must be the node's own;
requests are bounded (1 MiB, 102 file descriptors, 5 s to arrive, 8 connections at once); a bad
one gets one line and the node keeps serving.

Files: the caller opens its attachments, letter or export folder itself and passes the
descriptors (SCM_RIGHTS); the node never opens a path a caller names, so a caller can make it
read or write only what the caller itself could open. They are staged as symbolic links
DATA/incoming/ctl-<random>/<n>/<name> -> /proc/self/fd/<fd>, so the facade sees the files
under their own names, and removed after the call.

The handlers (control_commands.COMMANDS) call the facade and return JSON data; the CLI prints it with the same
code whether the data came from here or from a folder it opened itself (`run_local`). A node
started locked (`cabinet run --locked`) has no Node yet: every command is answered "locked".
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from pathlib import Path

from ..node import CabinetError, Node, UsageError
from . import control_client as wire
from .control_commands import COMMANDS, Call, jsonable

log = logging.getLogger("cabinet.control")
MAX_CLIENTS = 8
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 30.0
ANSWER_TOO_BIG = "the answer is too large for the control socket"


class BadRequest(Exception):
    """A request that cannot be read: answered with one line."""


# --- the kernel's word on who is calling ------------------------------------------------------

def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


def caller_allowed(sock: socket.socket, expected_uid: int) -> bool:
    try:
        return peer_uid(sock) == expected_uid
    except OSError:
        return False


def read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request and the descriptors that came with it (blocking, bounded in size and time)."""
    conn.settimeout(READ_TIMEOUT)
    fds: list[int] = []
    data, ancillary, flags, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(wire.MAX_FDS * 4))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    try:
        if flags & socket.MSG_CTRUNC:
            raise BadRequest(f"too many files in one request (at most {wire.MAX_FDS})")
        if not data:
            raise BadRequest("empty request")
        try:
            req = wire.recv_frame(conn, wire.REQUEST_MAX, first=data)
        except EOFError:
            raise BadRequest("the request ended early") from None
        except ValueError as exc:
            raise BadRequest(f"unreadable request ({str(exc).splitlines()[0][:120]})") from None
        if (not isinstance(req, dict) or req.get("v") != wire.VERSION or not isinstance(req.get("cmd"), str)
                or not isinstance(req.get("args", {}), dict) or req.get("fds", 0) != len(fds)):
            raise BadRequest("not a control request (expected {v: 1, cmd, args, fds})")
        return req, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# --- the server ---------------------------------------------------------------------------------

class ControlServer:
    """DATA/control.sock while `cabinet run` runs; `node` is None while the node is locked."""

    def __init__(self, folder: Path, *, uid: int | None = None, locked_hint: str = "") -> None:
        self.folder = Path(folder)
        self.path = wire.socket_path(self.folder)
        self.uid = os.getuid() if uid is None else uid
        self.node: Node | None = None
        self.locked_hint = locked_hint
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        await asyncio.to_thread(self._bind)
        self._accepting = asyncio.create_task(self._accept_loop(), name="cabinet-control")

    def _bind(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            try:
                wire.connect(self.folder, timeout=2).close()
            except wire.NoNode:
                self.path.unlink()            # left by a node that stopped without cleaning up
            else:
                raise UsageError(f"a node is already running on {self.folder}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, dirfd = wire.unix_address(self.path)
        try:
            sock.bind(address)
            os.chmod(self.path, 0o600)        # the folder is 0700 already; the socket is the caller's door
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        finally:
            if dirfd is not None:
                os.close(dirfd)
        sock.setblocking(False)
        self._sock = sock

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:               # EMFILE and the like: wait a moment, keep serving
                log.warning("control socket: accept failed (%s)", exc.__class__.__name__)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(True)
            if len(self._clients) >= MAX_CLIENTS:
                await asyncio.to_thread(_answer_and_close, conn, {"error": "the node is busy: try again", "exit": 1})
                continue
            task = asyncio.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            if not caller_allowed(conn, self.uid):
                log.warning("control socket: a caller with another user ID was refused")
                await asyncio.to_thread(_refuse, conn, {"error": "refused: this node belongs to another user", "exit": 2})
                return
            try:
                req, fds = await asyncio.to_thread(read_request, conn)
            except (BadRequest, OSError, EOFError) as exc:
                message = str(exc) if isinstance(exc, BadRequest) else "the request did not arrive in time"
                log.info("control socket: bad request (%s)", message)
                await asyncio.to_thread(_send, conn, {"error": message, "exit": 2})
                return
            answer = await self._answer(conn, req, fds)
            fds = []                          # the call closed them
            await asyncio.to_thread(_send, conn, answer)
        except OSError:
            pass                              # the caller went away: nothing to tell it
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _answer(self, conn: socket.socket, req: dict, fds: list[int]) -> dict:
        cmd, started = req["cmd"], time.monotonic()
        handler = COMMANDS.get(cmd)
        if handler is None or self.node is None:
            for fd in fds:
                os.close(fd)
            if handler is None:
                return {"error": f"unknown command {cmd[:40]!r}", "exit": 2}
            return {"error": "locked: unlock it in the web app" + (f" ({self.locked_hint})" if self.locked_hint
                                                                    else ""), "exit": 1}
        gone = False

        async def emit(progress: dict) -> None:
            nonlocal gone
            if not gone:
                try:
                    await asyncio.to_thread(_send, conn, {"progress": progress})
                except OSError:
                    gone = True               # the caller left (Ctrl-C): the node finishes the work anyway

        call = Call(self.node, req.get("args", {}), fds, emit=emit)
        try:
            answer = {"ok": jsonable(await handler(call))}
        except CabinetError as exc:
            answer = {"error": str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__,
                      "exit": exc.exit_code}
        except Exception as exc:              # a bug: its class in the log, one line for the caller
            log.error("control socket: internal error in %s: %s", cmd, exc.__class__.__name__)
            answer = {"error": f"internal error ({exc.__class__.__name__}); details in "
                               f"{self.folder / 'node.log'}", "exit": 70}
        finally:
            await asyncio.to_thread(call.cleanup)
        log.info("control %s %s %.0f ms", cmd, "ok" if "ok" in answer else "refused",
                 (time.monotonic() - started) * 1000)
        return answer


def _send(conn: socket.socket, obj: dict) -> None:
    conn.settimeout(WRITE_TIMEOUT)
    frame = wire.encode(obj)
    if len(frame) > wire.ANSWER_MAX:
        frame = wire.encode({"error": ANSWER_TOO_BIG, "exit": 1})
    conn.sendall(frame)


def _refuse(conn: socket.socket, obj: dict) -> None:
    """Answer without reading the request, then let the caller finish sending it (read and dropped,
    for a second at most, fds passed with it closed by the kernel): closed at once, the socket
    would fail the caller's send (EPIPE) before it reads why."""
    _send(conn, obj)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(1.0)
    deadline = time.monotonic() + 1.0
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline and conn.recv(1 << 16):
            pass


def _answer_and_close(conn: socket.socket, obj: dict) -> None:
    try:
        _send(conn, obj)
    except OSError:
        pass
    finally:
        conn.close()

