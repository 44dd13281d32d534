"""The zeroconf `Discovery` service: announces this node as `_valuemesh._tcp.local.` on the
chosen interfaces and reports every valid announcement of another node of its network.

Announcements are untrusted input from anyone on the LAN: the raw TXT record is parsed by
our own strict parser (node/announcement.py), and anything malformed, oversized, from another
network or from ourselves is dropped with a log line. A member id learnt here is only a hint:
the transport handshake proves the key.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from valuemesh.node.addresses import ip_or_none
from valuemesh.node.announcement import (
    MAX_NETWORK_ID,
    SERVICE_TYPE,
    Found,
    announcement_txt,
    instance_name,
    parse_announcement,
)
from valuemesh.node.interfaces import check_interfaces, default_interfaces
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import MemberId

log = logging.getLogger("valuemesh.discovery")
_T = TypeVar("_T")

# Bounds on what a LAN full of announcers can make us hold or do.
MAX_ADDRESSES_PER_ANNOUNCEMENT = 16
MAX_TRACKED_SERVICES = 512
MAX_PENDING_RESOLVES = 512
MAX_CONCURRENT_RESOLVES = 8
REJECTIONS_KEPT = 64
MAX_REPORTED = 2048

# Timers, in seconds.
RESOLVE_TIMEOUT = 3.0
RESOLVE_ATTEMPTS = 4
RESOLVE_RETRY_DELAY = 0.5
# The same (member, address) is reported again no sooner than this, so a chatty or hostile
# announcer cannot flood the node with callbacks; the peer table is idempotent anyway.
REREPORT_INTERVAL = 30.0
STOP_TIMEOUT = 5.0


def _ip_version(interfaces: Sequence[str]) -> IPVersion:
    versions = {ipaddress.ip_address(i).version for i in interfaces}
    if versions == {4}:
        return IPVersion.V4Only
    if versions == {6}:
        return IPVersion.V6Only
    return IPVersion.All


class Discovery:
    """Announce this node and browse for others over mDNS on the chosen interfaces."""

    def __init__(
        self,
        member: MemberId,
        network_id: bytes,
        port: int,
        on_found: Callable[[Found], None],
        *,
        interfaces: Sequence[str] | None = None,
        on_lost: Callable[[MemberId], None] | None = None,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        rereport_interval: float = REREPORT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(network_id, bytes) or not 1 <= len(network_id) <= MAX_NETWORK_ID:
            raise LocalError(f"A network id must be 1 to {MAX_NETWORK_ID} bytes.")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise LocalError(f"The port to announce must be 1-65535, not {port!r}.")
        if interfaces is None:
            chosen = default_interfaces()
            if not chosen:
                raise LocalError(
                    "No non-loopback IPv4 interface is up; name the interfaces to use."
                )
        else:
            chosen = check_interfaces(interfaces)
        self.member = member
        self.network_id = network_id
        self.port = port
        self.interfaces = chosen
        self._on_found = on_found
        self._on_lost = on_lost
        self._resolve_timeout = resolve_timeout
        self._rereport = rereport_interval
        self._clock = clock
        self._loopback_ok = any(ipaddress.ip_address(i).is_loopback for i in chosen)
        self._name = f"{instance_name(member, network_id)}.{SERVICE_TYPE}"
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._names: dict[str, MemberId] = {}  # service name -> member it announced
        self._reported: dict[tuple[MemberId, str, int], float] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(MAX_CONCURRENT_RESOLVES)
        self.ignored = 0  # announcements dropped as invalid, foreign or our own
        # The latest (service name, reason) drops, for diagnostics and tests.
        self.rejections: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=REJECTIONS_KEPT
        )

    @property
    def service_name(self) -> str:
        return self._name

    async def start(self) -> None:
        """Open the mDNS sockets, start browsing, then announce (probing takes ~1.5 s)."""
        if self._aiozc is not None:
            raise LocalError("Discovery is already running.")
        try:
            aiozc = AsyncZeroconf(
                interfaces=list(self.interfaces), ip_version=_ip_version(self.interfaces)
            )
        except OSError as e:
            raise LocalError(
                f"Cannot open mDNS sockets on {', '.join(self.interfaces)}: {e.strerror or e}."
            ) from None
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self.port,
            properties=announcement_txt(self.member, self.network_id, self.port),
            server=f"{instance_name(self.member, self.network_id)}.local.",
            parsed_addresses=list(self.interfaces),
        )
        self._aiozc = aiozc
        # Browse first, so that peers are found while our own name is still being probed.
        self._browser = AsyncServiceBrowser(
            aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        try:
            announced = await aiozc.async_register_service(info)
            await announced
        except NonUniqueNameException:
            await self.stop()
            raise LocalError(
                "Another node with this member id is already announced on this network."
            ) from None
        except BaseException:
            await self.stop()
            raise
        self._info = info
        log.info(
            "discovery started member=%s service=%s interfaces=%s port=%d",
            self.member.short, self._name, ",".join(self.interfaces), self.port,
        )

    async def stop(self) -> None:
        """Say goodbye (unregister, so peers forget us at once) and close the sockets."""
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        try:
            if self._info is not None:
                await asyncio.wait_for(aiozc.async_unregister_service(self._info), STOP_TIMEOUT)
        except (TimeoutError, OSError) as e:
            log.warning("discovery goodbye not sent: %s", e)
        finally:
            await aiozc.async_close()
            self._info = None
        log.info("discovery stopped member=%s", self.member.short)

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- browsing --------------------------------------------------------------------------------

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if name == self._name:
            return
        if state_change is ServiceStateChange.Removed:
            member = self._names.pop(name, None)
            if member is not None and member not in self._names.values():
                self._reported = {k: v for k, v in self._reported.items() if k[0] != member}
                if self._on_lost is not None:
                    self._call(self._on_lost, member)
            return
        if name in self._pending:
            return
        if len(self._pending) >= MAX_PENDING_RESOLVES:
            self._drop(name, "too many announcements pending")
            return
        self._pending.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        try:
            for attempt in range(RESOLVE_ATTEMPTS):
                async with self._sem:
                    if self._aiozc is None:
                        return
                    try:
                        info = AsyncServiceInfo(SERVICE_TYPE, name)
                    except BadTypeInNameException:
                        self._drop(name, "a malformed service name")
                        return
                    ok = await info.async_request(
                        self._aiozc.zeroconf, int(self._resolve_timeout * 1000)
                    )
                if ok:
                    self._accept(name, info)
                    return
                # A lost answer on a busy LAN is common, and the browser will not report
                # the same name again until it changes, so we retry here a few times.
                log.debug("discovery: %r did not resolve (attempt %d)", name[:80], attempt + 1)
                await asyncio.sleep(RESOLVE_RETRY_DELAY * 2**attempt)
            log.info("discovery: %r never resolved; waiting for its next announcement", name[:80])
        finally:
            self._pending.discard(name)

    def _accept(self, name: str, info: AsyncServiceInfo) -> None:
        try:
            ann = parse_announcement(info.text or b"", info.port)
        except ValuemeshError as e:
            self._drop(name, e.message)
            return
        if ann.network_id != self.network_id:
            self._drop(name, "another network", warn=False)  # normal on a shared LAN
            return
        if ann.member == self.member:
            self._drop(name, "our own member id", warn=False)
            return
        hosts = self._usable_hosts(info.parsed_addresses())
        if not hosts:
            self._drop(name, "no usable address")
            return
        if name not in self._names and len(self._names) >= MAX_TRACKED_SERVICES:
            self._drop(name, "too many services tracked")
            return
        self._names[name] = ann.member
        now = self._clock()
        for host in hosts:
            key = (ann.member, host, ann.port)
            last = self._reported.get(key)
            if last is not None and now - last < self._rereport:
                continue
            if len(self._reported) >= MAX_REPORTED:
                fresh = sorted(self._reported.items(), key=lambda kv: kv[1])
                fresh = [kv for kv in fresh if now - kv[1] < self._rereport]
                # Still full of recent entries (a flood of changing announcements): keep the
                # newest half, so memory stays bounded whatever the sender does.
                self._reported = dict(fresh[-MAX_REPORTED // 2 :])
            self._reported[key] = now
            self._call(self._on_found, Found(ann.member, host, ann.port))

    def _usable_hosts(self, addresses: Sequence[str]) -> list[str]:
        out: list[str] = []
        for text in addresses[:MAX_ADDRESSES_PER_ANNOUNCEMENT]:
            ip = ip_or_none(text.split("%")[0])
            if ip is None or ip.is_unspecified or ip.is_multicast:
                continue
            # A LAN announcement pointing at loopback would make us dial our own services.
            if ip.is_loopback and not self._loopback_ok:
                continue
            if ip.version == 6 and ip.is_link_local:
                continue  # unusable without the interface scope, which DNS-SD does not carry
            if ip.compressed not in out:
                out.append(ip.compressed)
        out.sort(key=lambda h: ipaddress.ip_address(h).version)  # IPv4 first
        return out

    def _drop(self, name: str, why: str, *, warn: bool = True) -> None:
        self.ignored += 1
        self.rejections.append((name[:120], why))
        if warn:
            log.warning("discovery: ignoring announcement %r: %s", name[:80], why)
        else:
            log.debug("discovery: ignoring announcement %r: %s", name[:80], why)

    def _call(self, fn: Callable[[_T], None], arg: _T) -> None:
        # A failing callback is the node's bug, never a reason to stop discovering.
        try:
            fn(arg)
        except Exception:
            log.exception("discovery callback failed")
