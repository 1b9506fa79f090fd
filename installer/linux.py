"""Install, upgrade and remove tillsync on a systemd Linux (Debian 12, Raspberry Pi OS Bookworm).

Run from a checkout or an unpacked release, as root::

    python3 -m installer.linux [--wheel PATH | --wheelhouse DIR] [--no-start]
    python3 -m installer.linux --upgrade [--wheel PATH | --wheelhouse DIR]
    python3 -m installer.linux --uninstall [--purge]

What goes where (``--root DIR`` puts every path under DIR, for tests and image builds):

=================================================  ===============================  ==========
path                                               what                             owner mode
=================================================  ===============================  ==========
/opt/tillsync/venv                                 the code (a virtualenv)          root  0755
/opt/tillsync/install-manifest.json                what this installer did          root  0644
/etc/tillsync/agent.toml                           config, from ``tillsync init``   root:U 0640
/etc/tillsync/outbox.key                           the outbox key                   U:U   0600
/var/lib/tillsync/                                 the queue (outbox.db)            U:U   0700
/etc/systemd/system/tillsync.service               the unit (systemd/)              root  0644
=================================================  ===============================  ==========

Running it again changes nothing ("nothing to do"). ``--upgrade`` replaces the code, keeps
config, key and queue, opens and closes the outbox with the new code (its schema migration)
and restarts. ``--uninstall`` removes code and unit and keeps /etc/tillsync and
/var/lib/tillsync; ``--purge`` removes those too.

Under ``--root`` nothing outside DIR is touched: no user is created, no owner is changed and
systemctl is not called; the owners the live install would set are recorded in the manifest
instead. A virtualenv built there has DIR in its script paths, so a staged tree is for
inspection and tests, not for copying onto a machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

REPO = Path(__file__).resolve().parent.parent
UNIT_SOURCE = REPO / "systemd" / "tillsync.service"
DOCS_SOURCE = REPO / "docs" / "install.md"

OPT = PurePosixPath("/opt/tillsync")
VENV = OPT / "venv"
MANIFEST = OPT / "install-manifest.json"
DOCS = OPT / "docs" / "install.md"
ETC = PurePosixPath("/etc/tillsync")
CONFIG = ETC / "agent.toml"
KEY = ETC / "outbox.key"
STATE = PurePosixPath("/var/lib/tillsync")
DATABASE = STATE / "outbox.db"
UNIT_NAME = "tillsync.service"
UNIT = PurePosixPath("/etc/systemd/system") / UNIT_NAME
DROPINS = PurePosixPath("/etc/systemd/system") / f"{UNIT_NAME}.d"
WANTS = PurePosixPath("/etc/systemd/system/multi-user.target.wants") / UNIT_NAME
CREDSTORE = PurePosixPath("/etc/credstore")
CREDSTORE_ENCRYPTED = PurePosixPath("/etc/credstore.encrypted")
MIN_PYTHON = (3, 11)
PIP_TIMEOUT_S = 900
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

# Opens and closes the outbox with the newly installed code: Outbox.open brings the schema
# up to date; the lock refuses to run beside a live agent (one writer, CONTRACT §8).
# Every interpreter of the venv runs with -P and cwd "/": a checkout in the current directory
# (tillsync.egg-info, agent/, outbox/) would otherwise shadow the installed code.
MIGRATE = """\
import asyncio, sys
from pathlib import Path
import outbox
from agent.lockfile import LockHeld, exclusive
from outbox.store import Outbox

