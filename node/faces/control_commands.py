"""The commands the control socket answers: each calls the facade and returns JSON data.

cli.py prints that data with the same code whether it came from the running node (through
control.py) or from a folder the CLI opened itself (run_local). Nothing here prints.
Call is what a handler gets: the node, the arguments, and the caller's files (see control.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..node import DESCRIPTOR_PREFIX, DeliveryChanged, Descriptor, Node, RecordStored, UsageError, contact_state


# --- one call --------------------------------------------------------------------------------

@dataclass
class Call:
    """What a handler gets: the node, the request's arguments, and the caller's files."""

    node: Node
    args: dict
    fds: list[int] = field(default_factory=list)
    local: bool = False                       # the CLI opened the folder itself: paths are its own
    emit: Callable[[dict], Awaitable[None]] | None = None
    _stage: Path | None = None

    def arg(self, name: str, kind: type | tuple[type, ...] = str, default: Any = None) -> Any:
        value = self.args.get(name, default)
        if value is not None and not isinstance(value, kind):
            raise UsageError(f"the request's {name!r} has the wrong type")
        return value

    def files(self, names: list[str]) -> list[Path]:
        """The caller's files, under their own names (remote: staged links to the passed descriptors)."""
        if self.local:
            return [Path(n) for n in names]
        if len(names) > len(self.fds):
            raise UsageError("the request names more files than it passed")
        if self._stage is None:
            self._stage = self.node.incoming / f"ctl-{secrets.token_hex(8)}"
            self._stage.mkdir(mode=0o700, parents=True)
        out = []
        for i, (name, fd) in enumerate(zip(names, self.fds)):
            base = os.path.basename(name) or "file"
            if base in (".", ".."):
                base = "file"
            (self._stage / str(i)).mkdir(mode=0o700)
            link = self._stage / str(i) / base
            os.symlink(f"/proc/self/fd/{fd}", link)
            out.append(link)
        return out

    def folder(self, name: str) -> Path:
        """A folder to write into: the caller's descriptor (remote), else its path."""
        if self.local:
            return Path(name)
        if not self.fds:
            raise UsageError("the request passed no folder")
        return Path(f"/proc/self/fd/{self.fds[-1]}")

    def cleanup(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


Handler = Callable[[Call], Awaitable[Any]]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        COMMANDS[name] = fn
        return fn
    return register


def jsonable(data: Any) -> Any:
    """What goes through the socket, and what the local path hands the printers too (same shape)."""
    return json.loads(json.dumps(data, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (Path, bytes)):
        return os.fspath(obj) if isinstance(obj, Path) else obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(obj.__class__.__name__)


async def run_local(folder: Path, passphrase: str, cmd: str, args: dict) -> Any:
    """No node running: open the folder (the passphrase, the key derived) and run the same handler."""
    async with Node.open(folder, passphrase=passphrase) as node:
        return jsonable(await COMMANDS[cmd](Call(node, args, local=True)))




def summary(s) -> dict:
    return {"id": s.id, "direction": s.direction, "kind": s.kind, "sender": s.sender, "sender_name": s.sender_name,
            "created": s.created, "patient": s.patient, "born": s.born, "subject": s.subject,
            "attachments": [list(a) for a in s.attachments], "thread": s.thread, "reply_to": s.reply_to,
            "opened": s.opened}


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


# --- reading ------------------------------------------------------------------------------------

@command("inbox")
async def inbox(c: Call) -> list:
    rows = await c.node.list_records(None if c.arg("all", bool) else "in", patient=c.arg("patient"),
                                     born=c.arg("born") or "")
    return [summary(s) for s in rows]


@command("thread")
async def thread(c: Call) -> list:
    return [summary(s) for s in await c.node.thread(c.arg("id"))]


@command("show")
async def show(c: Call) -> dict:
    view = await c.node.read(c.arg("id"))
    m = view.manifest
    return {"summary": summary(view.summary), "patient": m.patient, "born": m.born, "subject": m.subject,
            "letter": m.letter, "data": m.data,
            "provenance": view.provenance.describe(_when) if view.provenance is not None else None,
            "thread": [summary(t) for t in await c.node.thread(view.summary.id)]}


@command("outbox")
async def outbox(c: Call) -> dict:
    rid = c.arg("id")
    contacts = await c.node.contacts()
    trusted = sorted({contact_state({"revoked": 0, "held": 0, "verified": v}) for v in (0, 1)})
    return {"rows": await c.node.outbox(rid), "lost": [] if rid else await c.node.sent_after_backup(),
            "trusted": trusted, "now": c.node.ports.now(),
            "states": {x["node_id"]: contact_state(x) for x in contacts},
            "names": {x["node_id"]: x["name"] for x in contacts}}


@command("export")
async def export(c: Call) -> list:
    written = await c.node.export(c.arg("id"), c.folder(c.arg("dir")))
    return [p.name for p in written]


@command("audit_verify")
async def audit_verify(c: Call) -> dict:
    ok, bad = await c.node.audit_verify()
    return {"ok": ok, "bad": bad}


# --- identity and contacts --------------------------------------------------------------------

@command("id")
async def identity(c: Call) -> dict:
    d, cfg = c.node.descriptor, c.node.config
    return {"node_id": c.node.node_id, "name": cfg.name, "specialty": cfg.specialty, "city": cfg.city,
            "addresses": list(d.addresses), "text": d.to_text()}


@command("contact_list")
async def contact_list(c: Call) -> list:
    out = []
    for x in await c.node.contacts():
        d = Descriptor.from_wire(x["descriptor"])
        out.append({"name": x["name"], "node_id": x["node_id"], "specialty": d.specialty, "city": d.city,
                    "state": contact_state(x)})
    return out


def _contact(x: dict) -> dict:
    return {"name": x["name"], "node_id": x["node_id"], "state": contact_state(x), "verified": bool(x["verified"])}


@command("contact_add")
async def contact_add(c: Call) -> dict:
    source = c.arg("source")
    if c.arg("file", bool) and DESCRIPTOR_PREFIX not in source:
        source = source.encode("utf-8", "surrogateescape")      # the caller's file's text, never a path
    x, status = await c.node.add_contact(source, name=c.arg("name"), expect_id=c.arg("expect_id"))
    out = {"contact": _contact(x), "status": status}
    if status == "held":
        out["old"] = _contact(await c.node.contact(x["replaces"]))
    return out


@command("contact_confirm")
async def contact_confirm(c: Call) -> dict:
    return _contact(await c.node.confirm_contact(c.arg("name")))


@command("contact_code")
async def contact_code(c: Call) -> dict:
    x, code = await c.node.safety_code(c.arg("name"))
    return {"contact": _contact(x), "code": code, "descriptor": c.node.descriptor.to_text(),
            "node_id": c.node.node_id}


@command("contact_verify")
async def contact_verify(c: Call) -> dict:
    return _contact(await c.node.verify_contact(c.arg("name")))


# --- directory and LAN -------------------------------------------------------------------------

def _descriptor(d) -> dict:
    return {"name": d.name, "specialty": d.specialty, "city": d.city, "rpps": d.rpps, "node_id": d.node_id,
            "seq": d.seq, "addresses": list(d.addresses), "revoked": bool(d.revoked)}


@command("directory_search")
async def directory_search(c: Call) -> list:
    return [dict(_descriptor(f.descriptor), conflict=list(f.conflict))
            for f in await c.node.directory_search(c.arg("query"))]


@command("directory_lookup")
async def directory_lookup(c: Call) -> dict:
    d = await c.node.directory_lookup(c.arg("node_id"))
    known = {x["node_id"]: x for x in await c.node.contacts()}.get(d.node_id)
    out = _descriptor(d)
    out["contact"] = _contact(known) if known is not None else None
    out["revoked_state"] = (contact_state({"revoked": 1, "held": 0, "verified": 0, "descriptor": d.signed})
                            if d.revoked else None)
    return out


@command("peers")
async def peers(c: Call) -> dict:
    wait = c.arg("wait", (int, float), 3.0)
    hints = await c.node.lan_peers(min(float(wait), 30.0))
    names = {x["node_id"]: x["name"] for x in await c.node.contacts()}
    return {"peers": [{"name": h.name, "node_id": h.node_id, "url": h.url, "verified": h.verified}
                      for h in hints], "names": names}


# --- sending -----------------------------------------------------------------------------------

async def _report(c: Call, result) -> dict:
    names = {x["node_id"]: x["name"] for x in await c.node.contacts()}
    return {"record_id": result.record_id, "deliveries": result.deliveries, "errors": result.errors,
            "names": names}


async def _follow(c: Call, events) -> None:
    """Stream the record's progress to the caller: which record, its size, bytes sent per recipient."""
    record = None
    async for e in events:
        if isinstance(e, RecordStored) and record is None:
            record = e.record_id
            rows = await c.node.outbox(record)
            size = rows[0]["body_size"] if rows else 0
            if c.emit is not None:
                await c.emit({"stored": record, "total": size, "recipients": len(e.recipients)})
        elif isinstance(e, DeliveryChanged) and e.record_id == record and c.emit is not None:
            await c.emit({"record": record, "recipient": e.recipient, "state": e.state,
                          "sent_bytes": e.sent_bytes})


async def _sending(c: Call, send) -> dict:
    with c.node.subscribe(RecordStored, DeliveryChanged) as events:
        follower = asyncio.ensure_future(_follow(c, events))
        try:
            # The caller leaving (Ctrl-C) does not stop this: the node keeps and delivers what it was given.
            result = await send()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    return await _report(c, result)


@command("send")
async def send(c: Call) -> dict:
    names = c.arg("files", list, [])
    paths = c.files([c.arg("letter"), *names])
    letter, attachments = paths[0], paths[1:]
    to, patient, born = c.arg("to", list), c.arg("patient"), c.arg("born") or ""
    if not c.arg("again", bool):
        earlier = await c.node.earlier_copy(to=to, patient=patient, born=born, letter=letter, attachments=attachments)
        if earlier is not None:
            names_of = {x["node_id"]: x["name"] for x in await c.node.contacts()}
            return {"earlier": {"record_id": earlier.record_id, "created": earlier.created,
                                "recipients": [names_of.get(r, r) for r in earlier.recipients]}}
    return await _sending(c, lambda: c.node.send_referral(
        to=to, patient=patient, born=born, subject=c.arg("subject") or "", letter=letter, attachments=attachments,
        data=c.arg("data") or "", deliver=not c.arg("no_deliver", bool)))


@command("reply")
async def reply(c: Call) -> dict:
    paths = c.files([c.arg("letter"), *c.arg("files", list, [])])
    return await _sending(c, lambda: c.node.reply(c.arg("id"), letter=paths[0], attachments=paths[1:],
                                                  subject=c.arg("subject"), deliver=not c.arg("no_deliver", bool)))


# --- accounts and tokens -----------------------------------------------------------------------

@command("user_add")
async def user_add(c: Call) -> dict:
    await c.node.accounts.add_user(c.arg("name"), c.arg("role"), c.arg("password"))
    return {}


@command("user_list")
async def user_list(c: Call) -> list:
    return await c.node.accounts.users()


@command("user_remove")
async def user_remove(c: Call) -> dict:
    await c.node.accounts.remove_user(c.arg("name"))
    return {}


@command("token_add")
async def token_add(c: Call) -> dict:
    return {"value": await c.node.accounts.add_token(c.arg("name"), c.arg("scopes", list))}


@command("token_list")
async def token_list(c: Call) -> list:
    return await c.node.accounts.tokens()


@command("token_revoke")
async def token_revoke(c: Call) -> dict:
    await c.node.accounts.revoke_token(c.arg("name"))
    return {}


@command("status")
async def status(c: Call) -> dict:
    return await c.node.status()


@command("health")
async def health(c: Call) -> dict:
    return await c.node.health(check_reach=c.arg("check_reach", bool, True))


@command("alerts")
async def alerts(c: Call) -> list:
    return await c.node.alerts(include_acked=c.arg("all", bool, False))


@command("alert_ack")
async def alert_ack(c: Call) -> dict:
    return await c.node.ack_alert(c.arg("id", int), c.arg("by") or "cli")
