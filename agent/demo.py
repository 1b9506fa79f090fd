"""``tillsync demo``: the whole product in one process, in a temporary directory.

Three tills ring up sales against a real agent (its HTTP API, encrypted outbox and relay)
and ask for each receipt on an emulated ESC/POS printer;
the agent forwards them to a stand-in cloud on 127.0.0.1 that drops off the network for a
while and comes back. The screen shows what a store manager would want to know; the run
ends with a summary and exits 0 only when the cloud saw every accepted sale exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.config import AgentConfig, parse_config
from agent.readiness import wait_until_ready
from agent.runtime import serve
from agent.standin.cloud import StandinCloud
from drivers.emulators.escpos_printer import EscposPrinterEmulator
from drivers.emulators.scanner import ScannerEmulator
from outbox.crypto import create_key_file

TILLS = ("T01", "T02", "T03")
OFFLINE_FROM, OFFLINE_UNTIL = 0.25, 0.55  # share of the run the cloud is unreachable
DRAIN_TIMEOUT_S = 25.0
CENT = Decimal("0.01")

# (sku, description, unit price, sold by weight)
CATALOG = (
    ("4006381333931", "Ballpoint pen", "1.99", False),
    ("5449000000996", "Cola 1.5 l", "1.79", False),
    ("4008400402222", "Chocolate 100 g", "1.29", False),
    ("4000417025005", "Coffee beans 500 g", "8.99", False),
    ("4311501650592", "Oat milk 1 l", "1.49", False),
    ("2000000000015", "Bananas (kg)", "1.99", True),
    ("2000000000022", "Tomatoes (kg)", "3.49", True),
    ("4006040012345", "Notebook A5", "2.49", False),
    ("4104420034561", "Sparkling water 6 x 1 l", "3.54", False),
    ("4388840212345", "Bread rolls x6", "2.10", False),
)


@dataclass
class Tally:
    """What happened, as the tills and the cloud saw it."""

    rung_up: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # "T01/T01-…" -> event id
    refused: list[str] = field(default_factory=list)
    queued_peak: int = 0
    queued_while_offline: int = 0
    receipts: set[str] = field(default_factory=set)  # transaction ids sent to the printer
    scans_sent: int = 0  # barcodes the store's scanner read (T01's baskets)
    scans_seen: int = 0  # scan events T01 received on /v1/events/stream
    timeline: list[str] = field(default_factory=list)


def run_demo(*, seconds: float = 30.0, console: Console | None = None) -> int:
    """Run the demo; 0 when nothing was lost or duplicated."""
    console = console or Console()
    logging.basicConfig(level=logging.ERROR)  # the screen tells the story, not the log
    with tempfile.TemporaryDirectory(prefix="tillsync-demo-") as tmp:
        return asyncio.run(_demo(Path(tmp), max(5.0, seconds), console))


async def _demo(root: Path, seconds: float, console: Console) -> int:
    tokens = {till: secrets.token_urlsafe(16) for till in TILLS}
    status_token = secrets.token_urlsafe(16)
    printer = EscposPrinterEmulator()
    await printer.start()
    scanner = ScannerEmulator(root / "ttyScanner0")  # a pty standing in for a USB scanner
    scanner.plug()
    async with StandinCloud() as cloud:
        config = _config(root, cloud.url, printer.port, scanner.url, tokens, status_token)
        stop = asyncio.Event()
        agent = asyncio.create_task(serve(config, stop=stop))
        base = f"http://127.0.0.1:{config.api.port}"
        tally = Tally()
        async with aiohttp.ClientSession() as http:
            await wait_until_ready(base, timeout_s=10, failed=lambda: _exited(agent))
            console.print(f"[bold]tillsync demo[/]: agent on {base}, stand-in cloud on"
                          f" {cloud.base_url}, data in {root}")
            started = time.monotonic()
            show = _Screen(http, base, status_token, cloud, printer, tally, started, seconds)
            with Live(show.table(None), console=console, refresh_per_second=4) as live:
                listener = asyncio.create_task(_watch_scans(http, base, tokens["T01"], tally))
                await asyncio.sleep(0.3)  # the stream is open before the first scan
                tills = [asyncio.create_task(_till(http, base, till, tokens[till], tally,
                                                   started, seconds,
                                                   scanner if till == "T01" else None))
                         for till in TILLS]
                outage = asyncio.create_task(_outage(cloud, tally, started, seconds))
                while not all(t.done() for t in tills):
                    live.update(show.table(await show.poll()))
                    await asyncio.sleep(0.25)
                await outage
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                while time.monotonic() < deadline:
                    status = await show.poll()
                    live.update(show.table(status))
                    if status and status["outbox"]["pending"] == 0 \
                            and len(cloud.effects) >= len(tally.accepted) \
                            and len(printer.jobs) >= len(tally.receipts) \
                            and tally.scans_seen >= tally.scans_sent:
                        break
                    await asyncio.sleep(0.25)
                tally.timeline.append(f"{time.monotonic() - started:5.1f} s  drained")
                listener.cancel()
        stop.set()
        await agent
    await printer.stop()
    scanner.close()
    return _summary(console, tally, cloud, printer)


def _config(root: Path, cloud_url: str, printer_port: int, scanner_url: str,
            tokens: dict[str, str], status_token: str) -> AgentConfig:
    key = root / "outbox.key"
    create_key_file(key)
    terminals = "".join(f'[[api.terminals]]\nid = "{t}"\ntoken = "{tok}"\n\n'
                        for t, tok in tokens.items())
    text = f"""
