"""Which network interfaces mDNS may use: the default choice (up, running, multicast,
non-loopback IPv4) and the check of the operator's explicit interface addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence

import ifaddr

from valuemesh.node.addresses import Network, ip_or_none
from valuemesh.protocol.errors import LocalError

# Linux interface flags (include/uapi/linux/if.h) as /sys/class/net/*/flags shows them.
# That file holds the configured flags only; whether the link is running is `operstate`.
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
_SYSFS_NET = "/sys/class/net"
_RUNNING_STATES = frozenset({"up", "unknown"})  # "unknown": drivers that do not report it


def _sysfs(sysfs: str, name: str, attr: str) -> str | None:
    if "/" in name or name in ("", ".", ".."):
        return None
    try:
        with open(f"{sysfs}/{name}/{attr}", encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def default_interfaces(
    adapters: Sequence[ifaddr.Adapter] | None = None, *, sysfs: str = _SYSFS_NET
) -> list[str]:
    """Every non-loopback IPv4 address on an interface that is up, running and multicast.

    Link-local (169.254/16) addresses are left out: they mean no network was configured.
    Where interface state cannot be read (not Linux), every such address is taken.
    """
    found: list[str] = []
    for adapter in adapters if adapters is not None else ifaddr.get_adapters():
        flags_text = _sysfs(sysfs, adapter.nice_name, "flags")
        if flags_text is not None:
            try:
                flags = int(flags_text, 16)
            except ValueError:
                flags = 0
            if not flags & _IFF_UP or not flags & _IFF_MULTICAST or flags & _IFF_LOOPBACK:
                continue
        oper = _sysfs(sysfs, adapter.nice_name, "operstate")
        if oper is not None and oper not in _RUNNING_STATES:
            continue
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_loopback or addr.is_link_local or addr.is_unspecified:
                continue
            if ip.ip not in found:
                found.append(ip.ip)
    return found


def local_addresses(adapters: Sequence[ifaddr.Adapter] | None = None) -> set[str]:
    """Every IP address (canonical text) assigned to an interface of this host."""
    out: set[str] = set()
    for adapter in adapters if adapters is not None else ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            parsed = ip_or_none(text.split("%")[0])
            if parsed is not None:
                out.add(parsed.compressed)
    return out


def local_networks(adapters: Sequence[ifaddr.Adapter] | None = None) -> list[Network]:
    """The networks this host's interfaces are on (address and prefix length), loopback
    included: a member's `lan` address is worth dialling only when it is on one of them."""
    out: list[Network] = []
    for adapter in adapters if adapters is not None else ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            parsed = ip_or_none(text.split("%")[0])
            if parsed is None or parsed.is_link_local:
                continue
            with contextlib.suppress(ValueError):
                net = ipaddress.ip_network(f"{parsed.compressed}/{ip.network_prefix}", strict=False)
                if net not in out:
                    out.append(net)
    return out


def check_interfaces(interfaces: Sequence[str]) -> list[str]:
    """Validate the operator's interface addresses: IP literals assigned to this host."""
    if isinstance(interfaces, str):
        raise LocalError("Interfaces must be a list of IP addresses, not one string.")
    present = local_addresses()
    out: list[str] = []
    for text in interfaces:
        ip = ip_or_none(text) if isinstance(text, str) else None
        if ip is None:
            raise LocalError(f"'{text}' is not an IP address; name interfaces by their address.")
        if ip.is_unspecified or ip.is_multicast:
            raise LocalError(f"'{text}' cannot be used as an interface address.")
        if ip.compressed not in present:
            raise LocalError(f"No interface of this machine has the address {ip.compressed}.")
        if ip.compressed not in out:
            out.append(ip.compressed)
    if not out:
        raise LocalError("No interface was given to announce and browse on.")
    return out
