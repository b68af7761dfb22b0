"""The local JSON API: two real nodes in this process, each serving its API on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time

import aiohttp
import pytest

from conftest import PASSPHRASE
from node import Node
from node.node import SCOPES, UsageError, setup_logging
from node.faces.web.api import ROUTES
from node.faces.web.server import start_web

CANARY = "Zéphyrine Canarywood"
PASSWORD = "a long enough password"
DEADLINE = 60.0


async def make(tmp_path, name: str) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0")
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    return node


class Practice:
    """A node, its API server, and an HTTP client that speaks to it."""

    def __init__(self, node: Node, web) -> None:
        self.node, self.web = node, web
        self.seen: list[tuple[str, dict]] = []          # (URL, headers) of every answer, for the canary

    def url(self, path: str) -> str:
        return self.web.url + path

    async def call(self, session: aiohttp.ClientSession, method: str, path: str, *, token: str | None = None,
                   headers: dict | None = None, **kw) -> tuple[int, dict | bytes, dict]:
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        async with session.request(method, self.url(path), headers=h, **kw) as resp:
            raw = await resp.read()
            self.seen.append((str(resp.url), dict(resp.headers)))
            body = json.loads(raw) if resp.content_type == "application/json" else raw
            return resp.status, body, dict(resp.headers)


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


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)            # cookies for 127.0.0.1 (an IP address)


async def until(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def send_one(p: Practice, s, token: str, to: str, attachment: bytes, patient: str = CANARY,
                   name: str = "ecg.bin") -> dict:
    form = aiohttp.FormData()
    form.add_field("to", to)
    form.add_field("patient", patient)
    form.add_field("born", "1961-04-02")
    form.add_field("subject", "Douleur thoracique")
    form.add_field("letter", "Cher confrère, merci de voir cette patiente.")
    form.add_field("attachments", attachment, filename=name, content_type="application/octet-stream")
    status, body, _ = await p.call(s, "POST", "/api/referrals", token=token, data=form)
    assert status == 202, body
    return body


async def read_events(p: Practice, s, token: str, want, out: list) -> None:
    """Read the SSE stream until `want(event)` is true."""
    async with s.get(p.url("/api/events"), headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for line in resp.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                out.append(event)
                if want(event):
                    return


async def test_referral_with_5mb_attachment_goes_through_both_apis(pair, tmp_path):
    a, b = pair
    before = list(logging.getLogger("cabinet").handlers)
    setup_logging(a.node.folder, False)              # node.log: checked for the canary below
    try:
        send_tok = await a.node.accounts.add_token("ehr", ["send", "read"])
        read_tok = await b.node.accounts.add_token("ehr", ["read"])
        data = os.urandom(5 * 1024 * 1024)
        async with aiohttp.ClientSession() as s:
            events: list[dict] = []
            already = len(b.node.events._subs)          # the node's own subscribers (health, alerts)
            listener = asyncio.create_task(read_events(b, s, read_tok, lambda e: e["type"] == "RecordReceived", events))
            await until(lambda: _subscribers(b.node, already), "the event stream to subscribe")
            sent = await send_one(a, s, send_tok, "Dr Paul Durand", data)
            rid = sent["record_id"]
            assert re.fullmatch(r"[0-9a-f]{32}", rid) and sent["url"] == f"/api/records/{rid}"
            assert set(sent["deliveries"]) == {b.node.node_id}

            async def arrived():
                status, body, _ = await b.call(s, "GET", "/api/inbox?unread=1", token=read_tok)
                assert status == 200
                return [r for r in body["records"] if r["id"] == rid]
            row = (await until(arrived, "the record at the colleague"))[0]
            assert row["attachments"] == [{"name": "ecg.bin", "size": len(data)}] and row["opened"] is None
            await asyncio.wait_for(listener, DEADLINE)
            assert any(e["type"] == "RecordReceived" and e["record_id"] == rid for e in events)

            status, rec, headers = await b.call(s, "GET", f"/api/records/{rid}", token=read_tok)
            assert status == 200 and rec["letter"].startswith("Cher confrère") and rec["patient"] == CANARY
            assert headers["Cache-Control"] == "no-store"
            status, raw, headers = await b.call(s, "GET", rec["attachments"][0]["url"], token=read_tok)
            assert status == 200 and hashlib.sha256(raw).digest() == hashlib.sha256(data).digest()
            assert headers["Content-Disposition"].startswith("attachment;")
            assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
            assert headers["Content-Type"] == "application/octet-stream"
            status, body, _ = await b.call(s, "GET", rec["attachments"][0]["url"] + "?inline=1", token=read_tok)
            assert status == 400 and "download" in body["error"]

            async def delivered():
                _, body, _ = await a.call(s, "GET", "/api/outbox", token=send_tok)
                return [d for d in body["deliveries"] if d["record_id"] == rid and d["state"] == "delivered"]
            d = (await until(delivered, "delivery at the sender"))[0]
            assert d["percent"] == 100
            status, body, _ = await a.call(s, "GET", "/api/status", token=send_tok)
            assert status == 200 and body["node_id"] == a.node.node_id and body["disk_free"] > 0
            status, body, _ = await b.call(s, "GET", f"/api/inbox?patient={CANARY.split()[0].lower()}",
                                           token=read_tok)
            assert [r["id"] for r in body["records"]] == [rid]

        audit = await b.node.store.call(lambda db: list(db.query("SELECT event, record, detail FROM audit")))
        by = [e for e in audit if e["event"] == "read-by" and e["record"] == rid]
        assert by and json.loads(by[0]["detail"])["account"] == "token:ehr"
        assert not list(a.node.incoming.glob("web-*.upload")), "uploads are removed once sealed"
        # The canary: the patient's name is in no URL, no header and no log line.
        for url, headers in a.seen + b.seen:
            assert CANARY not in url and "Canarywood" not in url
            assert not any("Canarywood" in v for v in headers.values())
        for h in logging.getLogger("cabinet").handlers:
            h.flush()                                   # the log thread has written what came before
        log_text = (a.node.folder / "node.log").read_text("utf-8")
        assert "POST /api/referrals 202" in log_text and "Canarywood" not in log_text
    finally:
        for h in logging.getLogger("cabinet").handlers[:]:
            if h not in before:
                logging.getLogger("cabinet").removeHandler(h)
                h.close()


async def _subscribers(node: Node, already: int) -> bool:
    return len(node.events._subs) > already


async def sign_in(p: Practice, s, account: str, password: str = PASSWORD) -> tuple[int, dict, dict]:
    return await p.call(s, "POST", "/api/session", json={"account": account, "password": password})


async def test_secretary_lists_and_sends_but_cannot_open_letters(pair):
    a, b = pair
    await b.node.accounts.add_user("claire", "secretary", PASSWORD)
    await b.node.accounts.add_user("durand", "practitioner", PASSWORD)
    tok = await a.node.accounts.add_token("ehr", ["send"])
    async with aiohttp.ClientSession() as s:
        rid = (await send_one(a, s, tok, "Dr Paul Durand", b"x" * 1000))["record_id"]
    await until(lambda: b.node.store.call(lambda db: db.conn.execute(
        "SELECT 1 FROM records WHERE id = ?", (rid,)).fetchone()), "arrival")
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        status, me, headers = await sign_in(b, s, "claire")
        assert status == 200 and me["role"] == "secretary" and me["csrf"]
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        status, body, _ = await b.call(s, "GET", "/api/inbox")
        assert status == 200 and [r["id"] for r in body["records"]] == [rid]
        for path in (f"/api/records/{rid}", f"/api/records/{rid}/attachments/0"):
            status, body, _ = await b.call(s, "GET", path)
            assert status == 403 and "practitioner" in body["error"]
        status, body, _ = await b.call(s, "POST", f"/api/records/{rid}/reply", data=aiohttp.FormData({"letter": "x"}),
                                       headers={"X-CSRF-Token": me["csrf"]})
        assert status == 403
        status, body, _ = await b.call(s, "GET", "/api/contacts")
        assert status == 200 and body["contacts"][0]["name"] == "Dr Anne Martin"
    row = await b.node.store.call(lambda db: db.conn.execute("SELECT opened FROM records WHERE id = ?",
                                                             (rid,)).fetchone())
    assert row[0] is None, "the secretary's attempts did not open the record"
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        status, me, _ = await sign_in(b, s, "durand")
        status, rec, _ = await b.call(s, "GET", f"/api/records/{rid}")
        assert status == 200 and rec["letter"].startswith("Cher confrère")
        form = aiohttp.FormData({"letter": "Compte rendu: ECG normal."})
        status, body, _ = await b.call(s, "POST", f"/api/records/{rid}/reply", data=form,
                                       headers={"X-CSRF-Token": me["csrf"]})
        assert status == 202 and body["deliveries"] == {a.node.node_id: "queued"}


async def test_csrf_is_required_on_changes_made_with_a_cookie(pair):
    a, _ = pair
    await a.node.accounts.add_user("anne", "practitioner", PASSWORD)
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        _, me, _ = await sign_in(a, s, "anne")
        descriptor = (await _descriptor_text(pair[1].node))
        for headers in ({}, {"X-CSRF-Token": "wrong"}):
            status, body, _ = await a.call(s, "POST", "/api/contacts", json={"source": descriptor}, headers=headers)
            assert status == 403 and "X-CSRF-Token" in body["error"]
            status, body, _ = await a.call(s, "DELETE", "/api/session", headers=headers)
            assert status == 403
        status, body, _ = await a.call(s, "POST", "/api/contacts", json={"source": f"Hello,\n> {descriptor}\n-- \nB"},
                                       headers={"X-CSRF-Token": me["csrf"]})
        assert status == 200 and body["status"] == "unchanged"
        status, body, _ = await a.call(s, "POST", "/api/contacts", json={"source": "/etc/passwd"},
                                       headers={"X-CSRF-Token": me["csrf"]})
        assert status == 400 and "node ID" in body["error"]
        status, _, _ = await a.call(s, "DELETE", "/api/session", headers={"X-CSRF-Token": me["csrf"]})
        assert status == 200
        status, body, _ = await a.call(s, "GET", "/api/inbox")
        assert status == 401


async def _descriptor_text(node: Node) -> str:
    return node.descriptor.to_text()


async def test_host_and_origin_are_checked(pair):
    a, _ = pair
    tok = await a.node.accounts.add_token("ehr", ["read"])
    port = a.web.port
    async with aiohttp.ClientSession() as s:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}"):
            status, body, _ = await a.call(s, "GET", "/api/status", token=tok, headers={"Host": host})
            assert status == 421 and "host name" in body["error"]
        status, _, _ = await a.call(s, "GET", "/api/openapi.json", headers={"Host": "rebound.example"})
        assert status == 421
        for origin in ("http://evil.example", f"https://127.0.0.1:{port}", "null"):
            status, body, _ = await a.call(s, "GET", "/api/status", token=tok, headers={"Origin": origin})
            assert status == 403 and "origin" in body["error"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
            status, _, headers = await a.call(s, "GET", "/api/status", token=tok,
                                              headers={"Host": host, "Origin": f"http://{host}"})
            assert status == 200
            assert headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert "unsafe-inline" not in headers["Content-Security-Policy"]


async def test_failed_sign_ins_are_slowed_logged_and_published(pair):
    a, _ = pair
    accounts = a.node.accounts
    await accounts.add_user("anne", "practitioner", PASSWORD)
    now = [10**12]
    accounts.clock = lambda: now[0]
    sub = a.node.subscribe()
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        status, body, _ = await sign_in(a, s, "anne", "wrong password!")
        assert status == 401 and body == {"error": "wrong account name or password"}
        status, body, headers = await sign_in(a, s, "anne")          # right password, too soon
        assert status == 429 and headers["Retry-After"] == "1"
        now[0] += 1001
        status, _, _ = await sign_in(a, s, "anne", "wrong again....")
        status, _, _ = await sign_in(a, s, "nobody", PASSWORD)       # same source: waits too
        assert status == 429
        now[0] += 1001
        status, _, headers = await sign_in(a, s, "anne")
        assert status == 429 and headers["Retry-After"] == "1", "the second failure doubled the wait"
        now[0] += 1000
        status, me, _ = await sign_in(a, s, "anne")
        assert status == 200 and me["account"] == "anne"
    failed = [e for e in sub.pending() if type(e).__name__ == "SignInFailed"]
    assert [e.account for e in failed] == ["anne", "anne"] and failed[1].retry_after_ms == 2000
    audit = await a.node.store.call(lambda db: list(db.query(
        "SELECT detail FROM audit WHERE event = 'sign-in-failed'")))
    assert [json.loads(r["detail"]) for r in audit] == [{"account": "anne"}] * 2


async def test_revoked_token_is_refused_at_once(pair):
    a, _ = pair
    tok = await a.node.accounts.add_token("script", ["read"])
    async with aiohttp.ClientSession() as s:
        assert (await a.call(s, "GET", "/api/outbox", token=tok))[0] == 200
        await a.node.accounts.revoke_token("script")
        status, body, _ = await a.call(s, "GET", "/api/outbox", token=tok)
        assert status == 401 and "sign in" in body["error"]
        assert (await a.call(s, "GET", "/api/outbox", token=tok[:-1] + "A"))[0] == 401


def _concrete(path: str) -> str:
    return path.replace("{id}", "0" * 32).replace("{n}", "0").replace("{ref}", "P-0")


async def test_every_route_needs_credentials_and_the_right_scope(pair):
    a, _ = pair
    lacking = {scope: await a.node.accounts.add_token(f"no-{scope}", [s for s in SCOPES if s != scope])
               for scope in SCOPES}                                   # every scope but the route's own
    app = a.web.runner.app
    specs = {(spec.method, spec.path): spec for spec in ROUTES}
    walked = 0
    async with aiohttp.ClientSession() as s:
        for route in app.router.routes():
            canonical = route.resource.canonical
            if not canonical.startswith("/api/"):
                continue                  # the web pages: walked by tests/test_web.py
            spec = next(sp for (m, p), sp in specs.items()
                        if m == route.method and re.sub(r"\{(\w+):[^}]*\}", r"{\1}", p) == canonical)
            path = _concrete(canonical)
            status, body, _ = await a.call(s, route.method, path)
            if spec.public:
                assert status not in (401, 403), (route.method, path)
                continue
            assert status == 401 and "error" in body, (route.method, path, status)
            status, body, _ = await a.call(s, route.method, path, token=lacking[spec.scope or "admin"])
            if spec.scope is None:
                assert status not in (401, 403), (route.method, path)
            else:
                assert status == 403 and spec.scope in body["error"], (route.method, path, status)
            walked += 1
    assert walked == len([r for r in ROUTES if not r.public]) >= 14


async def test_openapi_document_lists_every_route(pair):
    a, _ = pair
    async with aiohttp.ClientSession() as s:
        status, doc, _ = await a.call(s, "GET", "/api/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    routes = {(r.method.lower(), r.resource.canonical) for r in a.web.runner.app.router.routes()
              if r.resource.canonical.startswith("/api/")}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    for p, ops in doc["paths"].items():
        for m, op in ops.items():
            for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(op)):
                assert ref in doc["components"]["schemas"], (m, p, ref)
            assert {prm["name"] for prm in op["parameters"] if prm["in"] == "path"} == set(re.findall(r"\{(\w+)\}", p))


async def test_bad_requests_get_one_line_and_lose_nothing(pair):
    a, _ = pair
    tok = await a.node.accounts.add_token("ehr", ["send", "read"])
    async with aiohttp.ClientSession() as s:
        status, body, _ = await a.call(s, "GET", "/api/records/not-an-id", token=tok)
        assert status == 400 and body["error"].startswith("a record ID")
        status, body, _ = await a.call(s, "GET", f"/api/records/{'ab' * 16}", token=tok)
        assert status == 404 and "\n" not in body["error"]
        form = aiohttp.FormData()
        form.add_field("to", "Dr Paul Durand")
        form.add_field("attachments", b"z" * 300_000, filename="scan.pdf")
        status, body, _ = await a.call(s, "POST", "/api/referrals", token=tok, data=form)   # no patient
        assert status == 400 and "patient" in body["error"]
        status, body, _ = await a.call(s, "POST", "/api/referrals", token=tok, json={"to": "x"})
        assert status == 400 and "multipart" in body["error"]
        status, body, _ = await a.call(s, "GET", "/api/inbox?born=yesterday", token=tok)
        assert status == 400 and "YYYY-MM-DD" in body["error"]
        status, body, _ = await a.call(s, "GET", "/api/nothing-here", token=tok)
        assert status == 404 and "error" in body
    assert not list(a.node.incoming.glob("web-*.upload"))
    assert await a.node.outbox() == []


async def test_beyond_loopback_needs_tls(pair, tmp_path):
    a, _ = pair
    with pytest.raises(UsageError, match="TLS"):
        await start_web(a.node, "0.0.0.0", 0)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("nor a key")
    with pytest.raises(UsageError, match="certificate"):
        await start_web(a.node, "0.0.0.0", 0, tls=(cert, key))
