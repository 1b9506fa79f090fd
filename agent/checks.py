"""``tillsync check``: is this machine ready to run the agent? One line per check.

Every check only looks: the database is opened read-only (the agent may be running and the
outbox has a single writer), the outbox directory gets a temporary file created and removed
at once, sinks get one ``HEAD`` request with the credentials the agent would send (so a
refused token shows here, not as a paused sink later), and the listen address is bound and
released at once. A ``FAIL`` line says what, why and what to do, and means `tillsync run`
would fail or not deliver; ``warn`` is worth a look but does not stop the agent; the exit
status is 1 when anything failed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from rich.console import Console
from rich.text import Text

from agent.config import AgentConfig, ConfigError, inline_secrets, load_config
from drivers.base import DeviceError, load_drivers
from outbox import schema
from outbox.crypto import KeyRing, load_key_file
from outbox.errors import KeyFileError, OutboxCorrupt
from outbox.sinks.webhook import USER_AGENT, signature, tls_context, without_secrets

Level = Literal["ok", "warn", "FAIL", "skip"]
LEVEL_STYLE = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "skip": "dim"}

LOW_DISK_BYTES = 1 << 30  # under this much free space the outbox may soon refuse events
CLOCK_FAIL_S = 300.0  # webhook signatures are refused beyond 5 min of skew
CLOCK_WARN_S = 30.0
NAME_WIDTH = 12
# What the agent does on these answers (CONTRACT §6): pause the sink until someone fixes the
# credentials. 404 and 405 pause it too, but a probe's HEAD often gets them from an endpoint
# that takes POSTs, so they stay "reachable" here.
# 401 and 407 can only mean the credentials. A 403 may also be a gateway refusing a method
# the route does not take (AWS API Gateway answers HEAD on a POST-only route with 403
# "Missing Authentication Token"), so it is a warning: check cannot tell the two apart.
REFUSED_CREDENTIALS = frozenset({401, 407})
MAYBE_REFUSED = 403


@dataclass(frozen=True)
class Check:
    """The outcome of one check, printed as one line."""

    level: Level
    name: str
    detail: str


@dataclass(frozen=True)
class SinkProbe:
    """What probing one sink found; ``clock_offset_s`` > 0 means our clock is ahead."""

    check: Check
    clock_offset_s: float | None = None


async def run_checks(config_path: Path, *, console: Console, timeout_s: float = 5.0) -> int:
    """Check config, key, database, disk, sinks, clock, devices and listen address."""
    failed = False

    def report(check: Check) -> None:
        nonlocal failed
        failed = failed or check.level == "FAIL"
        # soft_wrap: one check stays one line when piped (a terminal still wraps it).
        console.print(_line(check), soft_wrap=True)

    try:
        config = load_config(config_path)
    except ConfigError as err:
        for check in config_failures(config_path, err):
            report(check)
        return 1
    report(check_config_file(config_path))

    key_ok = check_key(config)
    report(key_ok)
    report(await asyncio.to_thread(check_database_blocking, config.outbox.path,
                                   config.outbox.key_file, key_usable=key_ok.level == "ok"))
    report(check_outbox_dir(config.outbox.path))

    settings = [sink.settings() for sink in config.sinks]
    probes = await asyncio.gather(*(
        probe_sink(sink.name, sink.url, sink.ca_bundle, timeout_s=timeout_s,
                   token=setting.token, signing_secret=setting.signing_secret)
        for sink, setting in zip(config.sinks, settings, strict=True)))
    for probe in probes:
        report(probe.check)
    report(check_clock(config, probes))

    for check in await asyncio.gather(*(probe_device(device, timeout_s=timeout_s)
                                        for device in config.devices)):
        report(check)

    report(await check_listen(config.api.host, config.api.port, timeout_s=timeout_s))
    return 1 if failed else 0


async def probe_device(device: Any, *, timeout_s: float) -> Check:
    """Ask the device's driver whether its kind of device answers at the configured URL."""
    name = f"device {device.name}"
    where = f"{device.type} {device.url}"
    if not device.enabled:
        return Check("skip", name, f"{where}: disabled")
    driver = load_drivers().get(device.driver_type())
    if driver is None:
        return Check("FAIL", name, f"{where}: no driver {device.driver_type()!r} is installed"
                                   " — reinstall tillsync")
    try:
        answers = await asyncio.wait_for(driver.probe(device.url, timeout_s=min(timeout_s, 2.0)),
                                         timeout_s + 1)
    except (TimeoutError, OSError, DeviceError) as err:
        answers, why = False, str(err) or type(err).__name__
    else:
        why = "no answer"
    if answers:
        return Check("ok", name, f"{where}: answers")
    return Check("FAIL", name, f"{where}: {why} — check the cable, power and URL (a running"
                               " agent holds the device, which also makes this fail)")


