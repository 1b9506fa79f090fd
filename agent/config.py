"""The agent's configuration: one pydantic tree read from a TOML file (CONTRACT §3).

Reading takes three steps; each reports every problem it finds, not just the first:

1. TOML syntax (``tomllib``): ``<source>: line N: <message>``.
2. Secrets. Every ``SecretStr`` field ``x`` may be given inline, inline as exactly
   ``"${ENV_VAR}"``, or as ``x_file = "path"``. They are resolved on the raw TOML dict, so
   the models only ever see final values and ``x_file`` keys never reach them.
3. Validation by the models below. Pydantic's errors are rewritten into one plain line
   each: ``<source>: <dotted.key[i]>: <reason> (got <value>)``. A secret's value is never
   shown (nor the value of an unknown key whose name looks like a secret's), and no
   pydantic exception is chained (its repr would carry the input).

Every field has a description: docs/config.md and the sample written by ``tillsync init``
are generated from them (``agent.configdoc``), so the two cannot drift from the code.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import string
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from drivers.base import DeviceError
from drivers.escpos.commands import drawer_pulse
from drivers.escpos.printer import DEFAULT_OPTIONS as _ESCPOS
from drivers.manager import DEFAULT_POLL_S, DEFAULT_RECONNECT_MAX_S, DEFAULT_RECONNECT_MIN_S
from drivers.transport import parse_device_url
from outbox.classify import OnConflict
from outbox.sinks import SinkPolicy, WebhookSettings
from outbox.sinks.base import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_CAP_S,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_PAUSE_RECHECK_S,
)
from outbox.sinks.webhook import DEFAULT_TIMEOUT_S

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
TERMINAL_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
SHA256_HEX_PATTERN = r"^[0-9A-Fa-f]{64}$"
# A Host header name without port: a DNS name, an IPv4 address, or an IPv6 one in brackets.
HOST_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})$"
DEVICE_URL_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://.+$"

# Plain words for the patterns above, used in error messages instead of the regex.
_PATTERN_WORDS = {
    NAME_PATTERN: "must be 1-64 characters of A-Z a-z 0-9 . _ -",
    TERMINAL_ID_PATTERN: "must be 1-64 characters of A-Z a-z 0-9 . _ : -",
    SHA256_HEX_PATTERN: "must be 64 hex digits (a SHA-256 digest)",
    HOST_PATTERN: "must be a host name or IP address without port (IPv6 in brackets)",
    DEVICE_URL_PATTERN: "must be a URL such as tcp://192.168.1.50:9100",
}

EventKind = Literal["transaction", "inventory_adjustment"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)

ENV_CONFIG = "TILLSYNC_CONFIG"
ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential=
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MASK = "'***'"
# An unknown key whose name holds one of these (or is close to a secret key's name, a typo of
# it) may hold a secret: its value is never shown.
_SECRET_WORDS = ("token", "secret", "password", "passwd", "pwd", "key", "auth", "credential")
MAX_SECRET_BYTES = 64 * 1024  # a token or key; anything bigger is the wrong file


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per reason."""

    hint = "fix the configuration file, then run `tillsync check`"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Problem(ValueError):
    """A validator's complaint about a place below the validated value (e.g. one list item)."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


# ---------------------------------------------------------------- reusable field types


def _not_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _against_config_dir(value: Path, info: ValidationInfo) -> Path:
    # Relative paths mean "next to the config file", not "wherever the daemon was started".
    base = (info.context or {}).get("base_dir")
    if value.is_absolute() or base is None:
        return value
    return Path(base) / value


ConfigPath = Annotated[Path, BeforeValidator(_not_blank), AfterValidator(_against_config_dir)]


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError's str() must not print a secret even when
    # someone validates a model directly, without going through parse_config.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True,
                              allow_inf_nan=False)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _first_duplicate(names: Sequence[str]) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            return seen[name], index
        seen[name] = index
    return None


def _unique(items: Sequence[Any], attr: str, what: str, where: str) -> None:
    clash = _first_duplicate([getattr(item, attr) for item in items])
    if clash:
        first, again = clash
        name = getattr(items[again], attr)
        raise _Problem(f"duplicate {what} {name!r} (already used by {where}[{first}])",
                       again, attr)


# ---------------------------------------------------------------- [store]


class StoreConfig(_Section):
    """The store this agent runs in."""

    id: str = Field(pattern=NAME_PATTERN, examples=["store-042"], description=(
        "Identifies the store in every event sent to a sink and in the idempotency keys; "
        "keep it stable for the life of the store."))
    alert_after_s: float = Field(default=900.0, gt=0, description=(
        "Status turns \"degraded\" when the oldest undelivered event is older than this "
        "many seconds."))
    name: str | None = Field(default=None, min_length=1, max_length=64,
                             pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
                             examples=["Corner Shop Rosenheim"], description=(
        "Printed at the top of every receipt (POST /v1/print); at most 64 characters. "
        "Not set: the store id."))


# ---------------------------------------------------------------- [api]


def split_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:8765``) into host and port; ValueError if bad."""
    example = "e.g. 127.0.0.1:8765 or [::1]:8765"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        sep, port = rest[:1], rest[1:]
        bracketed = True
    else:
        host, sep, port = value.rpartition(":")
        bracketed = False
    if sep != ":" or not host:
        raise ValueError(f"must be host:port, {example}")
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as err:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from err
    elif ":" in host:
        raise ValueError(f"an IPv6 address must be in brackets, {example}")
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise ValueError(f"must be host:port, {example}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(port)


def _check_listen(value: str) -> str:
    split_listen(value)
    return value


class TerminalConfig(_Section):
    """A POS terminal allowed to post events; it may post only for its own id."""

    id: str = Field(pattern=TERMINAL_ID_PATTERN, examples=["T01"], description=(
        "The terminal_id this terminal sends in its events."))
    token: SecretStr | None = Field(default=None, description=(
        "Bearer token the terminal presents. Give this or token_sha256, not both."))
    token_sha256: str | None = Field(default=None, pattern=SHA256_HEX_PATTERN, description=(
        "SHA-256 of the token, as hex, so the file holds no secret "
        "(`printf %s TOKEN | sha256sum`)."))

    @field_validator("token_sha256")
    @classmethod
    def _lowercase(cls, value: str | None) -> str | None:
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _one_token(self) -> TerminalConfig:
        if (self.token is None) == (self.token_sha256 is None):
            got = "both" if self.token is not None else "neither"
            raise ValueError(
                f"needs exactly one of token (or token_file) and token_sha256, got {got}")
        return self

    def matches(self, presented: str) -> bool:
        """Tell, in constant time, whether ``presented`` is this terminal's token."""
        given = presented.encode("utf-8", "surrogatepass")
        if self.token is not None:
            return hmac.compare_digest(given, self.token.get_secret_value().encode(
                "utf-8", "surrogatepass"))
        assert self.token_sha256 is not None  # the validator demands one of the two
        return hmac.compare_digest(hashlib.sha256(given).hexdigest(), self.token_sha256)

    def fingerprint(self) -> str:
        """Return the SHA-256 hex of the token, whichever way it was given."""
        if self.token is not None:
            return _fingerprint(self.token.get_secret_value())
        assert self.token_sha256 is not None
        return self.token_sha256


class ApiConfig(_Section):
    """The local HTTP API that terminals and head office talk to."""

    listen: Annotated[str, AfterValidator(_check_listen)] = Field(
        default="127.0.0.1:8765", description=(
            "Address and port to listen on, `host:port` (IPv6 as `[::1]:8765`). Terminals on "
            "the LAN need the store PC's address here, or `0.0.0.0`."))
    status_token: SecretStr = Field(description=(
        "Bearer token for head office: /v1/status, /metrics and the admin endpoints."))
    terminals: list[TerminalConfig] = Field(default=[], description=(
        "The terminals allowed to post events; see [[api.terminals]]."))
    allowed_hosts: list[Annotated[str, Field(pattern=HOST_PATTERN)]] = Field(
        default=[], examples=[["store-042.local"]], description=(
            "Extra names accepted in the Host header, besides the listen address, localhost "
            "and this machine's own addresses (e.g. the store PC's DNS name). Requests naming "
            "any other host are refused, against DNS rebinding."))

    @field_validator("allowed_hosts")
    @classmethod
    def _lowercase_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.lower() for host in hosts]

    @field_validator("terminals")
    @classmethod
    def _unique_terminals(cls, terminals: list[TerminalConfig]) -> list[TerminalConfig]:
        _unique(terminals, "id", "terminal id", "terminals")
        return terminals

    @model_validator(mode="after")
    def _own_tokens(self) -> ApiConfig:
        # A shared token would let one terminal post as another, or as head office read all.
        owners = {_fingerprint(self.status_token.get_secret_value()): "status_token"}
        for index, terminal in enumerate(self.terminals):
            key = "token" if terminal.token is not None else "token_sha256"
            owner = owners.setdefault(terminal.fingerprint(), f"terminals[{index}]")
            if owner != f"terminals[{index}]":
                raise _Problem(f"same token as {owner}; every terminal needs its own token",
                               "terminals", index, key)
        return self

    @property
    def host(self) -> str:
        """Return the host part of ``listen`` (IPv6 without brackets)."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """Return the port part of ``listen``."""
        return split_listen(self.listen)[1]


# ---------------------------------------------------------------- [outbox]


class OutboxConfig(_Section):
    """The encrypted on-disk queue that holds every accepted event until delivered."""

    path: ConfigPath = Field(examples=["/var/lib/tillsync/outbox.db"], description=(
        "The SQLite database file. Relative paths are relative to this config file."))
    key_file: ConfigPath = Field(examples=["/etc/tillsync/outbox.key"], description=(
        "The master key: 32 random bytes, base64, readable by the service user only "
        "(`tillsync init` creates it). Losing it makes the queue unreadable."))
    durability: Literal["full", "normal"] = Field(default="full", description=(
        "full: every accepted event survives a power cut. normal: survives a crash of "
        "tillsync, may lose the last events on power loss; only for storage too slow for full."))
    capacity_bytes: int | None = Field(default=None, gt=0, examples=[2_000_000_000], description=(
        "Refuse new events (HTTP 507) beyond this database size; nothing accepted is ever "
        "dropped to make room. Not set: limited by free disk space."))
    disk_reserve_bytes: int = Field(default=8 * 1024 * 1024, ge=0, description=(
        "Disk kept free for deliveries, as a file beside the database (<path>.reserve). "
        "When the disk fills up the file is deleted, so the relay can still record what it "
        "delivers while new events get HTTP 507; they are accepted again once twice this "
        "much is free. 0: no reserve (a full disk then also stops delivery)."))
    retention_days: float = Field(default=7.0, gt=0, description=(
        "Days to keep the payload of an event every sink has received, then purge it."))
    forget_after_days: float = Field(default=30.0, gt=0, description=(
        "Days to remember a purged event's ids, so a terminal resending it is still answered "
        "as a duplicate. At least retention_days."))

    @model_validator(mode="after")
    def _coherent(self) -> OutboxConfig:
        if self.forget_after_days < self.retention_days:
            raise _Problem(f"must be at least retention_days ({self.retention_days:g})",
                           "forget_after_days")
        if self.path == self.key_file:
            raise _Problem("must not be the same file as path", "key_file")
        return self


# ---------------------------------------------------------------- [[sinks]]


def _check_http_url(value: str) -> str:
    bad = ValueError("must be an http(s) URL, e.g. https://api.example.com/pos/events")
    if any(char.isspace() or not char.isprintable() for char in value):
        raise bad
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as err:
        raise bad from err
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise bad
    return value


def _check_lookup_url(value: str) -> str:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value)
                  if name is not None]
    except ValueError as err:
        raise ValueError("has unbalanced { or }; the only placeholder is {idempotency_key}") \
            from err
    if any(item != ("idempotency_key", "", None) for item in fields):
        raise ValueError("the only placeholder allowed is {idempotency_key}")
    _check_http_url(value.format(idempotency_key="key"))
    return value


class WebhookSinkConfig(_Section):
    """Posts each event as JSON, with an Idempotency-Key, to one HTTP(S) endpoint."""

    type: Literal["webhook"] = Field(description="Sink type: \"webhook\".")
    name: str = Field(pattern=NAME_PATTERN, examples=["cloud"], description=(
        "Unique name of the sink, shown in status, metrics and logs. Renaming it starts a new "
        "queue: events pending for the old name stay there."))
    url: Annotated[str, AfterValidator(_check_http_url)] = Field(
        examples=["https://api.example.com/pos/events"],
        description="Where events are POSTed; `http://` or `https://`.")
    kinds: list[EventKind] | None = Field(default=None, examples=[["transaction"]], description=(
        "Which event kinds this sink receives. Not set: all kinds."))
    token: SecretStr | None = Field(default=None, description=(
        "Sent as `Authorization: Bearer <token>` when set."))
    signing_secret: SecretStr | None = Field(default=None, description=(
        "When set, each request carries a `Tillsync-Signature` header: HMAC-SHA256 of "
        "`<unix time>.<body>` under this secret."))
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=300, description=(
        "Seconds to wait for an answer before the attempt counts as in doubt and is retried."))
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=64, description=(
        "Requests in flight to this sink at once (events of one terminal stay in order)."))
    rate_limit_per_s: float | None = Field(default=None, gt=0, examples=[20], description=(
        "At most this many requests per second. Not set: no limit."))
    max_retry_after_s: float = Field(default=DEFAULT_MAX_RETRY_AFTER_S, gt=0, description=(
        "Longest Retry-After (from a 429 or 503) honoured, in seconds."))
    backoff_base_s: float = Field(default=DEFAULT_BACKOFF_BASE_S, gt=0, description=(
        "First retry delay in seconds; doubles per failed attempt, with full jitter."))
    backoff_cap_s: float = Field(default=DEFAULT_BACKOFF_CAP_S, gt=0, description=(
        "Longest retry delay in seconds. The default lets delivery resume within 15 s of "
        "the network returning."))
    pause_recheck_s: float = Field(default=DEFAULT_PAUSE_RECHECK_S, gt=0, description=(
        "Seconds between probes of a sink paused by 401, 403, 404, 405 or 407."))
    on_conflict: OnConflict = Field(default="retry", description=(
        "What an HTTP 409 answer means: retry later, count it as delivered, or dead-letter "
        "the event."))
    lookup_url: Annotated[str, AfterValidator(_check_lookup_url)] | None = Field(
        default=None, examples=["https://api.example.com/pos/events/{idempotency_key}"],
        description=(
            "Optional GET endpoint that settles an in-doubt delivery without resending it: "
            "2xx means received, 404 means not. `{idempotency_key}` is replaced by the key."))
    ca_bundle: ConfigPath | None = Field(
        default=None, examples=["/etc/tillsync/ca.pem"], description=(
            "PEM file of extra CA certificates to trust, besides the system's."))

    @field_validator("kinds")
    @classmethod
    def _some_kinds(cls, kinds: list[str] | None) -> list[str] | None:
        if kinds == []:
            raise ValueError("must name at least one kind; leave kinds out to receive all")
        return None if kinds is None else list(dict.fromkeys(kinds))

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookSinkConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise _Problem(f"must be at least backoff_base_s ({self.backoff_base_s:g})",
                           "backoff_cap_s")
        return self

    def policy(self) -> SinkPolicy:
        """Return the relay's pacing policy for this sink."""
        return SinkPolicy(
            concurrency=self.concurrency, rate_limit_per_s=self.rate_limit_per_s,
            backoff_base_s=self.backoff_base_s, backoff_cap_s=self.backoff_cap_s,
            max_retry_after_s=self.max_retry_after_s, pause_recheck_s=self.pause_recheck_s,
            on_conflict=self.on_conflict)

    def settings(self) -> WebhookSettings:
        """Return the webhook sink's settings, secrets revealed (only here)."""
        return WebhookSettings(
            url=self.url, token=_reveal(self.token), signing_secret=_reveal(self.signing_secret),
            timeout_s=self.timeout_s, lookup_url=self.lookup_url,
            ca_bundle=None if self.ca_bundle is None else str(self.ca_bundle))


