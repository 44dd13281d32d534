"""Throw-away network namespaces joined by a bridge, for LAN tests that must not touch real
interfaces: every veth is created inside the namespaces, never in the host's own.

Usage: `with NetnsLan(3) as lan: lan.popen(lan.hosts[0], [sys.executable, ...])`. Processes
started through `popen` are stopped by PID and the namespaces deleted on exit, even on error.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

PREFIX = "vmtest-"
IP_TIMEOUT = 10.0
STOP_GRACE = 5.0
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=check
    )


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"'ip netns add' failed: {made.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose creating process is gone."""
    out = _ip("netns", "list", check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    netns: str
    ip: str
    ifname: str = "eth0"


class NetnsLan:
    """n namespaces, each with one veth into a bridge that lives in its own namespace."""

    def __init__(self, n: int, *, subnet_octet: int | None = None) -> None:
        if not 1 <= n <= 50:
            raise ValueError("A test LAN holds 1 to 50 hosts.")
        tag = secrets.token_hex(3)
        self.base = f"{PREFIX}{os.getpid()}-{tag}-"
        octet = subnet_octet if subnet_octet is not None else 1 + secrets.randbelow(250)
        self.bridge_ns = self.base + "br"
        self.hosts = [Host(self.base + str(i), f"10.123.{octet}.{i + 1}") for i in range(n)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> NetnsLan:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def create(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        br = ("-n", self.bridge_ns)
        _ip(*br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip(*br, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            _ip("netns", "add", h.netns)
            self._made.append(h.netns)
            ns = ("-n", h.netns)
            port = f"p{i}"
            _ip(*ns, "link", "add", h.ifname, "type", "veth", "peer", "name", port,
                "netns", self.bridge_ns)
            _ip(*br, "link", "set", port, "master", "br0")
            _ip(*br, "link", "set", port, "up")
            _ip(*ns, "addr", "add", f"{h.ip}/24", "dev", h.ifname)
            _ip(*ns, "link", "set", h.ifname, "up")
            _ip(*ns, "link", "set", "lo", "up")

    def interfaces(self, host: Host) -> list[str]:
        """Names of the links inside a host's namespace (to show nothing else is there)."""
        out = _ip("-n", host.netns, "-o", "link", "show").stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    def popen(self, host: Host, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """Start a process inside `host`'s namespace; `ip netns exec` execs, so the PID is
        the process's own and stopping it by PID stops the program itself."""
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", host.netns, *argv], text=True, **kw
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], grace: float = STOP_GRACE) -> int:
        """SIGTERM by PID, then SIGKILL by PID after `grace` seconds."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        return proc.returncode

    def destroy(self) -> None:
        for proc in self._procs:
            try:
                self.stop(proc)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._procs.clear()
        # Deleting a namespace destroys the veth ends inside it.
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def existing(self) -> list[str]:
        """Which of this LAN's namespaces still exist (for cleanup checks)."""
        out = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.base)]


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll `pred()` until true or `timeout` seconds pass; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if pred():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    return pred()
