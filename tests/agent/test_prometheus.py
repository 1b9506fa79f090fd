"""A real Prometheus server (Debian package ``prometheus``) scrapes the agent's /metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.conftest import STATUS_TOKEN, StartAgent, free_port, printer_entry, sale

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


ALERTS = Path(__file__).parents[2] / "docs" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def test_the_shipped_alert_rules_are_valid_and_fire_as_their_unit_tests_say():
    """promtool (Debian package ``prometheus``) checks the rules head office is told to
    load, then runs their unit tests: each alert fires at the minute its test says and not
    before, with the summary it promises."""
    for args in (["check", "rules", "tillsync-alerts.yml"],
                 ["test", "rules", "tillsync-alerts.test.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=ALERTS, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


async def test_every_series_the_alert_rules_use_is_one_the_agent_exposes(
        start_agent: StartAgent, cloud, printer):
    """GIVEN an agent with a sink and a printer, after one refused sale WHEN /metrics is read
    THEN every tillsync series an alert rule selects exists, with every label the rule's
    text names: a renamed metric or label would leave an alert that can never fire."""
    agent = await start_agent(sink_url=cloud.url, extra=printer_entry(printer))
    assert (await agent.post("/v1/transactions", {"total": "x"}))[0] == 422
    code, text = await agent.get("/metrics")
    assert code == 200
    labels_of: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)
    rules = (ALERTS / "tillsync-alerts.yml").read_text().split("- alert: ")[1:]
    assert len(rules) >= 6
    for rule in rules:
        name = rule.split()[0]
        for metric in set(re.findall(r"\btillsync_[a-z_]+", rule)):
            assert metric in labels_of, f"{name}: {metric} is not exposed"
            used = set(re.findall(r"\$labels\.(\w+)", rule))
            used |= {label.strip() for group in re.findall(r"by \(([^)]*)\)", rule)
                     for label in group.split(",")}
            missing = used - {"instance", "job"} - labels_of[metric]
            assert not missing, f"{name}: {metric} has no label {missing}"
