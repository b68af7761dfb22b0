"""The `cabinet` command.

Every subcommand takes --data DIR (default: $CABINET_DATA, else ~/.cabinet)
and reads the passphrase from $CABINET_PASSPHRASE or a prompt. Bad input gets
one line on stderr that names the problem and a non-zero exit; never a
traceback. Unexpected failures are logged (without patient data) to
DIR/node.log and reported in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from . import cli_remote
from . import control_client as cc
from .cli_remote import print_delivery, size
from .text import shown

# Light on purpose: while `cabinet run` runs, the commands below are answered through its control
# socket (control_client.py) and only this module, argparse and the standard library are loaded.
# The facade (aiohttp, nacl, sqlite_utils) is imported only when the folder is opened here.
DEFAULT_WEB = "127.0.0.1:7480"


def default_data_dir() -> Path:
    env = os.environ.get("CABINET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cabinet"


# --- helpers -------------------------------------------------------------------

def when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def print_summaries(rows: list, header: str) -> None:
    if not rows:
        print(f"{header}: nothing yet")
        return
    print(f"{'ID':10}  {'date':16}  {'from':20}  {'patient':24}  {'subject':30}  files")
    for s in rows:
        total = sum(n for _, n in s.attachments)
        files = f"{len(s.attachments)} ({size(total)})" if s.attachments else "0"
        mark = "" if s.opened or s.direction == "out" else "*"
        print(f"{s.id[:10]:10}  {when(s.created):16}  {shown(s.sender_name)[:20]:20}  "
              f"{shown(s.patient + (' ' + s.born if s.born else ''))[:24]:24}  {(mark + shown(s.subject))[:30]:30}  {files}")
    if any(not s.opened and s.direction == "in" for s in rows):
        print("(* not opened yet)")
    if len(rows) >= 500:
        print("(the newest 500; --patient or --born searches them all)")


# --- commands ------------------------------------------------------------------
# A command that the running node can answer is three parts: its request (`_req_*`), the facade
# calls (control_commands.py, run by the node or by `control.run_local`), and its printer
# (`_show_*`), which prints the same from either.

def _ns(row: dict) -> SimpleNamespace:
    return SimpleNamespace(**row)


def _passphrase() -> str:
    from .prompt import passphrase
    return passphrase()


async def _local(a, cmd: str, args: dict):
    from . import control_commands
    return await control_commands.run_local(a.data, _passphrase(), cmd, args)


def _command(cmd: str, request, show):
    """cmd_X: open the folder here and run the command; `main` first tries the running node."""
    async def run(a) -> int:
        args, fds = request(a, False)
        return show(a, await _local(a, cmd, args))
    run.remote = (cmd, request, show)        # type: ignore[attr-defined]
    return run


def _plain(build):
    return lambda a, remote: (build(a), [])


async def cmd_init(a) -> int:
    from ..node import Node
    node_id = await Node.init(a.data, _passphrase_confirmed(), name=a.name, specialty=a.specialty, city=a.city,
                              rpps=a.rpps, listen=a.listen, advertise=a.advertise or (),
                              bootstraps=a.bootstrap or (), lan=not a.no_lan, relays=a.relay or ())
    print(f"Practice node created in {a.data}")
    print(f"Node ID: {node_id}")
    print("Next: 'cabinet run' to start it, 'cabinet id' to share your descriptor with colleagues.")
    return 0


def _passphrase_confirmed() -> str:
    from .prompt import passphrase
    return passphrase(confirm=True)


async def cmd_run(a) -> int:
    from .control_run import run
    return await run(a)


async def cmd_web_cert(a) -> int:
    from .web.cert import command
    return await command(a)


def _show_id(a, d: dict) -> int:
    if a.export:
        Path(a.export).write_text(d["text"] + "\n", encoding="utf-8")
        print(f"Descriptor written to {a.export}")
    print(f"Node ID: {d['node_id']}")
    print(f"Name:    {d['name']}  {d['specialty']}  {d['city']}".rstrip())
    print(f"Address: {', '.join(d['addresses']) or '(none advertised)'}")
    local = [u for u in d["addresses"] if _only_this_machine(u)]
    if local:
        print(f"WARNING: {', '.join(local)} can only be reached from this computer: colleagues elsewhere "
              "cannot use it. Run with --listen 0.0.0.0:PORT and --advertise https://YOUR-ADDRESS:PORT "
              "(or a bootstrap) before sharing this descriptor.", file=sys.stderr)
    if a.text or not a.export:
        print(d["text"])
    return 0


cmd_id = _command("id", _plain(lambda a: {}), _show_id)


def _only_this_machine(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _req_contact_add(a, remote: bool) -> tuple[dict, list]:
    args = {"source": a.source, "name": a.name, "expect_id": a.id}
    if remote and not a.source.startswith(("http://", "https://")) and os.path.isfile(a.source):
        # the caller's file is read here, as the caller: the node is handed its text, never a path
        with open(a.source, "rb") as f:
            args |= {"source": f.read(1 << 20).decode("utf-8", "surrogateescape"), "file": True}
    return args, []


def _show_contact_add(a, d: dict) -> int:
    c, status = d["contact"], d["status"]
    if status == "held":
        old = d["old"]
        print(f"WARNING: {shown(c['name'])} claims to be {shown(old['name'])} ({old['node_id']}), whom you already "
              f"know, but with ANOTHER IDENTITY KEY ({c['node_id']}).", file=sys.stderr)
        print(f"State: {c['state']}. This happens when a practice reinstalls its box, and when someone "
              "impersonates it. Nothing is sent to the new key until you check the safety code by phone and run:",
              file=sys.stderr)
        print(f"    cabinet contact confirm \"{shown(c['name'])}\"", file=sys.stderr)
        return 3
    if status == "revoked":
        print(f"cabinet: {shown(c['name'])} ({c['node_id']}): {c['state']}; ask them for their new node ID",
              file=sys.stderr)
        return 2
    hint = "" if c["verified"] else "; 'cabinet contact verify' compares the safety code"
    print(f"Contact {status}: {shown(c['name'])}  {c['node_id']}  ({c['state']}{hint})")
    return 0


cmd_contact_add = _command("contact_add", _req_contact_add, _show_contact_add)


def _show_contact_confirm(a, c: dict) -> int:
    print(f"{shown(c['name'])} ({c['node_id']}) confirmed: {c['state']}; what was held for it is "
          "delivered by 'cabinet run'.")
    return 0


cmd_contact_confirm = _command("contact_confirm", _plain(lambda a: {"name": a.name}), _show_contact_confirm)


def _show_directory_search(a, found: list) -> int:
    if not found:
        print("No practitioner found.")
    for d in found:
        rpps = f"  RPPS {shown(d['rpps'])}" if d["rpps"] else ""
        print(f"{shown(d['name'])[:28]:28}  {shown(d['specialty'])[:20]:20}  {shown(d['city'])[:16]:16}  "
              f"{d['node_id']}{rpps}")
        if d["conflict"]:
            what = " and ".join({"same-rpps": "the same RPPS number",
                                 "same-name-city": "the same name and city"}.get(c, c) for c in d["conflict"])
            print(f"  ! another identity claims {what}: compare the safety code before trusting either")
    return 0


cmd_directory_search = _command("directory_search", _plain(lambda a: {"query": " ".join(a.query)}),
                                _show_directory_search)


def _show_directory_lookup(a, d: dict) -> int:
    print(f"{shown(d['name'])}  {shown(d['specialty'])}  {shown(d['city'])}  {d['node_id']}  seq {d['seq']}")
    print("Addresses: " + (shown(", ".join(d["addresses"])) or "(none)"))
    if d["contact"] is not None:
        print(f"Contact:   {shown(d['contact']['name'])}, {d['contact']['state']}")
    if d["revoked"]:
        print(f"State:     {d['revoked_state']} (this descriptor says so: nothing can be sent to it)")
    return 0


cmd_directory_lookup = _command("directory_lookup", _plain(lambda a: {"node_id": a.node_id}),
                                _show_directory_lookup)


async def cmd_directory_announce(a) -> int:
    from ..node import Node
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        if a.bootstrap:
            node.use_bootstraps(a.bootstrap)
        results = await node.announce()
        ok = sum(r == "ok" for r in results.values())
        print(f"Descriptor (seq {node.descriptor.seq}) accepted by {ok} of {len(results)} bootstrap(s)")
        for url, r in results.items():
            if r != "ok":
                print(f"cabinet: {shown(url)}: {shown(r)}", file=sys.stderr)
        return 0 if ok else 1


def _show_peers(a, d: dict) -> int:
    if not d["peers"]:
        print(f"No cabinet node answered on the LAN in {a.wait:g} s.")
    for h in d["peers"]:
        state = "verified" if h["verified"] else "NOT verified (impostor, or not answering)"
        known = f"  [contact: {d['names'][h['node_id']]}]" if h["node_id"] in d["names"] else ""
        print(f"{shown(h['name'])[:24]:24}  {h['node_id']}  {h['url']:26}  {state}{known}")
    return 0


cmd_peers = _command("peers", _plain(lambda a: {"wait": a.wait}), _show_peers)


async def cmd_keys_rotate(a) -> int:
    from ..node import Node
    secret = _passphrase()
    async with Node.open(a.data, passphrase=secret) as node:
        desc, told = await node.rotate_keys(secret)
        how = ("the running node uses it now and tells your contacts" if told < 0
               else f"{told} contact(s) told directly")
        print(f"New encryption key in descriptor seq {desc.seq}; {how}; old keys are kept "
              "to open what was sent to them.")
    return 0


async def cmd_keys_revoke(a) -> int:
    from ..node import Node, UsageError
    if not a.yes:
        raise UsageError("revoking is final: this node ID will never be usable again. Add --yes to confirm")
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        desc = await node.revoke_keys()
        print(f"Keys of {node.node_id} revoked (descriptor seq {desc.seq}). Contacts and bootstraps that receive "
              "it refuse this node from now on; set up a new node and share its ID.")
    return 0


def _show_contact_list(a, rows: list) -> int:
    if not rows:
        print("No contacts yet: 'cabinet contact add' adds one.")
    for c in rows:
        print(f"{shown(c['name']):24}  {c['node_id']}  {shown(c['specialty'] or '-')}, {shown(c['city'] or '-')}  "
              f"{c['state']}")
    return 0


cmd_contact_list = _command("contact_list", _plain(lambda a: {}), _show_contact_list)


def contact_verify_flow(a, code: dict, mark) -> int:
    """Show the safety code (and the QR code), ask, then `mark()` the contact verified."""
    import segno
    c = code["contact"]
    qr = segno.make(code["descriptor"], error="m")
    if a.png:
        qr.save(a.png, scale=6, border=4)
        print(f"QR code of this node's descriptor written to {a.png}")
    elif sys.stdout.isatty() or a.qr:
        # The whole descriptor makes a QR code too wide for a terminal; the node ID fits in 37
        # columns and is all 'cabinet contact add' needs (the PNG holds the whole descriptor).
        print("This node's ID, for your colleague to scan ('cabinet contact add ID'):")
        segno.make(code["node_id"], error="m").terminal(compact=True, border=2)
    print(f"Safety code with {shown(c['name'])} ({c['node_id']}):\n\n    {code['code']}\n")
    print("Compare it with the code on your colleague's screen (by phone or in person).")
    if not a.yes:
        if not sys.stdin.isatty():
            raise cc.Failed("confirm with --yes once the codes match (no terminal to ask)", 2)
        if input("Do the codes match? [y/N] ").strip().lower() not in ("y", "yes", "o", "oui"):
            print("Not marked verified.")
            return 1
    mark()
    print(f"{shown(c['name'])} is now verified.")
    return 0


async def cmd_contact_verify(a) -> int:
    from . import control_commands as cmds
    from ..node import Node, UsageError
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        code = cmds.jsonable(await cmds.COMMANDS["contact_code"](cmds.Call(node, {"name": a.name}, local=True)))
        marks: list[bool] = []
        try:
            result = contact_verify_flow(a, code, lambda: marks.append(True))
        except cc.Failed as exc:
            raise UsageError(str(exc)) from None
        if marks:
            await node.verify_contact(a.name)
        return result


def _remote_contact_verify(a) -> int:
    code = cc.ask(a.data, "contact_code", {"name": a.name})
    return contact_verify_flow(a, code, lambda: cc.ask(a.data, "contact_verify", {"name": a.name}))


async def _delivery_report(node, result) -> None:
    names = {c["node_id"]: c["name"] for c in await node.contacts()}
    print_delivery({"deliveries": result.deliveries, "errors": result.errors, "names": names})


async def cmd_send(a) -> int:
    from . import sending
    from ..node import Node, RecordStored, now_ms
    import asyncio
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        data = Path(a.data_file).read_text("utf-8") if a.data_file else ""
        letter = Path(a.letter)
        if not a.again:
            await sending.check_resend(node, a.to, patient=a.patient, born=a.born, letter=letter,
                                       attachments=a.attachments)
        bar = sending.ProgressBar(node) if sys.stderr.isatty() and not a.no_deliver else None
        with node.subscribe(RecordStored) as stored:
            started = now_ms()
            try:
                result = await node.send_referral(to=a.to, patient=a.patient, born=a.born, subject=a.subject,
                                                  letter=letter, attachments=a.attachments, data=data,
                                                  deliver=not a.no_deliver)
            except asyncio.CancelledError:              # Ctrl-C: say at once what became of the record
                note = await sending.after_interrupt(node, stored, started)
                if bar is not None:
                    bar.close()
                print(f"cabinet: interrupted: {shown(note)}", file=sys.stderr, flush=True)
                a.interrupt_reported = True
                raise
            finally:
                if bar is not None:
                    bar.close()
        print(f"Record {result.record_id}")
        await _delivery_report(node, result)
    return 0


async def cmd_reply(a) -> int:
    from ..node import Node
    async with Node.open(a.data, passphrase=_passphrase()) as node:
        result = await node.reply(a.id, letter=Path(a.letter), attachments=a.attachments, subject=a.subject,
                                  deliver=not a.no_deliver)
        print(f"Reply {result.record_id}")
        await _delivery_report(node, result)
    return 0


def delivery_state(d: dict, now_ms: int) -> str:
    """One outbox line's status, as a practitioner reads it."""
    if d["state"] == "delivered":
        text = f"delivered {when(d['delivered'])}"
        return text + (f", opened {when(d['opened'])}" if d["opened"] else ", not opened yet")
    if d["state"] == "refused":
        return f"refused by the recipient {when(d.get('refused'))}: {d['last_error'] or 'no reason given'} (not sent again)"
    if d["state"] == "sending" and d["body_size"]:
        pct = 100 * d["sent_bytes"] // d["body_size"]
        text = f"sending {pct}% ({size(d['sent_bytes'])} of {size(d['body_size'])})"
    else:
        text = f"queued, {d['attempts']} attempt(s)"
    if d["attempts"]:
        text += f", next try {when(d['next_try'])}"
    if d["last_error"]:
        text += f": {d['last_error']}"
    days = (now_ms - d["created"]) // 86_400_000
    if d["stale"]:
        text += f"  [NOT DELIVERED FOR {days} DAYS: is the colleague's node running?]"
    return text


