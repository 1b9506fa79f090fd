"""The Linux installer, run for real into a staging root (``--root tmp_path``).

Speed. The tillsync wheel is built once per session (``pip wheel . --no-deps``, ~3 s). Each
install then creates a real virtualenv and pip-installs that wheel into it, exactly as on a
store PC, except for the dependencies: downloading and installing aiohttp, cryptography,
pydantic ... into every staged venv would cost ~30 s per install and need the network. So the
installer runs with ``PYTHONPATH`` pointing at a directory of symlinks to the dependencies
already installed in the test virtualenv (everything but tillsync itself, pip and
setuptools). pip sees the requirements as satisfied and installs only the tillsync wheel;
the installed ``tillsync`` and the migration then import tillsync from the staged venv and
its dependencies from that directory. ``--system-site-packages`` would not do: a venv made
from the test venv's interpreter sees the base interpreter's site-packages, not the test
venv's. The installer code runs unchanged; only the environment differs.

Owners are not applied under ``--root`` (no service user exists here): the tests check the
modes on disk and the owners recorded in the manifest.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer import linux
from outbox.models import NewEvent
from outbox.store import Outbox

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "tillsync.service"
SKIP_FOR_FARM = {"pip", "setuptools", "_distutils_hack", "__pycache__", "tests", "docs",
                 "agent", "outbox", "drivers", "installer"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tillsync wheel from this checkout, once."""
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(REPO)],
                   check=True, timeout=300)
    assert len(list(out.glob("tillsync-*.whl"))) == 1
    return out


@pytest.fixture(scope="session")
def wheel(wheelhouse: Path) -> Path:
    return next(wheelhouse.glob("tillsync-*.whl"))


