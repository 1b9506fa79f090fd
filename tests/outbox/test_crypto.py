"""Encryption at rest: key file rules, key ring rotation, tamper quarantine, no plaintext."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from outbox import (
    DeliveryState,
    KeyFileInvalid,
    KeyFileMissing,
    KeyFilePermissions,
    KeyMismatch,
    Outbox,
    Settlement,
    Verdict,
    crypto,
)
from outbox.crypto import create_key_file, load_key_file
from tests.outbox.conftest import OpenStore, event

MARKER = b"MARKER-4111-CUSTOMER-jane.doe@example.com"


def test_key_file_is_created_private_and_never_overwritten(tmp_path: Path):
    key_file = tmp_path / "sub" / "outbox.key"
    create_key_file(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.b64decode(key_file.read_bytes())) == 32
    before = key_file.read_bytes()
    with pytest.raises(KeyFileInvalid, match="refusing to overwrite"):
        create_key_file(key_file)
    assert key_file.read_bytes() == before


def test_missing_key_file_is_refused_naming_the_file(paths: tuple[Path, Path]):
    with pytest.raises(KeyFileMissing) as err:
        load_key_file(paths[1])
    assert str(paths[1]) in str(err.value) and "tillsync init" in err.value.hint


async def test_a_missing_key_beside_an_existing_database_is_refused_not_recreated(
        open_store: OpenStore, paths: tuple[Path, Path]):
    store = await open_store()
    await store.append(event())
    await store.close()
    paths[1].unlink()
    with pytest.raises(KeyFileMissing) as err:
        await open_store(create_key=True)
    assert str(paths[1]) in str(err.value) and "orphan" in str(err.value)
    assert not paths[1].exists(), "a new key beside an existing queue would orphan it"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_readable_by_group_or_other_is_refused(tmp_path: Path, mode: int):
    key_file = tmp_path / "outbox.key"
    create_key_file(key_file)
    key_file.chmod(mode)
    with pytest.raises(KeyFilePermissions) as err:
        load_key_file(key_file)
    assert str(key_file) in str(err.value) and f"{mode:04o}" in str(err.value)
    assert "chmod 600" in err.value.hint


@pytest.mark.parametrize("content", [b"not base64 at all!", base64.b64encode(b"short")])
def test_a_key_file_without_32_base64_bytes_is_refused(tmp_path: Path, content: bytes):
    key_file = tmp_path / "outbox.key"
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(KeyFileInvalid, match=str(key_file)):
        load_key_file(key_file)


async def test_the_wrong_key_is_refused_as_a_mismatch(open_store: OpenStore,
                                                      paths: tuple[Path, Path]):
    store = await open_store()
    await store.append(event())
    await store.close()
    paths[1].unlink()
    create_key_file(paths[1])
    with pytest.raises(KeyMismatch) as err:
        await open_store()
    assert str(paths[1]) in str(err.value)


async def test_rotation_keeps_old_records_readable_and_purge_retires_unused_keys(
        open_store: OpenStore, paths: tuple[Path, Path], clock):
    store = await open_store()
    old = await store.append(event("T01", 1, payload=b"sealed under key 1"))
    assert await store.rotate_key() == 2
    new = await store.append(event("T01", 2, payload=b"sealed under key 2"))
    await store.close()

    store = await open_store()
    for appended, body in ((old, b"sealed under key 1"), (new, b"sealed under key 2")):
        record = await store.read(appended.event_id)
        assert record is not None and record.payload == body
    with sqlite3.connect(paths[0]) as db:
        assert db.execute("SELECT key_id FROM events ORDER BY id").fetchall() == [(1,), (2,)]

    # Key 1 is still needed while event 1 is held; once delivered and purged it goes.
    assert (await store.purge(delivered_before=clock.now)).keys_retired == 0
    for d in await store.claim("cloud", 10):
        await store.settle([Settlement(d.event_id, "cloud", Verdict.DELIVERED)])
    [d] = await store.claim("cloud", 10)
    await store.settle([Settlement(d.event_id, "cloud", Verdict.DELIVERED)])
    clock.advance(1)
    assert (await store.purge(delivered_before=clock.now)).keys_retired == 1
    await store.close()
    with sqlite3.connect(paths[0]) as db:
        assert db.execute("SELECT key_id FROM data_keys").fetchall() == [(2,)]


async def test_data_key_rotates_itself_before_its_nonce_budget_runs_out(
        open_store: OpenStore, paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("outbox.transactions.MAX_ENCRYPTIONS_PER_KEY", 5)
    store = await open_store()
    for seq in range(12):
        await store.append(event("T01", seq))
    await store.close()
    with sqlite3.connect(paths[0]) as db:
        per_key = db.execute("SELECT key_id, COUNT(*) FROM events GROUP BY key_id").fetchall()
    assert len(per_key) >= 2 and all(count <= 5 for _, count in per_key)


def _ciphertext_offset(db_file: Path, event_id: int) -> int:
    with sqlite3.connect(db_file) as db:
        (sealed,) = db.execute("SELECT sealed FROM events WHERE id = ?", (event_id,)).fetchone()
    data = db_file.read_bytes()
    offset = data.find(sealed)
    assert offset > 0 and data.find(sealed, offset + 1) == -1
    return offset + len(sealed) // 2


async def test_one_flipped_byte_quarantines_that_record_and_others_stay_readable(
        open_store: OpenStore, paths: tuple[Path, Path]):
    """GIVEN three events on disk WHEN one byte of one ciphertext flips in the file THEN
    that record is quarantined (never sent, shown in stats) and the others still flow."""
    store = await open_store()
    ids = [(await store.append(event(f"T0{i}", 1, payload=b"p" * 100))).event_id
           for i in range(3)]
    await store.close()  # checkpoints the WAL into the main file
    victim = ids[1]
    offset = _ciphertext_offset(paths[0], victim)
    with paths[0].open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))

    store = await open_store()
    claimed = await store.claim("cloud", 10)
    assert sorted(d.event_id for d in claimed) == [ids[0], ids[2]]
    assert all(d.payload == b"p" * 100 for d in claimed)
    stats = await store.stats()
    assert stats.quarantined == 1 and stats.sinks["cloud"].quarantined == 1
    record = await store.read(victim)
    assert record is not None and record.quarantined and record.payload is None
    [info] = await store.list_deliveries(state=DeliveryState.QUARANTINED)
    assert info.event_id == victim


async def test_swapping_ciphertexts_between_rows_fails_authentication(
        open_store: OpenStore, paths: tuple[Path, Path]):
    store = await open_store()
    a = await store.append(event("T01", 1, payload=b"sale A"))
    b = await store.append(event("T02", 1, payload=b"sale B"))
    await store.close()
    with sqlite3.connect(paths[0]) as db:
        db.execute("UPDATE events SET sealed = (SELECT sealed FROM events WHERE id = ?2)"
                   " WHERE id = ?1", (a.event_id, b.event_id))
    store = await open_store()
    [ok] = await store.claim("cloud", 10)
    assert (ok.event_id, ok.payload) == (b.event_id, b"sale B")
    assert (await store.stats()).quarantined == 1


async def test_editing_the_idempotency_key_of_a_row_fails_authentication(
        open_store: OpenStore, paths: tuple[Path, Path]):
    """A record can never be replayed under a different key: the key is bound as AAD."""
    store = await open_store()
    a = await store.append(event())
    await store.close()
    with sqlite3.connect(paths[0]) as db:
        db.execute("UPDATE events SET idempotency_key = 'forged' WHERE id = ?", (a.event_id,))
    store = await open_store()
    assert await store.claim("cloud", 10) == []
    assert (await store.stats()).quarantined == 1


def _scan(files: list[Path]) -> dict[str, bool]:
    return {f.name: MARKER in f.read_bytes() for f in files if f.exists()}


async def test_no_payload_or_error_text_is_on_disk_in_plaintext(open_store: OpenStore,
                                                                paths: tuple[Path, Path]):
    store = await open_store()
    for seq in range(50):
        await store.append(event("T01", seq, payload=b'{"note":"%s"}' % MARKER))
    [d] = await store.claim("cloud", 1)
    await store.settle([Settlement(d.event_id, "cloud", Verdict.DEAD,
                                   error=f"422 echo: {MARKER.decode()}")])
    files = [paths[0], Path(f"{paths[0]}-wal"), Path(f"{paths[0]}-shm")]
    # While open, the WAL holds the newest pages: scan it as it stands.
    assert any(f.exists() and f.stat().st_size for f in files[1:])
    assert _scan(files) == {f.name: False for f in files if f.exists()}
    await store.close()
    assert _scan(files) == {f.name: False for f in files if f.exists()}
    # The same bytes are found when written in the clear: the scan can see a leak.
    leak = paths[0].parent / "control.bin"
    leak.write_bytes(os.urandom(100) + MARKER)
    assert _scan([leak]) == {"control.bin": True}


def test_aad_binds_id_kind_key_stream_and_idempotency_key():
    base = ("transaction", 1, "T01", "k")
    aad = crypto.event_aad(7, *base)
    for changed in (crypto.event_aad(8, *base),
                    crypto.event_aad(7, "inventory", 1, "T01", "k"),
                    crypto.event_aad(7, "transaction", 2, "T01", "k"),
                    crypto.event_aad(7, "transaction", 1, "T02", "k"),
                    crypto.event_aad(7, "transaction", 1, "T01", "k2")):
        assert changed != aad


async def test_outbox_open_creates_the_key_only_for_a_new_database(
        paths: tuple[Path, Path]):
    with pytest.raises(KeyFileMissing):
        await Outbox.open(paths[0], paths[1])
    store = await Outbox.open(paths[0], paths[1], create_key=True)
    await store.close()
    assert stat.S_IMODE(paths[1].stat().st_mode) == 0o600
