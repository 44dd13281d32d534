"""The peer table's address book: which members we know, at which addresses and learnt how,
which address to dial next, and how peer exchange may add to it without flooding memory.

Pure logic with no I/O; `PeerTable` in `peers` builds SWIM liveness on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from valuemesh.node.addresses import Address, ExchangeEntry, Source
from valuemesh.node.peer_actions import MergeReport, SavedAddress, State
from valuemesh.protocol.errors import LocalError, RemoteError
from valuemesh.protocol.identity import MemberId

# Bounds against memory growth from hostile or chatty peers.
MAX_PEERS = 4096
MAX_ADDRESSES_PER_PEER = 8
MAX_ANONYMOUS = 256
MAX_EXCHANGE_ENTRIES = 64
MAX_NEW_PEERS_PER_EXCHANGE = 16
MAX_EXCHANGE_AGE = 3600.0


# Preference when choosing which address to dial first (lower is tried first).
SOURCE_RANK = {
    Source.RECORD: -1,  # the member's own signed word, and the newest it gave
    Source.BOOTSTRAP: 0,
    Source.INVITE: 1,
    Source.MDNS: 2,
    Source.INBOUND: 3,
    Source.EXCHANGE: 4,
}


@dataclass(slots=True)
class AddressRecord:
    """What the book knows about one address of one member."""

    source: Source
    observed: float  # last time anyone (us, or the exchanging peer) confirmed it
    last_ok: float | None = None  # last time *we* opened a link over it


@dataclass(slots=True)
class MemberRecord:
    """One known member: its addresses, its link and dialing state, and its liveness
    (the fields `PeerTable` keeps: state, incarnation, suspicion)."""

    member: MemberId
    state: State
    incarnation: int
    state_since: float
    addresses: dict[Address, AddressRecord] = field(default_factory=dict)
    link: Address | None = None  # address of the open link
    link_source: Source | None = None
    dialing: bool = False
    dial_failures: int = 0
    next_dial: float = 0.0
    suspect_deadline: float | None = None
    suspect_start: float | None = None
    confirmations: set[MemberId] = field(default_factory=set)
    text: str = ""  # str(member), cached: base32 with a checksum is slow at 4096 peers

    @property
    def first_hand(self) -> bool:
        return any(i.source is not Source.EXCHANGE for i in self.addresses.values())

    @property
    def ever_reached(self) -> bool:
        return self.link is not None or any(i.last_ok is not None for i in self.addresses.values())


@dataclass(slots=True)
class AnonymousRecord:
    """An operator-given address whose member we learn only once we link over it."""

    source: Source
    dialing: bool = False
    failures: int = 0
    next_dial: float = 0.0


def by_key(m: MemberId) -> bytes:
    # Sorting by raw key bytes is what MemberId's ordering means, without the cost of the
    # generated dataclass comparisons (which dominated snapshots of thousands of peers).
    return m.key


class AddressBook:
    """The members a node knows and where to reach them. Not thread-safe; one task drives it."""

    def __init__(self, me: MemberId, *, max_peers: int = MAX_PEERS) -> None:
        self.me = me
        self._max_peers = max_peers
        self._peers: dict[MemberId, MemberRecord] = {}
        self._anonymous: dict[Address, AnonymousRecord] = {}

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, member: object) -> bool:
        return member in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def members(self) -> list[MemberId]:
        return sorted(self._peers, key=by_key)

    def addresses(self, member: MemberId) -> dict[Address, Source]:
        p = self._peers.get(member)
        return {} if p is None else {a: i.source for a, i in p.addresses.items()}

    def anonymous(self) -> list[Address]:
        return sorted(self._anonymous)

    # -- learning addresses ------------------------------------------------------------------

    def add_address(self, member: MemberId, address: Address, source: Source, now: float) -> bool:
        """Record a first-hand address (mDNS, bootstrap, invite, inbound). False if refused."""
        if source is Source.EXCHANGE:
            raise LocalError("Exchanged addresses go through merge_exchange, not add_address.")
        if member == self.me:
            return False
        peer = self._peers.get(member) or self._admit(member, now, evict=True)
        if peer is None:
            return False
        info = peer.addresses.get(address)
        if info is None:
            if not self._make_room(peer, first_hand=True):
                return False
            peer.addresses[address] = AddressRecord(source, now)
            # A new address is a reason to try at once; a repeated sighting of a known one
            # is not, or a re-announcing but unreachable node would defeat the back-off.
            if peer.link is None and not peer.dialing:
                peer.next_dial = min(peer.next_dial, now)
        else:
            info.observed = max(info.observed, now)
            if SOURCE_RANK[source] < SOURCE_RANK[info.source]:
                info.source = source
        return True

    def add_anonymous(self, address: Address, source: Source, now: float) -> bool:
        """An address whose member we learn only once we connect (bootstrap)."""
        if source is Source.EXCHANGE or source is Source.INBOUND:
            raise LocalError("Only operator-given addresses may be added without a member id.")
        for p in self._peers.values():
            if address in p.addresses and p.addresses[address].last_ok is not None:
                return True  # already resolved to a member and reachable
        if address in self._anonymous:
            return True
        if len(self._anonymous) >= MAX_ANONYMOUS:
            return False
        self._anonymous[address] = AnonymousRecord(source, next_dial=now)
        return True

    def restore(
        self, member: MemberId, address: Address, source: Source, age: float, now: float, *,
        reached: bool,
    ) -> bool:
        """Reload an address this node saved itself (from its store) before a restart.

        Unlike `add_address` any source is allowed: the record is our own, not a peer's.
        `age` is seconds since it was last confirmed; `reached` whether we ever linked over it.
        """
        if member == self.me or not math.isfinite(age):
            return False
        peer = self._peers.get(member) or self._admit(member, now, evict=True)
        if peer is None:
            return False
        observed = now - max(0.0, age)
        info = peer.addresses.get(address)
        if info is None:
            if not self._make_room(peer, first_hand=source is not Source.EXCHANGE,
                                   observed=observed):
                return False
            info = peer.addresses[address] = AddressRecord(source, observed)
        info.observed = max(info.observed, observed)
        if reached:
            info.last_ok = observed if info.last_ok is None else max(info.last_ok, observed)
        if SOURCE_RANK[source] < SOURCE_RANK[info.source]:
            info.source = source
        return True

    def saved(self, now: float) -> list[SavedAddress]:
        """Every address worth keeping across a restart, for the node to write to its store.

        An address only heard of in peer exchange is kept only once a handshake over it
        proved the named key there: a peer's word alone does not outlive this process.
        """
        out = []
        for m in sorted(self._peers, key=by_key):
            p = self._peers[m]
            for a, i in sorted(p.addresses.items()):
                if i.source in (Source.EXCHANGE, Source.RECORD) and i.last_ok is None:
                    continue  # a record's addresses are kept with the record itself
                out.append(SavedAddress(
                    m, a, i.source, max(0.0, now - i.observed), i.last_ok is not None,
                    p.dial_failures,
                ))
        return out

    def merge_exchange(
        self, sender: MemberId, sender_address: Address | None, entries: Sequence[ExchangeEntry],
        now: float,
    ) -> MergeReport:
        """Merge addresses a linked peer offered us; raises RemoteError, changing nothing,
        if the message is oversized."""
        if len(entries) > MAX_EXCHANGE_ENTRIES:
            raise RemoteError(
                f"A peer-exchange message carried {len(entries)} entries; the limit is "
                f"{MAX_EXCHANGE_ENTRIES}."
            )
        if not all(isinstance(e, ExchangeEntry) for e in entries):
            raise RemoteError("A peer-exchange message held something other than entries.")
        # Loopback and link-local addresses only mean something in the sender's own scope.
        sender_loopback = sender_address is not None and sender_address.is_loopback
        sender_link_local = sender_address is not None and sender_address.is_link_local
        accepted = ignored = new_peers = 0
        for e in entries:
            if (
                e.member == self.me
                or e.member == sender  # the sender's own address comes from its link
                or e.age > MAX_EXCHANGE_AGE
                or (e.address.is_loopback and not sender_loopback)
                or (e.address.is_link_local and not sender_link_local)
            ):
                ignored += 1
                continue
            observed = now - e.age
            peer = self._peers.get(e.member)
            if peer is None:
                if new_peers >= MAX_NEW_PEERS_PER_EXCHANGE:
                    ignored += 1
                    continue
                peer = self._admit(e.member, now, evict=False)
                if peer is None:
                    ignored += 1
                    continue
                new_peers += 1
            info = peer.addresses.get(e.address)
            if info is not None:
                # Never override fresher or first-hand knowledge; only move time forward.
                if observed > info.observed:
                    info.observed = observed
                    accepted += 1
                else:
                    ignored += 1
                continue
            if not self._make_room(peer, first_hand=False, observed=observed):
                ignored += 1
                continue
            peer.addresses[e.address] = AddressRecord(Source.EXCHANGE, observed)
            accepted += 1
        return MergeReport(accepted, ignored)

    def set_record(self, member: MemberId, addresses: Sequence[Address], now: float) -> bool:
        """Make `addresses` (from `member`'s newest signed address record) the member's record
        addresses: those of an older record that this one drops go, except the open link's;
        addresses learnt otherwise stay. False if the member has no room in the book."""
        if member == self.me:
            return False
        peer = self._peers.get(member) or self._admit(member, now, evict=True)
        if peer is None:
            return False
        keep = set(addresses)
        for a, i in list(peer.addresses.items()):
            if i.source is Source.RECORD and a not in keep and a != peer.link:
                del peer.addresses[a]
        for a in addresses:
            info = peer.addresses.get(a)
            if info is not None:
                info.observed = max(info.observed, now)
                continue
            if not self._make_room(peer, first_hand=True):
                break
            peer.addresses[a] = AddressRecord(Source.RECORD, now)
            if peer.link is None and not peer.dialing:
                peer.next_dial = min(peer.next_dial, now)
        return True

    def forget_address(self, member: MemberId, address: Address) -> bool:
        """Drop an address that proved to belong to someone else (the handshake showed
        another key there). The member itself stays, whatever addresses it has left."""
        p = self._peers.get(member)
        if p is None or address not in p.addresses or p.link == address:
            return False
        del p.addresses[address]
        return True

    # -- internals -------------------------------------------------------------------------------

    def _admit(self, member: MemberId, now: float, *, evict: bool) -> MemberRecord | None:
        if len(self._peers) >= self._max_peers:
            if not evict or not self._evict_one():
                return None
        p = MemberRecord(member, State.ALIVE, 0, now, next_dial=now, text=str(member))
        self._peers[member] = p
        return p

    def _evict_one(self) -> bool:
        """Drop the stalest member known only second-hand and never reached."""
        candidates = [
            p for p in self._peers.values() if not p.first_hand and not p.ever_reached
        ]
        if not candidates:
            return False
        victim = min(
            candidates,
            key=lambda p: (max((i.observed for i in p.addresses.values()), default=-math.inf),
                           p.member),
        )
        del self._peers[victim.member]
        return True

    def _make_room(self, peer: MemberRecord, *, first_hand: bool, observed: float = math.inf) -> bool:
        if len(peer.addresses) < MAX_ADDRESSES_PER_PEER:
            return True
        # Only second-hand, never-reached addresses are evictable; first-hand ones stay.
        evictable = [
            (i.observed, a) for a, i in peer.addresses.items()
            if i.source is Source.EXCHANGE and i.last_ok is None and a != peer.link
        ]
        if not evictable:
            return False
        oldest, victim = min(evictable)
        if not first_hand and oldest >= observed:
            return False
        del peer.addresses[victim]
        return True

    def _confirm(
        self, peer: MemberRecord, address: Address, source: Source, now: float, *, reached: bool
    ) -> None:
        info = peer.addresses.get(address)
        if info is None:
            if not self._make_room(peer, first_hand=True):
                return
            info = peer.addresses[address] = AddressRecord(source, now)
        info.observed = max(info.observed, now)
        if reached:
            info.last_ok = now
        if SOURCE_RANK[source] < SOURCE_RANK[info.source]:
            info.source = source

    def _pick_address(self, p: MemberRecord) -> tuple[Address, Source]:
        # Prefer what worked most recently, then operator-given over heard-of; rotate on
        # failures so one dead address cannot hide the live ones.
        ranked = sorted(
            p.addresses.items(),
            key=lambda kv: (
                -(kv[1].last_ok if kv[1].last_ok is not None else -math.inf),
                SOURCE_RANK[kv[1].source],
                -kv[1].observed,
                kv[0],
            ),
        )
        addr, info = ranked[p.dial_failures % len(ranked)]
        return addr, info.source
