"""The agent's scheduled jobs and watchdog, on a real agent and stand-in cloud."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from agent.config import load_config
from agent.runtime import Agent
from agent.sdnotify import Notifier
from agent.standin.cloud import StandinCloud
from tests.agent.conftest import TOKENS, sale, write_config


@pytest.fixture
async def running(tmp_path: Path, cloud: StandinCloud) -> AsyncIterator[tuple[Agent, str]]:
    # retention_days of ~0.2 s, so a delivered sale is purgeable almost at once
    config = load_config(write_config(tmp_path, sink_url=cloud.url,
                                      outbox_extra="retention_days = 0.0000025\n"
                                                   "forget_after_days = 0.0000025"))
    agent = Agent(config)
    runner = web.AppRunner(agent.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", config.api.port)
    await site.start()
    try:
        yield agent, f"http://127.0.0.1:{config.api.port}"
    finally:
        await runner.cleanup()


async def test_purge_releases_delivered_payloads_after_the_retention(
        running: tuple[Agent, str], cloud: StandinCloud):
    agent, base = running
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/transactions", json=sale(),
                             headers={"Authorization": f"Bearer {TOKENS['T01']}"}) as resp:
            event_id = int((await resp.json())["event_id"])
        await cloud.wait_for_effects(1, timeout_s=10)
        for _ in range(100):
            record = await agent.store.read(event_id)
            if record and all(d.state == "delivered" for d in record.deliveries):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await agent.purge()
        assert await agent.store.read(event_id) is None  # payload released, header forgotten
        async with http.post(f"{base}/v1/transactions", json=sale(seq=2),
                             headers={"Authorization": f"Bearer {TOKENS['T01']}"}) as resp:
            assert resp.status == 202  # still accepting after the purge


async def test_disk_and_database_checks_feed_status(running: tuple[Agent, str]):
    agent, _ = running
    agent.check_disk()
    await agent.check_database()
    status = await agent.status()
    assert status["disk"]["free_bytes"] > 0
    assert agent.db_problems == [] and status["status"] == "ok"
    agent.db_problems = ["*** in database main ***\nPage 7: btreeInitPage() returns error"]
    status = await agent.status()
    assert status["status"] == "failing"
    assert any("database check" in reason for reason in status["reasons"])


async def test_the_watchdog_is_pinged_when_systemd_asks(tmp_path: Path):
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    agent = Agent(load_config(write_config(tmp_path)), notifier=notifier)
    runner = web.AppRunner(agent.app())
    await runner.setup()
    try:
        received: list[bytes] = []
        for _ in range(40):
            await asyncio.sleep(0.05)
            try:
                received.append(listener.recv(100))
            except BlockingIOError:
                pass
            if b"WATCHDOG=1" in received:
                break
        assert b"WATCHDOG=1" in received
    finally:
        await runner.cleanup()
        listener.close()