def _show_outbox(a, data: dict) -> int:
    rows, lost, states, names = data["rows"], data["lost"], data["states"], data["names"]
    trusted = set(data["trusted"])           # deliverable contact states
    if not rows and not lost:
        print("Outbox: nothing sent yet")
    now = int(time.time() * 1000)
    for d in rows:
        name = d["recipient_name"] or d["recipient"]
        line = delivery_state(d, now)
        state = states.get(d["recipient"], "")
        if d["state"] != "delivered" and state and state not in trusted and state not in line:
            line += f"  [contact {state}]"
        print(f"{d['record_id'][:10]}  {when(d['created'])}  to {shown(name)[:24]:24}  {shown(line)}")
    for g in lost:            # after a restore: what the lost box sent, as the colleagues' acks tell
        print(f"sent after the last backup: not in this copy ({g['count']} record{'s' * (g['count'] != 1)} "
              f"to {shown(names.get(g['recipient'], g['recipient']))}, backup of {when(g['backup_at'])})")
    return 0


cmd_outbox = _command("outbox", _plain(lambda a: {"id": a.id}), _show_outbox)


def _show_inbox(a, rows: list) -> int:
    print_summaries([_ns(r) for r in rows], "Inbox")
    return 0


cmd_inbox = _command("inbox", _plain(lambda a: {"patient": a.patient, "born": a.born, "all": a.all}), _show_inbox)


