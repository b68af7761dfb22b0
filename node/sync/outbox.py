"""The outbox's delivery state machine and retry schedule, as data.

One delivery is one (record, recipient) pair: each recipient's stream is
independent, so one colleague being offline delays no one else. The states
and the events that move between them are a table (as in h11); an event that
is not allowed in the current state is a LocalProtocolError, i.e. a bug.

    queued --AttemptStarted--> sending --RecordAcked--> delivered
       ^  |                       |
       |  +--RecordAcked (a small record, batched)--------> delivered
       +------AttemptFailed-------+   (and queued --AttemptFailed--> queued)
    queued, sending --RecordRefused--> refused   (the recipient refused it for good: no more tries)

Every write of a delivery's state goes through `transition`; node/store/records.py
uses the state names below rather than string literals.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import LocalProtocolError

QUEUED, SENDING, DELIVERED, REFUSED = "queued", "sending", "delivered", "refused"
ATTEMPT_STARTED, RECORD_ACKED, ATTEMPT_FAILED = "AttemptStarted", "RecordAcked", "AttemptFailed"
RECORD_REFUSED = "RecordRefused"
PENDING = (QUEUED, SENDING)          # still to be sent
SETTLED = (DELIVERED, REFUSED)       # final: never sent again

TRANSITIONS: dict[str, dict[str, str]] = {
    QUEUED: {ATTEMPT_STARTED: SENDING, RECORD_ACKED: DELIVERED, ATTEMPT_FAILED: QUEUED, RECORD_REFUSED: REFUSED},
    SENDING: {RECORD_ACKED: DELIVERED, ATTEMPT_FAILED: QUEUED, ATTEMPT_STARTED: SENDING, RECORD_REFUSED: REFUSED},
    DELIVERED: {RECORD_ACKED: DELIVERED},
    REFUSED: {RECORD_REFUSED: REFUSED},
}

BASE_DELAY_MS = 2_000
MAX_DELAY_MS = 60 * 60 * 1000
STALE_AFTER_MS = 3 * 24 * 3600 * 1000       # reported in the outbox and the log, never dropped


def transition(state: str, event: str) -> str:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise LocalProtocolError(f"delivery event {event} is not allowed in state {state}") from None


def retry_delay(attempts: int, jitter: float) -> int:
    """Exponential backoff with jitter: jitter in [0, 1) comes from the caller's rng."""
    if not 0.0 <= jitter < 1.0:
        raise LocalProtocolError("jitter must be in [0, 1)")
    ceiling = min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** min(attempts, 30))
    return int(ceiling * (0.5 + jitter / 2))


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """What the outbox records after a failed attempt."""

    state: str
    attempts: int
    next_try: int
    stale: bool


def after_failure(*, state: str, attempts: int, queued_at: int, now: int, jitter: float) -> Failure:
    attempts += 1
    return Failure(state=transition(state, ATTEMPT_FAILED), attempts=attempts,
                   next_try=now + retry_delay(attempts, jitter), stale=now - queued_at >= STALE_AFTER_MS)
