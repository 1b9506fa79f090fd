"""The relay against a stand-in cloud on 127.0.0.1 with injected faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from agent.standin.cloud import Fault, StandinCloud, http_date
from outbox import DeliveryState, NewEvent, Outbox
from outbox.classify import classify
from outbox.models import Delivery
from outbox.relay import Relay, SinkState
from outbox.sinks import SinkPolicy, WebhookSettings, WebhookSink
from tests.outbox.conftest import OpenStore
from tests.polling import until
from tests.stub_server import serving

FAST = SinkPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, pause_recheck_s=0.2)


def sale(terminal: str, seq: int, sinks: tuple[str, ...] = ("cloud",)) -> NewEvent:
    data = {"terminal_id": terminal, "transaction_id": f"{terminal}-{seq}", "total": "3.98"}
    payload = json.dumps({"store_id": "store-042", "kind": "transaction", "data": data},
                         separators=(",", ":")).encode()
    return NewEvent(stream=terminal, kind="transaction", payload=payload, sinks=sinks,
                    idempotency_key=f"key-{terminal}-{seq}", dedupe_key=f"{terminal}/{seq}")


@pytest.fixture
async def store(open_store: OpenStore) -> Outbox:
    """A store on the real clock: the relay and the store must share one."""
    return await open_store(clock=time.time)


@pytest.fixture
async def cloud() -> AsyncIterator[StandinCloud]:
    async with StandinCloud() as server:
        yield server


class Running:
    """Relays started for a test and stopped at its end."""

    def __init__(self) -> None:
        self.relays: list[Relay] = []

    async def start(self, store: Outbox, url: str, *, name: str = "cloud",
                    policy: SinkPolicy = FAST, **settings: object) -> Relay:
        sink = WebhookSink(name, WebhookSettings(url=url, **settings), policy)  # type: ignore[arg-type]
        relay = Relay(store, sink)
        await relay.start()
        self.relays.append(relay)
        return relay


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    runner = Running()
    yield runner
    for relay in runner.relays:
        await relay.stop(grace_s=1)


@contextlib.contextmanager
def never_accepting_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full: connecting to it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue so that further SYNs go unanswered
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in (listener, *fillers):
            sock.close()


async def drained(store: Outbox, sink: str = "cloud", timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = (await store.stats()).sinks.get(sink)
        if stats is not None and stats.pending == 0 and stats.in_doubt == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sink} not drained: {stats}")
        await asyncio.sleep(0.02)


# -- the contract's scenarios ----------------------------------------------------------


async def test_server_errors_are_retried_until_delivered_once(store: Outbox, cloud, running):
    cloud.faults.extend([Fault.status(500), Fault.status(502), Fault.status(503)])
    await store.append(sale("T01", 1))
    await running.start(store, cloud.url)
    await drained(store)
    assert len(cloud.effects) == 1 and cloud.duplicates() == {}
    [info] = await store.list_deliveries()
    assert (info.state, info.attempts) == (DeliveryState.DELIVERED, 4)


@pytest.mark.parametrize("as_date", [False, True], ids=["seconds", "http-date"])
async def test_retry_after_holds_the_sink_so_no_request_arrives_early(
        store: Outbox, cloud, running, as_date: bool):
    retry_after = http_date(time.time() + 2) if as_date else "1"
    cloud.faults.append(Fault.status(503 if as_date else 429, retry_after=retry_after))
    for seq in range(3):
        await store.append(sale("T01", seq))
    started = time.monotonic()
    relay = await running.start(store, cloud.url)
    await until(lambda: relay.state is SinkState.BACKING_OFF, 5)
    assert relay.status().next_attempt_at is not None
    await drained(store)
    assert cloud.retry_after_violations == []
    assert time.monotonic() - started >= 1.0
    assert len(cloud.effects) == 3


async def test_retry_after_stops_new_requests_from_concurrent_streams(
        store: Outbox, cloud, running):
    """Requests already on the wire when the 429 was issued cannot be recalled; every
    request sent after the answer arrived waits for the allowed time."""
    cloud.faults.append(Fault.status(429, retry_after="1"))
    for terminal in ("T01", "T02", "T03", "T04"):
        for seq in range(3):
            await store.append(sale(terminal, seq))
    await running.start(store, cloud.url, policy=SinkPolicy(concurrency=4))
    await drained(store)
    assert len(cloud.effects) == 12
    assert len(cloud.retry_after_violations) <= 3
    assert all(v.early_by_s > 0.9 for v in cloud.retry_after_violations), (
        "only requests sent together with the one that got 429 may arrive early")


async def test_a_retry_after_outlives_a_relay_restart(store: Outbox, cloud, running):
    """GIVEN a 429 with Retry-After 2 s WHEN the relay is stopped right after it and a new
    relay starts on the same store (an agent restart) THEN the new relay sends nothing to
    the sink before the deadline either, for any stream, and then delivers everything."""
    cloud.faults.append(Fault.status(429, retry_after="2"))
    for terminal in ("T01", "T02", "T03"):
        await store.append(sale(terminal, 1))
    first = await running.start(store, cloud.url, policy=SinkPolicy(concurrency=1))
    await until(lambda: first.state is SinkState.BACKING_OFF, 5)
    answered_at = cloud.requests[0].at
    await until(lambda: any(r.outcome == "fault" for r in cloud.requests), 5)
    await first.stop(grace_s=1)  # the verdict and the deadline are recorded at stop
    running.relays.remove(first)
    assert await store.sink_hold("cloud") == pytest.approx(answered_at + 2, abs=0.5)
    cloud._not_before = None  # the cloud's watchdog: only the new relay is judged here
    second = await running.start(store, cloud.url)
    assert second.state is SinkState.BACKING_OFF
    await drained(store)
    later = [r.at for r in cloud.requests[1:]]
    assert later and min(later) >= answered_at + 2 - 0.05, (answered_at, later)
    assert len(cloud.effects) == 3


async def test_an_operator_recheck_does_not_cut_a_retry_after_short(
        store: Outbox, cloud, running):
    """GIVEN a 429 with Retry-After 2 s WHEN an operator's retry re-checks the sink right
    after it (``tillsync outbox retry`` does, to wake paused sinks) THEN still nothing is
    sent before the deadline; then everything is delivered."""
    cloud.faults.append(Fault.status(429, retry_after="2"))
    for terminal in ("T01", "T02"):
        await store.append(sale(terminal, 1))
    relay = await running.start(store, cloud.url, policy=SinkPolicy(concurrency=1))
    await until(lambda: relay.state is SinkState.BACKING_OFF, 5)
    answered_at = cloud.requests[0].at
    await relay.recheck()
    await drained(store)
    later = [r.at for r in cloud.requests[1:]]
    assert later and min(later) >= answered_at + 2 - 0.05, (answered_at, later)
    assert cloud.retry_after_violations == [] and len(cloud.effects) == 2


async def test_the_last_success_outlives_a_relay_restart(store: Outbox, cloud, running):
    """GIVEN a relay that delivered a sale WHEN a new relay starts on the same store (an
    agent restart) and the sink is now unreachable THEN the new relay still reports when
    the sink last took a delivery, instead of "never"."""
    await store.append(sale("T01", 1))
    first = await running.start(store, cloud.url)
    await drained(store)
    delivered_at = first.status().last_success_at
    assert delivered_at is not None
    await first.stop(grace_s=1)
    running.relays.remove(first)
    with socket.socket() as probe:  # a port nothing listens on: the cloud is gone
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/events"
    await store.append(sale("T01", 2))
    second = await running.start(store, dead_url)
    await until(lambda: second.state is not SinkState.ONLINE, 5)
    assert second.status().last_success_at == pytest.approx(delivered_at, abs=0.05)


async def test_a_credential_in_the_sink_url_stays_out_of_logs_and_status(
        store: Outbox, running, caplog):
    """GIVEN a sink URL carrying its API key in the query, and a sink whose listen queue is
    full, so connecting times out (aiohttp then quotes the URL in its error) WHEN the relay
    fails to reach it THEN neither the log nor the sink's last_error holds the key."""
    caplog.set_level(logging.DEBUG)
    with never_accepting_port() as port:
        await store.append(sale("T01", 1))
        relay = await running.start(store, f"http://127.0.0.1:{port}/events?api_key=S3CR3T",
                                    timeout_s=0.6)
        await until(lambda: relay.status().last_error is not None, 10)
        error = relay.status().last_error
        assert error is not None and "timeout" in error.lower(), error
        assert f"127.0.0.1:{port}/events" in error  # still says where
        assert "S3CR3T" not in error and "S3CR3T" not in caplog.text
        [info] = await store.list_deliveries()  # the stored reason too
        assert info.last_error is not None and "S3CR3T" not in info.last_error


