"""Throw-away network namespaces joined by a bridge, for LAN tests that must not touch real
interfaces: every veth is created inside the namespaces, never in the host's own.

Usage: `with NetnsLan(3) as lan: lan.popen(lan.hosts[0], [sys.executable, ...])`. Processes
started through `popen` are stopped by PID and the namespaces deleted on exit, even on error.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

from chaos import netns as _ns

PREFIX = "vmtest-"
STOP_GRACE = _ns.STOP_GRACE_S


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _ns.run("ip", *args, check=check)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    return _ns.unavailable_reason(PREFIX, ("ip",), "test LANs")


def remove_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose creating process is gone."""
    return _ns.remove_stale(PREFIX)


@dataclass(frozen=True)
class Host:
    netns: str
    ip: str
    ifname: str = "eth0"


class NetnsLan(_ns.Namespaces):
    """n namespaces, each with one veth into a bridge that lives in its own namespace."""

    def __init__(self, n: int, *, subnet_octet: int | None = None) -> None:
        super().__init__()
        if not 1 <= n <= 50:
            raise ValueError("A test LAN holds 1 to 50 hosts.")
        tag = secrets.token_hex(3)
        self.base = f"{PREFIX}{os.getpid()}-{tag}-"
        octet = subnet_octet if subnet_octet is not None else 1 + secrets.randbelow(250)
        self.bridge_ns = self.base + "br"
        self.hosts = [Host(self.base + str(i), f"10.123.{octet}.{i + 1}") for i in range(n)]

    def create(self) -> None:
        self.add_switch(self.bridge_ns)
        for i, h in enumerate(self.hosts):
            self.add_plugged(h.netns, h.ifname, f"p{i}", self.bridge_ns)
            _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.ifname)

    def interfaces(self, host: Host) -> list[str]:
        """Names of the links inside a host's namespace (to show nothing else is there)."""
        out = _ip("-n", host.netns, "-o", "link", "show").stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    def popen(self, host: Host, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """Start a process inside `host`'s namespace (stopped by PID on exit)."""
        return self.popen_ns(host.netns, argv, **kw)

    def stop(self, proc: subprocess.Popen[str], grace: float = STOP_GRACE) -> int:
        """SIGTERM by PID, then SIGKILL by PID after `grace` seconds."""
        return _ns.stop(proc, grace)

    def existing(self) -> list[str]:
        """Which of this LAN's namespaces still exist (for cleanup checks)."""
        return _ns.existing(self.base)


wait_until = _ns.wait_until
