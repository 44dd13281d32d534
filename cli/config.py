"""`valuemesh config list|get|set`, and the daemon's one option per setting, both made from
the settings table in node/settings.py so that a new setting appears in all of them at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from valuemesh.cli.common import Ctx, Group, json_option, pass_ctx
from valuemesh.node.home import CONFIG_FILE
from valuemesh.node.settings import BY_KEY, SETTINGS, SettingInfo, info, resolve, set_in_file

F = TypeVar("F", bound=Callable[..., Any])
_LISTS = ("peers", "ips", "plugins")


def _option(s: SettingInfo) -> Callable[[F], F]:
    # The option's default is shown by --help only: what counts is whether the flag was given
    # (`given_flags`), so that the environment and the file can stand in for a missing flag.
    help_text = f"{s.doc} Env {s.env}."
    if s.kind == "bool":
        return click.option(s.flag, s.key, default=s.default, show_default=True, help=help_text)
    if s.kind in _LISTS:
        return click.option(s.flag, s.key, multiple=True, show_default="none",
                            help=f"{s.doc} Repeatable. Env {s.env} (comma-separated).")
    # Every value is checked by node/settings.py, so that a bad one is the same sentence from a
    # flag, the environment or the file (click's own type errors would be a usage screen).
    metavar = {"address": "HOST:PORT", "loopback": "HOST:PORT", "count": "N", "level": "LEVEL"}.get(s.kind, "TEXT")
    return click.option(s.flag, s.key, type=str, default=s.text(s.default), metavar=metavar,
                        show_default=True if s.text(s.default) else "none",
                        help=help_text + (" One of debug, info, warning, error." if s.kind == "level" else ""))


def settings_options(f: F) -> F:
    """One option per setting, in the table's order."""
    for s in reversed(SETTINGS):
        f = _option(s)(f)
    return f


def given_flags(params: dict[str, Any]) -> dict[str, Any]:
    """The settings among `params` that were given on the command line."""
    ctx = click.get_current_context()
    return {k: v for k, v in params.items()
            if k in BY_KEY and ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}


@click.group("config", cls=Group)
def config_group() -> None:
    """Show and change this home's settings (config.json); see docs/operator.md."""


@config_group.command("list")
@json_option
@pass_ctx
def config_list(c: Ctx) -> None:
    """Every setting: its value, where it comes from (env, file or default) and what it does."""
    settings, source = resolve(c.home, {}, os.environ)
    rows = [{"key": s.key, "value": s.text(getattr(settings, s.key)), "source": source[s.key],
             "default": s.text(s.default), "type": s.type_text, "env": s.env, "flag": s.flag, "doc": s.doc}
            for s in SETTINGS]
    width = max(len(s.key) for s in SETTINGS)
    c.out({"file": str(c.home.path / CONFIG_FILE), "settings": rows},
          "\n".join(f"{r['key']:<{width}}  {r['value'] or '-'}  ({r['source']})" for r in rows))


@config_group.command("get")
@click.argument("key")
@json_option
@pass_ctx
def config_get(c: Ctx, key: str) -> None:
    """The value a daemon started now would use for KEY (without flags)."""
    s = info(key)
    settings, source = resolve(c.home, {}, os.environ)
    value = getattr(settings, key)
    c.out({"key": key, "value": list(value) if isinstance(value, tuple) else value, "source": source[key]},
          s.text(value))


# A value may start with '-' (a wrong one, like -1, deserves the setting's own sentence).
@config_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
@json_option
@pass_ctx
def config_set(c: Ctx, key: str, value: str) -> None:
    """Check VALUE and write it as KEY into config.json (lists comma-separated)."""
    checked = set_in_file(c.home, key, value)
    path = c.home.path / CONFIG_FILE
    env = info(key).env
    note = f"; but {env} is set and wins over the file" if env in os.environ else ""
    c.out({"key": key, "value": list(checked) if isinstance(checked, tuple) else checked, "file": str(path),
           "overridden_by": env if note else None},
          f"{key} = {info(key).text(checked)} in {path}; a running daemon uses it from its next start{note}")