async def test_response_lost_after_commit_is_resent_with_same_key_and_body(
        store: Outbox, cloud, running):
    cloud.faults.append(Fault.commit_then_drop())
    await store.append(sale("T01", 1))
    await running.start(store, cloud.url)
    await drained(store)
    assert len(cloud.effects) == 1
    posts = [r for r in cloud.requests if r.method == "POST"]
    assert len(posts) == 2 and len({r.key for r in posts}) == 1
    assert cloud.body_mismatches == [] and len(cloud.replays) == 1


async def test_a_response_slower_than_the_timeout_leaves_the_delivery_in_doubt_then_settles(
        store: Outbox, cloud, running):
    cloud.faults.append(Fault.slow(1.0))
    await store.append(sale("T01", 1))
    await running.start(store, cloud.url, timeout_s=0.3)
    seen_in_doubt = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [info] = await store.list_deliveries()
        seen_in_doubt |= info.state is DeliveryState.IN_DOUBT
        if info.state is DeliveryState.DELIVERED:
            break
        await asyncio.sleep(0.01)
    assert seen_in_doubt and info.state is DeliveryState.DELIVERED
    assert info.attempts >= 2
    assert len(cloud.effects) == 1 and cloud.body_mismatches == [] and cloud.duplicates() == {}


async def test_an_in_doubt_delivery_is_settled_by_lookup_without_resending(
        store: Outbox, cloud, running):
    cloud.faults.append(Fault.commit_then_drop())
    await store.append(sale("T01", 1))
    lookup = cloud.base_url + "/events/{idempotency_key}"
    await running.start(store, cloud.url, lookup_url=lookup)
    await drained(store)
    assert len([r for r in cloud.requests if r.method == "POST"]) == 1
    assert [r.outcome for r in cloud.requests if r.method == "GET"] == ["found"]


