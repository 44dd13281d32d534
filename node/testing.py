"""A harness that starts n valuemesh daemons as real subprocesses on loopback,
for our tests, benchmarks and plugin authors' own tests.

Every process is started with a fixed loopback port, recorded by PID and
stopped by PID (SIGTERM, then SIGKILL after a deadline); nothing is left
running when `Cluster` exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valuemesh.node.client import ApiClient
from valuemesh.node.home import Home
from valuemesh.node.link import PeerLink
from valuemesh.protocol.identity import MemberId

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


class QuietHandler:
    """A transport link handler for tests and benchmarks that play a peer: it takes every key,
    ignores what it hears, and notes when and why its links closed (`closed`, `reasons`)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.reasons: list[str] = []

    def authorize(self, remote: MemberId, inbound: bool) -> bool:
        return True

    async def on_connect(self, link: PeerLink) -> None:
        pass

    async def on_message(self, link: PeerLink, payload: bytes) -> None:
        pass

    async def on_disconnect(self, link: PeerLink, reason: str) -> None:
        self.reasons.append(reason)
        self.closed.set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """One daemon subprocess with its own home directory and fixed ports."""

    name: str
    home: Path
    port: int
    network: str
    bootstrap: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    member: str = ""
    log: Path | None = None  # where stderr goes; default <home>/daemon.log (elsewhere when the home's disk fills)

    def cli(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `valuemesh --home <home> ARGS…` and return the finished process."""
        cmd = [sys.executable, "-m", "valuemesh.cli.main", "--home", str(self.home), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{self.name}: valuemesh {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def cli_json(self, *args: str, timeout: float = 60.0) -> Any:
        return json.loads(self.cli("--json", *args, timeout=timeout).stdout)

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return ApiClient(Home(self.home)).call(method, path, body)

    def start(self) -> None:
        if not (self.home / "identity.key").exists():
            self.cli("init", "--name", self.name)
        cmd = [sys.executable, "-m", "valuemesh.cli.main", "--home", str(self.home), "daemon",
               "--listen", f"127.0.0.1:{self.port}", "--api", "127.0.0.1:0", "--no-mdns",
               "--network", self.network]
        for b in self.bootstrap:
            cmd += ["--bootstrap", b]
        log = open(self.log or self.home / "daemon.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            if line.startswith(b"{"):
                break
        if not line.startswith(b"{"):
            self.kill()
            raise AssertionError(f"{self.name} did not start; see {self.log or self.home / 'daemon.log'}")
        self.member = json.loads(line)["member"]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Cluster:
    """n daemons on loopback that know each other's addresses."""

    root: Path
    n: int
    network: str = "valuemesh-test"
    daemons: list[Daemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = [free_port() for _ in range(self.n)]
        addrs = [f"127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            self.daemons.append(Daemon(f"node{i}", self.root / f"node{i}", port, self.network,
                                       [a for j, a in enumerate(addrs) if j != i]))

    def start(self) -> None:
        for d in self.daemons:
            d.start()

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def found(self, name: str = "test", founder: int = 0, tier: str = "core",
              roles: tuple[str, ...] = ("producer",)) -> str:
        """Create a constellation on one daemon and have every other daemon join it."""
        cid: str = self.daemons[founder].cli_json("constellation", "create", name)["id"]
        for i, d in enumerate(self.daemons):
            if i == founder:
                continue
            args = ["constellation", "invite", cid, "--tier", tier]
            for r in roles:
                args += ["--role", r]
            token = self.daemons[founder].cli(*args).stdout.strip()
            d.cli("constellation", "join", token)
        return cid


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `pred` until true or fail after `timeout` seconds (bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (AssertionError, OSError, ValueError):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def cluster(root: Path, n: int) -> Iterator[Cluster]:
    c = Cluster(root, n)
    try:
        c.start()
        yield c
    finally:
        c.stop()
