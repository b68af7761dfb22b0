"""The local API's patient (scope `patients`) and administration (scope `admin`) routes, on real nodes.

Two practices in this process, each serving its peer port and its API on 127.0.0.1.
A script with a token does what the patient and status pages do: enrol (the card once,
in the answer), list, link a colleague's record, break-glass, and see grants, revocations
and the signed access history after the colleague used (then lost) a grant and asked in
an emergency; the node's status with the audit chain's state and the signed head, checked
again after someone edits the log. Tokens and roles are refused where they should be, and
malformed bodies get one line and a 4xx while the server keeps serving.
"""

from __future__ import annotations

import json
import re
import sqlite3

import aiohttp
import pytest

from node.node import SCOPES, Card, cards, consent, now_ms
from node.faces.web.api import ROUTES
from node.faces.web.server import start_web
from test_api import CANARY, PASSWORD, Practice, jar, make, sign_in, until

PATIENT_ROUTES = [r for r in ROUTES if r.scope == "patients"]
ADMIN_ROUTES = [r for r in ROUTES if r.scope == "admin"]
REF = "P-1001"


@pytest.fixture
async def pair(tmp_path):
    a, b = await make(tmp_path, "Dr Anne Martin"), await make(tmp_path, "Dr Paul Durand")
    await a.add_contact(b.descriptor.signed)
    await b.add_contact(a.descriptor.signed)
    wa, wb = await start_web(a, "127.0.0.1", 0), await start_web(b, "127.0.0.1", 0)
    yield Practice(a, wa), Practice(b, wb)
    for w in (wa, wb):
        await w.close()
    await a.close()
    await b.close()


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: {"id": "0" * 32, "n": "0", "ref": "P-0"}[m.group(1)], path)


