"""`valuemesh service install|uninstall`: the daemon as a systemd user unit (Linux) or a
launchd agent (macOS), rendered from the templates shipped next to this module.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import click

from valuemesh.cli.common import Ctx, Group, json_option, pass_ctx
from valuemesh.node.home import write_private
from valuemesh.protocol.errors import LocalError

LAUNCHD_LABEL = "org.valuemesh.daemon"
SYSTEMD_UNIT = "valuemesh.service"


@dataclass(frozen=True, slots=True)
class Service:
    """Where one platform's service file goes and how it is started and stopped."""

    platform: str
    path: Path
    text: str
    start: str
    stop: str  # while the file is still there
    stop_removed: str  # once it is gone
    link: Path | None = None  # what enabling made (`systemctl disable` removes it too)


def command() -> list[str]:
    """The installed `valuemesh` as argv: the script next to this Python, else `python -m`."""
    script = Path(sys.executable).parent / "valuemesh"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    found = shutil.which("valuemesh")
    if found:
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "valuemesh.cli.main"]


def _systemd_word(word: str) -> str:
    # systemd expands % specifiers and splits on blanks: escape the one, quote the other.
    word = word.replace("%", "%%")
    if any(ch in word for ch in ' \t"\'\\'):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _template(name: str) -> str:
    return files("valuemesh.cli").joinpath(name).read_text(encoding="utf-8")


def render_systemd(argv: list[str], home: Path) -> str:
    """The user unit running `argv daemon --home HOME`."""
    return (_template("valuemesh.service")
            .replace("@VALUEMESH@", " ".join(_systemd_word(w) for w in argv))
            .replace("@HOME@", _systemd_word(str(home))))


def _fill(value: Any, argv: list[str], home: Path) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, argv, home) for k, v in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for v in value:  # the command may be several words (python -m …)
            out.extend(argv if v == "@VALUEMESH@" else [_fill(v, argv, home)])
        return out
    if isinstance(value, str):
        return value.replace("@HOME@", str(home))
    return value


def render_launchd(argv: list[str], home: Path) -> str:
    """The launchd agent running `argv daemon --home HOME`, as plist XML."""
    doc = plistlib.loads(_template("valuemesh.plist").encode())
    return plistlib.dumps(_fill(doc, argv, home)).decode()


def service_for(platform: str, home: Path) -> Service:
    """The service file of this platform for the node in `home`, rendered, and its commands."""
    home = home.expanduser().absolute()
    argv = command()
    if platform == "launchd":
        path = Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        stop = f"launchctl bootout {domain}/{LAUNCHD_LABEL}"
        return Service(platform, path, render_launchd(argv, home), f"launchctl bootstrap {domain} {path}",
                       stop, stop)
    units = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    return Service(platform, units / SYSTEMD_UNIT, render_systemd(argv, home),
                   f"systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT}",
                   f"systemctl --user disable --now {SYSTEMD_UNIT}",
                   f"systemctl --user stop {SYSTEMD_UNIT} && systemctl --user daemon-reload",
                   units / "default.target.wants" / SYSTEMD_UNIT)


def _options(f: Any) -> Any:
    """What install and uninstall both take: the service manager, --print, --json, the Ctx."""
    f = pass_ctx(f)
    f = json_option(f)
    f = click.option("--dry-run", "--print", "dry_run", is_flag=True,
                     help="Only print the file and where it would go; change nothing.")(f)
    return click.option("--platform", type=click.Choice(["systemd", "launchd"]),
                        default="launchd" if sys.platform == "darwin" else "systemd", show_default=True,
                        help="Which service manager.")(f)


@click.group("service", cls=Group)
def service_group() -> None:
    """Run the daemon as a user service (systemd on Linux, launchd on macOS)."""


@service_group.command("install")
@_options
def service_install(c: Ctx, platform: str, dry_run: bool) -> None:
    """Write the service file for this home's daemon and print how to enable and start it."""
    svc = service_for(platform, c.home.path)
    if not c.home.initialised:
        raise LocalError(f"No identity in {c.home.path}; run 'valuemesh init' first, then install the service.")
    doc = {"platform": platform, "path": str(svc.path), "written": not dry_run, "start": svc.start,
           "stop": svc.stop, "text": svc.text}
    if dry_run:
        c.out(doc, f"# {svc.path}\n{svc.text}")
        return
    try:
        write_private(svc.path, svc.text.encode())
    except OSError as exc:
        raise LocalError(f"Cannot write {svc.path}: {exc.strerror or exc}.") from None
    c.out(doc, f"wrote {svc.path}\nenable and start it with: {svc.start}")


@service_group.command("uninstall")
@_options
def service_uninstall(c: Ctx, platform: str, dry_run: bool) -> None:
    """Remove the service file (and its enabling link); print how to stop it if it still runs."""
    svc = service_for(platform, c.home.path)
    gone = [p for p in (svc.path, svc.link) if p is not None and (p.exists() or p.is_symlink())]
    doc = {"platform": platform, "path": str(svc.path), "removed": [str(p) for p in gone] if not dry_run else [],
           "stop": svc.stop_removed}
    if not gone:
        c.out(doc, f"no service file at {svc.path}; nothing to remove")
        return
    if not dry_run:
        for p in gone:
            p.unlink()
    verb = "would remove" if dry_run else "removed"
    c.out(doc, "\n".join(f"{verb} {p}" for p in gone) + f"\nif it still runs, stop it with: {svc.stop_removed}")
