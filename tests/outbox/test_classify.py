"""The outcome rule, row by row against CONTRACT §6."""

from __future__ import annotations

import pytest

from outbox.classify import Action, Answered, NoAnswer, Unsendable, classify

RETRY_AFTER = {"Retry-After": "7"}

# (what happened, on_conflict, expected action, in doubt, Retry-After honoured)
ROWS = [
    (Answered(200, {}), "retry", Action.DELIVERED, False, None),
    (Answered(201, {}), "retry", Action.DELIVERED, False, None),
    (Answered(204, {}), "retry", Action.DELIVERED, False, None),
    (Answered(408, {}), "retry", Action.RETRY, False, None),
    (Answered(425, {}), "retry", Action.RETRY, False, None),
    (Answered(429, RETRY_AFTER), "retry", Action.RETRY, False, "7"),
    (Answered(429, {}), "retry", Action.RETRY, False, None),
    (Answered(500, {}), "retry", Action.RETRY, False, None),
    (Answered(502, {}), "retry", Action.RETRY, False, None),
    (Answered(503, RETRY_AFTER), "retry", Action.RETRY, False, "7"),
    (Answered(504, RETRY_AFTER), "retry", Action.RETRY, False, None),  # only 429/503 hold
    (Answered(599, {}), "retry", Action.RETRY, False, None),
    (Answered(401, {}), "retry", Action.PAUSE, False, None),
    (Answered(403, {}), "retry", Action.PAUSE, False, None),
    (Answered(404, {}), "retry", Action.PAUSE, False, None),
    (Answered(405, {}), "retry", Action.PAUSE, False, None),
    (Answered(407, {}), "retry", Action.PAUSE, False, None),
    (Answered(301, {}), "retry", Action.PAUSE, False, None),
    (Answered(409, {}), "retry", Action.RETRY, False, None),
    (Answered(409, {}), "delivered", Action.DELIVERED, False, None),
    (Answered(409, {}), "dead", Action.DEAD, False, None),
    (Answered(400, {}), "retry", Action.DEAD, False, None),
    (Answered(410, {}), "retry", Action.DEAD, False, None),
    (Answered(413, {}), "retry", Action.DEAD, False, None),
    (Answered(422, {}), "retry", Action.DEAD, False, None),
    (Answered(451, {}), "retry", Action.DEAD, False, None),
    (Answered(100, {}), "retry", Action.DEAD, False, None),
    (NoAnswer("connect", sent=False, detail="refused"), "retry", Action.RETRY, False, None),
    (NoAnswer("timeout", sent=True, detail="10 s"), "retry", Action.RETRY, True, None),
    (NoAnswer("reset", sent=True, detail="reset"), "retry", Action.RETRY, True, None),
    (NoAnswer("tls", sent=False, detail="cert"), "retry", Action.PAUSE, False, None),
    (Unsendable("payload is not a JSON object"), "retry", Action.DEAD, False, None),
]


@pytest.mark.parametrize(("result", "on_conflict", "action", "in_doubt", "retry_after"), ROWS,
                         ids=[f"{type(r[0]).__name__}-{getattr(r[0], 'status', '')}"
                              f"{getattr(r[0], 'failure', '')}-{r[1]}" for r in ROWS])
def test_each_row_of_the_contract_table(result, on_conflict, action, in_doubt, retry_after):
    outcome = classify(result, on_conflict=on_conflict)
    assert (outcome.action, outcome.in_doubt, outcome.retry_after) == (
        action, in_doubt, retry_after)


def test_reason_names_the_status_and_a_short_body_excerpt():
    outcome = classify(Answered(422, {}, '{"error": "total   does not\nmatch"}' + "x" * 500))
    assert outcome.reason.startswith('HTTP 422: {"error": "total does not match"}')
    assert len(outcome.reason) < 230


def test_a_connect_error_marks_the_sink_unreachable_but_a_5xx_does_not():
    assert classify(NoAnswer("connect", sent=False, detail="x")).unreachable
    assert not classify(Answered(503, {})).unreachable


def test_retry_after_header_is_found_case_insensitively():
    assert classify(Answered(429, {"retry-after": "3"})).retry_after == "3"
