from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.escpos import commands

ROOT = Path(__file__).resolve().parents[2]


def test_importing_python_escpos_leaves_logging_and_tmp_alone(tmp_path: Path) -> None:
    code = (
        "import logging\n"
        "from drivers.escpos.commands import escpos_module\n"
        "escpos_module('escpos.printer')\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ESCPOS_CAPABILITIES_PICKLE_DIR", None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=60)
    assert list(tmp_path.iterdir()) == []  # the capability cache dir went away at exit


def test_real_time_commands_have_the_documented_bytes() -> None:
    assert [commands.dle_eot(n) for n in (1, 2, 3, 4)] == [
        b"\x10\x04\x01",
        b"\x10\x04\x02",
        b"\x10\x04\x03",
        b"\x10\x04\x04",
    ]
    assert commands.gs_a(commands.ASB_ALL) == b"\x1d\x61\x0f"
    assert commands.process_id_request(b"AB12") == b"\x1d\x28\x48\x06\x00\x30\x30AB12"
    assert commands.select_code_page("cp858") == b"\x1b\x74\x13"


@pytest.mark.parametrize(
    ("pin", "on_ms", "off_ms", "message"),
    [
        (3, 50, 240, "pin must be 2 or 5"),
        (2, 100, 100, "duty cycle"),
        (2, 4, 240, "on time"),
        (2, 51, 240, "2 ms units"),
        (2, 50, 600, "off time"),
    ],
)
def test_drawer_pulses_outside_the_limits_are_refused(
    pin: int, on_ms: int, off_ms: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        commands.drawer_pulse(pin, on_ms, off_ms)
