"""The low-level bits every namespace bed shares (chaos/bed.py, chaos/internet.py and the
tests' tests/netns.py): running `ip`/`nft` with a timeout, telling in one sentence why this
machine cannot host namespaces, removing what dead runs left behind, moving a thread into a
namespace, and stopping a process by its PID.

Every bed names its namespaces `<prefix><creator pid>-<tag>-...`, so `remove_stale(prefix)`
removes only what a run of the same kind whose process is gone left behind.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

CMD_TIMEOUT_S = 15.0
STOP_GRACE_S = 5.0
CLONE_NEWNET = 0x40000000


class BedError(Exception):
    """Raised when the kernel or a tool refuses to build or change a bed."""


def run(*argv: str, check: bool = True, inp: str | None = None,
        timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded in time); with `check`, a failure raises BedError saying
    which command failed and what it printed."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=inp)
    except subprocess.TimeoutExpired:
        raise BedError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if check and res.returncode != 0:
        raise BedError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res


def nft(netns: str, script: str) -> None:
    """Load an nftables script inside a namespace (atomically: all of it or nothing)."""
    run("ip", "netns", "exec", netns, "nft", "-f", "-", inp=script + "\n")


def unavailable_reason(prefix: str, tools: tuple[str, ...] = ("ip",),
                       what: str = "network namespaces") -> str | None:
    """Why this machine cannot host `what` (one sentence), or None if it can: root, the
    tools, and a probe namespace actually made and deleted."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"the '{tool}' command is not installed"
    if os.geteuid() != 0:
        return f"{what} need root to create network namespaces"
    probe = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}-probe"
    made = run("ip", "netns", "add", probe, check=False)
    run("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces are unavailable ('ip netns add' failed: {made.stderr.strip()})"
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def creator_pid(name: str, prefix: str) -> int | None:
    """The PID a bed's name carries (`<prefix><pid>-<tag>-...`), or None if not one of ours."""
    m = re.match(rf"^{re.escape(prefix)}(\d+)-[0-9a-f]+-", name)
    return int(m.group(1)) if m else None


def remove_stale(prefix: str) -> list[str]:
    """Delete the namespaces named with `prefix` whose creating process is gone; nothing of
    anyone else's (a live run's namespaces stay)."""
    removed: list[str] = []
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = creator_pid(name, prefix)
        if pid is not None and not alive(pid):
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def existing(base: str) -> list[str]:
    """The namespaces whose name starts with `base` (a teardown check)."""
    out = run("ip", "netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(base)]


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into a named network namespace: sockets it opens
    afterwards live there, so one process can reach every daemon's loopback API."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BedError(f"setns into {name} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def stop(proc: subprocess.Popen[str], grace: float = STOP_GRACE_S) -> int:
    """SIGTERM by PID, then SIGKILL by PID after `grace` seconds; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode


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


class Namespaces:
    """What one bed made: the namespaces it added and the processes it started in them.
    As a context manager it builds (`create`, by the subclass) and, on exit or on an error
    while building, stops every process by PID and deletes every namespace, newest first."""

    def __init__(self) -> None:
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Self:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def create(self) -> None:
        raise NotImplementedError

    def add_ns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def add_switch(self, ns: str) -> None:
        """A namespace holding one bridge `br0` (a switch: no snooping, multicast floods)."""
        self.add_ns(ns)
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        run("ip", "-n", ns, "link", "set", "br0", "up")

    def add_plugged(self, ns: str, ifname: str, port: str, switch_ns: str) -> None:
        """A namespace with one cable `ifname` into `switch_ns`'s br0 at port `port` (the
        veth is made inside the namespaces, never in the machine's own)."""
        self.add_ns(ns)
        run("ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port,
            "netns", switch_ns)
        run("ip", "-n", switch_ns, "link", "set", port, "master", "br0")
        run("ip", "-n", switch_ns, "link", "set", port, "up")
        run("ip", "-n", ns, "link", "set", ifname, "up")

    def popen_ns(self, ns: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        """Start a process in namespace `ns`; `ip netns exec` execs, so the PID is the
        program's own and stopping it by PID stops the program itself."""
        kw.setdefault("text", True)
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *argv], **kw
        )
        self._procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self._procs:
            try:
                stop(proc)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._procs.clear()
        # Deleting a namespace destroys the veth ends inside it.
        for name in reversed(self._made):
            run("ip", "netns", "del", name, check=False)
        self._made.clear()
