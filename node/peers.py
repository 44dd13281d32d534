"""The peer table: which members we know, how to reach them, and whether they are alive.

Pure logic with no I/O: SWIM liveness with incarnations and refutation, Lifeguard local
health and dialing back-off with jitter, on top of the `AddressBook` (node/addressbook.py)
that holds the addresses and merges peer exchange. Time and randomness come in.

Theory of operation
-------------------
The node feeds the table *inputs* (an address was learnt, a dial failed, a link opened or
closed, an authenticated frame or ack arrived, a peer gossiped a liveness rumour) and calls
`tick(now)` whenever `next_deadline()` passes; `tick` returns *actions* (dial this address,
ping this member, ask these helpers to ping it) and *events* (this member is suspect, dead,
alive again; we must refute a rumour about ourselves) for the node to carry out and gossip.

Liveness follows SWIM (Das, Gupta, Motivala 2002) with Lifeguard (Dadgar et al. 2018):

- one probe at a time, round-robin over a shuffled list of linked members; no ack within
  the probe timeout starts an indirect probe through up to `indirect_probes` helpers; no ack
  by the end of the probe period makes the target *suspect*;
- a suspect becomes *dead* when its suspicion timeout ends; the timeout starts long and
  shrinks with every independent confirmation from other reporters (Lifeguard's dynamic
  suspicion), never below `suspicion_alpha * log10(n) * probe_interval`;
- any authenticated word from the member itself, or its announcement of a higher
  incarnation, makes it *alive* again; a rumour about ourselves is refuted by a higher
  incarnation of our own;
- our *local health* rises when our own probes go unanswered or we must refute, and falls
  when probes succeed; the probe interval and timeout stretch by `1 + health`, so a node
  that is itself slow does not accuse healthy peers.

Suspicion and death only *propose*: nothing here ever removes a member. A dead member stays
in the table, is still dialed with capped back-off, and comes back on its first word. Only
entries learnt second-hand that were never reached are ever evicted, and only to bound memory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from valuemesh.node.addressbook import (
    MAX_EXCHANGE_ENTRIES,
    MAX_PEERS,
    SOURCE_RANK,
    AddressBook,
    MemberRecord,
    by_key,
)
from valuemesh.node.addresses import Address, ExchangeEntry, Source
from valuemesh.node.peer_actions import (
    SNAPSHOT_VERSION,
    Action,
    AddressView,
    Dial,
    DialTarget,
    Died,
    PeerView,
    Ping,
    PingReq,
    Refute,
    Revived,
    State,
    Suspected,
)
from valuemesh.protocol.errors import LocalError, RemoteError
from valuemesh.protocol.identity import MemberId

# SWIM / Lifeguard timers, in seconds. Tests pass a shorter `Timers`.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 0.5
INDIRECT_PROBES = 3
SUSPICION_ALPHA = 4.0
SUSPICION_BETA = 6.0
SUSPICION_CONFIRMATIONS = 3
MAX_LOCAL_HEALTH = 8

# Dialing back-off: base * 2**attempts, capped, with "equal jitter" so that a crowd of
# nodes restarting together does not dial in lockstep yet never retries instantly.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 300.0
# A link that closes is redialed after this delay rather than at once, so that a peer
# that accepts and immediately drops us cannot make us spin.
RECONNECT_DELAY = 0.25
# Consecutive dial failures of a member that is not linked before we suspect it.
DIAL_FAILURES_TO_SUSPECT = 3

# How far above our known incarnation a third party may move a member; the member itself
# may announce any higher number. Stops one liar from pinning a member "alive" forever.
MAX_THIRD_PARTY_INCARNATION_STEP = 16
MAX_INCARNATION = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Timers:
    """Every timer the table uses; defaults are the module constants above."""

    probe_interval: float = PROBE_INTERVAL
    probe_timeout: float = PROBE_TIMEOUT
    indirect_probes: int = INDIRECT_PROBES
    suspicion_alpha: float = SUSPICION_ALPHA
    suspicion_beta: float = SUSPICION_BETA
    suspicion_confirmations: int = SUSPICION_CONFIRMATIONS
    max_local_health: int = MAX_LOCAL_HEALTH
    backoff_base: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP
    reconnect_delay: float = RECONNECT_DELAY
    dial_failures_to_suspect: int = DIAL_FAILURES_TO_SUSPECT

    def __post_init__(self) -> None:
        if not (0 < self.probe_timeout < self.probe_interval):
            raise LocalError("The probe timeout must be positive and shorter than the interval.")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise LocalError("The back-off base must be positive and no larger than its cap.")
        if self.suspicion_alpha <= 0 or self.suspicion_beta < 1:
            raise LocalError("Suspicion alpha must be positive and beta at least 1.")
        if self.indirect_probes < 0 or self.max_local_health < 0:
            raise LocalError("Indirect probes and maximum local health cannot be negative.")
        if self.suspicion_confirmations < 1 or self.dial_failures_to_suspect < 1:
            raise LocalError("Suspicion confirmations and dial failures must be at least 1.")


@dataclass(slots=True)
class _Probe:
    target: MemberId
    number: int
    indirect_at: float
    give_up_at: float
    indirect_sent: bool = False


def backoff_delay(failures: int, jitter: float, base: float, cap: float) -> float:
    """Delay before the next dial after `failures` consecutive failures (>= 1).

    Equal jitter: half the exponential step is fixed, half is random, so the delay lies in
    [step/2, step] with step = min(cap, base * 2**(failures-1)).
    """
    if not 0.0 <= jitter < 1.0:
        raise LocalError("Jitter must be a number in [0, 1).")
    step = min(cap, base * 2.0 ** min(max(failures - 1, 0), 62))
    return step / 2 + jitter * step / 2


class PeerTable(AddressBook):
    """Membership view of one node: the address book plus SWIM liveness and dialing.
    Not thread-safe; one asyncio task drives it."""

    def __init__(
        self,
        me: MemberId,
        rng: random.Random,
        *,
        timers: Timers | None = None,
        now: float = 0.0,
        max_peers: int = MAX_PEERS,
    ) -> None:
        super().__init__(me, max_peers=max_peers)
        self.incarnation = 0
        self.timers = timers or Timers()
        self.local_health = 0
        self._rng = rng
        self._probe_order: list[MemberId] = []
        self._probe: _Probe | None = None
        self._probe_counter = 0
        self._next_probe_at = now + self.timers.probe_interval

    # -- reading ---------------------------------------------------------------------------

    def state(self, member: MemberId) -> State | None:
        p = self._peers.get(member)
        return None if p is None else p.state

    def incarnation_of(self, member: MemberId) -> int | None:
        p = self._peers.get(member)
        return None if p is None else p.incarnation

    def linked(self) -> list[MemberId]:
        return sorted((m for m, p in self._peers.items() if p.link is not None), key=by_key)

    def probe_interval(self) -> float:
        return self.timers.probe_interval * (1 + self.local_health)

    def probe_timeout(self) -> float:
        return self.timers.probe_timeout * (1 + self.local_health)

    def suspicion_bounds(self) -> tuple[float, float]:
        """(min, max) suspicion timeout for the current group size, as in Lifeguard."""
        n = max(len(self._peers) + 1, 1)
        low = self.timers.suspicion_alpha * max(1.0, math.log10(n)) * self.timers.probe_interval
        return low, low * self.timers.suspicion_beta

    # -- peer exchange ---------------------------------------------------------------------------

    def exchange_offer(
        self, to: MemberId, now: float, limit: int = MAX_EXCHANGE_ENTRIES,
        about: Callable[[MemberId], bool] | None = None,
    ) -> list[ExchangeEntry]:
        """Addresses worth telling `to` about: alive members, at addresses we linked over, and
        the listen address a member linked to us *now* gave for the very IP its link comes
        from (a member that dialed us: we never dialed it, but its key is proven on the link,
        the IP is the one we see, and only the port is its own word; whoever dials it does so
        expecting that key, and keeps it only once a handshake proved it).

        An mDNS claim or a second-hand address is not passed on, so neither a liar's
        addresses nor its key claims spread through us. `about`, if given, says which members
        `to` may hear of; it is applied before the offer is cut to `limit`, so linked keys it
        may not hear of (strangers, say) never crowd out the ones it may.
        """
        offer: list[ExchangeEntry] = []
        for m in sorted(self._peers, key=by_key):
            p = self._peers[m]
            if m == to or p.state is not State.ALIVE or (about is not None and not about(m)):
                continue
            for a, i in p.addresses.items():
                if not a.is_ip:
                    continue
                if i.last_ok is not None:
                    offer.append(ExchangeEntry(m, a, max(0.0, now - i.last_ok)))
                elif (p.link is not None and p.link_source is Source.INBOUND and i.source is Source.INBOUND
                      and a.host == p.link.host and a != p.link):
                    offer.append(ExchangeEntry(m, a, 0.0))
        offer.sort(key=lambda e: (e.age, e.member.key, e.address))
        return offer[: max(0, min(limit, MAX_EXCHANGE_ENTRIES))]

    # -- links and dialing -----------------------------------------------------------------------

    def dial_failed(self, target: DialTarget, now: float, jitter: float) -> list[Action]:
        """A dial (connect or handshake) to `target` failed; schedule the next with back-off."""
        if target.member is None:
            anon = self._anonymous.get(target.address)
            if anon is not None:
                anon.dialing = False
                anon.failures += 1
                anon.next_dial = now + self._backoff(anon.failures, jitter)
            return []
        p = self._peers.get(target.member)
        if p is None:
            return []
        p.dialing = False
        if p.link is not None:
            return []
        p.dial_failures += 1
        p.next_dial = now + self._backoff(p.dial_failures, jitter)
        if p.state is State.ALIVE and p.dial_failures >= self.timers.dial_failures_to_suspect:
            return self._suspect(p, p.incarnation, None, now)
        return []

    def dial_deferred(self, target: DialTarget, until: float) -> None:
        """A dial the node did not carry out (over its dial rate): try again at `until`,
        without counting a failure against the member."""
        if target.member is None:
            anon = self._anonymous.get(target.address)
            if anon is not None:
                anon.dialing = False
                anon.next_dial = max(anon.next_dial, until)
            return
        p = self._peers.get(target.member)
        if p is not None:
            p.dialing = False
            p.next_dial = max(p.next_dial, until)

    def linked_up(
        self,
        member: MemberId,
        address: Address,
        source: Source,
        now: float,
        *,
        dialed: DialTarget | None = None,
        listen: Address | None = None,
    ) -> list[Action]:
        """An authenticated link to `member` opened, by our dial or inbound.

        `dialed` is the target we dialed (resolves a bootstrap address to its member);
        `listen` is the address the peer says it listens on, if it told us.
        """
        if member == self.me:
            # We dialed ourselves (our own bootstrap or mDNS echo): forget that address.
            if dialed is not None:
                self._anonymous.pop(dialed.address, None)
            return []
        if dialed is not None:
            # However the link came about, an anonymous (bootstrap) entry for this address
            # is now resolved to `member` and keeps its more trusted source.
            anon = self._anonymous.pop(dialed.address, None)
            if anon is not None and SOURCE_RANK[anon.source] < SOURCE_RANK[source]:
                source = anon.source
        peer = self._peers.get(member) or self._admit(member, now, evict=True)
        if peer is None:
            return []
        if dialed is not None:
            self._confirm(peer, dialed.address, source, now, reached=True)
        # An inbound link's remote port is ephemeral; only the port the peer says it
        # listens on is worth dialing later, and we have not reached it ourselves yet.
        if listen is not None and listen != address:
            self._confirm(peer, listen, Source.INBOUND, now, reached=False)
        peer.link = address
        peer.link_source = source
        peer.dialing = False
        peer.dial_failures = 0
        return self._heard_from(peer, None, now)

    def linked_down(self, member: MemberId, now: float) -> None:
        p = self._peers.get(member)
        if p is None:
            return
        p.link = None
        p.link_source = None
        p.dialing = False
        # A running probe goes on: a closed link is not proof that the member is gone.
        p.next_dial = now + self.timers.reconnect_delay

    # -- liveness inputs -------------------------------------------------------------------------

    def heard_from(
        self, member: MemberId, now: float, incarnation: int | None = None
    ) -> list[Action]:
        """An authenticated frame, ack or relayed ack from `member` itself arrived."""
        p = self._peers.get(member)
        if p is None or member == self.me:
            return []
        if incarnation is not None:
            _check_incarnation(incarnation)
        return self._heard_from(p, incarnation, now)

    def rumour(
        self, reporter: MemberId, subject: MemberId, state: State, incarnation: int, now: float
    ) -> list[Action]:
        """A linked peer gossiped that `subject` is `state` at `incarnation`.

        A third party's word starts our own suspicion at most: only our own timer declares
        a member dead, so one hostile peer cannot kill anyone in our view.
        """
        _check_incarnation(incarnation)
        if not isinstance(state, State):
            raise RemoteError("A liveness rumour named an unknown state.")
        if subject == self.me:
            if state is State.ALIVE or incarnation < self.incarnation:
                return []
            self.incarnation = min(incarnation + 1, MAX_INCARNATION)
            self._health(+1)
            return [Refute(self.incarnation)]
        if subject == reporter:
            # A member speaking for itself is the best evidence there is.
            return self.heard_from(subject, now, incarnation if state is State.ALIVE else None)
        p = self._peers.get(subject)
        if p is None:
            return []
        if incarnation > p.incarnation + MAX_THIRD_PARTY_INCARNATION_STEP:
            return []
        if state is State.ALIVE:
            if incarnation > p.incarnation:
                p.incarnation = incarnation
                if p.state is not State.ALIVE:
                    return self._set_alive(p, now)
            return []
        # SUSPECT or DEAD from a third party.
        if incarnation < p.incarnation:
            return []
        if p.state is State.ALIVE:
            return self._suspect(p, incarnation, reporter, now)
        if p.state is State.SUSPECT and incarnation >= p.incarnation:
            p.incarnation = incarnation
            if reporter not in p.confirmations:
                p.confirmations.add(reporter)
                self._rescale_suspicion(p)
        return []

    def announce_self(self) -> int:
        """Our incarnation, for the node to put in pings, acks and alive gossip."""
        return self.incarnation

    # -- the clock -------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time at which `tick` has something to do."""
        times = [self._next_probe_at]
        if self._probe is not None:
            times.append(self._probe.give_up_at if self._probe.indirect_sent
                         else self._probe.indirect_at)
        for p in self._peers.values():
            if p.suspect_deadline is not None:
                times.append(p.suspect_deadline)
            if p.link is None and not p.dialing and p.addresses:
                times.append(p.next_dial)
        for a in self._anonymous.values():
            if not a.dialing:
                times.append(a.next_dial)
        return min(times)

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        out += self._tick_probe(now)
        for p in list(self._peers.values()):
            if p.suspect_deadline is not None and now >= p.suspect_deadline:
                p.state = State.DEAD
                p.state_since = now
                p.suspect_deadline = None
                p.suspect_start = None
                p.confirmations.clear()
                out.append(Died(p.member, p.incarnation))
        for p in self._peers.values():
            if p.link is None and not p.dialing and p.addresses and now >= p.next_dial:
                addr, src = self._pick_address(p)
                p.dialing = True
                out.append(Dial(DialTarget(addr, p.member, src)))
        for a, anon in self._anonymous.items():
            if not anon.dialing and now >= anon.next_dial:
                anon.dialing = True
                out.append(Dial(DialTarget(a, None, anon.source)))
        return out

    # -- snapshot --------------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[PeerView]:
        views = []
        for m in sorted(self._peers, key=by_key):
            p = self._peers[m]
            addrs = tuple(
                AddressView(
                    a.host, a.port, i.source.value, max(0.0, now - i.observed),
                    None if i.last_ok is None else max(0.0, now - i.last_ok),
                )
                for a, i in sorted(p.addresses.items(), key=lambda kv: (-kv[1].observed, kv[0]))
            )
            via = None
            if p.link is not None:
                info = p.addresses.get(p.link)
                src = p.link_source.value if p.link_source is not None else Source.INBOUND.value
                via = AddressView(
                    p.link.host, p.link.port, src,
                    0.0 if info is None else max(0.0, now - info.observed),
                    0.0 if info is None or info.last_ok is None else max(0.0, now - info.last_ok),
                )
            dial_in = None if p.link is not None or not p.addresses else max(0.0, p.next_dial - now)
            views.append(PeerView(
                p.text, p.state.value, p.incarnation, max(0.0, now - p.state_since),
                p.link is not None, via, addrs,
                dial_in, p.dial_failures,
            ))
        return views

    def snapshot_json(self, now: float) -> dict[str, object]:
        """The versioned JSON document the local API serves for the peer list."""
        return {
            "v": SNAPSHOT_VERSION,
            "incarnation": self.incarnation,
            "local_health": self.local_health,
            "peers": [v.to_json() for v in self.snapshot(now)],
            "bootstrap_pending": [str(a) for a in sorted(self._anonymous)],
        }

    # -- internals -------------------------------------------------------------------------------

    def _backoff(self, failures: int, jitter: float) -> float:
        return backoff_delay(failures, jitter, self.timers.backoff_base, self.timers.backoff_cap)

    def _health(self, delta: int) -> None:
        self.local_health = max(0, min(self.timers.max_local_health, self.local_health + delta))

    def _heard_from(self, p: MemberRecord, incarnation: int | None, now: float) -> list[Action]:
        if self._probe is not None and self._probe.target == p.member:
            self._probe = None
            self._health(-1)
        if incarnation is not None and incarnation > p.incarnation:
            p.incarnation = incarnation
        if p.state is not State.ALIVE:
            return self._set_alive(p, now)
        return []

    def _set_alive(self, p: MemberRecord, now: float) -> list[Action]:
        p.state = State.ALIVE
        p.state_since = now
        p.suspect_deadline = None
        p.suspect_start = None
        p.confirmations.clear()
        if p.link is None and not p.dialing:
            p.dial_failures = 0
            p.next_dial = min(p.next_dial, now)
        return [Revived(p.member, p.incarnation)]

    def _suspect(
        self, p: MemberRecord, incarnation: int, reporter: MemberId | None, now: float
    ) -> list[Action]:
        p.state = State.SUSPECT
        p.state_since = now
        p.incarnation = max(p.incarnation, incarnation)
        p.suspect_start = now
        p.confirmations = {reporter} if reporter is not None else set()
        self._rescale_suspicion(p)
        return [Suspected(p.member, p.incarnation)]

    def _rescale_suspicion(self, p: MemberRecord) -> None:
        # Lifeguard: timeout = max - (max - min) * log(C + 1) / log(K + 1), floored at min.
        assert p.suspect_start is not None
        low, high = self.suspicion_bounds()
        k = self.timers.suspicion_confirmations
        c = min(len(p.confirmations), k)
        timeout = max(low, high - (high - low) * math.log(c + 1) / math.log(k + 1))
        p.suspect_deadline = p.suspect_start + timeout

    def _tick_probe(self, now: float) -> list[Action]:
        out: list[Action] = []
        probe = self._probe
        if probe is not None:
            if not probe.indirect_sent and now >= probe.indirect_at:
                probe.indirect_sent = True
                helpers = self._helpers(probe.target)
                if helpers:
                    out.append(PingReq(probe.target, helpers, probe.number))
            if probe.indirect_sent and now >= probe.give_up_at:
                self._probe = None
                self._health(+1)
                p = self._peers.get(probe.target)
                if p is not None and p.state is State.ALIVE:
                    out += self._suspect(p, p.incarnation, None, now)
        if self._probe is None and now >= self._next_probe_at:
            self._next_probe_at = now + self.probe_interval()
            target = self._next_target()
            if target is not None:
                self._probe_counter += 1
                self._probe = _Probe(
                    target, self._probe_counter,
                    indirect_at=now + self.probe_timeout(),
                    give_up_at=now + self.probe_interval(),
                )
                out.append(Ping(target, self._probe_counter))
        return out

    def _next_target(self) -> MemberId | None:
        # Randomised round-robin (SWIM §4.3): every linked member is probed once per lap,
        # so a failure is noticed within a bounded number of periods.
        for _ in range(2):
            while self._probe_order:
                m = self._probe_order.pop()
                p = self._peers.get(m)
                if p is not None and p.link is not None and p.state is not State.DEAD:
                    return m
            self._probe_order = [
                m for m, p in self._peers.items() if p.link is not None and p.state is not State.DEAD
            ]
            self._probe_order.sort(key=by_key)
            self._rng.shuffle(self._probe_order)
        return None

    def _helpers(self, target: MemberId) -> tuple[MemberId, ...]:
        pool = sorted(
            (m for m, p in self._peers.items()
             if m != target and p.link is not None and p.state is State.ALIVE),
            key=by_key,
        )
        k = min(self.timers.indirect_probes, len(pool))
        return tuple(self._rng.sample(pool, k)) if k else ()


def _check_incarnation(incarnation: int) -> None:
    if (
        not isinstance(incarnation, int)
        or isinstance(incarnation, bool)
        or not 0 <= incarnation <= MAX_INCARNATION
    ):
        raise RemoteError("An incarnation number must be a whole number from 0 to 2**63-1.")
