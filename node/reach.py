"""The reach driver (docs/reach.md): carries out node/reach_policy.py's decisions with the
transport. It holds reservations at relays when this node is not reachable from outside and
names them in our signed address record; puts the router's port mapping in that record; dials
members it cannot dial directly through one of their relays; asks to punch a hole for each
relayed link it should upgrade, and answers the other end's requests; and names each link's
path (lan, direct, mapped, punched, relayed) for `status`, `peers` and `netcheck`.

The node calls `link_up`, `link_down`, `dial_failed` and `beat` (the tick loop's RESUBMIT_S
beat); a lost link or relay, a failed dial or a new mapping re-plans at once (`kick`), so a
member relayed through a relay that died is dialled through its other relay without waiting
for the beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

from valuemesh.node.addresses import Address, is_global
from valuemesh.node.addrspread import AddressSpread
from valuemesh.node.dialback import DialBack, plain_ip
from valuemesh.node.link import PeerLink
from valuemesh.node.loglimit import LogKinds
from valuemesh.node.messaging import Handlers, Send
from valuemesh.node.portmap import PortMapping
from valuemesh.node.punch import Punched, Puncher, into_transport
from valuemesh.node.reach_policy import DialVia, Known, LinkView, ReachPolicy, path_of
from valuemesh.node.transport import Transport
from valuemesh.protocol import messages as m
from valuemesh.protocol import punch
from valuemesh.protocol.addressrec import Kind
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId

log = logging.getLogger("valuemesh.reach")

KICK_DELAY_S = 0.02  # events within this long are planned for together
DIRECT_RETRY_S = 30.0  # a relayed public member that could not be dialled is tried again after this
MAPPING_WAIT_S = 10.0  # no punching until the router answered the mapping request, or this long
CHANNEL_DEPTH = 4  # punch messages queued per exchange (the protocol needs at most 2)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class _Channel:
    """Punch messages to and from one member over the relayed link to it (node/punch.py's
    PunchChannel): what arrives is queued by `deliver`; the link's end ends the channel."""

    def __init__(self, reach: Reach, peer: MemberId) -> None:
        self._reach = reach
        self._peer = peer
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(CHANNEL_DEPTH + 1)

    async def send(self, payload: bytes) -> None:
        link = self._reach._links.get(self._peer)
        if link is None or link.closed or link.path != "relayed":
            raise ConnectionError("the relayed link is gone")
        await self._reach._send(link, m.PunchMessage(payload))

    async def recv(self, timeout: float) -> bytes:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)  # every later recv sees the end too
            raise ConnectionError("the relayed link is gone")
        return item

    def deliver(self, data: bytes) -> bool:
        if self._queue.qsize() >= CHANNEL_DEPTH:
            return False
        self._queue.put_nowait(data)
        return True

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)