async def test_a_request_cut_off_by_a_stop_is_in_doubt_and_looked_up_before_any_resend(
        store: Outbox, cloud):
    """GIVEN a sale whose POST is on the wire, the cloud slow to answer WHEN the relay is
    stopped before the answer (an agent stop or restart) THEN the delivery is recorded in
    doubt, not plain pending; the next relay asks the sink's lookup first, finds the sale
    applied, and never POSTs it again; the lookup counts as a delivered attempt."""
    cloud.faults.append(Fault.slow(1.0))
    [appended] = await store.append_many([sale("T01", 1)])
    first = Relay(store, WebhookSink("cloud", WebhookSettings(url=cloud.url), FAST))
    await first.start()
    await until(lambda: any(r.method == "POST" for r in cloud.requests), 5)
    await first.stop(grace_s=0.1)  # the answer is a second away: cut off
    [info] = await store.list_deliveries()
    assert info.state is DeliveryState.IN_DOUBT and info.attempts == 1
    await cloud.wait_for_effects(1, timeout_s=5)  # the cloud did apply it
    attempts: list[tuple[str, str]] = []
    lookup = cloud.base_url + "/events/{idempotency_key}"
    second = Relay(store, WebhookSink("cloud", WebhookSettings(url=cloud.url,
                                                               lookup_url=lookup), FAST),
                   on_attempt=lambda sink, action, _s: attempts.append((sink, action)))
    await second.start()
    try:
        await drained(store)
    finally:
        await second.stop(grace_s=1)
    assert [r.method for r in cloud.requests] == ["POST", "GET"]
    assert len(cloud.effects) == 1 and appended.event_id == info.event_id
    assert attempts == [("cloud", "delivered")]


