"""End to end: real `cabinet run` processes on loopback, each with its own data folder,
driven through the CLI exactly as a practitioner would."""

from __future__ import annotations

import hashlib
import os
import re
import time

from conftest import introduce

LETTER = "Cher confrère,\nje vous adresse Mme Jeanne Martin pour douleur thoracique d'effort.\n"


def write(path, data: bytes | str):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def record_id(out: str) -> str:
    return re.search(r"(?:Record|Reply) ([0-9a-f]{32})", out).group(1)


def test_referral_with_attachment_arrives_decrypted_and_report_comes_back(pair, tmp_path):
    gp, cardio = pair
    letter = write(tmp_path / "letter.txt", LETTER)
    scan = write(tmp_path / "ecg scan.pdf", os.urandom(3 * 1024 * 1024 + 17))
    out = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--born", "1961-04-02",
                "--subject", "Douleur thoracique", "--letter", str(letter), str(scan))
    rid = record_id(out)
    assert "delivered" in out

    inbox = cardio.ok("inbox")
    assert rid[:10] in inbox and "Jeanne Martin" in inbox and "Dr Anne Martin" in inbox
    assert "1 (3.0 MB)" in inbox

    shown = cardio.ok("show", rid[:8])
    assert LETTER.strip() in shown and "born 1961-04-02" in shown and "ecg scan.pdf" in shown

    out_dir = tmp_path / "exported"
    exported = cardio.ok("export", rid, str(out_dir))
    assert (out_dir / "ecg scan.pdf").read_bytes() == scan.read_bytes()
    assert str(out_dir / "ecg scan.pdf") in exported

    report = write(tmp_path / "report.txt", "ECG d'effort normal. Pas de coronaropathie.")
    reply = cardio.ok("reply", rid, "--letter", str(report))
    reply_id = record_id(reply)
    assert "delivered" in reply

    thread = gp.ok("thread", rid)
    assert rid[:10] in thread and reply_id[:10] in thread
    assert thread.index(rid[:10]) < thread.index(reply_id[:10])
    shown = gp.ok("show", reply_id)
    assert "Pas de coronaropathie" in shown and f"Reply to {rid}" in shown
    assert "delivered" in gp.ok("outbox")
    for n in (gp, cardio):
        assert "intact" in n.ok("audit", "verify")


def test_one_record_for_several_colleagues(practice, tmp_path):
    gp = practice("Dr Gp")
    cardio = practice("Dr Cardio")
    copy = practice("Dr Copy")
    introduce(gp, cardio)
    introduce(gp, copy)
    for n in (gp, cardio, copy):
        n.start()
    letter = write(tmp_path / "l.txt", LETTER)
    att = write(tmp_path / "bio.csv", b"crp;12\n")
    out = gp.ok("send", "--to", "Dr Cardio", "--to", "Dr Copy", "--patient", "Paul Petit", "--letter",
                str(letter), str(att))
    rid = record_id(out)
    assert out.count("delivered") == 2
    for n in (cardio, copy):
        shown = n.ok("show", rid)
        assert "Paul Petit" in shown
        n.ok("export", rid, str(tmp_path / n.name))
        assert (tmp_path / n.name / "bio.csv").read_bytes() == b"crp;12\n"
    # The sender can read what it sent: its own node is one of the recipients.
    assert "Paul Petit" in gp.ok("show", rid)


def test_unreachable_colleague_keeps_record_queued_until_it_returns(pair, tmp_path):
    gp, cardio = pair
    cardio.stop()
    letter = write(tmp_path / "l.txt", LETTER)
    out = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(letter))
    rid = record_id(out)
    assert "queued" in out and "cannot reach" in out
    assert "queued" in gp.ok("outbox")

    cardio.start()
    deadline = time.monotonic() + 30
    while "delivered" not in gp.ok("outbox", rid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "delivered" in gp.ok("outbox", rid)
    assert cardio.ok("inbox").count(rid[:10]) == 1


def test_nothing_lost_across_clean_restarts(pair, tmp_path):
    gp, cardio = pair
    letter = write(tmp_path / "l.txt", LETTER)
    rid = record_id(gp.ok("send", "--to", "Dr Paul Durand", "--patient", "A B", "--letter", str(letter)))
    assert cardio.stop() == 0 and gp.stop() == 0
    assert any("stopped" in line for line in cardio.log)
    cardio.start()
    gp.start()
    assert rid[:10] in cardio.ok("inbox")
    assert "delivered" in gp.ok("outbox", rid)


def test_big_attachment_streams_and_digest_matches(pair, tmp_path):
    gp, cardio = pair
    big = tmp_path / "mri.dcm"
    h = hashlib.sha256()
    with open(big, "wb") as fh:
        for _ in range(48):
            block = os.urandom(1 << 20)
            h.update(block)
            fh.write(block)
    letter = write(tmp_path / "l.txt", LETTER)
    rid = record_id(gp.ok("send", "--to", "Dr Paul Durand", "--patient", "A B", "--letter", str(letter),
                          str(big)))
    cardio.ok("export", rid, str(tmp_path / "out"))
    got = hashlib.sha256((tmp_path / "out" / "mri.dcm").read_bytes()).digest()
    assert got == h.digest()
