from __future__ import annotations

import pytest

from gated.api.models import SessionState
from gated.decision import Decision, Direction, Outcome, decide

ENTRY, EXIT = Direction.ENTRY, Direction.EXIT
PENDING, ACTIVE, ENDED = SessionState.PENDING, SessionState.ACTIVE, SessionState.ENDED


@pytest.mark.parametrize(
    ("direction", "state", "passback", "expected"),
    [
        (ENTRY, PENDING, "hard", Decision(Outcome.STARTED, event="start")),
        (ENTRY, ACTIVE, "hard", Decision(Outcome.ALREADY_ACTIVE)),
        (ENTRY, ENDED, "hard", Decision(Outcome.ALREADY_ENDED)),
        (ENTRY, None, "hard", Decision(Outcome.UNKNOWN_CODE)),
        (EXIT, ACTIVE, "hard", Decision(Outcome.ENDED, event="end")),
        (EXIT, PENDING, "hard", Decision(Outcome.NOT_STARTED)),
        (EXIT, ENDED, "hard", Decision(Outcome.ALREADY_ENDED)),
        (EXIT, None, "hard", Decision(Outcome.UNKNOWN_CODE)),
        (ENTRY, PENDING, "soft", Decision(Outcome.STARTED, event="start")),
        (ENTRY, ACTIVE, "soft", Decision(Outcome.PASSBACK_VIOLATION)),
        (ENTRY, ENDED, "soft", Decision(Outcome.ALREADY_ENDED)),
        (EXIT, ACTIVE, "soft", Decision(Outcome.ENDED, event="end")),
        (EXIT, PENDING, "soft", Decision(Outcome.PASSBACK_VIOLATION)),
        (EXIT, ENDED, "soft", Decision(Outcome.ALREADY_ENDED)),
    ],
)
def test_decide_table(
    direction: Direction, state: SessionState | None, passback: str, expected: Decision
) -> None:
    assert decide(direction, state, passback=passback) == expected  # type: ignore[arg-type]


def test_only_three_outcomes_open() -> None:
    opening = {outcome for outcome in Outcome if outcome.opens}
    assert opening == {Outcome.STARTED, Outcome.ENDED, Outcome.PASSBACK_VIOLATION}


def test_soft_passback_writes_no_event() -> None:
    decision = decide(ENTRY, ACTIVE, passback="soft")
    assert decision.opens
    assert decision.event is None
