"""The record-type plugin API (version 2) and the registry that loads plugins.

Every record type, the built-in ones included, is a `Plugin`: a name and a
version, a declarative body schema per operation, `validate`/`apply` hooks
over the ledger state, and optional commands and read-only API routes. Hooks
default to safe no-ops; the registry refuses name collisions and is filled
from the `valuemesh.plugins` entry-point group. Plugin authors import all of
this from `valuemesh.plugin`, the one public front door.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from .errors import DecodeError, PluginError, ValidationError
from .identity import MemberId
from .records import constellation_text

if TYPE_CHECKING:
    # For annotations only: click is the command line's library, never loaded by protocol/.
    import click

    from .ledger import ApplyContext, Ledger, StateReader
    from .records import Record

# 2: cli() and api_routes() are typed; routes are `Route`s over a `ConstellationView` (docs/plugins.md).
PLUGIN_API_VERSION = 2
ENTRY_POINT_GROUP = "valuemesh.plugins"
# Always used with fullmatch: `$` would also accept a trailing newline.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,14})(\.[0-9]{1,6})?")
_VERSION_RE = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})")
_KINDS = frozenset({"text", "int", "bytes", "hash", "member", "bool", "decimal", "list", "map"})
# A route path below /plugins/<name>/{cid}: literal segments and {param} segments.
_ROUTE_PATH_RE = re.compile(r"(/([A-Za-z0-9._~-]+|\{[a-z_][a-z0-9_]{0,31}\}))*")


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a record body.

    kinds: text, int, bytes, hash (32 bytes), member (32-byte key), bool,
    decimal (a non-negative decimal string such as "12.50"), list (of `item`),
    map (a nested body checked against `fields`).
    """

    kind: str
    required: bool = True
    max_len: int = 256
    min: int | None = None
    max: int | None = None
    choices: tuple[str, ...] | None = None
    item: Field | None = None
    fields: Mapping[str, Field] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise PluginError(f"Field kind '{self.kind}' is not one of {sorted(_KINDS)}.")
        if self.kind == "list" and self.item is None:
            raise PluginError("A list field needs an item field.")
        if self.kind == "map" and self.fields is None:
            raise PluginError("A map field needs its fields.")

    def check(self, name: str, value: object) -> None:
        """Raise DecodeError unless `value` fits this field."""
        k = self.kind
        if k == "text":
            if not isinstance(value, str):
                raise DecodeError(f"Field '{name}' must be text.")
            if len(value) > self.max_len:
                raise DecodeError(f"Field '{name}' is longer than {self.max_len} characters.")
            if self.choices is not None and value not in self.choices:
                raise DecodeError(f"Field '{name}' must be one of: {', '.join(self.choices)}.")
        elif k == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise DecodeError(f"Field '{name}' must be an integer.")
            if self.min is not None and value < self.min:
                raise DecodeError(f"Field '{name}' must be at least {self.min}.")
            if self.max is not None and value > self.max:
                raise DecodeError(f"Field '{name}' must be at most {self.max}.")
        elif k in ("bytes", "hash", "member"):
            if not isinstance(value, bytes):
                raise DecodeError(f"Field '{name}' must be bytes.")
            if k in ("hash", "member") and len(value) != 32:
                raise DecodeError(f"Field '{name}' must be 32 bytes.")
            if len(value) > self.max_len and k == "bytes":
                raise DecodeError(f"Field '{name}' is longer than {self.max_len} bytes.")
        elif k == "bool":
            if not isinstance(value, bool):
                raise DecodeError(f"Field '{name}' must be true or false.")
        elif k == "decimal":
            if not isinstance(value, str) or not _DECIMAL_RE.fullmatch(value):
                raise DecodeError(
                    f"Field '{name}' must be a non-negative decimal like '12.5' "
                    "(at most 15 digits before and 6 after the point)."
                )
        elif k == "list":
            if not isinstance(value, list):
                raise DecodeError(f"Field '{name}' must be a list.")
            if len(value) > (self.max if self.max is not None else 64):
                raise DecodeError(f"Field '{name}' has too many items.")
            assert self.item is not None
            for i, v in enumerate(value):
                self.item.check(f"{name}[{i}]", v)
        elif k == "map":
            assert self.fields is not None
            check_fields(name, self.fields, value)


