"""Outbox errors, typed by what the caller does next.

| error                | the caller should                                              |
|----------------------|----------------------------------------------------------------|
| ``OutboxFull``       | refuse the new event (HTTP 507) and try again later            |
| ``DedupeConflict``   | tell the client its id is taken by different content (409)     |
| ``OutboxUnavailable``| refuse for now (503); the writer reopens the database itself   |
| ``KeyFileError``     | stop: an operator must fix the key file (config error)         |
| ``SinkSetupError``   | stop: an operator must fix the sink's settings (config error)  |
| ``OutboxCorrupt``    | stop: the database failed its check; restore or investigate    |
| ``SchemaTooNew``     | stop: the database was written by a newer tillsync             |

Every error carries a one-line ``hint`` saying what to do, for the CLI and logs.
"""

from __future__ import annotations

from pathlib import Path


class OutboxError(Exception):
    """Base of every outbox error; ``hint`` says what an operator can do."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class OutboxFull(OutboxError):
    """The event does not fit: capacity reached or the disk is full. Nothing was written."""

    hint = "deliver or purge queued events, or raise outbox.capacity_bytes / free disk space"


class CapacityFull(OutboxFull):
    """``capacity_bytes`` is reached by payloads still owed to sinks.

    The store remembers the refused size until an event that size fits again
    (``Outbox.capacity_refusal``), so status can stop reporting "full" as soon as deliveries
    make room, not only after the next successful append.
    """


class DedupeConflict(OutboxError):
    """The dedupe key is already used by an event with different content."""

    def __init__(self, dedupe_key: str, event_id: int) -> None:
        super().__init__(
            f"dedupe key {dedupe_key!r} already holds event {event_id} with different content"
        )
        self.dedupe_key = dedupe_key
        self.event_id = event_id


class OutboxUnavailable(OutboxError):
    """The writer hit an I/O error; the write did not happen and the store is reopening."""

    hint = "check the disk and the system log; the agent retries opening the database"


class OutboxClosed(OutboxError):
    """The store was closed; no more work is taken."""


class OutboxCorrupt(OutboxError):
    """The database failed ``PRAGMA quick_check`` or could not be read as an outbox."""

    hint = "stop the agent, keep a copy of the file, and restore from backup"


class SchemaTooNew(OutboxError):
    """The database schema is newer than this tillsync knows; refuse rather than guess."""

    hint = "run the tillsync version that wrote this database, or a newer one"


class KeyFileError(OutboxError):
    """A problem with the key file; ``path`` names it."""

    def __init__(self, path: Path, message: str, *, hint: str = "") -> None:
        super().__init__(f"key file {path}: {message}", hint=hint)
        self.path = path


class KeyFileMissing(KeyFileError):
    """The key file does not exist."""


class KeyFilePermissions(KeyFileError):
    """The key file can be read by group or other users."""


class KeyFileInvalid(KeyFileError):
    """The key file does not hold 32 base64-encoded bytes."""


class KeyMismatch(KeyFileError):
    """The key file is not the key this database was written with."""


class SinkSetupError(OutboxError):
    """A sink cannot start with its settings, e.g. an unreadable ``ca_bundle``."""

    hint = "fix the sink's settings in the config file, then start the agent again"


class RecordTampered(OutboxError):
    """A record failed authentication; it is quarantined, never sent."""
