"""The version status, metrics and the User-Agent report is the running code's."""

from __future__ import annotations

from importlib import metadata

import pytest

from outbox import version


def test_version_is_the_installed_distributions() -> None:
    """GIVEN tillsync installed (editable, as in CI) WHEN asked THEN its metadata version."""
    assert version.package_version() == metadata.version("tillsync")


def test_version_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN the version asked once WHEN a newer package appears on disk (metadata now says
    otherwise) THEN the running process still reports the version it started with."""
    first = version.package_version()
    monkeypatch.setattr(metadata, "version", lambda _name: "99.0")
    assert version.package_version() == first
