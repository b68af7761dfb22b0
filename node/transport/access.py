"""Patient-consent endpoints: a practitioner asks for a patient's records, a patient for their history.

Transport only, like server.py: each handler authenticates the calling node,
decodes one small msgpack body, calls one method of the Handler, encodes. A
consent refusal is answered 403 with its reason (signed, like every answer),
so the requester sees exactly why nothing was sent.

    POST /v1/access-requests   {"token": grant} | {"emergency": reason, "patient": ref}, optional "want"
                               -> {"records": [record IDs sealed for the caller], "grant": jti | None}
    POST /v1/patient-history   {"request": patient-signed history request} -> {"history": signed bytes}
    POST /v1/revocations       {"revocation": patient-signed revocation} -> {"revoked": the withdrawn grant's jti}

`add_routes(app)` is given to server.make_app by the facade; the client helpers below
speak to these endpoints through Client.call.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from ..core import wire
from ..core.errors import ConsentRefused
from . import server as _server
from .client import Client, Peer

MAX_BODY = 16 * 1024            # a token is at most 4096 characters, a reason 500
ACCESS, HISTORY, REVOKE = "/v1/access-requests", "/v1/patient-history", "/v1/revocations"
_ADDED = web.AppKey("patient_routes", bool)


class PatientHandler(Protocol):
    async def access_request(self, caller: str, msg: dict) -> "_server.Answer": ...

    async def patient_history(self, caller: str, msg: dict) -> "_server.Answer": ...

    async def patient_revocation(self, caller: str, msg: dict) -> "_server.Answer": ...


def _route(method_name: str, what: str):
    async def handle(request: web.Request) -> web.Response:
        raw = await _server._small_body(request, MAX_BODY)
        caller = await _server.authenticate(request, raw)
        msg = wire.unpack(raw, max_size=MAX_BODY, what=what)
        if not isinstance(msg, dict):
            msg = {}
        try:
            answer = await getattr(request.app[_server.HANDLER], method_name)(caller, msg)
        except ConsentRefused as exc:
            return _server._encode(request, 403, {"error": str(exc)})
        return _server._encode(request, answer.status, answer.body)
    return handle


def add_routes(app: web.Application) -> None:
    """Register the three endpoints (once; a second call changes nothing)."""
    if app.get(_ADDED):
        return
    app[_ADDED] = True
    app.router.add_post(ACCESS, _route("access_request", "access request"))
    app.router.add_post(HISTORY, _route("patient_history", "history request"))
    app.router.add_post(REVOKE, _route("patient_revocation", "revocation"))


# --- client side -------------------------------------------------------------------

async def request_access(client: Client, peer: Peer, *, token: str | None = None, emergency: str | None = None,
                         patient: str | None = None, want: str | None = None) -> dict:
    """Present a grant (or an emergency reason); a refusal is PeerRefused(403) with the reason."""
    body = {k: v for k, v in (("token", token), ("emergency", emergency), ("patient", patient), ("want", want))
            if v is not None}
    return await client.call(peer, "POST", ACCESS, wire.pack(body))


async def fetch_history(client: Client, peer: Peer, request_token: str) -> bytes:
    answer = await client.call(peer, "POST", HISTORY, wire.pack({"request": request_token}))
    history = answer.get("history")
    if not isinstance(history, bytes):
        raise ConsentRefused("the practice sent no history")
    return history


async def send_revocation(client: Client, peer: Peer, token: str) -> dict:
    return await client.call(peer, "POST", REVOKE, wire.pack({"revocation": token}))
