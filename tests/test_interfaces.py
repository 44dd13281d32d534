"""Tests of the choice of mDNS interfaces: the default (up, running, multicast, non-loopback
IPv4, read from a fake /sys/class/net) and the check of operator-given addresses.
"""

from __future__ import annotations

from pathlib import Path

import ifaddr
import pytest

from valuemesh.node.interfaces import check_interfaces, default_interfaces
from valuemesh.protocol.errors import LocalError


def test_check_interfaces() -> None:
    assert check_interfaces(["127.0.0.1", "127.0.0.1"]) == ["127.0.0.1"]
    for bad in (["eth0"], ["0.0.0.0"], ["203.0.113.77"], [], "127.0.0.1"):
        with pytest.raises(LocalError):
            check_interfaces(bad)  # type: ignore[arg-type]


def test_default_interfaces_skip_loopback_link_local_and_down_links(tmp_path: Path) -> None:
    def adapter(name: str, *ips: str) -> ifaddr.Adapter:
        return ifaddr.Adapter(name, name, [ifaddr.IP(ip, 24, name) for ip in ips])

    # A fake /sys/class/net: flags as the kernel shows them there (no IFF_RUNNING), and
    # operstate for whether the link is really running.
    links = {
        "eth0": ("0x1003", "up"),  # up, broadcast, multicast: used
        "wlan0": ("0x1003", "unknown"),  # a driver that does not report state: used
        "eth1": ("0x1002", "down"),  # administratively down
        "eth2": ("0x1003", "down"),  # up but no carrier
        "tun0": ("0x91", "unknown"),  # point-to-point without multicast
        "lo": ("0x9", "unknown"),  # loopback, whatever address it carries
    }
    for name, (flags, oper) in links.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "flags").write_text(flags + "\n")
        (tmp_path / name / "operstate").write_text(oper + "\n")
    adapters = [
        adapter("eth0", "192.0.2.10", "127.0.0.5", "169.254.1.1"),
        adapter("wlan0", "198.51.100.7"),
        adapter("eth1", "203.0.113.1"),
        adapter("eth2", "203.0.113.2"),
        adapter("tun0", "203.0.113.3"),
        adapter("lo", "203.0.113.4"),
        adapter("nosuch0", "203.0.113.5"),  # state unreadable (not Linux): address rules only
        adapter("../../etc", "203.0.113.6"),  # a name that is not a plain file name
    ]
    assert default_interfaces(adapters, sysfs=str(tmp_path)) == [
        "192.0.2.10", "198.51.100.7", "203.0.113.5", "203.0.113.6"]
    for ip in default_interfaces():
        assert not ip.startswith("127.") and not ip.startswith("169.254.")
