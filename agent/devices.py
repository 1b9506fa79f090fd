"""Glue between the ``[[devices]]`` config and the drivers: the manager, drawer and weight.

The agent builds one :class:`~drivers.manager.DeviceManager` from the config (disabled devices
are shown as ``disabled`` and never touched) and asks it for the states in ``/v1/status``.

A cash-drawer kick is immediate or nothing (CONTRACT §4, DESIGN "the flow"): it goes straight to
the printer's driver under the device lock, is never queued, stored or retried, so nothing can
open a drawer after a restart or when a printer comes back. A failure says what the printer
said. A weight is returned only when the scale reports it stable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent.config import AnyDeviceConfig
from agent.errors import RequestError
from agent.status import DeviceStatus
from drivers.base import DeviceError, DeviceRefused, DeviceSpec, DeviceUnavailable, Driver
from drivers.manager import DeviceManager, UnknownDevice

log = logging.getLogger(__name__)

# A drawer request waits at most this long (for the device lock, the connection and the
# printer's status answer) before failing; a till must not hang on a dead printer.
DRAWER_TIMEOUT_S = 10.0
WEIGHT_READ_TIMEOUT_S = 1.0
WEIGHT_RETRY_S = 0.2
MAX_WEIGHT_WAIT_S = 10.0  # the API refuses a longer wait_s (422)
# drivers.scale.refusal() words a moving platter this way; it is the one refusal worth waiting on.
IN_MOTION = "in motion"


class DeviceRequestError(RequestError):
    """A device request failed: HTTP status, error code, message and the device's state."""


def device_spec(config: AnyDeviceConfig) -> DeviceSpec:
    """Return the driver's view of one ``[[devices]]`` entry."""
    return DeviceSpec(config.name, config.driver_type(), config.url, config.driver_options())


def build_manager(configs: Sequence[AnyDeviceConfig],
                  drivers: Mapping[str, type[Driver]] | None = None) -> DeviceManager:
    """Build a manager for the configured devices (``drivers`` defaults to entry points)."""
    manager = DeviceManager(drivers=drivers)
    for config in configs:
        manager.add(device_spec(config), kind=config.kind, enabled=config.enabled,
                    poll_s=config.poll_s, reconnect_max_s=config.reconnect_max_s)
    return manager


def status_rows(manager: DeviceManager) -> list[DeviceStatus]:
    """Return every device as the status document shows it."""
    return [DeviceStatus(s.name, s.kind, s.status.state.value, s.status.detail, s.since)
            for s in manager.snapshots()]


def _state_details(manager: DeviceManager, name: str) -> list[dict[str, Any]]:
    status, _ = manager.status(name)
    return [{"device": name, "state": status.state.value, "detail": status.detail}]


def _unavailable(manager: DeviceManager, name: str, why: str) -> DeviceRequestError:
    return DeviceRequestError(503, "device_unavailable", f"device {name!r}: {why}",
                              _state_details(manager, name))


def _driver_of(manager: DeviceManager, name: str, kind: str, code: str,
               method: str) -> Driver:
    try:
        snapshot = manager.snapshot(name)
    except UnknownDevice:
        raise DeviceRequestError(404, "not_found", f"no device named {name!r}") from None
    driver = manager.driver(name)
    if snapshot.kind != kind or (driver is not None and not hasattr(driver, method)):
        raise DeviceRequestError(409, code, f"device {name!r} is a {snapshot.kind}, not a {kind}"
                                 if snapshot.kind != kind else
                                 f"device {name!r} cannot do this ({method} not supported)",
                                 _state_details(manager, name))
    if driver is None:
        status = snapshot.status
        why = f"{status.state.value}: {status.detail}" if status.detail else status.state.value
        raise _unavailable(manager, name, why)
    return driver


async def open_drawer(manager: DeviceManager, name: str, *,
                      timeout_s: float = DRAWER_TIMEOUT_S,
                      wanted: Callable[[], bool] = lambda: True) -> None:
    """Pulse the cash drawer of printer ``name`` now, or raise DeviceRequestError; no retry.

    The printer may be busy (printing a receipt holds it): ``wanted`` is asked once it is
    free, and a request nobody waits for any more is dropped rather than opening late.
    """
    _driver_of(manager, name, "printer", "device_not_a_printer", "kick_drawer")
    try:
        async with asyncio.timeout(timeout_s):
            async with manager.use(name) as driver:
                if not wanted():
                    raise DeviceRequestError(
                        503, "device_unavailable", f"printer {name!r} was busy and the till"
                        " stopped waiting; drawer not opened", _state_details(manager, name))
                await driver.kick_drawer()  # type: ignore[attr-defined]
    except TimeoutError:
        manager.refresh(name)
        raise _unavailable(manager, name, f"no answer within {timeout_s:g} s; "
                           "the drawer was not opened, or not confirmed") from None
    except DeviceUnavailable as err:
        raise _unavailable(manager, name, f"{err}; drawer not opened") from None
    except DeviceRefused as err:
        raise DeviceRequestError(409, "device_refused", str(err),
                                 _state_details(manager, name)) from None
    except DeviceError as err:
        raise DeviceRequestError(500, "device_error", f"device {name!r}: {err}",
                                 _state_details(manager, name)) from None


@dataclass(frozen=True)
class StableWeight:
    """A stable weight as the API returns it (the value as a decimal string)."""

    device: str
    weight: Decimal
    unit: str
    net: bool
    zero: bool

    def to_json(self) -> dict[str, Any]:
        """Return the JSON body of GET /v1/devices/{name}/weight."""
        return {"device": self.device, "weight": str(self.weight), "unit": self.unit,
                "net": self.net, "zero": self.zero}


async def read_weight(manager: DeviceManager, name: str, *, wait_s: float = 0.0) -> StableWeight:
    """Return a stable weight, waiting up to ``wait_s`` for the platter to settle."""
    _driver_of(manager, name, "scale", "device_not_a_scale", "read_weight")
    deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WEIGHT_WAIT_S)
    while True:
        try:
            async with asyncio.timeout(DRAWER_TIMEOUT_S):
                async with manager.use(name) as driver:
                    weight = await driver.read_weight(  # type: ignore[attr-defined]
                        WEIGHT_READ_TIMEOUT_S)
        except TimeoutError:
            manager.refresh(name)
            raise _unavailable(manager, name, "no answer") from None
        except DeviceUnavailable as err:
            raise _unavailable(manager, name, str(err)) from None
        except DeviceRefused as err:
            reason = str(err)
            if reason == IN_MOTION and time.monotonic() + WEIGHT_RETRY_S < deadline:
                await asyncio.sleep(WEIGHT_RETRY_S)
                continue
            if reason == IN_MOTION:
                raise DeviceRequestError(409, "weight_unstable",
                                         f"scale {name!r}: {reason}; read again when it "
                                         "settles", _state_details(manager, name)) from None
            raise DeviceRequestError(409, "device_refused", f"scale {name!r}: {reason}",
                                     _state_details(manager, name)) from None
        except DeviceError as err:
            raise DeviceRequestError(500, "device_error", f"device {name!r}: {err}",
                                     _state_details(manager, name)) from None
        if weight.value is None:  # a driver must not call this stable; refuse rather than guess
            raise DeviceRequestError(409, "weight_unstable", f"scale {name!r}: no weight",
                                     _state_details(manager, name))
        return StableWeight(name, weight.value, weight.unit, weight.net, weight.zero)
