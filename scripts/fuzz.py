#!/usr/bin/env python3
"""Fuzz cabinet's parsers and its HTTP server for as long as you like.

    ./.venv/bin/python scripts/fuzz.py --minutes 10 [--target wire|envelope|descriptor|token|http]
                                       [--engine hypothesis|atheris] [--out DIR]
    ./.venv/bin/python scripts/fuzz.py --replay DIR/FILE.json

Targets: wire (canonical msgpack and the field helpers), envelope, descriptor, token (consent tokens
and PASERK keys): see fuzz_targets.py; http (a real node on 127.0.0.1): see fuzz_http.py. The time is
shared between the targets; each prints its examples per second and its failures. A failure is saved
as a JSON reproducer (target, entry, input, error) under the folder printed at the start.
`--engine atheris` lets libFuzzer drive the pure parsers (pip install atheris); http always uses
Hypothesis. tests/test_fuzz.py runs a short, derandomised pass of the same targets in the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--atheris-child" in sys.argv:              # coverage feedback from the project's own modules only
    import atheris
    with atheris.instrument_imports(include=["node"]):
        import node.core.consent, node.core.envelope, node.core.identity, node.core.wire  # noqa: E401, F401

from hypothesis import HealthCheck, settings  # noqa: E402

import fuzz_targets as T  # noqa: E402
from fuzz_targets import PURE, ROOT, PropertyFailed, Stats, fuzz_pure, run_case, seed_list  # noqa: E402


def replay(path: Path) -> int:
    try:
        case = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):            # a libFuzzer artifact: TARGET-crash-..., entry byte + input
        raw, target = path.read_bytes(), path.name.split("-")[0]
        case = {"target": target, "entry": PURE[target][raw[0] % len(PURE[target])].name, "data": raw[1:].hex()}
    if case["target"] == "http":
        import fuzz_http
        return fuzz_http.replay(case)
    entry = next(e for e in PURE[case["target"]] if e.name == case["entry"])
    try:
        run_case(entry, bytes.fromhex(case["data"]))
    except PropertyFailed as exc:
        traceback.print_exc()
        print(f"reproduced: {exc}")
        return 1
    print("no failure: the input is refused cleanly (or accepted) now")
    return 0


# --- command line ------------------------------------------------------------------------------

def save(out: Path, failure: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = f"{failure['target']}-{failure['entry']}-{hashlib.sha256(json.dumps(failure).encode()).hexdigest()[:10]}"
    path = out / f"{name}.json"
    path.write_text(json.dumps(failure, indent=1))
    return path


def long_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=False,
                    suppress_health_check=list(HealthCheck))


def report(out: Path, failure: dict) -> None:
    path = save(out, failure)
    print(f"  FAILURE in {failure['target']}: {failure['error']}\n  reproducer: {path}\n"
          f"  replay: ./.venv/bin/python scripts/fuzz.py --replay {path}", flush=True)


def run_hypothesis(target: str, seconds: float, out: Path) -> tuple[int, float, int]:
    """Rounds of Hypothesis until `seconds` pass; returns (examples, elapsed, failures saved)."""
    stats, start, found = Stats(), time.monotonic(), []

    def on_failure(failure: dict) -> None:
        found.append(failure)
        report(out, failure)
    if target == "http":
        import fuzz_http
        try:                                   # one node for the whole run: growth shows across rounds
            m = fuzz_http.fuzz(long_settings(300), stats, [], seconds=seconds, on_failure=on_failure,
                               max_rss_growth=256 << 20)
            print(f"  http: open files {m['fds'][0]} -> {m['fds'][1]}, "
                  f"memory {m['rss'][0] >> 20} -> {m['rss'][1] >> 20} MiB", flush=True)
        except PropertyFailed as exc:
            on_failure({"target": "http", "entry": "after-run", "error": str(exc), "request": None})
        return stats.examples, time.monotonic() - start, len(found)
    while time.monotonic() - start < seconds:
        failures: list = []
        try:
            fuzz_pure(target, long_settings(2000), stats, failures)
        except PropertyFailed:
            on_failure(failures[-1])
    return stats.examples, time.monotonic() - start, len(found)


def run_atheris_child(target: str, seconds: int, out: Path) -> int:
    """Run inside a child process: libFuzzer drives the pure entries; exits when time is up."""
    import atheris
    T.USE_ALARM = False                  # libFuzzer's -timeout owns SIGALRM
    entries = PURE[target]
    corpus = out / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, entry in enumerate(entries):
        for j, data in enumerate(seed_list()):
            (corpus / f"seed-{i}-{j}").write_bytes(bytes([i]) + data)

    def one_input(data: bytes) -> None:
        if data:
            run_case(entries[data[0] % len(entries)], data[1:])
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
                   f"-artifact_prefix={out}/{target}-", "-print_final_stats=1", str(corpus)], one_input)
    atheris.Fuzz()
    return 0


def run_atheris(target: str, seconds: float, out: Path) -> tuple[int, float, int]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--atheris-child", target, "--seconds", str(int(seconds)),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    runs = 0
    for line in proc.stderr.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            runs = int(line.split(":")[-1])
    crashes = [p for p in out.glob(f"{target}-*") if p.is_file()]
    for p in crashes:
        print(f"  FAILURE in {target}: libFuzzer artifact {p} (first byte = entry index, rest = input)")
    if proc.returncode not in (0,) and not crashes:
        print(proc.stderr[-2000:])
    return runs, time.monotonic() - start, len(crashes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fuzz cabinet's parsers and HTTP server (see the module docstring).")
    p.add_argument("--minutes", type=float, default=10.0, help="total time, shared between the targets")
    p.add_argument("--target", choices=[*PURE, "http"], action="append", help="repeatable; default: all")
    p.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis",
                   help="atheris drives the pure parsers only (http always uses hypothesis)")
    p.add_argument("--out", type=Path, default=None, help="where reproducers go")
    p.add_argument("--replay", type=Path, help="run one saved reproducer and say what happens")
    p.add_argument("--atheris-child", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("CABINET_KDF", "min")
    if args.replay:
        return replay(args.replay)
    if args.atheris_child:
        return run_atheris_child(args.atheris_child, args.seconds, args.out)
    out = args.out or Path(tempfile.gettempdir()) / f"cabinet-fuzz-{time.strftime('%Y%m%d-%H%M%S')}"
    targets = args.target or [*PURE, "http"]
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "node.log", level=logging.WARNING)     # the fuzzed node's own log
    share = args.minutes * 60 / len(targets)
    print(f"fuzzing {', '.join(targets)} for {args.minutes:g} min ({args.engine}); reproducers (and the node's log) "
          f"go to {out}", flush=True)
    total_failures = 0
    for target in targets:
        engine = run_atheris if args.engine == "atheris" and target != "http" else run_hypothesis
        n, elapsed, failed = engine(target, share, out)
        total_failures += failed
        print(f"{target:<11} {n:>9} examples in {elapsed:6.0f} s = {n / max(elapsed, 1e-9):8.0f} examples/s, "
              f"{failed} failure(s)", flush=True)
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
