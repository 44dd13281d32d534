"""Members on the namespace internet (chaos/internet.py), as people run them: one real
`valuemesh daemon` per host in its own namespace and home, and everything else through the
`valuemesh` command a member types (`ip netns exec <ns> valuemesh --home ... <command>`).

Each daemon runs with the documented defaults (peer port 0.0.0.0:7470, API on the
namespace's own loopback, port mapping on); the two hosts of the `lan` home turn mDNS on,
bound to their LAN address, with `valuemesh config set` before the first start, so every
start (the first and each restart) is `valuemesh daemon` with no flag at all. The group forms
by invites alone: the founder creates the constellation and invites, each joiner knows only
what its token tells it.

    with Internet() as net:
        with Members(net) as ms:
            ms.start_all()
            cid = ms.form("pub1", ["pub2", "eim1", ...])
            ms.cli("eim1", "contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour")

Every daemon is stopped by its PID (the bed's `popen` keeps them too and stops them on exit);
every wait is bounded. `api()` reads the local API from a thread inside the namespace, for the
benchmark's finer clocks; tests drive and read through the command only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import netns
from chaos.internet import Internet

START_TIMEOUT_S = 45.0
CLI_TIMEOUT_S = 60.0
API_TIMEOUT_S = 5.0
POLL_S = 0.25
PATHS = ("lan", "direct", "mapped", "punched", "relayed")
# "link up PeerLink(abcd1234… out via 0123abcd…)" or "link up PeerLink(abcd1234… in 1.2.3.4:7470)"
LINK_UP = re.compile(r"link up PeerLink\((\w+)… (in|out) (?:via (\w+)…|(\S+):(\d+))\)")
PUNCHED = re.compile(r"upgraded the relayed link to (\w+) to a punched one")
LINK_DOWN = re.compile(r"link down PeerLink\((\w+)… (in|out) (?:via (\w+)…|(\S+):(\d+))\)")


class MemberError(Exception):
    """A daemon did not start, or a command a member ran failed."""


def valuemesh_exe() -> Path | None:
    """The `valuemesh` command of this environment (the editable install's console script)."""
    exe = Path(sys.executable).parent / "valuemesh"
    return exe if exe.exists() else None


@dataclass
class Member:
    host: str  # the bed's host name: pub1, eim1, lan2, ...
    home: Path
    log: Path
    proc: subprocess.Popen[str] | None = None
    member: str = ""  # the member id, once started
    starts: int = 0
    log_from: int = 0  # where this start's log lines begin

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def short(self) -> str:
        return self.member[:8]


@dataclass
class Members:
    """The daemons of an `Internet`, one per host (or per host named in `hosts`)."""

    net: Internet
    hosts: Sequence[str] = ()
    workdir: Path | None = None
    exe: Path | None = None
    members: dict[str, Member] = field(default_factory=dict)

    def __post_init__(self) -> None:
        exe = self.exe or valuemesh_exe()
        if exe is None:
            raise MemberError("the valuemesh command is not installed in this environment")
        self.exe = exe
        base = Path(self.workdir or self.net.dir) / "members"
        for name in self.hosts or list(self.net.hosts):
            self.members[name] = Member(name, base / name, base / f"{name}.log")

    def __enter__(self) -> Members:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # -- the command a member types ------------------------------------------------------------

    def argv(self, name: str, *args: str) -> list[str]:
        m = self.members[name]
        return ["ip", "netns", "exec", self.net.host(name).netns, str(self.exe), "--home", str(m.home), *args]

    def run(self, name: str, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self.argv(name, *args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MemberError(f"{name}: valuemesh {' '.join(args)} did not finish within {timeout:.0f} s") from None

    def cli(self, name: str, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        """`valuemesh ARGS` in that member's namespace and home; its output (raises on failure)."""
        res = self.run(name, *args, timeout=timeout)
        if res.returncode != 0:
            raise MemberError(f"{name}: valuemesh {' '.join(args)} failed: {res.stderr.strip()[-600:]}")
        return res.stdout

    def cli_json(self, name: str, *args: str, timeout: float = CLI_TIMEOUT_S) -> Any:
        return json.loads(self.cli(name, "--json", *args, timeout=timeout))

    def cli_all(self, names: Iterable[str], *args: str) -> dict[str, Any]:
        """`valuemesh --json ARGS` on several members at once; a member whose command failed
        (its daemon down, say) maps to None."""
        names = list(names)

        def one(n: str) -> Any:
            try:
                return self.cli_json(n, *args)
            except (MemberError, ValueError):
                return None

        with concurrent.futures.ThreadPoolExecutor(max(1, len(names))) as pool:
            return dict(zip(names, pool.map(one, names), strict=True))

    # -- daemons -----------------------------------------------------------------------------

    def init(self, name: str) -> None:
        """The member's identity and settings, once: mDNS on its LAN address in the `lan`
        home (two members on one LAN find each other that way), the defaults elsewhere."""
        m = self.members[name]
        if (m.home / "identity.key").exists():
            return
        m.home.mkdir(parents=True, exist_ok=True)
        self.cli(name, "init", "--name", name)
        home = self.net.home_of(name)
        if home is not None and len(home.hosts) > 1:
            self.cli(name, "config", "set", "mdns", "true")
            self.cli(name, "config", "set", "mdns_interfaces", self.net.host(name).ip)

    def start(self, name: str) -> Member:
        """`valuemesh daemon`, no flag (every setting is in the home); waits for its ready line."""
        m = self.members[name]
        if m.alive:
            raise MemberError(f"{name}'s daemon is running already")
        self.init(name)
        m.log_from = m.log.stat().st_size if m.log.exists() else 0
        with open(m.log, "a") as err:
            proc = self.net.popen(name, [str(self.exe), "--home", str(m.home), "daemon"],
                                  stdout=subprocess.PIPE, stderr=err)
        m.proc, m.starts = proc, m.starts + 1
        ready = _ready_line(proc, START_TIMEOUT_S)
        if ready is None:
            self.kill9(name)
            raise MemberError(f"{name}'s daemon did not start within {START_TIMEOUT_S:.0f} s: "
                              f"{self.log_text(name)[-800:]}")
        m.member = str(ready["member"])
        return m

    def start_all(self, names: Iterable[str] | None = None) -> None:
        names = list(names or self.members)
        for n in names:
            self.init(n)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(names))) as pool:
            list(pool.map(self.start, names))

    def kill9(self, name: str) -> float:
        """SIGKILL by PID (a crash); the monotonic time of the kill."""
        m = self.members[name]
        at = time.monotonic()
        if m.proc is not None:
            self.net.kill9(m.proc)
            _close(m.proc)
        return at

    def stop(self, name: str) -> None:
        """SIGTERM by PID (SIGKILL after the bed's grace)."""
        m = self.members[name]
        if m.proc is not None:
            self.net.stop(m.proc)
            _close(m.proc)

    def stop_all(self) -> None:
        for n in self.members:
            self.stop(n)

    def log_text(self, name: str, this_start: bool = False) -> str:
        m = self.members[name]
        try:
            with open(m.log, errors="replace") as f:
                if this_start:
                    f.seek(m.log_from)
                return f.read()
        except OSError:
            return ""

    # -- the group ---------------------------------------------------------------------------

    def form(self, founder: str, joiners: Sequence[str], name: str = "reach", *, tier: str = "core",
             deadline_s: float = 120.0) -> str:
        """The founder creates a constellation and invites each joiner in turn; each joins with
        its token alone, and its join is final before the next is invited. The id."""
        cid = str(self.cli_json(founder, "constellation", "create", name)["id"])
        for j in joiners:
            token = self.cli(founder, "constellation", "invite", cid, "--tier", tier).strip()
            self.cli(j, "constellation", "join", token)
            self.wait(functools.partial(self.has_tier, j, cid, tier), deadline_s, f"{j}'s join to be final")
        return cid

    def has_tier(self, name: str, cid: str, tier: str) -> bool:
        """Whether the member's own node sees it at `tier` in the constellation."""
        doc = self.cli_all([name], "constellation", "show", cid)[name]
        return doc is not None and doc.get("my_tier") == tier

    def wait(self, pred: Callable[[], bool], deadline_s: float, what: str, step: float = POLL_S) -> None:
        if not netns.wait_until(pred, deadline_s, step):
            raise MemberError(f"timed out after {deadline_s:.0f} s waiting for {what}")

    def ledgers(self, names: Iterable[str], cid: str) -> dict[str, Any]:
        return self.cli_all(names, "ledger", cid)

    # -- links and paths ---------------------------------------------------------------------

    def ids(self) -> dict[str, str]:
        """Member id -> host name, of every member started at least once."""
        return {m.member: n for n, m in self.members.items() if m.member}

    def paths(self, name: str, peers_doc: Any = None) -> dict[str, tuple[str, str | None]]:
        """The host's live links: peer host -> (path, relay's host or None). From
        `valuemesh peers --json` where it carries each peer's path, else from the daemon's
        "link up"/"link down" log lines (which tell relayed, and lan by address, only)."""
        ids = self.ids()
        doc = peers_doc if peers_doc is not None else self.cli_all([name], "peers")[name]
        rows = (doc or {}).get("peers", [])
        if rows and all("path" in p for p in rows):
            out: dict[str, tuple[str, str | None]] = {}
            for p in rows:
                host = ids.get(p["member"])
                if host is not None and p.get("connected") and p.get("path"):
                    relay = p.get("relay") or p.get("via_member")
                    out[host] = (str(p["path"]), _host_of(ids, relay))
            return out
        return self._paths_from_log(name)

    def _paths_from_log(self, name: str) -> dict[str, tuple[str, str | None]]:
        """Live links from this start's log: "link up/down" lines (relayed ones name their
        relay) and "upgraded the relayed link to X to a punched one"; a direct link is `lan`
        from the host's own LAN, `mapped` when dialled at a router's outside address or taken
        in from outside by a host whose router maps ports, else `direct` (the bed's addresses
        stand in for the node's own labels until `peers --json` carries them)."""
        by_short = {mid[:8]: host for mid, host in self.ids().items()}

        def host_of(short: str) -> str | None:
            return next((h for s, h in by_short.items() if s.startswith(short) or short.startswith(s)), None)

        me = self.net.host(name)
        my_home = self.net.homes[me.home] if me.home is not None else None
        routers = {h.outside_ip for h in self.net.homes.values()}
        live: dict[str, tuple[str, str | None]] = {}
        reprs: dict[str, str] = {}  # the live link's repr, per host
        for line in self.log_text(name, this_start=True).splitlines():
            try:
                msg = str(json.loads(line).get("msg", ""))
            except (ValueError, AttributeError):
                continue
            punched = PUNCHED.match(msg)
            if punched is not None:
                host = host_of(punched.group(1))
                if host is not None and host in live and live[host][0] != "relayed":
                    live[host] = ("punched", None)
                continue
            up, down = LINK_UP.match(msg), LINK_DOWN.match(msg)
            hit = up or down
            host = host_of(hit.group(1)) if hit is not None else None
            if hit is None or host is None:
                continue
            if down:
                # A link replaced by a newer one to the same member leaves that one live.
                if "replaced by another connection" not in msg and reprs.get(host) == hit.group(0)[10:]:
                    live.pop(host, None)
                continue
            reprs[host] = hit.group(0)[8:]
            inbound, relay_short, ip = hit.group(2) == "in", hit.group(3), hit.group(4)
            if relay_short:
                live[host] = ("relayed", host_of(relay_short))
            elif my_home is not None and ip.startswith(my_home.lan_net + "."):
                live[host] = ("lan", None)
            elif (not inbound and ip in routers) or (inbound and my_home is not None and my_home.upnp):
                live[host] = ("mapped", None)
            else:
                live[host] = ("direct", None)
        return live

    def all_paths(self, names: Iterable[str] | None = None) -> dict[str, dict[str, tuple[str, str | None]]]:
        names = [n for n in (names or self.members) if self.members[n].alive]
        docs = self.cli_all(names, "peers")
        return {n: self.paths(n, docs[n]) for n in names}

    # -- the local API, for the benchmark's clocks -------------------------------------------

    def api(self, name: str, method: str, path: str, body: Any = None, timeout: float = API_TIMEOUT_S) -> Any:
        """Call the member's local API from a thread inside its namespace (as the command does)."""
        return self.net.call(name, lambda: self.request(name, method, path, body, timeout), timeout + 5.0)

    def request(self, name: str, method: str, path: str, body: Any = None, timeout: float = API_TIMEOUT_S) -> Any:
        """Call the member's local API from the calling thread, which must have entered the
        member's namespace (`enter(name)`): for loops that call it often."""
        token = (self.members[name].home / "api.token").read_text().strip()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:7471{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")

    def enter(self, name: str) -> None:
        """Move the calling thread into the member's namespace."""
        netns.enter_netns(self.net.host(name).netns)


def _host_of(ids: dict[str, str], member: Any) -> str | None:
    if not isinstance(member, str) or not member:
        return None
    return ids.get(member) or next((h for mid, h in ids.items() if mid.startswith(member)), None)


def _ready_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any] | None:
    """The daemon's one JSON ready line on stdout, or None if it exited or took too long."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
            for line in buf.split(b"\n")[:-1]:
                if line.startswith(b"{"):
                    try:
                        doc = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and doc.get("ready"):
                        return doc
        return None
    finally:
        sel.close()


def _close(proc: subprocess.Popen[str]) -> None:
    if proc.stdout is not None and not proc.stdout.closed:
        proc.stdout.close()


def api_error(exc: BaseException) -> bool:
    """Whether an `api()` failure is the daemon being down or busy (worth another poll)."""
    return isinstance(exc, urllib.error.URLError | OSError | TimeoutError | ValueError)
