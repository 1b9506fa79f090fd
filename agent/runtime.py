"""The composition root: one ``Agent`` wires config, outbox, relays, scheduler and API.

Start order (each an aiohttp cleanup context, so stop runs in exactly the reverse order):

1. the outbox (a missing or wrong key, a damaged file: the agent does not start);
2. the device manager: one supervisor per enabled device (a device that is away, or a bad
   device entry, is shown in status and never stops the agent);
3. one relay per sink, and one per ESC/POS printer (its print jobs, agent.printing);
4. the scheduler: retention purge, daily database check, disk-space check, watchdog.

Then the listening socket opens and systemd hears ``READY=1``; on stop, ``STOPPING=1``.

The listening socket is guarded against hostile or broken clients by ``agent.guard``.

``run`` serves until SIGTERM or SIGINT, then stops accepting connections, lets requests in
progress finish (each answered only after its commit), gives deliveries in flight
``stop_grace_s`` to finish, and closes the store. Whatever did not finish is pending again
on the next start, under the same idempotency key.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent import printing
from agent.api import build_app, own_host_names
from agent.config import AgentConfig, EscposDeviceConfig, TerminalConfig
from agent.devices import build_manager, status_rows
from agent.guard import (
    IDLE_TIMEOUT_S,
    LINGER_S,
    ClientFaultLog,
    ConnectionGuard,
    connection_limit,
)
from agent.lockfile import exclusive
from agent.metrics import Metrics
from agent.sdnotify import Notifier
from agent.status import DeviceStatus, build_status
from drivers.base import Driver
from drivers.manager import DeviceManager
from outbox import Appended, CapacityFull, Outbox, OutboxError, OutboxFull
from outbox.relay import Relay
from outbox.sinks import WebhookSink
from outbox.version import package_version

log = logging.getLogger("agent")

PURGE_INTERVAL_S = 3600
DISK_CHECK_INTERVAL_S = 60
DB_CHECK_HOUR = 3  # local time: the daily check reads the whole file while the shop is shut
FULL_REPORT_S = 60.0  # "outbox full" stays in status this long after the last refusal
SHUTDOWN_BUDGET_S = 20.0  # requests in progress; systemd's TimeoutStopSec is 30 s
class Agent:
    """Everything one running agent owns."""

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None,
                 stop_grace_s: float = 8.0,
                 drivers: Mapping[str, type[Driver]] | None = None) -> None:
        self.config = config
        self.metrics = Metrics(package_version())
        self.notifier = notifier or Notifier()
        self.stop_grace_s = stop_grace_s
        self.store: Outbox = None  # type: ignore[assignment]  # set by the first context
        self.relays: dict[str, Relay] = {}
        # Built now so status can show every device (``drivers``: tests pass a registry; by
        # default the ``tillsync.drivers`` entry points); supervised from _devices_ctx on.
        self.devices: DeviceManager = build_manager(config.devices, drivers)
        # Receipt printers by name: each gets a print-job relay ("printer:<name>").
        self.printers = {d.name: printing.Printer(d.name, d.receipt_width_mm, d.enabled)
                         for d in config.devices if isinstance(d, EscposDeviceConfig)}
        self.transactions = printing.TransactionIndex()
        self.started_at = time.time()
        self.status_token = config.api.status_token.get_secret_value()
        self.allowed_hosts = own_host_names(config.api.host, list(config.api.allowed_hosts))
        self.disk_free_bytes: int | None = None
        self.db_problems: list[str] = []
        self._full_at: float | None = None
        self._full_reason = ""
        self._scheduler: AsyncIOScheduler | None = None
        self.connections = ConnectionGuard(connection_limit())

    # -- the application ---------------------------------------------------------------

    def app(self) -> web.Application:
        """Build the aiohttp application with this agent's lifecycle attached."""
        app = build_app(self)
        app.middlewares.insert(0, self.connections.middleware)
        app.cleanup_ctx.extend([self._outbox_ctx, self._devices_ctx, self._relays_ctx,
                                self._scheduler_ctx])
        return app

    async def _outbox_ctx(self, app: web.Application) -> AsyncIterator[None]:
        cfg = self.config.outbox
        with exclusive(cfg.path):
            self.store = await Outbox.open(cfg.path, cfg.key_file, durability=cfg.durability,
                                           capacity_bytes=cfg.capacity_bytes,
                                           disk_reserve_bytes=cfg.disk_reserve_bytes,
                                           tracks_sends=printing.tracks_sends)
            log.info("outbox %s open (durability %s)", cfg.path, cfg.durability)
            try:
                yield
            finally:
                await self.store.close()
                log.info("outbox closed")

    async def _devices_ctx(self, app: web.Application) -> AsyncIterator[None]:
        await self.devices.start()
        try:
            yield
        finally:
            await self.devices.stop()

    async def _relays_ctx(self, app: web.Application) -> AsyncIterator[None]:
        try:
            for sink_cfg in self.config.sinks:
                sink = WebhookSink(sink_cfg.name, sink_cfg.settings(), sink_cfg.policy())
                relay = Relay(self.store, sink, on_attempt=self.metrics.attempt)
                await relay.start()
                self.relays[sink_cfg.name] = relay
            for printer in self.printers.values():
                if printer.enabled:
                    printer_sink = printing.PrinterSink(printer.name, self.devices,
                                                        self.store.mark_sent)
                    relay = Relay(self.store, printer_sink, on_attempt=self.metrics.attempt)
                    await relay.start()
                    self.relays[relay.name] = relay
        except BaseException:
            # A sink that cannot start (SinkSetupError) stops the agent: the relays already
            # started give their claims back before the outbox closes.
            await self._stop_relays()
            raise
        stop_resuming = printing.resume_on_recovery(self.devices, self.relays)
        yield
        stop_resuming()
        await self._stop_relays()

    async def _stop_relays(self) -> None:
        await asyncio.gather(*(r.stop(grace_s=self.stop_grace_s) for r in self.relays.values()))

    async def _scheduler_ctx(self, app: web.Application) -> AsyncIterator[None]:
        scheduler = AsyncIOScheduler()
        scheduler.add_job(self.purge, "interval", seconds=PURGE_INTERVAL_S,
                          id="purge", coalesce=True, max_instances=1)
        scheduler.add_job(self.check_database, "cron", hour=DB_CHECK_HOUR, id="db-check",
                          coalesce=True, max_instances=1)
        scheduler.add_job(self.check_disk, "interval", seconds=DISK_CHECK_INTERVAL_S,
                          id="disk-check", coalesce=True, max_instances=1)
        interval = self.notifier.watchdog_interval_s()
        if interval:
            scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog")
        self.check_disk()
        scheduler.start()
        self._scheduler = scheduler
        yield
        scheduler.shutdown(wait=False)

    # -- jobs --------------------------------------------------------------------------

    async def purge(self) -> None:
        """Release payloads delivered longer ago than the retention."""
        cfg, now = self.config.outbox, time.time()
        try:
            result = await self.store.purge(
                delivered_before=now - cfg.retention_days * 86400,
                forget_before=now - cfg.forget_after_days * 86400)
        except OutboxError as err:
            log.error("purge failed: %s", err)
            return
        if result.payloads_released or result.events_forgotten:
            log.info("purge: released %d delivered payloads, forgot %d old events",
                     result.payloads_released, result.events_forgotten)

    async def check_database(self) -> None:
        """Run quick_check; problems are reported in status until the next clean check."""
        try:
            self.db_problems = await self.store.check()
        except OutboxError as err:
            self.db_problems = [str(err)]
        if self.db_problems:
            log.error("database check found problems: %s", self.db_problems[0])

    def check_disk(self) -> None:
        """Measure free space where the outbox lives."""
        try:
            self.disk_free_bytes = shutil.disk_usage(self.config.outbox.path.parent).free
        except OSError as err:
            log.warning("cannot measure free disk space: %s", err)
            self.disk_free_bytes = None

    async def _watchdog(self) -> None:
        # Only a live event loop and a writable store earn the ping; a hung agent is
        # restarted by systemd.
        if self.store.healthy:
            self.notifier.watchdog()

    # -- what the API asks -------------------------------------------------------------

    def terminal_for(self, token: str) -> TerminalConfig | None:
        """Find the terminal whose token this is (every candidate compared, constant time)."""
        found = None
        for terminal in self.config.api.terminals:
            if terminal.matches(token) and found is None:
                found = terminal
        return found

    async def queue_print(self, terminal_id: str, body: bytes) -> tuple[str, Appended]:
        """Check a POST /v1/print body and queue its job; PrintRequestError when refused."""
        request = printing.parse_print_request(body)
        printer = printing.check_printer(self.devices, self.printers, request.printer)
        transaction = None
        if request.transaction_id is not None:
            transaction = await self.transactions.find(self.store, terminal_id,
                                                       request.transaction_id)
        store = self.config.store
        job_id, event = printing.print_event(
            request, store_id=store.id, terminal_id=terminal_id, printer=printer,
            store_name=store.name or store.id, transaction=transaction, now=time.time())
        return job_id, await printing.append_job(self.store, event, job_id)

    def note_full(self, err: OutboxFull) -> None:
        """Remember an append refused for lack of disk or database room.

        A refusal for ``capacity_bytes`` is the store's to track: it knows the moment an
        event fits again (``Outbox.capacity_refusal``), while a full disk or page limit is
        reported for ``FULL_REPORT_S`` after the last refusal or until an append succeeds.
        """
        if not isinstance(err, CapacityFull):
            self._full_at, self._full_reason = time.monotonic(), str(err)

    def note_accepted(self) -> None:
        """Forget "full": an append went through."""
        self._full_at = None

    async def accept_error(self) -> str | None:
        """Why the outbox cannot take events right now, or None."""
        if self.store is None or self.store.closed:
            return "the outbox is closed"
        if self.store.integrity == "corrupt":
            return "the outbox database failed its integrity check"
        if not self.store.healthy:
            return "the outbox cannot write (I/O error); reopening"
        refusal = self.store.disk_refusal()
        if refusal is not None:
            return f"the outbox is full: {refusal}"
        refusal = await self.store.capacity_refusal()
        if refusal is not None:
            return f"the outbox is full: {refusal}"
        if self._full_at is not None and time.monotonic() - self._full_at < FULL_REPORT_S:
            return f"the outbox is full: {self._full_reason}"
        return None

    async def not_ready_reasons(self) -> list[str]:
        """Empty when the agent can take events."""
        error = await self.accept_error()
        return [error] if error else []

    async def status(self) -> dict[str, Any]:
        """Build the §7 status document."""
        stats = None
        try:
            stats = await self.store.stats()
        except OutboxError as err:
            log.debug("status: no outbox stats: %s", err)
        accept_error = await self.accept_error()
        if accept_error is None and self.db_problems:
            accept_error = f"database check: {self.db_problems[0]}"
        return build_status(
            version=package_version(), store_id=self.config.store.id,
            started_at=self.started_at, now=time.time(), outbox=stats,
            accepting=accept_error is None, accept_error=accept_error,
            sinks=[s.name for s in self.config.sinks],
            relays={name: relay.status() for name, relay in self.relays.items()},
            devices=self.device_statuses(), disk_free_bytes=self.disk_free_bytes,
            alert_after_s=self.config.store.alert_after_s)

    def device_statuses(self) -> list[DeviceStatus]:
        """Devices and their state, as the device manager last saw them."""
        return status_rows(self.devices)

    async def recheck_sinks(self) -> None:
        """Re-check every sink now (an operator asked for a retry)."""
        await asyncio.gather(*(relay.recheck() for relay in self.relays.values()))


