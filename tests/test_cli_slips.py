"""Everyday slips of a new user, through the real `cabinet` command (issue 9, items 14, 18 and 19).

A second identical send is asked about (or refused without --again), a Ctrl-C says what became of
the record, a progress bar follows a large transfer on a terminal; each contact state has one name
in every message; and the small slips: mistyped and partial names, sending to oneself, --data
before the command, a descriptor pasted inside an e-mail, a loopback address exported, a narrow QR
code, a PDF as the letter, a long UTF-8 file name.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, NodeProc, base_env, db_rows, free_port, introduce, ok, wait_for


def send_args(letter, *extra: str, to: str = "Dr Paul Durand") -> list[str]:
    return ["send", "--to", to, "--patient", "Jeanne Martin", "--born", "1961-04-02", "--subject", "Douleur",
            "--letter", str(letter), *extra]


@pytest.fixture
def files(tmp_path):
    letter = tmp_path / "lettre.txt"
    letter.write_text("Cher confrère, merci de voir Mme Martin.")
    ecg = tmp_path / "ecg.pdf"
    ecg.write_bytes(b"%PDF-1.4 " + os.urandom(4000))
    return letter, ecg


def sent_count(node) -> int:
    return db_rows(node, "SELECT COUNT(*) FROM records WHERE direction = 'out'")[0][0]


# --- 14: the same send twice ---------------------------------------------------------------

def test_the_same_send_twice_is_refused_without_a_terminal_unless_again(pair, files):
    gp, cardio = pair
    letter, ecg = files
    first = gp.ok(*send_args(letter, str(ecg)))
    record = first.split()[1]
    again = gp.cli(*send_args(letter, str(ecg)))
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert re.search(rf"the same referral was sent to Dr Paul Durand at \d\d:\d\d \(record {record[:10]}\); "
                     r"add --again", again.stderr), again.stderr
    assert sent_count(gp) == 1
    # Same names and sizes, other content: another referral, sent without a question.
    ecg.write_bytes(b"%PDF-1.4 " + os.urandom(4000))
    assert "delivered" in gp.ok(*send_args(letter, str(ecg)))
    # The same again, on purpose.
    assert "delivered" in gp.ok(*send_args(letter, str(ecg), "--again"))
    assert sent_count(gp) == 3
    # Another patient is another referral.
    other = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Paul Petit", "--letter", str(letter), str(ecg))
    assert "delivered" in other and sent_count(gp) == 4


def _on_terminal(node, args: list[str], answer: str) -> tuple[int, str]:
    """Run a command with a terminal as stdin (stdout still captured), typing `answer`."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "node", *args, "--data", str(node.data)], cwd=ROOT,
                                env=base_env(), stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        os.write(master, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out
    finally:
        os.close(master)
        os.close(slave)


def test_the_same_send_twice_asks_on_a_terminal(pair, files):
    gp, cardio = pair
    letter, ecg = files
    record = gp.ok(*send_args(letter, str(ecg))).split()[1]
    code, out = _on_terminal(gp, send_args(letter, str(ecg)), "n")
    assert re.search(rf"The same referral was sent to Dr Paul Durand at \d\d:\d\d \(record {record[:10]}\); "
                     r"send it again\? \[y/N\]", out), out
    assert code != 0 and "not sent again" in out and sent_count(gp) == 1
    code, out = _on_terminal(gp, send_args(letter, str(ecg)), "y")
    assert code == 0 and "delivered" in out and sent_count(gp) == 2


# --- 14: Ctrl-C, and the progress bar ----------------------------------------------------

class StderrLines:
    """A running command's stderr, read on a thread so the test can wait on a line with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.text += line


def test_ctrl_c_during_delivery_keeps_the_record_and_the_node_finishes_it(practice, files, tmp_path):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    introduce(gp, cardio)
    letter, _ = files
    big = tmp_path / "irm.zip"
    big.write_bytes(os.urandom(3 << 20))
    # The colleague's address answers the connection and then nothing: delivery hangs there.
    stall = socket.socket()
    stall.bind(("127.0.0.1", cardio.port))
    stall.listen(8)
    proc = subprocess.Popen([sys.executable, "-m", "node", *send_args(letter, str(big)), "--data", str(gp.data)],
                            cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = StderrLines(proc)
    try:
        wait_for(lambda: sent_count(gp) == 1, 30, "the record to be sealed and stored")
        record = db_rows(gp, "SELECT id FROM records WHERE direction = 'out'")[0][0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        stall.close()
        if proc.poll() is None:
            proc.kill()
    err._t.join(timeout=10)
    assert f"cabinet: interrupted: record {record} is kept in the outbox and the node will finish delivering it" \
        in err.text, err.text
    assert err.text.count("interrupted") == 1 and "Traceback" not in err.text
    assert "queued" in gp.ok("outbox") or "sending" in gp.ok("outbox")
    cardio.start()
    gp.start()
    wait_for(lambda: db_rows(cardio, "SELECT COUNT(*) FROM records WHERE id = ?", (record,))[0][0] == 1, 60,
             "the node to finish the interrupted delivery")
    assert "irm.zip" in cardio.ok("show", record)


def test_ctrl_c_before_the_record_is_stored_says_nothing_was_kept(pair, tmp_path):
    gp, cardio = pair
    letter = tmp_path / "letter.fifo"
    os.mkfifo(letter)          # the command blocks reading the letter: before anything is sealed
    proc = subprocess.Popen([sys.executable, "-m", "node", *send_args(letter), "--data", str(gp.data)],
                            cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = StderrLines(proc)
    writer = None
    try:
        def reader_waiting():
            nonlocal writer
            try:
                writer = os.open(letter, os.O_WRONLY | os.O_NONBLOCK)
                return True
            except OSError:            # ENXIO: nobody reads the pipe yet
                return False
        wait_for(reader_waiting, 30, "the command to open the letter")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "interrupted" in err.text, 30, "the interruption to be reported")
    finally:
        if writer is not None:
            os.close(writer)       # the reading thread ends; the command exits
    assert proc.wait(timeout=30) == 130
    assert "cabinet: interrupted: the record was not stored yet: nothing was kept and nothing sent" in err.text
    assert sent_count(gp) == 0


def test_send_draws_a_progress_bar_on_a_terminal(pair, files, tmp_path):
    gp, cardio = pair
    letter, _ = files
    big = tmp_path / "irm.zip"
    big.write_bytes(os.urandom(3 << 20))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "node", *send_args(letter, str(big)), "--data",
                                 str(gp.data)], cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                piece = os.read(master, 4096)
            except OSError:            # EIO: the command closed its end
                break
            if not piece:
                break
            chunks.append(piece)
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    bar = b"".join(chunks).decode()
    assert proc.returncode == 0 and b"delivered" in out
    assert re.search(r"\rsending 100% \[#{30}\] 3\.0 MB of 3\.0 MB", bar), repr(bar[-300:])
    # Without a terminal, no bar at all.
    other = gp.cli(*send_args(letter, str(tmp_path / "irm.zip"), "--again"))
    assert other.returncode == 0 and "sending" not in other.stderr


# --- 18: one name for each contact state --------------------------------------------------

def test_a_replaced_contact_is_named_replaced_everywhere(practice, files):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand", rpps="10101010101")
    introduce(gp, cardio)
    reinstalled = NodeProc(gp.data.parent / "reinstalled", "Dr Paul Durand", free_port()).init(
        rpps="10101010101")                                               # same practitioner, a new box
    desc = reinstalled.data.parent / "reinstalled.descriptor"
    reinstalled.ok("id", "--export", str(desc))
    held = gp.cli("contact", "add", str(desc))
    assert held.returncode == 3
    assert "State: held: new identity key, waiting for 'cabinet contact confirm'" in held.stderr
    listing = gp.ok("contact", "list")
    assert "held: new identity key, waiting for 'cabinet contact confirm'" in listing
    confirmed = gp.ok("contact", "confirm", "Dr Paul Durand (new key)")
    assert "unverified (trust on first use)" in confirmed
    listing = gp.ok("contact", "list")
    old_line = next(l for l in listing.splitlines() if cardio.node_id in l)
    assert old_line.rstrip().endswith("replaced by a new key (confirmed)")
    letter, _ = files
    refused = gp.cli(*send_args(letter, to=cardio.node_id))          # the old key: refused at once
    assert refused.returncode != 0 and "replaced by a new key (confirmed)" in refused.stderr
    assert "revoked" not in refused.stderr and "Traceback" not in refused.stderr
    assert "Outbox: nothing sent yet" in gp.ok("outbox")                # nothing was sealed or queued


def test_a_revoked_contact_is_named_revoked_everywhere(pair, files):
    gp, cardio = pair
    cardio.ok("keys", "revoke", "--yes")
    wait_for(lambda: "revoked by its owner" in gp.ok("contact", "list"), 30, "the revocation to reach the GP")
    assert "trust on first use" not in next(l for l in gp.ok("contact", "list").splitlines() if cardio.node_id in l)
    letter, _ = files
    refused = gp.cli(*send_args(letter))
    assert refused.returncode != 0 and "revoked by its owner" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "Outbox: nothing sent yet" in gp.ok("outbox")
    desc = gp.data.parent / "revoked.descriptor"
    cardio.ok("id", "--export", str(desc))
    again = gp.cli("contact", "add", str(desc))
    assert again.returncode != 0 and "revoked by its owner; ask them for their new node ID" in again.stderr


# --- 19: everyday slips ----------------------------------------------------------------------

def test_mistyped_partial_and_own_names(pair, files):
    gp, cardio = pair
    letter, _ = files
    typo = gp.cli(*send_args(letter, to="Dr Paul Durnad"))
    assert typo.returncode != 0 and "did you mean 'Dr Paul Durand'?" in typo.stderr
    assert "delivered" in gp.ok(*send_args(letter, to="durand"))        # one contact has that word: enough
    myself = gp.cli(*send_args(letter, "--again", to="Dr Anne Martin"))
    assert myself.returncode != 0 and "that is this practice itself" in myself.stderr
    assert "unknown contact" not in myself.stderr
    mine = gp.cli(*send_args(letter, "--again", to=gp.node_id))
    assert mine.returncode != 0 and "this practice itself" in mine.stderr


def test_data_before_the_command(pair, files):
    gp, cardio = pair
    letter, _ = files
    gp.ok(*send_args(letter))
    proc = subprocess.run([sys.executable, "-m", "node", "--data", str(cardio.data), "inbox"], cwd=ROOT,
                          env=base_env(), capture_output=True, text=True, timeout=60)
    assert "Jeanne Martin" in ok(proc)


def test_a_descriptor_pasted_inside_an_email(practice):
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    text = cardio.ok("id", "--text").splitlines()
    descriptor = next(l for l in text if l.startswith("cabinet-descriptor:"))
    wrapped = "\n".join("> " + descriptor[i:i + 70] for i in range(0, len(descriptor), 70))
    mail = (f"Bonjour Anne,\n\nVoici mon identifiant cabinet :\n\n{wrapped}\n\n"
            "Bien confraternellement,\nPaul\n-- \nCabinet de cardiologie, Lyon\n")
    mailfile = gp.data.parent / "mail.txt"
    mailfile.write_text(mail)
    out = gp.ok("contact", "add", str(mailfile))
    assert "Contact added: Dr Paul Durand" in out and cardio.node_id in out


def test_exporting_a_loopback_address_warns(practice, tmp_path):
    gp = practice("Dr Anne Martin")
    proc = gp.cli("id", "--export", str(tmp_path / "moi.txt"))
    ok(proc)
    assert "can only be reached from this computer" in proc.stderr
    assert (tmp_path / "moi.txt").read_text().startswith("cabinet-descriptor:")


def test_the_terminal_qr_code_fits_a_terminal(pair):
    gp, cardio = pair
    out = gp.ok("contact", "verify", "Dr Paul Durand", "--qr", "--yes")
    qr = [l for l in out.splitlines() if set(l) & set("█▀▄")]
    assert len(qr) > 10
    assert max(len(l) for l in qr) <= 45          # was 93 columns: the node ID alone, drawn compact


def test_a_pdf_as_the_letter(pair, tmp_path):
    gp, cardio = pair
    scan = tmp_path / "courrier.pdf"
    scan.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + os.urandom(3000))
    record = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(scan)).split()[1]
    shown = cardio.ok("show", record)
    assert "The letter is attached: courrier.pdf" in shown and "Attached courrier.pdf" in shown
    out = tmp_path / "export"
    cardio.ok("export", record, str(out))
    assert (out / "courrier.pdf").read_bytes() == scan.read_bytes()


def test_a_long_utf8_file_name_exports(pair, files, tmp_path):
    gp, cardio = pair
    letter, _ = files
    name = "é" * 123 + ".pdf"                    # 250 bytes: as long as this file system allows
    att = tmp_path / name
    att.write_bytes(b"%PDF long name")
    record = gp.ok(*send_args(letter, str(att))).split()[1]
    out = tmp_path / "export"
    first = cardio.ok("export", record, str(out)).split("\n")[0]
    second = cardio.ok("export", record, str(out)).split("\n")[0]       # the name is taken: " (2)" must fit
    for written in (first, second):
        assert os.path.basename(written).endswith(".pdf") and len(os.path.basename(written).encode()) <= 255
        assert open(written, "rb").read() == b"%PDF long name"
    assert first != second
    from node.app.records import safe_name
    longest = safe_name("é" * 255, set())             # 510 bytes, as another system may send it
    assert len(longest.encode()) <= 240 and longest.startswith("éé")
