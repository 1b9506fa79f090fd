"""``tillsync init``: a commented agent.toml, a new outbox key and fresh random tokens.

The comments in the written file come from the config models' descriptions (the same source
as docs/config.md), so the sample explains exactly the keys the agent accepts.
"""

from __future__ import annotations

import errno
import os
import secrets
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.configdoc import Section, sections, toml_string
from outbox.crypto import create_key_file
from outbox.errors import KeyFileInvalid

CONFIG_NAME = "agent.toml"
KEY_NAME = "outbox.key"
DATABASE_NAME = "outbox.db"
TERMINAL_IDS = ("T01", "T02", "T03")
STORE_ID = "store-001"
_WIDTH = 92

_HEADER = """\
# tillsync agent configuration, written by `tillsync init`.
#
# Every key is explained above it; the full reference is docs/config.md
# (`python -m agent.configdoc`). A line "# key = value" shows a default or an example:
# remove the "# " to change it. Check the file with `tillsync check --config <this file>`.
#
# This file holds tokens: keep it readable by the service user only (mode 0600).
# Any secret may instead be given as "${ENV_VAR}", or as <key>_file = "path" (a relative
# path is looked up in $CREDENTIALS_DIRECTORY first, then next to this file).
"""


class InitError(Exception):
    """init could not write its files; the message is one line: what, why, what to do."""


@dataclass(frozen=True)
class InitResult:
    """What ``init_setup`` created; the tokens are shown to the operator once."""

    config_path: Path
    key_path: Path
    status_token: str
    terminal_tokens: dict[str, str]


def init_setup(directory: Path, *, config_name: str = CONFIG_NAME) -> InitResult:
    """Write ``config_name`` and a new outbox key into ``directory``; never overwrite either.

    The database is set to ``directory``/outbox.db. ``config_name`` lets ``tillsync init``
    write the file ``$TILLSYNC_CONFIG`` names, so ``tillsync run`` finds it.
    """
    directory = directory.absolute()
    config_path, key_path = directory / config_name, directory / KEY_NAME
    _refuse_existing(config_path, key_path, directory / DATABASE_NAME)
    if not directory.exists():
        try:
            directory.mkdir(mode=0o750, parents=True)
            directory.chmod(0o750)  # mkdir's mode is filtered by the umask
        except OSError as err:
            raise _cannot_write(directory, err, "create the directory") from err
    status_token = new_token()
    terminal_tokens = {terminal: new_token() for terminal in TERMINAL_IDS}
    text = render_config(directory, status_token, terminal_tokens)
    try:
        create_key_file(key_path)
    except KeyFileInvalid as err:  # appeared since the check above
        raise FileExistsError(_exists_message(key_path)) from err
    except OSError as err:
        raise _cannot_write(key_path, err, "write the key") from err
    try:
        _write_private(config_path, text)
    except BaseException as err:
        # Nothing can be encrypted under the key yet: remove it so a rerun starts clean.
        key_path.unlink(missing_ok=True)
        if isinstance(err, FileExistsError):  # appeared since the check above
            raise FileExistsError(_exists_message(config_path)) from err
        if isinstance(err, OSError):
            raise _cannot_write(config_path, err, "write the config") from err
        raise
    return InitResult(config_path, key_path, status_token, terminal_tokens)


def _cannot_write(path: Path, err: OSError, what: str) -> InitError:
    if err.errno in (errno.EACCES, errno.EPERM):
        why, fix = "permission denied", ("run init as root (e.g. sudo tillsync init), or pass"
                                         " --dir with a directory you can write")
    else:
        why = (err.strerror or str(err)).lower()
        fix = "pass --dir with a directory on a writable disk, e.g. /etc/tillsync"
    return InitError(f"init cannot {what} {path} ({why}) — {fix}")


def new_token() -> str:
    """Return a fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _refuse_existing(config_path: Path, key_path: Path, database_path: Path) -> None:
    for path in (key_path, config_path, database_path):
        if path.exists():
            raise FileExistsError(_exists_message(path))


def _exists_message(path: Path) -> str:
    if path.name == KEY_NAME:
        why = "it may be the key of a queue, which a new key would make unreadable"
    elif path.name == DATABASE_NAME:
        why = "a new key beside an existing outbox would orphan its queue"
    else:
        why = "init does not overwrite a configuration"
    return (f"{path} already exists; {why}. Run init with --dir pointing to an empty "
            "directory, or move the existing files away first.")


def _write_private(path: Path, text: str) -> None:
    # O_EXCL: never replace a file that appeared meanwhile; 0600: the file holds tokens.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the sample file


def render_config(directory: Path, status_token: str, terminal_tokens: Mapping[str, str]) -> str:
    """Render a commented agent.toml whose files live in ``directory``."""
    values: dict[str, dict[str, str]] = {
        "[store]": {"id": toml_string(STORE_ID)},
        "[api]": {"listen": toml_string("127.0.0.1:8765"),
                  "status_token": toml_string(status_token)},
        "[outbox]": {"path": toml_string(str(directory / DATABASE_NAME)),
                     "key_file": toml_string(str(directory / KEY_NAME))},
    }
    blocks = [_HEADER]
    for section in sections():
        header = section.header
        if header == "[[api.terminals]]":
            blocks += [_table(section, {"id": toml_string(terminal), "token": toml_string(token)},
                              explain=index == 0)
                       for index, (terminal, token) in enumerate(terminal_tokens.items())]
        elif header == "[[sinks]]" and "webhook" in section.tags:
            blocks.append(_disabled(_table(section, _EXAMPLE_SINK), "Example: deliver events "
                                    "to a cloud endpoint. To enable it, remove the first "
                                    '"# " of each line below.'))
        elif header == "[[devices]]" and "escpos" in section.tags:
            blocks.append(_disabled(_table(section, _EXAMPLE_PRINTER), "Example: a receipt "
                                    "printer on the network. To enable it, remove the first "
                                    '"# " of each line below.'))
        elif not section.array:
            blocks.append(_table(section, values.get(header, {})))
    return "\n".join(blocks)


_EXAMPLE_SINK = {
    "type": toml_string("webhook"), "name": toml_string("cloud"),
    "url": toml_string("https://api.example.com/pos/events"),
    "kinds": '["transaction"]',
    "token": toml_string("${TILLSYNC_CLOUD_TOKEN}"),
}
_EXAMPLE_PRINTER = {
    "type": toml_string("escpos"), "name": toml_string("receipt"),
    "url": toml_string("tcp://192.168.1.50:9100"),
}


def _table(section: Section, values: Mapping[str, str], *, explain: bool = True) -> str:
    lines = []
    if explain:
        lines += _comment(f"{section.header}: {section.summary}")
    lines.append(section.header)
    for field in section.fields:
        if field.key in values:
            line = f"{field.key} = {values[field.key]}"
        elif not explain:
            continue
        elif field.default is not None or field.example is not None:
            line = f"# {field.key} = {field.default or field.example}"
        else:
            continue
        if explain:
            lines += [*([""] if len(lines) > 2 else []), *_comment(field.description)]
        lines.append(line)
    return "\n".join(lines) + "\n"


def _disabled(block: str, note: str) -> str:
    body = "\n".join(f"# {line}" if line else "#" for line in block.splitlines())
    return "\n".join([*_comment(note), body]) + "\n"


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, _WIDTH)]