async def arrived(p: Practice, record_id: str) -> bool:
    return await p.node.store.call(lambda db: db.conn.execute(
        "SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone()) is not None


async def audit_rows(p: Practice) -> list[tuple[str, str]]:
    return await p.node.store.call(lambda db: [(r[0], r[1] or "") for r in db.conn.execute(
        "SELECT event, detail FROM audit ORDER BY seq")])


async def test_patients_with_a_token_enrol_link_grants_history_break_glass(pair):
    a, b = pair
    tok = await a.node.accounts.add_token("ehr", ["patients"])
    sent = await b.node.send_referral(to="Dr Anne Martin", patient=CANARY, subject="Bilan", letter="Compte rendu.")
    await until(lambda: arrived(a, sent.record_id), "the colleague's record at the practice")
    async with aiohttp.ClientSession() as s:
        status, body, headers = await a.call(s, "POST", "/api/patients", token=tok, json={"ref": REF})
        assert status == 201 and headers["Location"] == f"/api/patients/{REF}"
        assert headers["Cache-Control"] == "no-store"
        card = Card.parse(body["text"])
        assert card.patient_ref == REF and card.practice == a.node.node_id and card.key_id == body["key_id"]
        assert body["recovery"] and body["recovery"] == card.phrase and body["qr"] == card.qr_payload()
        status, again, _ = await a.call(s, "POST", "/api/patients", token=tok, json={"ref": REF})
        assert status == 409 and "\n" not in again["error"]
        status, made, _ = await a.call(s, "POST", "/api/patients", token=tok, json={})
        assert status == 201 and re.fullmatch(r"P-[0-9A-F]{10}", made["patient_ref"])

        status, body, _ = await a.call(s, "GET", "/api/patients", token=tok)
        assert status == 200 and {p["patient_ref"] for p in body["patients"]} == {REF, made["patient_ref"]}
        assert all("recovery" not in p for p in body["patients"])

        status, body, _ = await a.call(s, "POST", f"/api/records/{sent.record_id}/link", token=tok,
                                       json={"patient": REF, "category": "cardiologie"})
        assert status == 200 and body == {"record_id": sent.record_id, "patient_ref": REF,
                                          "category": "cardiologie", "url": f"/api/patients/{REF}"}
        status, body, _ = await a.call(s, "POST", "/api/break-glass", token=tok,
                                       json={"requester": "Dr Paul Durand", "allow": True})
        assert status == 200 and [(r["requester"], r["name"]) for r in body["policy"]] == [
            (b.node.node_id, "Dr Paul Durand")]

        # the colleague uses a grant, the patient revokes it, then the colleague asks in an emergency
        token = cards.grant(card, to=b.node.node_id, scope="all", days=1, now=now_ms())
        jti = consent.check_grant(token, patient_public_keys={card.key_id: card.public_key},
                                  expected_audience=b.node.node_id, now=now_ms(), revoked=()).jti
        assert len(await b.node.patients.request(a.node.node_id, token=token, pull=False)) == 1
        assert await a.node.patients.apply_revocation(cards.revocation(card, jti, now=now_ms())) == jti
        await b.node.patients.request(a.node.node_id, emergency="inconsciente aux urgences", patient=REF,
                                      pull=False)

        status, view, headers = await a.call(s, "GET", f"/api/patients/{REF}", token=tok)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert view["patient"]["key_id"] == card.key_id and view["patient"]["public"].startswith("k4.")
        assert [(r["record_id"], r["category"]) for r in view["records"]] == [(sent.record_id, "cardiologie")]
        [g] = view["grants"]
        assert g["jti"] == jti and g["audience_name"] == "Dr Paul Durand" and g["uses"] == 1 and g["revoked"]
        assert [r["grant"] for r in view["revocations"]] == [jti]
        history = view["history"]
        events = {e["event"] for e in history["entries"]}
        assert {"patient-enrolled", "patient-linked", "grant-used", "access-sent", "grant-revoked",
                "break-glass", "history-given"} <= events
        assert history["practice"] == a.node.node_id and re.fullmatch(r"[0-9a-f]{64}", history["hash"])
        assert history["seq"] >= max(e["seq"] for e in history["entries"])
        glass = [e for e in history["entries"] if e["event"] == "break-glass"]
        assert glass[0]["why"] == "inconsciente aux urgences" and glass[0]["peer_name"] == "Dr Paul Durand"

        status, body, _ = await a.call(s, "GET", "/api/break-glass", token=tok)
        assert status == 200 and body["flagged"][0]["event"] == "break-glass"
        assert body["flagged"][0]["peer"] == b.node.node_id
        status, body, _ = await a.call(s, "POST", "/api/break-glass", token=tok, json={"requester": "*",
                                                                                      "allow": True})
        assert [r["requester"] for r in body["policy"]] == ["*", b.node.node_id]
        status, body, _ = await a.call(s, "POST", "/api/break-glass", token=tok,
                                       json={"requester": b.node.node_id, "allow": False})
        assert status == 200 and [r["requester"] for r in body["policy"]] == ["*"]
        status, body, _ = await a.call(s, "GET", "/api/patients/P-9999", token=tok)
        assert status == 404 and "P-9999" in body["error"]

    rows = await audit_rows(a)
    for event in ("patient-enrolled-by", "patient-linked-by", "break-glass-allowed-by", "break-glass-denied-by",
                  "history-viewed-by"):
        details = [d for e, d in rows if e == event]
        assert details and all(json.loads(d)["account"] == "token:ehr" and REF not in d for d in details), event
    for url, headers in a.seen:
        assert "Canarywood" not in url and not any("Canarywood" in v for v in headers.values())


async def test_admin_status_audit_head_and_a_tampered_log(pair, tmp_path):
    a, b = pair
    admin = await a.node.accounts.add_token("it", ["admin"])
    reader = await a.node.accounts.add_token("ehr", ["read"])
    gone = await make(tmp_path, "Dr Claire Petit")
    await a.node.add_contact(gone.descriptor.signed)
    await gone.close()                                                # gone: what is sent to it waits
    queued = await a.node.send_referral(to="Dr Claire Petit", patient=CANARY, letter="x", deliver=False)
    async with aiohttp.ClientSession() as s:
        status, st, headers = await a.call(s, "GET", "/api/admin/status", token=admin)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert st["queued"] == 1 and st["oldest_undelivered"] is not None and st["disk_free"] > 0
        assert st["audit_ok"] is True and st["audit"] == {"intact": True, "broken_at": None,
                                                          "head_url": "/api/admin/audit-head"}
        assert st["lan"] is None and st["bootstraps"] == [] and st["relays"] == [] and st["alerts"] == []
        assert st["port_mapping"]["enabled"] is False and st["serving"] is True
        status, plain, _ = await a.call(s, "GET", "/api/status", token=reader)
        assert status == 200 and set(plain) <= set(st), "the admin status extends GET /api/status"
        assert all(st[k] == v for k, v in plain.items() if k != "disk_free")
        assert queued.record_id

        status, head, headers = await a.call(s, "GET", "/api/admin/audit-head", token=admin)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert headers["Content-Disposition"].startswith("attachment;")
        head = head.decode("ascii")
        assert head.startswith("cabinet-audit-head:")
        status, body, _ = await a.call(s, "POST", "/api/admin/audit-head/verify", token=admin, json={"head": head})
        assert status == 200 and body["ok"] is True
        _, other, _ = await b.call(s, "GET", "/api/admin/audit-head",
                                   token=await b.node.accounts.add_token("it", ["admin"]))
        status, body, _ = await a.call(s, "POST", "/api/admin/audit-head/verify", token=admin,
                                       json={"head": other.decode("ascii")})
        assert status == 400 and "signed by" in body["error"]

        conn = sqlite3.connect(a.node.folder / "cabinet.db")          # someone editing the file by other means
        for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'"):
            conn.execute(f"DROP TRIGGER {t}")
        conn.execute("UPDATE audit SET event = 'nothing' WHERE seq = 1")
        conn.commit()
        conn.close()
        status, body, _ = await a.call(s, "POST", "/api/admin/audit-head/verify", token=admin, json={"head": head})
        assert status == 200 and body["ok"] is False and "entry 1" in body["detail"]
        status, st, _ = await a.call(s, "GET", "/api/admin/status", token=admin)
        assert st["audit"]["intact"] is False and st["audit"]["broken_at"] == 1


async def test_scopes_and_roles(pair):
    a, _ = pair
    tokens = {scope: await a.node.accounts.add_token(f"only-{scope}", [scope]) for scope in ("read", "patients",
                                                                                            "admin")}
    await a.node.accounts.add_user("claire", "secretary", PASSWORD)
    await a.node.accounts.add_user("anne", "practitioner", PASSWORD)
    assert len(PATIENT_ROUTES) == 6 and len(ADMIN_ROUTES) == 3
    async with aiohttp.ClientSession() as s:
        for route in PATIENT_ROUTES + ADMIN_ROUTES:
            path = concrete(route.path)
            for holder, scope in tokens.items():
                if holder == route.scope:
                    continue
                status, body, _ = await a.call(s, route.method, path, token=scope, json={})
                assert status == 403 and route.scope in body["error"], (route.method, path, holder)
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        _, me, _ = await sign_in(a, s, "claire")
        for route in PATIENT_ROUTES:
            status, body, _ = await a.call(s, route.method, concrete(route.path), json={"ref": REF},
                                           headers={"X-CSRF-Token": me["csrf"]})
            assert status == 403 and "secretary" in body["error"], (route.method, route.path)
        status, st, _ = await a.call(s, "GET", "/api/admin/status")
        assert status == 200 and st["node_id"] == a.node.node_id          # as the status page: any account
    assert await a.node.patients_list() == []
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        _, me, _ = await sign_in(a, s, "anne")
        for headers in ({}, {"X-CSRF-Token": "wrong"}):
            status, body, _ = await a.call(s, "POST", "/api/patients", json={"ref": REF}, headers=headers)
            assert status == 403 and "X-CSRF-Token" in body["error"]
        assert await a.node.patients_list() == []
        status, body, _ = await a.call(s, "POST", "/api/patients", json={"ref": REF},
                                       headers={"X-CSRF-Token": me["csrf"]})
        assert status == 201 and body["patient_ref"] == REF
    details = [d for e, d in await audit_rows(a) if e == "patient-enrolled-by"]
    assert [json.loads(d)["account"] for d in details] == ["anne"]


async def test_every_api_route_refuses_a_token_that_holds_every_scope_but_its_own(pair):
    a, _ = pair
    lacking = {scope: await a.node.accounts.add_token(f"no-{scope}", [s for s in SCOPES if s != scope])
               for scope in SCOPES}
    specs = {(r.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", r.path)): r for r in ROUTES}
    walked = 0
    async with aiohttp.ClientSession() as s:
        for route in a.web.runner.app.router.routes():
            canonical = route.resource.canonical
            spec = specs.get((route.method, canonical))
            if not canonical.startswith("/api/") or spec is None or spec.public:
                continue
            path = concrete(canonical)
            status, body, _ = await a.call(s, route.method, path)
            assert status == 401 and "error" in body, (route.method, path, status)
            if spec.scope is not None:
                status, body, _ = await a.call(s, route.method, path, token=lacking[spec.scope])
                assert status == 403 and spec.scope in body["error"], (route.method, path, status)
            walked += 1
    assert walked == len([r for r in ROUTES if not r.public])


async def test_malformed_bodies_get_400_and_the_server_keeps_serving(pair):
    a, _ = pair
    tok = await a.node.accounts.add_token("ehr", ["patients", "admin"])
    rid = "ab" * 16
    bad = [("POST", "/api/patients", {"data": b"{not json"}, 400, "JSON"),
           ("POST", "/api/patients", {"json": ["P-1"]}, 400, "object"),
           ("POST", "/api/patients", {"json": {"ref": 5}}, 400, "ref"),
           ("POST", "/api/patients", {"json": {"ref": "Jeanne Martin"}}, 400, "never a name"),
           ("POST", "/api/patients", {"json": {"replace": "yes"}}, 400, "replace"),
           ("GET", "/api/patients/bad%20ref", {}, 400, "patient reference"),
           ("POST", "/api/records/not-an-id/link", {"json": {"patient": REF}}, 400, "record ID"),
           ("POST", f"/api/records/{rid}/link", {"json": {}}, 400, "patient"),
           ("POST", f"/api/records/{rid}/link", {"json": {"patient": REF, "category": 3}}, 400, "category"),
           ("POST", f"/api/records/{rid}/link", {"json": {"patient": REF}}, 404, "no record"),
           ("POST", "/api/break-glass", {"json": {"requester": "*"}}, 400, "allow"),
           ("POST", "/api/break-glass", {"json": {"requester": "Dr Nobody", "allow": True}}, 404, "Nobody"),
           ("POST", "/api/admin/audit-head/verify", {"json": {"head": 5}}, 400, "head"),
           ("POST", "/api/admin/audit-head/verify", {"json": {"head": "hello"}}, 400, "cabinet-audit-head"),
           ("POST", "/api/admin/audit-head/verify", {"json": {"head": "cabinet-audit-head:!!!"}}, 400, "base64url"),
           ("POST", "/api/admin/audit-head/verify", {"json": {"head": "cabinet-audit-head:AAAA"}}, 400, "")]
    async with aiohttp.ClientSession() as s:
        for method, path, kw, want, words in bad:
            status, body, _ = await a.call(s, method, path, token=tok, **kw)
            assert status == want and words in body["error"], (path, kw, status, body)
            assert "\n" not in body["error"] and "Traceback" not in body["error"]
        status, body, _ = await a.call(s, "GET", "/api/patients", token=tok)
        assert status == 200 and body["patients"] == []
        status, body, _ = await a.call(s, "POST", "/api/patients", token=tok, json={"ref": REF})
        assert status == 201
    assert [p["patient_ref"] for p in await a.node.patients_list()] == [REF]