def _show_record(a, d: dict) -> int:
    s = _ns(d["summary"])
    print(f"Record   {s.id}  ({s.kind}, {'received' if s.direction == 'in' else 'sent'})")
    print(f"From     {shown(s.sender_name)} ({s.sender})")
    print(f"Date     {when(s.created)}")
    if d["provenance"] is not None:
        print(f"Origin   {shown(d['provenance'])}")
    print(f"Patient  {shown(d['patient'])}" + (f", born {shown(d['born'])}" if d["born"] else ""))
    print(f"Subject  {shown(d['subject'])}")
    if s.reply_to:
        print(f"Reply to {s.reply_to}")
    for name, n in s.attachments:
        print(f"Attached {shown(name)} ({size(n)})")
    print()
    print(shown(d["letter"], lines=True))
    if d["data"]:
        print("\nStructured data:\n" + shown(d["data"], lines=True))
    if len(d["thread"]) > 1:
        print("\nThread:")
        for t in map(_ns, d["thread"]):
            print(f"  {t.id[:10]}  {when(t.created)}  {t.kind:8}  {shown(t.sender_name):20}  {shown(t.subject)}")
    return 0


cmd_show = _command("show", _plain(lambda a: {"id": a.id}), _show_record)


def _show_thread(a, rows: list) -> int:
    print_summaries([_ns(r) for r in rows], "Thread")
    return 0