async def test_delivery_resumes_within_15_s_after_the_port_reopens_with_defaults(
        store: Outbox, cloud, running):
    """GIVEN default backoff WHEN the cloud's port is closed for a while and reopens THEN
    the first delivery lands within 15 s of the reopening (CONTRACT §6)."""
    await cloud.close_port()
    await store.append(sale("T01", 1))
    relay = await running.start(store, cloud.url, policy=SinkPolicy())
    await until(lambda: relay.state is SinkState.OFFLINE, 5)
    await asyncio.sleep(6)  # several failed probes: the backoff has grown
    await cloud.open_port()
    reopened = time.monotonic()
    await cloud.wait_for_effects(1, timeout_s=15)
    assert time.monotonic() - reopened < 15
    await until(lambda: relay.state is SinkState.ONLINE, 2)


async def test_401_pauses_the_sink_without_dead_letters_and_resumes_when_accepted(
        store: Outbox, cloud, running):
    cloud.auth_failing = True
    for seq in range(3):
        await store.append(sale("T01", seq))
    relay = await running.start(store, cloud.url)
    await until(lambda: relay.state is SinkState.PAUSED, 5)
    await asyncio.sleep(0.5)
    stats = (await store.stats()).sinks["cloud"]
    assert (stats.dead, stats.pending) == (0, 3)
    assert "401" in (relay.status().last_error or "")
    probes = len(cloud.requests)
    assert probes <= 4, "a paused sink is probed once per recheck period, not hammered"
    cloud.auth_failing = False
    await drained(store)
    assert relay.state is SinkState.ONLINE and len(cloud.effects) == 3


async def test_recheck_lifts_a_pause_at_once(store: Outbox, cloud, running):
    cloud.auth_failing = True
    await store.append(sale("T01", 1))
    relay = await running.start(store, cloud.url,
                                policy=SinkPolicy(pause_recheck_s=3600, backoff_base_s=0.01))
    await until(lambda: relay.state is SinkState.PAUSED, 5)
    cloud.auth_failing = False
    await relay.recheck()
    await drained(store, timeout_s=5)


async def test_422_dead_letters_that_event_and_the_stream_keeps_flowing(
        store: Outbox, cloud, running):
    cloud.faults.append(Fault.status(422))
    for seq in range(3):
        await store.append(sale("T01", seq))
    await running.start(store, cloud.url)
    await drained(store)
    [dead] = await store.list_deliveries(state=DeliveryState.DEAD)
    assert dead.event_id == 1 and dead.last_error is not None and "422" in dead.last_error
    assert [int(e.event_id) for e in cloud.effects] == [2, 3]


async def test_one_sink_down_never_delays_another(store: Outbox, running):
    async with StandinCloud() as up, StandinCloud() as down:
        await down.close_port()
        for seq in range(20):
            await store.append(sale(f"T0{seq % 4}", seq, sinks=("up", "down")))
        await running.start(store, up.url, name="up")
        await running.start(store, down.url, name="down")
        await drained(store, "up")
        assert len(up.effects) == 20
        assert (await store.stats()).sinks["down"].pending == 20


