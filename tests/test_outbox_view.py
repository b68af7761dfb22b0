"""What `cabinet outbox` says for each state of a delivery (the CLI's own formatting)."""

from node.faces.cli import delivery_state
from node.sync.outbox import STALE_AFTER_MS

NOW = 1_800_000_000_000
BASE = {"state": "queued", "attempts": 0, "next_try": NOW, "last_error": None, "created": NOW - 60_000,
        "stale": 0, "delivered": None, "opened": None, "sent_bytes": 0, "body_size": 1000}


def test_queued_with_reason_and_next_try():
    text = delivery_state(dict(BASE, attempts=3, last_error="cannot reach http://x"), NOW)
    assert text.startswith("queued, 3 attempt(s), next try ") and text.endswith("cannot reach http://x")
    assert "NOT DELIVERED" not in text


def test_sending_shows_progress():
    text = delivery_state(dict(BASE, state="sending", sent_bytes=512 << 20, body_size=1 << 30), NOW)
    assert text.startswith("sending 50% (512.0 MB of 1.0 GB)")


def test_delivered_then_opened():
    assert delivery_state(dict(BASE, state="delivered", delivered=NOW), NOW).endswith("not opened yet")
    text = delivery_state(dict(BASE, state="delivered", delivered=NOW, opened=NOW + 1000), NOW)
    assert "delivered" in text and "opened" in text and "not opened" not in text


def test_a_peer_away_for_days_is_reported_not_dropped():
    row = dict(BASE, attempts=40, created=NOW - STALE_AFTER_MS - 86_400_000, stale=1, last_error="timeout")
    text = delivery_state(row, NOW)
    assert text.startswith("queued") and "NOT DELIVERED FOR 4 DAYS" in text


def test_refused_says_why_in_plain_words_and_that_it_is_not_sent_again():
    row = dict(BASE, state="refused", refused=NOW, last_error="the recipient could not open it (not sealed for it)")
    text = delivery_state(row, NOW)
    assert text.startswith("refused by the recipient") and "could not open it" in text and "not sent again" in text
