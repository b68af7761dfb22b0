"""mypy passes on node/ and bootstrap/: strict on the pure core and sync, default elsewhere.

The configuration is [tool.mypy] in pyproject.toml; this runs it as `./scripts/test` does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mypy exited {run.returncode}:\n{run.stdout}{run.stderr}"


def test_the_core_and_sync_are_checked_strictly_and_the_rest_by_default(tmp_path):
    for folder in ("node", "bootstrap"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    untyped = "def probe(x):\n    return x\n"
    for folder in ("core", "sync", "app", "store"):
        (tmp_path / "node" / folder / "_probe_untyped.py").write_text(untyped)
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    flagged = {line.split(":")[0] for line in run.stdout.splitlines() if "[no-untyped-def]" in line}
    probes = {f"node/{folder}/_probe_untyped.py" for folder in ("core", "sync", "app", "store")}
    assert flagged & probes == {"node/core/_probe_untyped.py", "node/sync/_probe_untyped.py"}, run.stdout
