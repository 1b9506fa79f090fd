"""Local agent: config, canonical models, local API, relay wiring, CLI and demo."""

import logging

# Libraries whose INFO lines repeat what the agent logs itself (every request; each of the
# scheduler's jobs at every start): shown only when the agent logs at DEBUG.
_CHATTY = ("aiohttp.access", "apscheduler")


def quiet_libraries(level: str) -> None:
    """Keep the chatty libraries at WARNING unless ``level`` is DEBUG."""
    quiet = logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)
