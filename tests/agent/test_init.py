"""agent.init (`tillsync init`): real files in a temp dir, outcomes asserted."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.init import InitError, init_setup
from outbox.crypto import load_key_file

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_init_writes_a_private_config_and_key_in_a_new_directory(tmp_path: Path):
    directory = tmp_path / "etc" / "tillsync"
    result = init_setup(directory)
    assert result.config_path == directory / "agent.toml"
    assert result.key_path == directory / "outbox.key"
    assert mode(result.config_path) == 0o600
    assert mode(result.key_path) == 0o600
    assert mode(directory) == 0o750
    assert len(load_key_file(result.key_path)) == 32  # a usable key, private enough to load


def test_the_written_config_loads_and_keeps_the_outbox_in_the_directory(tmp_path: Path):
    result = init_setup(tmp_path)
    config = load_config(result.config_path, environ={})
    assert config.store.id == "store-001"
    assert config.api.listen == "127.0.0.1:8765"
    assert config.outbox.path == tmp_path / "outbox.db"
    assert config.outbox.key_file == result.key_path
    assert config.outbox.path.is_absolute()
    assert config.sinks == [] and config.devices == []  # the examples are commented out


def test_the_returned_tokens_are_the_ones_in_the_file(tmp_path: Path):
    result = init_setup(tmp_path)
    config = load_config(result.config_path, environ={})
    assert config.api.status_token.get_secret_value() == result.status_token
    assert list(result.terminal_tokens) == ["T01", "T02", "T03"]
    assert [t.id for t in config.api.terminals] == ["T01", "T02", "T03"]
    for terminal in config.api.terminals:
        assert terminal.matches(result.terminal_tokens[terminal.id])
    tokens = [result.status_token, *result.terminal_tokens.values()]
    assert len(set(tokens)) == 4 and all(len(token) >= 43 for token in tokens)


def test_each_init_makes_fresh_tokens(tmp_path: Path):
    first, second = init_setup(tmp_path / "a"), init_setup(tmp_path / "b")
    assert first.status_token != second.status_token
    assert first.terminal_tokens["T01"] != second.terminal_tokens["T01"]
    assert first.key_path.read_bytes() != second.key_path.read_bytes()


def test_a_second_init_refuses_and_leaves_the_key_byte_identical(tmp_path: Path):
    result = init_setup(tmp_path)
    key, config = result.key_path.read_bytes(), result.config_path.read_bytes()
    with pytest.raises(FileExistsError) as caught:
        init_setup(tmp_path)
    assert str(result.key_path) in str(caught.value)
    assert "--dir" in str(caught.value)
    assert result.key_path.read_bytes() == key
    assert result.config_path.read_bytes() == config


def test_init_refuses_when_only_the_key_is_left(tmp_path: Path):
    result = init_setup(tmp_path)
    key = result.key_path.read_bytes()
    result.config_path.unlink()
    with pytest.raises(FileExistsError, match=r"outbox\.key already exists"):
        init_setup(tmp_path)
    assert result.key_path.read_bytes() == key
    assert not result.config_path.exists()


def test_init_refuses_to_overwrite_a_config(tmp_path: Path):
    (tmp_path / "agent.toml").write_text("# mine\n")
    with pytest.raises(FileExistsError, match=r"agent\.toml already exists"):
        init_setup(tmp_path)
    assert (tmp_path / "agent.toml").read_text() == "# mine\n"
    assert not (tmp_path / "outbox.key").exists()


def test_init_refuses_to_put_a_new_key_beside_an_existing_database(tmp_path: Path):
    (tmp_path / "outbox.db").write_bytes(b"queue")
    with pytest.raises(FileExistsError, match="orphan"):
        init_setup(tmp_path)
    assert not (tmp_path / "outbox.key").exists()
    assert not (tmp_path / "agent.toml").exists()


def test_every_section_is_explained(tmp_path: Path):
    text = init_setup(tmp_path).config_path.read_text()
    for header in ("[store]", "[api]", "[[api.terminals]]", "[outbox]", "[[sinks]]",
                   "[[devices]]", "[logging]"):
        assert f"# {header}: " in text or f"# # {header}: " in text


def _uncomment_examples(text: str) -> str:
    lines, out, inside = text.splitlines(), [], False
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if following in ("# [[sinks]]", "# [[devices]]"):
            inside = True
        if inside and not line:
            inside = False
        out.append(line.removeprefix("#").removeprefix(" ") if inside else line)
    return "\n".join(out) + "\n"


def test_the_commented_examples_load_once_uncommented(tmp_path: Path):
    result = init_setup(tmp_path)
    result.config_path.write_text(_uncomment_examples(result.config_path.read_text()))
    config = load_config(result.config_path, environ={"TILLSYNC_CLOUD_TOKEN": "cloud-token"})
    [sink] = config.sinks
    assert (sink.name, sink.url) == ("cloud", "https://api.example.com/pos/events")
    assert sink.settings().token == "cloud-token"
    assert config.sinks_for("transaction") == ["cloud"]
    [device] = config.devices
    assert (device.name, device.type, device.url) == ("receipt", "escpos",
                                                      "tcp://192.168.1.50:9100")


def test_paths_with_quotes_and_backslashes_survive_the_toml(tmp_path: Path):
    directory = tmp_path / 'odd "dir" \\ name'
    result = init_setup(directory)
    config = load_config(result.config_path, environ={})
    assert config.outbox.key_file == directory / "outbox.key"


def test_init_can_write_a_config_file_of_another_name_with_the_key_beside_it(tmp_path: Path):
    result = init_setup(tmp_path / "site", config_name="custom.toml")
    assert result.config_path == tmp_path / "site" / "custom.toml"
    assert result.key_path == tmp_path / "site" / "outbox.key"
    assert not (tmp_path / "site" / "agent.toml").exists()
    config = load_config(result.config_path, environ={})
    assert config.outbox.path == tmp_path / "site" / "outbox.db"
    assert config.outbox.key_file == result.key_path
    with pytest.raises(FileExistsError, match=r"outbox\.key already exists"):
        init_setup(tmp_path / "site", config_name="other.toml")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_a_directory_that_cannot_be_created_is_one_line_saying_what_to_do():
    with pytest.raises(InitError) as caught:
        init_setup(Path("/proc/tillsync-init-test"))
    message = str(caught.value)
    assert message == ("init cannot create the directory /proc/tillsync-init-test (no such file"
                       " or directory) — pass --dir with a directory on a writable disk,"
                       " e.g. /etc/tillsync")
