"""Every data budget a peer, a member or a constellation's history is held to (`Budgets`),
and the pure bookkeeping that enforces them (byte windows per key, outstanding attempts).

No I/O and no hidden clock: every method takes `now` (seconds, monotonic) from the caller.
The per-link message and handshake limits are the transport's (node/link_limits.py); these
are the budgets of what a peer's *data* may make this node store, verify or serve.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from valuemesh.protocol.errors import LocalError

MIB = 1024 * 1024

# Records: how far ahead of its author's highest known (final or pending) seq a record may be.
# The ledger defers at most this many records of one author out of sequence
# (protocol/ledger.py MAX_DEFERRED_PER_AUTHOR): one further ahead could never apply.
SEQ_WINDOW = 256
# Records: one member's share of the pending pool (engine.py MAX_PENDING is shared by all):
# four members' worth fill it, one member cannot.
PENDING_SHARE_RECORDS = 2_500
PENDING_SHARE_BYTES = 16 * MIB
# Records: bytes of new records one member may make this node store, as a token bucket:
# a burst of STORED_BURST_BYTES, refilled at STORED_BYTES_PER_S.
STORED_BYTES_PER_S = 1 * MIB
STORED_BURST_BYTES = 64 * MIB
# Proofs: equivocation proofs kept per equivocating author (one is evidence enough).
PROOFS_PER_AUTHOR = 4
# Joins: join records in one batch from a peer that is not a member yet (an invitee has one).
JOIN_BATCH = 4
# Joins: join attempts outstanding (welcomed, not yet a member) per peer key and per invite,
# each forgotten after JOIN_ATTEMPT_TTL_S.
JOIN_ATTEMPTS_PER_PEER = 2
JOIN_ATTEMPTS_PER_INVITE = 8
JOIN_ATTEMPT_TTL_S = 300.0
# History: bytes of blocks and snapshot parts served to one peer, as a token bucket.
HISTORY_BYTES_PER_S = 8 * MIB
HISTORY_BURST_BYTES = 256 * MIB
# History: gap streams one peer may have running at once (one per constellation at most).
HISTORY_STREAMS_PER_PEER = 2
# History: the longest a request waits for its peer's budget before it is refused.
HISTORY_MAX_WAIT_S = 5.0
# Penalty points per message a budget refused (an invalid one costs messaging.PENALTY_INVALID).
OVER_BUDGET_PENALTY = 5.0
# Keys remembered per budget table: a stream of fresh keys cannot grow memory.
MAX_BUDGET_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class Budgets:
    """The budgets of one node, each documented at its module constant above (the
    defaults); tests shrink them to show an attack runs into them."""

    seq_window: int = SEQ_WINDOW
    pending_share_records: int = PENDING_SHARE_RECORDS
    pending_share_bytes: int = PENDING_SHARE_BYTES
    stored_bytes_per_s: float = STORED_BYTES_PER_S
    stored_burst_bytes: float = STORED_BURST_BYTES
    proofs_per_author: int = PROOFS_PER_AUTHOR
    join_batch: int = JOIN_BATCH
    join_attempts_per_peer: int = JOIN_ATTEMPTS_PER_PEER
    join_attempts_per_invite: int = JOIN_ATTEMPTS_PER_INVITE
    join_attempt_ttl_s: float = JOIN_ATTEMPT_TTL_S
    history_bytes_per_s: float = HISTORY_BYTES_PER_S
    history_burst_bytes: float = HISTORY_BURST_BYTES
    history_streams_per_peer: int = HISTORY_STREAMS_PER_PEER
    history_max_wait_s: float = HISTORY_MAX_WAIT_S
    over_budget_penalty: float = OVER_BUDGET_PENALTY

    def __post_init__(self) -> None:
        if min(self.seq_window, self.pending_share_records, self.pending_share_bytes, self.proofs_per_author,
               self.join_batch, self.join_attempts_per_peer, self.join_attempts_per_invite,
               self.history_streams_per_peer) < 1:
            raise LocalError("Budgets must be 1 or more.")
        if min(self.stored_bytes_per_s, self.stored_burst_bytes, self.history_bytes_per_s,
               self.history_burst_bytes, self.join_attempt_ttl_s) <= 0:
            raise LocalError("Budget rates and windows must be positive.")


class ByteWindows:
    """A token bucket of bytes per key: a key may spend `burst` at once, refilled at `rate`
    per second. `room` asks without spending, so a caller can check before costly work and
    `spend` only what it took in; `spend` may go into debt and says how long to wait."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_BUDGET_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def _level(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def room(self, key: Hashable, now: float) -> float:
        """Bytes `key` may spend now without waiting."""
        return max(0.0, self._level(key, now))

    def spend(self, key: Hashable, nbytes: float, now: float) -> float:
        """Take `nbytes` from `key`'s bucket; return the seconds until it is out of debt."""
        tokens = self._level(key, now) - nbytes
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)  # the longest idle: full again, or nearly
        return 0.0 if tokens >= 0 else -tokens / self.rate


class Attempts:
    """Outstanding attempts, each (peer, invite) until it is done or `ttl` passes; counted
    per peer and per invite so either can be bounded."""

    def __init__(self, ttl: float, max_keys: int = MAX_BUDGET_KEYS) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self._started: OrderedDict[tuple[Hashable, Hashable], float] = OrderedDict()
        self._per_peer: Counter[Hashable] = Counter()
        self._per_invite: Counter[Hashable] = Counter()

    def expire(self, now: float) -> list[Hashable]:
        """Forget attempts older than `ttl` (and the oldest beyond `max_keys`); return the
        peers that no longer have one."""
        gone = []
        while self._started:
            key, at = next(iter(self._started.items()))
            if now - at < self.ttl and len(self._started) <= self.max_keys:
                break
            self._forget(key)
            if not self._per_peer[key[0]]:
                gone.append(key[0])
        return gone

    def _forget(self, key: tuple[Hashable, Hashable]) -> None:
        del self._started[key]
        for table, k in ((self._per_peer, key[0]), (self._per_invite, key[1])):
            table[k] -= 1
            if table[k] <= 0:
                del table[k]

    def per_peer(self, peer: Hashable) -> int:
        return self._per_peer[peer]

    def per_invite(self, invite: Hashable) -> int:
        return self._per_invite[invite]

    def holds(self, peer: Hashable, invite: Hashable) -> bool:
        return (peer, invite) in self._started

    def start(self, peer: Hashable, invite: Hashable, now: float) -> None:
        if (peer, invite) in self._started:
            self._forget((peer, invite))
        self._started[(peer, invite)] = now
        self._per_peer[peer] += 1
        self._per_invite[invite] += 1

    def forget_peers(self, done: Callable[[Hashable], bool]) -> None:
        """Forget the attempts of every peer for which `done` says its attempt is over."""
        for key in [k for k in self._started if done(k[0])]:
            self._forget(key)

    def done(self, peer: Hashable) -> None:
        """The peer's join is in (or it left): its attempts are over."""
        if self._per_peer[peer]:
            for key in [k for k in self._started if k[0] == peer]:
                self._forget(key)
