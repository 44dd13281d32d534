"""Tests of the pure peer table: SWIM states and refutation, Lifeguard health, back-off,
peer-exchange bounds and the API snapshot, driven by a virtual clock and seeded randomness.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.node.addressbook import (
    MAX_ADDRESSES_PER_PEER,
    MAX_EXCHANGE_ENTRIES,
    MAX_NEW_PEERS_PER_EXCHANGE,
)
from valuemesh.node.addresses import Address, ExchangeEntry, Source
from valuemesh.node.peer_actions import (
    Dial,
    DialTarget,
    Died,
    Ping,
    PingReq,
    Refute,
    Revived,
    State,
    Suspected,
)
from valuemesh.node.peers import (
    BACKOFF_CAP,
    MAX_THIRD_PARTY_INCARNATION_STEP,
    PeerTable,
    Timers,
    backoff_delay,
)
from valuemesh.protocol.errors import LocalError, RemoteError
from valuemesh.protocol.identity import MemberId

T = Timers(probe_interval=1.0, probe_timeout=0.3, backoff_base=1.0, backoff_cap=64.0)


def mid(i: int) -> MemberId:
    return MemberId(bytes([i]) * 32)


ME = mid(250)


def table(max_peers: int = 4096, seed: int = 1) -> PeerTable:
    return PeerTable(ME, random.Random(seed), timers=T, max_peers=max_peers)


def link(t: PeerTable, m: MemberId, now: float = 0.0, port: int = 9000) -> None:
    a = Address("10.0.0.1", port + m.key[0])
    t.add_address(m, a, Source.MDNS, now)
    t.linked_up(m, a, Source.MDNS, now, dialed=DialTarget(a, m, Source.MDNS))


def run_until(t: PeerTable, now: float, end: float, step: float = 0.05) -> list[object]:
    out: list[object] = []
    guard = 0
    while now < end:
        guard += 1
        assert guard < 100_000
        now = min(end, max(now + step, min(t.next_deadline(), end)))
        for act in t.tick(now):
            out.append(act)
            if isinstance(act, Ping):  # every member answers its probes
                t.heard_from(act.member, now)
    return out


# --- timers and our own key --------------------------------------------------------------


def test_timers_validation() -> None:
    with pytest.raises(LocalError):
        Timers(probe_interval=1.0, probe_timeout=1.0)
    with pytest.raises(LocalError):
        Timers(backoff_base=2.0, backoff_cap=1.0)


def test_never_our_own_key() -> None:
    t = table()
    assert not t.add_address(ME, Address("10.0.0.9", 1), Source.MDNS, 0.0)
    r = t.merge_exchange(mid(1), None, [ExchangeEntry(ME, Address("10.0.0.9", 1), 0.0)], 0.0)
    assert (r.accepted, r.ignored) == (0, 1)
    assert t.linked_up(ME, Address("10.0.0.9", 1), Source.MDNS, 0.0) == []
    assert ME not in t and len(t) == 0


# --- peer exchange --------------------------------------------------------------------------


def test_exchange_oversized_message_rejected_without_change() -> None:
    t = table()
    entries = [ExchangeEntry(mid(i), Address("10.0.1.1", 1000 + i), 0.0)
               for i in range(MAX_EXCHANGE_ENTRIES + 1)]
    with pytest.raises(RemoteError):
        t.merge_exchange(mid(200), None, entries, 0.0)
    assert len(t) == 0


def test_exchange_bounds_new_peers_per_message() -> None:
    t = table()
    entries = [ExchangeEntry(mid(i), Address("10.0.1.1", 1000 + i), 0.0) for i in range(40)]
    r = t.merge_exchange(mid(200), None, entries, 0.0)
    assert r.accepted == MAX_NEW_PEERS_PER_EXCHANGE
    assert r.ignored == 40 - MAX_NEW_PEERS_PER_EXCHANGE
    assert len(t) == MAX_NEW_PEERS_PER_EXCHANGE


def test_exchange_never_overrides_fresher_or_first_hand() -> None:
    t = table()
    a = Address("10.0.0.5", 7000)
    t.add_address(mid(1), a, Source.MDNS, 100.0)
    # Older news about the same address is ignored; the source stays first-hand.
    r = t.merge_exchange(mid(2), None, [ExchangeEntry(mid(1), a, 50.0)], 120.0)
    assert r.accepted == 0
    assert t.addresses(mid(1)) == {a: Source.MDNS}
    # Fresher news moves the time forward but never downgrades the source.
    r = t.merge_exchange(mid(2), None, [ExchangeEntry(mid(1), a, 1.0)], 120.0)
    assert r.accepted == 1
    assert t.addresses(mid(1)) == {a: Source.MDNS}
    assert t.snapshot(120.0)[0].addresses[0].seen_ago == pytest.approx(1.0)


def test_exchange_scope_and_age_rules() -> None:
    t = table()
    lo = ExchangeEntry(mid(1), Address("127.0.0.1", 7001), 0.0)
    ll = ExchangeEntry(mid(2), Address("169.254.3.4", 7002), 0.0)
    old = ExchangeEntry(mid(3), Address("10.0.0.3", 7003), 10_000.0)
    about_sender = ExchangeEntry(mid(9), Address("10.0.0.9", 7009), 0.0)
    r = t.merge_exchange(mid(9), Address("10.9.9.9", 1), [lo, ll, old, about_sender], 20_000.0)
    assert (r.accepted, r.ignored) == (0, 4)
    # From a sender that is itself on loopback, loopback addresses are meaningful.
    r = t.merge_exchange(mid(9), Address("127.0.0.1", 1), [lo], 20_000.0)
    assert r.accepted == 1 and mid(1) in t


def test_exchange_address_cap_keeps_first_hand() -> None:
    t = table()
    first = Address("10.0.0.1", 1)
    t.add_address(mid(1), first, Source.BOOTSTRAP, 0.0)
    for round_ in range(5):
        entries = [ExchangeEntry(mid(1), Address("10.0.2.1", 2000 + round_ * 20 + i), 0.0)
                   for i in range(20)]
        t.merge_exchange(mid(2), None, entries, float(round_))
    addrs = t.addresses(mid(1))
    assert len(addrs) == MAX_ADDRESSES_PER_PEER
    assert addrs[first] is Source.BOOTSTRAP


def test_table_capacity_evicts_only_unreached_second_hand() -> None:
    t = table(max_peers=3)
    link(t, mid(1))
    t.merge_exchange(mid(1), None, [ExchangeEntry(mid(2), Address("10.0.0.2", 2), 5.0),
                                    ExchangeEntry(mid(3), Address("10.0.0.3", 3), 1.0)], 10.0)
    assert len(t) == 3
    # Another exchange cannot grow the table past its bound.
    t.merge_exchange(mid(1), None, [ExchangeEntry(mid(4), Address("10.0.0.4", 4), 0.0)], 10.0)
    assert len(t) == 3 and mid(4) not in t
    # A first-hand sighting evicts the stalest second-hand member, never a linked one.
    assert t.add_address(mid(5), Address("10.0.0.5", 5), Source.MDNS, 11.0)
    assert mid(1) in t and mid(5) in t and mid(2) not in t and mid(3) in t
    assert t.add_address(mid(6), Address("10.0.0.6", 6), Source.MDNS, 12.0)
    assert not t.add_address(mid(7), Address("10.0.0.7", 7), Source.MDNS, 13.0)
    assert set(t.members()) == {mid(1), mid(5), mid(6)}


def test_exchange_offer_does_not_launder_unverified_addresses() -> None:
    t = table()
    link(t, mid(1))
    t.merge_exchange(mid(1), None, [ExchangeEntry(mid(2), Address("10.0.0.2", 2), 0.0)], 0.0)
    t.add_address(mid(3), Address("10.0.0.3", 3), Source.MDNS, 0.0)
    # Neither the second-hand address (mid 2) nor the unproven mDNS claim (mid 3) is passed on.
    offered = t.exchange_offer(mid(9), 1.0)
    assert [(e.member, e.age) for e in offered] == [(mid(1), 1.0)]
    assert t.exchange_offer(mid(1), 1.0) == []  # never a peer's own address back to it
    t.linked_up(mid(3), Address("10.0.0.3", 3), Source.MDNS, 2.0,
                dialed=DialTarget(Address("10.0.0.3", 3), mid(3), Source.MDNS))
    assert {e.member for e in t.exchange_offer(mid(1), 2.0)} == {mid(3)}



def test_a_member_linked_to_us_is_offered_at_the_port_it_listens_on_while_linked() -> None:
    # A member that dialed us (we never dialed it) is passed on at the listen port its Hello
    # gave for the IP its link comes from, so members who joined through us find each other;
    # only while that link is open, and never a claim for another IP.
    t = table()
    link(t, mid(1))
    t.linked_up(mid(4), Address("10.0.0.4", 50123), Source.INBOUND, 1.0, listen=Address("10.0.0.4", 7470))
    offered = {(e.member, e.address, e.age) for e in t.exchange_offer(mid(1), 2.0)}
    assert (mid(4), Address("10.0.0.4", 7470), 0.0) in offered
    assert all(e.address.port != 50123 for e in t.exchange_offer(mid(1), 2.0))  # never the ephemeral port
    t.linked_down(mid(4), 3.0)
    assert mid(4) not in {e.member for e in t.exchange_offer(mid(1), 3.0)}



def test_keys_the_receiver_may_not_hear_of_never_crowd_out_members() -> None:
    # 70 linked keys (more than one offer holds) that `about` rejects, and one member: the
    # member is offered; cutting to the limit before asking `about` offered nobody.
    t = table()
    for i in range(10, 80):
        t.linked_up(mid(i), Address(f"10.0.1.{i}", 50000 + i), Source.INBOUND, 1.0,
                    listen=Address(f"10.0.1.{i}", 7470))
    t.linked_up(mid(5), Address("10.0.0.5", 5), Source.MDNS, 1.0,
                dialed=DialTarget(Address("10.0.0.5", 5), mid(5), Source.MDNS))
    offered = t.exchange_offer(mid(1), 10.0, about=lambda m: m in (mid(1), mid(5)))
    assert [e.member for e in offered] == [mid(5)]


# --- dialing ----------------------------------------------------------------------------------


def test_backoff_bounds_and_growth() -> None:
    assert backoff_delay(1, 0.0, 1.0, 64.0) == 0.5
    assert backoff_delay(1, 0.999, 1.0, 64.0) < 1.0
    assert backoff_delay(4, 0.0, 1.0, 64.0) == 4.0
    assert backoff_delay(100, 0.5, 1.0, 64.0) == 48.0
    assert backoff_delay(10_000, 0.0, 0.5, BACKOFF_CAP) == BACKOFF_CAP / 2
    with pytest.raises(LocalError):
        backoff_delay(1, 1.0, 1.0, 2.0)


@given(st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_backoff_never_below_half_step_nor_above_cap(failures: int, jitter: float) -> None:
    d = backoff_delay(failures, jitter, 1.0, 64.0)
    step = min(64.0, 2.0 ** min(failures - 1, 62))
    assert step / 2 <= d <= step


def test_dials_back_off_then_suspect_but_never_remove() -> None:
    t = table()
    a = Address("10.0.0.1", 1)
    t.add_address(mid(1), a, Source.MDNS, 0.0)
    now, dial_times, events = 0.0, [], []
    for _ in range(200):
        now = t.next_deadline()
        for act in t.tick(now):
            if isinstance(act, Dial):
                dial_times.append(now)
                events += t.dial_failed(act.target, now, jitter=0.5)
            elif isinstance(act, (Suspected, Died)):
                events.append(act)
        if now > 500:
            break
    gaps = [b - a for a, b in itertools.pairwise(dial_times)]
    assert gaps[:4] == [0.75, 1.5, 3.0, 6.0]
    assert max(gaps) == 48.0  # capped: 64 * 3/4
    assert Suspected(mid(1), 0) in events and Died(mid(1), 0) in events
    assert mid(1) in t and t.state(mid(1)) is State.DEAD
    # Dead members are still dialed; the first link makes them alive again.
    acts = t.linked_up(mid(1), a, Source.MDNS, now, dialed=DialTarget(a, mid(1), Source.MDNS))
    assert acts == [Revived(mid(1), 0)] and t.state(mid(1)) is State.ALIVE


def test_dial_rotates_over_addresses() -> None:
    t = table()
    addrs = [Address("10.0.0.1", p) for p in (1, 2, 3)]
    for a in addrs:
        t.add_address(mid(1), a, Source.MDNS, 0.0)
    tried = set()
    now = 0.0
    for _ in range(6):
        now = t.next_deadline()
        for act in t.tick(now):
            if isinstance(act, Dial):
                tried.add(act.target.address)
                t.dial_failed(act.target, now, 0.0)
    assert tried == set(addrs)


def test_bootstrap_address_resolves_to_member() -> None:
    t = table()
    a = Address("seed.example.org", 4000)
    assert t.add_anonymous(a, Source.BOOTSTRAP, 0.0)
    with pytest.raises(LocalError):
        t.add_anonymous(a, Source.EXCHANGE, 0.0)
    [dial] = [x for x in t.tick(0.0) if isinstance(x, Dial)]
    assert dial.target.member is None
    t.dial_failed(dial.target, 0.0, 0.0)
    assert t.anonymous() == [a] and t.next_deadline() == 0.5
    [dial] = [x for x in t.tick(0.5) if isinstance(x, Dial)]
    t.linked_up(mid(7), a, Source.BOOTSTRAP, 0.6, dialed=dial.target)
    assert t.anonymous() == []
    assert t.addresses(mid(7)) == {a: Source.BOOTSTRAP}
    assert t.linked() == [mid(7)]


def test_bootstrap_to_ourselves_is_forgotten() -> None:
    t = table()
    a = Address("10.0.0.1", 4000)
    t.add_anonymous(a, Source.BOOTSTRAP, 0.0)
    [dial] = [x for x in t.tick(0.0) if isinstance(x, Dial)]
    t.linked_up(ME, a, Source.BOOTSTRAP, 0.1, dialed=dial.target)
    assert t.anonymous() == [] and len(t) == 0


def test_inbound_link_records_listen_port_not_ephemeral_port() -> None:
    t = table()
    t.linked_up(mid(1), Address("10.0.0.1", 51234), Source.INBOUND, 0.0,
                listen=Address("10.0.0.1", 7000))
    assert t.addresses(mid(1)) == {Address("10.0.0.1", 7000): Source.INBOUND}
    view = t.snapshot(0.0)[0]
    assert view.linked and view.via is not None and view.via.port == 51234
    assert view.via.source == "inbound"


def test_link_down_redials_after_reconnect_delay() -> None:
    t = table()
    link(t, mid(1))
    t.linked_down(mid(1), 5.0)
    assert not any(isinstance(a, Dial) for a in t.tick(5.0 + T.reconnect_delay / 2))
    acts = t.tick(5.0 + T.reconnect_delay)
    assert any(isinstance(a, Dial) and a.target.member == mid(1) for a in acts)


# --- SWIM liveness ------------------------------------------------------------------------------


def test_probe_round_robin_covers_every_linked_member() -> None:
    t = table()
    for i in range(1, 6):
        link(t, mid(i))
    pinged = []
    now = 0.0
    for _ in range(10):
        now = t.next_deadline()
        for act in t.tick(now):
            if isinstance(act, Ping):
                pinged.append(act.member)
                t.heard_from(act.member, now + 0.01)
    assert set(pinged[:5]) == {mid(i) for i in range(1, 6)}
    assert set(pinged[5:10]) == {mid(i) for i in range(1, 6)}
    assert t.local_health == 0


def test_silent_member_goes_indirect_then_suspect_then_dead() -> None:
    t = table()
    for i in (1, 2, 3, 4):
        link(t, mid(i))
    silent = mid(3)
    events: list[object] = []
    now = 0.0
    health = 0
    for _ in range(400):
        now = t.next_deadline()
        for act in t.tick(now):
            events.append(act)
            health = max(health, t.local_health)
            if isinstance(act, Ping) and act.member != silent:
                t.heard_from(act.member, now)
        if t.state(silent) is State.DEAD:
            break
    kinds = [type(e) for e in events if getattr(e, "member", None) == silent]
    assert kinds.index(Ping) < kinds.index(PingReq) < kinds.index(Suspected) < kinds.index(Died)
    req = next(e for e in events if isinstance(e, PingReq))
    assert silent not in req.helpers and len(req.helpers) == 3
    assert mid(3) in t  # death is a proposal; the member stays in the table
    # Lifeguard: our missed acks raised local health, which stretches probe timing.
    assert health >= 1
    assert t.probe_interval() == T.probe_interval * (1 + t.local_health)
    # ... and answered probes bring it back down.
    run_until(t, now, now + 60.0)
    assert t.local_health == 0


def test_suspect_that_answers_is_alive_again() -> None:
    t = table()
    link(t, mid(1))
    link(t, mid(2))
    t.rumour(mid(2), mid(1), State.SUSPECT, 0, 1.0)
    assert t.state(mid(1)) is State.SUSPECT
    assert t.heard_from(mid(1), 2.0) == [Revived(mid(1), 0)]
    assert t.state(mid(1)) is State.ALIVE
    assert not any(isinstance(a, Died) for a in run_until(t, 2.0, 200.0))


def test_higher_incarnation_refutes_suspicion() -> None:
    t = table()
    link(t, mid(1))
    t.rumour(mid(2), mid(1), State.SUSPECT, 4, 1.0)
    assert t.state(mid(1)) is State.SUSPECT and t.incarnation_of(mid(1)) == 4
    # An alive rumour at the same incarnation does not refute; a higher one does.
    assert t.rumour(mid(2), mid(1), State.ALIVE, 4, 1.1) == []
    assert t.rumour(mid(2), mid(1), State.ALIVE, 5, 1.2) == [Revived(mid(1), 5)]
    # A stale suspicion (lower incarnation) is ignored.
    assert t.rumour(mid(2), mid(1), State.SUSPECT, 4, 1.3) == []
    assert t.state(mid(1)) is State.ALIVE


def test_third_party_cannot_kill_or_pin() -> None:
    t = table()
    link(t, mid(1))
    t.rumour(mid(2), mid(1), State.DEAD, 0, 1.0)
    assert t.state(mid(1)) is State.SUSPECT  # a rumour of death only starts our suspicion
    far = MAX_THIRD_PARTY_INCARNATION_STEP + 1
    assert t.rumour(mid(2), mid(1), State.ALIVE, far, 1.1) == []
    assert t.state(mid(1)) is State.SUSPECT
    # The member itself may jump as far as it likes.
    assert t.rumour(mid(1), mid(1), State.ALIVE, 10**9, 1.2) == [Revived(mid(1), 10**9)]


def test_refute_rumour_about_ourselves() -> None:
    t = table()
    assert t.rumour(mid(1), ME, State.SUSPECT, 0, 1.0) == [Refute(1)]
    assert t.announce_self() == 1 and t.local_health == 1
    assert t.rumour(mid(1), ME, State.DEAD, 0, 1.1) == []  # already refuted
    assert t.rumour(mid(1), ME, State.DEAD, 7, 1.2) == [Refute(8)]


def test_bad_incarnation_and_state_rejected() -> None:
    t = table()
    link(t, mid(1))
    for inc in (-1, 1 << 63, True):
        with pytest.raises(RemoteError):
            t.rumour(mid(2), mid(1), State.ALIVE, inc, 0.0)
    with pytest.raises(RemoteError):
        t.rumour(mid(2), mid(1), "zombie", 0, 0.0)  # type: ignore[arg-type]
    assert t.state(mid(1)) is State.ALIVE and t.incarnation_of(mid(1)) == 0


def test_confirmations_shorten_suspicion() -> None:
    def death_time(confirmers: int) -> float:
        t = table()
        for i in range(1, 11):
            link(t, mid(i))
        for r in range(2, 2 + confirmers + 1):
            t.rumour(mid(r), mid(1), State.SUSPECT, 0, 0.0)
        now = 0.0
        for _ in range(10_000):
            now += 0.25
            for act in t.tick(now):
                if isinstance(act, Ping) and act.member != mid(1):
                    t.heard_from(act.member, now)
                if isinstance(act, Died) and act.member == mid(1):
                    return now
        raise AssertionError("never declared dead")

    low, high = table().suspicion_bounds()
    times = [death_time(c) for c in range(0, 4)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]
    assert all(low - 0.25 <= x <= high * 1.1 + 0.25 for x in times)


# --- snapshot ---------------------------------------------------------------------------------


def test_snapshot_says_how_each_peer_is_reached() -> None:
    t = table()
    link(t, mid(1), now=1.0)
    t.add_address(mid(2), Address("10.0.0.2", 2), Source.MDNS, 1.0)
    views = {v.member: v for v in t.snapshot(3.0)}
    v1 = views[str(mid(1))]
    assert v1.linked and v1.via is not None and v1.via.source == "mdns" and v1.dial_in is None
    v2 = views[str(mid(2))]
    assert not v2.linked and v2.dial_in == 0.0 and v2.addresses[0].ok_ago is None
    j = v1.to_json()
    assert j["member"] == str(mid(1)) and j["state"] == "alive"
    assert j["via"] == {"host": v1.via.host, "port": v1.via.port, "source": "mdns",
                        "seen_ago": 2.0, "ok_ago": 2.0}


# --- property: invariants under arbitrary input sequences -------------------------------------

_members = st.integers(1, 12).map(mid) | st.just(ME)
_addrs = st.builds(Address, st.sampled_from(["10.0.0.1", "10.0.0.2", "127.0.0.1", "fe80::1"]),
                   st.integers(1, 6))
_ops = st.one_of(
    st.tuples(st.just("add"), _members, _addrs, st.sampled_from(
        [Source.MDNS, Source.BOOTSTRAP, Source.INVITE, Source.INBOUND])),
    st.tuples(st.just("xchg"), _members, st.lists(
        st.builds(ExchangeEntry, _members, _addrs, st.floats(0, 5000)), max_size=20)),
    st.tuples(st.just("up"), _members, _addrs),
    st.tuples(st.just("down"), _members),
    st.tuples(st.just("heard"), _members, st.none() | st.integers(0, 40)),
    st.tuples(st.just("rumour"), _members, _members, st.sampled_from(list(State)),
              st.integers(0, 40)),
    st.tuples(st.just("tick"), st.floats(0, 30)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ops, max_size=60), st.integers(0, 3))
def test_invariants_hold_for_any_input_sequence(ops: list[tuple[object, ...]], seed: int) -> None:
    t = PeerTable(ME, random.Random(seed), timers=T, max_peers=8)
    rng = random.Random(seed)
    now = 0.0
    seen_inc: dict[MemberId, int] = {}
    my_inc = 0
    for op in ops:
        kind = op[0]
        if kind == "add":
            t.add_address(op[1], op[2], op[3], now)  # type: ignore[arg-type]
        elif kind == "xchg":
            t.merge_exchange(mid(99), None, op[2], now)  # type: ignore[arg-type]
        elif kind == "up":
            t.linked_up(op[1], op[2], Source.MDNS, now)  # type: ignore[arg-type]
        elif kind == "down":
            t.linked_down(op[1], now)  # type: ignore[arg-type]
        elif kind == "heard":
            t.heard_from(op[1], now, op[2])  # type: ignore[arg-type]
        elif kind == "rumour":
            t.rumour(op[1], op[2], op[3], op[4], now)  # type: ignore[arg-type]
        else:
            now += op[1]  # type: ignore[operator]
            for act in t.tick(now):
                if isinstance(act, Dial):
                    t.dial_failed(act.target, now, rng.random())
        assert ME not in t
        assert len(t) <= 8
        assert t.announce_self() >= my_inc
        my_inc = t.announce_self()
        assert 0 <= t.local_health <= T.max_local_health
        assert t.next_deadline() >= 0
        seen_inc = {m: i for m, i in seen_inc.items() if m in t}  # evicted: forgotten
        for m in t.members():
            assert len(t.addresses(m)) <= MAX_ADDRESSES_PER_PEER
            inc = t.incarnation_of(m)
            assert inc is not None and inc >= seen_inc.get(m, 0)
            seen_inc[m] = inc
        for v in t.snapshot(now):
            assert v.state in {"alive", "suspect", "dead"}
            assert v.dial_in is None or v.dial_in >= 0


def test_forget_address_keeps_member_and_live_link() -> None:
    t = table()
    a, b = Address("10.0.0.1", 1), Address("10.0.0.2", 2)
    t.add_address(mid(1), a, Source.MDNS, 0.0)
    t.add_address(mid(1), b, Source.MDNS, 0.0)
    assert t.forget_address(mid(1), a)
    assert not t.forget_address(mid(1), a)
    assert t.addresses(mid(1)) == {b: Source.MDNS} and mid(1) in t
    t.linked_up(mid(1), b, Source.MDNS, 1.0, dialed=DialTarget(b, mid(1), Source.MDNS))
    assert not t.forget_address(mid(1), b)  # never the address of the open link


def test_saved_addresses_restore_after_restart() -> None:
    t = table()
    link(t, mid(1), now=10.0)
    t.add_address(mid(2), Address("10.0.0.2", 2), Source.BOOTSTRAP, 5.0)
    t.merge_exchange(mid(1), None, [ExchangeEntry(mid(3), Address("10.0.0.3", 3), 4.0),
                                    ExchangeEntry(mid(4), Address("10.0.0.4", 4), 4.0)], 20.0)
    # A handshake over mid(4)'s exchanged address proved the key there; mid(3)'s is hearsay.
    e4 = Address("10.0.0.4", 4)
    t.linked_up(mid(4), e4, Source.EXCHANGE, 22.0, dialed=DialTarget(e4, mid(4), Source.EXCHANGE))
    saved = t.saved(30.0)
    assert {(s.member, s.source, s.age, s.reached) for s in saved} == {
        (mid(1), Source.MDNS, 20.0, True),
        (mid(2), Source.BOOTSTRAP, 25.0, False),
        (mid(4), Source.EXCHANGE, 8.0, True),
    }
    # A fresh table (a restarted node, a new monotonic clock) gets the same view back.
    u = table()
    for s in saved:
        assert u.restore(s.member, s.address, s.source, s.age, 1000.0, reached=s.reached)
    assert not u.restore(ME, Address("10.0.0.9", 9), Source.MDNS, 0.0, 1000.0, reached=True)
    assert [(x.member, x.address, x.source, x.age, x.reached) for x in u.saved(1000.0)] == [
        (x.member, x.address, x.source, x.age, x.reached) for x in saved]
    # Restored members are dialed right away, most recently successful address first.
    dials = {a.target.member for a in u.tick(1000.0) if isinstance(a, Dial)}
    assert dials == {mid(1), mid(2), mid(4)}


def test_snapshot_json_is_versioned() -> None:
    t = table()
    link(t, mid(1))
    t.add_anonymous(Address("seed.example.org", 7000), Source.BOOTSTRAP, 0.0)
    doc = t.snapshot_json(1.0)
    assert doc["v"] == 1 and doc["local_health"] == 0 and doc["incarnation"] == 0
    assert doc["bootstrap_pending"] == ["seed.example.org:7000"]
    assert [p["member"] for p in doc["peers"]] == [str(mid(1))]  # type: ignore[attr-defined]


# --- the liveness transition table, every (state, input) pair ------------------------------------

def _in_state(state: State) -> PeerTable:
    """A table where mid(1) is linked, at incarnation 3, in `state`."""
    t = table()
    link(t, mid(1))
    t.rumour(mid(1), mid(1), State.ALIVE, 3, 0.0)
    if state is not State.ALIVE:
        t.rumour(mid(2), mid(1), State.SUSPECT, 3, 0.0)
    if state is State.DEAD:
        for _ in range(1000):
            if t.state(mid(1)) is State.DEAD:
                break
            t.tick(t.next_deadline())
    assert t.state(mid(1)) is state and t.incarnation_of(mid(1)) == 3
    return t


_INPUTS = {
    "own word": lambda t: t.heard_from(mid(1), 0.5),
    "own higher incarnation": lambda t: t.rumour(mid(1), mid(1), State.ALIVE, 9, 0.5),
    "alive, same incarnation": lambda t: t.rumour(mid(2), mid(1), State.ALIVE, 3, 0.5),
    "alive, higher incarnation": lambda t: t.rumour(mid(2), mid(1), State.ALIVE, 4, 0.5),
    "suspect, lower incarnation": lambda t: t.rumour(mid(2), mid(1), State.SUSPECT, 2, 0.5),
    "suspect, same incarnation": lambda t: t.rumour(mid(3), mid(1), State.SUSPECT, 3, 0.5),
    "dead rumour": lambda t: t.rumour(mid(3), mid(1), State.DEAD, 3, 0.5),
}

# Expected next state for each (state, input): SWIM's precedence, with a third party's
# word never killing anyone and a member's own word always reviving it.
_EXPECTED = {
    State.ALIVE: {
        "own word": State.ALIVE, "own higher incarnation": State.ALIVE,
        "alive, same incarnation": State.ALIVE, "alive, higher incarnation": State.ALIVE,
        "suspect, lower incarnation": State.ALIVE, "suspect, same incarnation": State.SUSPECT,
        "dead rumour": State.SUSPECT,
    },
    State.SUSPECT: {
        "own word": State.ALIVE, "own higher incarnation": State.ALIVE,
        "alive, same incarnation": State.SUSPECT, "alive, higher incarnation": State.ALIVE,
        "suspect, lower incarnation": State.SUSPECT, "suspect, same incarnation": State.SUSPECT,
        "dead rumour": State.SUSPECT,
    },
    State.DEAD: {
        "own word": State.ALIVE, "own higher incarnation": State.ALIVE,
        "alive, same incarnation": State.DEAD, "alive, higher incarnation": State.ALIVE,
        "suspect, lower incarnation": State.DEAD, "suspect, same incarnation": State.DEAD,
        "dead rumour": State.DEAD,
    },
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("name", list(_INPUTS))
def test_liveness_transition_table(state: State, name: str) -> None:
    t = _in_state(state)
    _INPUTS[name](t)
    assert t.state(mid(1)) is _EXPECTED[state][name]
    assert mid(1) in t  # no input ever removes a member
