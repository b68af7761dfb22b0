"""The web pages in a real browser (Debian's chromium through Playwright), over two real nodes in this process.

Each practice is a node serving its peer port and its web app on 127.0.0.1. The
tests sign in, send a 20 MB referral from the compose page and follow it to
"delivered", see it arrive live at the colleague (badge, notification), open
it and download the attachment; use compose and the inbox with the keyboard
only; and check that whatever a colleague sends is shown as text, never run.
Screenshots of each page go to $CABINET_SCREENSHOTS (or the test's tmp folder).
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from node.node import Card, cards, consent, now_ms
from node.faces.web import patients_pages
from node.faces.web.pages import PAGES, PUBLIC
from _browser import PASSWORD, UNLABELLED, browser, close, practice, screenshots, sign_in, tab_to, until  # noqa: F401 (a fixture)

PATIENT = "Jeanne Zéphyrine Martin"
MB = 1024 * 1024


@pytest.fixture
async def pair(tmp_path):
    a = await practice(tmp_path, "Dr Anne Martin", "anne", city="Lyon", specialty="médecine générale")
    b = await practice(tmp_path, "Dr Paul Durand", "paul", city="Lyon", specialty="cardiologie")
    await a.node.add_contact(b.node.descriptor.signed)
    await b.node.add_contact(a.node.descriptor.signed)
    yield a, b
    await close(a, b)


def watch_urls(context, seen: list[str]) -> None:
    context.on("request", lambda request: seen.append(request.url))


def no_patient_in(urls: list[str], *names: str) -> None:
    for name in names:
        forms = {name, quote(name), quote_plus(name), name.split()[-1], quote(name.split()[-1])}
        bad = [u for u in urls for f in forms if f in u]
        assert not bad, f"patient data in a URL: {bad[:3]}"


async def unlabelled(page) -> list[str]:
    return await page.evaluate(UNLABELLED)


async def test_referral_from_compose_to_download(pair, browser, tmp_path):
    a, b = pair
    shots = screenshots(tmp_path)
    data = os.urandom(20 * MB)
    big = tmp_path / "irm-thorax.bin"
    big.write_bytes(data)
    urls: list[str] = []
    ctx_a = await browser.new_context(locale="fr-FR")
    ctx_b = await browser.new_context(locale="fr-FR")
    await ctx_b.grant_permissions(["notifications"], origin=b.url)
    for ctx in (ctx_a, ctx_b):
        watch_urls(ctx, urls)
    pa, pb = await ctx_a.new_page(), await ctx_b.new_page()

    await pa.goto(a.url + "/login")
    assert await unlabelled(pa) == []
    await pa.screenshot(path=str(shots / "login.png"))
    await sign_in(pa, a)
    await sign_in(pb, b)
    await pb.click("#notify")                                  # the permission is asked on a click
    await pb.wait_for_selector("body[data-live=on]")           # the event stream is open

    await pa.goto(a.url + "/compose")
    assert await unlabelled(pa) == []
    await pa.fill("#to-pick", "cardio")                        # part of the specialty shown in the list
    await pa.click("#to-add")
    await pa.wait_for_selector("#to-list li")
    assert "Dr Paul Durand" in await pa.inner_text("#to-list")
    await pa.fill("#patient", PATIENT)
    await pa.fill("#born", "02/04/1961")
    await pa.fill("#subject", "Douleur thoracique")
    await pa.fill("#letter", "Cher confrère,\nmerci de voir cette patiente.\nBien confraternellement.")
    await pa.set_input_files("#files", str(big))
    await pa.wait_for_selector("#file-list li")
    await pa.screenshot(path=str(shots / "compose.png"), full_page=True)
    await pa.click("#send")
    row = pa.locator("#per-recipient li")
    await row.first.wait_for()
    await pa.wait_for_selector("#per-recipient li[data-state=delivered]", timeout=90_000)
    assert await pa.eval_on_selector("#upload-bar", "e => e.value") == 100
    assert await pa.eval_on_selector("#per-recipient li progress", "e => e.value") == 100
    assert "remis" in await row.first.inner_text()
    await pa.screenshot(path=str(shots / "compose-delivered.png"), full_page=True)
    rid = await pa.eval_on_selector("#send-form", "f => f.dataset.recordId")

    # the colleague: a badge and a notification arrive live, then the record and its attachment
    await pb.wait_for_selector("#badge[data-count='1']")
    await pb.wait_for_selector("body[data-notified='1']")
    assert await pb.is_visible("#live")
    await pb.click("#live a")
    await pb.wait_for_selector(f"tr[data-id='{rid}'].unread")
    await pb.screenshot(path=str(shots / "inbox.png"), full_page=True)
    async with pb.expect_response(lambda r: r.url.endswith(f"/records/{rid}")) as answer:
        await pb.click(f"tr[data-id='{rid}'] a")
    assert (await answer.value).headers["cache-control"] == "no-store"
    assert "merci de voir cette patiente" in await pb.inner_text("#letter")
    assert PATIENT in await pb.inner_text("#patient")
    assert "20.0 Mio" in await pb.inner_text("table.files")
    await pb.screenshot(path=str(shots / "record.png"), full_page=True)
    async with pb.expect_download() as download:
        await pb.click("table.files a[download]")
    path = await (await download.value).path()
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await pb.get_attribute("#badge", "data-count") == "0"      # read now: no longer counted

    # the sender's outbox: delivered, then "opened" when the colleague's receipt comes back (live)
    await pa.goto(a.url + "/outbox")
    await pa.wait_for_selector(f"tr[data-record='{rid}'] .state[data-state=opened]", timeout=90_000)
    await pa.screenshot(path=str(shots / "outbox.png"), full_page=True)
    for where, page in (("contacts", pa), ("status", pa)):
        await page.goto(a.url + f"/{where}")
        assert await unlabelled(page) == []
        await page.screenshot(path=str(shots / f"{where}.png"), full_page=True)
    async with pa.expect_download() as download:                      # still on the status page
        await pa.click("a[href='/status/audit-head']")
    head = open(await (await download.value).path(), encoding="utf-8").read()
    assert head.startswith("cabinet-audit-head:")
    await pa.goto(a.url + "/contacts")
    await pa.click("table.contacts a")
    await pa.wait_for_selector("#safety")
    assert await pa.locator("figure.qr svg").count() == 1
    await pa.screenshot(path=str(shots / "contact.png"), full_page=True)
    no_patient_in(urls, PATIENT)
    await ctx_a.close()
    await ctx_b.close()


async def test_compose_and_inbox_by_keyboard_alone(pair, browser):
    a, b = pair
    ctx = await browser.new_context(locale="fr-FR")
    page = await ctx.new_page()
    await sign_in(page, a)
    await page.goto(a.url + "/compose")
    await tab_to(page, "#to-pick")
    await page.keyboard.type("lyon durand")                      # city and name, any case
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#to-list li")
    for field, text in (("#patient", "Jeanne Martin"), ("#subject", "Palpitations"),
                        ("#letter", "Cher confrère, merci.")):
        await tab_to(page, field)
        await page.keyboard.type(text)
    await tab_to(page, "#born")
    await page.keyboard.type("02/04/1961")                          # jj/mm/aaaa, as written in France
    await tab_to(page, "#send")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#per-recipient li[data-state=delivered]", timeout=90_000)

    page_b = await (await browser.new_context(locale="fr-FR")).new_page()
    await sign_in(page_b, b)
    await until(lambda: _arrived(b), "the record at the colleague")
    assert (await b.node.inbox())[0].born == "1961-04-02"
    await page_b.goto(b.url + "/inbox")
    assert await unlabelled(page_b) == []
    await tab_to(page_b, "#f-patient")
    await page_b.keyboard.type("MARTIN jeanne")                     # other order, other case
    await tab_to(page_b, "#f-born")
    await page_b.keyboard.type("2/4/1961")
    await page_b.keyboard.press("Enter")
    await page_b.wait_for_selector("#count")
    assert page_b.url == b.url + "/inbox"                           # the filter went in a POST, not the URL
    assert await page_b.locator("#records tbody tr").count() == 1
    await tab_to(page_b, "#records tbody a")
    await page_b.keyboard.press("Enter")
    await page_b.wait_for_selector("#letter")
    assert "Cher confrère" in await page_b.inner_text("#letter")
    await ctx.close()


async def _arrived(p) -> bool:
    return bool(await p.node.inbox())


HOSTILE_SUBJECT = '<img src=x onerror="window.__xss=1">Urgent'
HOSTILE_LETTER = '<script>window.__xss=2</script><b>gras</b> <img src=x onerror="window.__xss=3">'
HOSTILE_PATIENT = '<svg onload="window.__xss=4">Jeanne</svg> Martin'


async def test_what_a_colleague_sends_is_shown_as_text(pair, browser, tmp_path):
    a, b = pair
    page_text = tmp_path / '<img src=x onerror="window.__xss=5">.txt'
    page_text.write_text('<script>window.__xss=6</script>', encoding="utf-8")
    page_html = tmp_path / "page.html"
    page_html.write_text('<script>window.__xss=7</script>', encoding="utf-8")
    sent = await a.node.send_referral(to="Dr Paul Durand", patient=HOSTILE_PATIENT, subject=HOSTILE_SUBJECT,
                                      letter=HOSTILE_LETTER, attachments=[page_text, page_html])
    await until(lambda: _arrived(b), "the record at the colleague")
    page = await (await browser.new_context()).new_page()
    await sign_in(page, b)
    inbox_text = await page.inner_text("#records")
    assert HOSTILE_SUBJECT in inbox_text and "<svg onload=" in inbox_text
    await page.click(f"tr[data-id='{sent.record_id}'] a")
    await page.wait_for_selector("#letter")
    assert await page.inner_text("#letter") == HOSTILE_LETTER
    assert await page.locator("#letter b, img[src=x], main svg, main script").count() == 0
    assert '<img src=x onerror="window.__xss=5">.txt' in await page.inner_text("table.files")
    frames = page.locator("figure.preview iframe")
    assert await frames.count() == 1                                 # the text file; never the HTML one
    frame = page.frame_locator("figure.preview iframe")
    assert "<script>window.__xss=6</script>" in await frame.locator("body").inner_text()
    for f in page.frames:
        assert await f.evaluate("() => typeof window.__xss") == "undefined"
    headers = await page.evaluate("""async u => { const r = await fetch(u);
        return [r.headers.get('content-type'), r.headers.get('content-disposition')]; }""",
                                  f"/api/records/{sent.record_id}/attachments/1")
    assert headers[0] == "text/html" and headers[1].startswith("attachment;")


async def test_pages_need_a_session_and_keep_patients_out_of_caches(pair):
    a, _ = pair
    walked = 0
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        for route in a.web.runner.app.router.routes():            # every page the app serves, not the API
            canonical = route.resource.canonical
            if canonical.startswith(("/api/", "/static", "/metrics")) or (route.method, canonical) in PUBLIC:
                continue
            path = (canonical.replace("{id}", "0" * 32).replace("{node_id}", "X").replace("{action}", "verify")
                    .replace("{ref}", "P-1"))
            async with s.request(route.method, a.url + path, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/login", (route.method, path)
            walked += 1
        assert walked == len(PAGES) + len(patients_pages.PAGES) - len(PUBLIC) >= 17
        async with s.post(a.url + "/login", data={"account": "anne", "password": "wrong password!"}) as r:
            assert r.status == 401 and "incorrect" in await r.text()

        async def signed_in() -> bool:                                 # failed sign-ins are slowed down
            async with s.post(a.url + "/login", data={"account": "anne", "password": PASSWORD},
                              allow_redirects=False) as r:
                assert r.status in (303, 429), r.status
                assert r.status == 303 or "réessayez dans" in await r.text()
                return r.status == 303
        await until(signed_in, "the sign-in to be allowed again")
        async with s.get(a.url + "/inbox") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with s.post(a.url + "/inbox", data={"patient": "martin"}) as r:
            assert r.status == 403                                     # no CSRF token
        async with s.post(a.url + "/inbox", data={"patient": "martin"},
                          headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with s.get(a.url + "/static/app.js") as r:
            assert r.status == 200 and "EventSource" in await r.text()
        async with s.post(a.url + "/lang", data={"lang": "en", "back": "//evil.example/"},
                          allow_redirects=False) as r:
            assert r.headers["Location"] == "/inbox"
        async with s.get(a.url + "/inbox") as r:
            assert "Sign out" in await r.text()


async def test_add_a_colleague_from_an_email_and_verify(pair, browser, tmp_path):
    a, _ = pair
    c = await practice(tmp_path, "Dr Claire Petit", "claire", city="Annecy", specialty="dermatologie")
    try:
        page = await (await browser.new_context()).new_page()
        await sign_in(page, a)
        await page.goto(a.url + "/contacts")
        mail = ("Bonjour Anne,\n\nvoici ma fiche pour cabinet :\n\n> " + c.node.descriptor.to_text()
                + "\n\nBien à vous,\nClaire")
        await page.fill("#source", mail)
        await page.click("form[action='/contacts/add'] button.primary")
        await page.wait_for_selector("p.note")
        assert "Dr Claire Petit" in await page.inner_text("table.contacts")
        await page.click("table.contacts a >> text=Dr Claire Petit")
        code = await page.inner_text("#safety")
        _, expected = await a.node.safety_code(c.node.node_id)
        assert code == expected
        await page.click("form[action$='/verify'] button")
        await page.wait_for_selector("#safety")
        assert (await a.node.contact(c.node.node_id))["verified"]
        assert await page.locator("form[action$='/verify']").count() == 0
    finally:
        await close(c)


# --- patients, audit and status (issue 10, items 7 and 8) -------------------------------------

async def _audit_events(p) -> list[tuple[str, str]]:
    return await p.node.store.call(lambda db: [(r[0], r[1] or "") for r in db.conn.execute(
        "SELECT event, detail FROM audit ORDER BY seq")])


async def test_patients_by_keyboard_alone(pair, browser, tmp_path):
    a, b = pair
    shots = screenshots(tmp_path)
    sent = await b.node.send_referral(to="Dr Anne Martin", patient=PATIENT, subject="Bilan", letter="Compte rendu.")
    await until(lambda: _arrived(a), "the record at the practice")
    page = await (await browser.new_context(locale="fr-FR")).new_page()
    await sign_in(page, a)

    # enrol: the card is printed from the browser (text and an inline SVG QR code, made on the server)
    await page.goto(a.url + "/patients")
    assert await unlabelled(page) == []
    await tab_to(page, "#enroll-ref")
    await page.keyboard.type("P-1001")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#card-text")
    text = await page.inner_text("#card-text")
    card = Card.parse(text)
    assert card.patient_ref == "P-1001" and card.practice == a.node.node_id and card.seed is not None
    assert await page.locator("#card figure.qr svg").count() == 1
    assert await unlabelled(page) == []
    await page.screenshot(path=str(shots / "patient-card.png"), full_page=True)

    # link the colleague's record to the patient, from the record page
    await page.goto(a.url + f"/records/{sent.record_id}")
    assert await unlabelled(page) == []
    await tab_to(page, "#link-patient")
    await page.keyboard.type("P-1001")
    await tab_to(page, "#link-category")
    await page.keyboard.type("cardiologie")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#linked-note")

    # break-glass for the colleague (the only contact: first in the list), by keyboard
    await page.goto(a.url + "/patients")
    await tab_to(page, "#glass-who")
    await tab_to(page, "#glass-allow")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#policy >> text=Dr Paul Durand")
    assert [r["requester"] for r in await a.node.patients.break_glass_policy()] == [b.node.node_id]

    # the colleague uses a grant (then revoked by the patient) and an emergency request
    token = cards.grant(card, to=b.node.node_id, scope="all", days=1, now=now_ms())
    jti = consent.check_grant(token, patient_public_keys={card.key_id: card.public_key},
                              expected_audience=b.node.node_id, now=now_ms(), revoked=()).jti
    assert len(await b.node.patients.request(a.node.node_id, token=token, pull=False)) == 1
    assert await a.node.patients.apply_revocation(cards.revocation(card, jti, now=now_ms())) == jti
    await b.node.patients.request(a.node.node_id, emergency="inconsciente aux urgences de Lyon",
                                  patient="P-1001", pull=False)

    await page.goto(a.url + "/patients")
    await tab_to(page, "#patients a")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#history")
    assert await unlabelled(page) == []
    assert "P-1001" in await page.inner_text("#ref")
    grants = await page.inner_text("#grants")
    assert jti in grants and "Dr Paul Durand" in grants and "révoquée" in grants
    for event in ("patient-enrolled", "patient-linked", "grant-used", "access-sent", "grant-revoked", "break-glass"):
        assert await page.locator(f"#history tr[data-event='{event}']").count() >= 1, event
    assert sent.record_id[:10] in await page.inner_text("#linked")
    await page.screenshot(path=str(shots / "patient.png"), full_page=True)

    # every action names the account, never the patient's reference
    events = await _audit_events(a)
    for event in ("patient-enrolled-by", "patient-linked-by", "break-glass-allowed-by", "history-viewed-by"):
        details = [d for e, d in events if e == event]
        assert details and all('"anne"' in d and "P-1001" not in d for d in details), event


async def test_patients_are_for_practitioners_only(pair):
    a, _ = pair
    await a.node.accounts.add_user("claire", "secretary", PASSWORD)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(a.url + "/login", data={"account": "claire", "password": PASSWORD}) as r:
            assert r.status == 200 and 'href="/patients"' not in await r.text()
        async with s.get(a.url + "/patients") as r:
            assert r.status == 403 and "praticiens" in await r.text()
    assert await a.node.patients_list() == []


async def test_status_page_by_keyboard(pair, browser, tmp_path):
    a, _ = pair
    c = await practice(tmp_path, "Dr Claire Petit", "claire", city="Annecy")
    await a.node.add_contact(c.node.descriptor.signed)
    await close(c)                                               # gone: what is sent to it waits
    queued = await a.node.send_referral(to="Dr Claire Petit", patient=PATIENT, letter="x", deliver=False)
    await a.node.raise_alert("test-rule", "a test subject", 1, "something needs a person")
    page = await (await browser.new_context(locale="fr-FR")).new_page()
    await sign_in(page, a)
    await page.goto(a.url + "/status")
    assert await unlabelled(page) == []
    assert await page.inner_text("#queued") == "1"
    assert await page.inner_text("#oldest") != "—"
    assert "intact" in await page.inner_text("#audit")
    assert "something needs a person" in await page.inner_text("#alerts")
    assert "arrêtée" in await page.inner_text("#lan")                # this node does not run its LAN
    assert await page.inner_text("#disk")
    await page.screenshot(path=str(shots_of(tmp_path) / "status.png"), full_page=True)
    await tab_to(page, "#audit-head")
    async with page.expect_download() as download:
        await page.keyboard.press("Enter")
    head = open(await (await download.value).path(), encoding="utf-8").read()
    assert head.startswith("cabinet-audit-head:")
    assert queued.record_id


def shots_of(tmp_path):
    return screenshots(tmp_path)


async def test_inbox_pages_unread_first(pair):
    a, b = pair
    for i in range(3):
        await b.node.send_referral(to="Dr Anne Martin", patient=f"Patient {i}", subject=f"S{i}", letter="x")
    await until(lambda: _count(a, 3), "three records at the practice")
    first = (await a.node.inbox())[-1]                                  # the oldest
    await a.node.read(first.id)
    rows, total, unread = await a.node.inbox_page(0, 2)
    assert (total, unread) == (3, 2) and [r.opened for r in rows] == [None, None]
    rows, _, _ = await a.node.inbox_page(2, 2)
    assert [r.id for r in rows] == [first.id]                           # read: last, on the second page
    assert await a.node.unread_count() == 2


async def _count(p, n: int) -> bool:
    return len(await p.node.inbox()) >= n
