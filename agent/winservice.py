r"""The Windows service host: ``tillsync`` as a service run by pywin32's pythonservice.exe.

How it runs (installer/windows/tillsync.wxs sets all of this up):

- The service's executable is ``<install>\\lib\\win32\\pythonservice.exe``; it reads the
  class to host from ``HKLM\\SYSTEM\\CurrentControlSet\\Services\\tillsync\\PythonClass``
  (:data:`PYTHON_CLASS`) and calls its ``SvcRun`` on a thread of its own.
- :class:`ServiceHost` does the work and is plain Python: logging to a rotating file under
  ``%ProgramData%\\tillsync\\logs``, writing agent.toml at the first start from the msiexec
  properties (``HKLM\\SOFTWARE\\tillsync\\Setup``), then ``agent.runtime.serve`` until the
  service manager says stop, which sets the asyncio stop event from the control thread.
- The service reports RUNNING only once the API listens; a bad config makes it stop with a
  service-specific exit code (2 config, 1 other) instead of hanging in START_PENDING, and
  ``sc failure``/``sc failureflag`` (set by the MSI) make Windows restart it.

pywin32 is imported only when the service class is asked for (``TillsyncService``, through
the module ``__getattr__``), so everything else here imports and is tested on Linux.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import logging.handlers
import os
import re
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import quiet_libraries
from agent.sdnotify import Notifier

SERVICE_NAME = "tillsync"
DISPLAY_NAME = "tillsync POS sync agent"
DESCRIPTION = ("Takes sales from the tills, keeps them in an encrypted outbox and forwards them"
               " to the cloud.")
SERVICE_ACCOUNT = r"NT AUTHORITY\LocalService"
PYTHON_CLASS = "agent.winservice.TillsyncService"
SERVICE_EXE = r"lib\win32\pythonservice.exe"
SETUP_KEY = r"SOFTWARE\tillsync\Setup"  # HKLM; written by the MSI from its properties
LOG_NAME = "tillsync.log"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# Restart after 5 s, 30 s, then every 60 s; the failure count resets after a quiet day.
RECOVERY_RESET_S = 86400
RECOVERY_DELAYS_MS = (5000, 30000, 60000)
# Service-specific exit codes, shown by `sc query tillsync` as SERVICE_EXIT_CODE.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# Well-known SIDs, so the ACL is right on every Windows language.
SID_SYSTEM, SID_ADMINISTRATORS, SID_LOCAL_SERVICE = "S-1-5-18", "S-1-5-32-544", "S-1-5-19"

log = logging.getLogger(__name__)
Serve = Callable[..., Coroutine[Any, Any, None]]


# ---------------------------------------------------------------- places


def data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    r"""Return %ProgramData%\tillsync: config, key, queue and logs."""
    return Path(environ.get("ProgramData") or environ.get("PROGRAMDATA") or r"C:\ProgramData",
                "tillsync")


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    r"""Return the service's agent.toml: $TILLSYNC_CONFIG, else %ProgramData%\tillsync."""
    from agent.config import ENV_CONFIG

    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return data_dir(environ) / "agent.toml"


def log_dir(environ: Mapping[str, str] = os.environ) -> Path:
    r"""Return %ProgramData%\tillsync\logs."""
    return data_dir(environ) / "logs"


# ---------------------------------------------------------------- command lines


def msi_command_line(argv: Sequence[str]) -> str:
    """Join ``argv`` into one Windows command line; quote arguments that may hold spaces."""
    # An MSI property such as [DATADIR] may expand to a path with spaces: always quote it.
    parts = []
    for arg in argv:
        if arg == "" or any(c in arg for c in ' \t"['):
            if '"' in arg:
                raise ValueError(f"argument holds a double quote: {arg!r}")
            parts.append(f'"{arg}"')
        else:
            parts.append(arg)
    return " ".join(parts)


def image_path(install_dir: str) -> str:
    """Return the service's command line (ImagePath) for an install folder."""
    return msi_command_line([_join(install_dir, SERVICE_EXE)])


def python_class(install_dir: str) -> str:
    """Return the PythonClass value: the lib folder, a backslash, the dotted class."""
    return _join(install_dir, "lib") + "\\" + PYTHON_CLASS


