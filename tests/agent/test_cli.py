"""The tillsync command line, run as a real subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.agent.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def tillsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_lists_every_command_and_version_answers():
    text = tillsync("--help").stdout
    for command in ("demo", "init", "run", "check", "status", "outbox", "keys"):
        assert command in text
    assert tillsync("--version").stdout.startswith("tillsync ")
    assert "--seconds" in tillsync("demo", "--help").stdout


def test_init_writes_a_working_setup_once_and_never_overwrites_the_key(tmp_path: Path):
    target = tmp_path / "etc"
    first = tillsync("init", "--dir", str(target))
    assert first.returncode == 0, first.stderr
    key = target / "outbox.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "status token" in first.stdout and "terminal T01" in first.stdout
    original = key.read_bytes()
    again = tillsync("init", "--dir", str(target))
    assert str(target) in one_line_failure(again)
    assert key.read_bytes() == original


def test_a_config_error_is_one_line_per_problem_with_exit_2(tmp_path: Path):
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[store]", "[store]\ncolour = 'blue'"))
    result = tillsync("run", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "store.colour" in result.stderr


def test_a_world_readable_key_stops_run_with_one_clear_line(tmp_path: Path):
    config = write_config(tmp_path)
    (tmp_path / "outbox.key").chmod(0o644)
    line = one_line_failure(tillsync("run", "--config", str(config)))
    assert "outbox.key" in line and "chmod 600" in line


def test_status_without_an_agent_is_one_line(tmp_path: Path):
    result = tillsync("status", "--url", "http://127.0.0.1:9", "--token", "x")
    line = one_line_failure(result)
    assert "127.0.0.1:9" in line
