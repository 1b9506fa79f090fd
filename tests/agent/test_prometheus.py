"""A real Prometheus server (Debian package ``prometheus``) scrapes the agent's /metrics."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp

from tests.agent.conftest import STATUS_TOKEN, StartAgent, free_port, sale

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


async def test_prometheus_scrapes_metrics_with_the_status_token(start_agent: StartAgent,
                                                               tmp_path: Path):
    """GIVEN the agent and Prometheus on loopback, the scrape job carrying the status token
    WHEN Prometheus scrapes THEN the target is up and tillsync series are stored."""
    agent = await start_agent()
    assert (await agent.post("/v1/transactions", sale()))[0] == 202
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: tillsync
    scrape_interval: 1s
    authorization:
      type: Bearer
      credentials: {STATUS_TOKEN}
    static_configs:
      - targets: ["127.0.0.1:{agent.config.api.port}"]
""")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    api = f"http://127.0.0.1:{web_port}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:
            health, series = None, []
            for _ in range(300):
                await asyncio.sleep(0.1)
                try:
                    async with http.get(f"{api}/targets") as resp:
                        targets = (await resp.json())["data"]["activeTargets"]
                    health = targets[0]["health"] if targets else None
                    async with http.get(f"{api}/query",
                                        params={"query": "tillsync_events_received_total"}
                                        ) as resp:
                        series = (await resp.json())["data"]["result"]
                except (aiohttp.ClientError, KeyError, IndexError):
                    continue
                if health == "up" and series:
                    break
            assert health == "up", targets
            [received] = series
            assert received["metric"]["kind"] == "transaction"
            assert received["value"][1] == "1"
    finally:
        proc.terminate()
        await proc.wait()
