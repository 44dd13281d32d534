"""Hole-punch coordination (DCUtR-style), pure: the two messages, the initiator's and the
responder's state machines, the handshake role after a simultaneous open, and the budgets.

Theory of operation. Two members already share an authenticated link (usually relayed).
The *initiator* sends CONNECT with its candidate addresses and notes the time; the
*responder* answers CONNECT with its own. The initiator now knows the round trip; it sends
SYNC and starts dialling RTT/2 later, while the responder dials the moment SYNC arrives, so
both SYNs leave at about the same time and cross: each NAT sees its own member's SYN go out
before the other's comes in, and lets it through (TCP simultaneous open). Node/punch.py does
the dialling; this module only decides what to send, when, and to whom.

Who called connect() says nothing after a simultaneous open (both did), so the end that
runs the wire handshake as initiator is the member with the lower id (`handshake_initiator`).
Attempts are bounded: MAX_TRIES per upgrade, then the pair backs off (`PairBackoff`); a
responder answers at most MAX_TRIES CONNECTs from one member per RESPONDER_WINDOW.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import cbor
from .errors import DecodeError, LocalError, RemoteError
from .identity import MemberId

MAX_MESSAGE = 1024
MAX_ADDRS = 8
MAX_HOST_TEXT = 45  # the longest IPv6 text form
ATTEMPT_ID_LEN = 16
MAX_TRIES = 3
# The initiator gives up on a CONNECT answer after this long; an RTT above it is no RTT.
REPLY_TIMEOUT = 5.0
# A responder forgets an attempt whose SYNC has not come this long after its answer.
SYNC_TIMEOUT = 2 * REPLY_TIMEOUT
# How long both ends keep dialling once the dial has started.
DIAL_WINDOW = 5.0
BACKOFF_BASE = 60.0
BACKOFF_CAP = 3600.0
RESPONDER_WINDOW = 60.0
MAX_TRACKED_PEERS = 1024

CONNECT = "punch-connect"
SYNC = "punch-sync"


class PunchError(RemoteError):
    """Raised when a hole-punch message is malformed, out of bounds or out of turn."""


@dataclass(frozen=True, slots=True, order=True)
class Candidate:
    """One address a member may be reachable at: an IP literal and a TCP port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not 0 < len(self.host) <= MAX_HOST_TEXT:
            raise DecodeError("A candidate address must be an IP address in text form.")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise DecodeError("A candidate port must be between 1 and 65535.")
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise DecodeError(f"'{self.host[:MAX_HOST_TEXT]}' is not an IP address.") from None
        if ip.is_unspecified or ip.is_multicast or str(ip) != self.host or (
            isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255")
        ):
            raise DecodeError(f"'{self.host}' is not a unicast address in canonical form.")

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.host).version


@dataclass(frozen=True, slots=True)
class Connect:
    """Either end's candidate addresses, for attempt `id` (chosen by the initiator)."""

    id: bytes
    addrs: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class Sync:
    """The initiator's "dial now" for attempt `id`."""

    id: bytes


Message = Connect | Sync


def candidates(addrs: Iterable[tuple[str, int]]) -> tuple[Candidate, ...]:
    """This node's candidates in the caller's order of preference (first the addresses others
    observed it at: a peer's view of the listen port, or the observed IP with the listen port
    since a port-preserving NAT maps it to itself; then LAN addresses), the first MAX_ADDRS
    distinct ones. Raises LocalError for an address that is not an IP literal and port."""
    out: list[Candidate] = []
    for host, port in addrs:
        try:
            c = Candidate(str(ipaddress.ip_address(host)), port)
        except (ValueError, DecodeError) as e:
            raise LocalError(f"Cannot offer {host!r} port {port!r} for hole punching: {e}") from None
        if c not in out:
            out.append(c)
    return tuple(out[:MAX_ADDRS])


