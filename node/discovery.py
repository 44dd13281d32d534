"""Finding peers and keeping links to them: mDNS/DNS-SD on the LAN, bootstrap addresses, and
`PeerManager`, which drives the peer table's dials and SWIM probes over the transport.

`Discovery` announces this node as `_valuemesh._tcp.local.` on the interfaces the operator
chose and reports every valid announcement of another node of the same network to a callback.

Announcements are untrusted input from anyone on the LAN: the raw TXT record is parsed by
our own strict parser (`parse_txt`), checked field by field (`parse_announcement`), and
anything malformed, oversized, from another network or from ourselves is dropped with a log
line. A member id learnt here is only a hint: the transport handshake proves the key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from valuemesh.node.peers import (
    Action,
    Address,
    Dial,
    DialTarget,
    Died,
    ExchangeEntry,
    MergeReport,
    PeerTable,
    Ping,
    Revived,
    Source,
    Suspected,
    ip_or_none,
    is_hostname,
)
from valuemesh.node.transport import PeerLink, Transport
from valuemesh.protocol.errors import DecodeError, LocalError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import MemberId

log = logging.getLogger("valuemesh.discovery")
_T = TypeVar("_T")

SERVICE_TYPE = "_valuemesh._tcp.local."
DISCOVERY_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_NETWORK_ID = 64  # bytes; matches the transport's limit

# TXT keys. Short, because every announcement carries them (RFC 6763 §6.4 asks for <= 9).
TXT_MEMBER = "id"
TXT_NETWORK = "net"
TXT_PORT = "port"
TXT_VERSION = "pv"
_REQUIRED_KEYS = (TXT_MEMBER, TXT_NETWORK, TXT_PORT, TXT_VERSION)

# Bounds on hostile input. A well-formed announcement of ours is about 220 bytes.
MAX_TXT_BYTES = 1300
MAX_TXT_ENTRIES = 16
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

# Linux interface flags (include/uapi/linux/if.h) as /sys/class/net/*/flags shows them.
# That file holds the configured flags only; whether the link is running is `operstate`.
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_MULTICAST = 0x1000
_SYSFS_NET = "/sys/class/net"
_RUNNING_STATES = frozenset({"up", "unknown"})  # "unknown": drivers that do not report it


# --- strict parsing of untrusted announcements ---------------------------------------------------


def parse_txt(raw: bytes) -> dict[str, bytes]:
    """Parse DNS TXT rdata (length-prefixed strings of key=value) strictly.

    Unlike a lenient DNS-SD reader, a duplicate key, a key without '=', a non-ASCII key or
    an empty string makes the whole record invalid: a node never emits those, so they mark
    a garbled or hostile announcement.
    """
    if not isinstance(raw, bytes):
        raise DecodeError("A TXT record must be bytes.")
    if len(raw) > MAX_TXT_BYTES:
        raise DecodeError(f"The TXT record is {len(raw)} bytes; the limit is {MAX_TXT_BYTES}.")
    out: dict[str, bytes] = {}
    i = 0
    while i < len(raw):
        n = raw[i]
        item = raw[i + 1 : i + 1 + n]
        if n == 0 or len(item) != n:
            raise DecodeError("The TXT record has an empty or truncated string.")
        i += 1 + n
        key_raw, eq, value = item.partition(b"=")
        if not eq or not key_raw:
            raise DecodeError("A TXT string has no 'key=' part.")
        if any(c < 0x20 or c > 0x7E for c in key_raw):
            raise DecodeError("A TXT key holds characters outside printable ASCII.")
        key = key_raw.decode("ascii").lower()
        if key in out:
            raise DecodeError(f"The TXT key '{key}' appears twice.")
        if len(out) >= MAX_TXT_ENTRIES:
            raise DecodeError(f"The TXT record has more than {MAX_TXT_ENTRIES} entries.")
        out[key] = value
    return out


def encode_txt(items: dict[str, str]) -> bytes:
    """Encode our own TXT rdata (the inverse of `parse_txt`)."""
    out = bytearray()
    for k, v in items.items():
        s = f"{k}={v}".encode()
        if len(s) > 255:
            raise LocalError(f"The TXT entry '{k}' is longer than 255 bytes.")
        out += bytes((len(s),)) + s
    return bytes(out)


def _ascii(value: bytes, what: str) -> str:
    if not value or any(c < 0x21 or c > 0x7E for c in value):
        raise ValidationError(f"The announced {what} is empty or not printable ASCII.")
    return value.decode("ascii")


def _decimal(value: bytes, what: str, low: int, high: int) -> int:
    text = _ascii(value, what)
    # Only canonical decimals: no sign, no spaces, no leading zeros, no underscores.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 10:
        raise ValidationError(f"The announced {what} is not a plain decimal number.")
    number = int(text)
    if not low <= number <= high:
        raise ValidationError(f"The announced {what} {number} is outside {low}-{high}.")
    return number


@dataclass(frozen=True, slots=True)
class Announcement:
    """The validated content of one node's DNS-SD announcement."""

    member: MemberId
    network_id: bytes
    port: int
    version: int


