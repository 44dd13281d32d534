"""Tests of the transport's pure rate limiting: token buckets that go into debt, and the
reputation table's scores, exponential back-off and bounded memory, on an injected clock.
"""

from __future__ import annotations

import pytest

from valuemesh.node.ratelimit import Reputation, ReputationPolicy, TokenBucket


def test_token_bucket_accepts_burst_then_asks_to_wait() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.charge(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert b.charge(1, 0.0) == pytest.approx(0.1)
    assert b.charge(1, 1.0) == 0.0  # refilled


def test_reputation_backs_off_exponentially_with_an_injected_clock() -> None:
    rep = Reputation(ReputationPolicy(start=100, threshold=0, backoff_base=10, backoff_max=50))
    k = "10.0.0.1"
    assert rep.penalize(k, 60, now=0.0) == 0.0
    assert rep.banned_for(k, 0.0) == 0.0
    assert rep.penalize(k, 60, now=0.0) == 10.0
    assert rep.banned_for(k, 5.0) == 5.0
    assert rep.banned_for(k, 10.0) == 0.0
    assert rep.ban(k, 11.0) == 20.0
    assert rep.ban(k, 40.0) == 40.0
    assert rep.ban(k, 100.0) == 50.0  # capped
    assert rep.strikes(k) == 4


def test_reputation_recovers_and_is_bounded_in_size() -> None:
    rep = Reputation(ReputationPolicy(start=100, recovery_per_s=10))
    rep.penalize("a", 50, now=0.0)
    assert rep.score("a", 2.0) == pytest.approx(70)
    assert rep.score("a", 100.0) == 100
    for n in range(10_050):
        rep.penalize(n, 1, now=0.0)
    assert len(rep) <= 10_000