cmd_thread = _command("thread", _plain(lambda a: {"id": a.id}), _show_thread)


def _req_export(a, remote: bool) -> tuple[dict, list]:
    return {"id": a.id, "dir": a.dir}, ([cc.open_folder(a.dir)] if remote else [])


def _show_export(a, names: list) -> int:
    for name in names:
        print(shown(Path(a.dir).expanduser() / name))
    if not names:
        print("This record has no attachments.")
    return 0


cmd_export = _command("export", _req_export, _show_export)


def _show_audit(a, d: dict) -> int:
    if not d["ok"]:
        print(f"audit log: BROKEN at entry {d['bad']}", file=sys.stderr)
        return 3
    print("audit log: intact")
    return 0


cmd_audit_verify = _command("audit_verify", _plain(lambda a: {}), _show_audit)


# --- parser --------------------------------------------------------------------

def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The whole parser; `full=False` leaves out the commands of the other modules (cli_patient,
    cli_accounts, cli_box), whose import loads the facade: `main` uses it for this module's commands."""
    # --data and -v work before the command (cabinet --data DIR inbox) and after it (cabinet inbox --data DIR).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, default=argparse.SUPPRESS,
                        help="data folder (default: $CABINET_DATA or ~/.cabinet)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log to stderr too")
    p = argparse.ArgumentParser(prog="cabinet", description="End-to-end encrypted referrals between practices.")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $CABINET_DATA or ~/.cabinet)")
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr too")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_, parent=sub):
        sp = parent.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("init", cmd_init, "create a practice node")
    sp.add_argument("--name", required=True, help="practitioner's display name, e.g. 'Dr Anne Martin'")
    sp.add_argument("--specialty", default="")
    sp.add_argument("--city", default="")
    sp.add_argument("--rpps", default="", help="RPPS number (optional)")
    sp.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:7400)")
    sp.add_argument("--advertise", action="append", help="address colleagues reach this node at (repeatable)")
    sp.add_argument("--bootstrap", action="append", metavar="URL", help="a directory server to announce to (repeatable)")
    sp.add_argument("--no-lan", action="store_true", help="never announce this node on the LAN (mDNS)")
    sp.add_argument("--relay", action="append", metavar="URL",
                    help="a blind relay to be reached through, relay+tcp://HOST:PORT (repeatable)")
    sp = add("run", cmd_run, "run the node until Ctrl-C or SIGTERM")
    sp.add_argument("--listen", help="HOST:PORT (default: as configured, 127.0.0.1:7400)")
    sp.add_argument("--no-listen", action="store_true",
                    help="accept no connections (behind a router): push what is sent, pull what is waiting")
    sp.add_argument("--bootstrap", action="append", metavar="URL", help="add a directory server (kept in the config)")
    sp.add_argument("--no-lan", action="store_true", help="this time, neither announce nor browse on the LAN")
    sp.add_argument("--no-port-mapping", action="store_true",
                    help="do not ask the router to open the port (NAT-PMP / PCP)")
    sp.add_argument("--advertise", action="append", metavar="URL",
                    help="address colleagues reach this node at, e.g. with --listen 0.0.0.0:7400 (kept in the config)")
    sp.add_argument("--pull-every", type=float, default=None, metavar="SECONDS",
                    help="how often to ask colleagues for records waiting for us (default 30)")
    sp.add_argument("--relay", action="append", metavar="URL",
                    help="a blind relay to be reached through when nothing else works, relay+tcp://HOST:PORT "
                         "(repeatable, kept in the config)")
    sp.add_argument("--web", metavar="HOST:PORT", help=f"where the web app and local API listen (default {DEFAULT_WEB}; "
                                                      "beyond this computer over TLS: the node's own certificate, or --web-cert/--web-key)")
    sp.add_argument("--web-lock-minutes", type=float, metavar="N",
                    help="lock the web page after N minutes without activity (0: never; default 5)")
    sp.add_argument("--web-cert", metavar="FILE", help="TLS certificate (PEM) for the web app")
    sp.add_argument("--web-key", metavar="FILE", help="its private key (PEM)")
    sp.add_argument("--no-web", action="store_true", help="do not serve the web app and local API")
    sp.add_argument("--locked", action="store_true",
                    help="start locked: the passphrase is asked once, in the web app (also the default with "
                         "no $CABINET_PASSPHRASE and no terminal)")
    sp = add("web-cert", cmd_web_cert, "the web app's own TLS certificate: fingerprint, validity, names")
    sp.add_argument("--renew", action="store_true", help="make a new key and certificate now (asks the passphrase)")
    sp.add_argument("--web", metavar="HOST:PORT", help="with --renew: where 'cabinet run --web' listens (default: as before)")
    sp.add_argument("--export", metavar="FILE",
                    help="write the certificate (never its key) to FILE, to install as trusted on the practice's PCs")
    sp = add("id", cmd_id, "print the node ID and the signed descriptor")
    sp.add_argument("--export", metavar="FILE", help="write the descriptor to FILE")
    sp.add_argument("--text", action="store_true", help="print the descriptor text even with --export")

    contact = sub.add_parser("contact", help="colleagues: add, list, verify").add_subparsers(
        dest="contact_command", required=True, metavar="ACTION")
    sp = add("add", cmd_contact_add, "add a colleague from a node ID, a descriptor file or text, or http://address",
             contact)
    sp.add_argument("source", help="node ID (looked up on the LAN and the bootstraps), descriptor file or text, "
                                   "or http://host:port")
    sp.add_argument("--id", help="the node ID you expect (required with http://)")
    sp.add_argument("--name", help="local name for this contact (default: their display name)")
    add("list", cmd_contact_list, "list contacts", contact)
    sp = add("verify", cmd_contact_verify, "show the safety code and mark the contact verified", contact)
    sp.add_argument("name")
    sp.add_argument("--yes", action="store_true", help="the codes match: mark verified without asking")
    sp.add_argument("--png", metavar="FILE", help="write the QR code of this node's descriptor as a PNG")
    sp.add_argument("--qr", action="store_true", help="print the QR code even when not on a terminal")
    sp = add("confirm", cmd_contact_confirm, "accept a known colleague's new identity key (after checking it)",
             contact)
    sp.add_argument("name")

    directory = sub.add_parser("directory", help="the practitioner directory on the bootstrap servers").add_subparsers(
        dest="directory_command", required=True, metavar="ACTION")
    sp = add("search", cmd_directory_search, "search practitioners by name, specialty, city or RPPS", directory)
    sp.add_argument("query", nargs="+")
    sp = add("lookup", cmd_directory_lookup, "find a node by its ID (LAN, bootstraps, last address)", directory)
    sp.add_argument("node_id")
    sp = add("announce", cmd_directory_announce, "publish this node's descriptor now", directory)
    sp.add_argument("--bootstrap", action="append", metavar="URL", help="add a directory server first")

    sp = add("peers", cmd_peers, "cabinet nodes announcing themselves on this LAN (mDNS)")
    sp.add_argument("--wait", type=float, default=3.0, metavar="SECONDS", help="how long to listen (default 3)")

    keys = sub.add_parser("keys", help="key rotation and revocation").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION")
    add("rotate", cmd_keys_rotate, "replace the encryption key (the node ID stays)", keys)
    sp = add("revoke", cmd_keys_revoke, "revoke this node's keys for good (a stolen box)", keys)
    sp.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")

    for name, fn, help_ in (("send", cmd_send, "seal and send a referral"),
                            ("reply", cmd_reply, "send the report back in the same thread")):
        sp = add(name, fn, help_)
        if name == "send":
            sp.add_argument("--to", action="append", required=True, help="contact name or node ID (repeatable)")
            sp.add_argument("--patient", required=True)
            sp.add_argument("--born", default="", help="date of birth, YYYY-MM-DD")
            sp.add_argument("--subject", default="")
            sp.add_argument("--data-file", help="structured data (e.g. a FHIR resource as JSON) to include")
        else:
            sp.add_argument("id", help="the record being answered")
            sp.add_argument("--subject", default=None)
        sp.add_argument("--letter", required=True, help="the letter: a text file, or a PDF or Word file (sent as the first attachment)")
        sp.add_argument("--no-deliver", action="store_true", help="only queue it; 'cabinet run' delivers")
        if name == "send":
            sp.add_argument("--again", action="store_true",
                            help="send even though the same referral was sent in the last 10 minutes")
        sp.add_argument("attachments", nargs="*", metavar="ATTACHMENT")

    sp = add("outbox", cmd_outbox, "what was sent, per recipient: queued, delivered")
    sp.add_argument("id", nargs="?")
    sp = add("inbox", cmd_inbox, "received records")
    sp.add_argument("--patient", help="only this patient: any words of the name, in any order, case or accents")
    sp.add_argument("--born", help="only patients born on this date (YYYY-MM-DD)")
    sp.add_argument("--all", action="store_true", help="sent records too")
    sp = add("show", cmd_show, "print a record's letter and details")
    sp.add_argument("id")
    sp = add("thread", cmd_thread, "the records of one referral's thread")
    sp.add_argument("id")
    sp = add("export", cmd_export, "write a record's attachments into a folder")
    sp.add_argument("id")
    sp.add_argument("dir")
    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="audit_command", required=True,
                                                                         metavar="ACTION")
    add("verify", cmd_audit_verify, "check the audit log's hash chain", audit)
    if full:                              # these modules load the facade: only when their commands are used
        from . import cli_accounts, cli_box, cli_health, cli_patient, cli_service
        cli_patient.register(sub, add, audit)
        cli_accounts.register(sub, add)
        cli_box.register(sub, add, keys)
        cli_service.register(sub, add)
        cli_health.register(sub, add)
    return p


