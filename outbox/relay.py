"""The relay: one loop per sink that claims owed deliveries, attempts them, and settles them.

For each sink::

    claim heads ─► (token bucket) ─► lookup if in doubt ─► sink.deliver ─► classify ─► settle

Sink state, shown in status and logged once per transition:

- ``online``: the last attempt got a real answer (or nothing has failed yet);
- ``backing_off``: the sink answers but asks us to wait (5xx, 408, 425, 429, Retry-After);
- ``offline``: the sink cannot be reached (connect errors): one probe at a time, with
  full-jitter backoff capped at ``backoff_cap_s`` so delivery resumes soon after the network
  returns;
- ``paused``: a credential or URL problem (401/403/404/405/407, 3xx, TLS verification).
  Nothing is dead-lettered; one probe every ``pause_recheck_s`` or on ``recheck()``.

A ``Retry-After`` on 429/503 holds the whole sink: no request goes to it before then. One
sink's state never touches another's: each relay has its own task, session and bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from outbox.classify import Action, Outcome, classify
from outbox.errors import OutboxClosed, OutboxError
from outbox.models import Delivery, Settlement, Verdict
from outbox.pacing import TokenBucket, full_jitter, retry_after_seconds
from outbox.sinks.base import Sink
from outbox.store import Outbox

log = logging.getLogger(__name__)

# Deliveries per second are measured over this window for the drain ETA.
RATE_WINDOW_S = 60.0
# An idle relay with a due time further away re-reads it at least this often (wall-clock
# times in the store may jump when the clock is set).
MAX_IDLE_WAIT_S = 30.0
# A settle that fails (disk full, I/O error) is retried this often until it lands.
SETTLE_RETRY_S = 1.0
# Dead letters for an event whose print or delivery window has passed.
EXPIRED = "expired before it could be delivered"

AttemptObserver = Callable[[str, Action, float], None]


class SinkState(enum.StrEnum):
    """A sink's health as status shows it."""

    ONLINE = "online"
    BACKING_OFF = "backing_off"
    OFFLINE = "offline"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """A snapshot of one sink's relay for status and metrics."""

    sink: str
    state: SinkState
    last_success_at: float | None
    last_error: str | None
    next_attempt_at: float | None
    consecutive_failures: int
    in_flight: int
    delivery_rate_per_s: float