def check_fields(where: str, fields: Mapping[str, Field], value: object) -> None:
    if not isinstance(value, dict):
        raise DecodeError(f"{where} must be a map.")
    unknown = set(value) - set(fields)
    if unknown:
        raise DecodeError(f"{where} has unknown field '{sorted(map(str, unknown))[0]}'.")
    for fname, spec in fields.items():
        if fname in value:
            spec.check(fname, value[fname])
        elif spec.required:
            raise DecodeError(f"{where} lacks the required field '{fname}'.")


def text(max_len: int = 256, *, required: bool = True, choices: Iterable[str] | None = None) -> Field:
    return Field("text", required, max_len, choices=tuple(choices) if choices is not None else None)


# Every body's `op` field (a Field is immutable, so one serves every record).
_OP_FIELD = text(32)


def integer(min: int | None = None, max: int | None = None, *, required: bool = True) -> Field:
    return Field("int", required, min=min, max=max)


@dataclass(frozen=True, slots=True)
class Version:
    """A plugin version: records carry `major`; a newer `minor` reads older records."""

    major: int
    minor: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if not m:
            raise PluginError(f"'{text}' is not a plugin version like '1.0'.")
        return cls(int(m.group(1)), int(m.group(2)))

    def satisfies(self, required: Version) -> bool:
        return self.major == required.major and self.minor >= required.minor


# A JSON document, as a plugin route answers (dicts and lists, not other mappings or sequences).
Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"


