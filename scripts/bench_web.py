"""The web app's speed: the inbox page with 10,000 records, and a large upload through the browser.

    .venv/bin/python scripts/bench_web.py [--records 10000] [--requests 50] [--size-mib 256]

Two practices (real `python -m node run --web 127.0.0.1:PORT` processes, Argon2id "min") in a
temporary folder that is removed at the end:

1. `--records` referrals are sealed at the colleague (the Python API, deliver=False: real envelopes,
   in one process) and delivered by its node to the practice; then `GET /inbox` (the first page,
   100 records, unread first) is fetched `--requests` times: time to first byte (the answer's headers)
   and to the whole page, p50/p99; against the filtered inbox (POST /inbox, "unread only"), which
   still opens every summary, measured in the same run.
2. A `--size-mib` attachment sent from the compose page in Debian's chromium (Playwright, with
   executable_path) until the record is stored at the colleague; then the same file sent with
   `python -m node send` (through the running node's control socket), timed the same way.

Bounded: two nodes on 127.0.0.1, `--requests` page loads, one browser, two large sends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (MiB, PASSPHRASE, ROOT, NodeProc, base_env, free_port, header, footer,  # noqa: E402
                          make_file, make_pair, percentile, temp_dir, time_limit, use_bench_env)

PASSWORD = "bench web password"
CHROMIUM = "/usr/bin/chromium"


def start(n: NodeProc, web_port: int, timeout: float = 60) -> None:
    cmd = [sys.executable, "-m", "node", "run", "--data", str(n.data), "--web", f"127.0.0.1:{web_port}"]
    n.proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = n.proc.stdout.readline()
        if not line:
            break
        n.log.append(line)
        if "listening on" in line:
            threading.Thread(target=n._drain, daemon=True).start()
            return
    n.proc.kill()
    raise RuntimeError(f"node {n.name} did not start:\n{''.join(n.log)}")


def add_user(n: NodeProc, account: str) -> None:
    subprocess.run([sys.executable, "-m", "node", "user", "add", account, "--role", "practitioner",
                    "--data", str(n.data)], cwd=ROOT, env=base_env(CABINET_USER_PASSWORD=PASSWORD),
                   check=True, capture_output=True, timeout=120)


def received(n: NodeProc) -> int:
    with sqlite3.connect(f"file:{n.data / 'cabinet.db'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT COUNT(*) FROM records WHERE direction = 'in'").fetchone()[0]


def wait_received(n: NodeProc, count: int, deadline: float, what: str) -> float:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if received(n) >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


async def seal_many(data: Path, to: str, count: int) -> None:
    from node import Node
    async with Node.open(data, passphrase=PASSPHRASE) as node:
        for i in range(count):
            await node.send_referral(to=to, patient=f"Patient{i} Test", born="1970-01-01", subject=f"n{i}",
                                     letter="Cher confrère,\n" + "x" * 500, deliver=False)


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1000:7.1f} ms  p99 {percentile(values, 99) * 1000:7.1f} ms"


async def inbox_speed(url: str, requests: int) -> tuple[list[float], list[float], list[float]]:
    import aiohttp
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(url + "/api/session", json={"account": "paul", "password": PASSWORD}) as r:
            csrf = (await r.json())["csrf"]
        first, whole, filtered = [], [], []
        for _ in range(requests):
            t0 = time.perf_counter()
            async with s.get(url + "/inbox") as r:
                first.append(time.perf_counter() - t0)
                body = await r.text()
                whole.append(time.perf_counter() - t0)
                assert r.status == 200 and "page 1" in body.lower(), r.status
        for _ in range(max(3, requests // 10)):
            t0 = time.perf_counter()
            async with s.post(url + "/inbox", data={"csrf": csrf, "unread": "1"}) as r:
                await r.read()
                filtered.append(time.perf_counter() - t0)
                assert r.status == 200
        return first, whole, filtered


async def browser_send(url: str, path: Path, cardio: NodeProc, before: int) -> tuple[float, float]:
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = await (await browser.new_context()).new_page()
        await page.goto(url + "/login")
        await page.fill("#account", "anne")
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit].primary")
        await page.wait_for_url(url + "/inbox")
        await page.goto(url + "/compose")
        await page.fill("#to-pick", "Durand")
        await page.click("#to-add")
        await page.fill("#patient", "Jeanne Martin")
        await page.fill("#letter", "Cher confrère, voir l'IRM.")
        await page.set_input_files("#files", str(path))
        t0 = time.monotonic()
        await page.click("#send")
        await page.wait_for_selector("#upload-bar[value='100']", timeout=1_800_000, state="attached")
        uploaded = time.monotonic()
        done = await asyncio.to_thread(wait_received, cardio, before + 1, 1800, "the browser's record")
        await page.wait_for_selector("#per-recipient li[data-state=delivered]", timeout=1_800_000)
        await browser.close()
    return uploaded - t0, done - t0


def cli_send(gp: NodeProc, cardio: NodeProc, path: Path, letter: Path, before: int) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "node", "send", "--data", str(gp.data), "--to", "Dr Paul Durand",
                    "--patient", "Jeanne Martin", "--letter", str(letter), "--again", str(path)],
                   cwd=ROOT, env=base_env(), check=True, capture_output=True, timeout=1800)
    return wait_received(cardio, before + 1, 1800, "the CLI's record") - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--size-mib", type=int, default=256)
    a = ap.parse_args()
    use_bench_env()
    header("web app: inbox page and browser upload")
    with temp_dir() as root, time_limit(3600):
        gp, cardio = make_pair(Path(root))
        add_user(gp, "anne")
        add_user(cardio, "paul")
        t0 = time.monotonic()
        asyncio.run(seal_many(gp.data, "Dr Paul Durand", a.records))
        print(f"{a.records} referrals sealed at the practice in {time.monotonic() - t0:.1f} s")
        gp_web, cardio_web = free_port(), free_port()
        start(cardio, cardio_web)
        start(gp, gp_web)
        try:
            t0 = time.monotonic()
            wait_received(cardio, a.records, 1800, "the records at the colleague")
            print(f"delivered to the colleague in {time.monotonic() - t0:.1f} s")
            first, whole, filtered = asyncio.run(inbox_speed(f"http://127.0.0.1:{cardio_web}", a.requests))
            print(f"GET /inbox, {a.records} records, 100 a page, {a.requests} requests:")
            print(f"  time to first byte   {ms(first)}")
            print(f"  whole page           {ms(whole)}")
            print(f"  filtered (POST, every summary opened), {len(filtered)} requests: {ms(filtered)}")
            print(f"  ratio filtered/paged (p50): {percentile(filtered, 50) / percentile(whole, 50):.1f}x")

            big = make_file(Path(root) / "irm.bin", a.size_mib * MiB)
            letter = Path(root) / "letter.txt"
            letter.write_text("Cher confrère, voir l'IRM.\n", encoding="utf-8")
            up, browser_total = asyncio.run(browser_send(f"http://127.0.0.1:{gp_web}", big, cardio,
                                                         received(cardio)))
            cli_total = cli_send(gp, cardio, big, letter, received(cardio))
            print(f"{a.size_mib} MiB attachment to 'delivered' at the colleague:")
            print(f"  browser (upload {up:.1f} s)   {browser_total:6.1f} s  {a.size_mib / browser_total:6.1f} MiB/s")
            print(f"  CLI (python -m node send)  {cli_total:6.1f} s  {a.size_mib / cli_total:6.1f} MiB/s")
            print(f"  ratio browser/CLI: {browser_total / cli_total:.2f}")
        finally:
            gp.stop()
            cardio.stop()
    footer()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