# Add a sink type: a model with `type: Literal[...]`, `name` and `kinds`, joined here with |.
SinkConfig = Annotated[WebhookSinkConfig, Field(discriminator="type")]


# ---------------------------------------------------------------- [[devices]]


def _check_device_url(value: str) -> str:
    if value.startswith("evdev:///dev/input/"):
        return value  # a HID keyboard-wedge scanner (scanner type only; Linux)
    try:
        parse_device_url(value)
    except DeviceError as err:
        raise ValueError(str(err)) from None
    return value


DeviceUrl = Annotated[str, Field(pattern=DEVICE_URL_PATTERN), AfterValidator(_check_device_url)]


class _DeviceSection(_Section):
    """Keys every device type shares: name, url, enabled and the supervision pace."""

    type: str = Field(description="Device type.")  # narrowed by each type; listed first
    name: str = Field(pattern=NAME_PATTERN, examples=["receipt"], description=(
        "Unique name of the device; terminals use it, e.g. as the printer of /v1/print."))
    url: DeviceUrl = Field(examples=["tcp://192.168.1.50:9100"], description=(
        "How to reach the device: `tcp://host:port`, `serial:///dev/ttyUSB0?baudrate=19200` "
        "or `usb://04b8:0202` (vendor:product)."))
    enabled: bool = Field(default=True, description=(
        "false keeps the entry but leaves the device alone (status shows it as disabled)."))
    poll_s: float = Field(default=DEFAULT_POLL_S, gt=0, le=3600, description=(
        "Seconds between status checks while the device answers; a change (paper out, "
        "unplugged) shows in status within this time."))
    reconnect_max_s: float = Field(default=DEFAULT_RECONNECT_MAX_S, gt=0, le=300, description=(
        "Longest wait between reconnect attempts while the device is away; attempts start "
        f"at {DEFAULT_RECONNECT_MIN_S:g} s and double up to this, so a replugged device is "
        "back within this time."))

    @property
    def kind(self) -> str:
        """Return the device kind shown in status and metrics (printer, scanner, scale)."""
        raise NotImplementedError

    def driver_type(self) -> str:
        """Return the `tillsync.drivers` entry point name of this device's driver."""
        raise NotImplementedError

    def driver_options(self) -> dict[str, Any]:
        """Return the driver's own options (the keys below the shared ones)."""
        shared = set(_DeviceSection.model_fields) | {"type"}
        return {key: getattr(self, key) for key in type(self).model_fields
                if key not in shared}