class Relay:
    """Delivers the owed events of one sink, in per-stream order, at most ``concurrency``."""

    def __init__(self, store: Outbox, sink: Sink, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 on_attempt: AttemptObserver | None = None) -> None:
        self.store = store
        self.sink = sink
        self.name = sink.name
        self.policy = sink.policy
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._on_attempt = on_attempt
        self._bucket = (TokenBucket(self.policy.rate_limit_per_s, clock=monotonic)
                        if self.policy.rate_limit_per_s else None)
        self._tasks: set[asyncio.Task[None]] = set()
        # At most ``concurrency`` requests at once; up to as many more deliveries wait
        # claimed, so a finished request is followed at once instead of after a claim's
        # commit. Settling happens after the slot is given back, for the same reason.
        self._sending = asyncio.Semaphore(self.policy.concurrency)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._poke = asyncio.Event()  # interrupts waits: stop, recheck, finished attempts
        self.state = SinkState.ONLINE
        self._hold_until = 0.0  # monotonic: no request to this sink before then
        self._failures = 0
        self._failing_since: float | None = None
        self._last_success_at: float | None = None
        self._last_error: str | None = None
        self._next_attempt_at: float | None = None
        self._delivered_at: deque[float] = deque()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sink and start the loop."""
        await self.sink.start()
        self._loop_task = asyncio.create_task(self._run(), name=f"relay-{self.name}")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; give attempts ``grace_s`` to finish; the rest go back to pending."""
        self._stopping = True
        self._poke.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.sink.close()

    async def recheck(self) -> None:
        """Try the sink now: lift a pause's wait and make its backed-off deliveries due."""
        self._hold_until = 0.0
        self._poke.set()
        with contextlib.suppress(OutboxError):
            await self.store.reschedule(self.name)

    def status(self) -> RelayStatus:
        """Return a snapshot for ``/v1/status`` and metrics."""
        return RelayStatus(self.name, self.state, self._last_success_at, self._last_error,
                           self._next_attempt_at, self._failures, len(self._tasks),
                           self.delivery_rate())

    def delivery_rate(self) -> float:
        """Deliveries per second over the last minute (0.0 when none)."""
        self._forget_old_rates()
        if not self._delivered_at:
            return 0.0
        span = max(1.0, self._monotonic() - self._delivered_at[0])
        return len(self._delivered_at) / min(span, RATE_WINDOW_S)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        wakeup = self.store.wakeup(self.name)
        while not self._stopping:
            try:
                await self._step(wakeup)
            except OutboxClosed:
                return
            except OutboxError as err:
                # The store refuses for now (I/O error, reopening): wait, then try again.
                self._note_error(f"outbox: {err}")
                await self._wait(SETTLE_RETRY_S)

    async def _step(self, wakeup: asyncio.Event) -> None:
        hold = self._hold_until - self._monotonic()
        if hold > 0:
            await self._wait(hold)
            return
        room = self._limit() - len(self._tasks)
        if room <= 0:
            await self._wait(None)
            return
        wakeup.clear()
        batch = await self.store.claim(self.name, room)
        if batch:
            for delivery in batch:
                task = asyncio.create_task(self._attempt(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._attempt_done)
            return
        due = await self.store.next_due(self.name)
        timeout = None if due is None else min(MAX_IDLE_WAIT_S, max(0.0, due - self._clock()))
        await self._wait(timeout, wakeup)

    def _limit(self) -> int:
        # Offline or paused: one probe at a time, so a dead sink costs one connection.
        if self.state in (SinkState.OFFLINE, SinkState.PAUSED):
            return 1
        return 2 * self.policy.concurrency  # half of them sending, half claimed and ready

    async def _wait(self, seconds: float | None, wakeup: asyncio.Event | None = None) -> None:
        self._poke.clear()
        if self._stopping:
            return
        waiters = [asyncio.ensure_future(self._poke.wait())]
        if wakeup is not None:
            waiters.append(asyncio.ensure_future(wakeup.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._poke.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("relay %s: attempt crashed", self.name, exc_info=task.exception())

    # -- one attempt -------------------------------------------------------------------

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            settlement = await self._try(delivery)
        except Exception as err:
            # Left in flight it would block its stream until a restart: retry it later.
            log.exception("relay %s: attempt of event %d failed unexpectedly", self.name,
                          delivery.event_id)
            self._failed(f"internal error: {err!r}")
            settlement = Settlement(delivery.event_id, self.name, Verdict.RETRY,
                                    next_attempt_at=self._clock() + self._backoff(
                                        delivery.attempts + 1),
                                    error=f"internal error: {type(err).__name__}")
        except asyncio.CancelledError:
            # Stopped mid-attempt: give it back (same key, same body next time).
            with contextlib.suppress(OutboxError):
                await asyncio.shield(self.store.release([delivery]))
            raise
        if settlement is None:
            with contextlib.suppress(OutboxError):
                await self.store.release([delivery])
            return
        await self._settle(settlement)

    async def _try(self, delivery: Delivery) -> Settlement | None:
        async with self._sending:
            return await self._send(delivery)

    async def _send(self, delivery: Delivery) -> Settlement | None:
        if delivery.expires_at is not None and self._clock() >= delivery.expires_at:
            return Settlement(delivery.event_id, self.name, Verdict.DEAD, error=EXPIRED)
        if self._bucket is not None:
            await self._bucket.acquire()
        if self._hold_until > self._monotonic():
            return None  # a Retry-After arrived while this one waited: not before then
        if delivery.in_doubt and await self.sink.lookup(delivery):
            self._answered(delivered=True)
            return Settlement(delivery.event_id, self.name, Verdict.DELIVERED)
        started = self._monotonic()
        result = await self.sink.deliver(delivery)
        outcome = classify(result, on_conflict=self.policy.on_conflict)
        if self._on_attempt is not None:
            self._on_attempt(self.name, outcome.action, self._monotonic() - started)
        return self._decide(delivery, outcome)

    async def _settle(self, settlement: Settlement) -> None:
        # Until the verdict is recorded the delivery stays in flight and blocks its
        # stream, so keep trying (the store may be briefly full or reopening).
        while True:
            try:
                await self.store.settle([settlement])
                return
            except OutboxClosed:
                return
            except OutboxError as err:
                self._note_error(f"outbox: {err}")
                if self._stopping:
                    return
                await asyncio.sleep(SETTLE_RETRY_S)

    def _decide(self, delivery: Delivery, outcome: Outcome) -> Settlement:
        """Turn an outcome into a settlement, and move the sink's state. The one place."""
        now = self._clock()
        key = (delivery.event_id, self.name)
        if outcome.action is Action.DELIVERED:
            self._answered(delivered=True)
            return Settlement(*key, Verdict.DELIVERED)
        if outcome.action is Action.DEAD:
            self._answered(delivered=False)  # the sink is up; this event is the problem
            self._last_error = outcome.reason
            log.warning("sink %s: event %d dead-lettered: %s", self.name, delivery.event_id,
                        outcome.reason)
            return Settlement(*key, Verdict.DEAD, error=outcome.reason)
        self._failed(outcome.reason)
        verdict = Verdict.IN_DOUBT if outcome.in_doubt else Verdict.RETRY
        if outcome.action is Action.PAUSE:
            self._hold(self.policy.pause_recheck_s, SinkState.PAUSED, outcome.reason)
            return Settlement(*key, verdict, next_attempt_at=now, error=outcome.reason)
        wait = retry_after_seconds(outcome.retry_after, now=now,
                                   cap_s=self.policy.max_retry_after_s)
        if wait is None and (outcome.unreachable or outcome.status == 429):
            wait = self._backoff(self._failures)  # the whole sink is affected
        if wait is not None:
            state = SinkState.OFFLINE if outcome.unreachable else SinkState.BACKING_OFF
            self._hold(wait, state, outcome.reason)
        else:
            wait = self._backoff(delivery.attempts + 1)  # only this delivery waits
            self._set_state(SinkState.BACKING_OFF, outcome.reason)
        return Settlement(*key, verdict, next_attempt_at=now + wait, error=outcome.reason)

    def _backoff(self, attempt: int) -> float:
        return full_jitter(attempt, base_s=self.policy.backoff_base_s,
                           cap_s=self.policy.backoff_cap_s, rng=self._rng)

    # -- sink state ----------------------------------------------------------------------

    def _hold(self, seconds: float, state: SinkState, reason: str) -> None:
        self._hold_until = max(self._hold_until, self._monotonic() + seconds)
        self._next_attempt_at = self._clock() + (self._hold_until - self._monotonic())
        self._set_state(state, reason)

    def _answered(self, *, delivered: bool) -> None:
        # Either way the delivery left the queue: it counts toward the drain rate.
        if delivered:
            self._last_success_at = self._clock()
        self._delivered_at.append(self._monotonic())
        self._forget_old_rates()
        if self._hold_until > self._monotonic():
            return  # an answer to a request sent before the hold does not lift it
        self._set_state(SinkState.ONLINE, None)
        self._failures = 0
        self._failing_since = None
        self._next_attempt_at = None

    def _failed(self, reason: str) -> None:
        if self._failures == 0:
            self._failing_since = self._monotonic()
        self._failures += 1
        self._last_error = reason

    def _note_error(self, reason: str) -> None:
        if reason != self._last_error:
            log.error("relay %s: %s", self.name, reason)
        self._last_error = reason

    def _set_state(self, new: SinkState, reason: str | None) -> None:
        old, self.state = self.state, new
        if old is new:
            return
        if new is SinkState.ONLINE:
            took = self._monotonic() - (self._failing_since or self._monotonic())
            log.info("sink %s: recovered after %d failed attempts, %.0f s (was %s)",
                     self.name, self._failures, took, old)
        else:
            log.warning("sink %s: %s → %s: %s", self.name, old, new, reason)

    def _forget_old_rates(self) -> None:
        horizon = self._monotonic() - RATE_WINDOW_S
        while self._delivered_at and self._delivered_at[0] < horizon:
            self._delivered_at.popleft()
