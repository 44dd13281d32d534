"""Hostile peers against relays and relayed ends: strangers asking for relaying, opens to
non-members or unreserved members, unknown circuits, malformed and oversized circuit
messages, a member flooding through the relay, a circuit that never finishes its handshake.

Each is refused with one clear log line and changes nothing else; honest circuits go on.
Timings are printed (measured), never asserted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transport_kit import FAST, Cluster, Node, exchange, ident, recv, running_cluster, until

from valuemesh.node.link import PeerLink
from valuemesh.node.link_limits import Limits, PeerUnreachableError, RelayLimits, RelayRefusedError
from valuemesh.protocol import circuit as cm
from valuemesh.protocol import wire
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as c:
        yield c


class Members:
    """The relay's view of membership: who shares a constellation with it."""

    def __init__(self, *nodes: Node) -> None:
        self.keys = {n.member for n in nodes}

    def __call__(self, src: MemberId, dst: MemberId) -> bool:
        return src in self.keys and dst in self.keys


async def linked(node: Node, relay: Node) -> PeerLink:
    await node.transport.connect(*relay.addr, expect=relay.member)
    link = node.transport.link(relay.member)
    assert link is not None
    return link


async def relay_with_target(cluster: Cluster, limits: Limits) -> tuple[Node, Node, Node, PeerLink]:
    """A relay, a target `a` reserved at it, and one more member with its link to the relay."""
    relay = await cluster.node(limits=limits)
    a, other = await cluster.node(limits=limits), await cluster.node(limits=limits)
    relay.transport.may_relay = Members(relay, a, other)
    await a.transport.reserve(await linked(a, relay))
    return relay, a, other, await linked(other, relay)


def answers(node: Node) -> list[cm.Message]:
    """Relay messages arriving at `node` (decoded), whatever its code does with them."""
    got: list[cm.Message] = []
    relaying = node.transport.relaying
    original = relaying.on_frame

    async def spy(link: PeerLink, body: bytes) -> None:
        got.append(cm.decode(body, 1 << 30))
        await original(link, body)

    relaying.on_frame = spy  # type: ignore[method-assign]
    return got


def lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