class EscposDeviceConfig(_DeviceSection):
    """An ESC/POS receipt printer, and the cash drawer on its kick-out connector."""

    type: Literal["escpos"] = Field(description=(
        "Device type: \"escpos\" (receipt printer, with its cash drawer)."))
    connect_timeout_s: float = Field(default=_ESCPOS["connect_timeout_s"], gt=0, le=60,
                                     description="Seconds to wait for the connection to open.")
    status_timeout_s: float = Field(default=_ESCPOS["status_timeout_s"], gt=0, le=60, description=(
        "A printer silent for longer than this after a status request is \"not responding\" "
        "(some clones never answer; they are never reported as OK)."))
    idle_close_s: float = Field(default=_ESCPOS["idle_close_s"], gt=0, le=3600, description=(
        "TCP only: release the connection after this many idle seconds; a network printer "
        "serves one client at a time."))
    completion: Literal["auto", "process_id", "status"] = Field(
        default=_ESCPOS["completion"], description=(
            "How a printed job is confirmed: `process_id` (GS ( H answer), `status` (a clean "
            "status after sending), or `auto` (process_id if the printer answers it at "
            "connect)."))
    drawer_pin: Literal[2, 5] = Field(default=_ESCPOS["drawer_pin"], description=(
        "Kick-out connector pin the cash drawer is wired to (2 for most drawers, 5 for a "
        "second drawer)."))
    drawer_on_ms: int = Field(default=_ESCPOS["drawer_on_ms"], ge=2, le=510, description=(
        "Drawer pulse length in ms (even). With drawer_off_ms the duty cycle must stay at "
        "or under 20 % to protect the solenoid."))
    drawer_off_ms: int = Field(default=_ESCPOS["drawer_off_ms"], ge=0, le=510, description=(
        "Pause after the drawer pulse in ms (even); at least 4 × drawer_on_ms."))
    drawer_open_when: Literal["high", "low"] = Field(
        default=_ESCPOS["drawer_open_when"], description=(
            "Level of the drawer switch (pin 3) that means \"open\"; depends on the drawer."))
    receipt_width_mm: Literal[58, 80] = Field(default=80, description=(
        "Paper width in mm: receipts printed through POST /v1/print are laid out for it "
        "(32 characters a line on 58 mm, 48 on 80 mm)."))

    @model_validator(mode="after")
    def _drawer_pulse(self) -> EscposDeviceConfig:
        try:
            drawer_pulse(self.drawer_pin, self.drawer_on_ms, self.drawer_off_ms)
        except ValueError as err:
            raise _Problem(str(err), "drawer_on_ms") from None
        return self

    @property
    def kind(self) -> str:
        """Return "printer"."""
        return "printer"

    def driver_type(self) -> str:
        """Return "escpos"."""
        return "escpos"

    def driver_options(self) -> dict[str, Any]:
        """Return the driver's options; the receipt layout is the agent's, not the driver's."""
        options = super().driver_options()
        options.pop("receipt_width_mm", None)
        return options