def _line(check: Check) -> Text:
    # Text, not markup: paths and server messages may hold "[" and must print as they are.
    line = Text(f"{check.level:<5}", style=LEVEL_STYLE[check.level])
    line.append(f" {check.name:<{NAME_WIDTH}} {check.detail}")
    return line


# -- config file --------------------------------------------------------------------------


def config_failures(path: Path, err: ConfigError) -> list[Check]:
    """One FAIL line per problem; the first also says what to do (unless it already does)."""
    advice = " — fix it, then run `tillsync check` again" if path.exists() else ""
    return [Check("FAIL", "config", problem + (advice if index == 0 else ""))
            for index, problem in enumerate(err.problems)]


def check_config_file(path: Path) -> Check:
    """Warn when a config file holding inline secrets can be read by more than its users.

    Its readers should be root and the service user only (docs/config.md). The installer's
    ``root:<service user> 0640`` is fine: a group whose only member (besides the owner and
    root) is one user is taken as that service user's own group.
    """
    if sys.platform == "win32":  # ACLs, set by the MSI; POSIX modes mean nothing there
        return Check("ok", "config", str(path))
    try:
        st = path.stat()
        readers = _other_readers(st)
        secrets = inline_secrets(tomllib.loads(path.read_text(encoding="utf-8-sig"))) \
            if readers else []
    except (OSError, ValueError):
        return Check("ok", "config", str(path))  # it loaded; only the mode is unknown
    if not secrets:
        return Check("ok", "config", str(path))
    shown = ", ".join(secrets[:3]) + (f" and {len(secrets) - 3} more" if len(secrets) > 3
                                      else "")
    return Check("warn", "config", f"{path}: readable by {readers} (mode"
                 f" {stat.S_IMODE(st.st_mode):04o}) and holds secrets inline ({shown}) — run:"
                 f" chmod 600 {path} (or chown root:<service user> and chmod 640), or give"
                 " them as <key>_file or \"${ENV_VAR}\"")


def _other_readers(st: os.stat_result) -> str:
    """Who besides the owner, root and the service user can read the file; "" if nobody."""
    if st.st_mode & stat.S_IROTH:
        return "other users"
    if not st.st_mode & stat.S_IRGRP:
        return ""
    import grp
    import pwd

    try:
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        return f"group {st.st_gid}"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    members = set(group.gr_mem) | {user.pw_name for user in pwd.getpwall()
                                   if user.pw_gid == st.st_gid}
    members -= {"root", owner}
    if len(members) <= 1:
        return ""  # the service user's own group, as the installer sets it
    return f"group {group.gr_name} ({len(members)} users)"


# -- key and database ---------------------------------------------------------------------


def check_key(config: AgentConfig) -> Check:
    """Check the key file exists, is private to its owner and holds a 32-byte key."""
    key_file, db = config.outbox.key_file, config.outbox.path
    if key_file.is_dir():
        return Check("FAIL", "key", f"{key_file}: is a directory, not a key file — set"
                     " outbox.key_file to the file holding the key")
    if not key_file.exists() and _db_exists(db):
        return Check("FAIL", "key", f"{key_file}: missing, but the database {db} exists: a new"
                     " key would orphan its queue — restore the key file from backup; do not"
                     " run `tillsync init`")
    try:
        load_key_file(key_file)
    except KeyFileError as err:
        return Check("FAIL", "key", _strip_prefix(describe_key_error(err, db), key_file))
    except OSError as err:
        return Check("FAIL", "key", f"{key_file}: cannot read it ({err.strerror}) — run the"
                     " check as root or as the agent's service user")
    mode = "" if sys.platform == "win32" else f" (mode {key_file.stat().st_mode & 0o777:04o})"
    return Check("ok", "key", f"{key_file}{mode}")


def describe_key_error(err: KeyFileError, db: Path | None) -> str:
    """One line for a key file problem: what, why, what to do (``check`` and ``run``).

    It names the setting, ``outbox.key_file``. Never advises a new key while a database
    exists: it was written with the old one.
    """
    path = err.path
    if path.is_dir():
        return (f"outbox.key_file {path}: is a directory, not a key file — set"
                " outbox.key_file to the file holding the key")
    what = "outbox.key_file " + str(err).removeprefix("key file ")
    if err.hint:
        return f"{what} — {err.hint}"
    try:
        if path.stat().st_size == 0:
            what = f"outbox.key_file {path}: is empty"
    except OSError:
        pass
    if db is not None and _db_exists(db):
        return (f"{what} — restore the key file from backup; do not make a new key: the"
                f" database {db} can only be read with the key it was written with")
    return (f"{what} — restore the key file from backup (it holds 32 random bytes, base64,"
            " as `tillsync init` writes it)")