if not Path(outbox.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
    raise SystemExit(f"imported {outbox.__file__}, not the code in {sys.prefix}")

async def migrate(db, key):
    box = await Outbox.open(db, key)
    try:
        problems = await box.verified()
    finally:
        await box.close()
    if problems:
        raise SystemExit(f"{db} failed its integrity check: {problems[0]}")

try:
    with exclusive(Path(sys.argv[1])):
        asyncio.run(migrate(sys.argv[1], sys.argv[2]))
except LockHeld as err:
    raise SystemExit(f"{err}; stop it first (systemctl stop tillsync)") from None
except Exception as err:
    raise SystemExit(f"{type(err).__name__}: {err}") from None
"""


class InstallError(Exception):
    """A step failed; the message says what, why and what to do, on one line."""


@dataclass(frozen=True)
class Wheel:
    """The tillsync wheel to install, and how pip should find its dependencies."""

    path: Path
    version: str
    build: str  # sha256 of the wheel's RECORD: same files, same build; timestamps ignored
    pip_source: tuple[str, ...]  # extra pip arguments (offline wheelhouse)


@dataclass(frozen=True)
class Owner:
    """Who should own a path on the live system, and its mode."""

    user: str
    group: str
    mode: int


@dataclass
class Installer:
    """One run of the installer against a root directory ("/" for the live system)."""

    root: Path
    user: str
    no_start: bool = False
    wheel_arg: Path | None = None
    wheelhouse: Path | None = None
    changes: list[str] = field(default_factory=list)
    _temp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def live(self) -> bool:
        """True when installing onto this machine rather than into a staging root."""
        return self.root == Path("/")

    def at(self, path: PurePosixPath) -> Path:
        """Return ``path`` inside the root."""
        return self.root / path.relative_to("/")

    # -- output --------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """Print a progress line."""
        print(f"tillsync-install: {message}", flush=True)

    def changed(self, message: str) -> None:
        """Report a change made to the system."""
        self.changes.append(message)
        self.say(message)

    # -- the three commands --------------------------------------------------------------

    def install(self) -> None:
        """Install, or repair what is missing; change nothing that is already right."""
        self._preflight()
        self._check_config()
        manifest = self._read_manifest()
        self._ensure_user(manifest)
        self._ensure_directories()
        wheel = self._wheel()
        if manifest.get("build") == wheel.build and self._installed_version() == wheel.version:
            self.say(f"code: tillsync {wheel.version} is installed (same build)")
        elif self._installed_version() is None:
            self._ensure_venv()
            self._pip_install(wheel, replace=False)
            self.changed(f"installed tillsync {wheel.version} into {self.at(VENV)}")
        else:
            self.say(f"code: tillsync {self._installed_version()} is installed and differs from"
                     f" {wheel.path.name}; run with --upgrade to replace it")
            wheel = self._installed_wheel(manifest, wheel)
        self._ensure_docs()
        self._ensure_config()
        unit_changed = self._ensure_unit()
        self._write_manifest(manifest, wheel)
        self._activate(unit_changed, restart=False)
        self._finish("installed")

    def upgrade(self) -> None:
        """Replace the code, keep config, key and queue, migrate the outbox, restart."""
        self._preflight()
        manifest = self._read_manifest()
        if self._installed_version() is None:
            raise InstallError(f"tillsync is not installed in {self.at(VENV)}; "
                               "run without --upgrade to install it")
        self._check_config()
        self._ensure_user(manifest)
        self._ensure_directories()
        wheel = self._wheel()
        same = manifest.get("build") == wheel.build and self._installed_version() == wheel.version
        was_active = self._systemctl_query("is-active") == "active"
        if same:
            self.say(f"code: tillsync {wheel.version} is installed (same build)")
        else:
            if was_active:
                self._systemctl("stop", UNIT_NAME)
                self.changed("stopped tillsync")
            old = self._installed_version()
            self._pip_install(wheel, replace=True)
            self.changed(f"upgraded tillsync {old} -> {wheel.version}")
        self._ensure_docs()
        self._ensure_config()
        if not same:
            self._migrate()
        unit_changed = self._ensure_unit()
        self._write_manifest(manifest, wheel)
        self._activate(unit_changed, restart=not same and was_active)
        self._finish("upgraded")

    def uninstall(self, *, purge: bool) -> None:
        """Remove code and unit; keep config, key and queue unless ``purge``."""
        self._require_root_privileges()
        manifest = self._read_manifest()
        if self.at(UNIT).exists() or self.at(WANTS).is_symlink():
            if self.live and self._systemd_running():
                self._systemctl("disable", "--now", UNIT_NAME)
                self.changed("stopped and disabled tillsync")
            for path in (self.at(WANTS), self.at(UNIT)):
                if path.is_symlink() or path.exists():
                    path.unlink()
                    self.changed(f"removed {path}")
            if self.live and self._systemd_running():
                self._systemctl("daemon-reload")
        if self.at(OPT).exists():
            shutil.rmtree(self.at(OPT))
            self.changed(f"removed {self.at(OPT)} (code)")
        data = [self.at(ETC), self.at(STATE), self.at(DROPINS)]
        credentials = sorted([*self.at(CREDSTORE).glob("tillsync.*"),
                              *self.at(CREDSTORE_ENCRYPTED).glob("tillsync.*")])
        if purge:
            for path in [*data, *credentials]:
                if path.is_dir():
                    shutil.rmtree(path)
                    self.changed(f"removed {path}")
                elif path.exists():
                    path.unlink()
                    self.changed(f"removed {path}")
            if self.live and manifest.get("created_user") and _user_exists(self.user):
                self._run(["userdel", self.user], what=f"remove user {self.user}")
                self.changed(f"removed user {self.user}")
        else:
            kept = [str(path) for path in data if path.exists()]
            if kept:
                self.say(f"kept {', '.join(kept)} (config, key, queue); --purge removes them")
        if not self.changes:
            self.say("nothing to do: tillsync is not installed")
        else:
            self.say("done: tillsync removed" + (" with its data" if purge else ""))

    # -- checks --------------------------------------------------------------------------

    def _require_root_privileges(self) -> None:
        if self.live and os.geteuid() != 0:
            raise InstallError("installing into / needs root: run it with sudo, or use --root DIR"
                               " to stage into a directory")

    def _preflight(self) -> None:
        self._require_root_privileges()
        if sys.version_info < MIN_PYTHON:
            raise InstallError(f"Python {sys.version.split()[0]} is too old: tillsync needs 3.11+"
                               " (Debian 12 and Raspberry Pi OS Bookworm ship 3.11)")
        if not UNIT_SOURCE.is_file():
            raise InstallError(f"{UNIT_SOURCE} is missing: run the installer from a full tillsync"
                               " checkout or release")
        if self.live and not _user_exists(self.user) and shutil.which("useradd") is None:
            raise InstallError("useradd not found: install the Debian package passwd")
        if self.live and not self._systemd_running():
            self.say("note: systemd is not running here; the unit is enabled but not started")

    # -- user and directories -------------------------------------------------------------

    def _ensure_user(self, manifest: dict[str, Any]) -> None:
        if not self.live:
            if not manifest:
                self.say(f"staging root: not creating user {self.user} nor changing owners;"
                         f" the intended owners are in {self.at(MANIFEST)}")
            return
        if _user_exists(self.user):
            return
        self._run(["useradd", "--system", "--user-group", "--home-dir", str(STATE),
                   "--no-create-home", "--shell", "/usr/sbin/nologin",
                   "--comment", "tillsync agent", self.user], what=f"create user {self.user}")
        manifest["created_user"] = True
        self.changed(f"created system user {self.user}")

    def owners(self) -> dict[PurePosixPath, Owner]:
        """Return the owner and mode of every path the installer manages."""
        user = self.user
        return {
            OPT: Owner("root", "root", 0o755),
            VENV: Owner("root", "root", 0o755),
            ETC: Owner("root", user, 0o750),
            CONFIG: Owner("root", user, 0o640),
            KEY: Owner(user, user, 0o600),
            STATE: Owner(user, user, 0o700),
            UNIT: Owner("root", "root", 0o644),
        }

    def _ensure_directories(self) -> None:
        for directory in (OPT, ETC, STATE):
            path = self.at(directory)
            if not path.is_dir():
                path.mkdir(parents=True)
                path.chmod(self.owners()[directory].mode)
                self.changed(f"created {path}")
            self._ensure_owner(directory)

    def _ensure_owner(self, path: PurePosixPath) -> None:
        """Give ``path`` its mode (always) and its owner (on the live system only)."""
        want = self.owners()[path]
        real = self.at(path)
        st = real.lstat()
        if st.st_mode & 0o7777 != want.mode:
            real.chmod(want.mode)
            self.changed(f"set mode {want.mode:04o} on {real}")
        if self.live:
            uid, gid = pwd.getpwnam(want.user).pw_uid, _gid(want.group)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(real, uid, gid)
                self.changed(f"set owner {want.user}:{want.group} on {real}")

    # -- code ----------------------------------------------------------------------------

    def _python(self) -> Path:
        return self.at(VENV) / "bin" / "python"

    def _installed_version(self) -> str | None:
        python = self._python()
        if not python.exists():
            return None
        probe = "from importlib.metadata import version; print(version('tillsync'))"
        result = subprocess.run(  # noqa: S603  (our own virtualenv's interpreter)
            [str(python), "-P", "-c", probe], capture_output=True, text=True, check=False,
            timeout=60, cwd="/")
        return result.stdout.strip() if result.returncode == 0 else None

    def _ensure_venv(self) -> None:
        python = self._python()
        if python.exists() and subprocess.run(  # noqa: S603
                [str(python), "-P", "-c", "pass"], capture_output=True, check=False,
                timeout=60).returncode == 0:
            return
        if not _has_pip():
            self._ensure_ensurepip()
        # With pip at hand, the venv needs none of its own (pip --python drives it): 0.1 s
        # instead of 4 s, and no pip for anyone to run inside the service's environment.
        command = [sys.executable, "-m", "venv", "--clear"]
        if _has_pip():
            command.append("--without-pip")
        self._run([*command, str(self.at(VENV))], what=f"create the virtualenv {VENV}")
        self.changed(f"created virtualenv {self.at(VENV)}")

    def _ensure_ensurepip(self) -> None:
        if importlib.util.find_spec("ensurepip") is None:
            raise InstallError("this Python cannot create virtualenvs: apt-get install"
                               " python3-venv (or python3.11-venv)")

    def _pip(self) -> list[str]:
        if _has_pip():
            return [sys.executable, "-m", "pip", "--python", str(self._python())]
        return [str(self._python()), "-m", "pip"]

    def _pip_install(self, wheel: Wheel, *, replace: bool) -> None:
        base = [*self._pip(), "install", "--disable-pip-version-check", "--no-input",
                "--quiet", *wheel.pip_source]
        what = f"install {wheel.path.name}"
        if replace:
            # First the new build over the old one (same version or not), then whatever
            # dependencies it adds; dependencies that still fit are left as they are.
            self._run([*base, "--force-reinstall", "--no-deps", str(wheel.path)], what=what,
                      timeout=PIP_TIMEOUT_S)
        self._run([*base, str(wheel.path)], what=what, timeout=PIP_TIMEOUT_S)
        if self._installed_version() != wheel.version:
            raise InstallError(f"pip ran but tillsync {wheel.version} is not importable from"
                               f" {self.at(VENV)}; rerun with --upgrade")

    def _wheel(self) -> Wheel:
        if self.wheel_arg is not None:
            if not self.wheel_arg.is_file():
                raise InstallError(f"--wheel {self.wheel_arg}: no such file")
            return _describe_wheel(self.wheel_arg.resolve(), ())
        if self.wheelhouse is not None:
            found = sorted(self.wheelhouse.glob("tillsync-*.whl"), key=_wheel_sort_key)
            if not found:
                raise InstallError(f"--wheelhouse {self.wheelhouse}: no tillsync-*.whl in it")
            source = ("--no-index", "--find-links", str(self.wheelhouse.resolve()))
            return _describe_wheel(found[-1].resolve(), source)
        if not (REPO / "pyproject.toml").is_file():
            raise InstallError(f"no --wheel or --wheelhouse given and {REPO} is no source tree")
        self._temp = tempfile.TemporaryDirectory(prefix="tillsync-wheel-")
        self.say(f"building the wheel from {REPO}")
        pip = [sys.executable, "-m", "pip"] if _has_pip() else None
        if pip is None:
            raise InstallError("building from source needs pip: apt-get install python3-pip,"
                               " or pass --wheel/--wheelhouse")
        self._run([*pip, "wheel", "--disable-pip-version-check", "--quiet", "--no-deps",
                   "--wheel-dir", self._temp.name, str(REPO)], what="build the tillsync wheel",
                  timeout=PIP_TIMEOUT_S)
        return _describe_wheel(next(Path(self._temp.name).glob("tillsync-*.whl")), ())

    def _installed_wheel(self, manifest: dict[str, Any], offered: Wheel) -> Wheel:
        """Describe what stays installed when a different build was offered but not applied."""
        return Wheel(Path(manifest.get("wheel", offered.path.name)),
                     manifest.get("version", offered.version), manifest.get("build", ""), ())

    def _ensure_docs(self) -> None:
        if not DOCS_SOURCE.is_file():
            return
        target = self.at(DOCS)
        content = DOCS_SOURCE.read_bytes()
        if target.is_file() and target.read_bytes() == content:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, content, 0o644)
        self.changed(f"wrote {target}")

    # -- configuration -------------------------------------------------------------------

    def _check_config(self) -> None:
        """Refuse, before changing anything, a key or queue that lost its partner."""
        config, key, database = self.at(CONFIG), self.at(KEY), self.at(DATABASE)
        if config.exists() and not key.exists():
            raise InstallError(f"{config} exists but {key} does not: restore the key from"
                               " backup (a new key would make the queue unreadable)")
        if not config.exists() and key.exists():
            raise InstallError(f"{key} exists but {config} does not: restore agent.toml"
                               " from backup, or move the key away if it guards no queue")
        if not key.exists() and database.exists():
            raise InstallError(f"the queue {database} exists but its key {key} is missing:"
                               " restore outbox.key from backup; a new key would orphan"
                               " the queue")

    def _ensure_config(self) -> None:
        self._check_config()
        if not self.at(CONFIG).exists():
            self._init_config()
        self._ensure_owner(CONFIG)
        self._ensure_owner(KEY)

    def _init_config(self) -> None:
        directory = self.at(ETC)
        tillsync = self.at(VENV) / "bin" / "tillsync"
        result = self._run([str(tillsync), "init", "--dir", str(directory)],
                           what="write the configuration with `tillsync init`", cwd="/")
        for line in result.stdout.splitlines():
            print(f"    {line}", flush=True)
        # init names the files of the directory it wrote into; the service keeps its queue in
        # the state directory (/etc is read-only to it) and reads the key under its live path.
        config = self.at(CONFIG)
        text = config.read_text(encoding="utf-8")
        for old, new in ((directory / "outbox.db", DATABASE), (directory / "outbox.key", KEY)):
            quoted = f"= {json.dumps(str(old))}"
            if quoted not in text:
                raise InstallError(f"{config}: `tillsync init` did not write {old}; cannot point"
                                   " the config at the service's directories")
            text = text.replace(quoted, f"= {json.dumps(str(new))}")
        outbox = tomllib.loads(text).get("outbox", {})
        if (outbox.get("path"), outbox.get("key_file")) != (str(DATABASE), str(KEY)):
            raise InstallError(f"{config}: [outbox] path/key_file not as expected after init")
        _write_atomic(config, text.encode("utf-8"), 0o640)
        self.changed(f"wrote {config} and {self.at(KEY)} (new key: back it up, see"
                     " docs/install.md)")

    # -- systemd -------------------------------------------------------------------------

    def _unit_text(self) -> str:
        text = UNIT_SOURCE.read_text(encoding="utf-8")
        if self.user != "tillsync":
            text = re.sub(r"(?m)^User=tillsync$", f"User={self.user}", text)
            text = re.sub(r"(?m)^Group=tillsync$", f"Group={self.user}", text)
        return text

    def _ensure_unit(self) -> bool:
        unit = self.at(UNIT)
        text = self._unit_text().encode("utf-8")
        changed = False
        if not unit.is_file() or unit.read_bytes() != text:
            unit.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(unit, text, 0o644)
            self.changed(f"wrote {unit}")
            changed = True
        self._ensure_owner(UNIT)
        return changed

    def _activate(self, unit_changed: bool, *, restart: bool) -> None:
        if not self.live or not self._systemd_running():
            # What `systemctl enable` does for WantedBy=multi-user.target, without systemd.
            wants = self.at(WANTS)
            if not wants.is_symlink():
                wants.parent.mkdir(parents=True, exist_ok=True)
                wants.symlink_to(UNIT)
                self.changed(f"enabled {UNIT_NAME} ({wants})")
            return
        if unit_changed:
            self._systemctl("daemon-reload")
        if self._systemctl_query("is-enabled") != "enabled":
            self._systemctl("enable", UNIT_NAME)
            self.changed("enabled tillsync (starts at boot)")
        if self.no_start:
            return
        if restart or (unit_changed and self._systemctl_query("is-active") == "active"):
            self._systemctl("restart", UNIT_NAME)
            self.changed("restarted tillsync")
        elif self._systemctl_query("is-active") != "active":
            self._systemctl("start", UNIT_NAME)
            self.changed("started tillsync")

    def _systemd_running(self) -> bool:
        return Path("/run/systemd/system").is_dir()

    def _systemctl(self, *args: str) -> None:
        if shutil.which("systemctl") is None:
            raise InstallError("systemctl not found: this installer needs systemd")
        self._run(["systemctl", *args], what=f"systemctl {' '.join(args)}")

    def _systemctl_query(self, verb: str) -> str:
        if not self.live or not self._systemd_running() or shutil.which("systemctl") is None:
            return ""
        result = subprocess.run(["systemctl", verb, UNIT_NAME],  # noqa: S603, S607
                                capture_output=True, text=True, check=False, timeout=60)
        return result.stdout.strip()

    # -- upgrade -------------------------------------------------------------------------

    def _migrate(self) -> None:
        config = tomllib.loads(self.at(CONFIG).read_text(encoding="utf-8"))
        outbox = config.get("outbox", {})
        base = CONFIG.parent
        database = self._config_path(outbox.get("path", str(DATABASE)), base)
        key = self._config_path(outbox.get("key_file", str(KEY)), base)
        if not database.exists():
            self.say(f"no queue at {database} yet: nothing to migrate")
            return
        user: dict[str, Any] = {}
        if self.live:  # files the migration creates (WAL, lock) belong to the service user
            user = {"user": self.user, "group": self.user, "extra_groups": []}
        self._run([str(self._python()), "-P", "-c", MIGRATE, str(database), str(key)],
                  what=f"migrate the queue {database}", cwd="/", **user)
        self.changed(f"migrated the queue {database} (events kept)")

    def _config_path(self, value: str, base: PurePosixPath) -> Path:
        path = PurePosixPath(value)
        return self.at(path if path.is_absolute() else base / path)

    # -- manifest ------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        path = self.at(MANIFEST)
        try:
            data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise InstallError(f"{path} is unreadable ({err}): remove it and run again") from err
        return data

    def _write_manifest(self, manifest: dict[str, Any], wheel: Wheel) -> None:
        data = {
            "version": wheel.version,
            "wheel": wheel.path.name,
            "build": wheel.build,
            "user": self.user,
            "created_user": bool(manifest.get("created_user")),
            "owners_applied": self.live,
            "paths": {str(path): {"owner": owner.user, "group": owner.group,
                                  "mode": f"{owner.mode:04o}"}
                      for path, owner in self.owners().items()},
        }
        text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        path = self.at(MANIFEST)
        if path.is_file() and path.read_bytes() == text:
            return
        _write_atomic(path, text, 0o644)
        manifest.clear()
        manifest.update(data)
        self.changed(f"wrote {path}")

    # -- helpers -------------------------------------------------------------------------

    def _finish(self, verb: str) -> None:
        if not self.changes:
            self.say("nothing to do: tillsync is installed and configured")
            return
        started = self.live and self._systemd_running() and not self.no_start
        after = "" if started else "; start it with `systemctl start tillsync`"
        self.say(f"done: tillsync {verb}{after}. Logs: journalctl -u tillsync")

    def _run(self, command: Sequence[str], *, what: str, timeout: float = 300,
             **kwargs: Any) -> subprocess.CompletedProcess[str]:
        try:
            result = subprocess.run(list(command), capture_output=True, text=True,  # noqa: S603
                                    check=False, timeout=timeout, **kwargs)
        except (OSError, subprocess.SubprocessError) as err:
            raise InstallError(f"could not {what}: {err}") from err
        if result.returncode != 0:
            raise InstallError(f"could not {what}: {_last_line(result)}")
        return result

    def cleanup(self) -> None:
        """Remove the temporary wheel build, if any."""
        if self._temp is not None:
            self._temp.cleanup()


def _describe_wheel(path: Path, pip_source: tuple[str, ...]) -> Wheel:
    match = re.fullmatch(r"tillsync-([^-]+)-.+\.whl", path.name)
    if not match:
        raise InstallError(f"{path} is not a tillsync wheel (tillsync-<version>-...whl)")
    version = match.group(1)
    try:
        with zipfile.ZipFile(path) as archive:
            record = archive.read(f"tillsync-{version}.dist-info/RECORD")
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise InstallError(f"{path} is not a readable wheel: {err}") from err
    return Wheel(path, version, hashlib.sha256(record).hexdigest(), pip_source)


def _wheel_sort_key(path: Path) -> tuple[int, ...]:
    version = path.name.split("-")[1]
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def _has_pip() -> bool:
    """Return True when this interpreter has a pip that can drive another (--python, 22.3+)."""
    if importlib.util.find_spec("pip") is None:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (22, 3)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid


def _write_atomic(path: Path, content: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists():
        st = path.stat()
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)  # keep the owner a live install set
    os.replace(tmp, path)


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines()
             if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"exit status {result.returncode}"])[-1]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; its --help is the installer's reference."""
    parser = argparse.ArgumentParser(
        prog="python -m installer.linux",
        description="Install tillsync as a systemd service: a system user, a virtualenv under"
                    " /opt/tillsync, /etc/tillsync/agent.toml and outbox.key (from `tillsync"
                    " init`, kept if present), the queue in /var/lib/tillsync and the hardened"
                    " unit. Running it again changes nothing.",
        epilog="Full guide: docs/install.md.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel", type=Path, metavar="PATH",
                        help="install this tillsync wheel (dependencies from the package index)")
    source.add_argument("--wheelhouse", type=Path, metavar="DIR",
                        help="install offline from a directory of wheels: tillsync and every"
                             " dependency (pip download/wheel them on a connected machine)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--upgrade", action="store_true",
                        help="replace the code; keep config, key and queue; migrate; restart")
    action.add_argument("--uninstall", action="store_true",
                        help="remove code and unit; keep /etc/tillsync and /var/lib/tillsync")
    parser.add_argument("--purge", action="store_true",
                        help="with --uninstall: also remove config, key, queue and the user")
    parser.add_argument("--no-start", action="store_true",
                        help="enable the service but do not start or restart it")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="install under DIR (staging, tests); never touches users or"
                             " systemctl; owners go to the manifest")
    parser.add_argument("--user", default="tillsync",
                        help="the service's system user (default tillsync)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the installer; exit status 0 done, 1 failed, 2 bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.purge and not args.uninstall:
        parser.error("--purge only goes with --uninstall")
    if not USER_NAME.fullmatch(args.user):
        parser.error(f"--user {args.user!r} is no valid user name ([a-z_][a-z0-9_-]*)")
    installer = Installer(root=args.root.resolve(), user=args.user, no_start=args.no_start,
                          wheel_arg=args.wheel, wheelhouse=args.wheelhouse)
    try:
        if args.uninstall:
            installer.uninstall(purge=args.purge)
        elif args.upgrade:
            installer.upgrade()
        else:
            installer.install()
    except InstallError as err:
        print(f"tillsync-install: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tillsync-install: error: {err.filename or ''}: {err.strerror or err}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tillsync-install: interrupted; run it again to finish", file=sys.stderr)
        return 130
    finally:
        installer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
