"""The disk reserve (``outbox.reserve``): a real ballast file on the test's real filesystem.

Running out of disk for real needs a filesystem of its own; that is
``tests/system/test_disk_full.py`` (a loop-mounted ext4), which also checks that deliveries
go on while new events are refused. Here: the file itself, and that a database limit (not
the disk) leaves the reserve alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from outbox import OutboxFull, Verdict
from outbox.reserve import DiskReserve
from tests.outbox.conftest import OpenStore
from tests.outbox.test_store import event, settle

MIB = 1024 * 1024


def test_holding_writes_real_blocks_and_releasing_deletes_them(tmp_path: Path):
    reserve = DiskReserve(tmp_path / "outbox.db.reserve", 2 * MIB)
    assert not reserve.held
    assert reserve.hold()
    info = reserve.path.stat()
    assert info.st_size == 2 * MIB
    assert info.st_blocks * 512 >= 2 * MIB, "sparse: it would reserve nothing"
    assert not reserve.path.with_name("outbox.db.reserve.partial").exists()
    assert reserve.release()
    assert not reserve.path.exists() and not reserve.held
    assert not reserve.release(), "nothing left to release"


def test_a_reserve_left_by_an_earlier_run_is_found_and_a_resized_one_replaced(tmp_path: Path):
    path = tmp_path / "outbox.db.reserve"
    assert DiskReserve(path, MIB).hold()
    assert DiskReserve(path, MIB).held
    bigger = DiskReserve(path, 3 * MIB)
    assert not bigger.held
    assert bigger.hold()
    assert path.stat().st_size == 3 * MIB


def test_no_reserve_is_taken_without_twice_its_size_free(tmp_path: Path):
    free = shutil.disk_usage(tmp_path).free
    reserve = DiskReserve(tmp_path / "outbox.db.reserve", free // 2 + MIB)
    assert not reserve.hold()
    assert not reserve.held and not reserve.path.exists()


def test_size_zero_turns_the_reserve_off(tmp_path: Path):
    reserve = DiskReserve(tmp_path / "outbox.db.reserve", 0)
    assert reserve.held and reserve.hold()
    assert not reserve.release() and reserve.held
    assert not reserve.path.exists()


def test_a_negative_size_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="negative"):
        DiskReserve(tmp_path / "r", -1)


async def test_a_negative_reserve_is_refused_before_anything_is_opened(
        open_store: OpenStore, paths: tuple[Path, Path]):
    with pytest.raises(ValueError, match="disk_reserve_bytes"):
        await open_store(disk_reserve_bytes=-1)
    assert not paths[0].exists()


async def test_the_store_takes_its_reserve_at_open_beside_the_database(
        open_store: OpenStore, paths: tuple[Path, Path]):
    store = await open_store(disk_reserve_bytes=MIB)
    reserve = paths[0].with_name("outbox.db.reserve")
    assert store.reserve.held and reserve.stat().st_size == MIB
    assert (await store.append(event("T01", 1))).created


async def test_a_database_limit_is_not_a_full_disk_and_keeps_the_reserve(
        open_store: OpenStore, paths: tuple[Path, Path]):
    """GIVEN a reserve and SQLite's page limit WHEN the limit refuses appends THEN the
    reserve stays (releasing it would not help, and appends would flap it) and claims and
    settles still run."""
    store = await open_store(max_db_bytes=256 * 1024, disk_reserve_bytes=MIB)
    with pytest.raises(OutboxFull):
        for seq in range(10_000):
            await store.append(event("T01", seq, payload=bytes(1500)))
    assert store.reserve.held
    assert paths[0].with_name("outbox.db.reserve").stat().st_size == MIB
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.DELIVERED)