class Reach:
    """One node's reach: reservations, dials through relays, hole punching, path names."""

    def __init__(
        self, me: MemberId, transport: Transport, links: Mapping[MemberId, PeerLink], addrs: AddressSpread,
        dialback: DialBack, *, send: Send, wanted: Callable[[], Collection[MemberId]],
        groups: Callable[[MemberId], Collection[bytes]], spawn: Spawn, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = me
        self.policy = ReachPolicy(me)
        self._transport = transport
        self._links = links
        self._addrs = addrs
        self._dialback = dialback
        self._send = send
        self._wanted = wanted
        self._groups = groups
        self._spawn = spawn
        self._clock = clock
        self.puncher: Puncher | None = None
        self.mapping: PortMapping | None = None
        self._listen_port = 0
        self._reserving: set[MemberId] = set()
        self._dialling: set[MemberId] = set()
        self._direct_after: dict[MemberId, float] = {}  # relayed public members: dial again after
        self._sessions: dict[MemberId, _Channel] = {}
        self._published: tuple[MemberId, ...] = ()
        self._kicked: asyncio.TimerHandle | None = None
        self._mapping_wait_until = 0.0
        self._planning = False
        self.punches = {"punched": 0, "failed": 0, "answered": 0}
        self._log = LogKinds(log).log

    def register(self, handlers: Handlers) -> None:
        handlers.add(m.PunchMessage, self._on_punch)

    def start(self, listen: tuple[str, int]) -> None:
        """Once the transport listens: hole punching dials from its port."""
        self._listen_port = listen[1]
        try:
            self.puncher = Puncher(self.me, listen, self._candidates)
        except LocalError as e:
            log.warning("hole punching is off: %s", e.message)

    def close(self) -> None:
        if self._kicked is not None:
            self._kicked.cancel()
            self._kicked = None
        for ch in self._sessions.values():
            ch.end()

    # -- what the node tells us ----------------------------------------------------------------
    def expect_mapping(self) -> None:
        """The node asked its router for a port mapping: punch nobody until it answers (at most
        MAPPING_WAIT_S), or a member about to be mapped would be punched instead."""
        self._mapping_wait_until = self._clock() + MAPPING_WAIT_S

    def mapped(self, mapping: PortMapping) -> None:
        """node/portmap.py's listener: our router's mapping goes into our address record at
        once (not at the next re-sign), so members dial it rather than a relay."""
        self.mapping = mapping
        self._mapping_wait_until = 0.0
        self._addrs.set_mapped(Address(mapping.external_ip, mapping.external_port) if mapping.obtained else None)
        self._spawn(self._refresh())
        self.kick()

    async def _refresh(self) -> None:
        await self._addrs.refresh_own()

    def link_up(self, link: PeerLink) -> None:
        self.policy.linked(link.remote)
        self.kick()

    def link_down(self, link: PeerLink) -> None:
        if self._links.get(link.remote) is None:
            self.policy.unlinked(link.remote)
            ch = self._sessions.get(link.remote)
            if ch is not None:
                ch.end()
        self.kick()

    def dial_failed(self, member: MemberId) -> None:
        if member not in self._links:
            self.policy.direct_failed(member, self._clock())
            self.kick()

    def kick(self) -> None:
        """Plan again soon (once for all that happened meanwhile), not at the next beat."""
        if self._kicked is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the beat will do it
                self._kicked = asyncio.get_running_loop().call_later(KICK_DELAY_S, self._kick_now)

    def _kick_now(self) -> None:
        self._kicked = None
        self._spawn(self.beat())

    # -- what we know ----------------------------------------------------------------------------
    def public(self) -> bool | None:
        """Whether others can dial us: our record names an address dial-back found reachable
        (`direct`), or a mapping dial-back did not find unreachable. None until dial-back
        has answered once without that."""
        rec = self._addrs.own()
        for a in rec.addresses if rec is not None else ():
            if a.kind is Kind.DIRECT:
                return True
            if a.kind is Kind.MAPPED and self._addrs.reach.get(Address(a.host, a.port)) != "unreachable":
                return True
        return None if self._dialback.state.checked_at is None else False

    def _known(self) -> dict[MemberId, Known]:
        out = {}
        for rec in self._addrs.table.records():
            if rec.member != self.me:
                # A global address not yet confirmed by the member's dial-back counts: a
                # failed dial of it sends us through a relay (policy.direct_failed) anyway.
                out[rec.member] = Known(
                    rec.member, public=any(a.kind in (Kind.DIRECT, Kind.MAPPED) or is_global(a.host)
                                           for a in rec.addresses),
                    lan=tuple(a.host for a in rec.addresses if a.kind is Kind.LAN), relays=rec.relays)
        return out

    def _views(self) -> dict[MemberId, LinkView]:
        return {k: LinkView(k, lk.path, lk.via, lk.rtt) for k, lk in self._links.items() if not lk.closed}

    def path(self, link: PeerLink) -> str:
        """The link's path: `punched` and `relayed` as the transport made them; a direct
        link is `lan` to a peer on our networks, `mapped` through a port mapping (theirs we
        dialled, or ours they came in by), else `direct`."""
        if link.path in ("punched", "relayed") or link.addr[0] == "":
            return link.path
        kind = None if link.inbound else self._addrs.table.kind_of(link.remote, Address(*link.addr))
        return path_of(link.addr[0], inbound=link.inbound, dialled_kind=kind.value if kind else None,
                       mapped=self.mapping is not None and self.mapping.obtained, local=self._addrs.local())

    def _candidates(self) -> tuple[punch.Candidate, ...]:
        """Where the other end may reach us: the IPs peers observed our links come from, with
        our listen port (a port-preserving NAT maps it to itself); our mapping; our own
        record's addresses."""
        pairs: list[tuple[str, int]] = []
        for a in self._dialback.state.observed.values():
            ip = plain_ip(a.host)
            if ip is not None:
                pairs.append((ip, self._listen_port))
        if self.mapping is not None and self.mapping.obtained:
            pairs.append((self.mapping.external_ip, self.mapping.external_port))
        rec = self._addrs.own()
        pairs += [(a.host, a.port) for a in (rec.addresses if rec is not None else ())]
        good: list[punch.Candidate] = []
        for host, port in pairs:
            with contextlib.suppress(LocalError):
                good += punch.candidates([(host, port)])
        return punch.candidates((c.host, c.port) for c in good)

    def to_json(self) -> dict[str, object]:
        return {
            "public": self.public(),
            "reservations": [str(r) for r in self._transport.reservations],
            "relaying_for": [str(r) for r in self._transport.relaying.relayed_for],
            "mapping": self.mapping.to_json() if self.mapping is not None else None,
            "punches": dict(self.punches),
        }

    # -- planning ----------------------------------------------------------------------------
    async def beat(self) -> None:
        """Compare what we hold with what the policy wants and start what is missing."""
        if self._planning:
            return
        self._planning = True
        try:
            self._plan()
        finally:
            self._planning = False

    def _plan(self) -> None:
        now = self._clock()
        views = self._views()
        known = self._known()
        held = set(self._transport.reservations)
        for r in list(self.policy.reserved):
            if r not in held and r not in self._reserving:
                self.policy.relay_lost(r, now)  # its link fell, or it forgot us
        reserve, give_up = self.policy.relays(self.public(), views.values(), known, now)
        for r in give_up:
            self._transport.release(r)
            self.policy.released(r)
        for act in reserve:
            link = self._links.get(act.relay)
            if link is not None and act.relay not in self._reserving:
                self.policy.reserved_at(act.relay)  # asked for: counted until it answers
                self._reserving.add(act.relay)
                self._spawn(self._reserve(link))
        self._publish()
        for via in self.policy.via(self._wanted(), views, known, self._addrs.local(), now):
            if via.target not in self._dialling:
                self._dialling.add(via.target)
                self._spawn(self._via(via))
        # A relayed member whose record names a public or mapped address is dialled there (the
        # direct link replaces the relayed one), never punched; nor do we punch while public
        # ourselves: the other end dials us. docs/reach.md §5: such pairs get a direct path.
        me_public = self.public()
        for k, v in views.items():
            if v.path == "relayed" and (kn := known.get(k)) is not None and kn.public and k not in self._dialling \
                    and now >= self._direct_after.get(k, 0.0):
                self._dialling.add(k)
                self._spawn(self._direct(k))
        if self.puncher is not None and now >= self._mapping_wait_until:
            for p in self.policy.punches(v for v in views.values() if self._groups(v.member) and not me_public
                                         and not getattr(known.get(v.member), "public", False)):
                # One exchange at a time: two peers behind one router share its address and our
                # listen port's 4-tuple towards it, so two punches at once spoil each other.
                if self._sessions or self.puncher.backoff.wait(p.target, now):
                    self.policy.punch_over(p.target)
                    continue
                ch = self._sessions[p.target] = _Channel(self, p.target)
                self._spawn(self._upgrade(p.target, ch))

    def _publish(self) -> None:
        """Name in our record the relays that hold a reservation for us now."""
        now = tuple(sorted(self._transport.reservations, key=lambda k: k.key))
        if now != self._published:
            self._published = now
            self._addrs.set_relays(now)

    async def _reserve(self, link: PeerLink) -> None:
        relay = link.remote
        try:
            await self._transport.reserve(link)
        except Exception as e:  # refused, unreachable, the link closed meanwhile
            self.policy.relay_lost(relay, self._clock())
            self._log("reserve", "no reservation at relay %s: %s", relay.short, e)
        else:
            log.info("reachable through relay %s", relay.short)
        finally:
            self._reserving.discard(relay)
        self._publish()

    async def _via(self, via: DialVia) -> None:
        try:
            link = await self._transport.dial_via(via.relay, via.target)
        except Exception as e:
            self.policy.via_failed(via.target, self._clock())
            self._log("via", "could not reach %s through relay %s: %s", via.target.short, via.relay.short, e)
        else:
            log.info("reached %s through relay %s (path %s)", via.target.short, via.relay.short, link.path)
        finally:
            self._dialling.discard(via.target)

    async def _direct(self, member: MemberId) -> None:
        """Dial a relayed member at its record's public addresses; the link replaces the relayed one."""
        try:
            for a in self._addrs.table.usable(member, self._addrs.local()):
                with contextlib.suppress(Exception):  # unreachable, refused, another key: try the next
                    await self._transport.connect(a.host, a.port, expect=member)
                    log.info("replaced the relayed link to %s by a direct one to %s", member.short, a)
                    self._direct_after.pop(member, None)
                    return
            self._direct_after[member] = self._clock() + DIRECT_RETRY_S
        finally:
            self._dialling.discard(member)

    # -- hole punching ---------------------------------------------------------------------------
    async def _upgrade(self, peer: MemberId, ch: _Channel) -> None:
        assert self.puncher is not None
        try:
            got = await self.puncher.upgrade(ch, peer, into_transport(self._transport, peer))
            self._punched(peer, got)
        finally:
            if self._sessions.get(peer) is ch:
                del self._sessions[peer]
            self.policy.punch_over(peer)

    async def _answer(self, peer: MemberId, ch: _Channel, connect: bytes) -> None:
        assert self.puncher is not None
        self.punches["answered"] += 1
        try:
            self._punched(peer, await self.puncher.answer(ch, peer, connect, into_transport(self._transport, peer)))
        finally:
            if self._sessions.get(peer) is ch:
                del self._sessions[peer]

    def _punched(self, peer: MemberId, got: object) -> None:
        if isinstance(got, Punched):
            self.punches["punched"] += 1
            log.info("upgraded the relayed link to %s to a punched one (%s:%d)", peer.short,
                     got.remote.host, got.remote.port)
        else:
            self.punches["failed"] += 1
            self._log("punch", "staying relayed with %s: %s", peer.short, getattr(got, "reason", got))

    async def _on_punch(self, link: PeerLink, msg: m.PunchMessage) -> None:
        """A punch message from the other end of a relayed link: part of an exchange under
        way, or a punch-connect that opens one (node/punch.py budgets how often we answer)."""
        peer = link.remote
        if self.puncher is None or link.path != "relayed":  # a link upgraded meanwhile: nothing to do
            self._log("punch-direct", "ignored a hole-punch message from %s on a %s link", peer.short, link.path)
            return
        if not self._groups(peer):
            self._log("punch-stranger", "ignored a hole-punch message from %s: it shares no constellation with us",
                      peer.short)
            return
        parsed = punch.decode(msg.data)  # PunchError: the peer is charged
        ch = self._sessions.get(peer)
        if ch is not None:
            if not ch.deliver(msg.data):
                self._log("punch-flood", "dropped a hole-punch message from %s: too many queued", peer.short)
            return
        if not isinstance(parsed, punch.Connect):
            return  # a punch-sync of an exchange that ended here (timed out): harmless
        if self._sessions:  # busy punching another peer: this one's try times out and backs off
            self._log("punch-busy", "not answering a hole-punch request from %s: punching another member",
                      peer.short)
            return
        ch = self._sessions[peer] = _Channel(self, peer)
        self._spawn(self._answer(peer, ch, msg.data))
