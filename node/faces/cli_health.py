"""`cabinet status` and `cabinet alerts`: what the practice's IT provider looks at.

`status` prints the node's health and exits 3 when something needs a person (a
monitoring tool runs it), 0 otherwise; `--json` prints the same as one JSON object.
While `cabinet run` runs, status and alerts ask it through the control socket (no
passphrase: a monitoring job needs none; cli_remote.py), and a node waiting locked
is reported as such (exit 3); with no node running they open the data folder.
Nothing printed names a patient: alerts name the rule, the account or peer, counts
and times.
"""

from __future__ import annotations

import getpass
import json
import time

from .prompt import passphrase
from .text import shown

NEEDS_PERSON = 3


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f} {unit}"
    return f"{seconds:.0f} s"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def print_status(h: dict) -> None:
    print(f"state       {h['state']} (version {h['version']}, node {h['node_id']})")
    print(f"listen      {h['listen']}")
    print(f"advertised  {', '.join(h['advertised']) or '(none)'}")
    reach = h["reach"]
    if reach is None or not (reach["addresses"] or reach["bootstraps"]):
        print("reachable   not checked (no advertised address and no bootstrap)")
    else:
        for url, r in {**reach["addresses"], **reach["bootstraps"]}.items():
            kind = "bootstrap " if url in reach["bootstraps"] else "address   "
            print(f"{kind}  {shown(url)}: {shown(r)}")
    if h["lan"] is not None:
        print(f"LAN peers   {len(h['lan'])} ({sum(p['verified'] for p in h['lan'])} verified)")
    if h.get("port_mapping") is not None:
        print(f"router      {shown(h['port_mapping']['summary'])}")
    if h["relays"] is not None:
        print(f"relays      " + (", ".join(f"{shown(r['url'])} ({r['registered']} registered)" for r in h["relays"])
                                 or "(none)"))
    print(f"queued      {h['queued']} record(s)" + (f", oldest since {_when(h['oldest_undelivered'])}"
                                                   if h["oldest_undelivered"] else ""))
    print(f"backup      " + (f"{_when(h['backup_at'])} ({_age(h['backup_age_s'])} ago)" if h["backup_at"] else "never"))
    days = f", about {h['days_left']:.0f} days left at the current rate" if h["days_left"] is not None else \
        ", days left: not known yet (needs two days of samples)"
    print(f"disk        {_gib(h['disk_free'])} free of {_gib(h['disk_total'])}{days}")
    offsets = h["clock_offsets"]
    if offsets:
        worst = max(offsets.items(), key=lambda kv: abs(kv[1]))
        print(f"clocks      {len(offsets)} peer(s); largest offset {worst[1] / 1000:+.1f} s ({worst[0]})")
    else:
        print("clocks      no peer measured yet")
    print(f"alerts      {len(h['alerts'])} open")
    for a in h["alerts"]:
        print(f"  #{a['id']} {a['rule']} {shown(a['subject'])}: {shown(a['detail'])} ({_when(a['at'])})")
    if h["needs"]:
        print("NEEDS A PERSON:")
        for n in h["needs"]:
            print(f"  - {n}")
    else:
        print("OK")


def locked(message: str) -> dict:
    """What status says of a node waiting locked (it can tell nothing else before the passphrase)."""
    return {"state": "locked", "detail": message, "needs": [f"the node is {message}"]}


def show_status(a, h: dict) -> int:
    if a.json:
        print(json.dumps(h, sort_keys=True))
    elif h["state"] == "locked":
        print(f"state       {shown(h['detail'])}")
        print("NEEDS A PERSON:")
        for n in h["needs"]:
            print(f"  - {shown(n)}")
    else:
        print_status(h)
    return NEEDS_PERSON if h["needs"] else 0


async def cmd_status(a) -> int:
    from ..node import Node
    async with Node.open(a.data, passphrase=passphrase()) as node:
        h = await node.health(check_reach=not a.no_check)
    return show_status(a, h)


async def cmd_alerts(a) -> int:
    from ..node import Node
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.alerts(include_acked=a.all)
    return show_alerts(a, rows)


def show_alerts(a, rows: list[dict]) -> int:
    if not rows:
        print("No alerts." if a.all else "No open alerts.")
    for r in rows:
        acked = f"  acknowledged {_when(r['acked_at'])} by {shown(r['acked_by'])}" if r["acked_at"] else ""
        print(f"#{r['id']:<4} {_when(r['at'])}  {r['rule']:16} {shown(r['subject'])[:52]:52} x{r['count']}  "
              f"{shown(r['detail'])}{acked}")
    return 0


async def cmd_alerts_ack(a) -> int:
    from ..node import Node
    async with Node.open(a.data, passphrase=passphrase()) as node:
        row = await node.ack_alert(a.id, acknowledger())
    return show_ack(row)


def acknowledger() -> str:
    return f"cli:{getpass.getuser()}"


def show_ack(row: dict) -> int:
    print(f"alert #{row['id']} ({row['rule']}, {shown(row['subject'])}) acknowledged; the audit log says so")
    return 0


def register(sub, add) -> None:
    """Add the commands to cabinet's parser (`add(name, fn, help_, parent)` as in cli.py)."""
    sp = add("status", cmd_status, "the node's health; exit status 3 when something needs a person")
    sp.add_argument("--json", action="store_true", help="one JSON object instead of text")
    sp.add_argument("--no-check", action="store_true",
                    help="do not check that the advertised addresses and the bootstraps answer")
    sp = add("alerts", cmd_alerts, "abusive-access and health alerts ('alerts ack ID' acknowledges one)")
    sp.add_argument("--all", action="store_true", help="acknowledged ones too")
    actions = sp.add_subparsers(dest="alerts_command", required=False, metavar="ACTION")
    ack = add("ack", cmd_alerts_ack, "acknowledge an alert (written in the audit log)", actions)
    ack.add_argument("id", type=int)