class ScannerDeviceConfig(_DeviceSection):
    """A barcode scanner: serial or USB-CDC port, or a HID keyboard wedge (``evdev://``).

    Its scans go to /v1/events/stream. A HID scanner's url names its input node, e.g.
    ``evdev:///dev/input/by-id/usb-Datalogic-event-kbd``; it must be set to a US keyboard layout.
    """

    type: Literal["scanner"] = Field(description="Device type: \"scanner\" (barcode scanner).")
    suffix: Literal["CR", "LF", "CRLF", "TAB", "NONE"] = Field(default="CR", description=(
        "The suffix the scanner is programmed to send after each scan; NONE ends a scan "
        "when the line stays quiet for idle_timeout_s."))
    idle_timeout_s: float = Field(default=0.05, gt=0, le=5, description=(
        "With suffix NONE: a scan ends after this many quiet seconds."))
    frame_timeout_s: float = Field(default=0.5, gt=0, le=60, description=(
        "A partial scan without its suffix for this long is dropped (and logged: is the "
        "scanner's suffix set as configured?)."))

    @property
    def kind(self) -> str:
        """Return "scanner"."""
        return "scanner"

    def driver_type(self) -> str:
        """Return "hid-scanner" for an evdev url, else "scanner"."""
        return "hid-scanner" if self.url.startswith("evdev://") else "scanner"

    def driver_options(self) -> dict[str, Any]:
        """Return the scanner's options; its port reopens at the shared reconnect pace."""
        if self.url.startswith("evdev://"):
            return {"reconnect_max_s": self.reconnect_max_s}  # framing is the Enter key
        return {**super().driver_options(), "reconnect_max_s": self.reconnect_max_s}


