"""``tillsync run`` as a real subprocess: the outage story, SIGTERM under load, systemd notify."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from agent.config import load_config
from agent.readiness import wait_until_ready
from agent.standin.cloud import StandinCloud
from outbox import Outbox
from tests.agent.conftest import STATUS_TOKEN, TOKENS, sale, write_config

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def tillsync_run(config: Path, env: dict[str, str] | None = None,
                       ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Start ``python -m agent run --config``; yield (process, base URL) once ready.

    The agent's log goes to ``agent.log`` beside the config, appended run after run: a pipe
    nobody reads would stop the agent once 64 KiB of log filled it.
    """
    port = load_config(config).api.port
    with open(config.parent / "agent.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(config), cwd=REPO,
            env={**os.environ, **(env or {})}, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(base, failed=lambda: None if proc.returncode is None
                               else f"agent exited with {proc.returncode}")
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def status_of(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/v1/status",
                        headers={"Authorization": f"Bearer {STATUS_TOKEN}"}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def post_sale(http: aiohttp.ClientSession, base: str, body: dict[str, Any]
                    ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKENS[body['terminal_id']]}"}
    async with http.post(f"{base}/v1/transactions", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_sales_posted_while_the_cloud_is_down_arrive_once_when_it_returns(
        tmp_path: Path):
    """GIVEN the agent running and the cloud unreachable WHEN tills post sales THEN status
    shows them pending, the sink offline and the oldest age growing; WHEN the cloud returns
    THEN every sale arrives exactly once and status is ok again."""
    async with StandinCloud() as cloud:
        await cloud.close_port()
        config = write_config(tmp_path, sink_url=cloud.url)
        async with tillsync_run(config) as (proc, base), aiohttp.ClientSession() as http:
            bodies = [sale("T01", n) for n in range(1, 6)] + [sale("T02", n) for n in (1, 2)]
            for body in bodies:
                assert (await post_sale(http, base, body))[0] == 202
            first = await status_of(http, base)
            for _ in range(100):
                if first["sinks"][0]["state"] == "offline":
                    break
                await asyncio.sleep(0.05)
                first = await status_of(http, base)
            assert first["outbox"]["pending"] == 7 and first["sinks"][0]["state"] == "offline"
            assert first["status"] == "degraded"
            await asyncio.sleep(1.1)
            later = await status_of(http, base)
            assert later["outbox"]["oldest_pending_age_s"] > first["outbox"][
                "oldest_pending_age_s"]
            await cloud.open_port()
            await cloud.wait_for_effects(7, timeout_s=15)
            for _ in range(100):
                final = await status_of(http, base)
                if final["status"] == "ok" and final["outbox"]["pending"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert final["status"] == "ok", final
            assert cloud.duplicates() == {}
            seen = sorted(json.loads(e.body)["data"]["transaction_id"] for e in cloud.effects)
            assert seen == sorted(b["transaction_id"] for b in bodies)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_sigterm_under_load_loses_no_acknowledged_sale(tmp_path: Path):
    """GIVEN tills posting as fast as they can WHEN SIGTERM arrives THEN the agent exits 0
    and every sale answered 202 is in the outbox, byte for byte as posted."""
    config_path = write_config(tmp_path)
    acked: dict[str, dict[str, Any]] = {}
    async with tillsync_run(config_path) as (proc, base), aiohttp.ClientSession() as http:

        async def till(terminal: str) -> None:
            for n in range(1, 10_000):
                body = sale(terminal, n)
                try:
                    code, answer = await post_sale(http, base, body)
                except aiohttp.ClientError:
                    return  # the agent stopped accepting connections
                if code == 202:
                    acked[answer["event_id"]] = body
                elif code >= 500:
                    return

        tills = [asyncio.create_task(till(t)) for t in TOKENS]
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await asyncio.gather(*tills)
    assert len(acked) > 20
    config = load_config(config_path)
    store = await Outbox.open(config.outbox.path, config.outbox.key_file)
    try:
        for event_id, body in acked.items():
            record = await store.read(int(event_id))
            assert record is not None and record.payload is not None
            assert json.loads(record.payload)["data"] == body
        assert await store.verified() == []
    finally:
        await store.close()
    with sqlite3.connect(config.outbox.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_systemd_hears_ready_and_stopping(tmp_path: Path):
    """A fake NOTIFY_SOCKET (a real AF_UNIX datagram socket) receives READY=1, then
    STOPPING=1 after SIGTERM; no systemd needed."""
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.setblocking(False)
    messages: list[str] = []
    try:
        async with tillsync_run(write_config(tmp_path),
                                env={"NOTIFY_SOCKET": str(sock_path)}) as (proc, _):
            deadline = time.monotonic() + 10
            while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
                messages += _drain(listener)
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            messages += _drain(listener)
    finally:
        listener.close()
    ready = [m for m in messages if "READY=1" in m]
    stopping = [m for m in messages if "STOPPING=1" in m]
    assert ready and "STATUS=listening on 127.0.0.1:" in ready[0]
    assert stopping and messages.index(stopping[0]) > messages.index(ready[0])


def _drain(listener: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(listener.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_a_second_agent_on_the_same_outbox_is_refused(tmp_path: Path):
    config = write_config(tmp_path)
    async with tillsync_run(config):
        other = tmp_path / "other.toml"
        text = config.read_text().replace(f"127.0.0.1:{load_config(config).api.port}",
                                          "127.0.0.1:1")
        other.write_text(text)
        other.chmod(0o600)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(other), cwd=REPO,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        lines = err.decode().strip().splitlines()
        assert "another tillsync agent is already using this database" in lines[-1]
        assert "Traceback" not in err.decode()
