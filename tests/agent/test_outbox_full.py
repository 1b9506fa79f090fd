"""A full outbox is reported as full while it is, and no longer once deliveries make room.

CONTRACT §7: status is "failing" when the outbox cannot accept events; §4: /readyz is 200
when the outbox is open and writable. A load balancer or a till that gates on /readyz must
not be kept away once there is room again.
"""

from __future__ import annotations

import time

from agent.standin.cloud import StandinCloud
from tests.agent.conftest import StartAgent, sale
from tests.polling import until


async def test_status_and_readyz_recover_as_soon_as_deliveries_make_room(
        start_agent: StartAgent, cloud: StandinCloud) -> None:
    """GIVEN an agent with capacity_bytes = 3000 whose cloud answers 503, filled until a
    sale is refused with 507 (status "failing", /readyz 503)
    WHEN the cloud comes back and takes everything
    THEN /readyz answers 200 and status leaves "failing" within a couple of seconds of the
    drain, with no new sale posted, and the next sale is accepted.

    Before, "full" stayed in status for 60 s after the last refusal unless an append
    succeeded, so /readyz kept answering 503 while there was room."""
    cloud.down_status = 503
    agent = await start_agent(outbox_extra="capacity_bytes = 3000", sink_url=cloud.url)
    for seq in range(1, 40):
        code, body = await agent.post("/v1/transactions", sale(seq=seq))
        if code == 507:
            break
        assert code == 202, body
    else:
        raise AssertionError("the outbox never filled")
    assert (await agent.status())["status"] == "failing"
    code, ready = await agent.get("/readyz", who=None)
    assert code == 503 and "full" in ready["reasons"][0]

    cloud.down_status = None

    async def drained() -> bool:
        return bool((await agent.status())["outbox"]["pending"] == 0)

    await until(drained, 15.0, what="the backlog to drain")
    drained_at = time.monotonic()

    async def ready() -> bool:
        return (await agent.get("/readyz", who=None))[0] == 200

    await until(ready, 3.0, what="/readyz to answer 200 once there was room")
    assert time.monotonic() - drained_at < 3.0
    assert (await agent.status())["status"] != "failing"
    code, body = await agent.post("/v1/transactions", sale(seq=100))
    assert code == 202, body
