"""A bounded fuzzing pass in the normal suite: parsers and the HTTP server under random and mutated input.

The targets live in scripts/fuzz_targets.py (pure parsers) and scripts/fuzz_http.py (a real node
on 127.0.0.1); scripts/fuzz.py runs the same targets for as long as asked. Here each runs a fixed,
derandomised number of examples, so the pass is the same on every run. Hypothesis' own deadline is
off: hangs are caught by the harness' alarm (HANG_SECONDS) and socket timeouts, far above normal.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import fuzz_http  # noqa: E402
import fuzz_targets as T  # noqa: E402

BOUNDED = settings(max_examples=250, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck), print_blob=True)

# How many different refusals each target must have produced: proof that inputs got past the
# first check (a harness feeding only noise would see "malformed" and nothing else).
MIN_REFUSAL_KINDS = {"wire": 3, "envelope": 8, "descriptor": 12, "token": 12}


def run(target: str) -> T.Stats:
    stats, failures = T.Stats(), []
    try:
        T.fuzz_pure(target, BOUNDED, stats, failures)
    except T.PropertyFailed:
        f = failures[-1]
        pytest.fail(f"{f['error']}\nentry {f['entry']}, input (hex): {f['data'][:2000]}\n{f['traceback']}")
    return stats


@pytest.mark.parametrize("target", sorted(T.PURE))
def test_parsers_refuse_random_and_mutated_input_with_project_errors_only(target):
    stats = run(target)
    assert stats.examples >= 200
    kinds = stats.refusals or {}
    assert len(kinds) >= MIN_REFUSAL_KINDS[target], sorted(kinds)
    assert all("\n" not in k and "\r" not in k for k in kinds)          # one line each


@pytest.mark.parametrize("target", sorted(T.PURE))
def test_every_genuine_seed_passes_its_parser(target):
    """Mutations start from inputs the parsers accept, so they probe the checks, not only the first one."""
    s = T.seeds()
    genuine = {"unpack": s.head, "head": s.head, "header": T.wire.unpack(s.head)["h"], "manifest": s.manifest,
               "body": s.body, "stream": s.body, "plaintext": s.plaintext, "wire": s.descriptor,
               "text": T.Descriptor.from_wire(s.descriptor).to_text().encode(), "verify": s.grant.encode(),
               "grant": s.grant.encode(), "revocation": s.revocation.encode(),
               "paserk": T.consent.k4_public(T.consent.public_key_for(s.patient_secret)).encode()}
    for entry in T.PURE[target]:
        entry.run(genuine[entry.name])                  # raises if the seed itself were refused


def test_the_harness_reports_escaped_exceptions_and_hangs():
    def leaks(data: bytes) -> None:
        return {}[data]

    def spins(data: bytes) -> None:
        try:
            while True:
                pass
        except Exception:                              # a parser's catch-all must not hide a hang
            pass

    with pytest.raises(T.PropertyFailed, match="KeyError escaped"):
        T.run_case(T.Entry("leaks", leaks, lambda: None), b"x")
    start = time.monotonic()
    with pytest.raises(T.PropertyFailed, match="hang"):
        T.run_case(T.Entry("spins", spins, lambda: None), b"x", limit=0.3)
    assert time.monotonic() - start < 5
    stats = T.Stats()
    T.run_case(T.PURE["wire"][0], b"\xc1", stats)    # a project error is a refusal, not a failure
    assert stats.examples == 1 and stats.accepted == 0


def test_http_server_answers_every_fuzzed_request_without_5xx_and_keeps_serving(tmp_path):
    stats, failures = T.Stats(), []
    try:
        measured = fuzz_http.fuzz(BOUNDED, stats, failures)
    except T.PropertyFailed:
        if not failures:
            raise
        pytest.fail(f"{failures[-1]['error']}\nrequest: {failures[-1]['request']}"[:4000])
    seen = stats.refusals or {}
    assert stats.examples >= 200
    # Signed requests reached the handlers (some accepted), unsigned ones were all refused.
    assert any(k.startswith("signed 2") for k in seen), seen
    assert any(k.startswith("signed 4") for k in seen), seen
    assert any(k.startswith("unsigned 4") for k in seen), seen
    assert any(k.startswith("raw") for k in seen), seen
    fds0, fds1 = measured["fds"]
    assert fds1 <= fds0 + 8


NAMES = st.one_of(st.text(max_size=300), st.sampled_from(
    ["..", ".", "../../etc/passwd", "/etc/passwd", "..\\..\\boot.ini", "C:\\x", ".bashrc", "a/../../b", "\0x",
     "x\0/..", " .. ", "\u202egpj.exe", "CON", "\n", "", "...", "./.", "\u2215etc\u2215passwd"]))


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(st.lists(NAMES, min_size=1, max_size=4))
def test_export_names_stay_inside_the_folder(names):
    """Whatever a colleague calls an attachment, export writes one new entry directly in the chosen folder."""
    from node.app.records import safe_name
    dest, taken = Path("/export/here"), set()
    for name in names:
        before = set(taken)
        out = safe_name(name, taken)
        assert out and out not in (".", "..") and not out.startswith(".")
        assert not set(out) & set("/\\\0") and out.isprintable()
        assert (dest / out).parent == dest and Path(out).name == out
        assert out.lower() not in before                   # never the name of an earlier file