def acl_command(folder: str) -> list[str]:
    """Return icacls arguments: SYSTEM and Administrators full, LocalService modify, no others."""
    return [folder, "/inheritance:r", "/grant:r",
            f"*{SID_SYSTEM}:(OI)(CI)F", f"*{SID_ADMINISTRATORS}:(OI)(CI)F",
            f"*{SID_LOCAL_SERVICE}:(OI)(CI)M", "/T", "/C", "/Q"]


def recovery_commands() -> list[list[str]]:
    """Return the sc.exe arguments that make Windows restart the service after a failure."""
    actions = "/".join(f"restart/{delay}" for delay in RECOVERY_DELAYS_MS)
    return [["failure", SERVICE_NAME, "reset=", str(RECOVERY_RESET_S), "actions=", actions],
            # Also when the service stops itself with a non-zero exit code (bad config).
            ["failureflag", SERVICE_NAME, "1"]]


def _join(folder: str, rel: str) -> str:
    # MSI folder properties end in a backslash ("[INSTALLDIR]lib"); plain paths may not.
    return folder + rel if folder.endswith(("\\", "]")) else folder + "\\" + rel


# ---------------------------------------------------------------- first start


@dataclass(frozen=True)
class InstallSettings:
    """The msiexec properties that go into agent.toml at the first start."""

    store_id: str | None = None
    listen: str | None = None
    sink_url: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> InstallSettings:
        """Read StoreId, Listen and SinkUrl; missing or blank ones stay None."""
        def pick(key: str) -> str | None:
            value = values.get(key)
            return value.strip() or None if isinstance(value, str) else None

        return cls(pick("StoreId"), pick("Listen"), pick("SinkUrl"))


def read_install_settings() -> InstallSettings:
    r"""Read HKLM\SOFTWARE\tillsync\Setup (Windows only; elsewhere nothing is set)."""
    try:
        import winreg
    except ImportError:
        return InstallSettings()
    values: dict[str, object] = {}
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, SETUP_KEY) as key:  # type: ignore[attr-defined,unused-ignore]
            for name in ("StoreId", "Listen", "SinkUrl"):
                try:
                    values[name] = winreg.QueryValueEx(key, name)[0]  # type: ignore[attr-defined,unused-ignore]
                except OSError:
                    continue
    except OSError:
        return InstallSettings()
    return InstallSettings.from_mapping(values)


def apply_settings(text: str, settings: InstallSettings) -> str:
    """Return agent.toml text from ``tillsync init`` with the install settings put in."""
    from agent.configdoc import toml_string

    replace = {("[store]", "id"): settings.store_id, ("[api]", "listen"): settings.listen}
    lines, section = [], ""
    for line in text.splitlines():
        if re.match(r"^\[\[?[A-Za-z0-9_.]+\]\]?\s*$", line):
            section = line.strip()
        key = re.match(r"^([A-Za-z_]+) = ", line)
        value = replace.get((section, key.group(1))) if key else None
        lines.append(f"{key.group(1)} = {toml_string(value)}" if key and value else line)
    out = "\n".join(lines) + "\n"
    if settings.sink_url:
        out += ("\n# Added by the installer (SINK_URL). Give the sink its token with"
                ' token_file = "cloud_token"\n# (a file beside this one), then restart the'
                " service.\n[[sinks]]\n"
                f'name = "cloud"\ntype = "webhook"\nurl = {toml_string(settings.sink_url)}\n')
    return out