def encode(msg: Message) -> bytes:
    if isinstance(msg, Sync):
        return cbor.encode({"t": SYNC, "id": msg.id})
    return cbor.encode({"t": CONNECT, "id": msg.id, "addrs": [[c.host, c.port] for c in msg.addrs]})


def decode(data: bytes) -> Message:
    """Strictly decode a punch message; raises PunchError (one sentence) on anything else."""
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
        raise PunchError(f"A hole-punch message must be bytes of at most {MAX_MESSAGE}.")
    try:
        m: Any = cbor.decode(data, max_size=MAX_MESSAGE)
    except DecodeError as e:
        raise PunchError(f"A hole-punch message is not valid CBOR: {e}") from None
    if not isinstance(m, dict) or m.get("t") not in (CONNECT, SYNC):
        raise PunchError("A hole-punch message must be a map of type punch-connect or punch-sync.")
    keys = {"t", "id", "addrs"} if m["t"] == CONNECT else {"t", "id"}
    if set(m) != keys:
        raise PunchError(f"A {m['t']} message has missing or unknown fields.")
    aid = m["id"]
    if not isinstance(aid, bytes) or len(aid) != ATTEMPT_ID_LEN:
        raise PunchError(f"A hole-punch attempt id must be {ATTEMPT_ID_LEN} bytes.")
    if m["t"] == SYNC:
        return Sync(aid)
    raw = m["addrs"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ADDRS:
        raise PunchError(f"A punch-connect message must carry 1 to {MAX_ADDRS} addresses.")
    addrs: list[Candidate] = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise PunchError("A candidate address must be a [host, port] pair.")
        try:
            c = Candidate(item[0], item[1])
        except DecodeError as e:
            raise PunchError(f"A punch-connect message carries a bad address: {e}") from None
        if c in addrs:
            raise PunchError("A punch-connect message lists the same address twice.")
        addrs.append(c)
    return Connect(aid, tuple(addrs))


def handshake_initiator(me: MemberId, peer: MemberId) -> bool:
    """Whether this end runs the wire handshake as initiator on a punched stream: the lower
    member id does, whoever started the punch, so both ends agree without talking."""
    if me == peer:
        raise LocalError("A node cannot punch a hole to itself.")
    return me < peer


@dataclass(frozen=True, slots=True)
class Plan:
    """What the initiator does once the answer is in: send `sync`, wait `wait` s, dial `dial`."""

    sync: bytes
    wait: float
    rtt: float
    dial: tuple[Candidate, ...]


class Phase(enum.Enum):
    NEW = "new"
    CONNECT_SENT = "connect sent"  # initiator
    ANSWERED = "answered"  # responder
    DIALLING = "dialling"


class Initiator:
    """One attempt started by this end: `connect(now)`, then `on_reply(data, now) -> Plan`."""

    def __init__(self, attempt_id: bytes, addrs: tuple[Candidate, ...]) -> None:
        if len(attempt_id) != ATTEMPT_ID_LEN or not 1 <= len(addrs) <= MAX_ADDRS:
            raise LocalError(f"A punch attempt needs a {ATTEMPT_ID_LEN}-byte id and 1 to {MAX_ADDRS} addresses.")
        self.id = attempt_id
        self.addrs = addrs
        self.phase = Phase.NEW
        self._sent_at = 0.0

    def connect(self, now: float) -> bytes:
        if self.phase is not Phase.NEW:
            raise LocalError("This punch attempt has already sent its CONNECT.")
        self.phase = Phase.CONNECT_SENT
        self._sent_at = now
        return encode(Connect(self.id, self.addrs))

    def on_reply(self, data: bytes, now: float) -> Plan:
        msg = decode(data)
        if self.phase is not Phase.CONNECT_SENT:
            raise PunchError("A punch-connect answer came when none was awaited.")
        if not isinstance(msg, Connect):
            raise PunchError("The peer sent punch-sync where its punch-connect answer was due.")
        if msg.id != self.id:
            raise PunchError("The peer answered a different hole-punch attempt.")
        rtt = now - self._sent_at
        if not 0 <= rtt <= REPLY_TIMEOUT:
            raise PunchError(f"The peer's punch-connect answer came after {rtt:.1f} s, too late to time a dial.")
        self.phase = Phase.DIALLING
        return Plan(encode(Sync(self.id)), rtt / 2, rtt, msg.addrs)


class Responder:
    """One attempt started by the peer: `on_connect(msg, now) -> answer`, then
    `on_sync(msg, now) -> whom to dial now`. A second or stale SYNC is refused."""

    def __init__(self, addrs: tuple[Candidate, ...]) -> None:
        if not 1 <= len(addrs) <= MAX_ADDRS:
            raise LocalError(f"A punch answer needs 1 to {MAX_ADDRS} addresses.")
        self.addrs = addrs
        self.phase = Phase.NEW
        self.id = b""
        self.peer_addrs: tuple[Candidate, ...] = ()
        self._answered_at = 0.0

    def on_connect(self, msg: Connect, now: float) -> bytes:
        if self.phase is not Phase.NEW:
            raise PunchError("The peer sent a second punch-connect for one attempt.")
        self.phase = Phase.ANSWERED
        self.id = msg.id
        self.peer_addrs = msg.addrs
        self._answered_at = now
        return encode(Connect(msg.id, self.addrs))

    def on_sync(self, data: bytes, now: float) -> tuple[Candidate, ...]:
        msg = decode(data)
        if not isinstance(msg, Sync):
            raise PunchError("The peer sent punch-connect where punch-sync was due.")
        if self.phase is Phase.DIALLING:
            raise PunchError("The peer sent punch-sync twice for one attempt (a replay).")
        if self.phase is not Phase.ANSWERED or msg.id != self.id:
            raise PunchError("The peer sent punch-sync for an attempt this node is not answering.")
        if now - self._answered_at > SYNC_TIMEOUT:
            raise PunchError("The peer's punch-sync came too late; the attempt is over.")
        self.phase = Phase.DIALLING
        return self.peer_addrs


class PairBackoff:
    """When this node may next try to punch to a peer: after a failed upgrade (MAX_TRIES
    tries), BACKOFF_BASE doubling up to BACKOFF_CAP, with jitter; bounded in peers."""

    def __init__(self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> None:
        self.base = base
        self.cap = cap
        self._state: OrderedDict[MemberId, tuple[int, float]] = OrderedDict()

    def wait(self, peer: MemberId, now: float) -> float:
        """Seconds before trying `peer` again (0: go ahead)."""
        st = self._state.get(peer)
        return max(0.0, st[1] - now) if st else 0.0

    def failed(self, peer: MemberId, now: float, jitter: float) -> float:
        """Record a failed upgrade; `jitter` in [0, 1) spreads retries. Returns the wait."""
        fails = self._state.pop(peer, (0, 0.0))[0] + 1
        delay = min(self.cap, self.base * 2.0 ** min(fails - 1, 32)) * (0.5 + jitter / 2)
        self._state[peer] = (fails, now + delay)
        while len(self._state) > MAX_TRACKED_PEERS:
            self._state.popitem(last=False)
        return delay

    def succeeded(self, peer: MemberId) -> None:
        self._state.pop(peer, None)


class ResponderBudget:
    """At most MAX_TRIES answered CONNECTs per member per RESPONDER_WINDOW, so a member
    cannot make this node dial (and a victim receive SYNs) more than that."""

    def __init__(self, limit: int = MAX_TRIES, window: float = RESPONDER_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._seen: OrderedDict[MemberId, list[float]] = OrderedDict()

    def allow(self, peer: MemberId, now: float) -> bool:
        times = [t for t in self._seen.pop(peer, []) if now - t < self.window]
        ok = len(times) < self.limit
        if ok:
            times.append(now)
        self._seen[peer] = times
        while len(self._seen) > MAX_TRACKED_PEERS:
            self._seen.popitem(last=False)
        return ok
