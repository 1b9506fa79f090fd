"""The outcome of one delivery attempt, decided in one place (CONTRACT §6).

Every sink reports what happened (``Answered`` or ``NoAnswer``); ``classify`` turns that into
one ``Outcome`` by the table below. Nothing else in tillsync decides whether an attempt
worked. Keep the table and the contract's table identical.

| what happened                               | action     | notes                          |
|---------------------------------------------|------------|--------------------------------|
| 2xx                                         | DELIVERED  |                                |
| 408, 425, 429, 5xx                          | RETRY      | backoff; Retry-After on 429 and|
|                                             |            | 503 holds the whole sink       |
| 401, 403, 404, 405, 407                     | PAUSE      | credential or URL problem:     |
|                                             |            | nothing dead-lettered          |
| 3xx                                         | PAUSE      | redirects are not followed: the|
|                                             |            | URL is wrong, like a 404       |
| 409                                         | per sink   | on_conflict retry/delivered/   |
|                                             |            | dead (default retry)           |
| other 4xx, and 1xx (not a final answer)     | DEAD       | kept, shown, retryable         |
| connect error, DNS failure (nothing sent)   | RETRY      | sink offline                   |
| TLS verification failed (nothing sent)      | PAUSE      | never sent to an unverified    |
|                                             |            | peer; an operator must look    |
| timeout or reset after the request was sent | RETRY      | in doubt: it may have applied  |
| the sink cannot encode the payload          | DEAD       | nothing was sent               |
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

OnConflict = Literal["retry", "delivered", "dead"]
Failure = Literal["connect", "tls", "timeout", "reset"]


class Action(enum.StrEnum):
    """What the relay does with the delivery (and, for PAUSE, with the sink)."""

    DELIVERED = "delivered"
    RETRY = "retry"
    PAUSE = "pause"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Answered:
    """The server answered with an HTTP status (``body`` is a short excerpt)."""

    status: int
    headers: Mapping[str, str]
    body: str = ""


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """No HTTP answer. ``sent``: the request may have reached the server."""

    failure: Failure
    sent: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Unsendable:
    """The sink cannot turn this payload into a request; nothing was sent."""

    reason: str


AttemptResult = Answered | NoAnswer | Unsendable


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision about one attempt."""

    action: Action
    reason: str
    in_doubt: bool = False  # the attempt may have taken effect unseen
    retry_after: str | None = None  # raw Retry-After to hold the whole sink (429/503)
    unreachable: bool = False  # the sink could not be reached at all (offline, not failing)
    status: int | None = None  # the HTTP status, when there was one

    @property
    def headline(self) -> str:
        """The reason without the server's body: what logs and the sink's status carry.

        A body may echo the event back (a 422 quoting the customer's email), so it is kept
        only with the delivery, encrypted, and shown by the admin API (CONTRACT §8).
        """
        return f"HTTP {self.status}" if self.status is not None else self.reason


PAUSE_STATUSES = frozenset({401, 403, 404, 405, 407})
RETRY_STATUSES = frozenset({408, 425, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})


def classify(result: AttemptResult, *, on_conflict: OnConflict = "retry") -> Outcome:
    """Decide the outcome of one attempt by the table in this module's docstring."""
    if isinstance(result, NoAnswer):
        return _classify_no_answer(result)
    if isinstance(result, Unsendable):
        return Outcome(Action.DEAD, f"unsendable: {result.reason}")
    status = result.status
    if 200 <= status < 300:
        return _delivered(status, result.body)  # the common case, once per delivery
    reason = _reason(result)
    if status in RETRY_STATUSES or 500 <= status < 600:
        retry_after = (_header(result.headers, "Retry-After")
                       if status in RETRY_AFTER_STATUSES else None)
        return Outcome(Action.RETRY, reason, retry_after=retry_after, status=status)
    if status in PAUSE_STATUSES or 300 <= status < 400:
        return Outcome(Action.PAUSE, reason, status=status)
    if status == 409:
        action = {"retry": Action.RETRY, "delivered": Action.DELIVERED,
                  "dead": Action.DEAD}[on_conflict]
        return Outcome(action, reason, status=status)
    return Outcome(Action.DEAD, reason, status=status)


def _classify_no_answer(result: NoAnswer) -> Outcome:
    reason = f"{result.failure}: {result.detail}"
    if result.failure == "tls":
        return Outcome(Action.PAUSE, reason, unreachable=True)
    return Outcome(Action.RETRY, reason, in_doubt=result.sent, unreachable=not result.sent)


@functools.lru_cache(maxsize=64)  # a sink acknowledges with the same few bodies
def _delivered(status: int, body: str) -> Outcome:
    return Outcome(Action.DELIVERED, _reason(Answered(status, {}, body)), status=status)


def _reason(result: Answered) -> str:
    text = f"HTTP {result.status}"
    body = " ".join(result.body.split())[:200]
    return f"{text}: {body}" if body else text


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None