def announcement_txt(member: MemberId, network_id: bytes, port: int) -> dict[str, str]:
    return {
        TXT_MEMBER: str(member),
        TXT_NETWORK: network_id.hex(),
        TXT_PORT: str(port),
        TXT_VERSION: str(DISCOVERY_VERSION),
    }


def parse_announcement(txt: bytes, srv_port: int | None) -> Announcement:
    """Validate raw TXT rdata plus the SRV port; raises a RemoteError subclass if bad."""
    fields = parse_txt(txt)
    missing = [k for k in _REQUIRED_KEYS if k not in fields]
    if missing:
        raise ValidationError(f"The announcement lacks the TXT key '{missing[0]}'.")
    version = _decimal(fields[TXT_VERSION], "protocol version", 0, 65535)
    if version not in SUPPORTED_VERSIONS:
        raise ValidationError(f"The announcement uses discovery version {version}, unknown here.")
    try:
        member = MemberId.parse(_ascii(fields[TXT_MEMBER], "member id"))
    except ValuemeshError as e:
        raise ValidationError(f"The announced member id is invalid: {e}") from None
    net_text = _ascii(fields[TXT_NETWORK], "network id")
    if len(net_text) % 2 or len(net_text) > 2 * MAX_NETWORK_ID or net_text != net_text.lower():
        raise ValidationError("The announced network id is not lower-case hex of 1-64 bytes.")
    try:
        network_id = bytes.fromhex(net_text)
    except ValueError:
        raise ValidationError("The announced network id is not hexadecimal.") from None
    port = _decimal(fields[TXT_PORT], "port", 1, 65535)
    if srv_port != port:
        raise ValidationError("The announced TXT port and SRV port disagree.")
    return Announcement(member, network_id, port, version)


# --- interfaces --------------------------------------------------------------------------------


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


def _ip_version(interfaces: Sequence[str]) -> IPVersion:
    versions = {ipaddress.ip_address(i).version for i in interfaces}
    if versions == {4}:
        return IPVersion.V4Only
    if versions == {6}:
        return IPVersion.V6Only
    return IPVersion.All


