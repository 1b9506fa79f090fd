"""The shipped unit, checked by the real systemd-analyze.

``systemd-analyze verify`` checks that every ExecStart= binary exists, and
``--root=DIR`` would need a whole unit tree (sysinit.target, ...) inside DIR. So the unit is
verified as a copy whose ExecStart= points at a stub executable in tmp_path; every other line
is verified as shipped. ``security --offline=true`` reads the shipped file itself.

systemd-analyze is a hard requirement (Debian package ``systemd``): a missing tool fails the
test with the command to install it, never skips it.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "tillsync.service"
DROPINS = sorted((REPO / "systemd" / "tillsync.service.d").glob("*.conf.example"))
EXEC_START = "/opt/tillsync/venv/bin/tillsync"
MAX_EXPOSURE = 2.0


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install it with `apt-get install systemd` "
                    "(Debian 12; .ci/run does this)", pytrace=False)
    return tool


def unit_lines(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; systemd allows repeated keys."""
    section, out = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_lines(UNIT.read_text()) if s == section and k == key]


def verifiable_copy(tmp_path: Path, text: str) -> Path:
    stub = tmp_path / "bin" / "tillsync"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert text.count(f"ExecStart={EXEC_START} ") == 1
    copy = tmp_path / "tillsync.service"
    copy.write_text(text.replace(f"ExecStart={EXEC_START} ", f"ExecStart={stub} "))
    return copy


def verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_unit_passes_systemd_analyze_verify(analyze: str, tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path, UNIT.read_text())
    result = verify(analyze, copy)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Warnings ("Unknown key", "Invalid syntax, ignoring") do not change the exit status.
    assert "tillsync.service" not in output, output


def test_the_example_drop_ins_pass_verify_merged_into_the_unit(analyze: str,
                                                               tmp_path: Path) -> None:
    assert DROPINS, "no drop-in examples under systemd/tillsync.service.d/"
    for dropin in DROPINS:
        body = dropin.read_text().split("[Service]", 1)[1]
        text = UNIT.read_text().replace("[Install]", body + "\n[Install]")
        result = verify(analyze, verifiable_copy(tmp_path / dropin.stem, text))
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and "tillsync.service" not in output, (dropin, output)


def test_the_unit_exposure_score_is_at_most_2_0(analyze: str) -> None:
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for tillsync\.service:\s*([0-9.]+)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"


def test_the_unit_is_a_notify_service_with_a_watchdog_and_restarts() -> None:
    assert values("Type") == ["notify"]
    assert values("NotifyAccess") == ["main"]
    assert int(values("WatchdogSec")[0]) >= 10
    assert values("Restart") == ["on-failure"]
    assert values("RestartPreventExitStatus") == ["2"]  # bad config: restarting cannot help
    assert int(values("RestartSec")[0]) >= 1
    assert values("StartLimitBurst", "Unit") and values("StartLimitIntervalSec", "Unit")
    # The agent's graceful stop takes up to ~20 s; systemd must not kill it sooner.
    assert int(values("TimeoutStopSec")[0]) >= 25
    assert values("ExecStart") == [f"{EXEC_START} run"]
    assert values("Environment") == ["TILLSYNC_CONFIG=/etc/tillsync/agent.toml"]
    assert values("WantedBy", "Install") == ["multi-user.target"]


def test_the_unit_runs_as_the_static_service_user_with_its_directories() -> None:
    assert values("User") == ["tillsync"]
    assert values("DynamicUser") == []
    assert values("StateDirectory") == ["tillsync"]
    assert values("StateDirectoryMode") == ["0700"]
    assert values("ConfigurationDirectory") == ["tillsync"]
    assert values("UMask") == ["0077"]
    assert "outbox.key:/etc/tillsync/outbox.key" in values("LoadCredential")


def test_the_unit_reaches_serial_and_usb_devices_and_nothing_else() -> None:
    assert values("SupplementaryGroups") == ["dialout lp"]
    assert values("DevicePolicy") == ["closed"]
    allowed = values("DeviceAllow")
    for device in ("char-ttyUSB rw", "char-ttyACM rw", "char-usb_device rw", "/dev/usb/lp0 rw"):
        assert device in allowed
    assert values("PrivateDevices") == ["no"]
    assert values("CapabilityBoundingSet") == [""]
    assert values("NoNewPrivileges") == ["yes"]
    assert values("ProtectSystem") == ["strict"]
    assert values("MemoryDenyWriteExecute") == ["yes"]


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
MDWE_CHILD = """
import ctypes, mmap, os
libc = ctypes.CDLL(None)
assert libc.prctl(66, 0, 0, 0, 0) == 1, "MDWE is not active"
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key, nonce = AESGCM.generate_key(256), os.urandom(12)
assert AESGCM(key).decrypt(nonce, AESGCM(key).encrypt(nonce, b"sale", b"ad"), b"ad") == b"sale"
import cffi, pydantic, aiohttp, aiosqlite, serial, escpos, apscheduler, prometheus_client
import agent.cli, agent.runtime, outbox.store
class M(pydantic.BaseModel):
    a: int
assert M(a=1).a == 1
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(lambda a, b: 0)
numbers = (ctypes.c_int * 3)(3, 1, 2)
libc.qsort(numbers, 3, 4, callback)   # a libffi closure
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    print("ok")
else:
    raise SystemExit("a W+X mapping was allowed: MDWE is not in force")
"""


def test_the_agent_and_its_libraries_run_with_memory_deny_write_execute() -> None:
    # MemoryDenyWriteExecute=yes refuses W+X memory; the kernel's PR_SET_MDWE (Linux 6.3+)
    # enforces the same rule and is inherited across exec, so the child runs under it.
    libc = ctypes.CDLL(None, use_errno=True)
    probe = libc.prctl(PR_GET_MDWE, 0, 0, 0, 0)
    if probe < 0:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3); nothing to run it under")

    def under_mdwe() -> None:
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")

    result = subprocess.run([sys.executable, "-c", MDWE_CHILD], capture_output=True, text=True,
                            timeout=60, check=False, cwd=REPO, preexec_fn=under_mdwe,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