def _strip_prefix(message: str, key_file: Path) -> str:
    # The message says "key file PATH: why" or "outbox.key_file PATH: why"; the line already
    # says "key".
    return message.removeprefix("key file ").removeprefix("outbox.key_file ")


def _db_exists(db: Path) -> bool:
    # An empty file is what a crash during the first open leaves; Outbox.open treats it as new.
    try:
        return db.stat().st_size > 0
    except OSError:
        return False


def check_database_blocking(db: Path, key_file: Path, *, key_usable: bool) -> Check:
    """Run ``quick_check`` on a read-only connection and unwrap every data key."""
    if not _db_exists(db):
        return Check("ok", "database", f"{db} does not exist yet: the agent creates it on its"
                     " first start")
    try:
        # Read-only and never a writer: the agent may be running, and the outbox must have
        # exactly one writer (SQLite's WAL-reset bug with several writers checkpointing).
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        return Check("FAIL", "database", f"{db}: cannot open it read-only ({err}) — run the"
                     " check as root or as the agent's service user")
    try:
        return _inspect_blocking(conn, db, key_file, key_usable=key_usable)
    finally:
        conn.close()


def _inspect_blocking(conn: sqlite3.Connection, db: Path, key_file: Path, *,
                      key_usable: bool) -> Check:
    damaged = f" — {OutboxCorrupt.hint}"
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as err:
        if "locked" in str(err) or "busy" in str(err):
            return Check("warn", "database", f"{db}: busy ({err}); try again in a moment")
        return Check("FAIL", "database", f"{db}: unreadable: {err}{damaged}")
    if problems != ["ok"]:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        first = " ".join(problems[0].split())[:200]
        return Check("FAIL", "database", f"{db}: quick_check failed: {first}{more}{damaged}")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        rows = conn.execute("SELECT key_id, wrapped FROM data_keys ORDER BY key_id").fetchall()
    except sqlite3.DatabaseError as err:
        return Check("FAIL", "database", f"{db}: not a tillsync outbox ({err}) — check"
                     " outbox.path")
    if version > schema.LATEST:
        return Check("FAIL", "database", f"{db}: schema version {version} is newer than this"
                     f" tillsync knows ({schema.LATEST}) — run the version that wrote it")
    if not key_usable:
        return Check("warn", "database", f"{db}: quick_check ok; data keys not checked (the key"
                     " file failed above)")
    try:
        ring = KeyRing(load_key_file(key_file), key_file)
        for key_id, wrapped in rows:
            ring.add_wrapped(int(key_id), bytes(wrapped))
    except KeyFileError as err:
        return Check("FAIL", "database", f"{_strip_prefix(str(err), key_file)} — {err.hint}")
    keys = "data key unwraps" if len(rows) == 1 else "data keys unwrap"
    return Check("ok", "database", f"{db} (quick_check ok, {len(rows)} {keys} with the key"
                 " file)")


def check_outbox_dir(db: Path) -> Check:
    """Check the outbox directory (or where it will be created) is writable and roomy."""
    directory = db.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check("FAIL", "outbox dir", f"{existing} is not writable by this user — run the"
                     " check as the agent's service user, or chown the directory to it")
    # os.access only reads the mode bits: a read-only mount, /proc or a full inode table say
    # yes there, and only creating something tells. The agent creates <path>.lock first.
    creates = "files" if existing == directory else "directories"
    problem = _try_create_blocking(existing, directory=existing != directory)
    if problem is not None:
        return Check("FAIL", "outbox dir", f"{existing}: cannot create {creates} there"
                     f" ({problem}), so `tillsync run` would fail — set outbox.path to a file"
                     " in a directory on a writable disk, e.g. /var/lib/tillsync/outbox.db")
    try:
        free = shutil.disk_usage(existing).free
    except OSError as err:
        return Check("warn", "outbox dir", f"{existing}: cannot measure free space"
                     f" ({err.strerror})")
    note = "" if existing == directory else " (will be created)"
    if free < LOW_DISK_BYTES:
        return Check("warn", "outbox dir", f"{directory}{note}: only {_gib(free)} free — the"
                     " outbox refuses new events when the disk is full; free some space")
    return Check("ok", "outbox dir", f"{directory}{note} writable, {_gib(free)} free")


