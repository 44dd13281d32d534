"""The service files the package ships, checked without running them: systemd-analyze verify on
the rendered unit, a plistlib parse of the launchd agent, and `service install|uninstall`."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from valuemesh.cli.service import command, render_launchd, render_systemd

HOME_WITH_SPACE = Path("/srv/value mesh/ana")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "user"), "XDG_CONFIG_HOME": str(tmp_path / "user" / ".config")}
    env.pop("VALUEMESH_HOME", None)
    return subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(tmp_path / "node"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_the_command_is_the_installed_valuemesh() -> None:
    argv = command()
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK)
    assert (len(argv) == 1 and Path(argv[0]).name == "valuemesh") or argv[1:] == ["-m", "valuemesh.cli.main"]


def test_systemd_unit_runs_the_daemon_of_the_home() -> None:
    text = render_systemd(["/opt/vm/bin/valuemesh"], HOME_WITH_SPACE)
    assert 'ExecStart=/opt/vm/bin/valuemesh daemon --home "/srv/value mesh/ana"' in text
    assert "KillSignal=SIGTERM" in text and "StandardError=journal" in text and "WantedBy=default.target" in text
    assert "@VALUEMESH@" not in text and "@HOME@" not in text
    assert "%%" in render_systemd(["/opt/vm/bin/valuemesh"], Path("/srv/100%")), "systemd specifiers escaped"


def test_systemd_analyze_verifies_the_rendered_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd'); the unit was not verified.")
    unit = tmp_path / "valuemesh.service"
    unit.write_text(render_systemd(command(), tmp_path / "home"))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res


def test_launchd_agent_parses_with_the_expected_keys() -> None:
    doc = plistlib.loads(render_launchd(["/opt/vm/bin/python", "-m", "valuemesh.cli.main"], HOME_WITH_SPACE).encode())
    assert doc["Label"] == "org.valuemesh.daemon"
    assert doc["ProgramArguments"] == ["/opt/vm/bin/python", "-m", "valuemesh.cli.main", "daemon", "--home",
                                       str(HOME_WITH_SPACE)]
    assert doc["RunAtLoad"] is True and doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["StandardErrorPath"] == doc["StandardOutPath"] == str(HOME_WITH_SPACE / "daemon.log")
    assert isinstance(doc["ExitTimeOut"], int)


def test_install_print_and_uninstall_systemd(tmp_path: Path) -> None:
    assert _cli(tmp_path, "init").returncode == 0
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / "valuemesh.service"
    shown = _cli(tmp_path, "service", "install", "--platform", "systemd", "--print")
    assert shown.returncode == 0 and shown.stdout.startswith(f"# {unit}\n") and not unit.exists()
    assert f"--home {tmp_path / 'node'}" in shown.stdout

    done = _cli(tmp_path, "--json", "service", "install", "--platform", "systemd")
    doc = json.loads(done.stdout)
    assert doc["written"] and doc["path"] == str(unit) and unit.read_text() == doc["text"]
    assert "systemctl --user enable --now valuemesh.service" in doc["start"]
    assert unit.stat().st_mode & 0o777 == 0o600

    link = unit.parent / "default.target.wants" / "valuemesh.service"
    link.parent.mkdir()
    link.symlink_to(unit)  # what `systemctl --user enable` makes
    gone = _cli(tmp_path, "service", "uninstall", "--platform", "systemd")
    assert gone.returncode == 0 and "systemctl --user stop valuemesh.service" in gone.stdout
    assert not unit.exists() and not link.is_symlink()
    again = _cli(tmp_path, "service", "uninstall", "--platform", "systemd")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_install_launchd(tmp_path: Path) -> None:
    assert _cli(tmp_path, "init").returncode == 0
    res = _cli(tmp_path, "service", "install", "--platform", "launchd")
    agent = tmp_path / "user" / "Library" / "LaunchAgents" / "org.valuemesh.daemon.plist"
    assert res.returncode == 0 and "launchctl bootstrap gui/" in res.stdout
    assert plistlib.loads(agent.read_bytes())["ProgramArguments"][-2:] == ["--home", str(tmp_path / "node")]


def test_install_without_an_identity_is_one_sentence_and_writes_nothing(tmp_path: Path) -> None:
    res = _cli(tmp_path, "service", "install", "--platform", "systemd")
    assert res.returncode == 1 and res.stderr.startswith("error: No identity in") and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "user").exists()
