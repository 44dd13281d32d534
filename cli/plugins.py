"""`valuemesh plugin list|info` and the mounting of each installed plugin's own
commands as `valuemesh <name> …`; re-exports the helpers those commands use.

A plugin's commands load only when invoked, so a broken plugin costs the other
commands nothing; when it fails to load, it is skipped with one line on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import click

# The helpers for plugin commands (public, plugin API 1) live in cli/common.py with the rest of
# the CLI's; they are re-exported here, the module plugin authors import them from.
from valuemesh.cli.common import Submitted, api, emit, fail, json_option, submit
from valuemesh.protocol.errors import LocalError, PluginError, ValuemeshError
from valuemesh.protocol.plugins import ENTRY_POINT_GROUP, Plugin

# The distribution whose plugins are built in: their commands live in valuemesh.cli itself.
BUILTIN_DISTRIBUTION = "valuemesh"
# The shape of `plugin list --json` / `plugin info --json`; bumped when a field changes meaning.
JSON_SHAPE_VERSION = 1

__all__ = ["Submitted", "api", "emit", "fail", "json_option", "register", "submit"]


# -- inspecting installed plugins --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstalledPlugin:
    """What `plugin list` says about one entry point; the JSON users script against."""

    name: str
    distribution: str
    distribution_version: str
    version: str | None
    api_version: int | None
    description: str
    ops: dict[str, dict[str, str]]
    views: list[str]
    has_cli: bool
    has_routes: bool
    error: str | None
    hook_errors: dict[str, str]

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution,
                "distribution_version": self.distribution_version, "version": self.version,
                "api_version": self.api_version, "description": self.description, "ops": self.ops,
                "views": self.views, "cli": self.has_cli, "routes": self.has_routes,
                "error": self.error, "hook_errors": self.hook_errors}


def _dist(ep: EntryPoint) -> tuple[str, str, str]:
    dist = ep.dist
    if dist is None:
        return "", "", ""
    return dist.name, dist.version, (dist.metadata.get_all("Summary") or [""])[0]


def _load_plugin(ep: EntryPoint) -> Plugin:
    try:
        obj = ep.load()
        plugin = obj() if isinstance(obj, type) else obj
    except Exception as exc:
        raise PluginError(f"Plugin entry point '{ep.name}' failed to load ({type(exc).__name__}: {exc}).") from None
    if not isinstance(plugin, Plugin):
        raise PluginError(f"Entry point '{ep.name}' does not name a valuemesh Plugin.")
    return plugin


def _describe_ops(plugin: Plugin) -> dict[str, dict[str, str]]:
    # "text?" marks an optional field, as in the reference tables of docs/plugins.md.
    return {op: {f: spec.kind + ("" if spec.required else "?") for f, spec in fields.items()}
            for op, fields in plugin.ops.items()}


def _hook(errors: dict[str, str], name: str, call: Any, default: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # any plugin bug is reported as data, never raised here
        errors[name] = exc.message if isinstance(exc, ValuemeshError) else f"{type(exc).__name__}: {exc}"
        return default


def inspect(ep: EntryPoint) -> InstalledPlugin:
    """Load one entry point and describe it; a broken plugin or hook is described, not raised."""
    dist, dist_version, summary = _dist(ep)
    try:
        plugin = _load_plugin(ep)
    except PluginError as exc:
        return InstalledPlugin(ep.name, dist, dist_version, None, None, summary, {}, [], False, False,
                               exc.message, {})
    errors: dict[str, str] = {}
    ops = _hook(errors, "ops", lambda: _describe_ops(plugin), {})
    views = sorted(_hook(errors, "views()", plugin.views, {}))
    has_cli = _hook(errors, "cli()", plugin.cli, None) is not None
    has_routes = bool(_hook(errors, "api_routes()", plugin.api_routes, []))
    return InstalledPlugin(ep.name, dist, dist_version, str(plugin.version), plugin.api_version,
                           plugin.description or summary, ops, views, has_cli, has_routes,
                           None, errors)


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _daemon_view() -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
    """(plugins the running daemon loaded, its constellations with their plugins), or (None, [])."""
    client = api()
    try:
        ident = client.call("GET", "/v1/id")
    except LocalError:
        return None, []
    out = []
    for c in client.call("GET", "/v1/constellations")["constellations"]:
        detail = client.call("GET", f"/v1/constellations/{c['id']}")
        out.append({"id": c["id"], "name": c["name"], "plugins": detail.get("plugins", {})})
    return dict(ident.get("plugins", {})), out


def _full_doc(p: InstalledPlugin, daemon_plugins: dict[str, str] | None,
              constellations: list[dict[str, Any]]) -> dict[str, Any]:
    doc = p.doc()
    if daemon_plugins is None:
        doc["daemon"] = None
        doc["constellations"] = None
    else:
        doc["daemon"] = daemon_plugins.get(p.name)
        doc["constellations"] = [{"id": c["id"], "name": c["name"], "version": c["plugins"][p.name]}
                                 for c in constellations if p.name in c["plugins"]]
    return doc


def _state(doc: dict[str, Any]) -> str:
    if doc["error"]:
        return f"broken: {doc['error']}"
    if doc["constellations"] is not None and doc["daemon"] is None:
        # The daemon's registry is what counts; the operator may have switched it off there.
        return "installed, but the running daemon did not load it (VALUEMESH_DISABLE_PLUGINS?)"
    if doc["hook_errors"]:
        return "hooks failing: " + "; ".join(f"{k} {v}" for k, v in doc["hook_errors"].items())
    return "ok"


def _uses(doc: dict[str, Any]) -> str:
    if doc["constellations"] is None:
        return "(daemon not running: installed only)"
    return ", ".join(f"{c['name']} ({c['id'][:12]}…, {c['version']})" for c in doc["constellations"]) or "none"


# -- mounting a plugin's own commands ------------------------------------------------------


def _contain(name: str, group: click.Command) -> None:
    """Turn a crash inside the plugin's commands into one sentence naming the plugin."""
    inner = group.invoke

    def invoke(ctx: click.Context) -> Any:
        try:
            return inner(ctx)
        except (ValuemeshError, click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:
            raise PluginError(f"Plugin '{name}' failed in its command ({type(exc).__name__}: {exc}).") from None

    group.invoke = invoke  # type: ignore[method-assign]


class PluginCommands(click.Command):
    """Stands for a plugin's click group until it is invoked, then hands over to it.

    `make_context` returns the real group's context, so click invokes the
    plugin's group itself (with its own options, subcommands and --help).
    """

    def __init__(self, ep: EntryPoint) -> None:
        dist, dist_version, summary = _dist(ep)
        super().__init__(name=ep.name, add_help_option=False,
                         short_help=f"{summary or 'Commands of the ' + ep.name + ' plugin.'} "
                                    f"[plugin, {f'{dist} {dist_version}'.strip() or 'unknown distribution'}]",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        self.ep = ep
        self.dist = f"{dist} {dist_version}".strip() or "unknown distribution"

    def load(self) -> click.Command:
        try:
            group = _load_plugin(self.ep).cli()
        except Exception as exc:  # a plugin's bug must never break valuemesh
            msg = exc.message if isinstance(exc, ValuemeshError) else f"{type(exc).__name__}: {exc}"
            click.echo(f"warning: skipped plugin '{self.ep.name}' ({self.dist}): its commands failed to load: "
                       f"{msg}", err=True)
            fail(f"The plugin '{self.ep.name}' has no usable commands; the rest of valuemesh is unaffected.")
        if group is None:
            fail(f"The plugin '{self.ep.name}' ({self.dist}) has no commands.")
        if not isinstance(group, click.Command):
            click.echo(f"warning: skipped plugin '{self.ep.name}' ({self.dist}): cli() returned "
                       f"{type(group).__name__}, not a click command.", err=True)
            fail(f"The plugin '{self.ep.name}' has no usable commands; the rest of valuemesh is unaffected.")
        _contain(self.ep.name, group)
        return group

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return self.load().make_context(info_name or self.name, args, parent=parent, **extra)


def _mount_all(cli: click.Group) -> None:
    seen: set[str] = set()
    try:
        eps = _entry_points()
    except Exception as exc:  # broken package metadata must not stop the CLI
        click.echo(f"warning: could not list installed plugins: {exc}", err=True)
        return
    for ep in eps:
        if ep.name in seen or ep.name in cli.commands:
            continue  # valuemesh's own commands win; a duplicate name is refused by the registry anyway
        seen.add(ep.name)
        dist = ep.dist
        if dist is not None and dist.name == BUILTIN_DISTRIBUTION:
            continue
        cli.add_command(PluginCommands(ep))


# -- `valuemesh plugin …` ----------------------------------------------------------------------


@click.group("plugin")
def plugin_group() -> None:
    """Installed record-type plugins: versions, distributions, which constellations use them."""


@plugin_group.command("list")
@json_option
def plugin_list() -> None:
    """Every installed plugin, its version and distribution, and where it is used."""
    daemon_plugins, cons = _daemon_view()
    docs = [_full_doc(inspect(ep), daemon_plugins, cons) for ep in _entry_points()]
    lines = []
    for d in docs:
        version = d["version"] or "?"
        lines.append(f"{d['name']:<14} {version:<6} {d['distribution']} {d['distribution_version']}  "
                     f"[{_state(d)}]")
        lines.append(f"{'':<14} used by: {_uses(d)}")
    emit({"v": JSON_SHAPE_VERSION, "daemon": daemon_plugins is not None, "plugins": docs},
         "\n".join(lines) or "no plugins installed")


@plugin_group.command("info")
@click.argument("name")
@json_option
def plugin_info(name: str) -> None:
    """One plugin in detail: its ops and fields, views, hooks and where it is used."""
    eps = [ep for ep in _entry_points() if ep.name == name]
    if not eps:
        fail(f"No plugin '{name}' is installed; 'valuemesh plugin list' shows what is.")
    daemon_plugins, cons = _daemon_view()
    d = _full_doc(inspect(eps[0]), daemon_plugins, cons)
    lines = [f"{d['name']} {d['version'] or '?'}  (plugin API {d['api_version'] or '?'})",
             f"distribution  {d['distribution']} {d['distribution_version']}",
             f"state         {_state(d)}",
             f"about         {d['description']}",
             f"commands      {'valuemesh ' + d['name'] + ' …' if d['cli'] else 'none'}",
             f"API routes    {'/plugins/' + d['name'] + '/' if d['routes'] else 'none'}",
             f"views         {', '.join(d['views']) or 'none'}",
             f"daemon        {'not running' if daemon_plugins is None else (d['daemon'] or 'not loaded')}",
             f"used by       {_uses(d)}",
             "ops:"]
    for op, fields in d["ops"].items():
        lines.append(f"  {op}: " + (", ".join(f"{f} ({k})" for f, k in fields.items()) or "no fields"))
    emit({"v": JSON_SHAPE_VERSION, **d}, "\n".join(lines))


def register(cli: click.Group) -> None:
    """Add `plugin list|info` and mount every third-party plugin's commands on `cli`."""
    cli.add_command(plugin_group)
    _mount_all(cli)