[store]
id = "demo-store"

[api]
listen = "127.0.0.1:{_free_port()}"
status_token = "{status_token}"

{terminals}
[outbox]
path = "{root / 'outbox.db'}"
key_file = "{key}"

[[sinks]]
name = "cloud"
type = "webhook"
url = "{cloud_url}"
backoff_cap_s = 2
concurrency = 4

[[devices]]
name = "receipt"
type = "escpos"
url = "tcp://127.0.0.1:{printer_port}"
receipt_width_mm = 80

[[devices]]
name = "scanner"
type = "scanner"
url = "{scanner_url}"
"""
    return parse_config(text, source="demo", base_dir=root)


def _exited(agent: asyncio.Task[None]) -> str | None:
    if not agent.done():
        return None
    agent.result()  # the agent failed to start: raise why
    return "the agent stopped"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sale(till: str, seq: int, rng: random.Random) -> dict[str, Any]:
    """Ring up a realistic sale: a few items, some weighed, cash with change or card."""
    lines, total = [], Decimal(0)
    for sku, name, price, weighed in rng.sample(CATALOG, rng.randint(1, 4)):
        quantity = (Decimal(rng.randint(150, 1800)) / 1000 if weighed
                    else Decimal(rng.randint(1, 3)))
        discount = CENT * rng.choice((0, 0, 0, 10, 50))
        line_total = quantity * Decimal(price) - discount
        if line_total <= 0:
            discount = Decimal(0)
            line_total = quantity * Decimal(price)
        total += line_total
        lines.append({"sku": sku, "description": name, "quantity": str(quantity),
                      "unit_price": price, "discount": f"{discount:.2f}", "tax_rate": "19"})
    total = total.quantize(CENT, rounding=ROUND_HALF_EVEN)
    if rng.random() < 0.5:
        paid = (total / 5).to_integral_value(rounding="ROUND_CEILING") * 5
        tenders = [{"method": "cash", "amount": f"{paid:.2f}", "change": f"{paid - total:.2f}"}]
    else:
        tenders = [{"method": "card", "amount": f"{total:.2f}", "change": "0.00"}]
    return {"transaction_id": f"{till}-{seq:06d}", "terminal_id": till, "type": "sale",
            "occurred_at": datetime.now(UTC).astimezone().isoformat(),
            "currency": "EUR", "lines": lines, "tenders": tenders, "total": f"{total:.2f}"}


async def _till(http: aiohttp.ClientSession, base: str, till: str, token: str, tally: Tally,
                started: float, seconds: float, scanner: ScannerEmulator | None) -> None:
    rng = random.Random(f"{till}-{started}")
    headers = {"Authorization": f"Bearer {token}"}
    seq = 0
    while time.monotonic() - started < seconds:
        seq += 1
        body = sale(till, seq, rng)
        tally.rung_up += 1
        if scanner is not None:  # this till's cashier scans each item on the store scanner
            for line in body["lines"]:
                scanner.scan(line["sku"])
                tally.scans_sent += 1
        for _ in range(3):  # a till resends after a network error, same ids
            try:
                async with http.post(f"{base}/v1/transactions", json=body,
                                     headers=headers) as resp:
                    answer = await resp.json()
                    if resp.status in (200, 202):
                        tally.accepted[f"{till}/{body['transaction_id']}"] = answer["event_id"]
                        await _print_receipt(http, base, headers, body["transaction_id"], tally)
                    else:
                        tally.refused.append(f"{body['transaction_id']}: {resp.status}"
                                             f" {answer['error']['code']}")
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        await asyncio.sleep(rng.uniform(0.15, 0.6))  # scanning the next basket


async def _print_receipt(http: aiohttp.ClientSession, base: str, headers: dict[str, str],
                         transaction_id: str, tally: Tally) -> None:
    # The till asks for the receipt of the sale it just posted; job_id makes a resend safe.
    job = {"printer": "receipt", "transaction_id": transaction_id, "job_id": transaction_id}
    async with http.post(f"{base}/v1/print", json=job, headers=headers) as resp:
        answer = await resp.json()
        if resp.status in (200, 202):
            tally.receipts.add(transaction_id)
        else:
            tally.refused.append(f"receipt {transaction_id}: {resp.status}"
                                 f" {answer['error']['code']}")


async def _watch_scans(http: aiohttp.ClientSession, base: str, token: str,
                       tally: Tally) -> None:
    """Count the scans T01 receives on the agent's server-sent event stream."""
    async with http.get(f"{base}/v1/events/stream",
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
        async for line in resp.content:
            if line.strip() == b"event: scan":
                tally.scans_seen += 1


async def _outage(cloud: StandinCloud, tally: Tally, started: float, seconds: float) -> None:
    await asyncio.sleep(seconds * OFFLINE_FROM)
    await cloud.close_port()
    tally.timeline.append(f"{time.monotonic() - started:5.1f} s  cloud unreachable"
                          " (connection refused)")
    await asyncio.sleep(seconds * (OFFLINE_UNTIL - OFFLINE_FROM))
    await cloud.open_port()
    tally.timeline.append(f"{time.monotonic() - started:5.1f} s  cloud back online")


class _Screen:
    """Polls the agent's status and draws the live table."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str,
                 cloud: StandinCloud, printer: EscposPrinterEmulator, tally: Tally,
                 started: float, seconds: float) -> None:
        self.http, self.base, self.token = http, base, token
        self.cloud, self.printer = cloud, printer
        self.tally, self.started, self.seconds = tally, started, seconds
        self.last_state = "online"

    async def poll(self) -> dict[str, Any] | None:
        try:
            async with self.http.get(f"{self.base}/v1/status",
                                     headers={"Authorization": f"Bearer {self.token}"}) as resp:
                status: dict[str, Any] = await resp.json()
        except aiohttp.ClientError:
            return None
        pending = status["outbox"]["pending"]
        self.tally.queued_peak = max(self.tally.queued_peak, pending)
        state = status["sinks"][0]["state"] if status["sinks"] else "online"
        if not self.cloud.listening:
            self.tally.queued_while_offline = max(self.tally.queued_while_offline, pending)
        if state != self.last_state:
            self.tally.timeline.append(f"{time.monotonic() - self.started:5.1f} s  agent"
                                       f" reports the cloud {state}")
            self.last_state = state
        return status

    def table(self, status: dict[str, Any] | None) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(title=f"tillsync demo · {elapsed:4.1f} s of {self.seconds:.0f} s",
                      show_header=False, min_width=56)
        table.add_column(style="bold")
        table.add_column(justify="right")
        sink = (status or {}).get("sinks", [{}])[0] if status and status["sinks"] else {}
        state = sink.get("state", "?")
        colour = {"online": "green", "offline": "red"}.get(state, "yellow")
        table.add_row("sales rung up", str(self.tally.rung_up))
        table.add_row("accepted (durable)", str(len(self.tally.accepted)))
        table.add_row("queued in the outbox", str(status["outbox"]["pending"]) if status else "?")
        table.add_row("delivered to the cloud", str(len(self.cloud.effects)))
        table.add_row("receipts printed", str(len(self.printer.jobs)))
        table.add_row("scans seen by till T01", f"{self.tally.scans_seen}")
        table.add_row("cloud", f"[{colour}]{state}[/]"
                      + ("" if self.cloud.listening else "  (unplugged)"))
        table.add_row("agent status", status["status"] if status else "?")
        return table


def _summary(console: Console, tally: Tally, cloud: StandinCloud,
             printer: EscposPrinterEmulator) -> int:
    seen: dict[str, int] = {}
    for effect in cloud.effects:
        identity = cloud.identity_of(effect)
        seen[identity] = seen.get(identity, 0) + 1
    lost = sorted(set(tally.accepted) - set(seen))
    duplicated = {k: n for k, n in seen.items() if n > 1}
    table = Table(title="summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("sales rung up", str(tally.rung_up))
    table.add_row("accepted by the agent", str(len(tally.accepted)))
    table.add_row("queued while the cloud was offline (peak)", str(tally.queued_while_offline))
    table.add_row("delivered to the cloud", str(len(seen)))
    table.add_row("duplicates seen by the cloud", str(len(duplicated)))
    table.add_row("lost", str(len(lost)))
    prints = {txid: sum(txid.encode() in job.data for job in printer.jobs)
              for txid in tally.receipts}
    misprinted = {txid: n for txid, n in prints.items() if n != 1}
    table.add_row("receipts printed (emulated ESC/POS printer)",
                  f"{len(printer.jobs)} of {len(tally.receipts)}")
    table.add_row("scans streamed to till T01 (emulated scanner)",
                  f"{tally.scans_seen} of {tally.scans_sent}")
    console.print(table)
    for line in tally.timeline:
        console.print(f"  {line}")
    ok = (not lost and not duplicated and not tally.refused and tally.accepted
          and not misprinted and len(printer.jobs) == len(tally.receipts)
          and tally.scans_seen == tally.scans_sent)
    if tally.refused:
        console.print(f"[red]refused by the agent:[/] {tally.refused[:3]}")
    if ok:
        console.print("[green bold]every sale arrived exactly once, and every receipt printed"
                      " once[/]")
        return 0
    console.print(f"[red bold]FAILED[/]: lost {lost[:5]}, duplicated {list(duplicated)[:5]},"
                  f" receipts not printed exactly once {list(misprinted)[:5]}")
    return 1