# --- bootstrap addresses -----------------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse `HOST:PORT`, `IPv4:PORT` or `[IPv6]:PORT` strictly; raises LocalError."""
    if not isinstance(text, str):
        raise LocalError("A bootstrap address must be text like host:port.")
    t = text.strip()
    if not t:
        raise LocalError("A bootstrap address is empty; write it as host:port.")
    if t.startswith("["):
        close = t.find("]")
        if close < 0:
            raise LocalError(f"'{text}' opens '[' without closing it; write [IPv6]:port.")
        host, rest = t[1:close], t[close + 1 :]
        if not rest.startswith(":"):
            raise LocalError(f"'{text}' lacks ':port' after the bracketed address.")
        ip = ip_or_none(host)
        if ip is None or ip.version != 6:
            raise LocalError(f"'{host}' in brackets is not an IPv6 address.")
        port_text = rest[1:]
    else:
        if t.count(":") > 1:
            raise LocalError(f"'{text}' looks like an IPv6 address; put it in brackets: [addr]:port.")
        host, colon, port_text = t.partition(":")
        if not colon:
            raise LocalError(f"'{text}' has no port; write it as host:port.")
        if ip_or_none(host) is None and not is_hostname(host):
            raise LocalError(f"'{host}' is neither an IP address nor a valid host name.")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise LocalError(f"'{port_text}' in '{text}' is not a port number.")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise LocalError(f"Port {port} in '{text}' is outside 1-65535.")
    try:
        address = Address(host, port)
    except ValidationError as e:
        raise LocalError(f"'{text}' cannot be dialed: {e}") from None
    return address.host, address.port


def add_bootstrap(table: PeerTable, texts: Sequence[str], now: float) -> list[Address]:
    """Parse every bootstrap address first (all or nothing) and hand them to the table, which
    schedules dials with back-off until each is reached and its member key learnt."""
    addresses = [Address(*parse_hostport(t)) for t in texts]
    for a in addresses:
        if not table.add_anonymous(a, Source.BOOTSTRAP, now):
            raise LocalError(f"Too many bootstrap addresses; {a} was not added.")
    return addresses


# --- the mDNS service ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """A peer of our network announced on the LAN; the handshake will prove its key."""

    member: MemberId
    host: str
    port: int

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)


def instance_name(member: MemberId, network_id: bytes) -> str:
    # 12 chars of the id plus a tag of the network: readable in mDNS browsers, unique per
    # (member, network), and far below the 63-byte DNS label limit.
    tag = hashlib.blake2b(network_id, digest_size=4).hexdigest()
    return f"{member.short}-{tag}"


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



# --- keeping links: the peer table driven against the transport ----------------------------------

# The loop never sleeps longer than this, so a clock jump or a lost wake-up costs little.
MAX_LOOP_SLEEP = 1.0
MAX_CONCURRENT_DIALS = 16
MAX_PENDING_DIALS = 256


