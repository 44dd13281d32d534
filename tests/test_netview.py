"""What `peers`, `status` and `netcheck` say of the network (node/netview.py): each link's path
and RTT, the NAT behaviour told from what members saw, the reachability, mapping, relay and
IPv6 sentences, and netcheck's parameters (bad ones refused with one sentence). The seen
addresses of a real dial-back round carry our end of each connection we opened."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Any, cast

import pytest
from multidict import MultiDict
from test_dialback import Peer
from test_relay import relayed_pair
from transport_kit import running_cluster, until

from valuemesh.node.addresses import Address, Network
from valuemesh.node.addrspread import AddressSpread
from valuemesh.node.dialback import REACHABLE, UNKNOWN, UNREACHABLE, DialBack, Reachability, Seen
from valuemesh.node.interfaces import local_networks
from valuemesh.node.link import PeerLink
from valuemesh.node.messaging import Send, Spawn
from valuemesh.node.netview import (
    MAX_WAIT_S,
    NAT_EDM,
    NAT_EIM,
    NAT_NONE,
    NAT_UNKNOWN,
    NatView,
    address_lines,
    ids,
    ipv6_view,
    link_json,
    links_view,
    mapping_view,
    nat_behaviour,
    parse_params,
    reach_view,
    relays_view,
)
from valuemesh.node.portmap import PortMapping
from valuemesh.node.reach import Reach
from valuemesh.node.transport import Transport
from valuemesh.protocol.addressrec import AddressRecord, Kind, RecordAddress
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity, MemberId

LAN = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("127.0.0.0/8")]
ME = Identity(bytes([9]) * 32)
NOW = 1_796_000_000_000


def mid(n: int) -> MemberId:
    return MemberId(bytes([n]) * 32)


@dataclass
class LinkLike:
    """The attributes of a PeerLink that the path and RTT view read."""

    remote: MemberId
    addr: tuple[str, int]
    inbound: bool
    path: str = "direct"
    via: MemberId | None = None
    rtt: float | None = None


class AddrsLike:
    """What Reach.path reads of AddressSpread: the members' records and this host's networks."""

    def __init__(self, records: dict[MemberId, AddressRecord]) -> None:
        self.table = self
        self._records = records

    def kind_of(self, member: MemberId, address: Address) -> Kind | None:
        rec = self._records.get(member)
        return None if rec is None else next(
            (a.kind for a in rec.addresses if Address(a.host, a.port) == address), None)

    def local(self) -> list[Network]:
        return list(LAN)


def view(link: LinkLike | PeerLink, record: AddressRecord | None = None, *, mapped: bool = False) -> dict[str, Any]:
    """link_json with the path as the daemon names it (node/reach.py Reach.path)."""
    reach = Reach(ME.member, cast(Transport, None), {}, cast(AddressSpread, AddrsLike(
        {link.remote: record} if record is not None else {})), cast(DialBack, None), send=cast(Send, None),
        wanted=lambda: (), groups=lambda k: (), spawn=cast(Spawn, None))
    if mapped:
        reach.mapping = PortMapping("pcp", 7470, "198.51.100.99", 7470, 7200)
    lk = cast(PeerLink, link)
    return link_json(lk, reach.path(lk))


def record(*addrs: tuple[Kind, str, int]) -> AddressRecord:
    return AddressRecord.sign(ME, 1, tuple(sorted(RecordAddress(k, h, p) for k, h, p in addrs)), ())


# -- paths ---------------------------------------------------------------------------------------


def test_each_path_with_the_relay_and_rtt() -> None:
    rec = record((Kind.MAPPED, "203.0.113.7", 7470), (Kind.LAN, "10.0.0.2", 7470))
    assert view(LinkLike(mid(1), ("192.168.1.9", 7470), False, rtt=0.0123)) == \
        {"path": "lan", "relay": None, "rtt_ms": 12.3}
    assert view(LinkLike(mid(1), ("203.0.113.7", 7470), False), rec)["path"] == "mapped"
    # The same IP on another port than the record's mapped one was not dialled as mapped.
    assert view(LinkLike(mid(1), ("203.0.113.7", 9999), False), rec)["path"] == "direct"
    assert view(LinkLike(mid(1), ("198.51.100.4", 50123), True), rec, mapped=True)["path"] == "mapped"
    assert view(LinkLike(mid(1), ("198.51.100.4", 50123), True), rec, mapped=False)["path"] == "direct"
    assert view(LinkLike(mid(1), ("198.51.100.4", 7470), False, path="punched"))["path"] == "punched"
    relayed = view(LinkLike(mid(1), ("", 0), False, path="relayed", via=mid(2), rtt=0.25))
    assert relayed == {"path": "relayed", "relay": str(mid(2)), "rtt_ms": 250.0}
    assert link_json(None, None) == {"path": None, "relay": None, "rtt_ms": None}


def test_loopback_is_one_of_our_networks() -> None:
    assert any(ipaddress.ip_address("127.0.0.1") in net for net in local_networks())


# -- NAT behaviour -------------------------------------------------------------------------------


def seen(observed: tuple[str, int], remote_ip: str | None, opened_from: tuple[str, int] | None) -> Seen:
    return Seen(Address(*observed), remote_ip, opened_from)


OWN = ["192.168.1.20", "127.0.0.1"]


def nat(*views: Seen) -> NatView:
    return nat_behaviour({mid(i + 1): s for i, s in enumerate(views)}, OWN, LAN)


def test_no_observation_or_only_neighbours_is_unknown_and_says_why() -> None:
    none = nat()
    assert none.kind == NAT_UNKNOWN and "no member has said yet" in none.text
    lan = nat(seen(("192.168.1.20", 40000), "192.168.1.9", ("192.168.1.20", 40000)))
    assert lan.kind == NAT_UNKNOWN and "only members on this node's own network" in lan.text


def test_seen_at_our_own_address_is_no_nat() -> None:
    v = nat(seen(("192.168.1.20", 40001), "198.51.100.4", ("192.168.1.20", 40001)))
    assert v.kind == NAT_NONE and "own address 192.168.1.20" in v.text


def test_ports_kept_on_our_connections_is_endpoint_independent() -> None:
    v = nat(seen(("203.0.113.7", 40001), "198.51.100.4", ("192.168.1.20", 40001)),
            seen(("203.0.113.7", 40002), "198.51.100.5", ("192.168.1.20", 40002)))
    assert v.kind == NAT_EIM and v.outside == ("203.0.113.7",) and v.observations == 2
    assert "hole punching can work" in v.text


def test_ports_changed_on_our_connections_is_symmetric() -> None:
    v = nat(seen(("203.0.113.7", 61001), "198.51.100.4", ("192.168.1.20", 40001)),
            seen(("203.0.113.7", 52002), "198.51.100.5", ("192.168.1.20", 40002)))
    assert v.kind == NAT_EDM and "symmetric" in v.text and "relays" in v.text


def test_one_local_port_to_several_members_is_the_exact_test() -> None:
    same = nat(seen(("203.0.113.7", 61001), "198.51.100.4", ("192.168.1.20", 7470)),
               seen(("203.0.113.7", 61001), "198.51.100.5", ("192.168.1.20", 7470)))
    assert same.kind == NAT_EIM  # the port changed, but the same for every destination
    differ = nat(seen(("203.0.113.7", 61001), "198.51.100.4", ("192.168.1.20", 7470)),
                 seen(("203.0.113.7", 61002), "198.51.100.5", ("192.168.1.20", 7470)))
    assert differ.kind == NAT_EDM


def test_several_outside_addresses_is_symmetric() -> None:
    v = nat(seen(("203.0.113.7", 40001), "198.51.100.4", ("192.168.1.20", 40001)),
            seen(("203.0.113.8", 40002), "198.51.100.5", ("192.168.1.20", 40002)))
    assert v.kind == NAT_EDM and v.outside == ("203.0.113.7", "203.0.113.8")


def test_too_few_of_our_connections_is_unknown_and_says_so() -> None:
    # The second member dialled us: it saw the port it dialled, which says nothing of our NAT.
    v = nat(seen(("203.0.113.7", 40001), "198.51.100.4", ("192.168.1.20", 40001)),
            seen(("203.0.113.7", 7470), "198.51.100.5", None))
    assert v.kind == NAT_UNKNOWN and "it takes two" in v.text and "Behind NAT" in v.text
    mixed = nat(seen(("203.0.113.7", 40001), "198.51.100.4", ("192.168.1.20", 40001)),
                seen(("203.0.113.7", 55555), "198.51.100.5", ("192.168.1.20", 40002)))
    assert mixed.kind == NAT_UNKNOWN and "unclear" in mixed.text


# -- reachability and the other sentences --------------------------------------------------------


def test_reachability_states() -> None:
    pub = Address("203.0.113.7", 7470)
    lan = Address("192.168.1.20", 7470)
    rec = record((Kind.DIRECT, pub.host, pub.port), (Kind.LAN, lan.host, lan.port))
    nonat = NatView(NAT_NONE, "", ("203.0.113.7",), 2)
    unknown = NatView(NAT_UNKNOWN, "")

    def state(results: dict[Address, str], checked: int | None = NOW - 5000) -> Reachability:
        return Reachability(results, {}, (mid(1), mid(2)), checked)

    r = reach_view(state({pub: REACHABLE, lan: UNKNOWN}), rec, nonat, None, 7470, NOW)
    assert r["state"] == "reachable" and r["age_s"] == 5 and "203.0.113.7:7470" in r["text"]
    assert "checked 5 s ago by 2 member(s)" in r["text"]
    r = reach_view(state({pub: UNREACHABLE}), rec, nonat, None, 7470, NOW)
    assert r["state"] == "unreachable" and "turn on port_mapping and UPnP-IGD" in r["text"]
    refused = PortMapping("", 7470, reason="the router granted none")
    r = reach_view(state({pub: UNREACHABLE}), rec, nonat, refused, 7470, NOW)
    assert "turn on UPnP-IGD, NAT-PMP or PCP on the router, so that it maps TCP port 7470" in r["text"]
    home = record((Kind.LAN, lan.host, lan.port))
    behind = NatView(NAT_EIM, "", ("198.51.100.99",), 2)
    r = reach_view(state({lan: UNKNOWN}), home, behind, None, 7470, NOW)
    assert r["state"] == "unreachable" and "at 198.51.100.99, behind NAT" in r["text"]
    r = reach_view(state({lan: REACHABLE}), home, unknown, None, 7470, NOW)
    assert r["state"] == "lan" and "own network only" in r["text"]
    r = reach_view(state({lan: UNKNOWN}), home, unknown, None, 7470, NOW)
    assert r["state"] == "unknown"
    r = reach_view(Reachability(), None, unknown, None, 7470, NOW)
    assert r["state"] == "unchecked" and r["age_s"] is None and r["checked_at"] is None
    mapped = PortMapping("pcp", 7470, "198.51.100.99", 7470, 7200)
    r = reach_view(state({lan: UNREACHABLE}), home, unknown, mapped, 7470, NOW)
    assert "To be reachable" not in r["text"]  # the router maps already: no advice


def test_addresses_mapping_relays_ipv6_and_links_sentences() -> None:
    rec = record((Kind.MAPPED, "198.51.100.99", 7470), (Kind.LAN, "192.168.1.20", 7470))
    lines = address_lines(rec, {Address("198.51.100.99", 7470): REACHABLE})
    assert [(a["kind"], a["result"]) for a in lines] == [("mapped", "reachable"), ("lan", "unchecked")]
    assert lines[0]["text"].endswith("members dialled it back there.")
    assert address_lines(None, {}) == []

    got = mapping_view(PortMapping("pcp", 7470, "198.51.100.99", 7470, 7200), True)
    assert got["obtained"] and got["external_port"] == 7470
    assert got["text"] == ("Port mapping: the router forwards 198.51.100.99:7470 to this node's port 7470 by PCP, "
                           "for 7200 s, renewed at half that.")
    assert "permanent" in mapping_view(PortMapping("upnp", 7470, "198.51.100.99", 7470, 0), True)["text"]
    none = mapping_view(PortMapping("", 7470, reason="the router at 10.0.0.1 granted none (pcp: refused)"), True)
    assert not none["obtained"] and none["text"].startswith("No port mapping: the router at 10.0.0.1")
    assert "turned off" in mapping_view(None, False)["text"]
    assert "not been asked" in mapping_view(None, True)["text"]

    r = relays_view([mid(1), mid(2)], [mid(3)], 2, True, False)
    assert r["reserved_at"] == [str(mid(1)), str(mid(2))] and r["circuits"] == 2
    assert f"{mid(1).short}…" in r["text"] and "relays for 1 member(s)" in r["text"]
    assert "needs none" in relays_view([], [], 0, True, True)["text"]
    assert "serve_relay = false" in relays_view([], [], 0, False, False)["text"]
    assert ids([mid(i) for i in range(1, 7)]).endswith("and 2 more")

    v6 = ipv6_view(["2001:db8::5", "2a0f:17::5", "fe80::1", "10.0.0.2"], "0.0.0.0", rec)
    assert v6["host_addresses"] == ["2a0f:17::5"] and v6["announced"] == []  # 2001:db8:: is documentation
    assert "listens on 0.0.0.0" in v6["text"]
    rec6 = record((Kind.DIRECT, "2a0f:17::5", 7470))
    assert ipv6_view(["2a0f:17::5"], "::", rec6)["announced"] == ["[2a0f:17::5]:7470"]
    assert "no global IPv6" in ipv6_view(["10.0.0.2"], "0.0.0.0", None)["text"]

    links = links_view({mid(1): ("lan", None), mid(2): ("relayed", mid(9)), mid(3): ("relayed", mid(9))})
    assert links["counts"]["relayed"] == 2 and links["counts"]["lan"] == 1
    assert links["text"] == f"Links: 3 member(s) — 1 lan, 2 relayed (relayed via {mid(9).short}…)."
    assert "none" in links_view({})["text"]


# -- parameters ----------------------------------------------------------------------------------


def test_parameters() -> None:
    assert parse_params({}) == (True, 12.0)
    assert parse_params({"fresh": "false", "wait_s": "0"}) == (False, 0.0)
    assert parse_params({"fresh": "1", "wait_s": str(MAX_WAIT_S)}) == (True, MAX_WAIT_S)


@pytest.mark.parametrize("query, says", [
    ({"fresh": "maybe"}, "fresh must be true or false"),
    ({"wait_s": "nan"}, "wait_s must be a number"),
    ({"wait_s": "-1"}, "wait_s must be a number"),
    ({"wait_s": "21"}, "wait_s must be a number"),
    ({"wait_s": "1e999"}, "wait_s must be a number"),
    ({"wait_s": "ten"}, "wait_s must be a number"),
    ({"verbose": "1"}, "only the parameters fresh and wait_s"),
    ({"x" * 5000: "1"}, "only the parameters fresh and wait_s"),
])
def test_bad_parameters_are_refused_with_one_sentence(query: dict[str, str], says: str) -> None:
    with pytest.raises(LocalError, match=says) as err:
        parse_params(query)
    assert len(err.value.message) < 200 and err.value.message.endswith(".")


def test_a_repeated_parameter_is_refused() -> None:
    with pytest.raises(LocalError, match="at most once"):
        parse_params(MultiDict([("fresh", "true"), ("fresh", "false")]))


# -- what a real dial-back round records ---------------------------------------------------------


async def test_a_round_records_our_end_of_the_connection_the_helper_saw() -> None:
    loopback = "127.0.0.1"
    asker, helper = Peer(), Peer()
    async with asyncio.timeout(60):
        try:
            host, port = await asker.transport.start(loopback, 0)
            await helper.transport.start(loopback, 0)
            asker.announce = [Address(host, port)]
            link = await asker.transport.connect(*helper.transport.address)  # type: ignore[misc]
            for _ in range(50):  # bounded: both ends take the link in
                if asker.links and helper.links:
                    break
                await asyncio.sleep(0.05)
            state = await asker.dialback.ask()
            mine = state.seen[helper.identity.member]
            assert mine.opened_from is not None and mine.opened_from == link.opened_from
            # No NAT on loopback: the helper saw exactly our end of the connection we opened.
            assert (mine.observed.host, mine.observed.port) == mine.opened_from
            assert mine.remote_ip == loopback
            # The other way round, the helper dialled nobody: its link to us was opened by us.
            back = helper.links[asker.identity.member]
            assert back.opened_from is None and back.inbound
        finally:
            for p in (asker, helper):
                await p.dialback.close()
                await p.transport.stop()


async def test_a_real_relayed_link_shows_its_relay_and_the_relay_lists_whom_it_serves() -> None:
    async with running_cluster() as cluster:
        relay, a, b, link, far = await relayed_pair(cluster)
        for end in (link, far):
            got = view(end)
            assert got["path"] == "relayed" and got["relay"] == str(relay.member)
            assert end.opened_from is None  # no socket of its own: nothing of a NAT to see
        await until(lambda: link.rtt is not None, "the relayed link's first round trip")
        assert view(link)["rtt_ms"] is not None
        # Each end dialled the relay: that link has our socket's end, which the relay sees.
        to_relay = b.transport.link(relay.member)
        assert to_relay is not None and to_relay.opened_from is not None
        seen_by_relay = relay.transport.link(b.member)
        assert seen_by_relay is not None and seen_by_relay.addr == to_relay.opened_from
        assert seen_by_relay.opened_from is None
        held = relays_view(a.transport.reservations, a.transport.relaying.relayed_for, 0, True, False)
        assert held["reserved_at"] == [str(relay.member)]
        serving = relays_view(relay.transport.reservations, relay.transport.relaying.relayed_for,
                              relay.transport.relaying.circuits, True, True)
        assert serving["relaying_for"] == [str(a.member)] and serving["circuits"] == 1
