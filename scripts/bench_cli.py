"""p50 wall time of `cabinet inbox`, `outbox` and `show` while the node runs (answered through its
control socket, no passphrase), and the ratio to `python -c pass` measured in the same run.

    .venv/bin/python scripts/bench_cli.py [--runs 15] [--lazy-package]

Two practices are made in a temporary folder (Argon2id "min" profile), one referral is sent
between them, then each command is run `--runs` times as a fresh process. `--lazy-package` also
measures the same commands from a copy of the tree whose node/__init__.py imports the facade
lazily (the change docs/cli.md asks for): what the CLI costs once `import node` is light.
Bounded: a few dozen processes, two nodes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASS = "bench horse battery"
LAZY_INIT = '''"""cabinet (lazy: `import node` does not load the facade until Node is used)."""

from .core.errors import CabinetError

__all__ = ["Node", "CabinetError"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Node":
        from .node import Node
        return Node
    raise AttributeError(name)
'''


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CABINET_")}
    e.update(CABINET_KDF="min", PYTHONUNBUFFERED="1", **extra)
    return e


def cabinet(data: Path, *args: str, passphrase: bool = True, cwd: Path = ROOT) -> str:
    e = env(CABINET_PASSPHRASE=PASS) if passphrase else env()
    proc = subprocess.run([sys.executable, "-m", "node", *args, "--data", str(data)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"cabinet {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "node", "run", "--no-web", "--no-lan", "--data", str(data)],
                            cwd=ROOT, env=env(CABINET_PASSPHRASE=PASS), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening" in line:
            # read on: a pipe nobody reads fills, and the node then stops at its next log line
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
        if not line:
            break
    proc.kill()
    raise SystemExit("the node did not start")


def p50(cmd: list[str], runs: int, cwd: Path) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--lazy-package", action="store_true")
    a = ap.parse_args()
    runs = max(3, min(a.runs, 100))
    tmp = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    procs: list[subprocess.Popen] = []
    try:
        gp, cardio = tmp / "gp", tmp / "cardio"
        for data, name in ((gp, "Dr A"), (cardio, "Dr B")):
            cabinet(data, "init", "--name", name, "--listen", f"127.0.0.1:{free_port()}", "--no-lan")
        for x, y in ((gp, cardio), (cardio, gp)):
            cabinet(x, "id", "--export", str(tmp / f"{x.name}.txt"))
            cabinet(y, "contact", "add", str(tmp / f"{x.name}.txt"))
        procs = [start(gp), start(cardio)]
        (tmp / "letter.txt").write_text("Cher confrère, ...\n")
        out = cabinet(gp, "send", "--to", "Dr B", "--patient", "Jeanne Martin", "--letter", str(tmp / "letter.txt"))
        rid = out.split()[1]
        trees = [("as is", ROOT)]
        if a.lazy_package:
            copy = tmp / "tree"
            shutil.copytree(ROOT / "node", copy / "node", ignore=shutil.ignore_patterns("__pycache__"))
            (copy / "node" / "__init__.py").write_text(LAZY_INIT)
            trees.append(("lazy node/__init__", copy))
        base = p50([sys.executable, "-c", "pass"], runs, ROOT)
        print(f"python -c pass: p50 {base * 1000:.0f} ms ({runs} runs)")
        for label, tree in trees:
            for args in (["inbox"], ["outbox"], ["show", rid]):
                data = cardio if args[0] != "outbox" else gp
                t = p50([sys.executable, "-m", "node", *args, "--data", str(data)], runs, tree)
                print(f"[{label}] cabinet {args[0]:7} p50 {t * 1000:5.0f} ms  ratio {t / base:5.1f}x python -c pass")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