OWN = {"init", "run", "web-cert", "id", "contact", "directory", "peers", "send", "reply", "outbox", "inbox", "show",
       "thread", "export"}                   # audit and keys have subcommands elsewhere too: full parser


def _command_word(argv: list[str]) -> str | None:
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--data":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    light = _command_word(argv) in OWN and not {"-h", "--help"} & set(argv)
    args = build_parser(full=not light).parse_args(argv)
    args.data = (args.data or default_data_dir()).expanduser()
    remote = cli_remote.remote_for(args.fn) if args.fn is not cmd_run else None
    if remote is not None and os.environ.get("CABINET_NO_SOCKET") != "1":
        try:
            return remote(args)
        except cc.NoNode:
            pass                                  # no node running: open the folder here, as always
        except cc.Failed as err:
            print(f"cabinet: {shown(err)}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            if not getattr(args, "interrupt_reported", False):
                print("cabinet: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return _main_here(args)


def _main_here(args) -> int:
    """The command run in this process, the folder opened here (the passphrase asked, the key derived)."""
    import asyncio
    import logging
    from ..node import CabinetError, setup_logging
    log = logging.getLogger("cabinet.cli")
    try:
        setup_logging(args.data, args.verbose or args.fn is cmd_run)
        return asyncio.run(args.fn(args))
    except CabinetError as err:
        print(f"cabinet: {shown(err)}", file=sys.stderr)
        return err.exit_code
    except cc.Failed as err:
        print(f"cabinet: {shown(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if not getattr(args, "interrupt_reported", False):
            print("cabinet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `cabinet inbox | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"cabinet: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 1
    except Exception as err:  # a bug: one line for the user, the traceback in the log
        log.exception("internal error")
        print(f"cabinet: internal error ({err.__class__.__name__}); details in {args.data / 'node.log'}",
              file=sys.stderr)
        return 70


cli_remote.REMOTE["cmd_contact_verify"] = _remote_contact_verify


if __name__ == "__main__":
    sys.exit(main())
