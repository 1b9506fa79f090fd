"""The installed tillsync version, for the User-Agent, the CLI and status."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """Return the installed distribution's version ("0+unknown" when run from a bare tree)."""
    try:
        return metadata.version("tillsync")
    except metadata.PackageNotFoundError:
        return "0+unknown"
