"""Finding a patient's records: any words of the name, in any order, case or accents, with or without a birth date."""

from __future__ import annotations

import pytest

from conftest import PASSPHRASE
from node import Node
from node.core.names import name_words
from node.core.errors import UsageError


def test_name_words_ignore_case_accents_order_and_punctuation():
    assert name_words("MARTIN Jeanne-Élise") == {"martin", "jeanne", "elise"}
    assert name_words("  jeanne   martin ") == name_words("Martin, Jeanne")
    assert "oz" in name_words("Öz")


async def test_inbox_finds_a_patient_by_part_of_the_name_in_any_order(tmp_path):
    for name in ("A", "B"):
        await Node.init(tmp_path / name, PASSPHRASE, name=name, listen="127.0.0.1:0", lan=False)
    a = await Node.open_node(tmp_path / "A", passphrase=PASSPHRASE)
    b = await Node.open_node(tmp_path / "B", passphrase=PASSPHRASE)
    try:
        await b.serve("127.0.0.1:0")
        await a.add_contact(b.descriptor.signed)
        await b.add_contact(a.descriptor.signed)
        for patient, born in (("Jeanne Martin", "1961-04-02"), ("Élise Dupont", "1975-11-30"),
                              ("Paul Martin", "1990-01-01")):
            res = await a.send_referral(to="B", patient=patient, born=born, letter="...")
            assert res.deliveries[b.node_id] == "delivered", res.errors

        async def found(**kw) -> list[str]:
            return sorted(s.patient for s in await b.inbox(**kw))

        assert await found(patient="Martin", born="1961-04-02") == ["Jeanne Martin"]
        assert await found(patient="MARTIN Jeanne") == ["Jeanne Martin"]
        assert await found(patient="martin") == ["Jeanne Martin", "Paul Martin"]
        assert await found(patient="elise") == ["Élise Dupont"]
        assert await found(patient="DUPONT élise", born="1975-11-30") == ["Élise Dupont"]
        assert await found(patient="Martin", born="1970-01-01") == []
        assert await found(patient="Jeanne Dupont") == []
        assert await found(born="1990-01-01") == ["Paul Martin"]
        with pytest.raises(UsageError):
            await b.inbox(patient=" - ")
        with pytest.raises(UsageError):
            await b.inbox(patient="Martin", born="02/04/1961")
    finally:
        await a.close()
        await b.close()