async def serve(config: AgentConfig, *, notifier: Notifier | None = None,
                stop: asyncio.Event | None = None,
                drivers: Mapping[str, type[Driver]] | None = None) -> None:
    """Run the agent until ``stop`` is set or SIGTERM/SIGINT arrives."""
    agent = Agent(config, notifier=notifier, drivers=drivers)
    runner = web.AppRunner(agent.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_BUDGET_S,
                           keepalive_timeout=IDLE_TIMEOUT_S, lingering_time=LINGER_S)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            # Windows has no loop signal handlers; and a Windows service runs us on the
            # service manager's thread, where signals cannot be set (it stops us itself).
            if threading.current_thread() is threading.main_thread():
                signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    await runner.setup()
    assert runner.server is not None  # set by setup()
    agent.connections.attach(runner.server)
    client_faults = ClientFaultLog()
    logging.getLogger("aiohttp.server").addFilter(client_faults)
    try:
        site = web.TCPSite(runner, config.api.host, config.api.port)
        await site.start()
        log.info("tillsync %s for store %s listening on %s", package_version(),
                 config.store.id, config.api.listen)
        agent.notifier.ready(f"listening on {config.api.listen}")
        await stop.wait()
        agent.notifier.stopping("stopping: finishing requests and deliveries")
        log.info("stopping: no new connections; finishing requests and deliveries")
    finally:
        await runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(client_faults)
    log.info("stopped")
