"""A key rotation made while `cabinet run` runs takes effect in the running node at once."""

from __future__ import annotations

from conftest import db_rows, wait_for


def test_rotating_keys_while_the_node_runs_keeps_records_coming_in(pair, tmp_path):
    gp, cardio = pair
    letter = tmp_path / "letter.txt"
    letter.write_text("Dear colleague,\n")
    before = _known_seq(gp, cardio)
    out = cardio.ok("keys", "rotate")
    assert "the running node uses it now" in out
    # The running node takes the new key and tells the GP's node; the GP then seals for the new key.
    wait_for(lambda: _known_seq(gp, cardio) > before, 15, "the GP's node to learn the new key")
    sent = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(letter))
    rid = next(l.split()[1] for l in sent.splitlines() if l.startswith("Record "))
    wait_for(lambda: db_rows(cardio, "SELECT 1 FROM records WHERE id = ? AND direction = 'in'", (rid,)), 20,
             "the record to arrive at the cardiologist's running node")
    assert "Jeanne Martin" in cardio.ok("show", rid)
    refused = db_rows(cardio, "SELECT count(*) FROM audit WHERE event = 'refused'")[0][0]
    assert refused == 0


def _known_seq(gp, cardio) -> int:
    return db_rows(gp, "SELECT seq FROM contacts WHERE node_id = ?", (cardio.node_id,))[0][0]