class ScaleDeviceConfig(_DeviceSection):
    """A retail scale on a serial port; /v1/devices/{name}/weight reads it."""

    type: Literal["scale"] = Field(description="Device type: \"scale\".")
    protocol: Literal["toledo8217", "nci", "cas"] = Field(default="toledo8217", description=(
        "What the scale speaks: `toledo8217` (Mettler-Toledo 8217, also most scanner-scales), "
        "`nci` (NCI / Avery Weigh-Tronix) or `cas` (CAS ECR). Line settings the url does not "
        "give default to the protocol's."))
    unit: Literal["kg", "lb"] | None = Field(default=None, description=(
        "Unit of the weight when the scale does not send one (8217). Not set: told by the "
        "number of decimals (3 kg, 2 lb)."))

    @property
    def kind(self) -> str:
        """Return "scale"."""
        return "scale"

    def driver_type(self) -> str:
        """Return the protocol: each protocol has its own driver."""
        return self.protocol

    def driver_options(self) -> dict[str, Any]:
        """Return the scale driver's options (only a configured unit)."""
        return {} if self.unit is None else {"unit": self.unit}


# Add a device type the same way as a sink type; unknown types fail listing the known ones.
AnyDeviceConfig = EscposDeviceConfig | ScannerDeviceConfig | ScaleDeviceConfig
DeviceConfig = Annotated[AnyDeviceConfig, Field(discriminator="type")]


# ---------------------------------------------------------------- [logging] and the root


class LoggingConfig(_Section):
    """What the agent writes to stderr (and so to journald)."""

    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description=(
        "Least severe level logged."))