@pytest.fixture(scope="session")
def newer_wheelhouse(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same code repacked as the next version: what an upgrade installs."""
    out = tmp_path_factory.mktemp("wheelhouse-next")
    repack(wheel, out, "0.1.0", "99.0.0")
    return out


@pytest.fixture(scope="session")
def deps_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of symlinks to the test venv's installed dependencies, minus tillsync."""
    farm = tmp_path_factory.mktemp("deps")
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    for entry in site.iterdir():
        name = entry.name
        if (name in SKIP_FOR_FARM or name.startswith(("tillsync", "__editable__", "pip-",
                                                      "setuptools-"))
                or name.endswith(".pth")):
            continue
        (farm / name).symlink_to(entry.resolve())
    return farm


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def run(root: Path, deps_path: Path, *args: str | Path,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(deps_path)}
    env.pop("TILLSYNC_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "installer.linux", "--root", str(root),
                             *map(str, args)], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def repack(wheel: Path, out: Path, old: str, new: str) -> Path:
    """Write ``wheel`` again as version ``new``, with a RECORD that matches."""
    target = out / wheel.name.replace(f"-{old}-", f"-{new}-")
    old_info, new_info = f"tillsync-{old}.dist-info/", f"tillsync-{new}.dist-info/"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            name = item.filename.replace(old_info, new_info)
            if name == new_info + "RECORD":
                continue
            data = src.read(item)
            if name == new_info + "METADATA":
                data = data.replace(f"Version: {old}".encode(), f"Version: {new}".encode())
            dst.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{name},sha256={digest.decode()},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        dst.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    return target


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root: mode, mtime and content hash (or link target)."""
    listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = "-> " + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            listing[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return listing


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def manifest(root: Path) -> dict:
    return json.loads((root / "opt/tillsync/install-manifest.json").read_text())


async def append_sale(db: Path, key: Path) -> int:
    box = await Outbox.open(db, key)
    try:
        appended = await box.append(NewEvent(stream="T01", kind="transaction",
                                             payload=b'{"transaction_id": "T01-1"}',
                                             sinks=("cloud",), idempotency_key="key-1"))
    finally:
        await box.close()
    return appended.event_id


async def read_payload(db: Path, key: Path, event_id: int) -> bytes | None:
    box = await Outbox.open(db, key)
    try:
        record = await box.read(event_id)
    finally:
        await box.close()
    return None if record is None else record.payload


@pytest.fixture
def installed(root: Path, deps_path: Path, wheel: Path) -> Iterator[Path]:
    run(root, deps_path, "--wheel", wheel)
    yield root


# ---------------------------------------------------------------- install


def test_install_lays_out_code_config_key_queue_and_unit_with_their_modes(
        root: Path, deps_path: Path, wheel: Path) -> None:
    result = run(root, deps_path, "--wheel", wheel)
    out = result.stdout
    assert "not creating user tillsync" in out
    assert "status token" in out  # tillsync init shows the tokens once
    assert result.stderr == ""

    venv_tillsync = root / "opt/tillsync/venv/bin/tillsync"
    assert os.access(venv_tillsync, os.X_OK)
    version = subprocess.run([venv_tillsync, "--version"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(deps_path)}, check=True)
    assert version.stdout.strip() == "tillsync 0.1.0"

    assert mode(root / "etc/tillsync") == 0o750
    assert mode(root / "etc/tillsync/agent.toml") == 0o640
    assert mode(root / "etc/tillsync/outbox.key") == 0o600
    assert mode(root / "var/lib/tillsync") == 0o700
    assert mode(root / "etc/systemd/system/tillsync.service") == 0o644
    assert (root / "etc/systemd/system/tillsync.service").read_bytes() == UNIT.read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/tillsync.service"
    assert os.readlink(wants) == "/etc/systemd/system/tillsync.service"

    owners = manifest(root)["paths"]
    assert owners["/etc/tillsync/outbox.key"] == {"owner": "tillsync", "group": "tillsync",
                                                  "mode": "0600"}
    assert owners["/etc/tillsync/agent.toml"] == {"owner": "root", "group": "tillsync",
                                                  "mode": "0640"}
    assert owners["/etc/tillsync"]["group"] == "tillsync"
    assert owners["/var/lib/tillsync"] == {"owner": "tillsync", "group": "tillsync",
                                           "mode": "0700"}
    assert manifest(root)["owners_applied"] is False
    assert manifest(root)["version"] == "0.1.0"


def test_the_written_config_points_at_the_live_queue_and_key_and_validates(
        installed: Path) -> None:
    from agent.config import parse_config

    text = (installed / "etc/tillsync/agent.toml").read_text()
    assert str(installed) not in text  # no staging path leaks into the config
    config = parse_config(text, source="agent.toml", base_dir=Path("/etc/tillsync"))
    assert str(config.outbox.path) == "/var/lib/tillsync/outbox.db"
    assert str(config.outbox.key_file) == "/etc/tillsync/outbox.key"
    key = base64.b64decode((installed / "etc/tillsync/outbox.key").read_bytes().strip())
    assert len(key) == 32


def test_running_the_installer_again_changes_nothing(installed: Path, deps_path: Path,
                                                     wheel: Path) -> None:
    before = tree(installed)
    result = run(installed, deps_path, "--wheel", wheel)
    assert "nothing to do" in result.stdout
    assert "status token" not in result.stdout  # the config is kept, not written again
    assert tree(installed) == before


def test_a_different_build_is_not_applied_without_upgrade(installed: Path, deps_path: Path,
                                                          newer_wheelhouse: Path) -> None:
    before = tree(installed)
    result = run(installed, deps_path, "--wheelhouse", newer_wheelhouse)
    assert "run with --upgrade" in result.stdout
    assert tree(installed) == before


def test_installing_from_the_checkout_builds_the_wheel(root: Path, deps_path: Path) -> None:
    result = run(root, deps_path)
    assert "building the wheel" in result.stdout
    assert manifest(root)["version"] == "0.1.0"


# ---------------------------------------------------------------- upgrade


def test_upgrade_keeps_config_key_and_a_queued_sale_readable(installed: Path, deps_path: Path,
                                                             newer_wheelhouse: Path) -> None:
    db, key = installed / "var/lib/tillsync/outbox.db", installed / "etc/tillsync/outbox.key"
    event_id = asyncio.run(append_sale(db, key))
    config_before = (installed / "etc/tillsync/agent.toml").read_bytes()
    key_before = key.read_bytes()

    result = run(installed, deps_path, "--upgrade", "--wheelhouse", newer_wheelhouse)

    assert "upgraded tillsync 0.1.0 -> 99.0.0" in result.stdout
    assert "migrated the queue" in result.stdout
    assert manifest(installed)["version"] == "99.0.0"
    assert (installed / "etc/tillsync/agent.toml").read_bytes() == config_before
    assert key.read_bytes() == key_before
    assert mode(key) == 0o600
    assert asyncio.run(read_payload(db, key, event_id)) == b'{"transaction_id": "T01-1"}'
    again = run(installed, deps_path, "--upgrade", "--wheelhouse", newer_wheelhouse)
    assert "nothing to do" in again.stdout


def test_upgrade_refuses_while_another_process_holds_the_queue(
        installed: Path, deps_path: Path, newer_wheelhouse: Path) -> None:
    from agent.lockfile import exclusive

    db, key = installed / "var/lib/tillsync/outbox.db", installed / "etc/tillsync/outbox.key"
    asyncio.run(append_sale(db, key))
    with exclusive(db):
        result = run(installed, deps_path, "--upgrade", "--wheelhouse", newer_wheelhouse,
                     check=False)
    assert result.returncode == 1
    assert "another tillsync process is using" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_upgrade_of_nothing_installed_says_to_install_first(root: Path, deps_path: Path,
                                                            wheel: Path) -> None:
    result = run(root, deps_path, "--upgrade", "--wheel", wheel, check=False)
    assert result.returncode == 1
    assert "run without --upgrade" in result.stderr
    assert not (root / "opt").exists()


# ---------------------------------------------------------------- uninstall


def test_uninstall_removes_code_and_unit_and_keeps_config_key_and_queue(
        installed: Path, deps_path: Path) -> None:
    db, key = installed / "var/lib/tillsync/outbox.db", installed / "etc/tillsync/outbox.key"
    event_id = asyncio.run(append_sale(db, key))

    result = run(installed, deps_path, "--uninstall")

    assert "--purge removes them" in result.stdout
    assert not (installed / "opt/tillsync").exists()
    assert not (installed / "etc/systemd/system/tillsync.service").exists()
    assert not (installed / "etc/systemd/system/multi-user.target.wants/tillsync.service"
                ).is_symlink()
    assert (installed / "etc/tillsync/agent.toml").is_file()
    assert asyncio.run(read_payload(db, key, event_id)) is not None
    assert "nothing to do" in run(installed, deps_path, "--uninstall").stdout


def test_reinstall_after_uninstall_keeps_the_old_config_and_key(installed: Path,
                                                                deps_path: Path,
                                                                wheel: Path) -> None:
    key_before = (installed / "etc/tillsync/outbox.key").read_bytes()
    run(installed, deps_path, "--uninstall")
    result = run(installed, deps_path, "--wheel", wheel)
    assert "status token" not in result.stdout
    assert (installed / "etc/tillsync/outbox.key").read_bytes() == key_before


def test_purge_removes_config_key_queue_and_credentials(installed: Path,
                                                        deps_path: Path) -> None:
    asyncio.run(append_sale(installed / "var/lib/tillsync/outbox.db",
                            installed / "etc/tillsync/outbox.key"))
    credstore = installed / "etc/credstore"
    credstore.mkdir()
    (credstore / "tillsync.cloud_token").write_text("secret")
    (credstore / "other.token").write_text("not ours")

    run(installed, deps_path, "--uninstall", "--purge")

    for gone in ("opt/tillsync", "etc/tillsync", "var/lib/tillsync",
                 "etc/systemd/system/tillsync.service", "etc/credstore/tillsync.cloud_token"):
        assert not (installed / gone).exists(), gone
    assert (credstore / "other.token").exists()


# ---------------------------------------------------------------- refusals


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_missing_wheel_fails_with_one_line(root: Path, deps_path: Path) -> None:
    line = one_line_error(run(root, deps_path, "--wheel", root / "nope.whl", check=False))
    assert "--wheel" in line and "no such file" in line


def test_a_queue_without_its_key_is_never_given_a_new_key(root: Path, deps_path: Path,
                                                          wheel: Path) -> None:
    (root / "var/lib/tillsync").mkdir(parents=True)
    (root / "var/lib/tillsync/outbox.db").write_bytes(b"SQLite format 3\x00")
    line = one_line_error(run(root, deps_path, "--wheel", wheel, check=False))
    assert "restore outbox.key from backup" in line
    assert not (root / "etc/tillsync/outbox.key").exists()
    assert not (root / "opt").exists()  # refused before changing anything


def test_a_key_without_its_config_is_kept_and_refused(root: Path, deps_path: Path,
                                                      wheel: Path) -> None:
    (root / "etc/tillsync").mkdir(parents=True)
    (root / "etc/tillsync/outbox.key").write_text("old key\n")
    line = one_line_error(run(root, deps_path, "--wheel", wheel, check=False))
    assert "restore agent.toml" in line
    assert (root / "etc/tillsync/outbox.key").read_text() == "old key\n"


def test_purge_without_uninstall_is_a_usage_error(root: Path, deps_path: Path) -> None:
    result = run(root, deps_path, "--purge", check=False)
    assert result.returncode == 2
    assert "--purge only goes with --uninstall" in result.stderr


def test_help_describes_every_option() -> None:
    text = linux.build_parser().format_help()
    for option in ("--root", "--no-start", "--wheel", "--wheelhouse", "--upgrade",
                   "--uninstall", "--purge", "--user"):
        assert option in text


def test_another_service_user_is_written_into_the_unit(tmp_path: Path) -> None:
    installer = linux.Installer(root=tmp_path, user="pos-agent")
    lines = installer._unit_text().splitlines()
    assert "User=pos-agent" in lines and "Group=pos-agent" in lines
    assert "User=tillsync" not in lines
    assert installer.owners()[linux.KEY] == linux.Owner("pos-agent", "pos-agent", 0o600)
