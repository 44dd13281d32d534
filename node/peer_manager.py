"""`PeerManager` keeps links to the members the peer table knows: it carries out the table's
dials (with its back-off) and SWIM probes over the transport, and reports liveness events.

Its inputs are link events from the node's `LinkHandler`, mDNS finds, bootstrap addresses
and peer-exchange messages; its only output besides links is the `on_event` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from valuemesh.node.addressbook import MAX_EXCHANGE_ENTRIES
from valuemesh.node.addresses import Address, ExchangeEntry, Source, parse_hostport
from valuemesh.node.announcement import Found
from valuemesh.node.link import PeerLink
from valuemesh.node.loglimit import LogLimiter
from valuemesh.node.peer_actions import (
    Action,
    Dial,
    DialTarget,
    Died,
    MergeReport,
    Ping,
    Revived,
    Suspected,
)
from valuemesh.node.peers import PeerTable, backoff_delay
from valuemesh.node.ratelimit import TokenBucket
from valuemesh.node.transport import Transport
from valuemesh.protocol.errors import LocalError, RemoteError, ValidationError, ValuemeshError
from valuemesh.protocol.identity import MemberId

# The discovery logger: finding peers and linking to them read as one story.
log = logging.getLogger("valuemesh.discovery")

# The loop never sleeps longer than this, so a clock jump or a lost wake-up costs little.
MAX_LOOP_SLEEP = 1.0
MAX_CONCURRENT_DIALS = 16
MAX_PENDING_DIALS = 256
STOP_TIMEOUT = 5.0
# Peer exchange: entries one member may have merged per window, whatever it sends.
EXCHANGE_WINDOW = 60.0
MAX_EXCHANGE_PER_WINDOW = 64
# Dials: at most this many started per second (after a burst), and an address whose dials
# fail is backed off whichever member it was named for (many fake members, one victim).
DIAL_RATE = 8.0
DIAL_BURST = 32.0
TARGET_BACKOFF_BASE = 1.0
TARGET_BACKOFF_CAP = 300.0
MAX_TARGETS = 4096

# Which constellations (that we take part in) a key is a member of.
Groups = Callable[[MemberId], Collection[bytes]]


def add_bootstrap(table: PeerTable, texts: Sequence[str], now: float) -> list[Address]:
    """Parse every bootstrap address first (all or nothing) and hand them to the table, which
    schedules dials with back-off until each is reached and its member key learnt."""
    addresses = [Address(*parse_hostport(t)) for t in texts]
    for a in addresses:
        if not table.add_anonymous(a, Source.BOOTSTRAP, now):
            raise LocalError(f"Too many bootstrap addresses; {a} was not added.")
    return addresses


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
        groups: Groups = lambda member: (),
    ) -> None:
        self.table = table
        self.transport = transport
        self._rng = rng
        self._groups = groups
        self._exchanged: dict[MemberId, tuple[float, int]] = {}  # sender -> (window start, merged)
        self._dial_budget = TokenBucket(DIAL_RATE, DIAL_BURST, clock())
        self._targets: dict[Address, tuple[int, float]] = {}  # address -> (failures, next dial)
        self._inflight: set[Address] = set()  # one dial per address at a time
        self._stranger_log = LogLimiter(log)
        self.dials_started = 0
        self._on_event = on_event
        # Address records (node/addrspread.py): whether a member's signed record is held (its
        # addresses then come from the record, not from unsigned exchange), and who to tell
        # when a record's address proved to be another key's.
        self.signed: Callable[[MemberId], bool] = lambda member: False
        self.on_misclaim: Callable[[MemberId, Address], None] | None = None
        # Told when a dial of a known member's address failed (node/reach.py: go via a relay).
        self.on_dial_failed: Callable[[MemberId], None] | None = None
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
        """Merge a peer-exchange message from `link`; RemoteError (no change) if oversized.

        Only a member of a constellation we take part in is heard, only about members of
        such a constellation that it shares with us, and only `MAX_EXCHANGE_PER_WINDOW`
        entries per `EXCHANGE_WINDOW`; the rest is ignored.
        """
        if len(entries) > MAX_EXCHANGE_ENTRIES:
            raise RemoteError(
                f"A peer-exchange message carried {len(entries)} entries; the limit is {MAX_EXCHANGE_ENTRIES}."
            )
        shared = set(self._groups(link.remote))
        if not shared:
            self._stranger_log.log(logging.INFO, "ignored peer exchange from %s: it shares no constellation with us",
                                   link.remote.short)
            return MergeReport(0, len(entries))
        now = self._clock()
        kept = [e for e in entries if not shared.isdisjoint(self._groups(e.member)) and not self.signed(e.member)]
        start, merged = self._exchanged.get(link.remote, (now, 0))
        if now - start >= EXCHANGE_WINDOW:
            start, merged = now, 0
        kept = kept[: max(0, MAX_EXCHANGE_PER_WINDOW - merged)]
        if len(self._exchanged) >= MAX_TARGETS and link.remote not in self._exchanged:
            self._exchanged.clear()  # bounded; only members get here, so this is rare
        self._exchanged[link.remote] = (start, merged + len(kept))
        try:
            sender: Address | None = Address(*link.addr)
        except ValidationError:
            sender = None
        report = self.table.merge_exchange(link.remote, sender, kept, now)
        if report.accepted:
            self._wake.set()
        return MergeReport(report.accepted, report.ignored + len(entries) - len(kept))

    def exchange_offer(self, to: MemberId) -> list[ExchangeEntry]:
        """What `to` may hear from us: nothing unless it is a member of a constellation we
        take part in, then only members of the constellations we share with it."""
        shared = set(self._groups(to))
        if not shared:
            return []
        return self.table.exchange_offer(
            to, self._clock(), about=lambda m: not self.signed(m) and not shared.isdisjoint(self._groups(m)))

    def set_record(self, member: MemberId, addresses: Sequence[Address]) -> None:
        """`member`'s newest signed record names these (usable) addresses: dial them first."""
        if self.table.set_record(member, addresses, self._clock()):
            self._wake.set()

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
        now = self._clock()
        if len(self._tasks) >= MAX_PENDING_DIALS:
            # Too much in flight: count it as a failure so the table backs off and retries.
            self._emit(self.table.dial_failed(target, now, self._rng.random()))
            return
        not_before = self._targets.get(target.address, (0, 0.0))[1]
        if now < not_before or target.address in self._inflight:
            self.table.dial_deferred(target, max(not_before, now + TARGET_BACKOFF_BASE))
            return
        wait = self._dial_budget.charge(1.0, now)
        if wait > 0:
            self._dial_budget.charge(-1.0, now)  # not spent: nothing was dialled
            self.table.dial_deferred(target, now + wait)
            return
        self.dials_started += 1
        self._inflight.add(target.address)
        self._spawn(self._dial(target))

    def _target_result(self, address: Address, ok: bool) -> None:
        self._inflight.discard(address)
        if ok:
            self._targets.pop(address, None)
            return
        failures = self._targets.get(address, (0, 0.0))[0] + 1
        if len(self._targets) >= MAX_TARGETS and address not in self._targets:
            self._targets.pop(next(iter(self._targets)))  # the oldest entry
        delay = backoff_delay(failures, self._rng.random(), TARGET_BACKOFF_BASE, TARGET_BACKOFF_CAP)
        self._targets[address] = (failures, self._clock() + delay)

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
            self._target_result(a, ok=False)
            self._emit(self.table.dial_failed(target, self._clock(), self._rng.random()))
            if target.member is not None and self.on_dial_failed is not None:
                self.on_dial_failed(target.member)
        else:
            self._target_result(a, ok=True)
            now = self._clock()
            real = DialTarget(a, link.remote, target.source)
            self._emit(self.table.linked_up(link.remote, a, target.source, now, dialed=real))
            if target.member is not None and link.remote != target.member:
                log.info("address %s announced for %s belongs to %s", a, target.member.short,
                         link.remote.short)
                self.table.forget_address(target.member, a)
                self._emit(self.table.dial_failed(target, now, self._rng.random()))
                if target.source is Source.RECORD and self.on_misclaim is not None:
                    self.on_misclaim(target.member, a)
        finally:
            self._inflight.discard(a)  # also when cancelled or failing otherwise
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
