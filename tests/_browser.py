"""Helpers for the browser tests: Debian's chromium driven by Playwright's Python API, and practices to drive.

Playwright's own browser downloads are never used (no `playwright install`): the
browser is /usr/bin/chromium, which scripts/_browser.sh installs. When it or the
playwright package is missing, `launch` fails the test with one line saying so.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PASSPHRASE
from node import Node
from node.faces.web.server import WebServer, start_web

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "a long enough password"
DEADLINE = 90.0


def _missing() -> str | None:
    why = os.environ.get("CABINET_BROWSER_MISSING")
    if why:
        return why
    if not os.access(CHROMIUM, os.X_OK):
        return f"browser tests: {CHROMIUM} is missing (scripts/_browser.sh installs it: apt-get install chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "browser tests: the playwright package is missing (scripts/_browser.sh installs it: pip install playwright)"
    return None


async def launch(pw):
    why = _missing()
    if why:
        pytest.fail(why, pytrace=False)
    return await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("CABINET_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {folder}")
    return folder


@dataclass
class Practice:
    node: Node
    web: WebServer
    account: str

    @property
    def url(self) -> str:
        return self.web.url


async def practice(tmp_path: Path, name: str, account: str, role: str = "practitioner",
                   **init) -> Practice:
    await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False, **init)
    node = await Node.open_node(tmp_path / name, passphrase=PASSPHRASE)
    await node.serve("127.0.0.1:0")
    await node.accounts.add_user(account, role, PASSWORD)
    return Practice(node, await start_web(node, "127.0.0.1", 0), account)


async def close(*practices: Practice) -> None:
    for p in practices:
        await p.web.close()
        await p.node.close()


async def sign_in(page, p: Practice, account: str | None = None) -> None:
    await page.goto(p.url + "/login")
    await page.fill("#account", account or p.account)
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit].primary")
    await page.wait_for_url(p.url + "/inbox")


async def until(predicate, what: str, deadline: float = DEADLINE):
    """Wait on a condition (never a bare sleep to synchronise), failing with `what` at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


UNLABELLED = """() => Array.from(document.querySelectorAll('input, select, textarea, button'))
    .filter(el => el.type !== 'hidden' && !el.hidden)
    .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !(el.tagName === 'BUTTON' && el.textContent.trim()))
    .map(el => el.outerHTML.slice(0, 120))"""


async def tab_to(page, selector: str, limit: int = 60) -> None:
    """Press Tab until `selector` has the focus (keyboard only), failing if it never does."""
    for _ in range(limit):
        if await page.evaluate("s => document.activeElement && document.activeElement.matches(s)", selector):
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"{selector} cannot be reached with the Tab key")


@pytest.fixture
async def browser():
    """One headless chromium per test (import this fixture into the test module)."""
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        chromium = await launch(pw)
        yield chromium
        await chromium.close()
