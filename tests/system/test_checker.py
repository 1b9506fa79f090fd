"""The chaos checker's Retry-After judgement (``harness.early_requests``), on hand-made logs.

The chaos run can only be trusted if its checker counts what it says it counts, so its
window rules are pinned here on timelines small enough to read. A stand-in for the cloud's
logs is used (a plain object with the two lists and the slack) because the point is the
arithmetic over them, not the server that fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.standin.cloud import RequestRecord, RetryAfterAnswer
from tests.system.harness import RETRY_AFTER_GRACE_S, RETRY_AFTER_RECORD_S, early_requests

SLACK_S = 0.005


@dataclass
class Logs:
    """The parts of ``StandinCloud`` the checker reads."""

    requests: list[RequestRecord] = field(default_factory=list)
    retry_after_given: list[RetryAfterAnswer] = field(default_factory=list)
    retry_after_slack_s: float = SLACK_S

    def throttle(self, asked_at: float, at: float, seconds: float) -> None:
        self.requests.append(RequestRecord(asked_at, "POST", "/events", None, 429))
        self.retry_after_given.append(RetryAfterAnswer(asked_at, at, at + seconds))

    def request(self, at: float) -> None:
        self.requests.append(RequestRecord(at, "POST", "/events", None, 202))


def judged(logs: Logs, kills: list[float] = []) -> list[tuple[float, bool]]:  # noqa: B006
    return [(round(e.at, 3), e.forgotten) for e in early_requests(logs, kills)]  # type: ignore[arg-type]


def test_a_request_inside_the_window_is_a_violation_and_one_on_the_wire_is_not():
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.01, seconds=1.0)
    logs.request(10.01 + RETRY_AFTER_GRACE_S / 2)  # already on the wire
    logs.request(10.5)  # sent while the agent knew
    logs.request(11.02)  # after the deadline
    assert judged(logs) == [(10.5, False)]


def test_a_kill_right_after_the_answer_makes_the_window_forgotten_not_a_violation():
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.01, seconds=1.0)
    logs.request(10.5)
    assert judged(logs, kills=[10.01 + RETRY_AFTER_RECORD_S / 2]) == [(10.5, True)]


def test_an_answer_to_a_process_already_killed_was_heard_by_no_one():
    """The CI failure of seed 494700338: a slow cloud answered 429 to the agent it had just
    watched die; the next agent's first requests fell inside that window."""
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.3, seconds=1.0)  # asked, then killed, then answered
    logs.request(10.8)
    assert judged(logs, kills=[10.1]) == [(10.8, True)]


def test_a_kill_long_after_the_answer_leaves_it_a_violation():
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.01, seconds=1.0)
    logs.request(10.9)
    assert judged(logs, kills=[10.01 + RETRY_AFTER_RECORD_S + 0.2]) == [(10.9, False)]


def test_a_kill_before_the_request_was_asked_does_not_excuse_it():
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.01, seconds=1.0)
    logs.request(10.5)
    assert judged(logs, kills=[9.9]) == [(10.5, False)]


def test_a_heard_window_overlapping_a_forgotten_one_still_counts():
    logs = Logs()
    logs.throttle(asked_at=10.0, at=10.3, seconds=1.0)  # unheard: asker killed at 10.1
    logs.throttle(asked_at=10.9, at=10.95, seconds=1.0)  # heard by the next agent
    logs.request(11.2)
    # The next agent's first request (10.9) fell in the unheard window only: forgotten.
    assert judged(logs, kills=[10.1]) == [(10.9, True), (11.2, False)]
