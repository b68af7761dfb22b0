"""Nothing from outside reaches a terminal raw: a colleague's strings are printed with their escapes shown."""

from __future__ import annotations

import asyncio

from conftest import PASSPHRASE, cli, ok
from node import Node

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\u202eevil\x9b"


def test_shown_escapes_controls_and_bidi_but_keeps_text():
    from node.faces.text import shown
    assert shown("Jeanne Martin, née Müller") == "Jeanne Martin, née Müller"
    out = shown(HOSTILE)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert "\\x1b" in out and "\\u202e" in out and "RED" in out
    assert shown("a\nb\tc") == "a\\x0ab\\x09c"
    assert shown("a\nb\tc", lines=True) == "a\nb\tc"


def test_a_colleagues_escape_sequences_never_reach_the_terminal(tmp_path):
    async def exchange() -> str:
        for name in ("A", "B"):
            await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
        a = await Node.open_node(tmp_path / "A", passphrase=PASSPHRASE)
        b = await Node.open_node(tmp_path / "B", passphrase=PASSPHRASE)
        try:
            await b.serve("127.0.0.1:0")
            await a.add_contact(b.descriptor.signed)
            await b.add_contact(a.descriptor.signed)
            letter = tmp_path / "letter.txt"
            letter.write_text(f"Dear colleague,\n{HOSTILE}\nRegards\n")
            att = tmp_path / f"scan{HOSTILE[:6]}.txt"
            att.write_text("x")
            res = await a.send_referral(to="B", patient=f"Martin {HOSTILE}", subject=HOSTILE, letter=letter,
                                        attachments=[att])
            assert res.deliveries[b.node_id] == "delivered", res.errors
            return res.record_id
        finally:
            await a.close()
            await b.close()

    rid = asyncio.run(exchange())
    for args in (("inbox",), ("show", rid), ("thread", rid)):
        out = ok(cli(tmp_path / "B", *args))
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out, args
    shown_letter = ok(cli(tmp_path / "B", "show", rid))
    assert "Dear colleague,\n" in shown_letter and "\\x1b]0;pwned" in shown_letter
