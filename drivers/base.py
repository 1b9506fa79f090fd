"""The driver protocol every device family implements, its errors, and the entry-point registry.

A driver is an async object built from a :class:`DeviceSpec` (one ``[[devices]]`` entry of the
config). The device manager in ``agent`` owns reconnecting; a driver only reports what the
device says *now*:

* ``open()`` connects or raises :class:`DeviceUnavailable`;
* ``close()`` is idempotent;
* ``status()`` asks the device and never answers CONNECTED for a device that stayed silent;
* ``probe(url)`` tells discovery whether this kind of device sits at ``url``.

Errors are typed by what the caller does next: :class:`DeviceUnavailable` means reconnect and
retry later, :class:`DeviceRefused` means the device answered but cannot do the job now (keep the
connection, retry the job later). Anything else is a :class:`DeviceError` (usually a bad
configuration or a bug) and is not retried.

Drivers are registered through the ``tillsync.drivers`` entry point group, the entry point name
being the config ``type``; nothing registers by import side effect.
"""

from __future__ import annotations

import enum
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "tillsync.drivers"

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class DeviceState(enum.StrEnum):
    """Where a device stands, as reported on /v1/status and /v1/devices."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ERROR = "error"
    DISABLED = "disabled"


@dataclass(frozen=True)
class DeviceStatus:
    """A device's state plus a short human detail such as "paper near end" or "cover open"."""

    state: DeviceState
    detail: str | None = None

    @property
    def up(self) -> bool:
        """Tell whether the device answered and can work (CONNECTED)."""
        return self.state is DeviceState.CONNECTED


class DeviceError(Exception):
    """Base of every driver error; raised as-is for configuration errors and bugs (no retry)."""


class DeviceUnavailable(DeviceError):
    """The device is not connected, timed out or was unplugged: reconnect and retry later."""


class DeviceRefused(DeviceError):
    """The device answered but cannot do this now (paper out, cover open): retry the job later."""


@dataclass(frozen=True)
class DeviceSpec:
    """One configured device: its name, driver ``type``, ``url`` and driver-specific options."""

    name: str
    type: str
    url: str
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


@runtime_checkable
class Driver(Protocol):
    """What the device manager needs from every device driver."""

    kind: ClassVar[str]  # "printer" | "scanner" | "scale"
    spec: DeviceSpec

    async def open(self) -> None:
        """Connect to the device; raise DeviceUnavailable on failure."""
        ...

    async def close(self) -> None:
        """Disconnect; calling it twice or before open() is fine."""
        ...

    async def status(self) -> DeviceStatus:
        """Ask the device now; a silent device is DISCONNECTED/"not responding", never CONNECTED."""
        ...

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        """Tell whether this kind of device answers at ``url`` (discovery)."""
        ...


def load_drivers() -> dict[str, type[Driver]]:
    """Return the registered driver classes by config ``type`` from the entry point group."""
    drivers: dict[str, type[Driver]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must name itself, not hide behind ImportError
            raise DeviceError(f"driver {ep.name!r} ({ep.value}) failed to load: {err}") from err
        drivers[ep.name] = cls
    return drivers


def create_driver(spec: DeviceSpec, drivers: Mapping[str, type[Driver]] | None = None) -> Driver:
    """Build the driver for ``spec``; an unknown ``type`` raises DeviceError listing the known."""
    registry = load_drivers() if drivers is None else drivers
    try:
        cls = registry[spec.type]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none registered"
        raise DeviceError(
            f"device {spec.name!r}: unknown type {spec.type!r} (known: {known})"
        ) from None
    # Driver classes take the spec as their single constructor argument.
    return cls(spec)  # type: ignore[call-arg]
