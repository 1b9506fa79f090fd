"""The ``tillsync`` command line (CONTRACT §2).

Every failure prints one line (what, why, what to do) and exits non-zero; ``--debug``
shows the traceback instead. Exit status: 0 done, 1 failed, 2 bad configuration or usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox.errors import OutboxError
from outbox.version import package_version

DEFAULT_URL = "http://127.0.0.1:8765"
TOKEN_ENV = "TILLSYNC_STATUS_TOKEN"  # noqa: S105  (a variable name, not a secret)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; its --help is the command's reference."""
    parser = argparse.ArgumentParser(
        prog="tillsync",
        description="In-store edge sync agent: takes sales from POS terminals, keeps them in an"
                    " encrypted outbox and replays them idempotently to cloud APIs.",
        epilog="Start with `tillsync demo`. A real store: `tillsync init`, edit agent.toml,"
               " `tillsync check`, `tillsync run`.")
    parser.add_argument("--version", action="version", version=f"tillsync {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    # Every subcommand takes --debug too (`tillsync run --debug`), with the same meaning. Its
    # default is SUPPRESS so that a subcommand without it leaves the top-level value alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on failure")
    commands = _Subcommands(parser.add_subparsers(dest="command", required=True,
                                                  metavar="COMMAND"), common)

    demo = commands.add_parser("demo", help="see it work: agent, tills and a flaky cloud",
                               description="Run the agent in a temporary directory with three"
                               " emulated tills and a stand-in cloud that goes offline and"
                               " comes back; exit 0 only if every sale arrived exactly once.")
    demo.add_argument("--seconds", type=float, default=30.0,
                      help="how long the tills ring up sales (default 30)")

    init = commands.add_parser("init", help="write agent.toml, a new outbox key and tokens",
                               description="Write a commented config file, a new outbox key"
                               " (mode 0600) and random tokens; print the tokens once. With"
                               " --dir: DIR/agent.toml. Without: the file $TILLSYNC_CONFIG"
                               " names (so `tillsync run` finds it with the same variable),"
                               " else the system path. The key (outbox.key) and the database"
                               " (outbox.db) go beside the config file. Never overwrites an"
                               " existing key or config.")
    init.add_argument("--dir", type=Path, default=None,
                      help="write DIR/agent.toml, DIR/outbox.key (default: the config file"
                           " $TILLSYNC_CONFIG names, else the system path)")

    run = commands.add_parser("run", help="run the agent in the foreground",
                              description="Run the agent until SIGTERM/SIGINT; logs to stderr.")
    _config_arg(run)

    check = commands.add_parser("check", help="validate config, key, database, sinks, clock",
                                description="Check the setup; one line per check; exit 1 if"
                                " any check failed.")
    _config_arg(check)

    status = commands.add_parser("status", help="show a running agent's status",
                                 description="Read /v1/status of a running agent.")
    _remote_args(status)
    status.add_argument("--json", action="store_true", help="print the JSON document")

    outbox = commands.add_parser("outbox", help="look at and retry queued events",
                                 description="Through the running agent's admin API, or with"
                                 " --config directly on the database (agent stopped).")
    actions = _Subcommands(outbox.add_subparsers(dest="action", required=True,
                                                 metavar="ACTION"), common)
    listing = actions.add_parser("list", help="deliveries in event order")
    listing.add_argument("--state", choices=["pending", "in_flight", "in_doubt", "delivered",
                                             "dead", "quarantined"], help="only this state")
    show = actions.add_parser("show", help="one event, payload decrypted")
    show.add_argument("event_id", type=int, metavar="ID")
    retry = actions.add_parser("retry", help="requeue dead deliveries, re-check paused sinks")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("event_id", type=int, nargs="?", metavar="ID")
    which.add_argument("--all-dead", action="store_true", help="every dead delivery")
    stats = actions.add_parser("stats", help="counts per sink")
    for sub in (listing, show, retry, stats):
        _remote_args(sub, direct=True)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")

    printing = commands.add_parser("print", help="render a receipt to a PNG to look at",
                                   description="Render the receipt of a transaction (CONTRACT"
                                   " §5) to the ESC/POS bytes a printer gets, and draw them as"
                                   " a PNG of the paper strip. Nothing is sent to a printer.")
    printing.add_argument("--preview", type=Path, required=True, metavar="OUT.png",
                          help="where to write the PNG")
    printing.add_argument("--transaction", type=Path, default=None, metavar="FILE.json",
                          help="the transaction (a POST /v1/transactions body; default: a"
                               " built-in sample)")
    printing.add_argument("--width", type=int, choices=[58, 80], default=80,
                          help="paper width in mm (default 80)")
    printing.add_argument("--store-name", default="Store",
                          help="the name printed at the top (default: Store)")

    keys = commands.add_parser("keys", help="outbox encryption keys")
    key_actions = _Subcommands(keys.add_subparsers(dest="action", required=True,
                                                   metavar="ACTION"), common)
    rotate = key_actions.add_parser("rotate", help="new data key for new records; old keys"
                                    " stay until nothing needs them")
    _remote_args(rotate, direct=True)
    return parser


class _Subcommands:
    """``add_subparsers()`` whose every parser also takes the common options (--debug)."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """Add a subcommand that inherits the common options."""
        parser: argparse.ArgumentParser = self._action.add_parser(
            name, parents=[self._common], **kwargs)
        return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="agent.toml (default: $TILLSYNC_CONFIG, else the system path)")


def _remote_args(parser: argparse.ArgumentParser, *, direct: bool = False) -> None:
    parser.add_argument("--url", default=None,
                        help=f"the agent's address (default: from the config, else {DEFAULT_URL})")
    parser.add_argument("--token", default=None,
                        help=f"the status token (default: ${TOKEN_ENV}, else from the config)")
    if direct:
        parser.add_argument("--config", type=Path, default=None,
                            help="work on the database directly (the agent must be stopped)")


@dataclass
class Context:
    """What a command had got to when it failed, so its one line can name the setting."""

    command: str | None = None
    config: Any = None  # the AgentConfig `run` loaded: names the setting behind an OSError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    context = Context(args.command)
    try:
        return _dispatch(args, context)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        code, line = describe_failure(err, command=context.command, config=context.config)
        print(f"tillsync: {line}", file=sys.stderr)
        return code


def describe_failure(err: BaseException, *, command: str | None = None,
                     config: Any = None) -> tuple[int, str]:
    """Exit status and one line (what, why, what to do) for any failure a command can meet.

    ``command`` fits the advice to what was run; ``config`` (the loaded AgentConfig, when the
    failure came after loading it) lets an OSError name the setting behind it: binding
    ``api.listen``, creating files beside ``outbox.path``, reading ``outbox.key_file``.
    """
    from agent.config import ConfigError
    from agent.init import InitError
    from agent.lockfile import LockHeld
    from agent.operator import OperatorError
    from outbox.errors import KeyFileError

    if isinstance(err, ConfigError):
        return 2, str(err).replace("\n", "\ntillsync: ")
    if isinstance(err, KeyFileError):
        from agent.checks import describe_key_error  # check and run say the same

        return 1, describe_key_error(err, config.outbox.path if config is not None else None)
    if isinstance(err, OutboxError):
        return 1, f"{err}" + (f" ({err.hint})" if err.hint else "")
    if isinstance(err, LockHeld):
        return 1, _lock_held(err, command)
    if isinstance(err, InitError | OperatorError):
        return 1, str(err)
    if isinstance(err, OSError):
        known = None
        if config is not None:
            known = _listen_failure(err, config) or _outbox_file_failure(err, config)
        if known:
            return 1, known
        if isinstance(err, FileExistsError) and err.errno is None:
            return 1, str(err)  # init's own "already exists; why; what to do"
        return 1, _os_failure(err)
    return 1, f"unexpected error: {type(err).__name__}: {err} (run with --debug for details)"


def _lock_held(err: Any, command: str | None) -> str:
    if command == "run":
        return (f"outbox.path {err.path}: another tillsync agent is already using this"
                " database — stop it first (e.g. systemctl stop tillsync), or set outbox.path"
                " to another database")
    if command in ("outbox", "keys"):
        return f"{err}: the agent is running — drop --config to go through its API"
    return f"{err} — stop the other tillsync process, then try again"


def _listen_failure(err: OSError, config: Any) -> str | None:
    """Describe a failure to bind ``api.listen``, or None when ``err`` is not one."""
    binding = isinstance(err, socket.gaierror) or (err.filename is None and (
        err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or "bind" in str(err)))
    if not binding:
        return None
    from agent.checks import listen_failure  # check and run say the same

    return (f"cannot listen on api.listen = {config.api.listen!r}:"
            f" {listen_failure(err, config.api.host, config.api.port)}")


def _outbox_file_failure(err: OSError, config: Any) -> str | None:
    """Describe an OSError on the key file or on a file beside the outbox, naming the key."""
    from agent.checks import os_reason

    if err.filename is None:
        return None
    path = Path(os.fsdecode(err.filename))
    key_file, db = config.outbox.key_file, config.outbox.path
    if _same_path(path, key_file):
        if isinstance(err, IsADirectoryError):
            return (f"outbox.key_file {key_file}: is a directory, not a key file — set"
                    " outbox.key_file to the file holding the key")
        if err.errno in (errno.EACCES, errno.EPERM):
            owner = _owner(key_file)
            belongs = f"; the file belongs to {owner}" if owner else ""
            return (f"outbox.key_file {key_file}: cannot read it (permission denied for user"
                    f" {_user()}{belongs}) — run the agent as the key's owner (the service"
                    " user), or chown the key to that user and keep mode 0600")
        return (f"outbox.key_file {key_file}: cannot read it ({os_reason(err)}) — check the"
                " path and the disk")
    if any(_same_path(path, parent) for parent in db.parents):
        what = f"outbox.path {db}: cannot create the directory {path}"
        directory = path.parent
    elif _same_path(path.parent, db.parent):
        what = f"outbox.path {db}: cannot create {path.name} in {db.parent}"
        directory = db.parent
    else:
        return None
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"{what} (permission denied for user {_user()}) — run the agent as the user"
                f" that owns {directory}, or chown it to the agent's service user; or set"
                " outbox.path to a directory that user can write")
    if err.errno == errno.ENOSPC:
        return f"{what} ({os_reason(err)}) — free disk space, or move outbox.path to another disk"
    return (f"{what} ({os_reason(err)}) — set outbox.path to a file in a directory on a"
            " writable disk, e.g. /var/lib/tillsync/outbox.db")


def _os_failure(err: OSError) -> str:
    """One line for a file or system error nothing more specific recognised."""
    from agent.checks import os_reason

    where = f"{os.fsdecode(err.filename)}: " if err.filename is not None else ""
    if err.errno in (errno.EACCES, errno.EPERM):
        return (f"{where}permission denied for user {_user()} — run as a user allowed to"
                " use it (e.g. the agent's service user), or fix its owner")
    if err.errno == errno.ENOENT:
        return f"{where}no such file or directory — check the path"
    return f"{where}{os_reason(err)} — check the path, its permissions and the disk"


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _user() -> str:
    """Return the name of the user this process runs as."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return "this user"


def _owner(path: Path) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (ImportError, KeyError, OSError):
        return None


def _dispatch(args: argparse.Namespace, context: Context) -> int:
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(seconds=args.seconds)
    if args.command == "init":
        return _init(args)
    if args.command == "run":
        return _run(args, context)
    if args.command == "print":
        return _print_preview(args)
    if args.command == "check":
        from rich.console import Console

        from agent.checks import run_checks

        return asyncio.run(run_checks(_config_path(args), console=Console()))
    return asyncio.run(_remote(args))


def _config_path(args: argparse.Namespace) -> Path:
    from agent.config import default_config_path

    return Path(args.config) if args.config else default_config_path()


def _init(args: argparse.Namespace) -> int:
    from agent.config import default_config_path
    from agent.init import init_setup

    if args.dir:
        result = init_setup(args.dir)
    else:
        # The file `run` and `check` will look for: $TILLSYNC_CONFIG, else the system path.
        target = default_config_path()
        result = init_setup(target.parent, config_name=target.name)
    print(f"wrote {result.config_path} and {result.key_path}")
    print("tokens (shown once; they are also in the config file):")
    print(f"  status token (head office, tillsync status): {result.status_token}")
    for terminal, token in result.terminal_tokens.items():
        print(f"  terminal {terminal}: {token}")
    print(f"next: edit {result.config_path}, then `tillsync check --config"
          f" {result.config_path}` and `tillsync run --config {result.config_path}`")
    print(f"keep a backup of {result.key_path}: without it the queued events cannot be read")
    return 0


def _print_preview(args: argparse.Namespace) -> int:
    from agent import preview

    try:
        txn = (preview.load_transaction(args.transaction) if args.transaction
               else preview.SAMPLE_TRANSACTION)
        image = preview.render_receipt_png(txn, args.preview, width_mm=args.width,
                                           store_name=args.store_name)
    except preview.PreviewError as err:
        print(f"tillsync: {err}", file=sys.stderr)
        return 2
    print(f"wrote the receipt of {txn['transaction_id']} ({args.width} mm,"
          f" {image.width}×{image.height} px) to {args.preview}")
    return 0


def _run(args: argparse.Namespace, context: Context) -> int:
    from agent import quiet_libraries
    from agent.config import load_config
    from agent.runtime import serve

    config = load_config(_config_path(args))
    context.config = config
    logging.basicConfig(level=config.logging.level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(config.logging.level)
    asyncio.run(serve(config))
    return 0


async def _remote(args: argparse.Namespace) -> int:
    from rich.console import Console

    from agent import operator

    console = Console()
    direct = getattr(args, "config", None)
    url, token = (None, None) if direct else _url_and_token(args)
    if args.command == "status":
        assert url is not None and token is not None
        return await operator.status_command(url, token, as_json=args.json, console=console)
    if args.command == "keys":
        return await operator.keys_rotate_command(url=url, token=token, config_path=direct,
                                                  console=console)
    return await operator.outbox_command(
        args.action, url=url, token=token, config_path=direct,
        state=getattr(args, "state", None), event_id=getattr(args, "event_id", None),
        all_dead=getattr(args, "all_dead", False), as_json=args.json, console=console)


def _url_and_token(args: argparse.Namespace) -> tuple[str, str]:
    """Find the agent's URL and status token: flags, then environment, then config."""
    from agent.operator import OperatorError

    # An empty variable counts as unset, not as an empty token.
    url, token = args.url, args.token or os.environ.get(TOKEN_ENV) or None
    if url and token:
        return url, token
    config, why_not, fix = _default_config()
    if url is None:
        url = _url_of(config) if config is not None else DEFAULT_URL
    if token is None:
        if config is None:
            raise OperatorError(f"no status token: {why_not} — pass --token or set"
                                f" ${TOKEN_ENV}, or {fix}")
        token = config.api.status_token.get_secret_value()
    return url, token


def _default_config() -> tuple[Any, str, str]:
    """Load the default config file: (config, "", "") or (None, why not, what to do)."""
    from agent.config import ENV_CONFIG, ConfigError, default_config_path, load_config

    path = default_config_path()
    named = f" (from ${ENV_CONFIG})" if os.environ.get(ENV_CONFIG) else ""
    try:
        return load_config(path), "", ""
    except ConfigError as err:
        if not path.exists():
            return (None, f"the config file {path}{named} does not exist",
                    f"point ${ENV_CONFIG} at the agent's config file")
        if not os.access(path, os.R_OK):
            return (None, f"the config file {path}{named} is not readable by user {_user()}",
                    "run as a user who can read it (e.g. with sudo)")
        problems = [p.removeprefix(f"{path}: ") for p in err.problems]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return (None, f"the config file {path}{named} does not load: {problems[0]}{more}",
                "fix the config file (`tillsync check` lists every problem)")


def _url_of(config: Any) -> str:
    host = config.api.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104  (a wildcard bind: talk to loopback)
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.api.port}"
