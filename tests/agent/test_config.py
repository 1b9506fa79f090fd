"""agent.config and agent.configdoc: real TOML files on disk, outcomes asserted."""

from __future__ import annotations

import copy
import hashlib
import re
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import configdoc
from agent.config import (
    AgentConfig,
    ConfigError,
    TerminalConfig,
    default_config_path,
    inline_secrets,
    load_config,
    parse_config,
)
from outbox.sinks import SinkPolicy, WebhookSettings

STATUS = "status-token-0123456789"
TILL = "till-token-0123456789"

STORE = 'id = "store-042"'
API = f'listen = "127.0.0.1:8765"\nstatus_token = "{STATUS}"'
TERMINAL = f'[[api.terminals]]\nid = "T01"\ntoken = "{TILL}"'
OUTBOX = 'path = "/var/lib/tillsync/outbox.db"\nkey_file = "/etc/tillsync/outbox.key"'
SINK = '[[sinks]]\nname = "cloud"\ntype = "webhook"\nurl = "https://api.example.com/pos/events"'


def document(*, store: str = STORE, api: str = API, terminals: str = TERMINAL,
             outbox: str = OUTBOX, extra: str = "") -> str:
    return (f"[store]\n{store}\n\n[api]\n{api}\n\n{terminals}\n\n[outbox]\n{outbox}\n\n"
            f"{extra}\n")


def write(directory: Path, text: str, name: str = "agent.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return load_config(write(tmp_path, text), environ=environ or {})


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {})
    prefix = f"{path}: "
    assert all(line.startswith(prefix) for line in caught.value.problems)
    return [line.removeprefix(prefix) for line in caught.value.problems]


# ---------------------------------------------------------------- the happy path


CONTRACT_MINIMAL = f"""
[store]
id = "store-042"                      # required; [A-Za-z0-9._-]{{1,64}}

[api]
listen = "127.0.0.1:8765"             # host:port; terminals on the LAN use the store PC's address
status_token = "{STATUS}"             # head office: /v1/status, /metrics, admin endpoints

[[api.terminals]]
id = "T01"
token = "{TILL}"                      # or token_sha256 = "<hex>" so the file holds no secret

[outbox]
path = "/var/lib/tillsync/outbox.db"
key_file = "/etc/tillsync/outbox.key" # 32 random bytes, base64; must not be readable by group/other
durability = "full"                   # full (default, survives power loss) | normal

[[sinks]]
name = "cloud"
type = "webhook"
url = "https://api.example.com/pos/events"
kinds = ["transaction"]               # which event kinds this sink receives (default: all)
# token = "…"  signing_secret = "…"  timeout_s = 10  concurrency = 4  rate_limit_per_s = 20

[[devices]]
name = "receipt"
type = "escpos"
url = "tcp://192.168.1.50:9100"       # or serial:///dev/ttyUSB0?baudrate=19200 or usb://04b8:0202
"""


def test_the_contracts_minimal_file_loads(tmp_path: Path):
    config = load(tmp_path, CONTRACT_MINIMAL)
    assert config.store.id == "store-042"
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8765)
    assert config.api.status_token.get_secret_value() == STATUS
    assert [t.id for t in config.api.terminals] == ["T01"]
    assert config.outbox.path == Path("/var/lib/tillsync/outbox.db")
    assert config.outbox.durability == "full"
    [sink] = config.sinks
    assert (sink.name, sink.type, sink.kinds) == ("cloud", "webhook", ["transaction"])
    [device] = config.devices
    assert (device.name, device.type, device.url) == ("receipt", "escpos",
                                                      "tcp://192.168.1.50:9100")