async def test_events_for_several_streams_are_delivered_in_order_per_stream(
        store: Outbox, cloud, running):
    cloud.latency_s = 0.005
    for seq in range(15):
        for terminal in ("T01", "T02", "T03", "T04"):
            await store.append(sale(terminal, seq))
    await running.start(store, cloud.url, policy=SinkPolicy(concurrency=8))
    await drained(store)
    order = cloud.order_by_stream()
    assert set(order) == {"T01", "T02", "T03", "T04"}
    for terminal, ids in order.items():
        numbers = [int(i) for i in ids]
        assert numbers == sorted(numbers) and len(numbers) == 15, terminal
    assert len(cloud.effects) == 60


async def test_rate_limit_spaces_requests(store: Outbox, cloud, running):
    for seq in range(11):
        await store.append(sale(f"T{seq:02d}", 1))
    await running.start(store, cloud.url,
                        policy=SinkPolicy(concurrency=8, rate_limit_per_s=20))
    await drained(store)
    times = sorted(e.arrived_at for e in cloud.effects)
    assert times[-1] - times[0] >= 10 / 20 * 0.9


async def test_an_idle_relay_does_not_poll_and_wakes_when_events_arrive(
        store: Outbox, cloud, running):
    await running.start(store, cloud.url)
    await asyncio.sleep(0.3)
    commits = store.commits
    await asyncio.sleep(1.0)
    assert store.commits == commits, "an idle relay touched the store"
    started = time.monotonic()
    await store.append(sale("T01", 1))
    await cloud.wait_for_effects(1, timeout_s=2)
    assert time.monotonic() - started < 0.5


async def test_an_expired_event_is_dead_lettered_and_never_sent(store: Outbox, cloud,
                                                                running):
    event = sale("T01", 1)
    expired = NewEvent(**{**{f: getattr(event, f) for f in event.__slots__},
                          "expires_at": time.time() - 1})
    await store.append(expired)
    await running.start(store, cloud.url)
    await drained(store)
    [dead] = await store.list_deliveries(state=DeliveryState.DEAD)
    assert "expired" in (dead.last_error or "")
    assert cloud.requests == []


async def test_graceful_stop_finishes_short_attempts_and_returns_long_ones(
        open_store: OpenStore, cloud):
    """The long one was on the wire when the grace ran out: it comes back in doubt."""
    store = await open_store(clock=time.time)
    cloud.faults.extend([Fault.slow(0.3), Fault.slow(5)])
    await store.append(sale("T01", 1))
    await store.append(sale("T02", 1))
    relay = Relay(store, WebhookSink("cloud", WebhookSettings(url=cloud.url, timeout_s=10),
                                     FAST))
    await relay.start()
    await until(lambda: relay.status().in_flight == 2, 3)
    await relay.stop(grace_s=1.0)
    states = {d.event_id: d.state for d in await store.list_deliveries()}
    assert states == {1: DeliveryState.DELIVERED, 2: DeliveryState.IN_DOUBT}


async def test_state_transitions_are_logged_once_and_recovery_once(
        store: Outbox, cloud, running, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="outbox.relay")
    cloud.down_status = 503
    await store.append(sale("T01", 1))
    relay = await running.start(store, cloud.url)
    await until(lambda: relay.status().consecutive_failures >= 5, 5)
    cloud.down_status = None
    await drained(store)
    lines = [r.getMessage() for r in caplog.records if r.name == "outbox.relay"]
    assert len([m for m in lines if "online → backing_off" in m]) == 1
    [recovered] = [m for m in lines if "recovered after" in m]
    assert "failed attempts" in recovered


async def test_a_sink_that_raises_does_not_strand_its_delivery(
        store: Outbox, cloud, running, monkeypatch: pytest.MonkeyPatch):
    """A bug in a sink must not leave the delivery in flight, blocking its terminal."""
    await store.append(sale("T01", 1))
    await store.append(sale("T01", 2))
    real = WebhookSink.deliver
    calls = 0

    async def flaky(self, delivery):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("sink bug")
        return await real(self, delivery)

    monkeypatch.setattr(WebhookSink, "deliver", flaky)
    await running.start(store, cloud.url)
    await drained(store)
    assert calls == 3, "the first attempt raised, then both events went out"
    assert [int(e.event_id) for e in cloud.effects] == [1, 2]


