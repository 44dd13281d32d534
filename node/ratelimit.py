"""Per-peer token buckets and a reputation table (score, exponential back-off) that the
transport uses to throttle floods and to refuse keys and addresses that misbehaved.

No I/O and no hidden clock: every method takes `now` (seconds, monotonic) from the caller.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

# How long an address or key stays remembered after its last offence once its
# back-off has run out; after that it starts with a clean record again.
FORGET_AFTER = 3600.0
# A hard cap on remembered entries so a stream of spoofed keys cannot grow memory.
MAX_ENTRIES = 10_000


class TokenBucket:
    """A token bucket that may go into debt: `charge` always accepts the cost and
    returns how many seconds the caller should wait before taking more input."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("A token bucket needs a positive rate and burst.")
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = now

    def charge(self, cost: float, now: float) -> float:
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._tokens -= cost
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    @property
    def tokens(self) -> float:
        return self._tokens


@dataclass(slots=True)
class _Entry:
    score: float
    updated: float
    strikes: int = 0
    banned_until: float = 0.0


@dataclass(frozen=True, slots=True)
class ReputationPolicy:
    """Score and back-off parameters: a score starts at `start`, recovers by
    `recovery_per_s` up to `start`, and falling below `threshold` bans for
    `backoff_base * 2**(strikes-1)` seconds, capped at `backoff_max`."""

    start: float = 100.0
    threshold: float = 0.0
    recovery_per_s: float = 0.5
    backoff_base: float = 30.0
    backoff_max: float = 6 * 3600.0


class Reputation:
    """Scores and bans keyed by anything hashable (member ids, IP addresses)."""

    def __init__(self, policy: ReputationPolicy) -> None:
        self.policy = policy
        self._entries: dict[Hashable, _Entry] = {}

    def _entry(self, key: Hashable, now: float) -> _Entry:
        e = self._entries.get(key)
        p = self.policy
        if e is None:
            if len(self._entries) >= MAX_ENTRIES:
                self._evict(now)
            e = _Entry(score=p.start, updated=now)
            self._entries[key] = e
        else:
            e.score = min(p.start, e.score + max(0.0, now - e.updated) * p.recovery_per_s)
            e.updated = now
        return e

    def _evict(self, now: float) -> None:
        stale = [
            k
            for k, e in self._entries.items()
            if e.banned_until <= now and now - e.updated > FORGET_AFTER
        ]
        for k in stale:
            del self._entries[k]
        if len(self._entries) >= MAX_ENTRIES:
            # Keep the ones banned longest: they are the ones worth remembering.
            keep = sorted(self._entries.items(), key=lambda kv: kv[1].banned_until)
            for k, _ in keep[: len(keep) // 2]:
                del self._entries[k]

    def score(self, key: Hashable, now: float) -> float:
        e = self._entries.get(key)
        return self.policy.start if e is None else self._entry(key, now).score

    def penalize(self, key: Hashable, points: float, now: float) -> float:
        """Lower the score; return the ban length in seconds if this starts a ban, else 0."""
        e = self._entry(key, now)
        e.score -= max(0.0, points)
        if e.score >= self.policy.threshold or e.banned_until > now:
            return 0.0
        return self._ban(e, now)

    def ban(self, key: Hashable, now: float) -> float:
        """Ban at once (the next step of the exponential ladder); return its length."""
        e = self._entry(key, now)
        if e.banned_until > now:
            return e.banned_until - now
        return self._ban(e, now)

    def _ban(self, e: _Entry, now: float) -> float:
        p = self.policy
        if e.banned_until and now - e.banned_until > FORGET_AFTER:
            e.strikes = 0
        e.strikes += 1
        length = float(min(p.backoff_max, p.backoff_base * 2.0 ** min(e.strikes - 1, 40)))
        e.banned_until = now + length
        # Coming back after a ban starts from a fresh score, not from deep debt.
        e.score = p.start
        return length

    def banned_for(self, key: Hashable, now: float) -> float:
        """Seconds left of the key's ban (0 when it may connect)."""
        e = self._entries.get(key)
        if e is None or e.banned_until <= now:
            return 0.0
        return e.banned_until - now

    def strikes(self, key: Hashable) -> int:
        e = self._entries.get(key)
        return 0 if e is None else e.strikes

    def __len__(self) -> int:
        return len(self._entries)
