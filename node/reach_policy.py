"""The decisions that keep a member reachable and reach members it cannot dial (docs/reach.md):
which relays to hold reservations at, which unlinked members to reach through a relay, which
relayed links to try to upgrade by hole punching, and what each link's path is called.

Pure: no I/O, no clock; the node's reach driver (node/reach.py) feeds it what it sees — its own
reachability, the members' signed address records, its live links — and carries out the
actions. Time comes in as monotonic seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from valuemesh.node.addresses import Network, on_networks
from valuemesh.protocol.identity import MemberId

# A member behind NAT keeps reservations at this many relays when the group has them, so that
# losing one relay partitions nobody: its records still name another.
RELAYS_WANTED = 2
# A relay that refused or whose link fell is not asked again for this long (doubling, capped).
RELAY_RETRY_S = 5.0
RELAY_RETRY_MAX_S = 300.0
# An unlinked member is dialled through a relay again after this long (doubling, capped).
VIA_RETRY_S = 2.0
VIA_RETRY_MAX_S = 60.0
# Dialled directly and failed this recently: go through a relay rather than wait.
DIRECT_FRESH_S = 30.0

PATHS = ("lan", "direct", "mapped", "punched", "relayed")


@dataclass(frozen=True, slots=True)
class Known:
    """What a member's signed address record says of reaching it."""

    member: MemberId
    public: bool  # it names a direct or mapped (publicly reachable) address
    lan: tuple[str, ...] = ()  # hosts of its lan addresses
    relays: tuple[MemberId, ...] = ()


@dataclass(frozen=True, slots=True)
class LinkView:
    """One live link as the policy needs it."""

    member: MemberId
    path: str
    via: MemberId | None = None
    rtt: float | None = None


@dataclass(frozen=True, slots=True)
class Reserve:
    relay: MemberId


@dataclass(frozen=True, slots=True)
class DialVia:
    target: MemberId
    relay: MemberId


@dataclass(frozen=True, slots=True)
class Punch:
    target: MemberId


Action = Reserve | DialVia | Punch


@dataclass(slots=True)
class _Backoff:
    until: float = 0.0
    failures: int = 0

    def fail(self, now: float, base: float, cap: float) -> None:
        self.failures += 1
        self.until = now + min(cap, base * 2 ** (self.failures - 1))

    def ok(self) -> None:
        self.failures, self.until = 0, 0.0


@dataclass
class ReachPolicy:
    """Per node: the relays it holds and the members it reaches through relays."""

    me: MemberId
    relays_wanted: int = RELAYS_WANTED
    reserved: set[MemberId] = field(default_factory=set)  # reservations the transport holds
    _relay_backoff: dict[MemberId, _Backoff] = field(default_factory=dict)
    _via_backoff: dict[MemberId, _Backoff] = field(default_factory=dict)
    _direct_failed: dict[MemberId, float] = field(default_factory=dict)
    _punched: set[MemberId] = field(default_factory=set)  # punch asked for (the puncher backs off)

    # -- what the node tells the policy --------------------------------------------------------
    def reserved_at(self, relay: MemberId) -> None:
        self.reserved.add(relay)
        self._relay_backoff.pop(relay, None)

    def relay_lost(self, relay: MemberId, now: float) -> None:
        """A reservation was refused, or its link fell: try another relay, this one later."""
        self.reserved.discard(relay)
        self._relay_backoff.setdefault(relay, _Backoff()).fail(now, RELAY_RETRY_S, RELAY_RETRY_MAX_S)

    def direct_failed(self, member: MemberId, now: float) -> None:
        self._direct_failed[member] = now

    def via_failed(self, member: MemberId, now: float) -> None:
        self._via_backoff.setdefault(member, _Backoff()).fail(now, VIA_RETRY_S, VIA_RETRY_MAX_S)

    def linked(self, member: MemberId) -> None:
        self._via_backoff.pop(member, None)
        self._direct_failed.pop(member, None)

    def unlinked(self, member: MemberId) -> None:
        self._punched.discard(member)

    def released(self, relay: MemberId) -> None:
        """We gave up the reservation at `relay` (reachable without it, or it was not public)."""
        self.reserved.discard(relay)

    def punch_over(self, member: MemberId) -> None:
        """A punch to `member` ended without a direct link: it may be asked for again (the
        puncher's own back-off answers at once while it lasts)."""
        self._punched.discard(member)

    # -- decisions ---------------------------------------------------------------------------
    def relays(self, public: bool | None, candidates: Iterable[LinkView], known: Mapping[MemberId, Known],
               now: float) -> tuple[list[Reserve], list[MemberId]]:
        """(reservations to ask for, reservations to give up). A publicly reachable node holds
        none; any other keeps `relays_wanted` at linked members whose records say they are
        public, preferring the ones it holds, then the shortest round trip, then by key."""
        if public:
            return [], sorted(self.reserved, key=lambda m: m.key)
        able = [v for v in candidates
                if v.member != self.me and v.path != "relayed" and (k := known.get(v.member)) is not None and k.public]
        able_ids = {v.member for v in able}
        give_up = sorted((r for r in self.reserved if r not in able_ids), key=lambda m: m.key)
        keep = len(self.reserved) - len(give_up)
        free = [v for v in able if v.member not in self.reserved
                and self._relay_backoff.get(v.member, _Backoff()).until <= now]
        free.sort(key=lambda v: (v.rtt if v.rtt is not None else math.inf, v.member.key))
        return [Reserve(v.member) for v in free[: max(0, self.relays_wanted - keep)]], give_up

    def via(self, wanted: Iterable[MemberId], linked: Mapping[MemberId, LinkView], known: Mapping[MemberId, Known],
            local: Sequence[Network], now: float) -> list[DialVia]:
        """Members to dial through one of their relays: not linked, naming relays, and either
        without a public or same-LAN address to dial, or dialled directly and failed lately;
        through the first of their relays this node is linked to directly."""
        out = []
        for member in wanted:
            k = known.get(member)
            if member == self.me or member in linked or k is None or not k.relays:
                continue
            if self._via_backoff.get(member, _Backoff()).until > now:
                continue
            dialable = k.public or any(on_networks(h, local) for h in k.lan)
            failed = now - self._direct_failed.get(member, -math.inf) < DIRECT_FRESH_S
            if dialable and not failed:
                continue
            relay = next((r for r in k.relays if r in linked and linked[r].path != "relayed" and r != self.me), None)
            if relay is not None:
                out.append(DialVia(member, relay))
        return out

    def punches(self, links: Iterable[LinkView]) -> list[Punch]:
        """Relayed links to try to upgrade. One end asks (the lower key: two attempts that cross
        would only spoil each other); the puncher's own back-off bounds the retries."""
        out = []
        for v in links:
            if v.path == "relayed" and v.member not in self._punched and self.me.key < v.member.key:
                self._punched.add(v.member)
                out.append(Punch(v.member))
        return out


def path_of(remote_ip: str, *, inbound: bool, dialled_kind: str | None, mapped: bool,
            local: Sequence[Network]) -> str:
    """The path of a link the transport made directly (not relayed, not punched): `lan` when
    the peer is on one of our networks; `mapped` when we dialled its mapped address, or it came
    in from outside through a port mapping of ours; else `direct`."""
    if on_networks(remote_ip, local):
        return "lan"
    if (not inbound and dialled_kind == "mapped") or (inbound and mapped):
        return "mapped"
    return "direct"
