"""The budget bookkeeping (node/budgets.py) and the pending pool's per-author counts
(node/pending_pool.py), with the clock passed in."""

from __future__ import annotations

import pytest
from nodefakes import FOUNDER, OTHER, T0

from valuemesh.node.budgets import Attempts, Budgets, ByteWindows
from valuemesh.node.pending_pool import PendingPool
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import Record


def test_a_byte_window_allows_its_burst_then_its_rate() -> None:
    w = ByteWindows(rate=100.0, burst=1000.0)
    assert w.room("a", 0.0) == 1000.0
    assert w.spend("a", 1000.0, 0.0) == 0.0
    assert w.room("a", 0.0) == 0.0 and w.room("b", 0.0) == 1000.0  # per key
    assert w.room("a", 2.0) == 200.0  # refilled at the rate
    assert w.spend("a", 400.0, 2.0) == pytest.approx(2.0)  # in debt: wait until repaid
    assert w.room("a", 3.0) == 0.0 and w.room("a", 100.0) == 1000.0  # never above the burst


def test_a_byte_window_forgets_the_longest_idle_keys_past_its_bound() -> None:
    w = ByteWindows(rate=1.0, burst=10.0, max_keys=3)
    for i, key in enumerate("abcd"):
        w.spend(key, 10.0, float(i))
    assert w.room("a", 3.0) == 10.0  # forgotten: full again, as it nearly was
    assert w.room("d", 3.0) == 0.0


def test_attempts_are_counted_per_peer_and_per_invite_and_expire() -> None:
    a = Attempts(ttl=10.0)
    a.start("p1", "inv", 0.0)
    a.start("p2", "inv", 1.0)
    a.start("p1", "other", 2.0)
    a.start("p1", "other", 3.0)  # again: still one attempt
    assert (a.per_peer("p1"), a.per_peer("p2"), a.per_invite("inv"), a.per_invite("other")) == (2, 1, 2, 1)
    assert a.expire(10.5) == []  # p1 still has one under way
    assert a.per_invite("inv") == 1 and a.per_peer("p1") == 1
    assert a.expire(11.5) == ["p2"]
    a.forget_peers(lambda peer: peer == "p1")
    assert a.per_peer("p1") == 0 and a.per_invite("other") == 0 and not a.holds("p1", "other")


def test_budgets_refuse_nonsense() -> None:
    with pytest.raises(LocalError):
        Budgets(seq_window=0)
    with pytest.raises(LocalError):
        Budgets(history_bytes_per_s=0)


def _rec(who: Identity, seq: int, note: str = "") -> Record:
    return Record.create(who, type="contribution", v=1, constellation=bytes(32), seq=seq,
                         body={"op": "record", "action": "work", "quantity": "1", "unit": "h", "note": note},
                         created=T0)


def test_the_pending_pool_counts_each_authors_share_as_it_changes() -> None:
    pool = PendingPool()
    a1, a2, b1 = _rec(FOUNDER, 1), _rec(FOUNDER, 7, "long" * 10), _rec(OTHER, 3)
    for r in (a1, a2, b1):
        pool[r.id] = r
    f = FOUNDER.member.key
    assert (pool.records_of(f), pool.bytes_of(f), pool.highest_seq(f)) == (2, len(a1.raw) + len(a2.raw), 7)
    del pool[a2.id]
    assert (pool.records_of(f), pool.bytes_of(f), pool.highest_seq(f)) == (1, len(a1.raw), 1)
    assert pool.pop(a1.id) is a1 and pool.pop(a1.id, None) is None
    assert (pool.records_of(f), pool.highest_seq(f)) == (0, -1)
    assert pool.records_of(OTHER.member.key) == 1
    pool.clear()
    assert pool.records_of(OTHER.member.key) == 0 and not pool
    with pytest.raises(TypeError):
        pool.update({b1.id: b1})
