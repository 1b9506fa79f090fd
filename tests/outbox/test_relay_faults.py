"""Property test: under any sequence of server faults, every event has exactly one effect.

Each Hypothesis example builds a fresh outbox file and a fresh stand-in cloud on a real
127.0.0.1 socket, queues a random sequence of faults on the server (each consumed by one
request, whichever event it carries), appends a few events per terminal, runs a real
``Relay`` with a ``WebhookSink`` until the store is drained, and then holds the server's
effect log to the relay's promises:

- nothing lost and nothing doubled: one effect per event, by business identity and by
  idempotency key;
- every resend carried the original bytes (no ``body_mismatches``);
- per terminal, first effects arrive in append order.

Retry-After *violations* are not asserted here: requests already on the wire when a 429
came back cannot be recalled (see ``test_retry_after_stops_new_requests_from_concurrent_
streams`` in ``test_relay.py`` for that promise).

Knobs: ``TILLSYNC_RELAY_EXAMPLES`` (default 15) examples per run.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.standin.cloud import Fault, StandinCloud
from outbox import DeliveryState, Outbox
from outbox.relay import Relay
from outbox.sinks import SinkPolicy, WebhookSettings, WebhookSink
from tests.outbox.test_relay import sale

EXAMPLES = int(os.environ.get("TILLSYNC_RELAY_EXAMPLES", "15"))
TIMEOUT_S = 0.2
POLICY = SinkPolicy(concurrency=8, backoff_base_s=0.005, backoff_cap_s=0.05)
EVENTS_PER_STREAM = 5
DRAIN_TIMEOUT_S = 30.0

# ``Fault.slow(0)`` is "no fault": it takes its turn in the queue and the request is then
# served normally (no delay, commit, 201).
NO_FAULT = Fault.slow(0.0)
FAULTS = st.one_of(
    st.sampled_from([
        NO_FAULT,
        Fault.status(500),
        Fault.status(502),
        Fault.status(503),
        Fault.status(408),
        Fault.status(429, retry_after="0"),
        Fault.status(429, retry_after="1"),
        Fault.commit_then_drop(),
        Fault.drop_before_commit(),
        Fault.commit_then_status(500),
    ]),
    # Slightly longer than the client's timeout: the client gives up, the server commits
    # a moment later anyway (the delivery is in doubt, and retries meet 409 meanwhile).
    st.floats(min_value=TIMEOUT_S + 0.01, max_value=TIMEOUT_S + 0.1).map(Fault.slow),
)


async def drained(store: Outbox, relay: Relay) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        stats = (await store.stats()).sinks.get("cloud")
        if stats is not None and stats.pending == 0 and stats.in_doubt == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained in {DRAIN_TIMEOUT_S} s: {stats}, {relay.status()}")
        await asyncio.sleep(0.01)


async def scenario(faults: list[Fault], streams: int, late: list[int], seed: int) -> None:
    terminals = [f"T{n:02d}" for n in range(1, streams + 1)]
    appended: dict[str, list[int]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="tillsync-faults-") as tmp:
        store = await Outbox.open(Path(tmp) / "outbox.db", Path(tmp) / "outbox.key",
                                  create_key=True)
        try:
            async with StandinCloud() as cloud:
                cloud.faults.extend(faults)

                async def add(terminal: str, seq: int) -> None:
                    appended[terminal].append((await store.append(sale(terminal, seq))).event_id)

                for seq in range(EVENTS_PER_STREAM):
                    for terminal in terminals:
                        await add(terminal, seq)
                sink = WebhookSink("cloud", WebhookSettings(url=cloud.url, timeout_s=TIMEOUT_S),
                                   POLICY)
                relay = Relay(store, sink, rng=random.Random(seed))
                await relay.start()
                try:
                    for i, index in enumerate(late):  # while the relay is busy
                        await add(terminals[index % streams], EVENTS_PER_STREAM + i)
                    await drained(store, relay)
                finally:
                    await relay.stop(grace_s=1)
                deliveries = await store.list_deliveries(limit=10_000)
            check_effects(cloud, appended, faults)
            assert {d.state for d in deliveries} == {DeliveryState.DELIVERED}, [
                (d.event_id, d.state, d.last_error) for d in deliveries
                if d.state is not DeliveryState.DELIVERED]
        finally:
            await store.close()


def check_effects(cloud: StandinCloud, appended: dict[str, list[int]],
                  faults: list[Fault]) -> None:
    every_id = sorted(i for ids in appended.values() for i in ids)
    effect_ids = sorted(int(e.event_id or -1) for e in cloud.effects)
    # Every success consumes a fault while any is queued and there are more events than
    # faults, so a fault left over means the scenario did not test what it drew.
    assert not cloud.faults, f"faults never served: {list(cloud.faults)}"
    assert effect_ids == every_id, "lost or doubled effects"
    assert cloud.duplicates() == {}
    assert set(cloud.effects_by_key.values()) == {1}
    assert cloud.body_mismatches == []
    order = {terminal: [int(i) for i in ids] for terminal, ids in cloud.order_by_stream().items()}
    assert order == dict(appended), f"first effects out of append order under {faults}"


@pytest.mark.timeout(max(300, 5 * EXAMPLES))  # one example takes 0.2-2 s
@settings(max_examples=EXAMPLES, deadline=None)
@given(faults=st.lists(FAULTS, max_size=12), streams=st.integers(4, 6),
       late=st.lists(st.integers(0, 5), max_size=4), seed=st.integers(0, 2**32 - 1))
def test_every_event_takes_effect_once_in_stream_order_whatever_the_server_faults(
        faults: list[Fault], streams: int, late: list[int], seed: int) -> None:
    """GIVEN 4-6 terminals with ~5 sales each (a few more appended while the relay runs)
    and a random sequence of server faults (5xx, 408, 429 with Retry-After, resets before
    and after commit, a 500 after commit, answers slower than the client's timeout)
    WHEN a relay with 8 concurrent requests drains the outbox
    THEN the server holds exactly one effect per event, every resend had the original
    bytes, and each terminal's first effects are in append order."""
    asyncio.run(scenario(faults, streams, late, seed))