class AgentConfig(_Section):
    """The whole agent configuration (agent.toml)."""

    store: StoreConfig = Field(description="The store this agent runs in.")
    api: ApiConfig = Field(description="The local HTTP API.")
    outbox: OutboxConfig = Field(description="The encrypted queue.")
    sinks: list[SinkConfig] = Field(default=[], description="Where events are delivered.")
    devices: list[DeviceConfig] = Field(default=[], description="Printers, scanners and scales.")
    logging: LoggingConfig = Field(default=LoggingConfig(), description="Logging.")

    @field_validator("sinks")
    @classmethod
    def _unique_sinks(cls, sinks: list[WebhookSinkConfig]) -> list[WebhookSinkConfig]:
        _unique(sinks, "name", "sink name", "sinks")
        return sinks

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, devices: list[AnyDeviceConfig]) -> list[AnyDeviceConfig]:
        _unique(devices, "name", "device name", "devices")
        return devices

    def sinks_for(self, kind: str) -> list[str]:
        """Return the names of the sinks that receive events of ``kind``."""
        return [sink.name for sink in self.sinks if sink.kinds is None or kind in sink.kinds]


# ---------------------------------------------------------------- loading


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Return ``$TILLSYNC_CONFIG``, else the platform's standard agent.toml location."""
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    if sys.platform == "win32":
        return Path(environ.get("ProgramData", r"C:\ProgramData")) / "tillsync" / "agent.toml"
    return Path("/etc/tillsync/agent.toml")


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, resolve and validate the config file at ``path``; ConfigError if unusable."""
    try:
        # utf-8-sig: Windows editors like to start UTF-8 files with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problem = f"{path}: no such file (create one with `tillsync init`, or pass --config)"
    except UnicodeDecodeError:
        problem = f"{path}: not UTF-8 text"
    except OSError as err:
        problem = f"{path}: cannot read it: {err.strerror or err}"
    else:
        return parse_config(text, source=str(path), base_dir=path.absolute().parent,
                            environ=environ)
    raise ConfigError([problem])


def parse_config(text: str, *, source: str, base_dir: Path,
                 environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse TOML ``text`` into a config; relative paths are taken against ``base_dir``."""
    return validate_config(_parse_toml(text, source), source=source, base_dir=base_dir,
                           environ=environ)


