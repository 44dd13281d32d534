"""The test bed: one network namespace per daemon, veth pairs into a bridge that lives in a
hub namespace, and the kernel's fault knobs on them (nftables drops, tc shaping), plus ext4
file systems on loop devices (sparse images) for the disk faults. Nothing is created in the
host's own namespace but the mounts under the run's directory; everything is removed by
`teardown`, even after a failure.

Names start with `vmchaos-<pid>-<tag>-`, so two runs never collide and a later run removes
only what a dead run of this suite left behind.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from chaos import netns
from chaos.netns import BedError, enter_netns, run

__all__ = ["Bed", "BedError", "Host", "enter_netns", "remove_stale", "run", "unavailable_reason"]

PREFIX = "vmchaos-"
BLKIO = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_iops_device")


def unavailable_reason() -> str | None:
    """Why this machine cannot host the bed (one sentence), or None if it can."""
    return netns.unavailable_reason(PREFIX, ("ip", "tc", "nft"), "the chaos bed")


def remove_stale() -> list[str]:
    """Remove namespaces, mounts and loop devices of earlier runs of this suite whose process
    is gone; nothing of anyone else's."""
    removed: list[str] = []
    mounts = Path("/proc/mounts").read_text().splitlines()
    for line in mounts:
        where = line.split()[1]
        m = re.search(rf"/{PREFIX}(\d+)-[0-9a-f]+-", where)
        if m and not netns.alive(int(m.group(1))):
            run("umount", "-l", where, check=False)
            removed.append(where)
    for line in run("losetup", "-a", check=False).stdout.splitlines():
        m = re.search(rf"/{PREFIX}(\d+)-[0-9a-f]+-", line)
        if m and not netns.alive(int(m.group(1))):
            dev = line.split(":")[0]
            run("losetup", "-d", dev, check=False)
            removed.append(dev)
    return removed + netns.remove_stale(PREFIX)


def _sample(percent: int) -> str:
    """An nft match true for `percent` % of packets at random."""
    if not 0 < percent <= 100:
        raise ValueError("A percentage is 1 to 100.")
    return "" if percent == 100 else f"numgen random mod 100 < {percent} "


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    ip: str
    port: str  # the hub-side end of its veth, in the hub namespace


