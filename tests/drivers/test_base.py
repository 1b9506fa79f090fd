from __future__ import annotations

import pytest

from drivers.base import (
    DeviceError,
    DeviceRefused,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    DeviceUnavailable,
    Driver,
    create_driver,
    load_drivers,
)
from drivers.escpos.printer import EscposPrinterDriver


def test_error_types_say_what_the_caller_does_next() -> None:
    assert issubclass(DeviceUnavailable, DeviceError)
    assert issubclass(DeviceRefused, DeviceError)
    assert not issubclass(DeviceRefused, DeviceUnavailable)


def test_only_a_connected_status_is_up() -> None:
    assert DeviceStatus(DeviceState.CONNECTED, "paper near end").up
    assert not DeviceStatus(DeviceState.DISCONNECTED, "not responding").up
    assert DeviceState.ERROR == "error"


def test_spec_options_default_to_an_empty_mapping() -> None:
    spec = DeviceSpec("receipt", "escpos", "tcp://127.0.0.1:9100")
    assert dict(spec.options) == {}


def test_create_driver_builds_the_registered_class_from_the_spec() -> None:
    spec = DeviceSpec("receipt", "escpos", "tcp://127.0.0.1:9100")
    driver = create_driver(spec, {"escpos": EscposPrinterDriver})
    assert isinstance(driver, EscposPrinterDriver)
    assert isinstance(driver, Driver)
    assert driver.spec is spec
    assert driver.kind == "printer"


def test_an_unknown_type_is_refused_listing_the_known_ones() -> None:
    spec = DeviceSpec("receipt", "epson", "tcp://127.0.0.1:9100")
    with pytest.raises(DeviceError, match=r"unknown type 'epson' \(known: escpos\)"):
        create_driver(spec, {"escpos": EscposPrinterDriver})


def test_load_drivers_returns_driver_classes_by_type() -> None:
    drivers = load_drivers()
    assert all(isinstance(name, str) and isinstance(cls, type) for name, cls in drivers.items())
