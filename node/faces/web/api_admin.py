"""The local API's administration routes (token scope `admin`; sessions: any signed-in account, as the status page).

What the status page shows, as JSON: everything `GET /api/status` gives (node ID, name,
addresses, queued count, oldest undelivered, disk free, serving) and, beside it, the audit
chain's state, the router's door (port mapping), relays, bootstraps, LAN peers and open
alerts (Node.status_report). The chain's head signed by this practice is a text download,
and a head kept earlier can be checked against the log (is the log still an extension of
what was signed?). No patient data here: counts, addresses, node IDs and hashes only.
The route table entries are in api.py's ROUTES; this module does not import api.py.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from ...node import UsageError
from . import auth
from .keys import NODE

HEAD_PREFIX = "cabinet-audit-head:"
MAX_HEAD = 4096


async def status(request: web.Request) -> web.Response:
    report = await request.app[NODE].status_report()
    report["audit"] = {"intact": report["audit_ok"], "broken_at": report["audit_bad"],
                       "head_url": "/api/admin/audit-head"}
    return web.json_response(report)


async def audit_head(request: web.Request) -> web.Response:
    text = await request.app[NODE].signed_audit_head()
    return web.Response(text=text + "\n", content_type="text/plain", headers={
        "Content-Disposition": 'attachment; filename="cabinet-audit-head.txt"'})


def head_bytes(text: str) -> bytes:
    """The signed head from its text form (`cabinet-audit-head:` and base64url), as `cabinet audit head` prints."""
    text = "".join(text.split())
    if not text.startswith(HEAD_PREFIX) or len(text) > MAX_HEAD:
        raise UsageError(f"give \"head\": the text of a signed audit head ({HEAD_PREFIX}...)")
    data = text[len(HEAD_PREFIX):]
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("the signed audit head is not valid base64url") from None


async def verify_head(request: web.Request) -> web.Response:
    body = await auth._json(request)
    head = body.get("head")
    if not isinstance(head, str):
        raise UsageError(f"give \"head\": the text of a signed audit head ({HEAD_PREFIX}...)")
    ok, why = await request.app[NODE].patients.verify_against_head(head_bytes(head))
    return web.json_response({"ok": ok, "detail": why})