async def test_a_host_that_never_accepts_is_unreachable_not_in_doubt_with_a_short_timeout():
    """GIVEN a sink whose host never completes the TCP handshake (its accept queue is full)
    and a 1 s request timeout WHEN a delivery is attempted THEN the outcome is "connect"
    with nothing sent (the sink goes offline), not a timeout that may have been applied.

    Before the fix the connect and total timeouts were equal and the total one won."""
    with never_accepting_port() as port:
        sink = WebhookSink("cloud", WebhookSettings(url=f"http://127.0.0.1:{port}/events",
                                                    timeout_s=1.0), FAST)
        await sink.start()
        try:
            delivery = Delivery(event_id=1, sink="cloud", stream="T01", kind="transaction",
                                idempotency_key="key-1", payload=b"{}", attempts=0,
                                in_doubt=False, created_at=time.time(), expires_at=None)
            outcome = classify(await sink.deliver(delivery))
        finally:
            await sink.close()
    assert outcome.unreachable and not outcome.in_doubt, outcome


async def test_an_answer_body_echoing_customer_data_never_reaches_the_log(
        store: Outbox, running, caplog: pytest.LogCaptureFixture):
    """GIVEN a sink whose error answers quote the event (a 503, then a 422 naming the
    customer's email) WHEN the relay backs off and then dead-letters the event
    THEN no log line and not the sink's status carry the body, only "HTTP <status>"; the
    full answer stays with the delivery, for the admin API (CONTRACT §8: error bodies are
    never on disk in plaintext, and journald writes stderr to disk)."""
    from aiohttp import web

    canary = "zebra.canary-logleak@example.com"
    answers = [503, 422]

    async def handler(request: web.Request) -> web.Response:
        status = answers.pop(0) if answers else 200
        return web.json_response({"error": f"invalid customer email {canary}"}, status=status)

    async with serving(handler) as base:
        caplog.set_level(logging.DEBUG)
        await store.append(sale("T01", 1))
        relay = await running.start(store, f"{base}/events")
        await drained(store)
        [dead] = await store.list_deliveries(state=DeliveryState.DEAD)
        assert dead.last_error is not None and canary in dead.last_error
        assert relay.status().last_error == "HTTP 422"
        logged = [r.getMessage() for r in caplog.records]
        assert any("HTTP 503" in m for m in logged) and any("HTTP 422" in m for m in logged)
        assert not [m for m in logged if canary in m]


async def test_a_backing_off_sink_reports_when_it_will_try_again(store: Outbox, running):
    """GIVEN a sink answering 500 (each failed delivery waits its own backoff, the sink is
    not held) WHEN its status is read THEN ``next_attempt_at`` is that retry's time, in the
    future; it was None for every backed-off sink that was not held by a Retry-After."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async with serving(handler) as base:
        await store.append(sale("T01", 1))
        # Full jitter: the first retry waits uniform(0, 30 s), so it is still ahead.
        slow = SinkPolicy(backoff_base_s=30.0, backoff_cap_s=60.0)
        relay = await running.start(store, f"{base}/events", policy=slow)
        await until(lambda: relay.status().consecutive_failures >= 1, 5)
        await until(lambda: relay.status().next_attempt_at is not None, 2)
        status = relay.status()
        assert status.state is SinkState.BACKING_OFF
        assert status.next_attempt_at is not None
        assert time.time() < status.next_attempt_at <= time.time() + 30.0
        [owed] = await store.list_deliveries(state=DeliveryState.PENDING)
        assert owed.next_attempt_at == pytest.approx(status.next_attempt_at)
