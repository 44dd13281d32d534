"""An internet in network namespaces (docs/testbed.md): a public segment with publicly
reachable hosts, and homes behind NAT routers made with nftables — endpoint-independent
(`eim`), symmetric (`sym`), one whose router runs Debian's real miniupnpd (`upnp`), and one
with two hosts on the same LAN (`lan`, found by mDNS).

Nothing is created in the machine's own namespace: the public segment is a bridge inside a
namespace of its own, every veth is made inside the bed's namespaces, and no namespace has a
link to the machine's real interfaces, so no packet (multicast included) can leave. The
public addresses are taken from ranges that miniupnpd and Python's `ipaddress` both call
global (it refuses private outside addresses, and the daemon labels addresses by that test);
they are never routed anywhere but inside the bed.

    with Internet() as net:
        p = net.popen("eim1", [sys.executable, "-m", "http.server"])
        net.run("pub1", ["curl", ...])

Every process started through `popen` is stopped by PID on exit; namespaces are deleted on
exit even on error; `remove_stale()` removes what dead runs left behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from chaos import netns
from chaos.netns import BedError, run

__all__ = ["DEFAULT_HOMES", "BedError", "Home", "HomeSpec", "Host", "Internet", "Nat",
           "ensure_packages", "remove_stale", "unavailable_reason"]

PREFIX = "vmnet-"
PUBLIC_NET = "11.17.0"  # a /24 of globally routable space, used only inside the bed
PUBLIC_NET6 = "2a0f:17::"  # a /64 likewise, on the public segment only (no NAT66)
INSTALL_TIMEOUT_S = 600.0
UPNP_START_TIMEOUT_S = 10.0
PACKAGES = {"nft": "nftables", "miniupnpd": "miniupnpd-nftables"}
POLICY_RC = Path("/usr/sbin/policy-rc.d")

BRIDGE_NF_OFF = ("net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0",
                 "net.bridge.bridge-nf-call-arptables=0")

Nat = Literal["eim", "sym"]
T = TypeVar("T")


@dataclass(frozen=True)
class HomeSpec:
    name: str
    nat: Nat
    hosts: int = 1
    upnp: bool = False


# eim: endpoint-independent mapping (port-preserving masquerade); sym: a random port per
# connection, so each destination sees another port; upnp: endpoint-independent with
# miniupnpd (UPnP-IGD, NAT-PMP, PCP) on the LAN side; lan: two hosts on one LAN.
DEFAULT_HOMES = (
    HomeSpec("eim", "eim"),
    HomeSpec("sym", "sym"),
    HomeSpec("upnp", "eim", upnp=True),
    HomeSpec("lan", "eim", hosts=2),
)


@dataclass(frozen=True)
class Host:
    name: str  # pub1, eim1, lan2, ...
    netns: str
    ip: str  # its own (inside) IPv4 address
    public_ip: str  # the address a peer on the public segment sees it from
    home: str | None  # None for a host on the public segment
    gateway: str | None  # its default route (the router's LAN address), None if public
    ip6: str | None = None  # on the public segment only
    port: str = ""  # the switch port its cable plugs into (bridge port in the parent namespace)
    switch_ns: str = ""  # the namespace holding that port
    ifname: str = "eth0"


@dataclass(frozen=True)
class Home:
    name: str
    nat: Nat
    upnp: bool
    router_ns: str
    outside_ip: str
    outside_ip6: str
    lan_net: str  # e.g. 192.168.3 (a /24)
    lan_ip: str  # the router's LAN address, the hosts' gateway
    hosts: tuple[str, ...]
    port: str  # the router's port on the public switch

    def public_port(self, inside_port: int) -> int | None:
        """The outside port a peer sees for a connection from `inside_port`: the same port
        behind an endpoint-independent (port-preserving) NAT, unpredictable behind `sym`."""
        return inside_port if self.nat == "eim" else None


def unavailable_reason() -> str | None:
    """Why this machine cannot host the internet bed (one sentence), or None if it can;
    installs nftables and miniupnpd first when they are missing and it is root."""
    reason = netns.unavailable_reason(PREFIX, ("ip",), "the internet bed")
    return reason or ensure_packages()


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier internet beds whose process is gone (their
    processes died with them or are stopped when the namespace goes)."""
    return netns.remove_stale(PREFIX)


