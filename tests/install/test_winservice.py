"""The platform-neutral part of the Windows service host (agent.winservice), run on Linux.

The service class itself needs pywin32 and a service manager; everything it delegates to is
here: places under %ProgramData%, command lines the MSI runs, the first-start config from the
msiexec properties, the rotating log file, and a real agent stopped from another thread the
way the service manager's stop control does it.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from agent import winservice
from agent.config import ConfigError, load_config
from agent.winservice import InstallSettings, ServiceHost


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


# ---------------------------------------------------------------- places and command lines


def test_config_and_logs_live_under_programdata_tillsync(tmp_path):
    environ = {"ProgramData": str(tmp_path)}
    assert winservice.data_dir(environ) == tmp_path / "tillsync"
    assert winservice.config_path(environ) == tmp_path / "tillsync" / "agent.toml"
    assert winservice.log_dir(environ) == tmp_path / "tillsync" / "logs"


def test_tillsync_config_overrides_the_service_config_path(tmp_path):
    environ = {"ProgramData": str(tmp_path), "TILLSYNC_CONFIG": str(tmp_path / "x.toml")}
    assert winservice.config_path(environ) == tmp_path / "x.toml"


def test_programdata_defaults_to_the_windows_standard_folder():
    assert str(winservice.data_dir({})).replace("/", "\\").endswith(r"C:\ProgramData\tillsync")


def test_command_lines_quote_paths_and_msi_properties_but_not_plain_words():
    line = winservice.msi_command_line([r"C:\Program Files\x.exe", "[DATADIR].", "/T", ""])
    assert line == r'"C:\Program Files\x.exe" "[DATADIR]." /T ""'
    with pytest.raises(ValueError, match="double quote"):
        winservice.msi_command_line(['a"b'])


def test_the_service_command_line_is_pythonservice_under_the_install_folder():
    assert (winservice.image_path(r"C:\Program Files\tillsync")
            == r'"C:\Program Files\tillsync\lib\win32\pythonservice.exe"')
    assert (winservice.python_class("[INSTALLDIR]")
            == r"[INSTALLDIR]lib\agent.winservice.TillsyncService")


def test_recovery_restarts_after_5_30_then_60_seconds_and_on_error_exits():
    assert winservice.recovery_commands() == [
        ["failure", "tillsync", "reset=", "86400", "actions=",
         "restart/5000/restart/30000/restart/60000"],
        ["failureflag", "tillsync", "1"]]


def test_the_data_acl_keeps_only_system_administrators_and_the_service_account():
    argv = winservice.acl_command(r"C:\ProgramData\tillsync")
    assert argv[1:3] == ["/inheritance:r", "/grant:r"]
    grants = [a for a in argv if a.startswith("*S-")]
    assert grants == ["*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", "*S-1-5-19:(OI)(CI)M"]


def test_importing_the_service_host_does_not_import_pywin32():
    code = ("import sys, agent.winservice; "
            "print(any(m in sys.modules for m in ('win32service', 'servicemanager')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows behaviour")
def test_asking_for_the_service_class_off_windows_says_pywin32_is_missing():
    with pytest.raises(ImportError):
        winservice.TillsyncService  # noqa: B018


# ---------------------------------------------------------------- first start


def test_install_settings_ignore_missing_and_blank_values():
    settings = InstallSettings.from_mapping({"StoreId": " store-042 ", "Listen": "",
                                             "SinkUrl": 5})
    assert settings == InstallSettings(store_id="store-042", listen=None, sink_url=None)


def test_first_start_writes_a_config_with_the_install_properties(tmp_path):
    directory = tmp_path / "tillsync"
    settings = InstallSettings("store-042", "0.0.0.0:8765", "https://api.example.com/pos")
    path = winservice.ensure_config(directory, settings)
    assert path == directory / "agent.toml"
    config = load_config(path)
    assert config.store.id == "store-042"
    assert config.api.listen == "0.0.0.0:8765"
    assert [(s.name, str(s.url)) for s in config.sinks] == [
        ("cloud", "https://api.example.com/pos")]
    assert (directory / "outbox.key").is_file()
    assert not list(directory.glob("*.new"))


def test_first_start_without_properties_keeps_the_init_defaults(tmp_path):
    path = winservice.ensure_config(tmp_path / "tillsync", InstallSettings())
    assert path is not None
    config = load_config(path)
    assert config.store.id == "store-001"
    assert config.api.listen == "127.0.0.1:8765"
    assert list(config.sinks) == []


def test_an_existing_config_is_never_rewritten(tmp_path):
    directory = tmp_path / "tillsync"
    path = winservice.ensure_config(directory, InstallSettings("store-042"))
    assert path is not None
    before = path.read_bytes(), (directory / "outbox.key").read_bytes()
    assert winservice.ensure_config(directory, InstallSettings("store-999")) is None
    assert (path.read_bytes(), (directory / "outbox.key").read_bytes()) == before


def test_a_bad_store_id_fails_and_leaves_no_config_or_key(tmp_path):
    directory = tmp_path / "tillsync"
    with pytest.raises(ConfigError, match=r"store\.id"):
        winservice.ensure_config(directory, InstallSettings("store 042!"))
    assert not (directory / "agent.toml").exists()
    assert not (directory / "outbox.key").exists()


# ---------------------------------------------------------------- logging


def test_the_log_file_rotates_and_keeps_a_bounded_number_of_files(tmp_path):
    handler = winservice.configure_logging(tmp_path / "logs", max_bytes=2000, backups=2)
    logger = logging.getLogger("tillsync.test")
    for n in range(200):
        logger.info("line %03d %s", n, "x" * 40)
    handler.flush()
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["tillsync.log", "tillsync.log.1", "tillsync.log.2"]
    assert "line 199" in (tmp_path / "logs" / "tillsync.log").read_text(encoding="utf-8")


def test_configuring_logging_twice_keeps_one_file_handler(tmp_path):
    winservice.configure_logging(tmp_path / "a")
    winservice.configure_logging(tmp_path / "b")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_tillsync_service", False)]
    assert len(ours) == 1


# ---------------------------------------------------------------- the host


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_a_service_stop_from_another_thread_stops_the_running_agent(tmp_path):
    port = free_port()
    ready, stopping, seen = threading.Event(), threading.Event(), {}

    def control_thread():
        if ready.wait(30):
            seen["health"] = _get_json(f"http://127.0.0.1:{port}/healthz")
        host.request_stop()

    host = ServiceHost({"ProgramData": str(tmp_path)},
                       settings=lambda: InstallSettings("store-042", f"127.0.0.1:{port}"),
                       on_ready=ready.set, on_stopping=stopping.set)
    thread = threading.Thread(target=control_thread)
    thread.start()
    started = time.monotonic()
    code = host.run()
    thread.join(10)
    assert code == winservice.EXIT_OK, host.failure
    assert seen["health"] == {"status": "ok"}
    assert stopping.is_set()
    assert time.monotonic() - started < 30
    log_text = (tmp_path / "tillsync" / "logs" / "tillsync.log").read_text(encoding="utf-8")
    assert "first start: wrote" in log_text
    assert "store-042" in (tmp_path / "tillsync" / "agent.toml").read_text(encoding="utf-8")


def test_a_stop_before_the_agent_is_up_still_stops_it(tmp_path):
    host = ServiceHost({"ProgramData": str(tmp_path)},
                       settings=lambda: InstallSettings(listen=f"127.0.0.1:{free_port()}"))
    host.request_stop()
    assert host.run() == winservice.EXIT_OK, host.failure


def test_a_bad_config_ends_the_service_with_the_config_exit_code_and_a_log_line(tmp_path):
    directory = tmp_path / "tillsync"
    directory.mkdir()
    (directory / "agent.toml").write_text('[store]\nid = "store-042"\nbogus = 1\n')
    ready = threading.Event()
    host = ServiceHost({"ProgramData": str(tmp_path)}, settings=InstallSettings,
                       on_ready=ready.set)
    assert host.run() == winservice.EXIT_CONFIG
    assert not ready.is_set()
    assert host.failure is not None and "store.bogus" in host.failure
    log_text = (directory / "logs" / "tillsync.log").read_text(encoding="utf-8")
    assert "configuration unusable" in log_text


def test_the_service_host_hands_serve_the_stop_event_it_sets(tmp_path):
    calls: list[object] = []

    async def fake_serve(config, *, stop, notifier):
        calls.append(config.store.id)
        notifier.ready("listening")
        await stop.wait()

    host = ServiceHost({"ProgramData": str(tmp_path)},
                       settings=lambda: InstallSettings("store-7"), serve=fake_serve,
                       on_ready=lambda: host.request_stop())
    assert host.run() == winservice.EXIT_OK
    assert calls == ["store-7"]


def test_settings_are_read_from_the_registry_only_on_windows():
    if sys.platform != "win32":
        assert winservice.read_install_settings() == InstallSettings()


def test_the_agent_runs_on_the_service_managers_thread_not_the_main_one(tmp_path):
    port, result = free_port(), {}
    host = ServiceHost({"ProgramData": str(tmp_path)},
                       settings=lambda: InstallSettings(listen=f"127.0.0.1:{port}"),
                       on_ready=lambda: host.request_stop())
    thread = threading.Thread(target=lambda: result.setdefault("code", host.run()))
    thread.start()
    thread.join(30)
    assert result.get("code") == winservice.EXIT_OK, host.failure
