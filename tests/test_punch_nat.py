"""Hole punching across the namespace internet (chaos/internet.py): two members in two
endpoint-independent homes punch a TCP connection using the addresses a public host observed,
coordinated through that host; with a symmetric home involved the punch fails within its
bound and says why. The actors are tests/punch_bed.py, one process per host."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chaos/ is a folder of scripts, not installed

import punch_bed  # tests/ is on sys.path under pytest

from chaos import internet
from chaos.internet import HomeSpec, Internet
from valuemesh.protocol import punch
from valuemesh.protocol.identity import Identity

REASON = internet.unavailable_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=f"internet bed: {REASON}"),
]

# Generous: a failing upgrade is MAX_TRIES dial windows plus the exchanges.
PEER_DEADLINE = punch.MAX_TRIES * (punch.DIAL_WINDOW + 2 * punch.REPLY_TIMEOUT) + 30
# Two homes of each kind, so each pairing is between two different routers.
HOMES = (HomeSpec("ea", "eim"), HomeSpec("eb", "eim"), HomeSpec("sa", "sym"), HomeSpec("sb", "sym"))
ONE, TWO = Identity(b"\x01" * 32).member, Identity(b"\x02" * 32).member


@pytest.fixture(scope="module")
def net() -> Iterator[Internet]:
    internet.remove_stale()
    with Internet(HOMES, public_hosts=1) as bed:
        yield bed
    assert bed.leftovers() == []


def punch_pair(
    net: Internet, answerer: str, upgrader: str, port: int, extra: tuple[str, ...] = ()
) -> tuple[dict[str, object], dict[str, object]]:
    return punch_bed.run_pair(net, answerer, upgrader, port, extra, PEER_DEADLINE)


def test_two_eim_homes_punch_a_direct_link(net: Internet) -> None:
    a, u = punch_pair(net, "ea1", "eb1", 7701, ("--link",))
    assert a["ok"] is True, a
    assert u["ok"] is True, u
    # Each learnt its address from the public host: its router's outside IP and, behind a
    # port-preserving endpoint-independent NAT, its own listen port.
    assert a["observed"] == [net.homes["ea"].outside_ip, 7701]
    assert u["observed"] == [net.homes["eb"].outside_ip, 7701]
    # Each reached the other at that observed address, from inside its home.
    assert u["remote"] == a["observed"] and a["remote"] == u["observed"]
    assert a["local"] == [net.host("ea1").ip, 7701] and u["local"] == [net.host("eb1").ip, 7701]
    # The stream carried the wire handshake: a punched PeerLink, authenticated both ways.
    assert a["path"] == u["path"] == "punched"
    assert a["member"] == str(TWO) and u["member"] == str(ONE)
    assert a["heard"] == 2 and u["heard"] == 1
    assert a["stolen"] == [] and u["stolen"] == []


@pytest.mark.parametrize(("answerer", "upgrader", "port"), [("ea1", "sa1", 7702), ("sa1", "sb1", 7703)])
def test_a_symmetric_home_makes_the_punch_fail_within_its_bound(
    net: Internet, answerer: str, upgrader: str, port: int
) -> None:
    a, u = punch_pair(net, answerer, upgrader, port)
    sym_sides = [r for h, r in ((answerer, a), (upgrader, u)) if net.homes[h[:2]].nat == "sym"]
    # The symmetric router maps the coordinator connection to a port of its choosing: what
    # the public host observed is not the listen port, and the next destination gets another.
    assert all(r["observed"][1] != port for r in sym_sides)  # type: ignore[index]
    assert u["ok"] is False and a["ok"] is False
    # The upgrading side tried its bounded number of times, then backs off; both say why.
    assert "No direct connection" in str(u["reason"]) and f"gave up after {punch.MAX_TRIES} tries" in str(u["reason"])
    assert "No direct connection" in str(a["reason"])
