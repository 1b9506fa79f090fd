"""The tillsync command line, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from agent.config import load_config
from tests.agent.conftest import write_config
from tests.stub_server import serving

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


# -- --debug on every subcommand ---------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["run", "--debug", "--config", "{missing}"],
    ["--debug", "run", "--config", "{missing}"],
    ["outbox", "list", "--debug", "--config", "{missing}"],
    ["keys", "rotate", "--config", "{missing}", "--debug"],
    ["status", "--debug", "--url", "http://127.0.0.1:9", "--token", "x"],
])
def test_debug_is_accepted_before_or_after_the_subcommand_and_shows_the_traceback(
        tmp_path: Path, argv: list[str]):
    args = [arg.format(missing=tmp_path / "missing.toml") for arg in argv]
    result = tillsync(*args)
    assert result.returncode == 1 and "unrecognized arguments" not in result.stderr
    assert "Traceback" in result.stderr, result.stderr
    without = tillsync(*[arg for arg in args if arg != "--debug"])
    one_line_failure(without)


def test_debug_after_check_or_init_is_accepted(tmp_path: Path):
    check = tillsync("check", "--config", str(tmp_path / "missing.toml"), "--debug")
    assert check.returncode == 1 and "unrecognized" not in check.stderr
    assert "FAIL  config" in check.stdout
    init = tillsync("init", "--debug", "--dir", str(tmp_path / "etc"))
    assert init.returncode == 0, init.stderr


# -- init and $TILLSYNC_CONFIG -----------------------------------------------------------------


def test_init_without_dir_writes_the_file_tillsync_config_names_so_run_finds_it(
        tmp_path: Path):
    custom = tmp_path / "site" / "custom.toml"
    env = {"TILLSYNC_CONFIG": str(custom)}
    result = tillsync("init", env=env)
    assert result.returncode == 0, result.stderr
    assert f"wrote {custom} and {custom.parent / 'outbox.key'}" in result.stdout
    assert custom.exists() and not (custom.parent / "agent.toml").exists()
    assert stat.S_IMODE(custom.stat().st_mode) == 0o600
    config = load_config(custom, environ={})
    assert config.outbox.key_file == custom.parent / "outbox.key"
    assert config.outbox.path == custom.parent / "outbox.db"
    # `check` (like `run`) reads the same variable and finds the file init wrote.
    check = tillsync("check", env=env)
    assert re.search(rf"(?m)^ok\s+config\s+{re.escape(str(custom))}$", check.stdout), check.stdout
    assert "$TILLSYNC_CONFIG" in tillsync("init", "--help").stdout


# -- status: why there is no token, and an answer that is not a tillsync status ---------------


def test_status_without_a_token_names_the_config_error_behind_it(tmp_path: Path):
    config = write_config(tmp_path)
    text = re.sub(r'(?m)^status_token = ".*"$', 'status_token = "${TS_UNSET_FOR_TEST}"',
                  config.read_text())
    config.write_text(text)
    line = one_line_failure(tillsync_without(
        ["TILLSYNC_STATUS_TOKEN", "TS_UNSET_FOR_TEST"], "status",
        env={"TILLSYNC_CONFIG": str(config)}))
    assert line.startswith(f"tillsync: no status token: the config file {config} (from"
                           " $TILLSYNC_CONFIG) does not load: api.status_token: environment"
                           " variable TS_UNSET_FOR_TEST is not set"), line
    assert "pass --token" in line and "make the config file readable" not in line


@pytest.mark.parametrize("token_variable", ["unset", "empty"])
def test_status_without_a_token_says_the_config_file_does_not_exist(tmp_path: Path,
                                                                    token_variable: str):
    missing = tmp_path / "custom.toml"
    env = {"TILLSYNC_CONFIG": str(missing)}
    if token_variable == "empty":
        env["TILLSYNC_STATUS_TOKEN"] = ""  # counts as unset, not as an empty token
    line = one_line_failure(tillsync_without(
        [] if token_variable == "empty" else ["TILLSYNC_STATUS_TOKEN"], "status", env=env))
    assert line.startswith(f"tillsync: no status token: the config file {missing} (from"
                           " $TILLSYNC_CONFIG) does not exist"), line
    assert "pass --token" in line and "readable" not in line


def tillsync_without(variables: list[str], *args: str,
                     env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Like ``tillsync``, with ``variables`` removed from the environment."""
    full = {k: v for k, v in {**os.environ, **env}.items() if k not in variables}
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, check=False, env=full)


async def test_status_of_a_server_that_is_not_a_tillsync_agent_fails_with_one_line():
    async def not_an_agent(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async with serving(not_an_agent) as base:
        for extra in ([], ["--json"]):
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "status", "--url", base,
                "--token", "x", *extra, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(child.communicate(), timeout=60)
            assert child.returncode == 1 and out == b"", out
            assert err.decode() == (f"tillsync: {base}/v1/status answered, but"
                                    " not with a tillsync status (no 'status', 'outbox',"
                                    " 'sinks' in it) — check that --url points at the"
                                    " tillsync agent\n")
