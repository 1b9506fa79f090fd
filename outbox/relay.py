"""The relay: per sink, senders that attempt claimed deliveries and a loop of store rounds.

For each sink::

    claim heads ─► (token bucket) ─► lookup if in doubt ─► sink.deliver ─► classify ─► settle

Claims and settlements travel in *rounds*: one ``Outbox.settle_and_claim`` records every
verdict reached since the last round and claims the next due stream heads, in one
transaction and one fsync, so the cost of a commit is shared by every delivery in it.

Sink state, shown in status and logged once per transition:

- ``online``: the last attempt got a real answer (or nothing has failed yet);
- ``backing_off``: the sink answers but asks us to wait (5xx, 408, 425, 429, Retry-After);
- ``offline``: the sink cannot be reached (connect errors): one probe at a time, with
  full-jitter backoff capped at ``backoff_cap_s`` so delivery resumes soon after the network
  returns;
- ``paused``: a credential or URL problem (401/403/404/405/407, 3xx, TLS verification).
  Nothing is dead-lettered; one probe every ``pause_recheck_s`` or on ``recheck()``.

A ``Retry-After`` on 429/503 holds the whole sink: no request goes to it before then. One
sink's state never touches another's: each relay has its own tasks, session and bucket.
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
# A round that fails to record (disk full, I/O error) is retried this often until it lands.
SETTLE_RETRY_S = 1.0
# Claimed deliveries waiting for a free sender, per unit of concurrency. A round (settle and
# claim, one fsync) takes a few milliseconds, as long as several requests to a sink on the
# local network, so the senders need this much in hand to stay busy until the next round.
CLAIM_AHEAD = 6
# Dead letters for an event whose print or delivery window has passed.
EXPIRED = "expired before it could be delivered"
STOPPED_MID_ATTEMPT = "the agent stopped before the answer came"

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
    """Delivers the owed events of one sink, in per-stream order, at most ``concurrency``.

    All on the event loop, and nothing per delivery (no task, no commit of its own):

    - ``concurrency`` sender tasks each take the next claimed delivery, attempt it, and
      leave its settlement (or, if it was not attempted, its release) in a buffer;
    - one round loop (``_run``) records everything buffered and claims more in one store
      round whenever there is something to record or room to claim into. Up to
      ``CLAIM_AHEAD`` × concurrency claimed deliveries wait for a sender, so a finished
      request is followed at once rather than after a commit.

    A delivery stays in flight in the store, blocking its stream, until the round holding
    its settlement has committed; only then can the stream's next event be claimed. A
    sender never waits for that commit: it goes on with another stream's delivery.
    """

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
        self._target = self.policy.concurrency * (1 + CLAIM_AHEAD)  # claimed, not settled
        self._ready: deque[Delivery] = deque()  # claimed, waiting for a sender
        self._sending = 0  # attempts under way
        self._settled: list[Settlement] = []  # verdicts the next round records
        self._released: list[Delivery] = []  # claimed but not attempted: given back
        self._on_wire: set[int] = set()  # event ids whose request may be on the wire
        self._marks_sends = store.tracks_sends(sink.name)  # then its own mark decides
        self._recording = 0  # settlements in the round being committed
        self._due: float | None = None  # the store's next due time after the last round
        self._idle: deque[asyncio.Future[None]] = deque()  # senders waiting for work
        self._waiter: asyncio.Future[None] | None = None  # the round loop, when waiting
        self._workers: list[asyncio.Task[None]] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False  # no more claims; senders finish what they hold
        self._closing = False  # senders are gone: record what is left and end
        self.state = SinkState.ONLINE
        self._hold_until = 0.0  # monotonic: no request to this sink before then
        self._retry_after_until = 0.0  # monotonic: the part of the hold the sink asked for
        self._hold_to_record: float | None = None  # a Retry-After deadline (wall clock)
        self._failures = 0
        self._failing_since: float | None = None
        self._last_success_at: float | None = None
        self._last_error: str | None = None
        self._next_attempt_at: float | None = None
        self._answers: deque[list[int]] = deque()  # [monotonic second, answers in it]

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sink and start the round loop and the senders.

        A Retry-After deadline recorded before a restart still holds the sink (capped at
        ``max_retry_after_s`` from now, in case the wall clock was set back meanwhile).
        The sink's last success is read back too, so status does not forget it.
        """
        with contextlib.suppress(OutboxError):
            self._last_success_at = await self.store.sink_last_delivered(self.name)
            until = await self.store.sink_hold(self.name)
            wait = None if until is None else until - self._clock()
            if wait is not None and wait > 0:
                self._last_error = "Retry-After from before the restart"
                self._hold_for_retry_after(min(wait, self.policy.max_retry_after_s),
                                           SinkState.BACKING_OFF, self._last_error)
        await self.sink.start()
        self._loop_task = asyncio.create_task(self._run(), name=f"relay-{self.name}")
        self._workers = [asyncio.create_task(self._work(), name=f"relay-{self.name}-{i}")
                         for i in range(self.policy.concurrency)]

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop claiming; give attempts ``grace_s`` to finish, then cut the rest off.

        Claims never attempted go back to pending; an attempt cut off on the wire is
        recorded in doubt (for a sink that ``tracks_sends``, its own mark decides).
        """
        self._stopping = True
        self._release_ready()
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._kick()
        workers = [task for task in self._workers if not task.done()]
        if workers:
            _, late = await asyncio.wait(workers, timeout=grace_s)
            for task in late:
                task.cancel()  # see _work: in doubt or given back (same key and body)
            await asyncio.gather(*late, return_exceptions=True)
        self._closing = True
        self._kick()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self.sink.close()

    async def recheck(self) -> None:
        """Try the sink now: lift a pause's or a backoff's wait; make its deliveries due.

        A Retry-After still holds: the sink said "not before", and an operator's retry of
        some other event does not change that (CONTRACT §6).
        """
        self._hold_until = self._retry_after_until
        self._kick()
        with contextlib.suppress(OutboxError):
            await self.store.reschedule(self.name)

    def status(self) -> RelayStatus:
        """Return a snapshot for ``/v1/status`` and metrics."""
        held = (len(self._ready) + self._sending + len(self._settled) + self._recording)
        return RelayStatus(self.name, self.state, self._last_success_at, self._last_error,
                           self._next_attempt(), self._failures, held,
                           self.delivery_rate())

    def _next_attempt(self) -> float | None:
        """When the sink will be tried next, if it is waiting; None when it is not.

        The end of a hold (offline, paused, Retry-After), else the earliest retry of a
        backed-off delivery; a time already past means nothing is scheduled.
        """
        now = self._clock()
        if self._next_attempt_at is not None and self._next_attempt_at > now:
            return self._next_attempt_at
        if self.state is not SinkState.ONLINE and self._due is not None and self._due > now:
            return self._due
        return None

    def delivery_rate(self) -> float:
        """Deliveries per second over the last minute (0.0 when none)."""
        now = self._monotonic()
        self._forget_old_rates(now)
        if not self._answers:
            return 0.0
        span = max(1.0, now - self._answers[0][0])
        return sum(n for _, n in self._answers) / min(span, RATE_WINDOW_S)

    # -- the round loop ----------------------------------------------------------------

    async def _run(self) -> None:
        wakeup = self.store.wakeup(self.name)
        wakeup.set()  # look at least once: an earlier relay on this store may have cleared it
        while True:
            hold = self._hold_until - self._monotonic()
            room = 0
            if not self._stopping and hold <= 0:
                room = self._room()
            claim = room > 0 and (wakeup.is_set() or (
                self._due is not None and self._due <= self._clock()))
            settled, released = self._settled, self._released
            if settled or released or claim:
                if claim:
                    wakeup.clear()
                if not await self._round(settled, released, room if claim else 0):
                    return
                continue
            if self._closing:
                return
            if hold > 0:
                await self._wait(hold)
            elif room > 0:
                due = self._due
                await self._wait(None if due is None else
                                 min(MAX_IDLE_WAIT_S, max(0.0, due - self._clock())), wakeup)
            else:
                await self._wait(None)  # every sender busy, the buffer full: a kick wakes

    async def _round(self, settled: list[Settlement], released: list[Delivery],
                     limit: int) -> bool:
        """Record, give back and claim in one store round; False once the loop must end."""
        self._settled, self._released = [], []
        hold_until, self._hold_to_record = self._hold_to_record, None
        self._recording = len(settled)
        try:
            batch, self._due = await self.store.settle_and_claim(
                self.name, settled, released, limit, hold_until=hold_until)
        except OutboxClosed:
            return False
        except OutboxError as err:
            # Nothing of the round was recorded: keep it (a delivery left in flight would
            # block its stream until a restart) and try again.
            self._settled[:0] = settled
            self._released[:0] = released
            if self._hold_to_record is None:
                self._hold_to_record = hold_until
            self._due = 0.0  # look again for due deliveries too
            self._note_error(f"outbox: {err}")
            if self._closing:
                return False
            await self._wait(SETTLE_RETRY_S)
            return True
        finally:
            self._recording = 0
        if batch:
            self._hand_out(batch)
        return True

    def _room(self) -> int:
        # Offline or paused: one probe at a time, so a dead sink costs one connection.
        if self.state in (SinkState.OFFLINE, SinkState.PAUSED):
            return 1 - len(self._ready) - self._sending
        return self._target - len(self._ready) - self._sending

    def _hand_out(self, batch: list[Delivery]) -> None:
        if self._stopping or self._hold_until > self._monotonic():
            self._released.extend(batch)  # claimed as a stop or a hold began
            return
        self._ready.extend(batch)
        idle, wanted = self._idle, len(batch)
        while idle and wanted:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                wanted -= 1

    def _release_ready(self) -> None:
        if self._ready:
            self._released.extend(self._ready)
            self._ready.clear()
            self._kick()

    def _kick(self) -> None:
        """Wake the round loop if it waits (it re-reads everything before waiting again)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, seconds: float | None, wakeup: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _wake, waiter)
        watcher = None
        if wakeup is not None:
            watcher = loop.create_task(wakeup.wait())
            watcher.add_done_callback(lambda _: _wake(waiter))
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()

    # -- the senders -------------------------------------------------------------------

    async def _work(self) -> None:
        ready = self._ready
        loop = asyncio.get_running_loop()
        while True:
            if not ready:
                if self._stopping:
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            delivery = ready.popleft()
            self._sending += 1
            try:
                settlement = await self._send(delivery)
            except Exception as err:
                settlement = self._crashed(delivery, err)
            except asyncio.CancelledError:
                # Stopped mid-attempt. A request that may be on the wire may also have taken
                # effect: in doubt (a lookup settles it, or a resend with the same key and
                # body). One not yet sent is just given back.
                if delivery.event_id in self._on_wire and not self._marks_sends:
                    self._settled.append(Settlement(
                        delivery.event_id, self.name, Verdict.IN_DOUBT,
                        next_attempt_at=self._clock(), error=STOPPED_MID_ATTEMPT))
                else:
                    self._released.append(delivery)
                self._kick()
                raise
            finally:
                self._sending -= 1
                self._on_wire.discard(delivery.event_id)
            if settlement is None:
                self._released.append(delivery)
            else:
                self._settled.append(settlement)
            self._kick()

    def _crashed(self, delivery: Delivery, err: Exception) -> Settlement:
        # Left in flight it would block its stream until a restart: retry it later.
        log.error("relay %s: attempt of event %d failed unexpectedly", self.name,
                  delivery.event_id, exc_info=err)
        self._failed(f"internal error: {err!r}")
        return Settlement(delivery.event_id, self.name, Verdict.RETRY,
                          next_attempt_at=self._clock() + self._backoff(delivery.attempts + 1),
                          error=f"internal error: {type(err).__name__}")

    async def _send(self, delivery: Delivery) -> Settlement | None:
        if delivery.expires_at is not None and self._clock() >= delivery.expires_at:
            return Settlement(delivery.event_id, self.name, Verdict.DEAD, error=EXPIRED)
        if self._bucket is not None:
            await self._bucket.acquire()
        if self._hold_until > self._monotonic():
            return None  # a Retry-After arrived while this one waited: not before then
        started = self._monotonic()
        if delivery.in_doubt and await self.sink.lookup(delivery):
            # The earlier attempt took effect: a delivery, counted as one.
            if self._on_attempt is not None:
                self._on_attempt(self.name, Action.DELIVERED, self._monotonic() - started)
            self._answered(delivered=True)
            return Settlement(delivery.event_id, self.name, Verdict.DELIVERED)
        started = self._monotonic()
        self._on_wire.add(delivery.event_id)  # _work forgets it once the attempt ends
        result = await self.sink.deliver(delivery)
        outcome = classify(result, on_conflict=self.policy.on_conflict)
        if self._on_attempt is not None:
            self._on_attempt(self.name, outcome.action, self._monotonic() - started)
        return self._decide(delivery, outcome)

    def _decide(self, delivery: Delivery, outcome: Outcome) -> Settlement:
        """Turn an outcome into a settlement, and move the sink's state. The one place."""
        if outcome.action is Action.DELIVERED:
            self._answered(delivered=True)
            return Settlement(delivery.event_id, self.name, Verdict.DELIVERED)
        now = self._clock()
        key = (delivery.event_id, self.name)
        if outcome.action is Action.DEAD:
            self._answered(delivered=False)  # the sink is up; this event is the problem
            self._last_error = outcome.headline
            log.warning("sink %s: event %d dead-lettered: %s (the answer is kept with the"
                        " event: tillsync outbox show %d)", self.name, delivery.event_id,
                        outcome.headline, delivery.event_id)
            return Settlement(*key, Verdict.DEAD, error=outcome.reason)
        # Logs and status get the headline; the full reason, body included, is stored with
        # the delivery (encrypted) for the admin API.
        self._failed(outcome.headline)
        verdict = Verdict.IN_DOUBT if outcome.in_doubt else Verdict.RETRY
        if outcome.action is Action.PAUSE:
            self._hold(self.policy.pause_recheck_s, SinkState.PAUSED, outcome.headline)
            return Settlement(*key, verdict, next_attempt_at=now, error=outcome.reason)
        wait = retry_after_seconds(outcome.retry_after, now=now,
                                   cap_s=self.policy.max_retry_after_s)
        if wait is not None:
            # A Retry-After is the sink's own word: recorded with this verdict, so that a
            # restart honours it too (tests/system/test_chaos.py counts violations).
            self._hold_to_record = max(self._hold_to_record or 0.0, now + wait)
            self._hold_for_retry_after(wait, SinkState.BACKING_OFF, outcome.headline)
        elif outcome.unreachable or outcome.status == 429:
            wait = self._backoff(self._failures)  # the whole sink is affected
            state = SinkState.OFFLINE if outcome.unreachable else SinkState.BACKING_OFF
            self._hold(wait, state, outcome.headline)
        else:
            wait = self._backoff(delivery.attempts + 1)  # only this delivery waits
            self._set_state(SinkState.BACKING_OFF, outcome.headline)
        return Settlement(*key, verdict, next_attempt_at=now + wait, error=outcome.reason)

    def _backoff(self, attempt: int) -> float:
        return full_jitter(attempt, base_s=self.policy.backoff_base_s,
                           cap_s=self.policy.backoff_cap_s, rng=self._rng)

    # -- sink state ----------------------------------------------------------------------

    def _hold(self, seconds: float, state: SinkState, reason: str) -> None:
        self._hold_until = max(self._hold_until, self._monotonic() + seconds)
        self._next_attempt_at = self._clock() + (self._hold_until - self._monotonic())
        self._set_state(state, reason)
        self._release_ready()  # nothing claimed goes out before the hold ends

    def _hold_for_retry_after(self, seconds: float, state: SinkState, reason: str) -> None:
        self._retry_after_until = max(self._retry_after_until, self._monotonic() + seconds)
        self._hold(seconds, state, reason)

    def _answered(self, *, delivered: bool) -> None:
        # Either way the delivery left the queue: it counts toward the drain rate.
        now = self._monotonic()
        if delivered:
            self._last_success_at = self._clock()
        second = int(now)
        answers = self._answers
        if answers and answers[-1][0] == second:
            answers[-1][1] += 1
        else:
            answers.append([second, 1])
            self._forget_old_rates(now)
        if self._hold_until > now:
            return  # an answer to a request sent before the hold does not lift it
        if self.state is not SinkState.ONLINE:
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

    def _forget_old_rates(self, now: float) -> None:
        horizon = now - RATE_WINDOW_S
        answers = self._answers
        while answers and answers[0][0] < horizon:
            answers.popleft()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