def validate_config(data: Mapping[str, Any], *, source: str, base_dir: Path,
                    environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Validate an already parsed TOML document; ConfigError lists every problem."""
    env = os.environ if environ is None else environ
    resolver = _SecretResolver(base_dir.absolute(), env)
    resolved = _key_from_credentials(resolver.model(dict(data), AgentConfig, ()), env)
    problems = resolver.problems
    config = None
    try:
        config = AgentConfig.model_validate(resolved, context={"base_dir": base_dir.absolute()})
    except ValidationError as err:
        problems += [_describe(error) for error in err.errors(include_url=False)]
    # Raised outside the except block on purpose: the ValidationError, whose repr holds the
    # input (secrets included), must not travel along as __context__.
    if problems or config is None:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return config


def _key_from_credentials(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Take a relative ``outbox.key_file`` from ``$CREDENTIALS_DIRECTORY`` when it is there.

    The outbox key is a secret like the tokens: under systemd, ``LoadCredential=`` hands it in
    on a private ramfs, so the service never needs read access to the copy in /etc.
    """
    outbox = data.get("outbox")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if not (isinstance(outbox, dict) and credentials):
        return data
    key = outbox.get("key_file")
    if isinstance(key, str) and key and not Path(key).is_absolute():
        candidate = Path(credentials) / key
        if candidate.is_file():
            data = {**data, "outbox": {**outbox, "key_file": str(candidate)}}
    return data


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
    found = re.search(r" \(at line (\d+), column \d+\)$", message)
    if found:
        line, message = found.group(1), message[:found.start()]
    else:
        line, message = str(text.count("\n") + 1), message.removesuffix(" (at end of document)")
    raise ConfigError([f"{source}: line {line}: {message}"])


# ---------------------------------------------------------------- annotations, walked


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from an annotation (keeps discriminated unions)."""
    while True:
        if get_origin(annotation) is Annotated and not _discriminated(annotation):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, type(int | None)):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _discriminated(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and any(
        isinstance(meta, FieldInfo) and meta.discriminator for meta in get_args(annotation)[1:])


def union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Map each ``type`` tag of a discriminated union (sinks, devices) to its model."""
    annotation = _unwrap(annotation)
    if not _discriminated(annotation):
        return {}
    inner = get_args(annotation)[0]
    members = get_args(inner) if get_origin(inner) in (Union, type(int | None)) else (inner,)
    return {tag: member for member in members
            for tag in get_args(member.model_fields["type"].annotation)}


def list_item(annotation: Any) -> Any:
    """Return the item annotation of a ``list[...]`` annotation, else None."""
    annotation = _unwrap(annotation)
    return get_args(annotation)[0] if get_origin(annotation) is list else None


def as_model(annotation: Any) -> type[BaseModel] | None:
    """Return the model class an annotation stands for, else None."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def is_secret(annotation: Any) -> bool:
    """Tell whether an annotation holds a secret (``SecretStr``)."""
    annotation = _unwrap(annotation)
    return annotation is SecretStr or any(is_secret(arg) for arg in get_args(annotation))


def secret_fields(model: type[BaseModel]) -> list[str]:
    """Return the names of a model's secret fields."""
    return [name for name, info in model.model_fields.items() if is_secret(info.annotation)]


# ---------------------------------------------------------------- secrets


Loc = tuple[str | int, ...]


@dataclass
class _SecretResolver:
    """Replaces ``x_file`` and ``"${ENV}"`` secrets in a raw TOML dict by their values."""

    base_dir: Path
    environ: Mapping[str, str]
    problems: list[str] = field(default_factory=list)

    def model(self, data: dict[str, Any], model: type[BaseModel], loc: Loc) -> dict[str, Any]:
        """Resolve the secrets of one table, and of the tables below it."""
        out = dict(data)
        for name, info in model.model_fields.items():
            if is_secret(info.annotation):
                self._secret(out, name, (*loc, name))
            elif name in out:
                out[name] = self._value(out[name], info.annotation, (*loc, name))
        return out

    def _value(self, value: Any, annotation: Any, loc: Loc) -> Any:
        if isinstance(value, list) and list_item(annotation) is not None:
            item = list_item(annotation)
            return [self._value(v, item, (*loc, i)) for i, v in enumerate(value)]
        model = _table_model(value, annotation)
        return value if model is None else self.model(value, model, loc)

    def _secret(self, table: dict[str, Any], name: str, loc: Loc) -> None:
        file_key = f"{name}_file"
        if file_key not in table:
            value = table.get(name)
            if isinstance(value, str):
                self._settle(table, name, loc, self._inline(value, loc))
            return
        file_loc = (*loc[:-1], file_key)
        raw = table.pop(file_key)
        if name in table:
            self._settle(table, name, loc, f"give {name} or {file_key}, not both")
        elif not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
            self._settle(table, name, file_loc, "must be the path of a file holding the secret")
        else:
            self._settle(table, name, file_loc, self._read(raw))

    def _settle(self, table: dict[str, Any], name: str, loc: Loc, outcome: _Found | str) -> None:
        if isinstance(outcome, _Found) and outcome.value.strip():
            table[name] = outcome.value
            return
        if isinstance(outcome, _Found):
            reason = f"{outcome.source} is empty" if outcome.source else "must not be empty"
        else:
            reason = outcome
        self.problems.append(f"{dotted(loc)}: {reason}")
        # A unique stand-in keeps the models from adding "required" or "same token" noise.
        table[name] = f"<unresolved {dotted(loc)}>"

    def _inline(self, value: str, loc: Loc) -> _Found | str:
        reference = _ENV_REFERENCE.fullmatch(value)
        if reference is None:
            return _Found(value, "")
        variable = reference.group(1)
        if variable not in self.environ:
            return f"environment variable {variable} is not set"
        return _Found(self.environ[variable], f"environment variable {variable}")

    def _read(self, raw: str) -> _Found | str:
        path = self._locate(Path(raw))
        try:
            with path.open("rb") as file:
                data = file.read(MAX_SECRET_BYTES + 1)
            if len(data) > MAX_SECRET_BYTES:
                return f"{path} is too large for a secret"
            content = data.decode("utf-8")
        except FileNotFoundError:
            credentials = self.environ.get(ENV_CREDENTIALS)
            also = f" (nor in ${ENV_CREDENTIALS})" if credentials and not Path(raw).is_absolute() \
                else ""
            return f"no such file: {path}{also}"
        except UnicodeDecodeError:
            return f"{path} is not UTF-8 text"
        except (OSError, ValueError) as err:
            return f"cannot read {path}: {getattr(err, 'strerror', None) or err}"
        return _Found(content.rstrip("\r\n"), f"file {path}")

    def _locate(self, path: Path) -> Path:
        credentials = self.environ.get(ENV_CREDENTIALS)
        if path.is_absolute():
            return path
        if credentials:
            candidate = Path(credentials) / path
            try:
                if candidate.is_file():
                    return candidate
            except (OSError, ValueError):
                pass
        return self.base_dir / path


def _table_model(value: Any, annotation: Any) -> type[BaseModel] | None:
    """Return the model a raw TOML table stands for here (a union member by its type)."""
    if not isinstance(value, dict):
        return None
    tag = value.get("type")
    return as_model(annotation) or (
        union_members(annotation).get(tag) if isinstance(tag, str) else None)


def inline_secrets(data: Mapping[str, Any]) -> list[str]:
    """Dotted paths of the secrets a parsed TOML document holds inline.

    Not those given as ``"${ENV_VAR}"`` or ``<key>_file``: only these put the secret itself in
    the file, which must then be readable by the service user only.
    """
    found: list[str] = []

    def walk(value: Any, annotation: Any, loc: Loc) -> None:
        if isinstance(value, list) and list_item(annotation) is not None:
            for index, item in enumerate(value):
                walk(item, list_item(annotation), (*loc, index))
            return
        model = _table_model(value, annotation)
        if model is None:
            return
        for name, info in model.model_fields.items():
            if name not in value:
                continue
            if is_secret(info.annotation):
                secret = value[name]
                if isinstance(secret, str) and secret.strip() \
                        and not _ENV_REFERENCE.fullmatch(secret):
                    found.append(dotted((*loc, name)))
            else:
                walk(value[name], info.annotation, (*loc, name))

    walk(dict(data), AgentConfig, ())
    return found


@dataclass(frozen=True)
class _Found:
    value: str
    source: str  # where it came from ("" inline), for "… is empty"; never the value itself


# ---------------------------------------------------------------- error messages


def dotted(loc: Sequence[str | int]) -> str:
    """Render a location as a TOML-style dotted path: ``sinks[0].url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            out += f".{key}" if out else key
    return out


@dataclass
class _Place:
    """Where an error points, in user terms: the path and what the schema says is there."""

    loc: list[str | int]
    parent: type[BaseModel] | None = None
    annotation: Any = None


def _place(loc: Sequence[str | int]) -> _Place:
    place = _Place([])
    annotation: Any = AgentConfig
    for part in loc:
        if isinstance(part, int):
            place.loc.append(part)
            annotation = list_item(annotation)
            continue
        members = union_members(annotation)
        if part in members:  # pydantic puts the union's tag in the path; users never see it
            annotation = members[part]
            continue
        model = as_model(annotation)
        place.loc.append(part)
        place.parent = model
        annotation = model.model_fields[part].annotation \
            if model and part in model.model_fields else None
    place.annotation = annotation
    return place


_PLAIN = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "path_type": "must be a path",
    "missing": "required",
}


def _describe(error: Mapping[str, Any]) -> str:
    place = _place(error["loc"])
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _describe_tag(place, kind, ctx)
    if kind == "extra_forbidden":
        shown = _show(error.get("input"))
        if shown and _may_be_secret(place):
            shown = "(value hidden)"
        elif shown:
            shown = f"(got {shown})"
        return f"{dotted(place.loc)}: unknown key{_did_you_mean(place)}" + \
            (f" {shown}" if shown else "")
    reason = _reason(kind, ctx, error.get("msg", "invalid"))
    if kind == "missing" and is_secret(place.annotation):
        reason += f" (or {place.loc[-1]}_file)"
    if isinstance(ctx.get("error"), _Problem):
        # A validator named a place below the one pydantic reports; point there.
        place = _place((*error["loc"], *ctx["error"].loc))
    shown = _show(error.get("input"))
    if shown and is_secret(place.annotation):
        shown = _MASK
    where = f"{dotted(place.loc)}: " if place.loc else ""
    got = f" (got {shown})" if shown and kind != "missing" else ""
    return f"{where}{reason}{got}"


def _reason(kind: str, ctx: Mapping[str, Any], message: str) -> str:
    if kind in _PLAIN:
        return _PLAIN[kind]
    bounds = {"greater_than": ("must be greater than", "gt"),
              "greater_than_equal": ("must be at least", "ge"),
              "less_than": ("must be less than", "lt"),
              "less_than_equal": ("must be at most", "le")}
    if kind in bounds:
        words, key = bounds[kind]
        bound = ctx.get(key)
        return f"{words} {bound:g}" if isinstance(bound, float) else f"{words} {bound}"
    if kind == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        return _PATTERN_WORDS.get(pattern, f"must match the pattern {pattern}")
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind in ("value_error", "assertion_error") and ctx.get("error") is not None:
        return str(ctx["error"])
    return message[:1].lower() + message[1:]


def _describe_tag(place: _Place, kind: str, ctx: Mapping[str, Any]) -> str:
    known = ", ".join(union_members(place.annotation))
    where = dotted([*place.loc, "type"])
    if kind == "union_tag_not_found":
        return f"{where}: required (one of: {known})"
    return f"{where}: unknown type {ctx.get('tag', '')!r} (known types: {known})"


def _did_you_mean(place: _Place) -> str:
    if place.parent is None or not isinstance(place.loc[-1], str):
        return ""
    key = place.loc[-1]
    if key.endswith("_file") and key.removesuffix("_file") in place.parent.model_fields:
        return f" ({key.removesuffix('_file')} is no secret; only secrets can come from a file)"
    names = [*place.parent.model_fields, *(f"{s}_file" for s in secret_fields(place.parent))]
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _may_be_secret(place: _Place) -> bool:
    """Tell whether an unknown key may hold a secret.

    It may when its name looks like a secret's, or like a typo of a secret key (``tokn``).
    """
    key = place.loc[-1] if place.loc else ""
    if not isinstance(key, str):
        return False
    if any(word in key.lower() for word in _SECRET_WORDS):
        return True
    if place.parent is None:
        return False
    secrets = [*secret_fields(place.parent), *(f"{s}_file" for s in secret_fields(place.parent))]
    return bool(difflib.get_close_matches(key, secrets, n=1))


_SCALARS = (str, int, float, bool, datetime, date, time)


def _show(value: Any) -> str:
    """Render the offending value, short; tables are never shown (they may hold secrets)."""
    if isinstance(value, _SCALARS) or (
            isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return ""