def test_every_optional_key_takes_its_documented_default(tmp_path: Path):
    config = load(tmp_path, document(
        api=f'status_token = "{STATUS}"', terminals="",
        extra='[[sinks]]\nname = "c"\ntype = "webhook"\nurl = "http://x"\n'
              '[[devices]]\nname = "d"\ntype = "scale"\nurl = "serial:///dev/ttyUSB0"'))
    assert config.store.alert_after_s == 900
    assert config.api.listen == "127.0.0.1:8765"
    assert config.api.terminals == [] and config.api.allowed_hosts == []
    outbox = config.outbox
    assert (outbox.durability, outbox.capacity_bytes) == ("full", None)
    assert (outbox.retention_days, outbox.forget_after_days) == (7, 30)
    assert config.logging.level == "info"
    [sink] = config.sinks
    assert sink.kinds is None and sink.token is None and sink.signing_secret is None
    assert (sink.timeout_s, sink.lookup_url, sink.ca_bundle) == (10, None, None)
    assert sink.policy() == SinkPolicy()  # the relay's defaults, not a copy of them
    assert config.devices[0].enabled is True


def test_a_file_with_no_sinks_or_devices_loads(tmp_path: Path):
    config = load(tmp_path, document())
    assert config.sinks == [] and config.devices == []
    assert config.sinks_for("transaction") == []


def test_relative_paths_are_taken_against_the_config_directory(tmp_path: Path):
    config = load(tmp_path, document(outbox='path = "data/outbox.db"\nkey_file = "outbox.key"',
                                     extra=SINK + '\nca_bundle = "ca.pem"'))
    assert config.outbox.path == tmp_path / "data" / "outbox.db"
    assert config.outbox.key_file == tmp_path / "outbox.key"
    assert config.sinks[0].ca_bundle == tmp_path / "ca.pem"


def test_a_byte_order_mark_from_a_windows_editor_is_accepted(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"\xef\xbb\xbf" + document().encode())
    assert load_config(path, environ={}).store.id == "store-042"


def test_listen_takes_ipv6_in_brackets(tmp_path: Path):
    config = load(tmp_path, document(api=f'listen = "[::1]:9000"\nstatus_token = "{STATUS}"'))
    assert (config.api.host, config.api.port) == ("::1", 9000)


def test_allowed_hosts_are_kept_lowercase(tmp_path: Path):
    config = load(tmp_path, document(
        api=f'status_token = "{STATUS}"\nallowed_hosts = ["Store-042.LOCAL", "[fe80::1]"]'))
    assert config.api.allowed_hosts == ["store-042.local", "[fe80::1]"]


def test_sinks_for_picks_sinks_by_kind(tmp_path: Path):
    config = load(tmp_path, document(extra=(
        '[[sinks]]\nname = "all"\ntype = "webhook"\nurl = "https://a.example"\n'
        '[[sinks]]\nname = "sales"\ntype = "webhook"\nurl = "https://b.example"\n'
        'kinds = ["transaction"]\n'
        '[[sinks]]\nname = "stock"\ntype = "webhook"\nurl = "https://c.example"\n'
        'kinds = ["inventory_adjustment"]')))
    assert config.sinks_for("transaction") == ["all", "sales"]
    assert config.sinks_for("inventory_adjustment") == ["all", "stock"]


def test_policy_and_settings_carry_every_sink_setting(tmp_path: Path):
    config = load(tmp_path, document(extra=SINK + """
token = "bearer-1"
signing_secret = "hmac-1"
timeout_s = 2.5
concurrency = 8
rate_limit_per_s = 20
max_retry_after_s = 600
backoff_base_s = 0.5
backoff_cap_s = 5
pause_recheck_s = 30
on_conflict = "delivered"
lookup_url = "https://api.example.com/pos/events/{idempotency_key}"
ca_bundle = "/etc/ssl/extra.pem"
"""))
    sink = config.sinks[0]
    assert sink.policy() == SinkPolicy(
        concurrency=8, rate_limit_per_s=20, backoff_base_s=0.5, backoff_cap_s=5,
        max_retry_after_s=600, pause_recheck_s=30, on_conflict="delivered")
    assert sink.settings() == WebhookSettings(
        url="https://api.example.com/pos/events", token="bearer-1", signing_secret="hmac-1",
        timeout_s=2.5, ca_bundle="/etc/ssl/extra.pem",
        lookup_url="https://api.example.com/pos/events/{idempotency_key}")


def test_every_policy_field_has_a_config_key():
    from agent.config import WebhookSinkConfig

    assert {f.name for f in fields(SinkPolicy)} <= set(WebhookSinkConfig.model_fields)