class PeerManager:
    """Runs a `PeerTable` against a `Transport`: carries out dials (with the table's back-off)
    and SWIM probes (encrypted pings on the link), and hands liveness events to the node.

    The node's `LinkHandler` calls `link_up`, `link_down` and `heard_from`; `Discovery`'s
    callback is `found`. Indirect probes (`PingReq`) need a wire message that the gossip
    layer does not carry yet, so they are reported to `on_event` for the node to relay.
    """

    def __init__(
        self,
        table: PeerTable,
        transport: Transport,
        *,
        rng: random.Random,
        on_event: Callable[[Action], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self.transport = transport
        self._rng = rng
        self._on_event = on_event
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dial_sem = asyncio.Semaphore(MAX_CONCURRENT_DIALS)

    # -- inputs from the node -------------------------------------------------------------------

    def found(self, f: Found) -> None:
        """Discovery's callback: an mDNS announcement named a member and its address."""
        if self.table.add_address(f.member, f.address, Source.MDNS, self._clock()):
            self._wake.set()

    def add_bootstrap(self, texts: Sequence[str]) -> list[Address]:
        added = add_bootstrap(self.table, texts, self._clock())
        self._wake.set()
        return added

    def add_known(self, member: MemberId, address: Address, source: Source) -> bool:
        """A first-hand address from elsewhere in the node (an invite token, the operator)."""
        ok = self.table.add_address(member, address, source, self._clock())
        self._wake.set()
        return ok

    def exchange_received(self, link: PeerLink, entries: Sequence[ExchangeEntry]) -> MergeReport:
        """Merge a peer-exchange message from `link`; RemoteError (no change) if oversized."""
        try:
            sender: Address | None = Address(*link.addr)
        except ValidationError:
            sender = None
        report = self.table.merge_exchange(link.remote, sender, entries, self._clock())
        if report.accepted:
            self._wake.set()
        return report

    def exchange_offer(self, to: MemberId) -> list[ExchangeEntry]:
        return self.table.exchange_offer(to, self._clock())

    def link_up(self, link: PeerLink, *, listen_port: int | None = None) -> None:
        """A link opened (either way); `listen_port` is the port the peer said it serves on."""
        now = self._clock()
        host, port = link.addr
        try:
            addr = Address(host, port)
            listen = Address(host, listen_port) if listen_port is not None else None
        except ValidationError:
            return
        if link.inbound:
            acts = self.table.linked_up(link.remote, addr, Source.INBOUND, now, listen=listen)
        else:
            src = self.table.addresses(link.remote).get(addr, Source.INBOUND)
            acts = self.table.linked_up(
                link.remote, addr, src, now, dialed=DialTarget(addr, link.remote, src)
            )
        self._emit(acts)

    def link_down(self, link: PeerLink) -> None:
        # A duplicate link being replaced is not the member going away.
        if self.transport.link(link.remote) in (None, link):
            self.table.linked_down(link.remote, self._clock())
            self._wake.set()

    def heard_from(self, member: MemberId, incarnation: int | None = None) -> None:
        """Any authenticated frame from `member` proves it alive."""
        self._emit(self.table.heard_from(member, self._clock(), incarnation))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise LocalError("The peer manager is already running.")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        for t in [*self._tasks, *([task] if task else [])]:
            t.cancel()
        pending = [*self._tasks, *([task] if task else [])]
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT)

    async def _run(self) -> None:
        while True:
            now = self._clock()
            self._emit(self.table.tick(now))
            delay = min(MAX_LOOP_SLEEP, max(0.0, self.table.next_deadline() - self._clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # -- carrying out actions -------------------------------------------------------------------

    def _emit(self, actions: list[Action]) -> None:
        for act in actions:
            if isinstance(act, Dial):
                self._spawn_dial(act.target)
            elif isinstance(act, Ping):
                self._spawn(self._ping(act.member))
            else:
                if isinstance(act, (Suspected, Died, Revived)):
                    log.info("peer %s is %s (incarnation %d)", act.member.short,
                             type(act).__name__.lower(), act.incarnation)
                if self._on_event is not None:
                    try:
                        self._on_event(act)
                    except Exception:
                        log.exception("peer event callback failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_dial(self, target: DialTarget) -> None:
        if len(self._tasks) >= MAX_PENDING_DIALS:
            # Too much in flight: count it as a failure so the table backs off and retries.
            self._emit(self.table.dial_failed(target, self._clock(), self._rng.random()))
            return
        self._spawn(self._dial(target))

    async def _dial(self, target: DialTarget) -> None:
        a = target.address
        try:
            async with self._dial_sem:
                # No `expect`: if another key answers there (a stale or lying announcement),
                # the handshake still completes, so the honest peer there does not penalise
                # us, and we learn whose address it really is.
                link = await self.transport.connect(a.host, a.port)
        except (ValuemeshError, OSError, TimeoutError) as e:
            log.debug("dial %s failed: %s", a, e)
            self._emit(self.table.dial_failed(target, self._clock(), self._rng.random()))
        else:
            now = self._clock()
            real = DialTarget(a, link.remote, target.source)
            self._emit(self.table.linked_up(link.remote, a, target.source, now, dialed=real))
            if target.member is not None and link.remote != target.member:
                log.info("address %s announced for %s belongs to %s", a, target.member.short,
                         link.remote.short)
                self.table.forget_address(target.member, a)
                self._emit(self.table.dial_failed(target, now, self._rng.random()))
        self._wake.set()

    async def _ping(self, member: MemberId) -> None:
        link = self.transport.link(member)
        if link is None:
            return
        try:
            await link.ping(self.table.probe_timeout())
        except (ValuemeshError, TimeoutError):
            return  # the table's own probe deadline decides what silence means
        self.heard_from(member)
