"""Real daemons in the bed's namespaces: start (optionally under libfaketime), kill -9 and
stop by PID, run a CLI command inside a daemon's namespace, and call its local API from a
thread that has entered that namespace (the API listens on the namespace's own loopback).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from chaos.bed import Host

T = TypeVar("T")
PEER_PORT = 7470
API_PORT = 7471
NETWORK = "vmchaos"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 5.0
FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1")


class DaemonError(Exception):
    """Raised when a daemon does not start or a setup command fails."""


class Refused(Exception):
    """The API answered with an error, or nothing listened: the request had no effect."""


class Unknown(Exception):
    """The request was sent and no answer came (timeout, reset): it may or may not have had
    an effect."""


def faketime_lib() -> str | None:
    return next((p for p in FAKETIME_LIBS if Path(p).exists()), None)


@dataclass
class Node:
    host: Host
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    member: str = ""
    skew_s: int = 0
    starts: int = 0
    loop_device: str = ""  # the loop device under the home, for the slow-disk fault
    log_from: int = 0  # where this start's lines begin in the log
    started_in: float = 0.0  # seconds from launch to the ready line (the store's replay), last start

    @property
    def name(self) -> str:
        return f"n{self.host.index}"

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{PEER_PORT}"

    @property
    def db(self) -> Path:
        return self.home / "node.db"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "valuemesh.cli.main",
                "--home", str(self.home), *args]

    def cli(self, *args: str) -> Any:
        """Run `valuemesh --json ARGS` inside the namespace; its JSON answer."""
        res = subprocess.run(self._argv("--json", *args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if res.returncode != 0:
            raise DaemonError(f"{self.name}: valuemesh {' '.join(args)} failed: {res.stderr.strip()}")
        return json.loads(res.stdout)

    def init(self) -> None:
        if not (self.home / "identity.key").exists():
            self.home.mkdir(parents=True, exist_ok=True)
            subprocess.run(self._argv("init", "--name", self.name), capture_output=True, check=True,
                           timeout=CLI_TIMEOUT_S)

    def start(self, bootstrap: list[str] | None = None, skew_s: int = 0, timeout: float = START_TIMEOUT_S) -> None:
        """Start the daemon and wait (up to `timeout`) for its ready line, which it prints once
        it has loaded its store; `started_in` is how long that took. A nonzero skew runs it
        under libfaketime, its wall clock `skew_s` seconds off (monotonic time untouched)."""
        argv = self._argv("daemon", "--listen", self.address, "--api", f"127.0.0.1:{API_PORT}", "--no-mdns",
                          "--network", NETWORK)
        for b in bootstrap or []:
            argv += ["--bootstrap", b]
        env = dict(os.environ)
        self.skew_s = skew_s
        if skew_s:
            lib = faketime_lib()
            if lib is None:
                raise DaemonError("libfaketime is not installed")
            env.update(LD_PRELOAD=lib, FAKETIME=f"{skew_s:+d}s", FAKETIME_DONT_FAKE_MONOTONIC="1",
                       FAKETIME_NO_CACHE="1")
        log_path = self.home.parent / f"{self.name}.log"
        self.log_from = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        self.starts += 1
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        launched = time.monotonic()
        deadline = launched + timeout
        buf = b""
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                if not sel.select(timeout=0.5):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                line = next((ln for ln in buf.split(b"\n")[:-1] if ln.startswith(b"{")), None)
                if line is not None:
                    self.member = json.loads(line)["member"]
                    self.started_in = time.monotonic() - launched
                    return
        finally:
            sel.close()
        self.kill()
        raise DaemonError(f"{self.name} did not start within {timeout:.0f} s; see its log")

    def dropped_constellation(self) -> bool:
        """Whether this start refused to follow the constellation it holds (its log says
        'cannot follow constellation'): finding 1 of docs/reliability.md."""
        try:
            with open(self.home.parent / f"{self.name}.log", "rb") as log:
                log.seek(self.log_from)
                return b"cannot follow constellation" in log.read()
        except OSError:
            return False

    def last_errors(self, n: int = 2) -> list[str]:
        """The messages of the last `n` error lines this start logged: what a stall finding
        quotes, to tell a slow shared machine (none) from a node that gave up (some)."""
        try:
            with open(self.home.parent / f"{self.name}.log", "rb") as log:
                log.seek(self.log_from)
                lines = log.read().splitlines()
        except OSError:
            return []
        out: list[str] = []
        for raw in lines:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("level") == "error":
                out.append(str(doc.get("msg", ""))[:300])
        return out[-n:]

    def kill(self) -> None:
        """SIGKILL by PID: the crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)
        self._close()

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it does not stop in time."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    # -- the local API, from a thread inside this node's namespace --------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call the API. The calling thread must have entered this node's namespace
        (`bed.enter_netns`). Raises Refused (no effect) or Unknown (maybe an effect)."""
        try:
            token = (self.home / "api.token").read_text().strip()
        except OSError:
            raise Refused("not running (no API token)") from None
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{API_PORT}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError, OSError):
                message = None
            raise Refused(f"HTTP {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError | FileNotFoundError):
                raise Refused("connection refused") from None
            raise Unknown(str(exc.reason)) from None
        except ConnectionRefusedError:
            raise Refused("connection refused") from None
        except (OSError, ValueError) as exc:
            raise Unknown(f"{type(exc).__name__}: {exc}") from None


# -- the store, read only -------------------------------------------------------------------


class Unreadable(Exception):
    """The runner could not read a node's database (a full disk, a damaged file): reported as
    a finding with the node and SQLite's words, never a crash of the runner."""


def _read(db: Path, fn: Callable[[sqlite3.Connection], T]) -> T:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return fn(con)
        finally:
            con.close()
    except (sqlite3.Error, OSError) as exc:
        raise Unreadable(f"{type(exc).__name__}: {exc}") from None


def read_db(db: Path, integrity: bool = True) -> tuple[str, list[str]]:
    """PRAGMA integrity_check's answer ("" when not asked) and the final order (record ids,
    hex, interned: a long run keeps a thousand snapshots of it; a chaos node follows one
    constellation), read only: safe on a killed node's database and, as one more reader, on
    a live one. Raises Unreadable."""

    def body(con: sqlite3.Connection) -> tuple[str, list[str]]:
        answer = "; ".join(r[0] for r in con.execute("PRAGMA integrity_check").fetchall()) if integrity else ""
        rows = con.execute("SELECT record_id FROM final_records ORDER BY constellation, commit_idx, pos").fetchall()
        return answer, [sys.intern(bytes(r[0]).hex()) for r in rows]

    return _read(db, body)


def final_count(db: Path) -> int:
    """How many records the node holds final (cheap: the recovery wait asks every half second).
    Raises Unreadable."""
    return _read(db, lambda con: int(con.execute("SELECT count(*) FROM final_records").fetchone()[0]))


def db_bytes(db: Path) -> int:
    """The database's size on disk with its write-ahead log (what the home's disk must hold)."""
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