@dataclass(frozen=True, slots=True)
class ConstellationView:
    """What a plugin route may see of one constellation (API 2): its final ledger state, read-only.

    Build one with `ConstellationView.of(ledger)` (the daemon does; tests may, from
    `TestConstellation.ledger`). `state` reads the ledger live: the view is
    consistent for the duration of one synchronous handler call, not after it.
    """

    id: str  # the constellation's text id, `vc1…`
    name: str
    state: StateReader  # the final state: the same on every node once they agree
    state_hash: bytes
    members: tuple[MemberId, ...]  # active members, in key order
    plugins: Mapping[str, Version]  # the plugins its genesis names, with their versions

    @classmethod
    def of(cls, ledger: Ledger) -> ConstellationView:
        state = ledger.reader
        meta = state.read("membership", "meta")
        meta = meta if isinstance(meta, dict) else {}
        active = tuple(MemberId(bytes.fromhex(k[2:])) for k, m in state.scan("membership", "m/")
                       if isinstance(m, dict) and m.get("status") == "active")
        plugins = {str(n): Version.parse(v) for n, v in meta.get("plugins", {}).items()}
        return cls(constellation_text(ledger.constellation), str(meta.get("name", "")), state,
                   ledger.state_hash(), active, MappingProxyType(plugins))


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a plugin route's handler receives (API 2): one constellation, and the request's text arguments."""

    constellation: ConstellationView
    params: Mapping[str, str]  # the route path's {param} values
    query: Mapping[str, str]  # the query string, first value of each name


RouteHandler: TypeAlias = "Callable[[RouteRequest], Json]"


@dataclass(frozen=True, slots=True)
class Route:
    """A read-only JSON route of a plugin (API 2), served as `GET /plugins/<name>/{cid}<path>`.

    `path` is "" or `/`-separated literal and `{param}` segments; `handler` is a
    plain (not async) function of the request that returns a JSON document and
    may raise valuemesh errors, which the daemon answers as one-sentence JSON errors.
    The handler's docstring is its summary in the API's OpenAPI document.
    """

    path: str
    handler: RouteHandler

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not _ROUTE_PATH_RE.fullmatch(self.path):
            raise PluginError(f"Route path '{self.path}' must be '' or '/'-separated names and {{params}}.")
        if "{cid}" in self.path:
            raise PluginError(f"Route path '{self.path}' must not name {{cid}}: the daemon puts it first.")
        if not callable(self.handler):
            raise PluginError(f"The handler of route '{self.path}' is not callable.")


class Plugin:
    """Base class of a record-type plugin (plugin API version 2).

    Subclasses set `name`, `version` and `ops` (operation name → body fields)
    and override `validate` and `apply`. Every record body has an `op` field
    naming one of `ops`. Hooks added or changed after API 1 say so in docs/plugins.md.
    """

    name: ClassVar[str] = ""
    version: ClassVar[Version] = Version(1, 0)
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    ops: ClassVar[Mapping[str, Mapping[str, Field]]] = {}
    description: ClassVar[str] = ""
    distribution: ClassVar[str] = "valuemesh"

    def check_body(self, body: Mapping[str, Any]) -> str:
        """Check a body against the schema of its op; return the op (API 1)."""
        if not isinstance(body, dict):
            raise DecodeError("A record body must be a map.")
        op = body.get("op")
        if not isinstance(op, str) or op not in self.ops:
            raise DecodeError(f"A '{self.name}' record needs 'op', one of: {', '.join(self.ops)}.")
        check_fields(f"A '{self.name}.{op}' body", {**self.ops[op], "op": _OP_FIELD}, body)
        return op

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        """Raise ValidationError if `record` may not apply to the current state (API 1)."""

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        """Change the ledger state for `record`, through `ctx` only (API 1)."""

    def views(self) -> Mapping[str, Callable[[StateReader], Any]]:
        """Named read-only views derived from the ledger state (API 1)."""
        return {}

    def examples(self) -> list[dict[str, Any]]:
        """Valid example bodies, used by the conformance kit (API 1)."""
        return []

    def cli(self) -> click.Group | None:
        """An optional click group mounted as `valuemesh <name> …` (API 1; typed since API 2)."""
        return None

    def api_routes(self) -> list[Route]:
        """Optional read-only routes served under /plugins/<name>/{cid} (API 2)."""
        return []


@dataclass
class Registry:
    """The plugins this node can interpret, by name."""

    plugins: dict[str, Plugin] = field(default_factory=dict)

    def register(self, plugin: Plugin) -> None:
        name = getattr(plugin, "name", "")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise PluginError(f"Plugin name '{name}' must be lowercase letters, digits or _, up to 32.")
        if plugin.api_version != PLUGIN_API_VERSION:
            raise PluginError(
                f"Plugin '{name}' targets plugin API {plugin.api_version}; this valuemesh "
                f"supports {PLUGIN_API_VERSION}."
            )
        existing = self.plugins.get(name)
        if existing is not None and existing is not plugin:
            raise PluginError(
                f"Two plugins are named '{name}' ({existing.distribution} "
                f"{existing.version} and {plugin.distribution} {plugin.version}); uninstall one."
            )
        for op, fields in plugin.ops.items():
            if "op" in fields:
                raise PluginError(f"Plugin '{name}' op '{op}' must not declare a field named 'op'.")
        self.plugins[name] = plugin

    def get(self, name: str) -> Plugin:
        try:
            return self.plugins[name]
        except KeyError:
            raise PluginError(
                f"No plugin '{name}' is installed; install the distribution that provides it."
            ) from None

    def require(self, needs: Mapping[str, Version]) -> None:
        """Raise PluginError naming what to install if `needs` is not met."""
        for name, want in sorted(needs.items()):
            have = self.plugins.get(name)
            if have is None:
                raise PluginError(
                    f"This constellation uses plugin '{name}' {want}, which is not installed; "
                    f"install a distribution providing '{name}' {want.major}.x (at least {want})."
                )
            if not have.version.satisfies(want):
                raise PluginError(
                    f"This constellation uses plugin '{name}' {want}, but {have.version} is "
                    f"installed; install '{name}' {want.major}.x at least {want}."
                )

    def check(self, record: Record) -> tuple[Plugin, str]:
        """Find the plugin for a record and check its body; raise a typed error."""
        plugin = self.plugins.get(record.type)
        if plugin is None:
            raise ValidationError(f"No plugin interprets records of type '{record.type}'.")
        if record.v != plugin.version.major:
            raise ValidationError(
                f"A '{record.type}' record of version {record.v} cannot be read by "
                f"plugin version {plugin.version}."
            )
        return plugin, plugin.check_body(record.body)

    def names(self) -> list[str]:
        return sorted(self.plugins)


def load_entry_points(entry_points: Iterable[Any], registry: Registry | None = None) -> Registry:
    """Register every plugin from `entry_points` (objects with .name and .load()).

    The caller passes `importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)`
    so this module stays free of environment lookups.
    """
    reg = registry if registry is not None else Registry()
    for ep in sorted(entry_points, key=lambda e: e.name):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginError(f"Plugin entry point '{ep.name}' failed to load: {exc}.") from None
        plugin = obj() if isinstance(obj, type) else obj
        if not isinstance(plugin, Plugin):
            raise PluginError(f"Entry point '{ep.name}' does not name a valuemesh Plugin.")
        if plugin.name != ep.name:
            raise PluginError(f"Entry point '{ep.name}' names plugin '{plugin.name}'; they must match.")
        reg.register(plugin)
    return reg
