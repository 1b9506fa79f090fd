"""`tillsync run` and `tillsync init` failing: one line naming the setting, why, what to do.

Real subprocesses on real files and sockets. The permission cases run the command as the
unprivileged user ``nobody`` (they need root to switch to it), in a directory it can reach.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lockfile import exclusive
from outbox import Outbox
from outbox.crypto import create_key_file
from tests.agent.conftest import free_port, write_config
from tests.agent.test_cli import one_line_failure, tillsync

NOBODY = 65534
as_root = pytest.mark.skipif(sys.platform == "win32" or os.geteuid() != 0,
                             reason="switches to the unprivileged user nobody")
with_proc = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")


def setup_at(root: Path, *, db: Path | None = None, key: Path | None = None,
             listen: str | None = None) -> Path:
    """A working agent.toml under ``root``, with the outbox, key or listen address moved."""
    config = write_config(root)
    text = config.read_text()
    if db is not None:
        text = re.sub(r'(?m)^path = ".*"$', f'path = "{db}"', text)
    if key is not None:
        text = re.sub(r'(?m)^key_file = ".*"$', f'key_file = "{key}"', text)
    if listen is not None:
        text = re.sub(r'(?m)^listen = ".*"$', f'listen = "{listen}"', text)
    config.write_text(text)
    return config


# The child loads the code as root, then becomes nobody for good (real, effective and saved
# ids) before the command runs: the interpreter's own files may be private to root (a pyenv
# under /root), so nobody could not start it, but the command itself must run unprivileged.
AS_NOBODY = f"""
import os, sys
import agent.cli, agent.checks, agent.config, agent.init, agent.runtime, outbox.store
import encodings.idna, encodings.utf_8_sig, grp, pwd
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
assert os.getresuid() == ({NOBODY}, {NOBODY}, {NOBODY})
sys.exit(agent.cli.main(sys.argv[1:]))
"""


def run_as_nobody(config: Path) -> subprocess.CompletedProcess[str]:
    """``tillsync run --config`` as the user nobody (this test runs as root)."""
    return subprocess.run([sys.executable, "-c", AS_NOBODY, "run", "--config", str(config)],
                          cwd=Path(__file__).resolve().parents[2], text=True,
                          capture_output=True, timeout=120, check=False)


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory nobody can enter and read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tillsync-cli-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def nobody_setup(root: Path, *, db: Path, key_owner: int = NOBODY) -> Path:
    """A config nobody can read, its key owned by ``key_owner`` (mode 0600)."""
    key = root / "outbox.key"
    create_key_file(key)
    os.chown(key, key_owner, key_owner)
    config = setup_at(root, db=db, key=key)
    config.chmod(0o644)
    return config


# -- the outbox directory and the key file ----------------------------------------------------


@as_root
def test_a_read_only_outbox_directory_names_outbox_path_and_what_to_do(reachable: Path) -> None:
    (reachable / "ro").mkdir(mode=0o755)  # root's: nobody cannot create the lock file there
    db = reachable / "ro" / "outbox.db"
    line = one_line_failure(run_as_nobody(nobody_setup(reachable, db=db)))
    assert line.startswith(f"tillsync: outbox.path {db}: cannot create outbox.db.lock in"), line
    assert "permission denied for user nobody" in line
    assert "chown" in line and "Errno" not in line


@as_root
def test_a_missing_outbox_directory_under_a_read_only_parent_names_the_directory(
        reachable: Path) -> None:
    (reachable / "ro").mkdir(mode=0o755)
    db = reachable / "ro" / "sub" / "outbox.db"
    line = one_line_failure(run_as_nobody(nobody_setup(reachable, db=db)))
    assert line.startswith(f"tillsync: outbox.path {db}: cannot create the directory"
                           f" {reachable / 'ro' / 'sub'} (permission denied"), line
    assert "chown" in line and "Errno" not in line


@as_root
def test_a_key_file_of_another_user_names_outbox_key_file_and_its_owner(reachable: Path) -> None:
    (reachable / "state").mkdir()
    os.chown(reachable / "state", NOBODY, NOBODY)
    config = nobody_setup(reachable, db=reachable / "state" / "outbox.db", key_owner=0)
    line = one_line_failure(run_as_nobody(config))
    key = reachable / "outbox.key"
    assert line.startswith(f"tillsync: outbox.key_file {key}: cannot read it (permission"
                           " denied for user nobody; the file belongs to root)"), line
    assert "chown the key" in line and "0600" in line


@with_proc
def test_an_outbox_path_where_no_file_can_be_created_names_outbox_path(tmp_path: Path) -> None:
    line = one_line_failure(tillsync("run", "--config",
                                     str(setup_at(tmp_path, db=Path("/proc/outbox.db")))))
    assert line.startswith("tillsync: outbox.path /proc/outbox.db: cannot create outbox.db.lock"
                           " in /proc (no such file or directory)"), line
    assert "writable disk" in line and "Errno" not in line


def existing_database(root: Path) -> Path:
    """A real outbox database with its key, as a first start leaves them."""
    db, key = root / "outbox.db", root / "outbox.key"
    create_key_file(key)

    async def first_start() -> None:
        await (await Outbox.open(db, key)).close()

    asyncio.run(first_start())
    assert db.stat().st_size > 0
    return db


@pytest.mark.parametrize(("content", "why"), [
    (b"not a key at all!\n", "is not base64"),
    (base64.b64encode(os.urandom(16)) + b"\n", "holds 16 bytes, expected 32"),
    (b"", "is empty"),
])
def test_a_broken_key_beside_a_database_says_restore_it_never_make_a_new_one(
        tmp_path: Path, content: bytes, why: str) -> None:
    db = existing_database(tmp_path)
    key = tmp_path / "outbox.key"
    key.write_bytes(content)
    line = one_line_failure(tillsync("run", "--config", str(setup_at(tmp_path))))
    assert line.startswith(f"tillsync: outbox.key_file {key}: {why} — restore the key file"
                           " from backup; do not make a new key"), line
    assert str(db) in line and "tillsync init" not in line


def test_a_broken_key_without_a_database_says_restore_it(tmp_path: Path) -> None:
    create_key_file(tmp_path / "outbox.key")
    (tmp_path / "outbox.key").write_bytes(b"garbage")
    line = one_line_failure(tillsync("run", "--config", str(setup_at(tmp_path))))
    assert "is not base64 — restore the key file from backup" in line


def test_a_key_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    key = tmp_path / "keys"
    key.mkdir(mode=0o755)
    line = one_line_failure(tillsync("run", "--config", str(setup_at(tmp_path, key=key))))
    assert line == (f"tillsync: outbox.key_file {key}: is a directory, not a key file — set"
                    " outbox.key_file to the file holding the key")


# -- the listen address ------------------------------------------------------------------------


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure line of a run that got as far as logging (binding comes after the start)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    ours = [ln for ln in result.stderr.splitlines() if ln.startswith("tillsync: ")]
    assert len(ours) == 1 and result.stderr.strip().splitlines()[-1] == ours[0], result.stderr
    return ours[0]


def test_a_listen_host_that_does_not_resolve_names_api_listen(tmp_path: Path) -> None:
    port = free_port()
    config = setup_at(tmp_path, listen=f"no.such.host.invalid:{port}")
    line = last_line(tillsync("run", "--config", str(config)))
    assert line.startswith(f"tillsync: cannot listen on api.listen ="
                           f" 'no.such.host.invalid:{port}': the host name no.such.host.invalid"
                           " does not resolve"), line
    assert f"127.0.0.1:{port}" in line


def test_a_listen_port_in_use_names_api_listen(tmp_path: Path) -> None:
    config = setup_at(tmp_path)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config.write_text(re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{port}"',
                                 config.read_text()))
        line = last_line(tillsync("run", "--config", str(config)))
    assert line.startswith(f"tillsync: cannot listen on api.listen = '127.0.0.1:{port}': port"
                           f" {port} is already in use"), line
    assert "set api.listen to a free port" in line


def test_a_listen_address_not_on_this_machine_names_api_listen(tmp_path: Path) -> None:
    config = setup_at(tmp_path, listen=f"192.0.2.1:{free_port()}")  # TEST-NET-1
    line = last_line(tillsync("run", "--config", str(config)))
    assert "cannot listen on api.listen = '192.0.2.1:" in line
    assert "192.0.2.1 is not an address of this machine" in line and "0.0.0.0" in line


# -- a second agent, init ----------------------------------------------------------------------


def test_a_second_run_on_a_database_in_use_says_stop_the_other_agent(tmp_path: Path) -> None:
    config = setup_at(tmp_path)
    with exclusive(tmp_path / "outbox.db"):  # what a running agent holds
        line = one_line_failure(tillsync("run", "--config", str(config)))
    assert line.startswith(f"tillsync: outbox.path {tmp_path / 'outbox.db'}: another tillsync"
                           " agent is already using this database — stop it first"), line
    assert "set outbox.path to another database" in line and "--config" not in line


@with_proc
def test_init_into_a_directory_that_cannot_be_created_says_which_and_what_to_do() -> None:
    line = one_line_failure(tillsync("init", "--dir", "/proc/tillsync-test"))
    assert line == ("tillsync: init cannot create the directory /proc/tillsync-test (no such"
                    " file or directory) — pass --dir with a directory on a writable disk,"
                    " e.g. /etc/tillsync")
