"""Asking the home router to forward the node's peer port (issue 17, item 3; docs/reach.md).

`PortMapper(port)` tries PCP, then NAT-PMP (node/natpmp.py, ours), then UPnP-IGD (the
async-upnp-client library), keeps the first mapping obtained alive by renewing it at half
its lifetime, deletes it on a clean stop, and reports what it has as a `PortMapping`: the
method, the outside address and port, the lifetime, or why there is none. The daemon puts it
in its signed address record; `netcheck` prints it.

Why this order: PCP and NAT-PMP are one UDP datagram each way to the default gateway, answer
in milliseconds, and fail at once (ICMP port unreachable) on a router without them; PCP is
NAT-PMP's successor (nonce-authenticated renewals, IPv6) and a NAT-PMP-only server answers it
with a version error that costs one round trip. UPnP-IGD needs an SSDP multicast search, an
HTTP fetch of the description and a SOAP call, and is the one that may wait out a timeout, so
it goes last. Only the default gateway (and SSDP answers whose description lives on it) is
ever talked to, from the address the node uses towards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from valuemesh.node import natpmp

log = logging.getLogger(__name__)

Method = Literal["pcp", "natpmp", "upnp"]
METHODS: tuple[Method, ...] = ("pcp", "natpmp", "upnp")
DEFAULT_LIFETIME_S = 7200  # asked for; routers may grant less (renewed at half of it anyway)
MIN_RENEW_S = 1.0
RETRY_S = 60.0  # after every method failed, or a renewal failed: try again this much later
SSDP_WAIT_S = 2  # seconds an SSDP search listens for the gateway's answer
HTTP_TIMEOUT_S = 5
UPNP_DESCRIPTION = "valuemesh"
IGD_TYPES = ("urn:schemas-upnp-org:device:InternetGatewayDevice:2",
             "urn:schemas-upnp-org:device:InternetGatewayDevice:1")
UPNP_ONLY_PERMANENT = 725  # OnlyPermanentLeasesSupported (IGDv1 routers)
UPNP_CONFLICT = 718  # ConflictInMappingEntry: the outside port is taken by another host


@dataclass(frozen=True)
class PortMapping:
    """What the router granted, or why nothing (`method` empty, `reason` says why)."""

    method: Method | Literal[""]
    internal_port: int
    external_ip: str = ""
    external_port: int = 0
    lifetime_s: int = 0  # 0 with a method: a permanent UPnP lease
    reason: str = ""

    @property
    def obtained(self) -> bool:
        return bool(self.method)

    @property
    def external(self) -> str:
        """HOST:PORT a peer dials, or "" when there is no mapping."""
        if not self.obtained:
            return ""
        host = f"[{self.external_ip}]" if ":" in self.external_ip else self.external_ip
        return f"{host}:{self.external_port}"

    def describe(self) -> str:
        if not self.obtained:
            return f"no port mapping: {self.reason}"
        lease = f"{self.lifetime_s} s" if self.lifetime_s else "permanent"
        return f"{self.method} mapped {self.external} to port {self.internal_port} ({lease})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Held:
    """One mapping held at the router, by one method: renew or delete it."""

    def __init__(self, method: Method, gateway: str, internal_port: int) -> None:
        self.method = method
        self.gateway = gateway
        self.internal_port = internal_port
        self.nonce = secrets.token_bytes(natpmp.NONCE_LEN)
        self.external_port = internal_port
        self.igd: Any = None  # async_upnp_client IgdDevice for upnp
        self.local_ip = natpmp.local_address(gateway)

    async def request(self, lifetime_s: int) -> PortMapping:
        if self.method == "pcp":
            g = await natpmp.pcp_map(self.gateway, self.internal_port, lifetime_s, self.nonce,
                                     self.external_port)
        elif self.method == "natpmp":
            g = await natpmp.natpmp_map(self.gateway, self.internal_port, lifetime_s, self.external_port)
        else:
            return await self._upnp_add(lifetime_s)
        self.external_port = g.external_port
        return PortMapping(self.method, self.internal_port, g.external_ip, g.external_port, g.lifetime_s)

    async def delete(self) -> None:
        if self.method == "pcp":
            await natpmp.pcp_map(self.gateway, self.internal_port, 0, self.nonce, self.external_port)
        elif self.method == "natpmp":
            await natpmp.natpmp_map(self.gateway, self.internal_port, 0)
        elif self.igd is not None:
            await self.igd.async_delete_port_mapping(ipaddress.IPv4Address("0.0.0.0"), self.external_port, "TCP")

    async def _upnp_add(self, lifetime_s: int) -> PortMapping:
        from async_upnp_client.exceptions import UpnpActionResponseError

        if self.igd is None:
            self.igd = await _find_igd(self.gateway, self.local_ip)
        lease = lifetime_s
        ports = [self.external_port, *(1024 + secrets.randbelow(64512) for _ in range(2))]
        for port in ports:
            try:
                await self.igd.async_add_port_mapping(
                    ipaddress.IPv4Address("0.0.0.0"), port, "TCP", self.internal_port,
                    ipaddress.IPv4Address(self.local_ip), True, UPNP_DESCRIPTION, timedelta(seconds=lease))
            except UpnpActionResponseError as exc:
                if exc.error_code == UPNP_ONLY_PERMANENT and lease:
                    lease = 0
                    ports.insert(ports.index(port) + 1, port)
                    continue
                if exc.error_code == UPNP_CONFLICT:
                    continue
                raise natpmp.MappingError(f"The router refused the UPnP mapping: {exc}.") from None
            self.external_port = port
            ext_ip = await self.igd.async_get_external_ip_address()
            if not ext_ip or _unusable(ext_ip):
                raise natpmp.MappingError(f"The router's UPnP service reports no usable outside address ({ext_ip!r}).")
            return PortMapping("upnp", self.internal_port, ext_ip, port, lease)
        raise natpmp.MappingError("Every outside port tried is taken at the router (UPnP conflict).")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unusable(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True
    return addr.is_unspecified or addr.is_loopback or addr.is_multicast


async def _find_igd(gateway: str, local_ip: str) -> Any:
    """The gateway's Internet Gateway Device, found by an SSDP search sent from `local_ip`
    (the interface towards the gateway, nowhere else); answers whose description is not on
    the gateway itself are ignored, so another host of the LAN cannot pose as the router."""
    from async_upnp_client.aiohttp import AiohttpRequester
    from async_upnp_client.client_factory import UpnpFactory
    from async_upnp_client.profiles.igd import IgdDevice
    from async_upnp_client.search import SsdpSearchListener

    found: list[str] = []
    answered = asyncio.Event()

    def on_answer(headers: Any) -> None:
        location = str(headers.get("location", ""))
        if urlsplit(location).hostname == gateway and location not in found and len(found) < 4:
            found.append(location)
            answered.set()

    # MX 1: a device waits at most 1 s before it answers (UPnP's least); both IGD versions.
    listener = SsdpSearchListener(callback=on_answer, source=(local_ip, 0), timeout=1,
                                  search_target=IGD_TYPES[0])
    await listener.async_start()
    try:
        for st in IGD_TYPES:
            listener.search_target = st
            listener.async_search()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), SSDP_WAIT_S)
    finally:
        listener.async_stop()
    if not found:
        raise natpmp.NoAnswer(f"No UPnP Internet Gateway Device answered on {gateway} within {SSDP_WAIT_S} s.")
    factory = UpnpFactory(AiohttpRequester(timeout=HTTP_TIMEOUT_S))
    device = await factory.async_create_device(found[0])
    if not IgdDevice.is_profile_device(device):
        raise natpmp.MappingError(f"The UPnP device at {found[0]} is not an Internet Gateway Device.")
    return IgdDevice(device, None)


class PortMapper:
    """Obtain, keep and release one TCP port mapping for the node's peer port."""

    def __init__(self, internal_port: int, *, enabled: bool = True, listen_host: str = "0.0.0.0",
                 lifetime_s: int = DEFAULT_LIFETIME_S, gateway: str | None = None,
                 methods: Sequence[Method] = METHODS, retry_s: float = RETRY_S) -> None:
        if not 1 <= internal_port <= 65535:
            raise ValueError(f"Port {internal_port} is not a TCP port.")
        if any(m not in METHODS for m in methods) or not methods:
            raise ValueError(f"Port mapping methods are some of {', '.join(METHODS)}.")
        self.internal_port = internal_port
        self.enabled = enabled
        self.listen_host = listen_host
        self.lifetime_s = lifetime_s
        self.gateway = gateway
        self.methods = tuple(methods)
        self.retry_s = retry_s
        self._current = PortMapping("", internal_port, reason="not started")
        self._held: _Held | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[PortMapping], None]] = []

    @property
    def current(self) -> PortMapping:
        return self._current

    def on_change(self, listener: Callable[[PortMapping], None]) -> None:
        """Call `listener(mapping)` whenever the mapping obtained (or its absence) changes."""
        self._listeners.append(listener)

    async def start(self) -> PortMapping:
        """Try once (bounded: about 2 s per UDP method, SSDP_WAIT_S + HTTP for UPnP), then
        keep it alive in the background; returns what was obtained or why not."""
        if not self.enabled:
            self._set(PortMapping("", self.internal_port, reason="port mapping is turned off (port_mapping = false)"))
            return self._current
        if _is_loopback(self.listen_host):
            self._set(PortMapping("", self.internal_port, reason=f"the peer port listens on {self.listen_host} "
                                                                 "only (loopback: nothing to map)"))
            return self._current
        await self._obtain()
        self._task = asyncio.create_task(self._keep(), name="portmap")
        return self._current

    async def stop(self) -> None:
        """Stop renewing and delete the mapping at the router (bounded in time)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        held, self._held = self._held, None
        if held is not None:
            try:
                await asyncio.wait_for(held.delete(), HTTP_TIMEOUT_S)
            except Exception as exc:
                log.info("port mapping: deleting the %s mapping failed: %s", held.method, exc)
        self._set(PortMapping("", self.internal_port, reason="stopped"))

    async def _obtain(self) -> None:
        gateway = self.gateway or natpmp.default_gateway()
        if gateway is None:
            self._set(PortMapping("", self.internal_port, reason="no default gateway (no router to ask)"))
            return
        try:
            local = natpmp.local_address(gateway)
        except OSError as exc:
            self._set(PortMapping("", self.internal_port, reason=f"no route to the gateway {gateway} ({exc})"))
            return
        if self.listen_host not in ("", "0.0.0.0", "::") and local != self.listen_host:
            self._set(PortMapping("", self.internal_port, reason=f"the peer port listens on {self.listen_host}, "
                                                                 f"not on {local}, the address towards the gateway"))
            return
        reasons = []
        for method in self.methods:
            try:
                held = _Held(method, gateway, self.internal_port)
                got = await held.request(self.lifetime_s)
            except (natpmp.MappingError, OSError, TimeoutError) as exc:
                reasons.append(f"{method}: {_sentence(exc)}")
                continue
            except Exception as exc:
                reasons.append(f"{method}: {type(exc).__name__}: {_sentence(exc)}")
                continue
            self._held = held
            self._set(got)
            return
        self._set(PortMapping("", self.internal_port, reason=f"the router at {gateway} granted none ("
                              + "; ".join(reasons) + ")"))

    async def _keep(self) -> None:
        while True:
            cur = self._current
            wait = max(MIN_RENEW_S, cur.lifetime_s / 2) if cur.obtained and cur.lifetime_s else self.retry_s
            if cur.obtained and not cur.lifetime_s:
                wait = DEFAULT_LIFETIME_S / 2  # a permanent lease: check it is still there now and then
            await asyncio.sleep(wait)
            held = self._held
            if held is not None:
                try:
                    self._set(await held.request(self.lifetime_s))
                    continue
                except Exception as exc:
                    log.info("port mapping: renewing by %s failed: %s", held.method, exc)
                    self._held = None
            await self._obtain()

    def _set(self, mapping: PortMapping) -> None:
        old, self._current = self._current, mapping
        if replace(old, lifetime_s=0) == replace(mapping, lifetime_s=0):
            return
        log.info("port mapping: %s", mapping.describe())
        for listener in self._listeners:
            listener(mapping)


def _sentence(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.rstrip(".")[:200]
