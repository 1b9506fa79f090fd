"""Key file, key ring and the per-record AES-256-GCM envelope.

The key file holds one 32-byte *master key* (base64). It never encrypts records itself:
HKDF derives from it a *wrapping key*, which encrypts the data keys kept (wrapped) in the
database, and a *MAC key*, which fingerprints payloads for dedupe without revealing them.
Rotation adds a new data key; old ones stay wrapped in the database while any record still
uses them, so rotation never re-encrypts and never orphans a record.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import stat
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from outbox.errors import (
    KeyFileInvalid,
    KeyFileMissing,
    KeyFilePermissions,
    KeyMismatch,
    RecordTampered,
)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
ENVELOPE_OVERHEAD = NONCE_BYTES + TAG_BYTES

# NIST SP 800-38D §8.3 caps random-nonce GCM at 2**32 encryptions per key. We rotate the
# data key long before that so the birthday bound on 96-bit nonces stays negligible.
MAX_ENCRYPTIONS_PER_KEY = 2**24

_FIX_PERMISSIONS = "run: chmod 600 {path} (and chown it to the service user)"


def create_key_file(path: Path) -> None:
    """Write a new random master key to ``path`` with mode 0600; refuse to overwrite."""
    key = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise KeyFileInvalid(path, "already exists; refusing to overwrite a key")
    # Write a private temp file, fsync it, then hard-link it into place: the key file
    # appears whole or not at all (a kill mid-write leaves no empty key behind), and
    # link() fails rather than replace a key that appeared meanwhile.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError as err:
        raise KeyFileInvalid(path, "already exists; refusing to overwrite a key") from err
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)


def load_key_file(path: Path) -> bytes:
    """Read and check the master key: present, private to its owner, 32 base64 bytes."""
    try:
        st = path.stat()
    except FileNotFoundError as err:
        raise KeyFileMissing(
            path, "does not exist", hint="create one with `tillsync init` or restore it"
        ) from err
    # POSIX modes mean nothing on Windows, where the installer sets ACLs instead.
    if sys.platform != "win32" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFilePermissions(
            path,
            f"is readable by group or other users (mode {stat.S_IMODE(st.st_mode):04o})",
            hint=_FIX_PERMISSIONS.format(path=path),
        )
    raw = path.read_bytes().strip()
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as err:
        raise KeyFileInvalid(path, "is not base64") from err
    if len(key) != KEY_BYTES:
        raise KeyFileInvalid(path, f"holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def _fsync_dir(directory: Path) -> None:
    """Make a file creation in ``directory`` durable (no-op where unsupported)."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(
        master
    )


class KeyRing:
    """The master-derived keys plus the unwrapped data keys, by key id."""

    def __init__(self, master: bytes, key_file: Path) -> None:
        self._key_file = key_file
        self._wrapper = AESGCM(_derive(master, b"tillsync outbox wrap v1"))
        self._mac_key = _derive(master, b"tillsync outbox mac v1")
        self._data_keys: dict[int, AESGCM] = {}
        self.active_id = 0

    # -- data keys ---------------------------------------------------------------------

    def wrap_new_data_key(self, key_id: int) -> bytes:
        """Create data key ``key_id`` wrapped for storage; it is used once ``add_wrapped``."""
        dek = os.urandom(KEY_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._wrapper.encrypt(nonce, dek, _wrap_aad(key_id))

    def add_wrapped(self, key_id: int, wrapped: bytes) -> None:
        """Unwrap a stored data key (newest becomes active); failure means a wrong key file."""
        try:
            dek = self._wrapper.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                        _wrap_aad(key_id))
        except InvalidTag as err:
            raise KeyMismatch(
                self._key_file,
                "does not match the database (it cannot unwrap data key "
                f"{key_id}); this is not the key the queue was written with",
                hint="restore the key file that belongs to this database",
            ) from err
        self._data_keys[key_id] = AESGCM(dek)
        self.active_id = max(self.active_id, key_id)

    def forget(self, key_id: int) -> None:
        """Drop a retired data key from memory once no record needs it."""
        self._data_keys.pop(key_id, None)

    @property
    def key_ids(self) -> list[int]:
        """Ids of the data keys held, oldest first."""
        return sorted(self._data_keys)

    # -- records -----------------------------------------------------------------------

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt with the active data key: ``nonce(12) || ciphertext || tag(16)``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._data_keys[self.active_id].encrypt(nonce, plaintext, aad)

    def open(self, key_id: int, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a record sealed under ``key_id``; ``RecordTampered`` when it fails."""
        aead = self._data_keys.get(key_id)
        if aead is None:
            raise RecordTampered(f"record names data key {key_id}, which the database lacks")
        try:
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag as err:
            raise RecordTampered("record failed authentication") from err

    def fingerprint(self, *parts: bytes) -> bytes:
        """Keyed hash of the parts: compares payloads for dedupe without revealing them."""
        # Length-prefixed so ("ab", "c") and ("a", "bc") differ; one-shot for speed.
        framed = b"".join([b"%016x%b" % (len(part), part) for part in parts])
        return hmac.digest(self._mac_key, framed, "sha256")


def _wrap_aad(key_id: int) -> bytes:
    return b"tillsync/v1\x00data-key\x00%d" % key_id


def event_aad(event_id: int, kind: str, key_id: int, stream: str, idempotency_key: str) -> bytes:
    """Associated data of an event payload: swapping or re-keying a row breaks the tag."""
    return b"\x00".join((b"tillsync/v1", b"event", b"%d" % event_id, kind.encode(),
                         b"%d" % key_id, stream.encode(), idempotency_key.encode()))


def error_aad(event_id: int, sink: str, key_id: int) -> bytes:
    """Associated data of a delivery's last error text."""
    return b"\x00".join((b"tillsync/v1", b"error", b"%d" % event_id, sink.encode(),
                         b"%d" % key_id))
