"""Keep every configured device connected, and know at all times what state it is in.

One supervisor task per device runs this loop::

    open() ─ok─► status() every poll_s ──► CONNECTED / ERROR: wait poll_s, ask again
      │              │
      │              └─► DISCONNECTED: ask again after the reconnect delay
      └─ DeviceUnavailable (raised by open, status or an operation): close(), wait the
         reconnect delay, open() again

The reconnect delay starts at ``reconnect_min_s`` and doubles (with jitter) up to
``reconnect_max_s``, so a replugged device is back within ``reconnect_max_s`` of returning.
A driver that *reports* DISCONNECTED is asked again at that pace without being closed: every
driver reconnects inside ``status()`` (a scanner's reader task reopens its port itself, and
closing it would end its scan subscriptions).

Every call into a driver, the supervisor's and the API's alike, runs under the device's one
lock (:meth:`DeviceManager.use`), so a drawer kick and a status poll never interleave. Blocking
I/O stays in the drivers' worker threads; nothing here blocks the event loop.

A state change is logged once ("device receipt: connected → disconnected: not responding"),
never once per poll, and handed to the subscribers (the SSE stream). A detail change within
CONNECTED or ERROR ("paper near end", "paper out" → "cover open") counts as a change; within
DISCONNECTED it does not (the reason for being away may vary from one attempt to the next).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from drivers.base import (
    DeviceError,
    DeviceRefused,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    DeviceUnavailable,
    Driver,
    create_driver,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 5.0
DEFAULT_RECONNECT_MIN_S = 0.1
# A failed attempt costs one connect() or one open() of a missing path: cheap enough to repeat
# every 2 s, which brings a replugged device back "within seconds" as the issue asks.
DEFAULT_RECONNECT_MAX_S = 2.0
# A driver call that takes longer than this is stuck (drivers time out on their own well
# before): the device is reported not responding and reopened.
STUCK_AFTER_S = 30.0
CLOSE_TIMEOUT_S = 5.0
REFUSED_CHECK_S = 5.0  # the status asked right after a refusal, to say why
NOT_CHECKED = "not checked yet"

Listener = Callable[["DeviceChange"], object]


class UnknownDevice(DeviceError):
    """No device of that name is configured."""


@dataclass(frozen=True)
class DeviceChange:
    """A device moved from one state (or detail) to another at ``since`` (Unix time)."""

    name: str
    kind: str
    old: DeviceStatus
    new: DeviceStatus
    since: float


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device as the manager sees it now; ``since`` is None until first checked."""

    name: str
    kind: str
    status: DeviceStatus
    since: float | None


@dataclass
class _Device:
    spec: DeviceSpec
    kind: str
    driver: Driver | None
    poll_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    status: DeviceStatus
    since: float | None = None
    opened: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    failed_checks: int = 0
    down_since: float | None = None  # monotonic, for "back after 12 attempts, 37 s"


