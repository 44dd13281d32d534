"""The peer table: which members we know, how to reach them, and whether they are alive.

Pure logic with no I/O: SWIM liveness with incarnations and refutation, Lifeguard local
health, dialing back-off with jitter and peer-exchange merging. Time and randomness come in.

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

import enum
import ipaddress
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from valuemesh.protocol.errors import LocalError, RemoteError, ValidationError
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

# Bounds against memory growth from hostile or chatty peers.
MAX_PEERS = 4096
MAX_ADDRESSES_PER_PEER = 8
MAX_ANONYMOUS = 256
MAX_EXCHANGE_ENTRIES = 64
MAX_NEW_PEERS_PER_EXCHANGE = 16
MAX_EXCHANGE_AGE = 3600.0
# How far above our known incarnation a third party may move a member; the member itself
# may announce any higher number. Stops one liar from pinning a member "alive" forever.
MAX_THIRD_PARTY_INCARNATION_STEP = 16
MAX_INCARNATION = (1 << 63) - 1
MAX_HOSTNAME_LEN = 253


class Source(enum.StrEnum):
    """How we learnt an address; first-hand sources are never overridden by exchange."""

    MDNS = "mdns"
    BOOTSTRAP = "bootstrap"
    INVITE = "invite"
    INBOUND = "inbound"
    EXCHANGE = "exchange"


# Preference when choosing which address to dial first (lower is tried first).
_SOURCE_RANK = {
    Source.BOOTSTRAP: 0,
    Source.INVITE: 1,
    Source.MDNS: 2,
    Source.INBOUND: 3,
    Source.EXCHANGE: 4,
}


class State(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


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


# --- addresses --------------------------------------------------------------------------

_HOST_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
# An IPv6 zone is an interface name (at most IFNAMSIZ-1 = 15 bytes) or index.
_ZONE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def is_hostname(text: str) -> bool:
    """True for an RFC 1123 DNS name (letters, digits, hyphens; dot-separated labels)."""
    if not text or len(text) > MAX_HOSTNAME_LEN:
        return False
    labels = text.lower().rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or not set(label) <= _HOST_LABEL_CHARS:
            return False
        if label[0] == "-" or label[-1] == "-":
            return False
    # An all-numeric last label would be a mistyped IPv4 address, not a name.
    return not labels[-1].isdigit()


def ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A dialable (host, port); host is an IP literal (canonical form) or a DNS name."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool):
            raise ValidationError("A port must be a whole number.")
        if not 1 <= self.port <= 65535:
            raise ValidationError(f"Port {self.port} is outside 1-65535.")
        if not isinstance(self.host, str):
            raise ValidationError("A host must be text.")
        ip = ip_or_none(self.host)
        if ip is not None:
            if ip.is_unspecified or ip.is_multicast:
                raise ValidationError(f"'{self.host}' is not an address a peer can be dialed on.")
            zone = getattr(ip, "scope_id", None)
            if zone is not None and not _ZONE_RE.fullmatch(zone):
                raise ValidationError(f"'{self.host[:80]}' has an invalid interface zone.")
            object.__setattr__(self, "host", ip.compressed)
        elif not is_hostname(self.host):
            raise ValidationError(f"'{self.host[:80]}' is neither an IP address nor a host name.")
        else:
            object.__setattr__(self, "host", self.host.lower().rstrip("."))

    @property
    def is_ip(self) -> bool:
        return ip_or_none(self.host) is not None

    @property
    def is_loopback(self) -> bool:
        ip = ip_or_none(self.host)
        return ip is not None and ip.is_loopback

    @property
    def is_link_local(self) -> bool:
        ip = ip_or_none(self.host)
        return ip is not None and ip.is_link_local

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ExchangeEntry:
    """One address offered by a peer: `age` is seconds since the sender last confirmed it."""

    member: MemberId
    address: Address
    age: float

    def __post_init__(self) -> None:
        if not isinstance(self.member, MemberId) or not isinstance(self.address, Address):
            raise ValidationError("A peer-exchange entry needs a member id and an address.")
        if not isinstance(self.age, (int, float)) or isinstance(self.age, bool):
            raise ValidationError("A peer-exchange entry's age must be a number.")
        if not math.isfinite(self.age) or self.age < 0:
            raise ValidationError("A peer-exchange entry's age must be finite and not negative.")
        if not self.address.is_ip:
            raise ValidationError("Peer exchange carries IP addresses only, never host names.")


@dataclass(slots=True)
class _AddrInfo:
    source: Source
    observed: float  # last time anyone (us, or the exchanging peer) confirmed it
    last_ok: float | None = None  # last time *we* opened a link over it


# --- actions and events (outputs) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialTarget:
    """An address to dial; `member` is None for a bootstrap address whose key is unknown."""

    address: Address
    member: MemberId | None
    source: Source


@dataclass(frozen=True, slots=True)
class Dial:
    target: DialTarget


@dataclass(frozen=True, slots=True)
class Ping:
    member: MemberId
    probe: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask each helper to ping `member` for us and relay its ack (SWIM indirect probe)."""

    member: MemberId
    helpers: tuple[MemberId, ...]
    probe: int


