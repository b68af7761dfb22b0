"""The CLI's commands as thin clients of the running node (through its control socket).

`remote_for(fn)` gives, for a command function of cli.py or cli_accounts.py, the function that
runs it in the running node and prints the answer, or None. Those functions raise
control_client.NoNode when no node answers (cli.main then opens the folder as before).
Light: the standard library and the CLI's own printers only; never the facade.

`cabinet send` here: the CLI opens the letter and the attachments itself and passes the
descriptors; the node seals them, streams its progress (the bar is drawn from it on a terminal)
and answers with the delivery report. Ctrl-C leaves the node with the referral: it is kept and
delivered all the same, and the message says so.
"""

from __future__ import annotations

import getpass
import os
import sys
import time
from typing import Callable, TextIO

from . import control_client as cc
from .text import shown


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_delivery(d: dict) -> None:
    for rcpt, state in d["deliveries"].items():
        extra = f" ({d['errors'][rcpt]})" if rcpt in d["errors"] else ""
        print(f"  to {shown(d['names'].get(rcpt, rcpt))} ({rcpt}): {shown(state)}{shown(extra)}")


def _hhmm(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000))


def _generic(fn) -> Callable[[object], int]:
    cmd, request, show = fn.remote

    def run(a) -> int:
        sock = cc.connect(a.data)                 # NoNode before anything is opened or asked
        try:
            args, fds = request(a, True)
        except BaseException:
            sock.close()
            raise
        try:
            return show(a, cc.ask(a.data, cmd, args, fds=fds, sock=sock))
        finally:
            for fd in fds:
                os.close(fd)
    return run


# --- send and reply ------------------------------------------------------------------------------

