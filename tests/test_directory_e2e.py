"""Finding and trusting colleagues, end to end: real node processes and a real bootstrap server.

Practitioners reach each other knowing only a node ID or a name; a new identity
key for a known practitioner is held until confirmed; rotated keys are learnt;
a revocation is final; and the bootstrap never sees a record.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, NodeProc, base_env, db_rows, drain, free_port, wait_for
from node.core.identity import Descriptor

CANARY = "Canary-Bootstrap-4411"


@pytest.fixture
def bootstrap(tmp_path):
    port = free_port()
    trace = tmp_path / "bootstrap-trace.bin"
    proc = subprocess.Popen([sys.executable, "-m", "bootstrap", "--listen", f"127.0.0.1:{port}",
                             "--data", str(tmp_path / "boot"), "--trace", str(trace)],
                            cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line + proc.stdout.read()
    drain(proc, [])                         # read on: a full pipe would stop the server at its next log line
    yield f"http://127.0.0.1:{port}", tmp_path / "boot", trace
    proc.terminate()
    proc.wait(timeout=15)


def make(tmp_path, name: str, boot: str, **details) -> NodeProc:
    n = NodeProc(tmp_path / name.replace(" ", "_"), name, free_port())
    args = {"bootstrap": boot, **details}
    return n.init(**args)


def test_find_by_name_add_by_id_exchange_and_bootstrap_sees_no_record(tmp_path, bootstrap):
    boot, boot_dir, trace = bootstrap
    gp = make(tmp_path, "Dr Anne Martin", boot, specialty="médecine générale", city="Lyon")
    cardio = make(tmp_path, "Dr Paul Durand", boot, specialty="cardiologie", city="Lyon", rpps="10101010101")
    try:
        gp.start()
        cardio.start()
        found = wait_for(lambda: "Dr Paul Durand" in (out := gp.ok("directory", "search", "cardiologie", "lyon"))
                         and out, 20, "the cardiologist to be listed")
        assert cardio.node_id in found and "10101010101" in found
        assert cardio.node_id in gp.ok("directory", "search", "10101010101")
        # Each adds the other from the node ID alone.
        assert "Contact added" in gp.ok("contact", "add", cardio.node_id)
        assert "Contact added" in cardio.ok("contact", "add", gp.node_id)
        letter = tmp_path / "l.txt"
        letter.write_text(f"Dear colleague, {CANARY}")
        out = gp.ok("send", "--to", "Dr Paul Durand", "--patient", f"Jeanne {CANARY}", "--subject", CANARY,
                    "--letter", str(letter))
        assert "delivered" in out
        assert CANARY in cardio.ok("show", out.split()[1])
    finally:
        gp.stop()
        cardio.stop()
    seen = trace.read_bytes()
    assert b"POST /v1/announce" in seen and b"GET /v1/search" in seen     # it did receive requests ...
    assert CANARY.encode() not in seen and b"Jeanne" not in seen         # ... never a record
    assert not any(p in seen for p in (b"/v1/records", b"/v1/batch", b"/v1/outbox"))
    for f in boot_dir.rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes()


def test_a_new_identity_key_for_a_known_practitioner_is_held_until_confirmed(tmp_path, bootstrap):
    boot = bootstrap[0]
    gp = make(tmp_path, "Dr Gp", boot)
    cardio = make(tmp_path, "Dr Cardio", boot, rpps="22222222222")
    impostor = make(tmp_path, "Dr Cardio again", boot, rpps="22222222222")   # a reinstalled box, or not
    try:
        for n in (gp, cardio, impostor):
            n.start()
        gp.ok("contact", "add", cardio.node_id)
        for n in (cardio, impostor):
            n.ok("contact", "add", gp.node_id)
        out = gp.cli("contact", "add", impostor.node_id)
        assert out.returncode == 3 and "ANOTHER IDENTITY KEY" in out.stderr and "confirm" in out.stderr
        letter = tmp_path / "l.txt"
        letter.write_text("hello")
        sent = gp.ok("send", "--to", "Dr Cardio again", "--patient", "P Q", "--letter", str(letter))
        assert "queued" in sent and "held" in sent
        rid = sent.split()[1]
        assert rid not in {r[0] for r in db_rows(impostor, "SELECT id FROM records")}
        gp.ok("contact", "confirm", "Dr Cardio again")
        wait_for(lambda: "delivered" in gp.ok("outbox", rid), 30, "delivery after confirmation")
        # The old key is retired: nothing more goes to it.
        assert "(replaced)" in gp.ok("contact", "list")
    finally:
        for n in (gp, cardio, impostor):
            if n.proc:
                n.stop()


def test_rotated_key_is_learnt_and_old_records_stay_readable(pair, tmp_path):
    gp, cardio = pair
    letter = tmp_path / "l.txt"
    letter.write_text("before rotation")
    before = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "P Q", "--letter", str(letter)).split()[1]
    known = lambda: Descriptor.from_wire(db_rows(gp, "SELECT descriptor FROM contacts")[0][0])  # noqa: E731
    old = known()
    cardio.stop()
    out = cardio.ok("keys", "rotate")
    assert "1 contact(s) told directly" in out                # the running colleague learnt it at once
    new = known()
    assert new.seq > old.seq and new.enc_key != old.enc_key and new.sign_key == old.sign_key
    cardio.start()
    letter.write_text("after rotation")
    after = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "P Q", "--letter", str(letter)).split()[1]
    assert "after rotation" in cardio.ok("show", after)
    assert "before rotation" in cardio.ok("show", before)    # old key kept
    heads = {r[0]: r[1] for r in db_rows(cardio, "SELECT id, head FROM records")}
    assert heads[before] != heads[after]


def test_revocation_is_final(tmp_path, bootstrap):
    boot = bootstrap[0]
    gp = make(tmp_path, "Dr Gp", boot)
    stolen = make(tmp_path, "Dr Stolen", boot)
    try:
        gp.start()
        stolen.start()
        gp.ok("contact", "add", stolen.node_id)
        stolen.ok("contact", "add", gp.node_id)
        stolen.stop()
        refused = stolen.cli("keys", "revoke")
        assert refused.returncode != 0 and "--yes" in refused.stderr
        stolen.ok("keys", "revoke", "--yes")
        wait_for(lambda: db_rows(gp, "SELECT revoked FROM contacts WHERE node_id = ?", (stolen.node_id,))[0][0],
                 20, "the contact to learn the revocation")
        assert "revoked by its owner" in gp.ok("directory", "lookup", stolen.node_id)
        letter = tmp_path / "l.txt"
        letter.write_text("hello")
        sent = gp.cli("send", "--to", "Dr Stolen", "--patient", "P Q", "--letter", str(letter))
        assert sent.returncode != 0 and "revoked by its owner" in sent.stderr     # refused: nothing sealed
        back = stolen.ok("send", "--to", "Dr Gp", "--patient", "P Q", "--letter", str(letter))
        assert "queued" in back and "revoked" in back            # nor is anything accepted from it
        # Whoever has the stolen key cannot come back: a newer descriptor is refused everywhere.
        assert "accepted by 1 of 1" in stolen.ok("directory", "announce")     # the revocation itself, again
        (stolen.data / "descriptor").unlink()             # the thief signs a fresh, higher descriptor
        stolen_cfg = stolen.data / "config.json"
        text = stolen_cfg.read_text().replace('"descriptor_seq": ', '"descriptor_seq": 1')
        stolen_cfg.write_text(text)
        again = stolen.cli("directory", "announce")
        assert again.returncode != 0 and "revocation is final" in again.stderr + again.stdout
        assert "revoked by its owner" in gp.ok("directory", "lookup", stolen.node_id)
    finally:
        for n in (gp, stolen):
            if n.proc:
                n.stop()


def test_verify_shows_the_same_code_on_both_sides_and_a_qr_code(pair, tmp_path):
    import io
    import segno
    gp, cardio = pair
    png = tmp_path / "qr.png"
    a = gp.ok("contact", "verify", "Dr Paul Durand", "--yes", "--png", str(png))
    b = cardio.ok("contact", "verify", "Dr Anne Martin", "--yes")
    code = lambda out: next(l.strip() for l in out.splitlines() if l.strip()[:4].isdigit())  # noqa: E731
    assert code(a) == code(b) and len(code(a).replace(" ", "")) == 24
    text = next(l for l in gp.ok("id").splitlines() if l.startswith("cabinet-descriptor:"))
    expected = io.BytesIO()
    segno.make(text, error="m").save(expected, kind="png", scale=6, border=4)
    assert png.read_bytes() == expected.getvalue()
    assert "verified" in gp.ok("contact", "list")
    terminal = gp.ok("contact", "verify", "Dr Paul Durand", "--yes", "--qr")
    assert terminal.count("\u2588") > 100 or terminal.count("█") > 100     # a QR drawn with blocks
