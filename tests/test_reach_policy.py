"""The reach policy's decisions (node/reach_policy.py): relays held, members reached through
relays, relayed links offered for punching, path names."""

from __future__ import annotations

import ipaddress

from valuemesh.node.reach_policy import DialVia, Known, LinkView, Punch, ReachPolicy, Reserve, path_of
from valuemesh.protocol.identity import MemberId


def _m(i: int) -> MemberId:
    return MemberId(bytes([i]) * 32)


ME = _m(5)
LAN = [ipaddress.ip_network("192.168.1.0/24")]


def test_a_node_behind_nat_holds_two_relays_and_a_public_one_none() -> None:
    p = ReachPolicy(ME)
    known = {_m(1): Known(_m(1), True), _m(2): Known(_m(2), True), _m(3): Known(_m(3), False),
             _m(4): Known(_m(4), True)}
    links = [LinkView(_m(1), "direct", rtt=0.030), LinkView(_m(2), "direct", rtt=0.010),
             LinkView(_m(3), "lan", rtt=0.001), LinkView(_m(4), "relayed", via=_m(1), rtt=0.002)]
    ask, drop = p.relays(False, links, known, now=0.0)
    # Only public members linked directly; the shortest round trips first.
    assert ask == [Reserve(_m(2)), Reserve(_m(1))] and drop == []
    p.reserved_at(_m(2))
    p.reserved_at(_m(1))
    assert p.relays(False, links, known, now=1.0) == ([], [])
    # Reachable after all (a port mapping, say): every reservation is given up.
    assert p.relays(True, links, known, now=2.0) == ([], [_m(1), _m(2)])


def test_a_lost_relay_is_replaced_and_asked_again_only_after_its_back_off() -> None:
    p = ReachPolicy(ME)
    known = {i: Known(i, True) for i in (_m(1), _m(2), _m(3))}
    links = [LinkView(i, "direct", rtt=0.01 * n) for n, i in enumerate((_m(1), _m(2), _m(3)))]
    p.reserved_at(_m(1))
    p.reserved_at(_m(2))
    p.relay_lost(_m(1), now=10.0)
    ask, _ = p.relays(None, links, known, now=10.0)
    assert ask == [Reserve(_m(3))]  # not _m(1), still backed off
    p.reserved_at(_m(3))
    links_without_2 = [v for v in links if v.member != _m(2)]
    ask, drop = p.relays(None, links_without_2, known, now=20.0)
    assert drop == [_m(2)] and ask == [Reserve(_m(1))]  # its link fell; _m(1)'s back-off is over


def test_members_behind_nat_are_reached_through_a_linked_relay() -> None:
    p = ReachPolicy(ME)
    relay, home, neighbour, public = _m(1), _m(7), _m(8), _m(9)
    known = {relay: Known(relay, True), home: Known(home, False, ("10.0.0.2",), (_m(3), relay)),
             neighbour: Known(neighbour, False, ("192.168.1.20",), (relay,)),
             public: Known(public, True, (), (relay,))}
    linked = {relay: LinkView(relay, "direct")}
    got = p.via([relay, home, neighbour, public], linked, known, LAN, now=0.0)
    # The neighbour is on our LAN and the public member dialable: only `home` goes via.
    assert got == [DialVia(home, relay)]
    p.direct_failed(public, now=1.0)
    assert DialVia(public, relay) in p.via([public], linked, known, LAN, now=2.0)
    p.via_failed(home, now=3.0)
    assert p.via([home], linked, known, LAN, now=4.0) == []
    assert p.via([home], linked, known, LAN, now=5.1) == [DialVia(home, relay)]
    # A relay reached only through another relay is no relay to go through.
    assert p.via([home], {relay: LinkView(relay, "relayed", via=_m(3))}, known, LAN, now=9.0) == []


def test_one_end_of_a_relayed_link_asks_for_a_punch_once() -> None:
    low, high = ReachPolicy(_m(2)), ReachPolicy(_m(8))
    assert low.punches([LinkView(_m(8), "relayed", via=_m(1))]) == [Punch(_m(8))]
    assert low.punches([LinkView(_m(8), "relayed", via=_m(1))]) == []
    assert high.punches([LinkView(_m(2), "relayed", via=_m(1))]) == []
    low.unlinked(_m(8))
    assert low.punches([LinkView(_m(8), "relayed", via=_m(1)), LinkView(_m(9), "direct")]) == [Punch(_m(8))]


def test_paths_are_named_from_what_the_link_is() -> None:
    assert path_of("192.168.1.9", inbound=True, dialled_kind=None, mapped=True, local=LAN) == "lan"
    assert path_of("203.0.113.4", inbound=False, dialled_kind="mapped", mapped=False, local=LAN) == "mapped"
    assert path_of("203.0.113.4", inbound=True, dialled_kind=None, mapped=True, local=LAN) == "mapped"
    assert path_of("203.0.113.4", inbound=True, dialled_kind=None, mapped=False, local=LAN) == "direct"
    assert path_of("203.0.113.4", inbound=False, dialled_kind="direct", mapped=True, local=LAN) == "direct"