def _try_create_blocking(where: Path, *, directory: bool) -> str | None:
    """Create and remove a temporary file (or directory) in ``where``; why not, or None."""
    try:
        if directory:
            os.rmdir(tempfile.mkdtemp(prefix=".tillsync-check-", dir=where))
        else:
            fd, name = tempfile.mkstemp(prefix=".tillsync-check-", dir=where)
            os.close(fd)
            os.unlink(name)
    except OSError as err:
        return os_reason(err)
    return None


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


# -- sinks and clock ----------------------------------------------------------------------


async def probe_sink(name: str, url: str, ca_bundle: Path | str | None, *,
                     timeout_s: float, token: str | None = None,
                     signing_secret: str | None = None) -> SinkProbe:
    """Send one HEAD to the sink's URL, with the sink's credentials.

    Any HTTP answer means it is reachable, except a refusal of the credentials (401, 407):
    the agent would pause the sink, so that fails. A 403 warns (see ``MAYBE_REFUSED``).
    """
    label = f"sink {name}"
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    shown = without_secrets(url)  # a query or user-info may hold a credential
    try:
        context = tls_context(str(ca_bundle) if ca_bundle else None)
    except (OSError, ssl.SSLError) as err:
        return SinkProbe(Check("FAIL", label, f"{shown}: ca_bundle {ca_bundle} cannot be used"
                               f" ({getattr(err, 'strerror', None) or err}) — fix the path"))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    # The headers a delivery carries, so the sink judges the same credentials.
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if signing_secret:  # over the empty body a HEAD has
        headers["Tillsync-Signature"] = signature(signing_secret, int(time.time()), b"")
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
                session.head(url, allow_redirects=False, headers=headers) as resp:
            answered_at = time.time()
            status, date = resp.status, resp.headers.get("Date")
    except TimeoutError:
        return SinkProbe(Check("FAIL", label, f"{shown}: no answer from {host}:{port} within"
                               f" {timeout_s:g} s — check the network, firewall or proxy"))
    except aiohttp.ClientSSLError as err:
        return SinkProbe(Check("FAIL", label, f"{shown}: TLS failed: {_ssl_reason(err)} — check"
                               " the URL's host name, ca_bundle and this machine's clock"))
    except aiohttp.ClientConnectorError as err:
        return SinkProbe(Check("FAIL", label, f"{shown}: {_connect_reason(err, host, port)}"))
    except aiohttp.ClientError as err:
        return SinkProbe(Check("FAIL", label, f"{shown}: connected, but no HTTP answer"
                               f" ({_one_line(str(err)) or type(err).__name__}) — check the URL"))
    elapsed_ms = (time.monotonic() - started) * 1000
    offset = _clock_offset(date, answered_at)
    if status in REFUSED_CREDENTIALS:
        paused = "the agent would pause this sink (its events wait, none are lost)"
        if token:
            why = (f"the sink refused the credentials (HTTP {status}) — check the token of"
                   f" sink {name}; until it is right {paused}")
        else:
            why = (f"the sink wants credentials (HTTP {status}) and sink {name} has no token"
                   f" — set token (or token_file) in its [[sinks]] entry; until then {paused}")
        return SinkProbe(Check("FAIL", label, f"{shown}: {why}"), offset)
    if status == MAYBE_REFUSED:
        return SinkProbe(Check("warn", label, f"{shown} answered HTTP 403 to a HEAD — a refusal"
                               f" of sink {name}'s credentials, or a gateway that only takes"
                               " POST here; if deliveries get 403 too the agent pauses the"
                               " sink (its events wait, none are lost)"), offset)
    return SinkProbe(Check("ok", label, f"{shown} answered HTTP {status} in {elapsed_ms:.0f} ms"),
                     offset)


def _connect_reason(err: aiohttp.ClientConnectorError, host: str, port: int) -> str:
    os_error = err.os_error
    if isinstance(os_error, socket.gaierror) or type(err).__name__ == "ClientConnectorDNSError":
        why = getattr(os_error, "strerror", None) or "name not found"
        return f"{host} does not resolve ({why}) — check the URL and this machine's DNS"
    if isinstance(os_error, ConnectionRefusedError) or getattr(os_error, "errno", None) == \
            errno.ECONNREFUSED:
        return (f"{host}:{port} refused the connection — is the service up? check the URL's"
                " port and any firewall")
    code = getattr(os_error, "errno", None)
    # asyncio's strerror is "Connect call failed (...)"; the errno says what happened.
    why = os.strerror(code) if code and code > 0 else _one_line(str(err))
    return f"cannot connect to {host}:{port} ({why}) — check the network and the URL"