@dataclass(frozen=True, slots=True)
class Suspected:
    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Died:
    """Our suspicion timer ran out: a proposal to the constellation, never a removal."""

    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Revived:
    member: MemberId
    incarnation: int


@dataclass(frozen=True, slots=True)
class Refute:
    """Someone says we are suspect or dead: gossip that we are alive at this incarnation."""

    incarnation: int


Action = Dial | Ping | PingReq | Suspected | Died | Revived | Refute


@dataclass(frozen=True, slots=True)
class MergeReport:
    accepted: int
    ignored: int


@dataclass(frozen=True, slots=True)
class SavedAddress:
    """One address as the node persists it; `age` is seconds since last confirmed."""

    member: MemberId
    address: Address
    source: Source
    age: float
    reached: bool
    dial_failures: int


# --- snapshot (output structs, stable for the API) -------------------------------------------

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class AddressView:
    host: str
    port: int
    source: str
    seen_ago: float
    ok_ago: float | None


@dataclass(frozen=True, slots=True)
class PeerView:
    member: str
    state: str
    incarnation: int
    state_for: float  # seconds in the current state
    linked: bool
    via: AddressView | None  # the address of the open link, if any
    addresses: tuple[AddressView, ...]
    dial_in: float | None  # seconds until the next dial, None while linked
    dial_failures: int

    def to_json(self) -> dict[str, object]:
        def addr(a: AddressView) -> dict[str, object]:
            return {
                "host": a.host,
                "port": a.port,
                "source": a.source,
                "seen_ago": round(a.seen_ago, 3),
                "ok_ago": None if a.ok_ago is None else round(a.ok_ago, 3),
            }

        return {
            "member": self.member,
            "state": self.state,
            "incarnation": self.incarnation,
            "state_for": round(self.state_for, 3),
            "linked": self.linked,
            "via": None if self.via is None else addr(self.via),
            "addresses": [addr(a) for a in self.addresses],
            "dial_in": None if self.dial_in is None else round(self.dial_in, 3),
            "dial_failures": self.dial_failures,
        }


# --- the table --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Peer:
    member: MemberId
    state: State
    incarnation: int
    state_since: float
    addresses: dict[Address, _AddrInfo] = field(default_factory=dict)
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
class _Anonymous:
    source: Source
    dialing: bool = False
    failures: int = 0
    next_dial: float = 0.0


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