# ---------------------------------------------------------------- terminals


def test_a_terminal_matches_its_inline_token_only():
    terminal = TerminalConfig(id="T01", token="right-token")
    assert terminal.matches("right-token")
    assert not terminal.matches("wrong-token")
    assert not terminal.matches("")
    assert not terminal.matches("right-token\udcff")


def test_a_terminal_matches_the_token_behind_its_sha256(tmp_path: Path):
    digest = hashlib.sha256(b"right-token").hexdigest().upper()  # uppercase is normalised
    config = load(tmp_path, document(terminals=f'[[api.terminals]]\nid = "T01"\n'
                                               f'token_sha256 = "{digest}"'))
    [terminal] = config.api.terminals
    assert terminal.token_sha256 == digest.lower()
    assert terminal.matches("right-token")
    assert not terminal.matches("wrong-token")
    assert not terminal.matches(digest)


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("text", "expected"), [
    (document(extra='[stroe]\nid = "x"'), "stroe: unknown key (did you mean 'store'?)"),
    (document(api=API + '\nlistne = "127.0.0.1:1"'),
     "api.listne: unknown key (did you mean 'listen'?) (got '127.0.0.1:1')"),
    (document(terminals=TERMINAL + '\ntokn = "x"'),
     "api.terminals[0].tokn: unknown key (did you mean 'token'?) (value hidden)"),
    (document(outbox=OUTBOX + "\nretention_day = 3"),
     "outbox.retention_day: unknown key (did you mean 'retention_days'?) (got 3)"),
    (document(extra=SINK + '\nurll = "x"'),
     "sinks[0].urll: unknown key (did you mean 'url'?) (got 'x')"),
    (document(extra=SINK + '\nsigning_secret_fil = "x"'),
     "sinks[0].signing_secret_fil: unknown key (did you mean 'signing_secret_file'?)"
     " (value hidden)"),
    (document(extra='[[devices]]\nname = "d"\ntype = "escpos"\nurl = "tcp://h:1"\nenable = 1'),
     "devices[0].enable: unknown key (did you mean 'enabled'?) (got 1)"),
    (document(extra='[logging]\nlevel = "info"\nformat = "json"'),
     "logging.format: unknown key (got 'json')"),
])
def test_an_unknown_key_names_its_dotted_path_and_value(tmp_path: Path, text: str,
                                                        expected: str):
    assert problems(tmp_path, text) == [expected]


@pytest.mark.parametrize("key", ["api_key", "apiKey", "password", "db_passwd", "Auth_Header",
                                 "client_secret", "bearer_token", "credentials", "pwd"])
def test_an_unknown_key_named_like_a_secret_never_shows_its_value(tmp_path: Path, key: str):
    secret = "hunter2-very-secret"
    [problem] = problems(tmp_path, document(extra=SINK + f'\n{key} = "{secret}"'))
    assert problem.startswith(f"sinks[0].{key}: unknown key")
    assert problem.endswith(" (value hidden)") and secret not in problem


def test_an_unknown_table_is_named_without_its_contents(tmp_path: Path):
    text = document(api=API + '\n[api.auth]\nuser = "a"\nsecret = "hunter2"')
    [problem] = problems(tmp_path, text)
    assert problem == "api.auth: unknown key"


def test_inline_secrets_lists_only_the_secrets_written_into_the_file():
    data = tomllib.loads(document(
        api='status_token = "s3cret"',
        terminals='[[api.terminals]]\nid = "T01"\ntoken = "${TILL_TOKEN}"\n'
                  f'[[api.terminals]]\nid = "T02"\ntoken_sha256 = "{"a" * 64}"\n'
                  '[[api.terminals]]\nid = "T03"\ntoken = "inline"\n'
                  '[[api.terminals]]\nid = "T04"\ntoken_file = "t04"',
        extra=SINK + '\ntoken = "x"\nsigning_secret_file = "s"'))
    assert inline_secrets(data) == ["api.status_token", "api.terminals[2].token",
                                    "sinks[0].token"]