def _ssl_reason(err: aiohttp.ClientSSLError) -> str:
    cert_error = getattr(err, "certificate_error", None)
    if cert_error is not None:
        return str(getattr(cert_error, "verify_message", None) or cert_error)
    os_error = getattr(err, "os_error", None)
    reason = getattr(os_error, "reason", None)
    return str(reason or os_error or err)


def _clock_offset(date: str | None, local: float) -> float | None:
    if not date:
        return None
    try:
        return local - parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None


def check_clock(config: AgentConfig, probes: Sequence[SinkProbe]) -> Check:
    """Compare our clock with the Date header of the first sink that answered."""
    for sink, probe in zip(config.sinks, probes, strict=True):
        offset = probe.clock_offset_s
        if offset is None:
            continue
        way = "ahead of" if offset > 0 else "behind"
        skew = f"{abs(offset):.0f} s {way} sink {sink.name}'s"
        if abs(offset) > CLOCK_FAIL_S:
            return Check("FAIL", "clock", f"this machine's clock is {skew} — fix time sync"
                         " (timedatectl set-ntp true); signatures and TLS fail with a wrong"
                         " clock")
        if abs(offset) > CLOCK_WARN_S:
            return Check("warn", "clock", f"this machine's clock is {skew}; check time sync"
                         " (timedatectl)")
        return Check("ok", "clock", f"within {max(1.0, abs(offset)):.0f} s of sink {sink.name}")
    if not config.sinks:
        return Check("skip", "clock", "skipped: no sinks to compare with")
    return Check("warn", "clock", "not compared: no sink answered with a Date header")


# -- listen address -----------------------------------------------------------------------


async def check_listen(host: str, port: int, *, timeout_s: float) -> Check:
    """Check the listen address can be bound, or that the agent already has it."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        await asyncio.to_thread(bind_blocking, host, port)
    except OSError as err:
        if err.errno == errno.EADDRINUSE and not isinstance(err, socket.gaierror):
            if await _answers_healthz(host, port, timeout_s):
                return Check("warn", "listen", f"{where} in use (is the agent running?) — a"
                             " tillsync agent answers there")
            return Check("FAIL", "listen", f"{where} is in use by another program (no tillsync"
                         " agent answers /healthz there), so `tillsync run` would fail — stop"
                         " that program, or set api.listen to a free port")
        return Check("FAIL", "listen", f"{where}: {listen_failure(err, host, port)}")
    return Check("ok", "listen", f"{where} free")


def listen_failure(err: OSError, host: str, port: int) -> str:
    """Why binding ``host:port`` failed and what to do: the words of both check and run."""
    if isinstance(err, socket.gaierror):
        return (f"the host name {host} does not resolve ({err.strerror or err}) — set"
                f" api.listen to an address of this machine, e.g. 127.0.0.1:{port}, or"
                f" 0.0.0.0:{port} for every address")
    if err.errno == errno.EADDRINUSE:
        return (f"port {port} is already in use (another program, or another tillsync"
                " agent, listens there) — stop it, or set api.listen to a free port")
    if err.errno == errno.EADDRNOTAVAIL:
        return (f"{host} is not an address of this machine — set api.listen to one of"
                f" its addresses, or 0.0.0.0:{port} for every address")
    if err.errno in (errno.EACCES, errno.EPERM):
        return ("permission denied (ports below 1024 need extra rights) — set"
                " api.listen to a port above 1023")
    return f"{os_reason(err)} — fix api.listen"


def os_reason(err: OSError) -> str:
    """Return the system's reason for ``err``, lower-cased to sit inside a sentence."""
    why = err.strerror or (os.strerror(err.errno) if err.errno else type(err).__name__)
    return why[:1].lower() + why[1:]


def bind_blocking(host: str, port: int) -> None:
    """Bind (and release) every address ``host`` resolves to, as the agent's server would."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            # The same options asyncio's create_server sets, so a port in TIME_WAIT after
            # an agent restart is not reported as taken.
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


async def _answers_healthz(host: str, port: int, timeout_s: float) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104  (wildcard bind)
    target = "[::1]" if target == "::" else f"[{target}]" if ":" in target else target
    timeout = aiohttp.ClientTimeout(total=min(timeout_s, 2.0))
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"http://{target}:{port}/healthz") as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return resp.status == 200 and isinstance(body, dict) and body.get("status") == "ok"


def _one_line(text: str) -> str:
    return " ".join(text.split())
