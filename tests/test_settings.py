"""The one settings object: its documented defaults, flag > env > file > default, and every bad
key or value refused with one sentence naming it, before anything is written or started."""

from __future__ import annotations

import json
import re
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from valuemesh.node.home import Home
from valuemesh.node.settings import (
    BY_KEY,
    SETTINGS,
    Settings,
    info,
    load,
    resolve,
    set_in_file,
)
from valuemesh.protocol.errors import LocalError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operator.md"


def _home(tmp_path: Path, cfg: dict[str, object] | None = None) -> Home:
    home = Home(tmp_path / "home")
    if cfg is not None:
        home.save_config(cfg)
    return home


def _refused(match: str, home: Home, flags: dict[str, object] | None = None,
             env: dict[str, str] | None = None) -> str:
    with pytest.raises(LocalError) as caught:
        load(home, flags or {}, env or {})
    msg = caught.value.message
    assert re.search(match, msg), msg
    assert "\n" not in msg and msg.endswith((".", "?)")), msg
    return msg


def test_defaults_are_the_documented_node() -> None:
    s = Settings()
    assert (s.listen, s.api, s.network, s.mdns) == ("[::]:7470", "127.0.0.1:7471", "valuemesh-main", False)
    assert (s.verify_threads, s.checkpoint_start_min_records, s.retain_epochs) == (0, 10_000, 0)
    assert (s.bootstrap, s.mdns_interfaces, s.disable_plugins, s.log_level, s.name) == ((), (), (), "info", "")
    with pytest.raises(FrozenInstanceError):
        s.listen = "x"  # type: ignore[misc]


def test_every_setting_is_documented_with_its_variable_and_flag() -> None:
    text = DOCS.read_text()
    for s in SETTINGS:
        assert s.doc and s.flag.startswith("--") and s.env.startswith("VALUEMESH_"), s
        assert f"`{s.key}`" in text and f"`{s.env}`" in text and f"`{s.flag}`" in text, \
            f"docs/operator.md does not document the setting {s.key} ({s.env}, {s.flag})"
    assert BY_KEY["log_level"].env == "VALUEMESH_LOG"


def test_an_empty_home_runs_on_defaults(tmp_path: Path) -> None:
    settings, source = resolve(_home(tmp_path), {}, {})
    assert settings == Settings()
    assert set(source.values()) == {"default"}


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    home = _home(tmp_path, {"listen": "127.0.0.1:1", "network": "file-net", "verify_threads": 2})
    env = {"VALUEMESH_LISTEN": "127.0.0.1:2", "VALUEMESH_NETWORK": "env-net", "VALUEMESH_HOME": "/elsewhere"}
    settings, source = resolve(home, {"listen": "127.0.0.1:3"}, env)
    assert (settings.listen, settings.network, settings.verify_threads, settings.api) == \
        ("127.0.0.1:3", "env-net", 2, "127.0.0.1:7471")
    assert (source["listen"], source["network"], source["verify_threads"], source["api"]) == \
        ("flag", "env", "file", "default")


def test_text_values_from_env_and_flags_take_the_setting_type(tmp_path: Path) -> None:
    env = {"VALUEMESH_MDNS": "off", "VALUEMESH_BOOTSTRAP": "a.example:7470, [::1]:7470",
           "VALUEMESH_RETAIN_EPOCHS": "3", "VALUEMESH_LOG": "DEBUG", "VALUEMESH_DISABLE_PLUGINS": "sharing"}
    s = load(_home(tmp_path), {"mdns_interfaces": ("192.168.1.20",), "verify_threads": "1"}, env)
    assert s.mdns is False and s.retain_epochs == 3 and s.log_level == "debug" and s.verify_threads == 1
    assert s.bootstrap == ("a.example:7470", "[::1]:7470") and s.disable_plugins == ("sharing",)
    assert s.mdns_interfaces == ("192.168.1.20",)


def test_unknown_key_in_the_file_names_it_and_the_nearest(tmp_path: Path) -> None:
    home = _home(tmp_path, {"verify_thread": 2})
    msg = _refused("Unknown setting 'verify_thread'", home)
    assert "config.json" in msg and "did you mean 'verify_threads'?" in msg


