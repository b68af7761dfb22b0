"""Every benchmark on two checkouts in the same run: did a change make anything slower?

    .venv/bin/python scripts/bench_compare.py --base 306bb6c          # (~15 min)
    .venv/bin/python scripts/bench_compare.py --base HEAD~3 --only envelope,small

The base commit is unpacked (git archive) into a temporary folder; each
benchmark then runs on the base and on this working tree in turn, `--rounds`
times (base, new, base, new, ...), so both see the same machine at the same
moments, and the best figure of each side is kept. Both sides use this
checkout's virtual environment with their own source first on the import
path. A figure worse by more than `--tolerance` (5 % by default) is marked
WORSE and the script exits 1.

What is compared is the figure each benchmark prints against its own
baseline measured in the same run (a ratio), and the absolute rate beside it,
so a slower machine moment shows up in both sides' baselines, not as a
regression.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Metric:
    name: str
    pattern: str          # one group: the number (commas allowed)
    higher_is_better: bool = True


@dataclass(frozen=True)
class Bench:
    key: str
    script: str
    args: tuple[str, ...]
    metrics: tuple[Metric, ...]


BENCHES = (
    Bench("envelope", "scripts/bench_envelope.py", ("--size-mib", "128", "--repeat", "3", "--quiet-wait", "5",
                                                    "--no-prime"),
          (Metric("seal+open / raw secretstream", r"seal\+open ([\d.]+)"),)),
    Bench("small", "scripts/bench_small.py", ("--count", "300"),
          (Metric("referrals/s / bare HTTP POST", r"ratio cabinet / bare HTTP POST 5 KB:\s+([\d.]+)"),
           Metric("referral median ms", r"delivery [\d.]+ ms of ([\d.]+) ms", higher_is_better=False))),
    Bench("sync", "scripts/bench_sync.py", ("--count", "3000", "--resume-mib", "128"),
          (Metric("catch-up records/s", r"catch-up:\s+\d+ records in [\d.]+ s = ([\d,]+) records/s"),
           Metric("catch-up / direct write", r"ratio:\s+([\d.]+)"))),
    Bench("delivery", "scripts/bench_delivery.py", ("--sizes", "256", "--quiet-wait", "5", "--no-prime"),
          (Metric("256 MiB cabinet MiB/s", r"^\s+256 MiB\s+\d+\s+(\d+)\s+[\d.]+", ),
           Metric("256 MiB cabinet / bare aiohttp", r"^\s+256 MiB\s+\d+\s+\d+\s+([\d.]+)"))),
)


def unpack(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def compile_tree(tree: Path) -> None:
    """Bytecode for every module, as an installed package has: otherwise each node process of a
    benchmark compiles the whole tree from source at start (PYTHONDONTWRITEBYTECODE below), which
    a larger tree pays for in every figure that counts a process's start."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(tree / d) for d in ("node", "bootstrap", "relay")
                                                                 if (tree / d).is_dir())],
                   check=True, capture_output=True)


def run(bench: Bench, tree: Path, timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(tree / bench.script), *bench.args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{bench.script} failed in {tree}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def figure(metric: Metric, output: str) -> float | None:
    found = re.findall(metric.pattern, output, flags=re.M)
    return float(found[-1].replace(",", "")) if found else None


def best(metric: Metric, values: list[float]) -> float | None:
    return (max if metric.higher_is_better else min)(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against (e.g. 306bb6c)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(b.key for b in BENCHES))
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=1200, help="per benchmark run, seconds")
    a = ap.parse_args()
    chosen = [b for b in BENCHES if not a.only or b.key in a.only.split(",")]
    worse = 0
    with tempfile.TemporaryDirectory(prefix="cabinet-bench-base-") as tmp:
        base = unpack(a.base, Path(tmp))
        trees = {"base": base, "new": ROOT}
        for tree in trees.values():
            compile_tree(tree)
        print(f"base: {a.base} unpacked in {base}; new: {ROOT} (working tree)\n")
        print(f"{'benchmark':36}{'base':>12}{'new':>12}{'new/base':>10}")
        for bench in chosen:
            seen: dict[str, dict[str, list[float]]] = {side: {m.name: [] for m in bench.metrics} for side in trees}
            for _ in range(a.rounds):
                for side, tree in trees.items():
                    t0 = time.monotonic()
                    out = run(bench, tree, a.timeout)
                    for m in bench.metrics:
                        value = figure(m, out)
                        if value is not None:
                            seen[side][m.name].append(value)
                    print(f"   ({bench.key}, {side}: {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            for m in bench.metrics:
                b, n = best(m, seen["base"][m.name]), best(m, seen["new"][m.name])
                if b is None or n is None:
                    print(f"{m.name:36}{'?':>12}{'?':>12}   (not found in the output)")
                    worse += 1
                    continue
                ratio = n / b if m.higher_is_better else b / n
                flag = "  WORSE" if ratio < 1 - a.tolerance else ""
                worse += bool(flag)
                print(f"{m.name:36}{b:12.2f}{n:12.2f}{ratio:10.2f}{flag}")
    print(f"\nnew/base > 1 is better (for times, base/new); WORSE = more than {a.tolerance:.0%} worse")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
