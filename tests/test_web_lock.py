"""The page lock: a session left without activity for the lock time is locked by the server, and the
page clears itself in the browser.

HTTP tests run a real node and its web app on 127.0.0.1 and move the accounts' clock (the lock reads
the same clock) instead of waiting minutes. The browser test (Debian's chromium through Playwright)
uses a lock time of a few seconds of real time and waits on conditions with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
import pytest
from yarl import URL

from conftest import PASSPHRASE
from node import Node
from node.faces.web import lock
from node.faces.web.server import WebServer, start_web
from _browser import PASSWORD, browser, sign_in  # noqa: F401 (a fixture)

PATIENT = "Zéphyrine Canarywood"
MINUTE = 60_000


class Site:
    """One practice's node and web app, its accounts' clock held by the test, and a record to show."""

    def __init__(self, node: Node, web: WebServer, rid: str, now: list[int]) -> None:
        self.node, self.web, self.rid, self.now = node, web, rid, now

    def url(self, path: str) -> str:
        return self.web.url + path

    def wait(self, ms: int) -> None:
        self.now[0] += ms

    async def audit(self, event: str) -> list[dict]:
        rows = await self.node.store.call(lambda db: list(db.query(
            "SELECT detail FROM audit WHERE event = ? ORDER BY rowid", [event])))
        return [json.loads(r["detail"]) for r in rows]


async def open_practice(tmp_path, name: str) -> Node:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    return await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)


async def with_record(tmp_path) -> tuple[Node, str]:
    """A practice holding one referral it wrote (queued: the colleague need not run)."""
    a, b = await open_practice(tmp_path, "Dr Anne Martin"), await open_practice(tmp_path, "Dr Paul Durand")
    await a.add_contact(b.descriptor.signed)
    await b.close()
    sent = await a.send_referral(to="Dr Paul Durand", patient=PATIENT, born="1961-04-02",
                                 subject="Douleur thoracique", letter="Cher confrère, merci de la voir.",
                                 deliver=False)
    await a.accounts.add_user("anne", "practitioner", PASSWORD)
    return a, sent.record_id


@pytest.fixture
async def site(tmp_path):
    node, rid = await with_record(tmp_path)
    now = [10**12]
    node.accounts.clock = lambda: now[0]
    web = await start_web(node, "127.0.0.1", 0)
    lock.configure(web.runner.app, 1)                   # one minute, on the clock the test moves
    yield Site(node, web, rid, now)
    await web.close()
    await node.close()


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)              # cookies for 127.0.0.1


async def signed_in(site: Site, s: aiohttp.ClientSession) -> dict:
    async with s.post(site.url("/api/session"), json={"account": "anne", "password": PASSWORD}) as r:
        assert r.status == 200
        return await r.json()


async def get(s: aiohttp.ClientSession, url: str, **kw) -> tuple[int, str, dict]:
    async with s.get(url, allow_redirects=False, **kw) as r:
        return r.status, await r.text(), dict(r.headers)


async def last_seen(site: Site) -> int:
    return await site.node.store.call(lambda db: db.conn.execute("SELECT max(last_seen) FROM web_sessions")
                                      .fetchone()[0])


async def test_idle_session_is_locked_everywhere_and_the_lock_page_shows_no_patient(site):
    token = await site.node.accounts.add_token("ehr", ["read"])
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        await signed_in(site, s)
        status, html, _ = await get(s, site.url(f"/records/{site.rid}"))
        assert status == 200 and PATIENT in html and 'data-lock-ms="60000"' in html
        site.wait(MINUTE - 1000)
        status, _, _ = await get(s, site.url("/api/inbox"))           # activity: the lock time starts again
        assert status == 200
        site.wait(MINUTE - 1000)
        assert (await get(s, site.url("/inbox")))[0] == 200
        touched = await last_seen(site)
        site.wait(MINUTE + 1)

        status, _, headers = await get(s, site.url(f"/records/{site.rid}"))
        where = URL(headers["Location"])
        assert status == 303 and where.path == "/lock" and where.query["next"] == f"/records/{site.rid}"
        for path in ("/api/inbox", f"/api/records/{site.rid}", "/api/session", "/api/events"):
            status, body, _ = await get(s, site.url(path))
            assert status == 401 and json.loads(body)["error"].startswith("locked"), path
        status, html, _ = await get(s, site.url(f"/lock?next=/records/{site.rid}"))
        assert status == 200 and "anne" in html and 'type="password"' in html
        for leak in (PATIENT, "Canarywood", "Douleur", "Cher confrère", 'id="badge"', 'name="csrf" content'):
            assert leak not in html, leak
        assert await last_seen(site) == touched, "a locked request touched the session"

        async with s.get(site.url(f"/api/records/{site.rid}"), headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200 and "Canarywood" in await r.text()     # tokens have no lock
    assert await site.audit("session-locked") == [{"account": "anne", "via": "session"}]


async def test_wrong_password_is_slowed_and_audited_the_right_one_returns_to_the_page(site, caplog):
    caplog.set_level(logging.INFO)
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        me = await signed_in(site, s)
        site.wait(MINUTE + 1)
        back = f"/records/{site.rid}"
        form = {"csrf": me["csrf"], "next": back}
        async with s.post(site.url("/lock"), data=form | {"password": "not the password"},
                          allow_redirects=False) as r:
            assert r.status == 401 and "Mot de passe incorrect" in await r.text()
        async with s.post(site.url("/lock"), data=form | {"password": PASSWORD}, allow_redirects=False) as r:
            assert r.status == 429, "too soon after a failure: the password is not even checked"
            assert PATIENT not in await r.text()
        async with s.post(site.url("/lock"), data={"next": back, "password": PASSWORD}, allow_redirects=False) as r:
            assert r.status == 403                                     # no CSRF token: refused
        site.wait(1001)
        async with s.post(site.url("/lock"), data=form | {"password": PASSWORD}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == back
        status, html, _ = await get(s, site.url(back))
        assert status == 200 and PATIENT in html
        async with s.get(site.url("/api/session")) as r:
            assert r.status == 200 and (await r.json())["csrf"] != me["csrf"], "a fresh session"
    assert await site.audit("sign-in-failed") == [{"account": "anne"}]
    assert await site.audit("session-unlocked") == [{"account": "anne", "via": "session"}]
    lines = [r.getMessage() for r in caplog.records]
    assert any("failed sign-in for account 'anne'" in line for line in lines)
    assert any("session of account 'anne' locked" in line for line in lines)
    assert any("session of account 'anne' unlocked" in line for line in lines)
    assert not any(PATIENT in line or PASSWORD in line for line in lines)


OFFSITE = ("https://evil.example/x", "//evil.example/x", "/\\evil.example", "http:/evil.example",
           "/\t/evil.example", "evil.example", "/login", "javascript:alert(1)", "/lock?next=//evil.example")


async def test_unlocking_never_leaves_this_server(site):
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        await signed_in(site, s)
        for target in OFFSITE:
            site.wait(MINUTE + 1)
            status, html, _ = await get(s, site.url("/lock"), params={"next": target})
            assert status == 200 and 'name="next" value="/inbox"' in html, target
            csrf = re.search(r'name="csrf" value="([^"]+)"', html)[1]
            async with s.post(site.url("/lock"), data={"csrf": csrf, "next": target, "password": PASSWORD},
                              allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/inbox", target
        site.wait(MINUTE + 1)
        status, html, _ = await get(s, site.url("/lock"), params={"next": "/outbox?x=1"})
        assert 'name="next" value="/outbox?x=1"' in html                 # a path here is kept as it is


async def test_lock_link_sign_out_and_lock_off(site):
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        me = await signed_in(site, s)
        status, html, _ = await get(s, site.url("/lock"))               # the Lock link: locked at once
        assert status == 200 and PATIENT not in html
        assert (await get(s, site.url("/inbox")))[0] == 303
        async with s.post(site.url("/lock/sign-out"), data={"csrf": me["csrf"]}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
        status, _, headers = await get(s, site.url("/inbox"))
        assert status == 303 and headers["Location"] == "/login"
    assert await site.audit("signed-out") == [{"account": "anne"}]
    lock.configure(site.web.runner.app, 0)                            # 0: the page never locks by itself
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        await signed_in(site, s)
        site.wait(20 * MINUTE)
        assert (await get(s, site.url("/inbox")))[0] == 200
        site.wait(site.node.accounts.idle_ms + 1)                     # the idle expiry still ends it
        status, _, headers = await get(s, site.url("/inbox"))
        assert status == 303 and headers["Location"] == "/login"


async def test_a_locked_session_still_expires_when_idle(site):
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        await signed_in(site, s)
        site.wait(MINUTE + 1)
        assert (await get(s, site.url("/inbox")))[0] == 303
        site.wait(site.node.accounts.idle_ms)
        status, _, headers = await get(s, site.url("/inbox"))
        assert status == 303 and headers["Location"] == "/login"
        status, _, headers = await get(s, site.url("/lock"))
        assert status == 303 and headers["Location"] == "/login"
    assert await site.audit("session-expired") == [{"account": "anne"}]


async def test_the_event_stream_of_a_locked_session_ends(site, monkeypatch):
    from node.faces.web import stream
    monkeypatch.setattr(stream, "RECHECK", 0.0)                       # re-check the caller on every turn
    monkeypatch.setattr(stream, "KEEPALIVE", 0.05)
    async with aiohttp.ClientSession(cookie_jar=jar()) as s:
        await signed_in(site, s)
        async with s.get(site.url("/api/events")) as r:
            assert r.status == 200
            assert await r.content.readline() == b"retry: 3000\n"
            site.wait(MINUTE + 1)
            rest = await asyncio.wait_for(r.content.read(), timeout=30)   # to the end: the stream ended
            assert rest.strip(b"\n").replace(b": keepalive", b"").strip() == b""


# --- in a browser --------------------------------------------------------------------------------

# what each page looked like as it was left (test instrumentation, injected by the browser, not the app)
LAST_LOOK = """window.addEventListener("pagehide", () => sessionStorage.setItem("left",
    location.pathname + "|" + (document.body.dataset.locked || "") + "|" + document.title + "|"
    + document.documentElement.outerHTML));"""


async def test_the_page_clears_itself_and_unlocking_returns_to_the_record(tmp_path, browser):
    node, rid = await with_record(tmp_path)
    web = await start_web(node, "127.0.0.1", 0)
    lock.configure(web.runner.app, 5 / 60)                # five seconds of real time, no input at all
    try:
        ctx = await browser.new_context(locale="fr-FR")
        await ctx.add_init_script(LAST_LOOK)
        page = await ctx.new_page()
        await sign_in(page, type("P", (), {"url": web.url, "account": "anne"})())
        await page.goto(f"{web.url}/records/{rid}")
        assert PATIENT in await page.inner_text("#patient")

        await page.wait_for_url(f"{web.url}/lock?next=*", timeout=60_000)
        assert URL(page.url).query["next"] == f"/records/{rid}"
        left = await page.evaluate("() => sessionStorage.getItem('left')")
        where, locked, title, html = left.split("|", 3)
        assert (where, locked, title) == (f"/records/{rid}", "on", ""), "the record page emptied itself first"
        assert PATIENT not in html and "Canarywood" not in html and "Douleur" not in html
        assert PATIENT not in await page.content() and "anne" in await page.inner_text("main")
        assert (await page.request.get(f"{web.url}/api/inbox")).status == 401        # the server agrees

        await page.fill("#password", PASSWORD)
        await page.click("#unlock-form button[type=submit]")
        await page.wait_for_url(f"{web.url}/records/{rid}")
        assert PATIENT in await page.inner_text("#patient")
        await ctx.close()
    finally:
        await web.close()
        await node.close()