class Bar:
    """`sending  42% [#####.....] 11.0 MB of 26.2 MB` on stderr, from the node's progress frames."""

    WIDTH = 30

    def __init__(self, draw: bool, out: TextIO = sys.stderr) -> None:
        self.show, self.out = draw, out
        self.record: str | None = None
        self.total, self.recipients = 0, 1
        self.sent: dict[str, int] = {}
        self.drawn = False

    def feed(self, p: dict) -> None:
        if "stored" in p:
            self.record, self.total, self.recipients = p["stored"], p["total"], max(1, p["recipients"])
            return
        if not self.show or not self.total:
            return
        if p["state"] == "sending":
            self.sent[p["recipient"]] = p["sent_bytes"]
        elif p["state"] == "delivered" and self.drawn:
            self.sent[p["recipient"]] = self.total
        else:
            return
        whole = self.total * self.recipients
        done = min(sum(self.sent.values()), whole)
        pct = 100 * done // whole if whole else 100
        filled = self.WIDTH * done // whole if whole else self.WIDTH
        self.out.write(f"\rsending {pct:3d}% [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                       f"{size(done)} of {size(whole)} ")
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.drawn = False
            self.out.write("\n")
            self.out.flush()


def _interrupted(a, bar: Bar, asked: bool) -> None:
    bar.close()
    if bar.record is not None:
        note = (f"record {bar.record} is kept in the outbox and the node will finish delivering it ('cabinet run', "
                f"or the node already running); 'cabinet outbox {bar.record[:10]}' shows where it is")
    elif asked:
        note = ("the running node has the referral: it keeps and delivers it unless it is a copy of one sent "
                "minutes ago; 'cabinet outbox' shows it")
    else:
        note = "the record was not stored yet: nothing was kept and nothing sent; run the same command again"
    print(f"cabinet: interrupted: {shown(note)}", file=sys.stderr, flush=True)
    a.interrupt_reported = True


def _sending(a, cmd: str, args: dict, label: str) -> int:
    bar = Bar(sys.stderr.isatty() and not a.no_deliver)
    asked = False
    try:
        fds = cc.open_files([a.letter], "letter") + cc.open_files(a.attachments, "attachment")
        try:
            sock = cc.connect(a.data)
            asked = True
            answer = cc.ask(a.data, cmd, args, fds=fds, sock=sock, on_progress=bar.feed)
        finally:
            for fd in fds:
                os.close(fd)
    except KeyboardInterrupt:
        _interrupted(a, bar, asked)
        raise
    finally:
        bar.close()
    if "earlier" in answer:
        return _again(a, cmd, args, label, answer["earlier"])
    print(f"{label} {answer['record_id']}")
    print_delivery(answer)
    return 0


def _again(a, cmd: str, args: dict, label: str, earlier: dict) -> int:
    who = " and ".join(shown(n) for n in earlier["recipients"])
    what = (f"the same referral was sent to {who} at {_hhmm(earlier['created'])} "
            f"(record {earlier['record_id'][:10]})")
    if not sys.stdin.isatty():
        raise cc.Failed(f"{what}; add --again to send a second copy", 2)
    answer = input(f"{what[0].upper()}{what[1:]}; send it again? [y/N] ")
    if answer.strip().lower() not in ("y", "yes", "o", "oui"):
        raise cc.Failed("not sent again", 2)
    return _sending(a, cmd, dict(args, again=True), label)


def send(a) -> int:
    data = ""
    if a.data_file:
        try:
            with open(a.data_file, encoding="utf-8") as f:
                data = f.read()
        except OSError as exc:
            raise cc.Failed(f"{exc.strerror}: {a.data_file}") from None
    args = {"to": a.to, "patient": a.patient, "born": a.born, "subject": a.subject, "letter": a.letter,
            "files": a.attachments, "data": data, "again": a.again, "no_deliver": a.no_deliver}
    return _sending(a, "send", args, "Record")


def reply(a) -> int:
    args = {"id": a.id, "subject": a.subject, "letter": a.letter, "files": a.attachments,
            "no_deliver": a.no_deliver}
    return _sending(a, "reply", args, "Reply")


# --- accounts and tokens (cli_accounts.py's commands) -------------------------------------------

def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _password() -> str:
    env = os.environ.get("CABINET_USER_PASSWORD")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise cc.Failed("no password: set CABINET_USER_PASSWORD or run in a terminal", 2)
    first = getpass.getpass("Password for the account: ")
    if getpass.getpass("Password again: ") != first:
        raise cc.Failed("the two passwords differ", 2)
    return first


def user_add(a) -> int:
    cc.connect(a.data).close()           # NoNode before the password is asked
    cc.ask(a.data, "user_add", {"name": a.name, "role": a.role, "password": _password()})
    print(f"Account {a.name} added ({a.role}).")
    return 0


def user_list(a) -> int:
    rows = cc.ask(a.data, "user_list", {})
    if not rows:
        print("No accounts yet: 'cabinet user add NAME --role practitioner' adds one.")
    for r in rows:
        print(f"{shown(r['name']):24}  {r['role']:12}  created {_when(r['created'])}  last sign-in "
              f"{_when(r['last_login'])}")
    return 0


def user_remove(a) -> int:
    cc.ask(a.data, "user_remove", {"name": a.name})
    print(f"Account {a.name} removed; its sessions are ended.")
    return 0


def token_add(a) -> int:
    scopes = a.scope.split(",")
    value = cc.ask(a.data, "token_add", {"name": a.name, "scopes": scopes})["value"]
    print(f"Token {a.name} ({','.join(sorted(set(s.strip() for s in scopes if s.strip())))}); shown this once, "
          "keep it like a password:", file=sys.stderr)
    print(value)
    return 0


def token_list(a) -> int:
    rows = cc.ask(a.data, "token_list", {})
    if not rows:
        print("No API tokens: 'cabinet token add NAME --scope send,read' makes one.")
    for r in rows:
        print(f"{shown(r['name']):24}  {r['scopes']:28}  created {_when(r['created'])}  last used "
              f"{_when(r['last_used'])}")
    return 0


def token_revoke(a) -> int:
    cc.ask(a.data, "token_revoke", {"name": a.name})
    print(f"Token {a.name} revoked: refused from now on.")
    return 0


def status(a) -> int:
    from . import cli_health
    try:
        h = cc.ask(a.data, "health", {"check_reach": not a.no_check})
    except cc.Failed as err:
        if not str(err).startswith("locked"):
            raise
        h = cli_health.locked(str(err))
    return cli_health.show_status(a, h)


def alerts(a) -> int:
    from . import cli_health
    return cli_health.show_alerts(a, cc.ask(a.data, "alerts", {"all": bool(a.all)}))


def alerts_ack(a) -> int:
    from . import cli_health
    return cli_health.show_ack(cc.ask(a.data, "alert_ack", {"id": a.id, "by": cli_health.acknowledger()}))


REMOTE: dict[str, Callable[[object], int]] = {
    "cmd_send": send, "cmd_reply": reply,          # cli.py adds cmd_contact_verify
    "cmd_user_add": user_add, "cmd_user_list": user_list, "cmd_user_remove": user_remove,
    "cmd_token_add": token_add, "cmd_token_list": token_list, "cmd_token_revoke": token_revoke,
    "cmd_status": status, "cmd_alerts": alerts, "cmd_alerts_ack": alerts_ack,
}


def remote_for(fn) -> Callable[[object], int] | None:
    if getattr(fn, "remote", None) is not None:
        return _generic(fn)
    if getattr(fn, "__module__", "").startswith("node.faces.cli"):
        return REMOTE.get(fn.__name__)
    return None
