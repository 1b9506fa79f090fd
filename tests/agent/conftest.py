"""Fixtures for agent tests: a config on disk, a real agent on 127.0.0.1, a stand-in cloud."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import AgentConfig, load_config
from agent.readiness import wait_until_ready
from agent.runtime import serve
from agent.standin.cloud import StandinCloud
from drivers.emulators.escpos_printer import EscposPrinterEmulator
from outbox.crypto import create_key_file

STATUS_TOKEN = "status-token-0123456789abcdef"
# Fast device supervision so tests take seconds: the defaults are 5 s polls, 2 s reconnect cap.
FAST_DEVICE = "poll_s = 0.2\nreconnect_max_s = 0.3\n"
TOKENS = {"T01": "till-one-token-0123456789", "T02": "till-two-token-0123456789"}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(root: Path, *, sink_url: str | None = None, extra: str = "",
                 outbox_extra: str = "", sink_extra: str = "") -> Path:
    """Write agent.toml (and a key) under ``root``; returns the config path."""
    key = root / "outbox.key"
    if not key.exists():
        create_key_file(key)
    terminals = "".join(f'[[api.terminals]]\nid = "{t}"\ntoken = "{tok}"\n\n'
                        for t, tok in TOKENS.items())
    sink = (f'[[sinks]]\nname = "cloud"\ntype = "webhook"\nurl = "{sink_url}"\n'
            f"backoff_base_s = 0.05\nbackoff_cap_s = 0.5\npause_recheck_s = 1\n{sink_extra}\n"
            if sink_url else "")
    text = (f'[store]\nid = "store-042"\n{extra}\n'
            f'[api]\nlisten = "127.0.0.1:{free_port()}"\nstatus_token = "{STATUS_TOKEN}"\n\n'
            f"{terminals}"
            f'[outbox]\npath = "{root / "outbox.db"}"\nkey_file = "{key}"\n{outbox_extra}\n'
            f"{sink}")
    path = root / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def sale(terminal: str = "T01", seq: int = 1, *, total: str = "3.98",
         **changes: Any) -> dict[str, Any]:
    """A valid sale (CONTRACT §5) of two pens at 1.99."""
    body: dict[str, Any] = {
        "transaction_id": f"{terminal}-20261122-{seq:06d}", "terminal_id": terminal,
        "type": "sale", "occurred_at": "2026-11-22T10:15:00+01:00", "currency": "EUR",
        "lines": [{"sku": "4006381333931", "description": "Ballpoint pen", "quantity": "2",
                   "unit_price": "1.99", "discount": "0.00", "tax_rate": "19"}],
        "tenders": [{"method": "cash", "amount": "5.00",
                     "change": str(Decimal("5.00") - Decimal(total))}],
        "total": total,
    }
    body.update(changes)
    return body


@dataclass
class RunningAgent:
    """An agent serving on 127.0.0.1 for one test."""

    config: AgentConfig
    config_path: Path
    http: aiohttp.ClientSession
    stop: asyncio.Event
    task: asyncio.Task[None]
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))

    @property
    def url(self) -> str:
        """Base URL of the API."""
        return f"http://127.0.0.1:{self.config.api.port}"

    def auth(self, who: str) -> dict[str, str]:
        """Authorization header for a terminal id or "status"."""
        token = STATUS_TOKEN if who == "status" else self.tokens[who]
        return {"Authorization": f"Bearer {token}"}

    async def post(self, path: str, body: Any, who: str = "T01",
                   **kwargs: Any) -> tuple[int, Any]:
        """POST JSON (or raw bytes) and return (status, parsed body)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {**self.auth(who), "Content-Type": "application/json",
                   **kwargs.pop("headers", {})}
        async with self.http.post(self.url + path, data=data, headers=headers,
                                  **kwargs) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str, who: str | None = "status", **kwargs: Any
                  ) -> tuple[int, Any]:
        """GET and return (status, parsed JSON or text)."""
        headers = {**(self.auth(who) if who else {}), **kwargs.pop("headers", {})}
        async with self.http.get(self.url + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def status(self) -> dict[str, Any]:
        """The agent's /v1/status document."""
        code, body = await self.get("/v1/status")
        assert code == 200, body
        return dict(body)


StartAgent = Callable[..., Awaitable[RunningAgent]]


def exited(task: asyncio.Task[None]) -> str | None:
    """Why an in-process agent task can no longer come up (it finished), or None."""
    if not task.done():
        return None
    task.result()  # raises why the agent could not start
    return "the agent stopped"


def printer_entry(emulator: EscposPrinterEmulator, name: str = "receipt", extra: str = "") -> str:
    """A ``[[devices]]`` escpos entry for an emulated printer, supervised fast."""
    return (f'[[devices]]\nname = "{name}"\ntype = "escpos"\n'
            f'url = "tcp://127.0.0.1:{emulator.port}"\n{FAST_DEVICE}'
            f"status_timeout_s = 0.5\nconnect_timeout_s = 1\n{extra}\n")


@pytest.fixture
async def printer() -> AsyncIterator[EscposPrinterEmulator]:
    emulator = EscposPrinterEmulator(idle_timeout_s=5.0)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
async def cloud() -> AsyncIterator[StandinCloud]:
    async with StandinCloud() as server:
        yield server


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[StartAgent]:
    """Start agents on configs in tmp_path; each is stopped at the end of the test."""
    started: list[RunningAgent] = []
    http = aiohttp.ClientSession()

    async def _start(drivers: Any = None, **config_args: Any) -> RunningAgent:
        # drivers: a device driver registry ({"escpos": EscposPrinterDriver}); None means the
        # installed `tillsync.drivers` entry points.
        path = write_config(tmp_path, **config_args)
        config = load_config(path)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop, drivers=drivers))
        agent = RunningAgent(config, path, http, stop, task)
        started.append(agent)
        await wait_until_ready(agent.url, timeout_s=10,
                               failed=lambda: exited(task))
        return agent

    yield _start
    for agent in started:
        agent.stop.set()
        await asyncio.gather(agent.task, return_exceptions=True)
    await http.close()
