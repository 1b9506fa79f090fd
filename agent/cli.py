"""The ``tillsync`` command line (CONTRACT §2).

Every failure prints one line (what, why, what to do) and exits non-zero; ``--debug``
shows the traceback instead. Exit status: 0 done, 1 failed, 2 bad configuration or usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="see it work: agent, tills and a flaky cloud",
                               description="Run the agent in a temporary directory with three"
                               " emulated tills and a stand-in cloud that goes offline and"
                               " comes back; exit 0 only if every sale arrived exactly once.")
    demo.add_argument("--seconds", type=float, default=30.0,
                      help="how long the tills ring up sales (default 30)")

    init = commands.add_parser("init", help="write agent.toml, a new outbox key and tokens",
                               description="Write a commented agent.toml, a new outbox key"
                               " (mode 0600) and random tokens into DIR; print the tokens once."
                               " Never overwrites an existing key or config.")
    init.add_argument("--dir", type=Path, default=None,
                      help="where to write (default: the directory of the default config path)")

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
    actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
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
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    rotate = key_actions.add_parser("rotate", help="new data key for new records; old keys"
                                    " stay until nothing needs them")
    _remote_args(rotate, direct=True)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if args.debug:
            raise
        code, line = describe_failure(err)
        print(f"tillsync: {line}", file=sys.stderr)
        return code


def describe_failure(err: BaseException) -> tuple[int, str]:
    """Exit status and one line for any failure a command can meet."""
    from agent.config import ConfigError
    from agent.lockfile import LockHeld
    from agent.operator import OperatorError

    if isinstance(err, ConfigError):
        return 2, str(err).replace("\n", "\ntillsync: ")
    if isinstance(err, OutboxError):
        return 1, f"{err}" + (f" ({err.hint})" if err.hint else "")
    if isinstance(err, LockHeld):
        return 1, f"{err}; stop the other agent, or drop --config to use the running agent"
    if isinstance(err, FileExistsError | FileNotFoundError | PermissionError):
        return 1, str(err)
    if isinstance(err, OSError):
        return 1, f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    if isinstance(err, OperatorError):
        return 1, str(err)
    return 1, f"unexpected error: {type(err).__name__}: {err} (run with --debug for details)"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(seconds=args.seconds)
    if args.command == "init":
        return _init(args)
    if args.command == "run":
        return _run(args)
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

    directory = args.dir if args.dir else default_config_path().parent
    result = init_setup(directory)
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


def _run(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.runtime import serve

    config = load_config(_config_path(args))
    logging.basicConfig(level=config.logging.level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
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

    url, token = args.url, args.token or os.environ.get(TOKEN_ENV)
    if url and token:
        return url, token
    config = _config_if_readable()
    if url is None:
        url = _url_of(config) if config is not None else DEFAULT_URL
    if token is None:
        if config is None:
            raise OperatorError(f"no status token: pass --token, set ${TOKEN_ENV}, or make the"
                               " config file readable")
        token = config.api.status_token.get_secret_value()
    return url, token


def _config_if_readable() -> Any:
    from agent.config import ConfigError, default_config_path, load_config

    path = default_config_path()
    try:
        return load_config(path) if os.access(path, os.R_OK) else None
    except ConfigError:
        return None


def _url_of(config: Any) -> str:
    host = config.api.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104  (a wildcard bind: talk to loopback)
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.api.port}"

