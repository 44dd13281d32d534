"""The home directory: where it is, what `init` writes, private atomic files, and one sentence
for each thing that can be wrong in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valuemesh.node.home import Home, resolve_home, write_private
from valuemesh.protocol.errors import KeyFileError, LocalError


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VALUEMESH_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("VALUEMESH_HOME")
    assert resolve_home(None) == tmp_path / "xdg" / "valuemesh"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_home(None) == tmp_path / "user" / ".local" / "share" / "valuemesh"


def test_write_private_is_atomic_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "file"
    write_private(path, b"one")
    write_private(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["file"]  # no temporary file left


def test_init_writes_the_key_and_only_the_chosen_settings(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    assert not home.initialised and home.config() == {}
    ident = home.init("ana")
    assert home.initialised and home.load_identity().member == ident.member
    assert json.loads((home.path / "config.json").read_text()) == {"name": "ana"}
    assert home.key_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(LocalError, match="already holds an identity"):
        home.init("ana")


def test_init_keeps_settings_set_before_it(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.save_config({"mdns": False})
    home.init("")
    assert home.config() == {"mdns": False}


@pytest.mark.parametrize(("text", "match"), [("{nope", "is not valid JSON"), ("[1]", "must hold a JSON object")])
def test_a_broken_config_file_is_one_sentence(tmp_path: Path, text: str, match: str) -> None:
    home = Home(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(LocalError, match=match):
        home.config()


def test_identity_errors(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    with pytest.raises(LocalError, match="run 'valuemesh init' first"):
        home.load_identity()
    home.init("")
    home.key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        home.load_identity()


def test_api_token_and_address_live_only_while_the_daemon_runs(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with pytest.raises(LocalError, match="not running"):
        home.api_address()
    with pytest.raises(LocalError, match="not running"):
        home.api_token()
    token = home.new_api_token()
    home.write_api_address("127.0.0.1", 7471, 42)
    assert home.api_token() == token and home.api_address() == ("127.0.0.1", 7471)
    home.clear_api_address()
    home.clear_api_address()  # twice is fine: a second stop after a crash
    with pytest.raises(LocalError, match="not running"):
        home.api_address()


def test_write_private_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink at the old fixed temporary name (config.json.tmp) pointing at a file of the
    member's is neither followed nor replaced: the target keeps its bytes."""
    home = tmp_path / "h"
    home.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (home / "config.json.tmp").symlink_to(victim)
    write_private(home / "config.json", b"{}\n")
    assert victim.read_bytes() == b"keep me"
    assert (home / "config.json").read_bytes() == b"{}\n"
    assert not (home / "config.json").is_symlink()
    assert (home / "config.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["config.json", "config.json.tmp"]


def test_write_private_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "config.json").mkdir(parents=True)  # a directory where the file should go: rename fails
    with pytest.raises(OSError):
        write_private(home / "config.json", b"{}")
    assert [p.name for p in home.iterdir()] == ["config.json"]