def _installed(tool: str) -> bool:
    return shutil.which(tool) is not None or Path("/usr/sbin", tool).exists()


def ensure_packages() -> str | None:
    """Install nftables and miniupnpd-nftables when missing (root, apt-get, no service
    started on the host: a policy-rc.d that refuses every start is in place while apt runs);
    None when both are there, else one sentence saying why not."""
    missing = [pkg for tool, pkg in PACKAGES.items() if not _installed(tool)]
    if missing:
        if os.geteuid() != 0:
            return f"{', '.join(missing)} not installed and installing needs root"
        if shutil.which("apt-get") is None:
            return f"{', '.join(missing)} not installed and apt-get is not available"
        made_policy = not POLICY_RC.exists()
        if made_policy:
            POLICY_RC.write_text("#!/bin/sh\n# valuemesh test bed: start no service while installing\nexit 101\n")
            POLICY_RC.chmod(0o755)
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            argv = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
            res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
            if res.returncode != 0:
                subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=INSTALL_TIMEOUT_S)
                res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"installing {', '.join(missing)} failed ({exc})"
        finally:
            if made_policy:
                POLICY_RC.unlink(missing_ok=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            return f"installing {', '.join(missing)} with apt-get failed: {last}"
    version = run("/usr/sbin/miniupnpd", "--version", check=False)
    if "nftables" not in version.stdout + version.stderr:
        return "the installed miniupnpd is not the nftables build (install miniupnpd-nftables)"
    return None


def _router_rules(home: Home) -> str:
    """NAT and a firewall that drops unsolicited inbound: only established/related traffic
    and what miniupnpd mapped (DNAT) get in. `sym` picks a random port per connection."""
    how = " random,fully-random" if home.nat == "sym" else ""
    rules = f"""
table ip vmnat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade{how}
  }}
}}
table inet vmfw {{
  chain input {{ type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname {{ "lo", "br0" }} accept
    ip6 nexthdr ipv6-icmp icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
  }}
  chain forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "br0" oifname "wan" accept
    ct status dnat accept
  }}
}}
"""
    if home.upnp:
        # miniupnpd's own table (as its nft_init.sh makes it), with an accepting forward
        # policy: the drop is vmfw's, which lets in what miniupnpd DNATs.
        rules += """
table inet miniupnpd {
  chain forward { type filter hook forward priority filter - 1; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""
    return rules


def _miniupnpd_conf(home: Home) -> str:
    return "\n".join([
        "ext_ifname=wan",
        "listening_ip=br0",
        "http_port=0",
        "enable_upnp=yes",
        "enable_natpmp=yes",  # NAT-PMP and PCP (built with PCP)
        "secure_mode=yes",
        "system_uptime=yes",
        "notify_interval=30",
        "clean_ruleset_interval=600",
        "ext_perform_stun=no",
        "min_lifetime=2",  # short leases so renewal can be tested in seconds
        "max_lifetime=86400",
        f"uuid={uuid.uuid4()}",
        "upnp_table_name=miniupnpd",
        "upnp_nat_table_name=miniupnpd",
        "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"allow 1024-65535 {home.lan_net}.0/24 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])


class Internet(netns.Namespaces):
    """The bed. Hosts and homes by name; processes in namespaces; link faults."""

    def __init__(self, homes: Sequence[HomeSpec] = DEFAULT_HOMES, *, public_hosts: int = 2,
                 workdir: Path | None = None) -> None:
        super().__init__()
        names = [h.name for h in homes]
        if len(set(names)) != len(names) or not 1 <= len(homes) <= 20:
            raise ValueError("Homes need 1 to 20 distinct names.")
        if not 1 <= public_hosts <= 9 or any(not 1 <= h.hosts <= 9 for h in homes):
            raise ValueError("A segment holds 1 to 9 hosts.")
        self.base = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        self.dir = Path(workdir or "/tmp") / self.base.rstrip("-")
        self.pub_ns = self.base + "pub"
        self.hosts: dict[str, Host] = {}
        self.homes: dict[str, Home] = {}
        for i in range(public_hosts):
            name = f"pub{i + 1}"
            ip = f"{PUBLIC_NET}.{11 + i}"
            self.hosts[name] = Host(name, self.base + name, ip, ip, None, None,
                                    f"{PUBLIC_NET6}{11 + i:x}", name, self.pub_ns)
        for k, spec in enumerate(homes):
            lan_net = f"192.168.{k + 1}"
            members = tuple(f"{spec.name}{j + 1}" for j in range(spec.hosts))
            home = Home(spec.name, spec.nat, spec.upnp, f"{self.base}r-{spec.name}",
                        f"{PUBLIC_NET}.{21 + k}", f"{PUBLIC_NET6}{21 + k:x}", lan_net,
                        f"{lan_net}.1", members, f"r{k}")
            self.homes[spec.name] = home
            for j, name in enumerate(members):
                self.hosts[name] = Host(name, self.base + name, f"{lan_net}.{j + 2}",
                                        home.outside_ip, spec.name, home.lan_ip,
                                        port=f"h{j}", switch_ns=home.router_ns)
        self._upnp: dict[str, subprocess.Popen[str]] = {}
        self._lock = threading.Lock()
        self._down = False

    # -- building and tearing down ----------------------------------------------------------

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.add_switch(self.pub_ns)
        for h in self.hosts.values():
            if h.home is None:
                self.add_plugged(h.netns, h.ifname, h.port, self.pub_ns)
                # A host address alone (/32, /128) and an on-link route to the segment: as on the
                # real internet, a server's own network does not hold the home routers, so its
                # node sees their members as remote (path direct), not on its LAN.
                run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/32", "dev", h.ifname)
                run("ip", "-n", h.netns, "addr", "add", f"{h.ip6}/128", "dev", h.ifname, "nodad")
                run("ip", "-n", h.netns, "route", "add", f"{PUBLIC_NET}.0/24", "dev", h.ifname)
                run("ip", "-n", h.netns, "route", "add", f"{PUBLIC_NET6}/64", "dev", h.ifname)
        for home in self.homes.values():
            self._build_home(home)
        for home in self.homes.values():
            if home.upnp:
                self._start_miniupnpd(home)

    def _build_home(self, home: Home) -> None:
        r = home.router_ns
        self.add_plugged(r, "wan", home.port, self.pub_ns)
        run("ip", "-n", r, "addr", "add", f"{home.outside_ip}/24", "dev", "wan")
        run("ip", "-n", r, "addr", "add", f"{home.outside_ip6}/64", "dev", "wan", "nodad")
        run("ip", "-n", r, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        run("ip", "-n", r, "addr", "add", f"{home.lan_ip}/24", "dev", "br0")
        run("ip", "-n", r, "link", "set", "br0", "up")
        run("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Where br_netfilter is loaded (Docker loads it), bridged frames would pass the
        # router's IP forward hook and its drop policy: LAN hosts could not talk to each
        # other. A home router's switch does not filter, so neither does this one.
        run("ip", "netns", "exec", r, "sysctl", "-qew", *BRIDGE_NF_OFF)
        netns.nft(r, _router_rules(home))
        for name in home.hosts:
            h = self.hosts[name]
            self.add_plugged(h.netns, h.ifname, h.port, r)
            run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.ifname)
            run("ip", "-n", h.netns, "route", "add", "default", "via", home.lan_ip)

    def _start_miniupnpd(self, home: Home) -> None:
        conf = self.dir / f"miniupnpd-{home.name}.conf"
        pidfile = self.dir / f"miniupnpd-{home.name}.pid"
        conf.write_text(_miniupnpd_conf(home))
        log = open(self.dir / f"miniupnpd-{home.name}.log", "w")
        try:
            proc = self.popen_ns(home.router_ns, ["/usr/sbin/miniupnpd", "-d", "-f", str(conf),
                                                  "-P", str(pidfile)], stdout=log, stderr=log)
        finally:
            log.close()
        self._upnp[home.name] = proc
        if not netns.wait_until(lambda: self._listening(home.router_ns, 5351) or proc.poll() is not None,
                              UPNP_START_TIMEOUT_S) or proc.poll() is not None:
            tail = self.miniupnpd_log(home.name)[-400:]
            raise BedError(f"miniupnpd did not start in home {home.name}: {tail}")

    @staticmethod
    def _listening(ns: str, udp_port: int) -> bool:
        out = run("ip", "netns", "exec", ns, "ss", "-Hlun", check=False).stdout
        return f":{udp_port} " in out

    def miniupnpd_log(self, home: str) -> str:
        path = self.dir / f"miniupnpd-{home}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
        super().destroy()

    def leftovers(self) -> list[str]:
        """What of this bed still exists (a teardown check)."""
        return netns.existing(self.base)

    # -- looking things up ------------------------------------------------------------------

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            raise KeyError(f"no host {name!r} in this bed (hosts: {', '.join(self.hosts)})")
        return self.hosts[name]

    def home_of(self, name: str) -> Home | None:
        h = self.host(name)
        return self.homes[h.home] if h.home else None

    def nat(self, name: str) -> Nat | None:
        """The NAT kind in front of a host, None for a public host."""
        home = self.home_of(name)
        return home.nat if home else None

    def public_address(self, name: str, port: int) -> tuple[str, int | None]:
        """The (IP, port) a public peer sees for a connection the host makes from `port`
        (port None where the NAT makes it unpredictable)."""
        home = self.home_of(name)
        if home is None:
            return self.host(name).ip, port
        return home.outside_ip, home.public_port(port)

    def _ns(self, name: str) -> str:
        """A host's or router's namespace: host names, or `r-<home>` for a home's router."""
        if name.startswith("r-") and name[2:] in self.homes:
            return self.homes[name[2:]].router_ns
        return self.host(name).netns

    # -- processes --------------------------------------------------------------------------

    def popen(self, name: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        """Start a process in a host's (or `r-<home>` router's) namespace. `ip netns exec`
        execs, so the PID is the program's own and stopping it by PID stops the program."""
        return self.popen_ns(self._ns(name), argv, **kw)

    def stop(self, proc: subprocess.Popen[str], grace: float = netns.STOP_GRACE_S) -> int:
        """SIGTERM by PID, then SIGKILL by PID after `grace` seconds; the exit status."""
        return netns.stop(proc, grace)

    def kill9(self, proc: subprocess.Popen[str]) -> int:
        """SIGKILL by PID (a crash), and reap it."""
        if proc.poll() is None:
            proc.kill()
        return proc.wait(netns.STOP_GRACE_S)

    def run(self, name: str, argv: Sequence[str], *, check: bool = True,
            timeout: float = netns.CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in a host's (or router's) namespace."""
        return run("ip", "netns", "exec", self._ns(name), *argv, check=check, timeout=timeout)

    def call(self, name: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` in a fresh thread that has entered the host's namespace (sockets it opens
        live there) and return its result or raise its exception."""
        return self.call_all([(name, fn)], timeout)[0]

    def call_all(self, calls: Iterable[tuple[str, Callable[[], T]]], timeout: float = 30.0) -> list[T]:
        """Run several functions at once, each in a thread in its host's namespace (for
        things that must happen at the same time, as a simultaneous open)."""
        results: dict[int, T] = {}
        errors: dict[int, BaseException] = {}

        def body(i: int, ns: str, fn: Callable[[], T]) -> None:
            try:
                netns.enter_netns(ns)
                results[i] = fn()
            except BaseException as exc:  # handed to the caller below
                errors[i] = exc

        threads = [threading.Thread(target=body, args=(i, self._ns(n), fn), daemon=True)
                   for i, (n, fn) in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        if any(t.is_alive() for t in threads):
            raise BedError(f"a call in the bed did not return within {timeout:.0f} s")
        if errors:
            raise errors[min(errors)]
        return [results[i] for i in range(len(threads))]

    def sock(self, name: str, kind: int = socket.SOCK_STREAM,
             family: int = socket.AF_INET) -> socket.socket:
        """A socket created in a host's namespace: it stays there whichever thread uses it."""
        return self.call(name, lambda: socket.socket(family, kind))

    def listener(self, name: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP socket listening on every address of a host's namespace at `port`."""
        s = self.sock(name)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        s.settimeout(timeout)
        return s

    # -- faults -----------------------------------------------------------------------------

    def link(self, name: str, up: bool) -> None:
        """Cut (up=False) or restore a host's cable, or a router's uplink (`r-<home>`):
        its switch port goes down, as a pulled cable."""
        if name.startswith("r-") and name[2:] in self.homes:
            run("ip", "-n", self.pub_ns, "link", "set", self.homes[name[2:]].port, "up" if up else "down")
            return
        h = self.host(name)
        run("ip", "-n", h.switch_ns, "link", "set", h.port, "up" if up else "down")

    def miniupnpd(self, home: str) -> subprocess.Popen[str]:
        """The miniupnpd process of a `upnp` home (to stop or kill it in a fault test)."""
        return self._upnp[home]