class PeerTable:
    """Membership view of one node. Not thread-safe; one asyncio task drives it."""

    def __init__(
        self,
        me: MemberId,
        rng: random.Random,
        *,
        timers: Timers | None = None,
        now: float = 0.0,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.me = me
        self.incarnation = 0
        self.timers = timers or Timers()
        self.local_health = 0
        self._rng = rng
        self._max_peers = max_peers
        self._peers: dict[MemberId, _Peer] = {}
        self._anonymous: dict[Address, _Anonymous] = {}
        self._probe_order: list[MemberId] = []
        self._probe: _Probe | None = None
        self._probe_counter = 0
        self._next_probe_at = now + self.timers.probe_interval

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, member: object) -> bool:
        return member in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def members(self) -> list[MemberId]:
        return sorted(self._peers, key=_by_key)

    def state(self, member: MemberId) -> State | None:
        p = self._peers.get(member)
        return None if p is None else p.state

    def incarnation_of(self, member: MemberId) -> int | None:
        p = self._peers.get(member)
        return None if p is None else p.incarnation

    def addresses(self, member: MemberId) -> dict[Address, Source]:
        p = self._peers.get(member)
        return {} if p is None else {a: i.source for a, i in p.addresses.items()}

    def linked(self) -> list[MemberId]:
        return sorted((m for m, p in self._peers.items() if p.link is not None), key=_by_key)

    def anonymous(self) -> list[Address]:
        return sorted(self._anonymous)

    def probe_interval(self) -> float:
        return self.timers.probe_interval * (1 + self.local_health)

    def probe_timeout(self) -> float:
        return self.timers.probe_timeout * (1 + self.local_health)

    def suspicion_bounds(self) -> tuple[float, float]:
        """(min, max) suspicion timeout for the current group size, as in Lifeguard."""
        n = max(len(self._peers) + 1, 1)
        low = self.timers.suspicion_alpha * max(1.0, math.log10(n)) * self.timers.probe_interval
        return low, low * self.timers.suspicion_beta

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
            peer.addresses[address] = _AddrInfo(source, now)
            # A new address is a reason to try at once; a repeated sighting of a known one
            # is not, or a re-announcing but unreachable node would defeat the back-off.
            if peer.link is None and not peer.dialing:
                peer.next_dial = min(peer.next_dial, now)
        else:
            info.observed = max(info.observed, now)
            if _SOURCE_RANK[source] < _SOURCE_RANK[info.source]:
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
        self._anonymous[address] = _Anonymous(source, next_dial=now)
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
            info = peer.addresses[address] = _AddrInfo(source, observed)
        info.observed = max(info.observed, observed)
        if reached:
            info.last_ok = observed if info.last_ok is None else max(info.last_ok, observed)
        if _SOURCE_RANK[source] < _SOURCE_RANK[info.source]:
            info.source = source
        return True

    def saved(self, now: float) -> list[SavedAddress]:
        """Every address worth keeping across a restart, for the node to write to its store."""
        out = []
        for m in sorted(self._peers, key=_by_key):
            p = self._peers[m]
            for a, i in sorted(p.addresses.items()):
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
            peer.addresses[e.address] = _AddrInfo(Source.EXCHANGE, observed)
            accepted += 1
        return MergeReport(accepted, ignored)

    def exchange_offer(
        self, to: MemberId, now: float, limit: int = MAX_EXCHANGE_ENTRIES
    ) -> list[ExchangeEntry]:
        """Addresses worth telling `to` about: alive members, at addresses we linked over.

        Only what our own handshakes proved is passed on (an mDNS claim or a second-hand
        address is not), so neither a liar's addresses nor its key claims spread through us.
        """
        offer: list[ExchangeEntry] = []
        for m in sorted(self._peers, key=_by_key):
            p = self._peers[m]
            if m == to or p.state is not State.ALIVE:
                continue
            for a, i in p.addresses.items():
                if i.last_ok is not None and a.is_ip:
                    offer.append(ExchangeEntry(m, a, max(0.0, now - i.last_ok)))
        offer.sort(key=lambda e: (e.age, e.member.key, e.address))
        return offer[: max(0, min(limit, MAX_EXCHANGE_ENTRIES))]

    # -- links and dialing -------------------------------------------------------------------

    def forget_address(self, member: MemberId, address: Address) -> bool:
        """Drop an address that proved to belong to someone else (the handshake showed
        another key there). The member itself stays, whatever addresses it has left."""
        p = self._peers.get(member)
        if p is None or address not in p.addresses or p.link == address:
            return False
        del p.addresses[address]
        return True

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
            if anon is not None and _SOURCE_RANK[anon.source] < _SOURCE_RANK[source]:
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

    # -- liveness inputs ---------------------------------------------------------------------

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

    # -- snapshot ----------------------------------------------------------------------------------

    def snapshot(self, now: float) -> list[PeerView]:
        views = []
        for m in sorted(self._peers, key=_by_key):
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

    def _admit(self, member: MemberId, now: float, *, evict: bool) -> _Peer | None:
        if len(self._peers) >= self._max_peers:
            if not evict or not self._evict_one():
                return None
        p = _Peer(member, State.ALIVE, 0, now, next_dial=now, text=str(member))
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

    def _make_room(self, peer: _Peer, *, first_hand: bool, observed: float = math.inf) -> bool:
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
        self, peer: _Peer, address: Address, source: Source, now: float, *, reached: bool
    ) -> None:
        info = peer.addresses.get(address)
        if info is None:
            if not self._make_room(peer, first_hand=True):
                return
            info = peer.addresses[address] = _AddrInfo(source, now)
        info.observed = max(info.observed, now)
        if reached:
            info.last_ok = now
        if _SOURCE_RANK[source] < _SOURCE_RANK[info.source]:
            info.source = source

    def _pick_address(self, p: _Peer) -> tuple[Address, Source]:
        # Prefer what worked most recently, then operator-given over heard-of; rotate on
        # failures so one dead address cannot hide the live ones.
        ranked = sorted(
            p.addresses.items(),
            key=lambda kv: (
                -(kv[1].last_ok if kv[1].last_ok is not None else -math.inf),
                _SOURCE_RANK[kv[1].source],
                -kv[1].observed,
                kv[0],
            ),
        )
        addr, info = ranked[p.dial_failures % len(ranked)]
        return addr, info.source

    def _heard_from(self, p: _Peer, incarnation: int | None, now: float) -> list[Action]:
        if self._probe is not None and self._probe.target == p.member:
            self._probe = None
            self._health(-1)
        if incarnation is not None and incarnation > p.incarnation:
            p.incarnation = incarnation
        if p.state is not State.ALIVE:
            return self._set_alive(p, now)
        return []

    def _set_alive(self, p: _Peer, now: float) -> list[Action]:
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
        self, p: _Peer, incarnation: int, reporter: MemberId | None, now: float
    ) -> list[Action]:
        p.state = State.SUSPECT
        p.state_since = now
        p.incarnation = max(p.incarnation, incarnation)
        p.suspect_start = now
        p.confirmations = {reporter} if reporter is not None else set()
        self._rescale_suspicion(p)
        return [Suspected(p.member, p.incarnation)]

    def _rescale_suspicion(self, p: _Peer) -> None:
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
            self._probe_order.sort(key=_by_key)
            self._rng.shuffle(self._probe_order)
        return None

    def _helpers(self, target: MemberId) -> tuple[MemberId, ...]:
        pool = sorted(
            (m for m, p in self._peers.items()
             if m != target and p.link is not None and p.state is State.ALIVE),
            key=_by_key,
        )
        k = min(self.timers.indirect_probes, len(pool))
        return tuple(self._rng.sample(pool, k)) if k else ()


def _by_key(m: MemberId) -> bytes:
    # Sorting by raw key bytes is what MemberId's ordering means, without the cost of the
    # generated dataclass comparisons (which dominated snapshots of thousands of peers).
    return m.key


def _check_incarnation(incarnation: int) -> None:
    if (
        not isinstance(incarnation, int)
        or isinstance(incarnation, bool)
        or not 0 <= incarnation <= MAX_INCARNATION
    ):
        raise RemoteError("An incarnation number must be a whole number from 0 to 2**63-1.")