@pytest.mark.parametrize(("cfg", "key"), [
    ({"verify_threads": "four"}, "verify_threads"), ({"verify_threads": -1}, "verify_threads"),
    ({"retain_epochs": True}, "retain_epochs"), ({"mdns": "maybe"}, "mdns"), ({"listen": "nowhere"}, "listen"),
    ({"listen": "127.0.0.1:70000"}, "listen"), ({"api": "0.0.0.0:7471"}, "api"), ({"bootstrap": "x"}, "bootstrap"),
    ({"bootstrap": ["host"]}, "bootstrap"), ({"network": ""}, "network"), ({"network": "n" * 65}, "network"),
    ({"name": "x" * 65}, "name"), ({"mdns_interfaces": ["eth0"]}, "mdns_interfaces"),
    ({"disable_plugins": ["membership"]}, "disable_plugins"), ({"log_level": "verbose"}, "log_level"),
])
def test_bad_value_in_the_file_names_the_key(tmp_path: Path, cfg: dict[str, object], key: str) -> None:
    _refused(f"The setting '{key}' in .*config.json must be", _home(tmp_path, cfg))


def test_bad_environment_is_one_sentence(tmp_path: Path) -> None:
    home = _home(tmp_path)
    assert _refused("VALUEMESH_LOG must be", home, env={"VALUEMESH_LOG": "verbose"}) == \
        "VALUEMESH_LOG must be one of debug, info, warning, error, not \"verbose\"."
    assert "did you mean 'VALUEMESH_LISTEN'" in _refused("Unknown environment variable VALUEMESH_LISTN", home,
                                                        env={"VALUEMESH_LISTN": "1"})
    # Variables that are not settings (where the home is, a secret, measuring tools) pass.
    env = {"VALUEMESH_HOME": "/x", "VALUEMESH_PASSPHRASE": "p", "VALUEMESH_TRACE": "/t", "OTHER": "1"}
    assert load(home, {}, env) == Settings()


def test_bad_flag_names_the_flag(tmp_path: Path) -> None:
    _refused("^--verify-threads must be a whole number", _home(tmp_path), flags={"verify_threads": "x"})
    _refused("^--api must be a loopback address", _home(tmp_path), flags={"api": "10.0.0.1:7471"})


def test_not_given_flags_do_not_count(tmp_path: Path) -> None:
    home = _home(tmp_path, {"bootstrap": ["a.example:1"]})
    assert load(home, {"bootstrap": (), "listen": None}, {}).bootstrap == ("a.example:1",)


def test_set_writes_checked_values_atomically_and_privately(tmp_path: Path) -> None:
    home = _home(tmp_path, {"name": "ana"})
    assert set_in_file(home, "bootstrap", "a.example:7470,b.example:7470") == ("a.example:7470", "b.example:7470")
    assert set_in_file(home, "mdns", "no") is False
    path = home.path / "config.json"
    assert json.loads(path.read_text()) == {"name": "ana", "bootstrap": ["a.example:7470", "b.example:7470"],
                                            "mdns": False}
    assert path.stat().st_mode & 0o777 == 0o600
    assert not list(home.path.glob("*.tmp"))


@pytest.mark.parametrize(("cfg", "key", "value", "match"), [
    ({}, "retain_epoch", "1", "Unknown setting 'retain_epoch'.*did you mean 'retain_epochs'"),
    ({}, "listen", "nope", "The value of 'listen' must be an address"),
    ({"verify_thread": 1}, "mdns", "off", "Unknown setting 'verify_thread' in"),
])
def test_set_refuses_and_changes_nothing(tmp_path: Path, cfg: dict[str, object], key: str, value: str,
                                         match: str) -> None:
    home = _home(tmp_path, cfg)
    before = (home.path / "config.json").read_bytes()
    with pytest.raises(LocalError, match=match):
        set_in_file(home, key, value)
    assert (home.path / "config.json").read_bytes() == before


def test_info_of_an_unknown_key() -> None:
    assert info("mdns").type_text == "true or false"
    with pytest.raises(LocalError, match="did you mean 'checkpoint_start_min_records'"):
        info("checkpoint_min_records")
