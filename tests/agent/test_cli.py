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


def test_an_unreadable_ca_bundle_stops_run_naming_the_sink_and_the_file(tmp_path: Path):
    """The first sink's relay has started when the second one fails: it is stopped and the
    agent exits with one line, instead of a bare "[Errno 2] No such file or directory"."""
    config = write_config(tmp_path, sink_url="http://127.0.0.1:9/events")
    missing = tmp_path / "private-ca.pem"
    config.write_text(config.read_text() + '[[sinks]]\nname = "erp"\ntype = "webhook"\n'
                      f'url = "https://127.0.0.1:9/erp"\nca_bundle = "{missing}"\n')

    result = tillsync("run", "--config", str(config))

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tillsync: sink erp: ca_bundle {missing} cannot be used"), last
    assert "No such file or directory" in last and "config file" in last


def test_status_without_an_agent_is_one_line(tmp_path: Path):
    result = tillsync("status", "--url", "http://127.0.0.1:9", "--token", "x")
    line = one_line_failure(result)
    assert "127.0.0.1:9" in line
