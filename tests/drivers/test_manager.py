"""The device manager's supervision: states, reconnect pace, logging, locking, subscribers.

These tests use a fake driver (``FakeDriver``, registered through an explicit registry), not an
emulator: what is under test is the manager's loop, and a fake lets each test decide exactly
when a device is present, silent, refusing or broken. The real printer and scale go through the
same manager against their emulators in tests/agent/test_devices.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from drivers.base import (
    DeviceRefused,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    DeviceUnavailable,
)
from drivers.manager import NOT_CHECKED, DeviceChange, DeviceManager, UnknownDevice
from tests import polling


@dataclass
class FakeDevice:
    """The world a FakeDriver talks to: is the device there, and what does it say."""

    present: bool = True
    status: DeviceStatus = field(default_factory=lambda: DeviceStatus(DeviceState.CONNECTED))
    raise_on_status: Exception | None = None
    refuse: str | None = None
    opens: int = 0
    closes: int = 0
    statuses: int = 0
    kicks: int = 0
    busy: bool = False  # a call is in progress: a second one at the same time is a bug
    overlaps: int = 0
    call_s: float = 0.0


class FakeDriver:
    """A fake printer whose behaviour the test controls through ``WORLD[spec.name]``."""

    kind: ClassVar[str] = "printer"
    WORLD: ClassVar[dict[str, FakeDevice]] = {}

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.device = self.WORLD[spec.name]

    async def _call(self) -> None:
        if self.device.busy:
            self.device.overlaps += 1
        self.device.busy = True
        try:
            await asyncio.sleep(self.device.call_s)
        finally:
            self.device.busy = False

    async def open(self) -> None:
        self.device.opens += 1
        await self._call()
        if not self.device.present:
            raise DeviceUnavailable("connection refused")

    async def close(self) -> None:
        self.device.closes += 1

    async def status(self) -> DeviceStatus:
        self.device.statuses += 1
        await self._call()
        if self.device.raise_on_status is not None:
            raise self.device.raise_on_status
        if not self.device.present:
            return DeviceStatus(DeviceState.DISCONNECTED, "not responding")
        return self.device.status

    async def kick_drawer(self) -> None:
        await self._call()
        if not self.device.present:
            raise DeviceUnavailable("not responding")
        if self.device.refuse:
            raise DeviceRefused(f"printer: {self.device.refuse}; drawer not opened")
        self.device.kicks += 1

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        return True


REGISTRY = {"fake": FakeDriver}
FAST = {"poll_s": 0.05, "reconnect_min_s": 0.02, "reconnect_max_s": 0.1}


@pytest.fixture
def world():
    FakeDriver.WORLD.clear()
    yield FakeDriver.WORLD
    FakeDriver.WORLD.clear()


@pytest.fixture
async def manager():
    managers: list[DeviceManager] = []

    def make() -> DeviceManager:
        m = DeviceManager(drivers=REGISTRY)
        managers.append(m)
        return m

    yield make
    for m in managers:
        await m.stop()


def add(m: DeviceManager, world: dict[str, FakeDevice], name: str = "receipt",
        **settings: float) -> FakeDevice:
    device = world.setdefault(name, FakeDevice())
    m.add(DeviceSpec(name, "fake", "tcp://127.0.0.1:9"), kind="printer",
          **{**FAST, **settings})
    return device


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> float:
    """``tests.polling.until`` every 5 ms: some tests time reconnects to tens of ms."""
    return await polling.until(predicate, timeout_s, interval_s=0.005)


def state(m: DeviceManager, name: str = "receipt") -> DeviceState:
    return m.status(name)[0].state


async def test_a_device_that_answers_is_connected_with_a_since_time(world, manager):
    m = manager()
    add(m, world)
    assert m.status("receipt") == (DeviceStatus(DeviceState.DISCONNECTED, NOT_CHECKED), None)
    before = time.time()
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    status, since = m.status("receipt")
    assert status.detail is None and since is not None and before <= since <= time.time()
    assert m.snapshot("receipt").kind == "printer"


async def test_a_status_detail_such_as_paper_near_end_is_shown(world, manager):
    m = manager()
    device = add(m, world)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    device.status = DeviceStatus(DeviceState.CONNECTED, "paper near end")
    await until(lambda: m.status("receipt")[0].detail == "paper near end")
    device.status = DeviceStatus(DeviceState.ERROR, "paper out")
    await until(lambda: m.status("receipt")[0] == DeviceStatus(DeviceState.ERROR, "paper out"))


async def test_an_unplugged_device_is_disconnected_and_back_soon_after_it_returns(world, manager):
    m = manager()
    device = add(m, world)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    device.present = False
    await until(lambda: state(m) is DeviceState.DISCONNECTED)
    assert m.status("receipt")[0].detail == "not responding"
    await asyncio.sleep(0.5)  # long enough for the backoff to reach its cap
    device.present = True
    took = await until(lambda: state(m) is DeviceState.CONNECTED)
    assert took < 0.3  # reconnect_max_s (0.1) plus scheduling slack


async def test_a_device_absent_at_start_is_retried_with_capped_backoff(world, manager):
    m = manager()
    device = add(m, world, reconnect_max_s=0.2)
    device.present = False
    await m.start()
    await until(lambda: device.opens >= 1)
    await asyncio.sleep(1.0)
    # 0.02, 0.04, 0.08, 0.16, then every ≤ 0.2 s: about 8 attempts, never a tight loop.
    assert 4 <= device.opens <= 12
    assert m.status("receipt")[0] == DeviceStatus(DeviceState.DISCONNECTED, "connection refused")
    device.present = True
    await until(lambda: state(m) is DeviceState.CONNECTED, timeout_s=0.5)


async def test_unavailable_raised_by_status_closes_and_reopens_the_driver(world, manager):
    m = manager()
    device = add(m, world)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    assert (device.opens, device.closes) == (1, 0)
    device.raise_on_status = DeviceUnavailable("port vanished")
    await until(lambda: state(m) is DeviceState.DISCONNECTED)
    assert m.status("receipt")[0].detail == "port vanished" and device.closes >= 1
    device.raise_on_status = None
    await until(lambda: state(m) is DeviceState.CONNECTED)
    assert device.opens >= 2


async def test_a_driver_bug_is_shown_as_error_and_supervision_goes_on(world, manager):
    m = manager()
    device = add(m, world)
    device.raise_on_status = RuntimeError("index out of range")
    await m.start()
    await until(lambda: state(m) is DeviceState.ERROR)
    assert m.status("receipt")[0].detail == "index out of range"
    device.raise_on_status = None
    await until(lambda: state(m) is DeviceState.CONNECTED)


async def test_transitions_are_logged_once_each_never_once_per_poll(world, manager, caplog):
    caplog.set_level(logging.INFO, logger="drivers.manager")
    m = manager()
    device = add(m, world)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    await asyncio.sleep(0.3)  # several polls while connected
    device.present = False
    await until(lambda: state(m) is DeviceState.DISCONNECTED)
    await asyncio.sleep(0.5)  # many failed reconnects
    device.present = True
    await until(lambda: state(m) is DeviceState.CONNECTED)
    await asyncio.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.name == "drivers.manager"]
    assert len(lines) == 3, lines
    assert lines[0] == "device receipt (printer at tcp://127.0.0.1:9): connected"
    assert lines[1] == "device receipt: connected → disconnected: not responding"
    assert lines[2].startswith("device receipt: disconnected → connected (back after ")


async def test_subscribers_hear_each_change_once(world, manager):
    m = manager()
    device = add(m, world)
    changes: list[DeviceChange] = []
    unsubscribe = m.subscribe(changes.append)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    device.status = DeviceStatus(DeviceState.ERROR, "cover open")
    await until(lambda: state(m) is DeviceState.ERROR)
    await asyncio.sleep(0.2)
    assert [(c.name, c.kind, c.old.state, c.new) for c in changes] == [
        ("receipt", "printer", DeviceState.DISCONNECTED, DeviceStatus(DeviceState.CONNECTED)),
        ("receipt", "printer", DeviceState.CONNECTED,
         DeviceStatus(DeviceState.ERROR, "cover open")),
    ]
    assert changes[-1].since == m.status("receipt")[1]
    unsubscribe()
    device.status = DeviceStatus(DeviceState.CONNECTED)
    await until(lambda: state(m) is DeviceState.CONNECTED)
    assert len(changes) == 2


async def test_a_failing_subscriber_does_not_stop_the_others(world, manager):
    m = manager()
    add(m, world)
    heard: list[DeviceChange] = []

    def broken(change: DeviceChange) -> None:
        raise RuntimeError("boom")

    m.subscribe(broken)
    m.subscribe(heard.append)
    await m.start()
    await until(lambda: len(heard) == 1)


async def test_an_operation_and_a_status_poll_never_interleave(world, manager):
    m = manager()
    device = add(m, world, poll_s=0.0)
    device.call_s = 0.01
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    for _ in range(20):
        async with m.use("receipt") as driver:
            await driver.kick_drawer()  # type: ignore[attr-defined]
    assert device.kicks == 20 and device.statuses > 5
    assert device.overlaps == 0


async def test_unavailable_during_an_operation_shows_disconnected_at_once(world, manager):
    m = manager()
    device = add(m, world, poll_s=60)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    device.present = False
    with pytest.raises(DeviceUnavailable):
        async with m.use("receipt") as driver:
            await driver.kick_drawer()  # type: ignore[attr-defined]
    assert m.status("receipt")[0] == DeviceStatus(DeviceState.DISCONNECTED, "not responding")
    assert device.closes == 1 and device.kicks == 0
    device.present = True
    await until(lambda: state(m) is DeviceState.CONNECTED, timeout_s=1.0)


async def test_a_refused_operation_takes_the_devices_state_right_away(world, manager):
    m = manager()
    device = add(m, world, poll_s=60)
    await m.start()
    await until(lambda: state(m) is DeviceState.CONNECTED)
    device.refuse = "cover open"
    device.status = DeviceStatus(DeviceState.ERROR, "cover open")
    with pytest.raises(DeviceRefused, match="cover open"):
        async with m.use("receipt") as driver:
            await driver.kick_drawer()  # type: ignore[attr-defined]
    assert m.status("receipt")[0] == DeviceStatus(DeviceState.ERROR, "cover open")


async def test_a_disabled_device_is_shown_disabled_and_never_opened(world, manager):
    m = manager()
    world["drawer"] = FakeDevice()
    m.add(DeviceSpec("drawer", "fake", "tcp://127.0.0.1:9"), kind="printer", enabled=False)
    await m.start()
    await asyncio.sleep(0.1)
    status, since = m.status("drawer")
    assert status == DeviceStatus(DeviceState.DISABLED) and since is not None
    assert m.driver("drawer") is None and world["drawer"].opens == 0
    with pytest.raises(DeviceUnavailable, match="disabled"):
        async with m.use("drawer"):
            pass


async def test_an_unregistered_type_is_an_error_naming_the_known_types(world, manager):
    m = manager()
    m.add(DeviceSpec("scale", "nci", "serial:///dev/ttyUSB0"), kind="scale")
    await m.start()
    status, _ = m.status("scale")
    assert status.state is DeviceState.ERROR
    assert status.detail == "device 'scale': unknown type 'nci' (known: fake)"
    assert m.snapshot("scale").kind == "scale"


async def test_an_unknown_name_raises_unknown_device(world, manager):
    m = manager()
    with pytest.raises(UnknownDevice, match="no device named 'nope'"):
        m.status("nope")
    assert "nope" not in m and m.names() == []


async def test_stop_closes_every_driver_and_ends_supervision(world, manager):
    m = manager()
    first, second = add(m, world, "a"), add(m, world, "b")
    await m.start()
    await until(lambda: state(m, "a") is state(m, "b") is DeviceState.CONNECTED)
    await m.stop()
    assert first.closes >= 1 and second.closes >= 1
    polls = first.statuses
    await asyncio.sleep(0.2)
    assert first.statuses == polls