def test_a_file_key_for_a_field_that_is_no_secret_is_unknown(tmp_path: Path):
    assert problems(tmp_path, document(store='id_file = "id.txt"')) == [
        "store.id: required",
        "store.id_file: unknown key (id is no secret; only secrets can come from a file)"
        " (got 'id.txt')"]


# ---------------------------------------------------------------- bad values


BAD_VALUES = [
    ("store id pattern", document(store='id = "store 42"'),
     "store.id: must be 1-64 characters of A-Z a-z 0-9 . _ - (got 'store 42')"),
    ("store id missing", document(store="alert_after_s = 60"), "store.id: required"),
    ("alert not positive", document(store=STORE + "\nalert_after_s = 0"),
     "store.alert_after_s: must be greater than 0 (got 0)"),
    ("listen without port", document(api=f'listen = "127.0.0.1"\nstatus_token = "{STATUS}"'),
     "api.listen: must be host:port, e.g. 127.0.0.1:8765 or [::1]:8765 (got '127.0.0.1')"),
    ("port out of range", document(api=f'listen = "0.0.0.0:70000"\nstatus_token = "{STATUS}"'),
     "api.listen: port must be a number from 1 to 65535 (got '0.0.0.0:70000')"),
    ("bare ipv6", document(api=f'listen = "::1:8765"\nstatus_token = "{STATUS}"'),
     "api.listen: an IPv6 address must be in brackets, e.g. 127.0.0.1:8765 or [::1]:8765 "
     "(got '::1:8765')"),
    ("status token missing", document(api='listen = "127.0.0.1:8765"'),
     "api.status_token: required (or status_token_file)"),
    ("host with a port", document(api=API + '\nallowed_hosts = ["pc:8765"]'),
     "api.allowed_hosts[0]: must be a host name or IP address without port (IPv6 in brackets) "
     "(got 'pc:8765')"),
    ("wrong type", document(outbox=OUTBOX + '\nretention_days = "a week"'),
     "outbox.retention_days: must be a number (got 'a week')"),
    ("infinity", document(store=STORE + "\nalert_after_s = inf"),
     "store.alert_after_s: must be a finite number (got inf)"),
    ("durability literal", document(outbox=OUTBOX + '\ndurability = "fast"'),
     "outbox.durability: must be 'full' or 'normal' (got 'fast')"),
    ("forget before purge", document(outbox=OUTBOX + "\nretention_days = 10\n"
                                                     "forget_after_days = 5"),
     "outbox.forget_after_days: must be at least retention_days (10)"),
    ("capacity zero", document(outbox=OUTBOX + "\ncapacity_bytes = 0"),
     "outbox.capacity_bytes: must be greater than 0 (got 0)"),
    ("table expected", 'logging = "debug"\n' + document(),
     "logging: must be a table (got 'debug')"),
    ("url scheme", document(extra=SINK.replace("https://api.example.com/pos/events", "ftp://x")),
     "sinks[0].url: must be an http(s) URL, e.g. https://api.example.com/pos/events "
     "(got 'ftp://x')"),
    ("url without host", document(extra=SINK.replace("https://api.example.com/pos/events",
                                                      "https://")),
     "sinks[0].url: must be an http(s) URL, e.g. https://api.example.com/pos/events "
     "(got 'https://')"),
    ("concurrency zero", document(extra=SINK + "\nconcurrency = 0"),
     "sinks[0].concurrency: must be at least 1 (got 0)"),
    ("timeout too long", document(extra=SINK + "\ntimeout_s = 301"),
     "sinks[0].timeout_s: must be at most 300 (got 301)"),
    ("empty kinds", document(extra=SINK + "\nkinds = []"),
     "sinks[0].kinds: must name at least one kind; leave kinds out to receive all (got [])"),
    ("unknown kind", document(extra=SINK + '\nkinds = ["sale"]'),
     "sinks[0].kinds[0]: must be 'transaction' or 'inventory_adjustment' (got 'sale')"),
    ("backoff order", document(extra=SINK + "\nbackoff_base_s = 20"),
     "sinks[0].backoff_cap_s: must be at least backoff_base_s (20)"),
    ("lookup placeholder", document(extra=SINK + '\nlookup_url = "https://x/{id}"'),
     "sinks[0].lookup_url: the only placeholder allowed is {idempotency_key} "
     "(got 'https://x/{id}')"),
    ("duplicate sink names", document(extra=SINK + "\n" + SINK),
     "sinks[1].name: duplicate sink name 'cloud' (already used by sinks[0])"),
    ("unknown sink type", document(extra=SINK.replace('"webhook"', '"kafka"')),
     "sinks[0].type: unknown type 'kafka' (known types: webhook)"),
    ("sink type missing", document(extra=SINK.replace('type = "webhook"', "")),
     "sinks[0].type: required (one of: webhook)"),
    ("sinks not an array", 'sinks = { name = "x" }\n' + document(),
     "sinks: must be a list"),
    ("unknown device type", document(extra='[[devices]]\nname = "d"\ntype = "lamp"\n'
                                           'url = "tcp://h:1"'),
     "devices[0].type: unknown type 'lamp' (known types: escpos, scanner, scale)"),
    ("duplicate device names", document(extra='[[devices]]\nname = "d"\ntype = "scale"\n'
                                              'url = "tcp://h:1"\n' * 2),
     "devices[1].name: duplicate device name 'd' (already used by devices[0])"),
    ("duplicate terminal ids", document(terminals=TERMINAL + "\n" + TERMINAL.replace(TILL, "x2")),
     "api.terminals[1].id: duplicate terminal id 'T01' (already used by terminals[0])"),
    ("token and sha256", document(terminals=TERMINAL + f'\ntoken_sha256 = "{"a" * 64}"'),
     "api.terminals[0]: needs exactly one of token (or token_file) and token_sha256, got both"),
    ("neither token", document(terminals='[[api.terminals]]\nid = "T01"'),
     "api.terminals[0]: needs exactly one of token (or token_file) and token_sha256, "
     "got neither"),
    ("bad sha256", document(terminals='[[api.terminals]]\nid = "T01"\ntoken_sha256 = "abc"'),
     "api.terminals[0].token_sha256: must be 64 hex digits (a SHA-256 digest) (got 'abc')"),
    ("shared terminal token", document(terminals=TERMINAL + "\n" + TERMINAL.replace("T01", "T02")),
     "api.terminals[1].token: same token as terminals[0]; every terminal needs its own token"),
    ("status token reused", document(terminals=TERMINAL.replace(TILL, STATUS)),
     "api.terminals[0].token: same token as status_token; every terminal needs its own token"),
    ("level", document(extra='[logging]\nlevel = "trace"'),
     "logging.level: must be 'debug', 'info', 'warning' or 'error' (got 'trace')"),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in BAD_VALUES],
                         ids=[case[0] for case in BAD_VALUES])