def ensure_config(directory: Path, settings: InstallSettings) -> Path | None:
    """Write agent.toml and a new key at the first start; None when a config already exists."""
    from agent.config import ConfigError, parse_config
    from agent.init import CONFIG_NAME, init_setup

    path = directory / CONFIG_NAME
    if path.exists():
        return None
    result = init_setup(directory)
    text = apply_settings(result.config_path.read_text(encoding="utf-8"), settings)
    try:
        parse_config(text, source=str(path), base_dir=directory, environ={})
    except ConfigError:
        # Nothing is encrypted under the new key yet: leave no half-made setup behind.
        result.config_path.unlink(missing_ok=True)
        result.key_path.unlink(missing_ok=True)
        raise
    temp = path.with_name(path.name + ".new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return path


# ---------------------------------------------------------------- logging


def configure_logging(directory: Path, level: str = "INFO", *, max_bytes: int = LOG_MAX_BYTES,
                      backups: int = LOG_BACKUPS) -> logging.Handler:
    """Send the root logger to a rotating file in ``directory``; return the handler."""
    directory.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        directory / LOG_NAME, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_tillsync_service", False)]:
        root.removeHandler(old)
        old.close()
    handler._tillsync_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_libraries(level)
    return handler


# ---------------------------------------------------------------- the host


class _CallbackNotifier(Notifier):
    """Tell the service manager, instead of systemd, that the agent is ready or stopping."""

    def __init__(self, on_ready: Callable[[], None], on_stopping: Callable[[], None]) -> None:
        super().__init__(environ={})
        self._on_ready, self._on_stopping = on_ready, on_stopping

    def ready(self, status: str) -> None:
        """Report that the API listens."""
        log.info("service ready: %s", status)
        self._on_ready()

    def stopping(self, status: str = "stopping") -> None:
        """Report that a graceful stop began."""
        self._on_stopping()


class ServiceHost:
    """Run the agent for the service manager; ``request_stop`` may come from any thread."""

    def __init__(self, environ: Mapping[str, str] = os.environ, *,
                 settings: Callable[[], InstallSettings] = read_install_settings,
                 on_ready: Callable[[], None] = lambda: None,
                 on_stopping: Callable[[], None] = lambda: None,
                 serve: Serve | None = None) -> None:
        self.environ = environ
        self._settings = settings
        self._on_ready, self._on_stopping = on_ready, on_stopping
        self._serve = serve
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self.failure: str | None = None

    def request_stop(self) -> None:
        """Set the agent's stop event (thread-safe; before the start it stops the start)."""
        with self._lock:
            self._stop_requested = True
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)

    def run(self) -> int:
        """Prepare, run the agent until stopped and return a service exit code."""
        from agent.config import ConfigError, load_config

        handler = configure_logging(log_dir(self.environ))
        path = config_path(self.environ)
        try:
            if ensure_config(path.parent, self._settings()) is not None:
                log.info("first start: wrote %s and a new outbox key", path)
            config = load_config(path)
            handler.setLevel(config.logging.level.upper())
            logging.getLogger().setLevel(config.logging.level.upper())
            asyncio.run(self._main(config))
        except ConfigError as err:
            self.failure = f"configuration unusable: {err}"
            log.error("%s (fix %s, then start the service)", self.failure, path)
            return EXIT_CONFIG
        except Exception as err:
            self.failure = f"{type(err).__name__}: {err}"
            log.exception("the agent stopped on an error")
            return EXIT_FAILED
        return EXIT_OK

    async def _main(self, config: Any) -> None:
        serve = self._serve
        if serve is None:
            from agent.runtime import serve as serve_agent

            serve = serve_agent
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            if self._stop_requested:
                stop.set()
        try:
            await serve(config, stop=stop,
                        notifier=_CallbackNotifier(self._on_ready, self._on_stopping))
        finally:
            with self._lock:
                self._loop = self._stop = None


# ---------------------------------------------------------------- pywin32 (Windows only)


@functools.cache
def _service_class() -> type:
    """Build the pywin32 service class; imports pywin32 (Windows only)."""
    import servicemanager  # type: ignore[import-not-found,unused-ignore]
    import win32service  # type: ignore[import-not-found,unused-ignore]
    import win32serviceutil  # type: ignore[import-not-found,unused-ignore]

    class TillsyncService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        """The tillsync Windows service."""

        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.host = ServiceHost(
                on_ready=lambda: self.ReportServiceStatus(win32service.SERVICE_RUNNING),
                on_stopping=lambda: self.ReportServiceStatus(
                    win32service.SERVICE_STOP_PENDING, waitHint=30000))

        def SvcStop(self) -> None:  # pywin32 names these
            """Stop: report STOP_PENDING and set the agent's stop event."""
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=30000)
            self.host.request_stop()

        def SvcRun(self) -> None:  # pywin32 names these
            """Run; RUNNING is reported once the API listens, not before."""
            self.ReportServiceStatus(win32service.SERVICE_START_PENDING, waitHint=30000)
            code = self.host.run()
            if code != EXIT_OK:
                servicemanager.LogErrorMsg(f"tillsync: {self.host.failure}")
                # An exception makes pythonservice.exe report STOPPED with an error code,
                # which (with `sc failureflag tillsync 1`) triggers the recovery actions.
                raise RuntimeError(self.host.failure or f"exit code {code}")
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)

    return TillsyncService


def __getattr__(name: str) -> Any:
    if name == "TillsyncService":
        return _service_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
