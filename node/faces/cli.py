"""The `cabinet` command.

Every subcommand takes --data DIR (default: $CABINET_DATA, else ~/.cabinet)
and reads the passphrase from $CABINET_PASSPHRASE or a prompt. Bad input gets
one line on stderr that names the problem and a non-zero exit; never a
traceback. Unexpected failures are logged (without patient data) to
DIR/node.log and reported in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import segno

from . import cli_accounts, cli_box, cli_patient, sending
from .web.server import PortInUse, start_web
from .prompt import passphrase
from .text import shown
from ..node import (CabinetError, Descriptor, Node, RecordStored, Summary, UsageError, contact_state,
                    default_data_dir, now_ms, parse_listen, setup_logging, valid_address)

log = logging.getLogger("cabinet.cli")
DEFAULT_WEB = "127.0.0.1:7480"


# --- helpers -------------------------------------------------------------------

def _url(text: str) -> str:
    if not valid_address(text):
        raise UsageError(f"not an address: {text!r} (expected http://host:port)")
    return text.rstrip("/")


def when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summaries(rows: list[Summary], header: str) -> None:
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


# --- commands ------------------------------------------------------------------

async def cmd_init(a) -> int:
    node_id = await Node.init(a.data, passphrase(confirm=True), name=a.name, specialty=a.specialty, city=a.city,
                              rpps=a.rpps, listen=a.listen, advertise=a.advertise or (),
                              bootstraps=a.bootstrap or (), lan=not a.no_lan, relays=a.relay or ())
    print(f"Practice node created in {a.data}")
    print(f"Node ID: {node_id}")
    print("Next: 'cabinet run' to start it, 'cabinet id' to share your descriptor with colleagues.")
    return 0


async def cmd_run(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        if a.bootstrap:
            node.use_bootstraps(a.bootstrap)
        if a.no_lan:
            node.config.lan = False
        if a.advertise:
            node.config.advertise = [_url(u) for u in a.advertise]
            node.config.save(node.folder)
        if a.relay:
            node.use_relays(a.relay)
        host, port = await node.serve(a.listen, accept=not a.no_listen, pull_interval=a.pull_every)
        where = f"listening on https://{host}:{port}" if port else "not listening (delivering and pulling only)"
        print(f"cabinet node {node.node_id} ({node.config.name}) {where}", flush=True)
        web = None if a.no_web else await _start_web(node, a)
        if web is not None:
            print(f"web app and local API on {web.url}  ('cabinet user add NAME' makes an account)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping...", flush=True)
        if web is not None:
            await web.close()
    print("stopped", flush=True)
    return 0


async def _start_web(node: Node, a):
    """The web app on --web HOST:PORT (default 127.0.0.1:7480); if the default port is taken (a second
    node on this computer), any free port, said so."""
    host, port = parse_listen(a.web or DEFAULT_WEB)
    tls = (a.web_cert, a.web_key) if a.web_cert or a.web_key else None
    if tls is not None and not (a.web_cert and a.web_key):
        raise UsageError("give both --web-cert FILE and --web-key FILE")
    try:
        return await start_web(node, host, port, tls=tls)
    except PortInUse:
        if a.web:
            raise
        web = await start_web(node, host, 0, tls=tls)
        print(f"note: {DEFAULT_WEB} is taken (another node on this computer?); web app on port {web.port}",
              file=sys.stderr, flush=True)
        return web


async def cmd_id(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        text = node.descriptor.to_text()
        if a.export:
            Path(a.export).write_text(text + "\n", encoding="utf-8")
            print(f"Descriptor written to {a.export}")
        print(f"Node ID: {node.node_id}")
        print(f"Name:    {node.config.name}  {node.config.specialty}  {node.config.city}".rstrip())
        addrs = ", ".join(node.descriptor.addresses) or "(none advertised)"
        print(f"Address: {addrs}")
        local = [u for u in node.descriptor.addresses if _only_this_machine(u)]
        if local:
            print(f"WARNING: {', '.join(local)} can only be reached from this computer: colleagues elsewhere "
                  "cannot use it. Run with --listen 0.0.0.0:PORT and --advertise https://YOUR-ADDRESS:PORT "
                  "(or a bootstrap) before sharing this descriptor.", file=sys.stderr)
        if a.text or not a.export:
            print(text)
    return 0


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


async def cmd_contact_add(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        c, status = await node.add_contact(a.source, name=a.name, expect_id=a.id)
        if status == "held":
            old = await node.contact(c["replaces"])
            print(f"WARNING: {shown(c['name'])} claims to be {shown(old['name'])} ({old['node_id']}), whom you already know, "
                  f"but with ANOTHER IDENTITY KEY ({c['node_id']}).", file=sys.stderr)
            print(f"State: {contact_state(c)}. This happens when a practice reinstalls its box, and when someone "
                  "impersonates it. Nothing is sent to the new key until you check the safety code by phone and run:",
                  file=sys.stderr)
            print(f"    cabinet contact confirm \"{shown(c['name'])}\"", file=sys.stderr)
            return 3
        if status == "revoked":
            raise UsageError(f"{shown(c['name'])} ({c['node_id']}): {contact_state(c)}; ask them for their new node ID")
        state = contact_state(c)
        hint = "" if c["verified"] else "; 'cabinet contact verify' compares the safety code"
        print(f"Contact {status}: {shown(c['name'])}  {c['node_id']}  ({state}{hint})")
    return 0


async def cmd_contact_confirm(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        c = await node.confirm_contact(a.name)
        print(f"{shown(c['name'])} ({c['node_id']}) confirmed: {contact_state(c)}; what was held for it is "
              "delivered by 'cabinet run'.")
    return 0


async def cmd_directory_search(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        found = await node.directory_search(" ".join(a.query))
        if not found:
            print("No practitioner found.")
        for f in found:
            d = f.descriptor
            rpps = f"  RPPS {shown(d.rpps)}" if d.rpps else ""
            print(f"{shown(d.name)[:28]:28}  {shown(d.specialty)[:20]:20}  {shown(d.city)[:16]:16}  {d.node_id}{rpps}")
            if f.conflict:
                what = " and ".join({"same-rpps": "the same RPPS number",
                                     "same-name-city": "the same name and city"}.get(c, c) for c in f.conflict)
                print(f"  ! another identity claims {what}: compare the safety code before trusting either")
    return 0


async def cmd_directory_lookup(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        d = await node.directory_lookup(a.node_id)
        known = {c["node_id"]: c for c in await node.contacts()}.get(d.node_id)
        print(f"{shown(d.name)}  {shown(d.specialty)}  {shown(d.city)}  {d.node_id}  seq {d.seq}")
        print("Addresses: " + (shown(", ".join(d.addresses)) or "(none)"))
        if known is not None:
            print(f"Contact:   {shown(known['name'])}, {contact_state(known)}")
        if d.revoked:
            state = contact_state({"revoked": 1, "held": 0, "verified": 0, "descriptor": d.signed})
            print(f"State:     {state} (this descriptor says so: nothing can be sent to it)")
    return 0


async def cmd_directory_announce(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        if a.bootstrap:
            node.use_bootstraps(a.bootstrap)
        results = await node.announce()
        ok = sum(r == "ok" for r in results.values())
        print(f"Descriptor (seq {node.descriptor.seq}) accepted by {ok} of {len(results)} bootstrap(s)")
        for url, r in results.items():
            if r != "ok":
                print(f"cabinet: {shown(url)}: {shown(r)}", file=sys.stderr)
        return 0 if ok else 1


async def cmd_peers(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        hints = await node.lan_peers(a.wait)
        names = {c["node_id"]: c["name"] for c in await node.contacts()}
    if not hints:
        print(f"No cabinet node answered on the LAN in {a.wait:g} s.")
    for h in hints:
        state = "verified" if h.verified else "NOT verified (impostor, or not answering)"
        known = f"  [contact: {names[h.node_id]}]" if h.node_id in names else ""
        print(f"{shown(h.name)[:24]:24}  {h.node_id}  {h.url:26}  {state}{known}")
    return 0


async def cmd_keys_rotate(a) -> int:
    secret = passphrase()
    async with Node.open(a.data, passphrase=secret) as node:
        desc, told = await node.rotate_keys(secret)
        how = ("the running node uses it now and tells your contacts" if told < 0
               else f"{told} contact(s) told directly")
        print(f"New encryption key in descriptor seq {desc.seq}; {how}; old keys are kept "
              "to open what was sent to them.")
    return 0


async def cmd_keys_revoke(a) -> int:
    if not a.yes:
        raise UsageError("revoking is final: this node ID will never be usable again. Add --yes to confirm")
    async with Node.open(a.data, passphrase=passphrase()) as node:
        desc = await node.revoke_keys()
        print(f"Keys of {node.node_id} revoked (descriptor seq {desc.seq}). Contacts and bootstraps that receive "
              "it refuse this node from now on; set up a new node and share its ID.")
    return 0


async def cmd_contact_list(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.contacts()
        if not rows:
            print("No contacts yet: 'cabinet contact add' adds one.")
        for c in rows:
            d = Descriptor.from_wire(c["descriptor"])
            state = contact_state(c)
            print(f"{shown(c['name']):24}  {c['node_id']}  {shown(d.specialty or '-')}, {shown(d.city or '-')}  {state}")
    return 0


async def cmd_contact_verify(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        c, code = await node.safety_code(a.name)
        qr = segno.make(node.descriptor.to_text(), error="m")
        if a.png:
            qr.save(a.png, scale=6, border=4)
            print(f"QR code of this node's descriptor written to {a.png}")
        elif sys.stdout.isatty() or a.qr:
            # The whole descriptor makes a QR code too wide for a terminal; the node ID fits in 37
            # columns and is all 'cabinet contact add' needs (the PNG holds the whole descriptor).
            print("This node's ID, for your colleague to scan ('cabinet contact add ID'):")
            segno.make(node.node_id, error="m").terminal(compact=True, border=2)
        print(f"Safety code with {shown(c['name'])} ({c['node_id']}):\n\n    {code}\n")
        print("Compare it with the code on your colleague's screen (by phone or in person).")
        if not a.yes:
            if not sys.stdin.isatty():
                raise UsageError("confirm with --yes once the codes match (no terminal to ask)")
            if input("Do the codes match? [y/N] ").strip().lower() not in ("y", "yes", "o", "oui"):
                print("Not marked verified.")
                return 1
        await node.verify_contact(a.name)
        print(f"{shown(c['name'])} is now verified.")
    return 0


async def _delivery_report(node: Node, result) -> None:
    names = {c["node_id"]: c["name"] for c in await node.contacts()}
    for rcpt, state in result.deliveries.items():
        extra = f" ({result.errors[rcpt]})" if rcpt in result.errors else ""
        print(f"  to {shown(names.get(rcpt, rcpt))} ({rcpt}): {shown(state)}{shown(extra)}")


async def cmd_send(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
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
    async with Node.open(a.data, passphrase=passphrase()) as node:
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


_TRUSTED = {contact_state({"revoked": 0, "held": 0, "verified": v}) for v in (0, 1)}   # deliverable states


async def cmd_outbox(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.outbox(a.id)
        lost = [] if a.id else await node.sent_after_backup()
        if not rows and not lost:
            print("Outbox: nothing sent yet")
        now = int(time.time() * 1000)
        contacts = await node.contacts()
        states = {c["node_id"]: contact_state(c) for c in contacts}
        for d in rows:
            name = d["recipient_name"] or d["recipient"]
            line = delivery_state(d, now)
            state = states.get(d["recipient"], "")
            if d["state"] != "delivered" and state and state not in _TRUSTED and state not in line:
                line += f"  [contact {state}]"
            print(f"{d['record_id'][:10]}  {when(d['created'])}  to {shown(name)[:24]:24}  {shown(line)}")
        names = {c["node_id"]: c["name"] for c in contacts}
        for g in lost:            # after a restore: what the lost box sent, as the colleagues' acks tell
            print(f"sent after the last backup: not in this copy ({g['count']} record{'s' * (g['count'] != 1)} "
                  f"to {shown(names.get(g['recipient'], g['recipient']))}, backup of {when(g['backup_at'])})")
    return 0


async def cmd_inbox(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.list_records(None if a.all else "in", patient=a.patient, born=a.born or "")
        print_summaries(rows, "Inbox")
    return 0


async def cmd_show(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        view = await node.read(a.id)
        s, m = view.summary, view.manifest
        print(f"Record   {s.id}  ({s.kind}, {'received' if s.direction == 'in' else 'sent'})")
        print(f"From     {shown(s.sender_name)} ({s.sender})")
        print(f"Date     {when(s.created)}")
        if view.provenance is not None:
            print(f"Origin   {shown(view.provenance.describe(when))}")
        print(f"Patient  {shown(m.patient)}" + (f", born {shown(m.born)}" if m.born else ""))
        print(f"Subject  {shown(m.subject)}")
        if s.reply_to:
            print(f"Reply to {s.reply_to}")
        for name, n in s.attachments:
            print(f"Attached {shown(name)} ({size(n)})")
        print()
        print(shown(m.letter, lines=True))
        if m.data:
            print("\nStructured data:\n" + shown(m.data, lines=True))
        thread = await node.thread(s.id)
        if len(thread) > 1:
            print("\nThread:")
            for t in thread:
                print(f"  {t.id[:10]}  {when(t.created)}  {t.kind:8}  {shown(t.sender_name):20}  {shown(t.subject)}")
    return 0


async def cmd_thread(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        print_summaries(await node.thread(a.id), "Thread")
    return 0


async def cmd_export(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        written = await node.export(a.id, a.dir)
        for p in written:
            print(shown(p))
        if not written:
            print("This record has no attachments.")
    return 0


async def cmd_audit_verify(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        ok, bad = await node.audit_verify()
        if not ok:
            print(f"audit log: BROKEN at entry {bad}", file=sys.stderr)
            return 3
        print("audit log: intact")
    return 0


# --- parser --------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
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
    sp.add_argument("--advertise", action="append", metavar="URL",
                    help="address colleagues reach this node at, e.g. with --listen 0.0.0.0:7400 (kept in the config)")
    sp.add_argument("--pull-every", type=float, default=None, metavar="SECONDS",
                    help="how often to ask colleagues for records waiting for us (default 30)")
    sp.add_argument("--relay", action="append", metavar="URL",
                    help="a blind relay to be reached through when nothing else works, relay+tcp://HOST:PORT "
                         "(repeatable, kept in the config)")
    sp.add_argument("--web", metavar="HOST:PORT", help=f"where the web app and local API listen (default {DEFAULT_WEB}; "
                                                      "beyond this computer only with --web-cert and --web-key)")
    sp.add_argument("--web-cert", metavar="FILE", help="TLS certificate (PEM) for the web app")
    sp.add_argument("--web-key", metavar="FILE", help="its private key (PEM)")
    sp.add_argument("--no-web", action="store_true", help="do not serve the web app and local API")
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
    cli_patient.register(sub, add, audit)
    cli_accounts.register(sub, add)
    cli_box.register(sub, add, keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = (args.data or default_data_dir()).expanduser()
    try:
        setup_logging(args.data, args.verbose or args.fn is cmd_run)
        return asyncio.run(args.fn(args))
    except CabinetError as err:
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


if __name__ == "__main__":
    sys.exit(main())