def test_a_bad_value_is_one_plain_line_naming_path_and_value(tmp_path: Path, text: str,
                                                              expected: str):
    assert problems(tmp_path, text) == [expected]


def test_every_problem_is_reported_at_once_one_per_line(tmp_path: Path):
    text = document(store='id = "a b"', outbox=OUTBOX + '\ndurability = "x"',
                    extra=SINK + "\nconcurrency = 0")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert len(caught.value.problems) == 3
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_a_toml_syntax_error_names_the_line(tmp_path: Path):
    text = document().replace('id = "store-042"', 'id = "store-042')
    assert problems(tmp_path, text) == ["line 2: Illegal character '\\n'"]


def test_a_toml_error_at_the_end_names_the_last_line(tmp_path: Path):
    assert problems(tmp_path, "[store]\nid =") == ["line 2: Invalid value"]


def test_parse_config_prefixes_lines_with_the_given_source(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        parse_config("[store\n", source="agent.toml", base_dir=tmp_path)
    assert caught.value.problems[0].startswith("agent.toml: line 1: ")


def test_a_missing_config_file_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert str(caught.value) == (f"{tmp_path / 'nope.toml'}: no such file "
                                 "(create one with `tillsync init`, or pass --config)")


# ---------------------------------------------------------------- secrets


def test_a_secret_may_come_from_the_environment(tmp_path: Path):
    config = load(tmp_path, document(api='status_token = "${HQ_TOKEN}"'),
                  environ={"HQ_TOKEN": "from-env"})
    assert config.api.status_token.get_secret_value() == "from-env"


def test_only_an_exact_env_reference_is_expanded(tmp_path: Path):
    config = load(tmp_path, document(api='status_token = "pre${HQ_TOKEN}"'),
                  environ={"HQ_TOKEN": "from-env"})
    assert config.api.status_token.get_secret_value() == "pre${HQ_TOKEN}"


def test_env_references_are_not_expanded_outside_secrets(tmp_path: Path):
    text = document(extra=SINK.replace("https://api.example.com/pos/events", "${URL}"))
    assert problems(tmp_path, text, {"URL": "https://x"}) == [
        "sinks[0].url: must be an http(s) URL, e.g. https://api.example.com/pos/events "
        "(got '${URL}')"]


def test_a_missing_env_variable_names_the_key(tmp_path: Path):
    text = document(extra=SINK + '\nsigning_secret = "${HMAC}"')
    assert problems(tmp_path, text) == [
        "sinks[0].signing_secret: environment variable HMAC is not set"]


def test_a_secret_file_is_read_next_to_the_config_without_its_newline(tmp_path: Path):
    (tmp_path / "hq.token").write_text("from-file\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "t01").write_text("till-from-file\r\n")
    config = load(tmp_path, document(
        api='status_token_file = "hq.token"',
        terminals='[[api.terminals]]\nid = "T01"\ntoken_file = "secrets/t01"'))
    assert config.api.status_token.get_secret_value() == "from-file"
    assert config.api.terminals[0].matches("till-from-file")


def test_a_secret_file_path_may_be_absolute(tmp_path: Path):
    secret = tmp_path / "elsewhere" / "hmac"
    secret.parent.mkdir()
    secret.write_text("signing")
    config = load(tmp_path, document(extra=SINK + f'\nsigning_secret_file = "{secret}"'))
    assert config.sinks[0].settings().signing_secret == "signing"


def test_systemd_credentials_are_looked_up_first(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hq.token").write_text("from-credentials\n")
    (tmp_path / "hq.token").write_text("from-config-dir\n")
    (tmp_path / "t01").write_text("till-from-config-dir\n")
    config = load(tmp_path, document(
        api='status_token_file = "hq.token"',
        terminals='[[api.terminals]]\nid = "T01"\ntoken_file = "t01"'),
        environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.api.status_token.get_secret_value() == "from-credentials"
    # Not among the credentials: the config's directory is next.
    assert config.api.terminals[0].matches("till-from-config-dir")


def test_a_missing_secret_file_names_the_key_and_the_file(tmp_path: Path):
    assert problems(tmp_path, document(api='status_token_file = "nope"')) == [
        f"api.status_token_file: no such file: {tmp_path / 'nope'}"]


def test_a_secret_file_missing_from_both_places_says_where_it_looked(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    text = document(api='status_token_file = "hq"')
    assert problems(tmp_path, text, {"CREDENTIALS_DIRECTORY": str(credentials)}) == [
        f"api.status_token_file: no such file: {tmp_path / 'hq'} (nor in $CREDENTIALS_DIRECTORY)"]


def test_a_secret_given_twice_is_refused(tmp_path: Path):
    (tmp_path / "hq").write_text("x")
    text = document(api=f'status_token = "{STATUS}"\nstatus_token_file = "hq"')
    assert problems(tmp_path, text) == [
        "api.status_token: give status_token or status_token_file, not both"]


@pytest.mark.parametrize(("api", "environ", "expected"), [
    ('status_token = ""', {}, "api.status_token: must not be empty"),
    ('status_token = "${E}"', {"E": ""}, "api.status_token: environment variable E is empty"),
    ('status_token_file = "empty"', {}, "api.status_token_file: file {dir}/empty is empty"),
    ("status_token_file = 5", {}, "api.status_token_file: must be the path of a file holding "
                                  "the secret"),
])
def test_an_empty_secret_is_refused(tmp_path: Path, api: str, environ: dict[str, str],
                                    expected: str):
    (tmp_path / "empty").write_text("\n")
    assert problems(tmp_path, document(api=api), environ) == [expected.format(dir=tmp_path)]


def test_a_secret_never_appears_in_errors_or_reprs(tmp_path: Path):
    secret = "hunter2-very-secret"
    text = document(
        api=f'status_token = "{secret}"\nstatus_tokn = "{secret}"\nlisten = 5',
        terminals=f'[[api.terminals]]\nid = "T01"\ntoken = "{secret}"\n'
                  f'[[api.terminals]]\nid = "T 2"\ntoken = ["{secret}"]',
        extra=SINK + f'\ntoken = "{secret}"\nsigning_secret = 7\nconcurrency = 0')
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    err = caught.value
    assert err.__cause__ is None and err.__context__ is None  # no ValidationError riding along
    assert "api.status_tokn: unknown key (did you mean 'status_token'?)" in str(err)
    assert "sinks[0].signing_secret: must be a string (got '***')" in str(err)
    assert "api.terminals[1].token: must be a string (got '***')" in str(err)
    for rendering in (str(err), repr(err), *err.problems):
        assert secret not in rendering and "hunter2" not in rendering


def test_a_valid_config_never_shows_its_secrets(tmp_path: Path):
    secret = "hunter2-very-secret"
    config = load(tmp_path, document(api=f'status_token = "{secret}"',
                                     extra=SINK + f'\ntoken = "{secret}2"'))
    for rendering in (repr(config), str(config), config.model_dump_json()):
        assert "hunter2" not in rendering


# ---------------------------------------------------------------- default path


def test_default_config_path_honours_tillsync_config():
    assert default_config_path({"TILLSYNC_CONFIG": "/srv/a.toml"}) == Path("/srv/a.toml")


@pytest.mark.skipif(sys.platform == "win32", reason="the Linux location")
def test_default_config_path_is_etc_tillsync_without_the_variable():
    assert default_config_path({}) == Path("/etc/tillsync/agent.toml")
    assert default_config_path({"TILLSYNC_CONFIG": ""}) == Path("/etc/tillsync/agent.toml")


# ---------------------------------------------------------------- junk never escapes


def _toml_key(key: str) -> str:
    return configdoc.toml_string(key)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # nan, inf, -inf and 1e+16 are all TOML
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return configdoc.toml_string(value)
    return value.isoformat()  # datetime, date, time


BASE: dict[str, Any] = {
    "store": {"id": "s1"},
    "api": {"status_token": "hq-token", "terminals": [{"id": "T01", "token": "t1"}]},
    "outbox": {"path": "outbox.db", "key_file": "outbox.key"},
    "sinks": [{"name": "c", "type": "webhook", "url": "https://x.example"}],
    "devices": [{"name": "p", "type": "escpos", "url": "tcp://h:9100"}],
    "logging": {"level": "info"},
}
PLACES: list[tuple[str | int, ...]] = [
    ("store",), ("store", "id"), ("store", "alert_after_s"), ("api",), ("api", "listen"),
    ("api", "status_token"), ("api", "status_token_file"), ("api", "terminals"),
    ("api", "terminals", 0), ("api", "terminals", 0, "token"),
    ("api", "terminals", 0, "token_sha256"), ("api", "allowed_hosts"), ("outbox",),
    ("outbox", "path"), ("outbox", "capacity_bytes"), ("outbox", "retention_days"),
    ("sinks",), ("sinks", 0), ("sinks", 0, "type"), ("sinks", 0, "url"), ("sinks", 0, "kinds"),
    ("sinks", 0, "lookup_url"), ("sinks", 0, "token_file"), ("sinks", 0, "concurrency"),
    ("devices", 0, "type"), ("devices", 0, "enabled"), ("logging", "level"), ("extra",),
]
SCALARS = st.one_of(
    st.text(max_size=12), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(), st.booleans(), st.datetimes(), st.dates(), st.times(),
    st.sampled_from(["${X}", "webhook", "127.0.0.1:0", "[::1]:1", "http://h", "a" * 64, "/"]))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(place=st.sampled_from(PLACES), junk=JUNK)
def test_junk_under_a_known_key_only_ever_raises_config_error(place: tuple[str | int, ...],
                                                              junk: Any):
    data = copy.deepcopy(BASE)
    target: Any = data
    for part in place[:-1]:
        target = target[part]
    target[place[-1]] = junk
    text = "\n".join(f"{_toml_key(key)} = {_toml(value)}" for key, value in data.items())
    try:
        config = parse_config(text, source="junk", base_dir=Path("/nonexistent"), environ={})
    except ConfigError as err:
        assert err.problems and all(line.startswith("junk: ") for line in err.problems)
        assert "hq-token" not in str(err)
    else:
        assert isinstance(config, AgentConfig)


# ---------------------------------------------------------------- the generated reference


def test_docs_config_md_is_the_generated_reference():
    written = configdoc.DOC_PATH.read_text(encoding="utf-8")
    assert written == configdoc.render_reference(), (
        "docs/config.md is stale: run `python -m agent.configdoc --write`")


def test_the_reference_documents_every_key_of_every_table():
    reference = configdoc.render_reference()
    for section in configdoc.sections():
        assert f"## `{section.header}`" in reference
        for name, info in section.model.model_fields.items():
            assert info.description, f"{section.model.__name__}.{name} has no description"
            if not list(configdoc._tables(info.annotation)):
                assert f"| `{name}` |" in reference


def test_the_minimal_file_in_the_reference_loads(tmp_path: Path):
    reference = configdoc.render_reference()
    [minimal] = re.findall(r"## Minimal file\n\n```toml\n(.*?)```", reference, re.S)
    (tmp_path / "status_token").write_text("hq\n")
    config = load(tmp_path, minimal, environ={"TILLSYNC_CLOUD_TOKEN": "cloud"})
    assert config.sinks[0].settings().token == "cloud"


def test_configdoc_prints_the_reference(capsys: pytest.CaptureFixture[str]):
    assert configdoc.main([]) == 0
    assert capsys.readouterr().out == configdoc.render_reference()


def test_a_relative_key_file_comes_from_the_systemd_credentials_directory(tmp_path):
    """LoadCredential=outbox.key:… puts the key in $CREDENTIALS_DIRECTORY; a relative
    key_file names it there first, else next to the config file."""
    from agent.config import parse_config

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "outbox.key").write_text("x")
    text = ('[store]\nid = "s1"\n[api]\nstatus_token = "status-token-123456"\n'
            '[outbox]\npath = "/var/lib/tillsync/outbox.db"\nkey_file = "outbox.key"\n')
    via_systemd = parse_config(text, source="agent.toml", base_dir=tmp_path / "etc",
                               environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert via_systemd.outbox.key_file == creds / "outbox.key"
    by_hand = parse_config(text, source="agent.toml", base_dir=tmp_path / "etc", environ={})
    assert by_hand.outbox.key_file == tmp_path / "etc" / "outbox.key"


def test_a_hid_scanner_is_configured_by_its_evdev_url(tmp_path):
    """A keyboard-wedge scanner: type scanner, url evdev:///dev/input/…; its driver is the
    HID one (reading /dev/input itself cannot run here, see drivers/scanner_hid.py)."""
    from agent.config import parse_config
    from agent.devices import device_spec
    from drivers.base import create_driver
    from drivers.scanner_hid import HidScannerDriver

    text = ('[store]\nid = "s1"\n[api]\nstatus_token = "status-token-123456"\n'
            '[outbox]\npath = "outbox.db"\nkey_file = "outbox.key"\n'
            '[[devices]]\nname = "wedge"\ntype = "scanner"\n'
            'url = "evdev:///dev/input/by-id/usb-Datalogic-event-kbd"\n')
    config = parse_config(text, source="agent.toml", base_dir=tmp_path, environ={})
    [device] = config.devices
    assert device.driver_type() == "hid-scanner"
    driver = create_driver(device_spec(device))
    assert isinstance(driver, HidScannerDriver)