class DeviceManager:
    """Supervises the configured devices: connect, poll, reconnect, report."""

    def __init__(self, *, drivers: Mapping[str, type[Driver]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._registry = drivers
        self._clock = clock
        self._devices: dict[str, _Device] = {}
        self._listeners: list[Listener] = []
        self._started = False

    # -- configuration ---------------------------------------------------------------------

    def add(self, spec: DeviceSpec, *, kind: str, enabled: bool = True,
            poll_s: float = DEFAULT_POLL_S, reconnect_min_s: float = DEFAULT_RECONNECT_MIN_S,
            reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S) -> None:
        """Add a device before start(); a driver that cannot be built leaves it in ERROR."""
        if spec.name in self._devices:
            raise DeviceError(f"device {spec.name!r} is added twice")
        if self._started:
            raise DeviceError("devices are added before start()")
        driver: Driver | None = None
        if not enabled:
            status = DeviceStatus(DeviceState.DISABLED)
        else:
            try:
                driver = create_driver(spec, self._registry)
            except DeviceError as err:
                # A bad device entry must not stop the agent taking sales: show it in status.
                status = DeviceStatus(DeviceState.ERROR, str(err))
                log.error("device %s: cannot be used: %s", spec.name, err)
            else:
                kind = driver.kind
                status = DeviceStatus(DeviceState.DISCONNECTED, NOT_CHECKED)
        since = self._clock() if driver is None else None
        self._devices[spec.name] = _Device(
            spec, kind, driver, poll_s, min(reconnect_min_s, reconnect_max_s),
            reconnect_max_s, status, since)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one supervisor per usable device; returns at once (devices connect later)."""
        self._started = True
        for device in self._devices.values():
            if device.driver is not None and device.task is None:
                device.task = asyncio.create_task(self._supervise(device),
                                                  name=f"device {device.spec.name}")

    async def stop(self) -> None:
        """Stop supervising and close every driver."""
        tasks = [d.task for d in self._devices.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for device in self._devices.values():
            device.task = None
        await asyncio.gather(*(self._close(d) for d in self._devices.values()
                               if d.driver is not None))

    async def _close(self, device: _Device) -> None:
        async with device.lock:
            await self._close_locked(device)

    async def _close_locked(self, device: _Device) -> None:
        device.opened = False
        if device.driver is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await device.driver.close()
        except Exception as err:  # closing is best effort; the next open() starts afresh
            log.warning("device %s: close failed: %s", device.spec.name, _describe(err))

    # -- what the agent asks ---------------------------------------------------------------

    def names(self) -> list[str]:
        """Return the device names in the order they were added."""
        return list(self._devices)

    def __contains__(self, name: object) -> bool:
        return name in self._devices

    def snapshot(self, name: str) -> DeviceSnapshot:
        """Return the device's kind, status and since; UnknownDevice if not configured."""
        device = self._get(name)
        return DeviceSnapshot(name, device.kind, device.status, device.since)

    def snapshots(self) -> list[DeviceSnapshot]:
        """Return every device's snapshot, in order."""
        return [self.snapshot(name) for name in self._devices]

    def status(self, name: str) -> tuple[DeviceStatus, float | None]:
        """Return the device's status and since when (Unix time; None until first checked)."""
        device = self._get(name)
        return device.status, device.since

    def driver(self, name: str) -> Driver | None:
        """Return the device's driver (None when disabled or not buildable)."""
        return self._get(name).driver

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every DeviceChange; returns the function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def refresh(self, name: str) -> None:
        """Ask the device's supervisor to check it now rather than at its next poll."""
        self._get(name).wake.set()

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Driver]:
        """Hold the device's lock and yield its driver; outcomes update the device's state.

        DeviceUnavailable from the body closes the driver and reports DISCONNECTED at once;
        DeviceRefused asks for a status check now. Both propagate.
        """
        device = self._get(name)
        if device.driver is None:
            status = device.status
            raise DeviceUnavailable(f"device {name!r} is {status.state.value}"
                                    + (f": {status.detail}" if status.detail else ""))
        async with device.lock:
            try:
                yield device.driver
            except DeviceUnavailable as err:
                await self._close_locked(device)
                self._record(device, DeviceStatus(DeviceState.DISCONNECTED, _describe(err)))
                device.wake.set()
                raise
            except DeviceRefused:
                # The device answered "not now": its state says why (cover open), so take it
                # now, while the caller is still here to be told.
                self._record(device, await self._check_locked(device, REFUSED_CHECK_S))
                raise

    def _get(self, name: str) -> _Device:
        try:
            return self._devices[name]
        except KeyError:
            raise UnknownDevice(f"no device named {name!r}") from None

    # -- supervision -----------------------------------------------------------------------

    async def _supervise(self, device: _Device) -> None:
        delay = device.reconnect_min_s
        while True:
            status = await self._check(device)
            self._record(device, status)
            if status.state is DeviceState.DISCONNECTED:
                device.failed_checks += 1
                wait = delay * random.uniform(0.8, 1.0)
                delay = min(delay * 2, device.reconnect_max_s)
            else:
                device.failed_checks = 0
                wait = device.poll_s
                delay = device.reconnect_min_s
            device.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await device.wake.wait()

    async def _check(self, device: _Device) -> DeviceStatus:
        async with device.lock:
            return await self._check_locked(device, STUCK_AFTER_S)

    async def _check_locked(self, device: _Device, timeout_s: float) -> DeviceStatus:
        driver = device.driver
        assert driver is not None  # only usable devices are supervised or used
        try:
            async with asyncio.timeout(timeout_s):
                if not device.opened:
                    await driver.open()
                    device.opened = True
                return await driver.status()
        except TimeoutError:
            await self._close_locked(device)
            return DeviceStatus(DeviceState.DISCONNECTED,
                                f"not responding (no answer within {timeout_s:g} s)")
        except DeviceUnavailable as err:
            await self._close_locked(device)
            return DeviceStatus(DeviceState.DISCONNECTED, _describe(err))
        except Exception as err:
            # A configuration error or a driver bug: show it, and try again later from a
            # fresh open() rather than let the supervisor die.
            await self._close_locked(device)
            return DeviceStatus(DeviceState.ERROR, _describe(err))

    def _record(self, device: _Device, new: DeviceStatus) -> None:
        old, name = device.status, device.spec.name
        first = device.since is None
        if not first and new == old:
            return
        state_changed = first or new.state is not old.state
        if not state_changed and new.state is DeviceState.DISCONNECTED:
            device.status = new  # a new reason for being away: shown, not announced
            return
        now = self._clock()
        device.status = new
        if state_changed:
            device.since = now
        self._announce(device, old, new, first)
        change = DeviceChange(name, device.kind, old, new, now)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("device %s: a state-change subscriber failed", name)

    def _announce(self, device: _Device, old: DeviceStatus, new: DeviceStatus,
                  first: bool) -> None:
        name = device.spec.name
        text = _text(new)
        if first:
            level = logging.INFO if new.state is DeviceState.CONNECTED else logging.WARNING
            log.log(level, "device %s (%s at %s): %s", name, device.kind, device.spec.url, text)
            if new.state is DeviceState.DISCONNECTED:
                device.down_since = time.monotonic()
            return
        if new.state is DeviceState.CONNECTED and device.down_since is not None:
            took = time.monotonic() - device.down_since
            log.info("device %s: %s → %s (back after %d failed checks, %.0f s)", name,
                     old.state.value, text, device.failed_checks, took)
            device.down_since = None
            return
        if new.state is DeviceState.DISCONNECTED and old.state is not DeviceState.DISCONNECTED:
            device.down_since = time.monotonic()
        level = logging.INFO if new.state is DeviceState.CONNECTED else logging.WARNING
        log.log(level, "device %s: %s → %s", name, _text(old) if old.state is new.state
                else old.state.value, text)


def _text(status: DeviceStatus) -> str:
    return f"{status.state.value}: {status.detail}" if status.detail else status.state.value


def _describe(err: BaseException) -> str:
    text = str(err)
    return text if text else type(err).__name__
