"""The installed tillsync version, for the User-Agent, the CLI and status."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.cache
def package_version() -> str:
    """Return the distribution's version as it was when first asked ("0+unknown" in a bare tree).

    Read once: the running code's version does not change when a newer package is installed
    beside it, and ``/v1/status`` asks on every poll (a metadata lookup scans ``sys.path``,
    about 0.3 ms).
    """
    try:
        return metadata.version("tillsync")
    except metadata.PackageNotFoundError:
        return "0+unknown"