class Bed:
    """n hosts on one bridge. Fault knobs take host indexes; `heal` undoes every network fault."""

    def __init__(self, n: int, workdir: Path) -> None:
        if not 1 <= n <= 16:
            raise ValueError("The bed holds 1 to 16 hosts.")
        self.base = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        self.dir = workdir / self.base.rstrip("-")
        octet = 1 + secrets.randbelow(250)
        self.hub = self.base + "hub"
        self.hosts = [Host(i, f"{self.base}n{i}", f"10.213.{octet}.{i + 1}", f"p{i}") for i in range(n)]
        self._netns: list[str] = []
        self._mounts: list[Path] = []
        self._loops: list[str] = []
        self._throttled: list[str] = []
        self._lock = threading.Lock()
        self._down = False

    # -- building and tearing down ----------------------------------------------------------

    def create(self) -> None:
        atexit.register(self.teardown)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._add_ns(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(h.netns)
            run("ip", "-n", h.netns, "link", "add", "eth0", "type", "veth", "peer", "name", h.port,
                "netns", self.hub)
            run("ip", "-n", self.hub, "link", "set", h.port, "master", "br0")
            run("ip", "-n", self.hub, "link", "set", h.port, "up")
            run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            run("ip", "-n", h.netns, "link", "set", "eth0", "up")
            run("ip", "-n", h.netns, "link", "set", "lo", "up")
            # Multicast never leaves a host's namespace (the bridge is closed anyway).
            self.nft(h, "add table inet chaos")

    def _add_ns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._netns.append(name)

    def teardown(self) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
        for dev in self._throttled:
            self._write_throttle(dev, 0)
        for where in reversed(self._mounts):
            run("umount", "-l", str(where), check=False)
        for dev in self._loops:
            run("losetup", "-d", dev, check=False)
        for name in reversed(self._netns):
            run("ip", "netns", "del", name, check=False)

    def leftovers(self) -> list[str]:
        """What of this bed still exists (a teardown check)."""
        left = netns.existing(self.base)
        mounts = Path("/proc/mounts").read_text()
        left += [str(m) for m in self._mounts if f" {m} " in mounts]
        return left

    # -- network faults ---------------------------------------------------------------------

    def nft(self, h: Host, script: str) -> None:
        netns.nft(h.netns, script)

    def link(self, h: Host, up: bool) -> None:
        """Cut (or restore) a host's cable: its bridge port goes down."""
        run("ip", "-n", self.hub, "link", "set", h.port, "up" if up else "down")

    def block(self, src: Host, dst: Host) -> None:
        """Drop every packet src sends to dst (one direction only: asymmetric unless the
        reverse is blocked too)."""
        self._ensure_chain(src, "out", "output")
        self.nft(src, f"add rule inet chaos out ip daddr {dst.ip} drop")

    def loss(self, h: Host, percent: int) -> None:
        """Drop `percent` % of the host's outgoing packets, at random."""
        self._ensure_chain(h, "out", "output")
        self.nft(h, f"add rule inet chaos out {_sample(percent)}drop")

    def duplicate(self, h: Host, percent: int) -> None:
        """Send `percent` % of the host's outgoing packets twice (netdev egress dup; the mark
        keeps a copy from being copied again as it passes the same hook)."""
        self.nft(h, "add table netdev chaosdup\n"
                    "add chain netdev chaosdup eg { type filter hook egress device eth0 priority 0 ; }\n"
                    f"add rule netdev chaosdup eg meta mark != 0x7e {_sample(percent)}meta mark set 0x7e dup to eth0")

    def shape(self, h: Host, slow_kbit: int, slow_percent: int) -> None:
        """Delay, jitter and reordering without netem (not built into this kernel): outgoing
        packets are sprayed at random between a fast htb class and a slow one
        (`slow_kbit`), so the slow ones wait in a queue (delay that varies with load: jitter)
        and are overtaken by later fast ones (reordering)."""
        ns = ("ip", "netns", "exec", h.netns, "tc")
        run(*ns, "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
        run(*ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "1gbit")
        run(*ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
            "rate", f"{slow_kbit}kbit", "ceil", f"{slow_kbit}kbit", "burst", "2k", "cburst", "2k")
        self._ensure_chain(h, "prio", "output")
        self.nft(h, "add rule inet chaos prio meta priority set numgen random mod 100 map "
                    f"{{ 0-{slow_percent - 1} : 1:20, {slow_percent}-99 : 1:10 }}")

    def _ensure_chain(self, h: Host, chain: str, hook: str) -> None:
        self.nft(h, f"add chain inet chaos {chain} {{ type filter hook {hook} priority 0 ; }}")

    def heal(self, h: Host) -> None:
        """Undo every network fault on one host: cable up, rules and shaping gone."""
        self.link(h, True)
        self.nft(h, "delete table inet chaos\nadd table inet chaos")
        run("ip", "netns", "exec", h.netns, "nft", "delete", "table", "netdev", "chaosdup", check=False)
        run("ip", "netns", "exec", h.netns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def heal_all(self) -> None:
        for h in self.hosts:
            self.heal(h)

    # -- disks ------------------------------------------------------------------------------

    def loop_mount(self, where: Path, size_mib: int) -> str:
        """An ext4 file system on a loop device of its own; returns the device (to slow it).
        The image is sparse: it takes room on the real disk only as the home fills it, so it
        is sized for the whole run (run.disk_mib) at no cost, and the full-disk fault fills it
        with fallocate (blocks reserved, nothing written). No blocks reserved for root (-m 0):
        the daemon runs as root and must meet the same ENOSPC as the filler."""
        img = self.dir / f"{where.name}.img"
        with open(img, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-T", "largefile", str(img))
        dev = run("losetup", "-f", "--show", str(img)).stdout.strip()
        self._loops.append(dev)
        where.mkdir(parents=True, exist_ok=True)
        run("mount", dev, str(where))
        self._mounts.append(where)
        return dev

    def slow(self, dev: str, write_iops: int) -> None:
        """Throttle writes to the loop device (cgroup v1 blkio; 0 lifts it). device-mapper's
        delay target is not built into this kernel, so this is the slow disk."""
        self._write_throttle(dev, write_iops)
        if write_iops and dev not in self._throttled:
            self._throttled.append(dev)

    @staticmethod
    def _write_throttle(dev: str, iops: int) -> None:
        st = os.stat(dev)
        try:
            BLKIO.write_text(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {iops}\n")
        except OSError as exc:
            raise BedError(f"cannot throttle {dev}: {exc}") from None
