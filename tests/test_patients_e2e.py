"""Patients in control, end to end: three `cabinet run` processes driven through the CLI.

The patient is enrolled at A (card files), A links their records; the patient
grants B access; B fetches; C with B's grant is refused; the patient revokes;
their history, fetched through B and checked against A's key, lists exactly
that. (Expiry and the other refusals need an injected clock: tests/test_patients.py.)
"""

from __future__ import annotations

import re

import pytest

from conftest import db_rows, introduce, ok, wait_for

pytestmark = pytest.mark.slow


def ids_of(out: str) -> list[str]:
    return re.findall(r"^Record ([0-9a-f]{32})", out, re.M)


def test_grant_fetch_refuse_revoke_and_history_across_three_practices(practice, tmp_path):
    a, b, c = practice("Dr A"), practice("Dr B"), practice("Dr C")
    introduce(a, b)
    introduce(a, c)
    for n in (a, b, c):
        n.start()
    letter = tmp_path / "letter.txt"
    letter.write_text("Echo: FEVG 60 %.\n")
    scan = tmp_path / "echo.bin"
    scan.write_bytes(bytes(range(256)) * 2000)
    sent = [ids_of(a.ok("send", "--to", "Dr C", "--patient", "Jeanne Martin", "--subject", s, "--letter",
                        str(letter), *extra))[0] for s, extra in (("Echo", [str(scan)]), ("Bilan", []))]

    out = a.ok("patient", "enroll", "--patient", "P-0042", "--out", str(tmp_path / "cards"))
    assert "Recovery" in out
    card = str(tmp_path / "cards" / "card-P-0042.txt")
    a.ok("patient", "link", sent[0], "--patient", "P-0042", "--category", "cardiology")
    a.ok("patient", "link", sent[1], "--patient", "P-0042", "--category", "lab-results")

    grant = a.cli("patient", "grant", "--card", card, "--to", b.node_id, "--scope", "category:cardiology",
                  "--days", "7")
    token = ok(grant).strip()
    jti = re.search(r"Grant (\S+):", grant.stderr).group(1)

    fetched = ids_of(b.ok("request", "--from", "Dr A", "--token", token))
    assert len(fetched) == 1
    wait_for(lambda: fetched[0][:10] in b.ok("inbox"), 20, "the copy at B")
    shown = b.ok("show", fetched[0])
    assert "FEVG 60 %" in shown and "Jeanne Martin" in shown
    b.ok("export", fetched[0], str(tmp_path / "at-b"))
    assert (tmp_path / "at-b" / "echo.bin").read_bytes() == scan.read_bytes()

    refused = c.cli("request", "--from", "Dr A", "--token", token)
    assert refused.returncode != 0 and "wrong audience" in refused.stderr and "Traceback" not in refused.stderr
    assert ids_of(refused.stdout) == []

    a.ok("patient", "revoke", "--card", card, jti)
    again = b.cli("request", "--from", "Dr A", "--token", token)
    assert again.returncode != 0 and "revoked" in again.stderr

    history = b.ok("patient", "history", "--card", card, "--from", "Dr A", "--save", str(tmp_path / "h.txt"))
    events = re.findall(r"#\d+\s+(\S+)", history)
    assert events.count("patient-linked") == 2 and events.count("grant-used") == 1
    assert events.count("access-sent") == 1 and events.count("access-refused") == 2
    assert events.count("grant-revoked") == 1 and events[-1] == "history-given"
    assert "Jeanne" not in history
    assert "intact" in a.ok("audit", "check-head", str(tmp_path / "h.txt"))
    assert "intact" in a.ok("audit", "verify")
    copies = db_rows(a, "SELECT COUNT(*) FROM patient_records WHERE copy_of IS NOT NULL")
    assert copies == [(1,)]