async def test_strangers_get_neither_reservations_nor_circuits(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await cluster.node()
    a, stranger = await cluster.node(), await cluster.node()
    relay.transport.may_relay = Members(relay, a)
    await (await linked(a, relay)).send(b"warm")  # nothing to do with relaying
    a_link = a.transport.link(relay.member)
    assert a_link is not None
    await a.transport.reserve(a_link)
    s_link = await linked(stranger, relay)
    with caplog.at_level("INFO", logger="valuemesh.relay"):
        with pytest.raises(RelayRefusedError, match="no constellation in common") as err:
            await stranger.transport.reserve(s_link)
        assert err.value.code == cm.Code.NOT_AUTHORISED
        with pytest.raises(RelayRefusedError, match="no constellation in common"):
            await stranger.transport.dial_via(relay.member, a.member)
    assert len(lines(caplog, f"refused a relay reservation for {stranger.member.short}")) == 1
    assert len(lines(caplog, f"refused a circuit from {stranger.member.short}")) == 1
    # Nothing else changed: a's reservation, both links, no score lost.
    assert relay.transport.relaying.relayed_for == [a.member]
    assert relay.transport.relaying.circuits == 0
    assert not s_link.closed and relay.transport.link(stranger.member) is not None
    assert relay.transport.reputation.score(stranger.member, relay.transport.clock()) == 100


async def test_opens_to_non_members_or_unreserved_members_are_refused(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await cluster.node()
    a, b, outsider = await cluster.node(), await cluster.node(), await cluster.node()
    relay.transport.may_relay = Members(relay, a, b)
    await linked(a, relay)
    await linked(b, relay)
    await linked(outsider, relay)  # linked to the relay, but in none of its constellations
    with caplog.at_level("INFO", logger="valuemesh.relay"):
        with pytest.raises(RelayRefusedError) as err:
            await b.transport.dial_via(relay.member, outsider.member)
        assert err.value.code == cm.Code.NOT_AUTHORISED
        with pytest.raises(RelayRefusedError, match="no reservation") as err:
            await b.transport.dial_via(relay.member, a.member)  # a never reserved
        assert err.value.code == cm.Code.NO_RESERVATION
        with pytest.raises(RelayRefusedError) as err:
            await b.transport.dial_via(relay.member, b.member)  # itself
        assert err.value.code == cm.Code.NOT_AUTHORISED
    # One line per reason (a second refusal for the same reason within the log interval
    # is counted, not printed: node/loglimit.py).
    assert len(lines(caplog, "refused a circuit from")) == 2
    assert len(lines(caplog, "no reservation")) == 1
    assert relay.transport.relaying.circuits == 0
    assert b.transport.link(a.member) is None and b.transport.link(outsider.member) is None
    # An INCOMING from a member a never reserved at is refused by a itself.
    got = answers(a)
    a_to_b = await linked(a, b)
    with caplog.at_level("INFO", logger="valuemesh.relay"):
        a_to_b._send_circuit(cm.incoming(1, relay.member))
        await until(lambda: any(m.op is cm.Op.OPENED for m in got), "b answered")
    assert [m.code for m in got if m.op is cm.Op.OPENED] == [cm.Code.NO_RESERVATION]
    assert len(lines(caplog, f"refused a circuit from {relay.member.short} via {a.member.short}")) == 1
    assert not a_to_b.closed and b.transport.link(relay.member) is not None


async def test_unknown_circuits_are_dropped_with_one_line(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    relay, prober = await cluster.node(), await cluster.node()
    relay.transport.may_relay = Members(relay, prober)
    link = await linked(prober, relay)
    with caplog.at_level("INFO", logger="valuemesh.relay"):
        for cid in range(1, 51):
            link._send_circuit(cm.data(cid, b"who is there"))
            link._send_circuit(cm.credit(cid, 5))
            link._send_circuit(cm.close(cid, "never opened"))
        await link.send(b"after")
        await recv(relay)
    assert len(lines(caplog, "unknown circuit")) == 1  # rate limited: one line per interval
    assert not link.closed
    assert relay.transport.reputation.score(prober.member, relay.transport.clock()) == 100
    assert relay.transport.relaying.circuits == 0


async def test_malformed_and_oversized_circuit_messages(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    limits = replace(FAST, max_payload=4096)
    relay, a, bad, link = await relay_with_target(cluster, limits)
    score = relay.transport.reputation.score
    with caplog.at_level("INFO", logger="valuemesh.transport"):
        link._send_circuit(cm.open_(1, a.member)[:-1])  # a key one byte short
        await until(lambda: len(lines(caplog, "invalid circuit message")) == 1, "first refusal")
        assert "does not name one member key" in lines(caplog, "invalid circuit message")[0]
        assert score(bad.member, relay.transport.clock()) <= 100 - limits.invalid_message_penalty + 1
    assert not link.closed and relay.transport.relaying.circuits == 0
    # An honest circuit through the same relay, then a frame over the size limit from `bad`.
    honest = await cluster.node(limits=limits)
    relay.transport.may_relay = Members(relay, a, bad, honest)
    await linked(honest, relay)
    circuit = await honest.transport.dial_via(relay.member, a.member)
    link._send_circuit(cm.data(7, os.urandom(limits.max_payload + wire.FRAME_OVERHEAD + 1)))
    await until(lambda: link.closed, "the oversized frame cut the sender off")
    assert relay.transport.banned_for(bad.member) > 0
    await until(lambda: a.transport.link(honest.member) is not None, "a's end of the honest circuit")
    await exchange(a, honest, b"unaffected")
    assert not circuit.closed


async def test_a_member_flooding_through_the_relay_is_throttled_then_cut_others_unaffected(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    budget = RelayLimits(rate_messages=200.0, burst_messages=200.0, over_budget_grace=0.3, cooldown=30.0)
    limits = replace(FAST, relay=budget, idle_timeout=10.0, send_timeout=10.0)
    relay = await cluster.node(limits=limits)
    a, flooder, honest = [await cluster.node(limits=limits) for _ in range(3)]
    relay.transport.may_relay = Members(relay, a, flooder, honest)
    await a.transport.reserve(await linked(a, relay))
    await linked(flooder, relay)
    await linked(honest, relay)
    flood = await flooder.transport.dial_via(relay.member, a.member)
    calm = await honest.transport.dial_via(relay.member, a.member)
    await until(lambda: len(a.transport.links) == 3, "a has both relayed links")

    async def pour() -> int:
        sent = 0
        chunk = os.urandom(100)
        deadline = time.monotonic() + 8.0
        while not flood.closed and time.monotonic() < deadline and sent < 100_000:
            if flood.try_send(chunk):
                sent += 1
            else:
                await asyncio.sleep(0.005)
        return sent

    with caplog.at_level("INFO", logger="valuemesh.relay"):
        pouring = asyncio.create_task(pour())
        started = time.monotonic()
        delays = []
        for i in range(20):
            t0 = time.monotonic()
            await calm.send(b"calm %d" % i)
            while True:
                who, payload = await recv(a, timeout=10.0)
                if who == honest.member:
                    break
            assert payload == b"calm %d" % i
            delays.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)
        sent = await pouring
        await until(lambda: flood.closed, "the flooder's circuit closed", timeout=10.0)
    print(f"\nflooder queued {sent} x 100 B before its circuit closed; calm message latency "
          f"median {sorted(delays)[10] * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms "
          f"over {time.monotonic() - started:.1f} s")
    assert flood.close_reason is not None and "budget" in flood.close_reason
    assert len(lines(caplog, f"relay budget of {flooder.member.short} spent")) == 1
    assert not calm.closed
    await until(lambda: a.transport.link(flooder.member) is None, "a's end of the flood closed")
    while not a.handler.messages.empty():
        assert a.handler.messages.get_nowait()[0] == flooder.member  # what got through before
    await exchange(a, honest, b"still fine")
    with pytest.raises(RelayRefusedError) as err:
        await flooder.transport.dial_via(relay.member, a.member)
    assert err.value.code == cm.Code.OVER_BUDGET
    # The flooder's own link to the relay stays (throttled, not banned): it can still talk.
    assert flooder.transport.link(relay.member) is not None


async def test_a_bulk_transfer_over_the_byte_budget_is_slowed_not_cut(cluster: Cluster) -> None:
    budget = RelayLimits(rate_bytes=1024 * 1024, burst_bytes=256 * 1024, over_budget_grace=0.3)
    relay, a, sender, _ = await relay_with_target(cluster, replace(FAST, relay=budget, max_payload=64 * 1024))
    link = await sender.transport.dial_via(relay.member, a.member)
    chunks = [os.urandom(60 * 1024) for _ in range(40)]  # 2.3 MiB: over a second past the burst
    started = time.monotonic()
    for chunk in chunks:
        await link.send(chunk)
    for chunk in chunks:
        assert await recv(a, timeout=10.0) == (sender.member, chunk)
    print(f"\n2.3 MiB through a 1 MiB/s relay budget in {time.monotonic() - started:.1f} s")
    assert relay.transport.relaying.throttled > 0
    assert not link.closed and relay.transport.relaying.circuits == 1


async def test_a_circuit_that_never_finishes_its_handshake_is_bounded(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    relay, a, mute, link = await relay_with_target(cluster, replace(FAST, handshake_timeout=0.5))
    got = answers(mute)
    with caplog.at_level("INFO", logger="valuemesh.relay"):
        link._send_circuit(cm.open_(1, a.member))  # then never a HELLO
        await until(lambda: any(m.op is cm.Op.OPENED for m in got), "the relay answered")
        assert got[0].code is cm.Code.OK
        await until(lambda: any(m.op is cm.Op.CLOSE for m in got), "a gave up and closed", timeout=5.0)
    assert len(lines(caplog, "relayed handshake from")) == 1
    assert "did not complete the handshake" in lines(caplog, "relayed handshake from")[0]
    await until(lambda: relay.transport.relaying.circuits == 0, "the relay forgot the circuit")
    assert a.transport.relaying._pending == 0 and a.transport.link(mute.member) is None
    assert not link.closed


async def test_dialling_through_a_relay_that_never_answers_is_bounded(cluster: Cluster) -> None:
    limits = replace(FAST, connect_timeout=0.5)
    a, silent = await cluster.node(limits=limits), await cluster.node(limits=limits)
    await linked(a, silent)

    # A "relay" that swallows every circuit message.
    async def swallow(link: PeerLink, body: bytes) -> None:
        return None

    silent.transport.relaying.on_frame = swallow  # type: ignore[method-assign]
    with pytest.raises(PeerUnreachableError, match="did not answer"):
        await a.transport.dial_via(silent.member, ident().member)
    assert a.transport.relaying._ends == {}


# -- the sub-protocol's decoder, pure ------------------------------------------------------

MAX_DATA = 4096 + wire.FRAME_OVERHEAD
KEY = bytes(range(32))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_decode_accepts_or_raises_circuit_error_only(body: bytes) -> None:
    try:
        msg = cm.decode(body, MAX_DATA)
    except cm.CircuitError:
        return
    assert body[5:] == msg.rest and msg.op == body[0]


def test_every_encoder_round_trips() -> None:
    member = MemberId(KEY)
    cases = [
        (cm.reserve(), cm.Op.RESERVE, 0),
        (cm.reserved(cm.Code.BUSY), cm.Op.RESERVED, 0),
        (cm.open_(7, member), cm.Op.OPEN, 7),
        (cm.incoming(cm.RESPONDER_BIT | 7, member), cm.Op.INCOMING, cm.RESPONDER_BIT | 7),
        (cm.opened(7, cm.Code.REFUSED, "no"), cm.Op.OPENED, 7),
        (cm.data(7, b"x" * MAX_DATA), cm.Op.DATA, 7),
        (cm.close(7, "bye ü"), cm.Op.CLOSE, 7),
        (cm.credit(7, 99), cm.Op.CREDIT, 7),
    ]
    for body, op, cid in cases:
        msg = cm.decode(body, MAX_DATA)
        assert (msg.op, msg.circuit) == (op, cid)
    assert cm.decode(cm.open_(7, member), MAX_DATA).member == member
    assert cm.decode(cm.opened(7, cm.Code.REFUSED, "no"), MAX_DATA).reason == "no"
    assert cm.decode(cm.reserved(cm.Code.BUSY), MAX_DATA).reason == cm.Code.BUSY.sentence
    assert cm.decode(cm.close(7, "bye ü"), MAX_DATA).reason == "bye ü"
    assert cm.decode(cm.credit(7, 99), MAX_DATA).credit == 99
    assert len(cm.close(1, "ü" * 300)) <= cm.HEADER + cm.MAX_REASON  # cut on a character


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\x06\x00\x00", "too short"),
        (b"\x0a" + bytes(4), "unknown kind"),
        (b"\x09\x00\x00\x00\x01", "misplaced circuit id"),
        (b"\x09" + bytes(4) + b"x", "unexpected bytes"),
        (b"\x00" + bytes(4), "unknown kind"),
        (b"\x01\x00\x00\x00\x01", "misplaced circuit id"),
        (b"\x03" + bytes(4) + KEY, "misplaced circuit id"),
        (b"\x01" + bytes(4) + b"x", "unexpected bytes"),
        (b"\x03\x00\x00\x00\x01" + KEY[:31], "one member key"),
        (b"\x04\x00\x00\x00\x01" + KEY + b"x", "one member key"),
        (b"\x05\x00\x00\x00\x01", "wrong length"),
        (b"\x05\x00\x00\x00\x01\x00" + b"r" * 201, "wrong length"),
        (b"\x05\x00\x00\x00\x01\x63", "unknown code"),
        (b"\x05\x00\x00\x00\x01\x00\xff", "not UTF-8"),
        (b"\x06\x00\x00\x00\x01", "circuit data of 0 bytes"),
        (b"\x06\x00\x00\x00\x01" + bytes(MAX_DATA + 1), f"at most {MAX_DATA}"),
        (b"\x07\x00\x00\x00\x01" + b"r" * 201, "too long"),
        (b"\x07\x00\x00\x00\x01\xc3", "not UTF-8"),
        (b"\x08\x00\x00\x00\x01" + bytes(4), "positive"),
        (b"\x08\x00\x00\x00\x01\x01", "positive"),
    ],
)
def test_malformed_bodies_are_refused_with_a_sentence(body: bytes, fragment: str) -> None:
    with pytest.raises(cm.CircuitError, match=fragment):
        cm.decode(body, MAX_DATA)


def test_encoders_refuse_what_the_decoder_would() -> None:
    with pytest.raises(LocalError):
        cm.data(1, b"")
    with pytest.raises(LocalError):
        cm.credit(1, 0)
    with pytest.raises(LocalError):
        cm.open_(1 << 32, MemberId(KEY))
