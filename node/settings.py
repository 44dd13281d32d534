"""Every operator setting of a node in one documented, frozen object, and how it is read:
flag > `VALUEMESH_*` environment variable > the home's config.json > the default here.

Fixed protocol limits (message sizes, timeouts every member must share) are not settings;
docs/operator.md lists which module constants are which. Bad input is one sentence naming the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from valuemesh.node.addresses import parse_hostport
from valuemesh.node.announcement import MAX_NETWORK_ID
from valuemesh.node.catchup import CHECKPOINT_START_MIN_RECORDS
from valuemesh.node.home import CONFIG_FILE, Home
from valuemesh.protocol.errors import LocalError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_NAME = 64  # characters of the name carried in a join record
# VALUEMESH_* variables that are not settings: where the home is, a secret, measuring tools.
OTHER_ENV = frozenset({"VALUEMESH_HOME", "VALUEMESH_PASSPHRASE", "VALUEMESH_TRACE", "VALUEMESH_TRACE_PROFILE"})
ENV_PREFIX = "VALUEMESH_"


def _setting(default: Any, kind: str, doc: str, *, env: str = "", flag: str = "") -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc, "env": env, "flag": flag})


@dataclass(frozen=True, slots=True)
class Settings:
    """A node's operator settings; `Settings()` is the documented default node."""

    name: str = _setting("", "name", "The name other members see when this node joins a constellation.",
                         flag="--name")
    network: str = _setting("valuemesh-main", "network",
                            "Network id; nodes of different networks refuse each other in the handshake.",
                            flag="--network")
    listen: str = _setting("[::]:7470", "address",
                           "Peer port HOST:PORT, on every interface ([::]: IPv4 and IPv6) so that other members "
                           "can reach it.",
                           flag="--listen")
    api: str = _setting("127.0.0.1:7471", "loopback",
                        "Local API HOST:PORT; loopback only, guarded by the token in api.token.", flag="--api")
    bootstrap: tuple[str, ...] = _setting((), "peers", "Peers to dial and keep, HOST:PORT each.",
                                          flag="--bootstrap")
    mdns: bool = _setting(False, "bool", "Announce and browse on the LAN (mDNS); off unless chosen, as the "
                                         "announcement names this member to every host on the LAN.",
                          flag="--mdns/--no-mdns")
    mdns_interfaces: tuple[str, ...] = _setting((), "ips", "Interface IPs for mDNS (default: every non-loopback "
                                                           "IPv4 interface in use).", flag="--mdns-interface")
    serve_relay: bool = _setting(True, "bool", "Relay end-to-end encrypted links between members of a constellation "
                                               "this node is in who cannot reach each other directly (budgeted "
                                               "per member; docs/transport.md §9).",
                                 flag="--serve-relay/--no-serve-relay")
    port_mapping: bool = _setting(True, "bool", "Ask the home router to forward the peer port (PCP, NAT-PMP, then "
                                                "UPnP-IGD) so that members behind NAT can be dialled; renewed while "
                                                "running, removed on a clean stop.",
                                  flag="--port-mapping/--no-port-mapping")
    log_level: str = _setting("info", "level", "Least severe log line written to stderr.",
                              env="VALUEMESH_LOG", flag="--log-level")
    verify_threads: int = _setting(0, "count", "Threads checking signatures of a peer's batch (0: the usable "
                                               "cores, at most 4; 1: all on the event loop's thread).",
                                   flag="--verify-threads")
    checkpoint_start_min_records: int = _setting(
        CHECKPOINT_START_MIN_RECORDS, "count",
        "A joining node starts from a certified checkpoint covering at least this many "
        "final records (0: always) instead of replaying every block.",
        flag="--checkpoint-start-min-records")
    retain_epochs: int = _setting(0, "count", "Keep the blocks of only the last N closed epochs (0: keep every "
                                              "block; pruning nodes cannot export).", flag="--retain-epochs")
    disable_plugins: tuple[str, ...] = _setting((), "plugins", "Installed plugins this node does not load "
                                                               "(it then refuses constellations using them).",
                                                flag="--disable-plugin")

    def to_config(self) -> dict[str, Any]:
        """The settings as config.json would hold them (lists, not tuples)."""
        return {s.key: list(v) if isinstance(v := getattr(self, s.key), tuple) else v for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One setting's key, type, default, doc and where it is read from."""

    key: str
    kind: str
    default: Any
    doc: str
    env: str
    flag: str

    @property
    def type_text(self) -> str:
        return _KINDS[self.kind][0]

    def text(self, value: Any) -> str:
        """How `config get` and `--help` print a value."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple | list):
            return ",".join(value)
        return str(value)


# -- checking one value ---------------------------------------------------------------------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _name(value: Any) -> str:
    v = _text(value)
    if len(v) > MAX_NAME:
        raise ValueError
    return v


def _network(value: Any) -> str:
    v = _text(value).strip()
    if not v or len(v.encode()) > MAX_NETWORK_ID:
        raise ValueError
    return v


def _listen_host(value: Any, default_host: str) -> tuple[str, str]:
    v = _text(value).strip()
    try:
        host, _ = parse_hostport(v, default_host=default_host)
    except LocalError:
        raise ValueError from None
    return v, host


def _address(value: Any) -> str:
    return _listen_host(value, "::")[0]


def _loopback(value: Any) -> str:
    v, host = _listen_host(value, "127.0.0.1")
    if host not in LOOPBACK_HOSTS:
        raise ValueError
    return v


def _list(item: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError
        return tuple(item(v) for v in value)
    return check


def _peer(value: Any) -> str:
    try:
        parse_hostport(_text(value))
    except LocalError:
        raise ValueError from None
    return _text(value).strip()


def _ip(value: Any) -> str:
    v = _text(value).strip()
    ipaddress.ip_address(v)  # raises ValueError
    return v


def _plugin(value: Any) -> str:
    v = _text(value).strip()
    if not v or v == "membership":  # without it no genesis applies: every constellation would fail
        raise ValueError
    return v


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError


def _count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError
    return value


def _level(value: Any) -> str:
    v = _text(value).strip().lower()
    if v not in LOG_LEVELS:
        raise ValueError
    return v


# kind -> (what a value must be, its checker); the checker raises ValueError on anything else.
_KINDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": (f"text of at most {MAX_NAME} characters", _name),
    "network": (f"non-empty text of at most {MAX_NETWORK_ID} bytes", _network),
    "address": ("an address HOST:PORT, like 0.0.0.0:7470", _address),
    "loopback": ("a loopback address HOST:PORT (host 127.0.0.1, ::1 or localhost)", _loopback),
    "peers": ("a list of peer addresses HOST:PORT (comma-separated in text)", _list(_peer)),
    "ips": ("a list of IP addresses (comma-separated in text)", _list(_ip)),
    "plugins": ("a list of plugin names other than membership (comma-separated in text)", _list(_plugin)),
    "bool": ("true or false", _bool),
    "count": ("a whole number of 0 or more", _count),
    "level": (f"one of {', '.join(LOG_LEVELS)}", _level),
}

SETTINGS: tuple[SettingInfo, ...] = tuple(
    SettingInfo(f.name, f.metadata["kind"], f.default, f.metadata["doc"],
                f.metadata["env"] or ENV_PREFIX + f.name.upper(), f.metadata["flag"])
    for f in fields(Settings)
)
BY_KEY: dict[str, SettingInfo] = {s.key: s for s in SETTINGS}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def info(key: str, where: str = "") -> SettingInfo:
    """The setting called `key`, or one sentence naming the unknown key and the nearest known one."""
    s = BY_KEY.get(key)
    if s is None:
        place = f" in {where}" if where else ""
        raise LocalError(f"Unknown setting '{key}'{place}{_did_you_mean(key, list(BY_KEY))}; "
                         "'valuemesh config list' shows every setting.")
    return s


def check(key: str, value: Any, where: str) -> Any:
    """`value` as the known setting `key`'s type, or one sentence saying where it is wrong and why."""
    what, checker = _KINDS[BY_KEY[key].kind]
    try:
        return checker(value)
    except (ValueError, TypeError):
        raise LocalError(f"{where} must be {what}, not {json.dumps(value)}.") from None


# -- reading the three sources ------------------------------------------------------------------


def read_file(home: Home) -> dict[str, Any]:
    """The checked values set in the home's config.json (only those it sets)."""
    path = home.path / CONFIG_FILE
    raw = home.config()
    return {k: check(info(k, str(path)).key, v, f"The setting '{k}' in {path}") for k, v in raw.items()}


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The checked values set by VALUEMESH_* variables; an unknown VALUEMESH_ name is refused."""
    by_env = {s.env: s for s in SETTINGS}
    out: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        s = by_env.get(name)
        if s is None:
            raise LocalError(f"Unknown environment variable {name}{_did_you_mean(name, list(by_env))}; "
                             "'valuemesh config list' shows every setting and its variable.")
        out[s.key] = check(s.key, text, name)
    return out


def read_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The checked values given on the command line; None (or an empty repeatable) means not given."""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value == ():
            continue
        out[key] = check(key, value, info(key).flag.split("/")[0])
    return out


def resolve(home: Home, flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Settings, dict[str, str]]:
    """The settings and, per key, where its value came from: flag, env, file or default."""
    layers = (("file", read_file(home)), ("env", read_env(env)), ("flag", read_flags(flags)))
    values: dict[str, Any] = {}
    source = {s.key: "default" for s in SETTINGS}
    for where, layer in layers:  # later layers win
        values.update(layer)
        source.update(dict.fromkeys(layer, where))
    return replace(Settings(), **values), source


def load(home: Home, flags: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """The settings of a node started with these flags and environment."""
    return resolve(home, flags, env)[0]


def set_in_file(home: Home, key: str, text: str) -> Any:
    """Check `text` as `key`'s value and write it into config.json atomically (mode 0600).

    The whole resulting file is checked first: nothing is written if any key in it is wrong.
    """
    value = check(info(key).key, text, f"The value of '{key}'")
    raw = dict(home.config())
    read_file(home)
    raw[key] = list(value) if isinstance(value, tuple) else value
    home.save_config(raw)
    return value
