#!/usr/bin/env python3
"""Idle RSS of `cabinet run` with metrics and alerts on (issue 12: at most 60 MiB).

Makes a node in a temporary folder (CABINET_KDF=interactive, the small-box setting),
runs `cabinet run --no-lan` (the web app and /metrics on, the alert service and the
event log running), scrapes /metrics once with an admin token, lets it idle, and reads
VmRSS and VmHWM from /proc. Prints one line per measure; exits 1 above the limit.

    .venv/bin/python scripts/bench_idle.py [--idle SECONDS]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60
PASS = "bench idle passphrase"


def rss(pid: int) -> tuple[float, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024   # noqa: E731
    return get("VmRSS"), get("VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=20.0, help="seconds to idle before measuring (default 20)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CABINET_")}
    env.update(CABINET_KDF="interactive", CABINET_PASSPHRASE=PASS, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "node"
        run = lambda *a: subprocess.run([sys.executable, "-m", "node", *a, "--data", str(data)], cwd=ROOT,   # noqa: E731
                                        env=env, capture_output=True, text=True, check=True, timeout=120)
        run("init", "--name", "Dr Bench", "--listen", "127.0.0.1:0", "--no-lan")
        token = run("token", "add", "prometheus", "--scope", "admin").stdout.strip().split()[-1]
        proc = subprocess.Popen([sys.executable, "-m", "node", "run", "--data", str(data), "--no-lan",
                                 "--web", "127.0.0.1:0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            web = None
            deadline = time.monotonic() + 120
            while web is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit(f"cabinet run ended: exit {proc.wait()}")
                m = re.search(r"web app and local API on (http://\S+)", line)
                web = m.group(1) if m else None
            started = rss(proc.pid)
            req = urllib.request.Request(web + "/metrics", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 200 and b"cabinet_disk_free_bytes" in resp.read()
            time.sleep(args.idle)               # a benchmark: the node idles for a fixed time on purpose
            now, peak = rss(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"idle RSS at start      {started[0]:.1f} MiB")
    print(f"idle RSS after {args.idle:g} s   {now:.1f} MiB (peak {peak:.1f} MiB; limit {LIMIT_MIB} MiB)")
    return 0 if now <= LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
